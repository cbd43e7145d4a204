"""Hugging Face image classifiers: ``hf:PATH_OR_NAME`` from a ``save_pretrained`` folder or the local cache.

The model keeps its own module names (layers are named as in ``model.named_modules()``, e.g.
``vit.encoder.layer.11.layernorm_before``); its forward returns the logits tensor instead of a
``ModelOutput``. Preprocessing comes from the saved image processor, class names from
``config.id2label``. Nothing is downloaded: a name must already be in the local HF cache.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from workers.models import ModelLoadError
from workers.preprocess import INTERPOLATIONS, Preprocess, PreprocessError
from workers.zoo.safe_load import tensors_only_loads

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
# ConvNeXt-style processors warp instead of cropping from this shortest edge on (transformers' rule).
_CROP_PCT_WARP_FROM = 384
_PIL_FILTERS = {int(member): name for name, member in INTERPOLATIONS.items()}


@dataclass
class HFModel:
    model: nn.Module
    preprocess: Preprocess
    class_names: list[str]
    num_classes: int
    default_layer: str | None
    reshape: Callable[[torch.Tensor], torch.Tensor] | None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ModelLoadError("hf:... references need transformers: pip install 'camaudit[hf]'") from error
    return transformers


def resolve(text: str) -> Path:
    """A ``save_pretrained`` folder, or the snapshot folder of a model already in the local HF cache."""
    text = text.strip()
    if not text:
        raise ModelLoadError(
            "hf: needs a folder written by save_pretrained or a model name, e.g. hf:./my-vit"
        )
    folder = Path(os.path.expanduser(text))
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{folder} has no config.json: write the model with model.save_pretrained(folder)"
            )
        return folder.resolve()
    from huggingface_hub import scan_cache_dir, snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as error:  # not cached, or not a valid repo id: either way nothing to load
        try:
            cached = sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
        except Exception:  # no cache directory at all
            cached = []
        close = difflib.get_close_matches(text, cached, n=5, cutoff=0.5)
        hint = (
            f"closest cached: {', '.join(close)}"
            if close
            else f"cached models: {', '.join(cached[:8]) or 'none'}"
        )
        raise ModelLoadError(
            f"hf:{text} is neither a folder nor a model in the local Hugging Face cache ({hint}). "
            "camaudit never downloads: save the model with save_pretrained and pass the folder, "
            "or fill the cache on a connected machine and copy it (HF_HOME)"
        ) from error


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(
        f"{folder} holds no weights ({', '.join(WEIGHT_FILES)}); save with model.save_pretrained"
    )


def load(folder: Path) -> HFModel:
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read the config in {folder}: {error}") from error
    supported = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if config.model_type not in supported:
        close = difflib.get_close_matches(config.model_type, supported, n=5, cutoff=0.5)
        hint = (
            f"closest: {', '.join(close)}"
            if close
            else f"e.g. {', '.join(['vit', 'convnext', 'swin', 'resnet'])}"
        )
        raise ModelLoadError(f"{folder} holds a {config.model_type!r} model, not an image classifier; {hint}")
    try:
        with tensors_only_loads():
            model = transformers.AutoModelForImageClassification.from_pretrained(
                folder, local_files_only=True
            )
    except Exception as error:
        raise ModelLoadError(f"cannot load the image classifier in {folder}: {error}") from error
    model.eval()
    _return_logits(model)
    processor = _processor(transformers, folder)
    labels = {int(k): str(v) for k, v in dict(config.id2label).items()}
    names = [labels.get(i, str(i)) for i in range(int(config.num_labels))]
    layer, reshape = _layer_and_reshape(model, config)
    return HFModel(
        model=model,
        preprocess=preprocess_of(processor),
        class_names=names,
        num_classes=int(config.num_labels),
        default_layer=layer,
        reshape=reshape,
    )


def _processor(transformers: Any, folder: Path) -> Any:
    if not (folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no preprocessor_config.json: save the image processor next to the model "
            "(processor.save_pretrained(folder)), so images are prepared as the model was trained"
        )
    try:
        return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot read the image processor in {folder}: {error}") from error


def _size(processor: Any, name: str) -> Mapping[str, Any]:
    value = getattr(processor, name, None)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return value
    if isinstance(value, int):
        return {"height": value, "width": value}
    return {k: v for k, v in vars(value).items() if v is not None} if hasattr(value, "__dict__") else {}


def preprocess_of(processor: Any) -> Preprocess:
    """The transform an image processor applies, as a :class:`Preprocess` (crops floor their margin)."""
    name = type(processor).__name__
    if not getattr(processor, "do_resize", True):
        raise ModelLoadError(f"{name} does not resize: variable input sizes are not supported")
    if getattr(processor, "do_rescale", True) and abs(float(processor.rescale_factor) - 1 / 255) > 1e-12:
        raise ModelLoadError(f"{name} rescales by {processor.rescale_factor}, not 1/255: not supported")
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", Image.Resampling.BILINEAR)
    interpolation = _PIL_FILTERS.get(int(getattr(resample, "value", resample)))
    if interpolation is None:
        raise ModelLoadError(f"{name} resamples with {resample!r}, which has no Pillow filter here")
    size = _size(processor, "size")
    crop = _size(processor, "crop_size") if getattr(processor, "do_center_crop", False) else {}
    crop_pct = getattr(processor, "crop_pct", None)
    common: dict[str, Any] = {
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_rounding": "floor",
    }
    try:
        if size.get("shortest_edge") and crop_pct is not None and not crop:
            edge = int(size["shortest_edge"])
            if edge >= _CROP_PCT_WARP_FROM:
                return Preprocess(size=(edge, edge), resize="stretch", **common)
            resize = int(edge / float(crop_pct))
            return Preprocess(size=(edge, edge), resize="center-crop", resize_to=(resize, resize), **common)
        if size.get("shortest_edge") and crop:
            edge = int(size["shortest_edge"])
            target = (int(crop["height"]), int(crop["width"]))
            return Preprocess(size=target, resize="center-crop", resize_to=(edge, edge), **common)
        if size.get("height") and size.get("width"):
            fitted = (int(size["height"]), int(size["width"]))
            if crop:
                target = (int(crop["height"]), int(crop["width"]))
                return Preprocess(size=target, resize="stretch", resize_to=fitted, **common)
            return Preprocess(size=fitted, resize="stretch", **common)
    except (KeyError, TypeError, ValueError, PreprocessError) as error:
        raise ModelLoadError(f"{name} has an unusable size setting {dict(size)}: {error}") from error
    raise ModelLoadError(f"{name} resizes by {dict(size)}, which has no fixed input size: not supported")


def _return_logits(model: nn.Module) -> None:
    """Make ``model(pixels)`` return the logits tensor; module names stay Hugging Face's own."""
    cls = type(model)

    def forward(self: nn.Module, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("return_dict", True)
        return cls.forward(self, pixel_values, *args, **kwargs).logits

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _layer_and_reshape(
    model: nn.Module, config: Any
) -> tuple[str | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """Where CAMs are conventionally taken per family, and how its outputs become grids."""
    base = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, base, None)
    blocks = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "layernorm_before", None), nn.LayerNorm)
    ]
    if blocks and hasattr(config, "patch_size") and hasattr(config, "image_size"):
        # ViT-like: the last block's first norm, where patch tokens still reach the class token.
        image, patch = _pair(config.image_size), _pair(config.patch_size)
        grid = (image[0] // patch[0], image[1] // patch[1])
        return f"{blocks[-1]}.layernorm_before", _tokens_to_grid(grid)
    encoder = getattr(backbone, "encoder", None)
    stages = getattr(encoder, "stages", None)
    if isinstance(stages, nn.ModuleList) and len(stages):
        return f"{base}.encoder.stages.{len(stages) - 1}", None  # ConvNeXt, ResNet: conv feature maps
    if backbone is not None and isinstance(getattr(backbone, "layernorm", None), nn.LayerNorm):
        return f"{base}.layernorm", _tokens_to_grid(None)  # Swin-like: the final normed tokens
    return None, _tokens_to_grid(None)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, list | tuple) else (int(value), int(value))


def _tokens_to_grid(grid: tuple[int, int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """[B, prefix + h*w, C] tokens -> [B, C, h, w]; a 4-D conv output passes through."""

    def to_grid(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:
            return tensor
        if tensor.dim() != 3:
            raise ModelLoadError(f"expected tokens [B, tokens, C] or a grid, got shape {tuple(tensor.shape)}")
        batch, tokens, channels = tensor.shape
        if grid is not None and tokens >= grid[0] * grid[1]:
            height, width = grid
        else:
            side = next(
                (math.isqrt(tokens - p) for p in (0, 1, 2) if math.isqrt(tokens - p) ** 2 == tokens - p), 0
            )
            if not side:
                raise ModelLoadError(
                    f"{tokens} tokens do not form a square grid (with up to 2 prefix tokens)"
                )
            height = width = side
        prefix = tokens - height * width
        return tensor[:, prefix:, :].reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    return to_grid
