"""timm models: ``timm:NAME`` and ``timm:NAME.TAG``, with their ``pretrained_cfg`` preprocessing."""

from __future__ import annotations

import difflib
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.models import ModelLoadError
from workers.preprocess import DEFAULT_CROP_PCT, Preprocess, crop_pct_size
from workers.zoo.safe_load import tensors_only_loads

# timm's crop modes and the camaudit modes that do the same thing.
CROP_MODES = {"center": "center-crop", "squash": "stretch", "border": "letterbox"}


def preprocess_of(config: Mapping[str, Any]) -> Preprocess:
    """The eval transform of a ``resolve_data_config`` dict, as ``timm.data.create_transform`` builds it."""
    size = tuple(int(v) for v in config["input_size"][-2:])
    crop_pct = float(config.get("crop_pct") or DEFAULT_CROP_PCT)
    crop_mode = str(config.get("crop_mode") or "center")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"timm crop mode {crop_mode!r} is not supported ({', '.join(CROP_MODES)} are)")
    mean = tuple(float(v) for v in config["mean"])
    interpolation = str(config.get("interpolation") or "bilinear")
    if interpolation == "random":  # a training choice; evaluation uses bilinear
        interpolation = "bilinear"
    fill = tuple(round(255 * v) for v in mean) if crop_mode == "border" else (0, 0, 0)
    return Preprocess(
        size=size,  # type: ignore[arg-type]
        mean=mean,  # type: ignore[arg-type]
        std=tuple(float(v) for v in config["std"]),  # type: ignore[arg-type]
        resize=CROP_MODES[crop_mode],
        interpolation=interpolation,
        resize_to=crop_pct_size(size, crop_pct),  # type: ignore[arg-type]
        fill=fill,  # type: ignore[arg-type]
    )


def _timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise ModelLoadError("timm:... references need timm: pip install 'camaudit[timm]'") from error
    return timm


def resolve_name(text: str) -> str:
    """``NAME`` or ``NAME.TAG`` checked against timm's registry; returns ``NAME.TAG`` when weights exist.

    A bare architecture is pinned to timm's default pretrained tag, so the run records which
    weights it means.
    """
    timm = _timm()
    text = text.strip()
    arch, dot, _ = text.partition(".")
    architectures = timm.list_models()
    if arch not in architectures:
        close = difflib.get_close_matches(arch, architectures, n=5, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "see timm.list_models()"
        raise ModelLoadError(f"unknown timm architecture {arch!r}; {hint}")
    tagged = timm.list_pretrained(f"{arch}.*")
    if dot:
        if text in tagged:
            return text
        close = difflib.get_close_matches(text, tagged, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else f"valid: {', '.join(tagged[:10]) or '(none)'}"
        raise ModelLoadError(f"timm has no pretrained weights {text!r}; {hint}")
    config = timm.models.get_pretrained_cfg(arch)
    if config is not None and config.tag:
        return f"{arch}.{config.tag}"
    return arch


def cached_weights(name: str) -> Path:
    """The file timm's loader would read for ``name`` from its caches (HF hub, then torch hub)."""
    timm = _timm()
    config = timm.models.get_pretrained_cfg(name)
    looked: list[str] = []
    if config is not None and config.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = config.hf_hub_id.partition("@")
        files = (
            [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        )
        for file_name in files:
            found = try_to_load_from_cache(repo, file_name, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        looked.append(f"{folder}/snapshots/<revision>/{{{', '.join(files)}}} (Hugging Face hub cache)")
    if config is not None and config.url:
        path = (
            Path(torch.hub.get_dir())
            / "checkpoints"
            / os.path.basename(urllib.parse.urlparse(config.url).path)
        )
        if path.is_file():
            return path
        looked.append(f"{path} (torch hub cache)")
    if not looked:
        raise ModelLoadError(f"timm:{name} has no pretrained weights; pass a checkpoint")
    raise ModelLoadError(
        f"weights of timm:{name} are not in timm's caches; looked at {'; '.join(looked)}. camaudit never "
        f"downloads: on a connected machine run `python -c \"import timm; timm.create_model('{name}', "
        f'pretrained=True)"` and copy the cache over (HF_HOME / TORCH_HOME), or pass a checkpoint'
    )


def build(name: str, *, weights_file: Path | None, num_classes: int | None) -> nn.Module:
    """The timm model, with timm's own pretrained loading from ``weights_file`` (tensors only)."""
    timm = _timm()
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if weights_file is None:
            return timm.create_model(name, pretrained=False, **kwargs)
        with tensors_only_loads():
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)}, **kwargs
            )
    except Exception as error:  # timm and torch raise many types for unusable files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f" from {weights_file}" if weights_file else ""
        raise ModelLoadError(f"cannot build timm:{name}{where}: {reason}") from error


def head_size(name: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """Classes of a checkpoint for ``name``: the leading size of its classifier's weight."""
    config = _timm().models.get_pretrained_cfg(name)
    classifier = getattr(config, "classifier", None) if config is not None else None
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for prefix in names:
        weight = state.get(f"{prefix}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_data_config

    return dict(resolve_data_config({}, model=model))


def class_names(model: nn.Module, num_classes: int) -> list[str] | None:
    """ImageNet label names for models trained on an ImageNet subset (first name of each synset)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    names = [description.split(",")[0].strip() for description in ImageNetInfo(subset).label_descriptions()]
    return names if len(names) == num_classes else None


def default_layer(model: nn.Module) -> str | None:
    """The last stage of a CNN (timm's feature_info), or the last block's first norm of a ViT."""
    if _is_vit(model):
        last = len(model.blocks) - 1  # type: ignore[arg-type]
        return f"blocks.{last}.norm1"
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], Mapping):
        module = info[-1].get("module")
        return str(module) if module else None
    return None


def reshape_for(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Token outputs of a timm ViT -> [B, C, h, w]; None for CNNs (outputs already are grids)."""
    if not _is_vit(model):
        return None
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(getattr(model.patch_embed, "grid_size", ()))  # type: ignore[union-attr]

    def to_grid(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:
            return tensor
        batch, tokens, channels = tensor.shape
        height, width = (
            grid if len(grid) == 2 and grid[0] * grid[1] == tokens - prefix else _square(tokens - prefix)
        )
        return tensor[:, prefix:, :].reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    return to_grid


def _square(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ModelLoadError(f"{tokens} patch tokens do not form a square grid; pass a reshape")
    return side, side


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
