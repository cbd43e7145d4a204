"""Turn a model reference into a ready-to-run model, failing before any work starts.

A run names its model with a short reference that the scheduler validates and stores, and
that every worker resolves again to the same weights:

* ``demo``: the CNN shipped in ``workers/assets/demo_cnn.pt`` (``checkpoint`` may name another
  checkpoint written by ``python -m workers.demo.train``).
* ``torchvision:NAME`` or bare ``NAME``: a torchvision classification architecture built with
  ``weights=None``; ``checkpoint`` is a state_dict file (or a dict holding it under
  ``state_dict`` or ``model``). ``num_classes`` defaults to the checkpoint's head size.
* ``torchscript:PATH`` (or ``torchscript`` with ``checkpoint=PATH``): a TorchScript archive.
* ``python:package.module:factory``: a callable returning an ``nn.Module``, with an optional
  state_dict checkpoint loaded into it.

Checkpoints are read with ``torch.load(weights_only=True)``, so a checkpoint can carry tensors
and plain metadata but never code. A dict checkpoint may carry ``class_names``, ``input_size``,
``mean`` and ``std`` next to its weights; they override the defaults.

Workers load a model once per process (:func:`load_model_cached`), keyed by the normalised
reference, the checkpoint's sha256 and the device, so a new checkpoint at the same path is
picked up while an unchanged one is never loaded twice.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from workers.demo.net import CAM_LAYER as DEMO_CAM_LAYER
from workers.demo.net import DemoNet
from workers.preprocess import RESIZE_MODES, Preprocess, PreprocessError

__all__ = ["RESIZE_MODES", "LoadedModel", "ModelLoadError", "Preprocess", "load_model", "resolve_layer"]

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo_cnn.pt"
DEMO_CHECKPOINT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (224, 224)
SCHEMES = ("demo", "torchvision", "timm", "hf", "torchscript", "python")
_TORCHVISION_DEFAULT_CLASSES = 1000
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # how many keys an error lists before summarising the rest


class ModelLoadError(ValueError):
    """A model reference, checkpoint or layer name that cannot work; the message says how to fix it."""


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on ``device``
    ref: str  # normalised reference, e.g. "demo", "torchvision:resnet18"
    checkpoint_sha256: str | None  # sha256 of the checkpoint file bytes (None if no file)
    preprocess: Preprocess
    class_names: list[str] | None
    default_layer: str | None  # None lets the CAM engine pick a layer
    num_classes: int | None
    # Where pretrained weights came from (zoo, weights name, file, sha256), recorded on the run.
    weights: dict[str, Any] | None = None
    # Turns a layer's output into [N, C, h, w] where the engine cannot tell (timm and HF transformers).
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class _Plan:
    """A parsed reference: what to build and which file holds its weights."""

    scheme: str
    target: str  # torchvision name, or "module:factory"; empty for demo and torchscript
    checkpoint: Path | None  # the weights file: given, or where a zoo keeps it
    ref: str  # normalised
    weights: Any = None  # a zoo's handle of the pretrained weights (torchvision enum member)


# --- public API -------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(
    ref: str,
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> LoadedModel:
    """Build the referenced model, load its weights, move it to ``device`` in eval mode."""
    plan = _plan(ref, checkpoint)
    target_device = _resolve_device(device)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelLoadError(f"num_classes must be a positive integer, got {num_classes!r}")
    if input_size is not None:
        input_size = _check_size(input_size, "input_size")
    sha = _cached_sha256(plan.checkpoint) if plan.checkpoint is not None else None
    loaded = _LOADERS[plan.scheme](plan, num_classes, input_size)
    loaded.checkpoint_sha256 = sha
    loaded.model = loaded.model.to(target_device).eval()
    if loaded.default_layer is not None:
        resolve_layer(loaded.model, loaded.default_layer)
    return loaded


def load_model_cached(
    ref: str,
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> LoadedModel:
    """:func:`load_model` once per process per (reference, checkpoint sha256, device, options).

    The returned model is shared: callers must not change its weights or mode.
    """
    plan = _plan(ref, checkpoint)
    sha = _cached_sha256(plan.checkpoint) if plan.checkpoint is not None else None
    size = tuple(input_size) if input_size is not None else None
    key = (plan.ref, sha, str(_resolve_device(device)), num_classes, size)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            cached = load_model(
                ref, checkpoint, device=device, num_classes=num_classes, input_size=input_size
            )
            _CACHE[key] = cached
        return cached


def clear_model_cache() -> None:
    """Forget cached models, e.g. to free accelerator memory between runs."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _SHA_MEMO.clear()


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module at a dotted path such as ``features`` or ``layer4.1.conv2``.

    Integer parts index Sequential/ModuleList children and may be negative (``layer4.-1``).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ModelLoadError(f"layer name must be a non-empty dotted module path, got {name!r}")
    module = model
    for part in name.split("."):
        children = dict(module.named_children())
        child = children.get(part)
        if child is None and _is_int(part) and children and all(_is_int(k) for k in children):
            keys = list(children)
            index = int(part)
            if -len(keys) <= index < len(keys):
                child = children[keys[index]]
        if child is None:
            raise ModelLoadError(_unknown_layer_message(model, name))
        module = child
    return module


# --- reference parsing ------------------------------------------------------------------------


def _plan(ref: str, checkpoint: str | Path | None) -> _Plan:
    if not isinstance(ref, str) or not ref.strip():
        raise ModelLoadError(f"model reference must be a non-empty string, got {ref!r}; {_REF_FORMS}")
    ref = ref.strip()
    scheme, sep, rest = ref.partition(":")
    if not sep:
        if ref == "demo":
            return _Plan("demo", "", _existing_file(checkpoint) if checkpoint else DEMO_CHECKPOINT, "demo")
        if ref == "torchscript":
            if checkpoint is None:
                raise ModelLoadError("reference 'torchscript' needs checkpoint=PATH of a TorchScript file")
            path = _existing_file(checkpoint, "TorchScript")
            return _Plan("torchscript", "", path, f"torchscript:{path}")
        scheme, rest = "torchvision", ref
    if scheme == "torchvision":
        arch, at, weights_name = rest.partition("@")
        name = _torchvision_name(arch)
        if at:
            return _torchvision_weights_plan(name, weights_name, checkpoint)
        path = _existing_file(checkpoint) if checkpoint is not None else None
        return _Plan("torchvision", name, path, f"torchvision:{name}")
    if scheme == "timm":
        return _timm_plan(rest, checkpoint)
    if scheme == "hf":
        return _hf_plan(rest, checkpoint)
    if scheme == "torchscript":
        if checkpoint is not None:
            raise ModelLoadError(
                f"reference {ref!r} already names the TorchScript file; pass either 'torchscript:PATH' "
                f"or 'torchscript' with checkpoint=PATH, not both"
            )
        path = _existing_file(rest, "TorchScript")
        return _Plan("torchscript", "", path, f"torchscript:{path}")
    if scheme == "python":
        module_name, colon, factory = rest.partition(":")
        if not colon or not module_name or not factory:
            raise ModelLoadError(f"python references look like 'python:package.module:factory', got {ref!r}")
        path = _existing_file(checkpoint) if checkpoint is not None else None
        return _Plan("python", rest, path, f"python:{rest}")
    if scheme == "demo":
        raise ModelLoadError(
            f"reference 'demo' takes no argument, got {ref!r}; pass other weights as checkpoint"
        )
    close = difflib.get_close_matches(scheme, SCHEMES, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelLoadError(f"unknown model reference scheme {scheme!r} in {ref!r}{hint}; {_REF_FORMS}")


_REF_FORMS = (
    "valid references: 'demo', 'torchvision:NAME' or 'NAME' (e.g. resnet18), "
    "'torchvision:NAME@WEIGHTS' (e.g. resnet50@IMAGENET1K_V2 or @DEFAULT), 'timm:NAME[.TAG]', "
    "'hf:PATH_OR_NAME', 'torchscript:PATH', 'python:package.module:factory'"
)


def _timm_plan(text: str, checkpoint: str | Path | None) -> _Plan:
    from workers.zoo import timm_models

    name = timm_models.resolve_name(text)
    if checkpoint is not None:
        return _Plan("timm", name, _existing_file(checkpoint), f"timm:{name}")
    return _Plan("timm", name, timm_models.cached_weights(name), f"timm:{name}", weights="cache")


def _hf_plan(text: str, checkpoint: str | Path | None) -> _Plan:
    from workers.zoo import hf_models

    if checkpoint is not None:
        raise ModelLoadError(
            f"hf:{text} loads the weights saved with the model (save_pretrained); pass no checkpoint"
        )
    folder = hf_models.resolve(text)
    # A folder is recorded by its absolute path, so every worker resolves the same one; a name stays a name.
    local = Path(os.path.expanduser(text.strip())).is_dir()
    ref = f"hf:{folder}" if local else f"hf:{text.strip()}"
    return _Plan("hf", str(folder), hf_models.weights_file(folder), ref)


def _torchvision_weights_plan(name: str, weights_name: str, checkpoint: str | Path | None) -> _Plan:
    from workers.zoo import tv_weights

    if checkpoint is not None:
        raise ModelLoadError(
            f"torchvision:{name}@{weights_name} loads torchvision's own weights from the torch hub cache; "
            f"pass either @WEIGHTS or a checkpoint file, not both"
        )
    if not weights_name.strip():
        raise ModelLoadError(f"'torchvision:{name}@' names no weights; e.g. torchvision:{name}@DEFAULT")
    weights = tv_weights.resolve(name, weights_name)
    path = tv_weights.require_file(name, weights)
    return _Plan("torchvision", name, path, f"torchvision:{name}@{weights.name}", weights=weights)


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_name(name: str) -> str:
    names = _torchvision_names()
    if name in names:
        return name
    if name.lower() in names:
        return name.lower()
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
    raise ModelLoadError(
        f"unknown torchvision classification model {name!r}; {hint}. "
        "Other references: 'demo', 'timm:NAME', 'hf:PATH', 'torchscript:PATH', "
        "'python:package.module:factory'"
    )


def _existing_file(path: str | Path, what: str = "checkpoint") -> Path:
    resolved = Path(os.path.expanduser(str(path))).resolve()
    if not resolved.exists():
        raise ModelLoadError(f"{what} file not found: {resolved} (given as {str(path)!r})")
    if not resolved.is_file():
        raise ModelLoadError(f"{what} path is not a file: {resolved}")
    return resolved


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available here; use 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ModelLoadError(
                f"device {device!r} does not exist: {count} CUDA device(s), cuda:0..{count - 1}"
            )
    return resolved


def _check_size(size: Any, what: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
        valid = (height, width) == tuple(size) and height > 0 and width > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ModelLoadError(f"{what} must be two positive integers (H, W), got {size!r}")
    return height, width


# --- checkpoints ------------------------------------------------------------------------------

_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_CACHE: dict[tuple[Any, ...], LoadedModel] = {}
_CACHE_LOCK = threading.RLock()


def _cached_sha256(path: Path) -> str:
    """Hash once per file version: a worker resolves the same checkpoint for every shard."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    sha = _SHA_MEMO.get(key)
    if sha is None:
        sha = _SHA_MEMO[key] = file_sha256(path)
    return sha


def _read_checkpoint(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True): {reason}. "
            f"Save weights with torch.save(model.state_dict(), path); a TorchScript file needs "
            f"the 'torchscript' reference"
        ) from error


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict with wrapper prefixes removed, metadata stored next to it)."""
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a state_dict "
            f"or a dict with a 'state_dict' or 'model' entry"
        )
    meta: dict[str, Any] = {}
    state: Any = obj
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            meta = {k: v for k, v in obj.items() if k != key}
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(state):
        others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise ModelLoadError(
            f"checkpoint {path} is not a state_dict: entries {others[:_SHOWN]} are not tensors; "
            f"expected parameter tensors, or a dict with a 'state_dict' or 'model' entry"
        )
    return _strip_prefixes(tensors), meta


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Strict load whose error names the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    # Old checkpoints lack BatchNorm counters; torch fills them in, so they are not an error.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_listing(mismatched)}")
    if problems:
        raise ModelLoadError(f"checkpoint {path} does not fit {what}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"[{shown}]{more}"


def _preprocess_from(
    meta: Mapping[str, Any], input_size: tuple[int, int] | None, path: Path | None
) -> Preprocess:
    """Defaults (ImageNet statistics, 224x224, stretch) overridden by checkpoint metadata, then by the caller.

    Metadata may name ``input_size``, ``mean``, ``std``, ``resize`` (stretch, center-crop,
    letterbox), ``crop_pct`` and ``interpolation``: how the checkpoint's model was trained.
    """
    try:
        size = input_size or _check_size(meta.get("input_size", DEFAULT_INPUT_SIZE), "input_size")
        mean = tuple(float(v) for v in meta.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in meta.get("std", IMAGENET_STD))
        preprocess = Preprocess(size=size, mean=mean, std=std)  # type: ignore[arg-type]
        if "interpolation" in meta:
            preprocess = replace(preprocess, interpolation=str(meta["interpolation"]))
        if "resize" in meta or "crop_pct" in meta:
            crop_pct = meta.get("crop_pct")
            preprocess = preprocess.with_overrides(
                resize=str(meta.get("resize", preprocess.resize)),
                crop_pct=None if crop_pct is None else float(crop_pct),
            )
        return preprocess
    except (TypeError, ValueError, PreprocessError) as error:
        raise ModelLoadError(f"checkpoint {path} has unusable preprocessing metadata: {error}") from error


def _class_names_from(
    meta: Mapping[str, Any], num_classes: int | None, path: Path | None
) -> list[str] | None:
    names = meta.get("class_names")
    if names is None:
        return None
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"checkpoint {path}: class_names must be a list of strings")
    if num_classes is not None and len(names) != num_classes:
        raise ModelLoadError(
            f"checkpoint {path} lists {len(names)} class_names but the model has {num_classes} classes"
        )
    return list(names)


# --- loaders ----------------------------------------------------------------------------------


def _load_demo(plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None) -> LoadedModel:
    path = plan.checkpoint
    assert path is not None
    if not path.exists():
        raise ModelLoadError(
            f"demo checkpoint not found at {path}; train it with "
            f"'python -m workers.demo.train --out {path} --seed 0'"
        )
    obj = _read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("arch") != "demo":
        arch = obj.get("arch") if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelLoadError(
            f"{path} is not a demo checkpoint (arch={arch!r}); write one with python -m workers.demo.train"
        )
    required = ("state_dict", "class_names", "input_size", "mean", "std", "version")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ModelLoadError(f"demo checkpoint {path} lacks {', '.join(missing)}")
    if obj["version"] > DEMO_CHECKPOINT_VERSION:
        raise ModelLoadError(
            f"demo checkpoint {path} has version {obj['version']}; this camaudit reads up to "
            f"{DEMO_CHECKPOINT_VERSION}, upgrade camaudit"
        )
    state, meta = _split_checkpoint(obj, path)
    names = _class_names_from(meta, None, path)
    assert names is not None
    if num_classes is not None and num_classes != len(names):
        raise ModelLoadError(
            f"demo checkpoint {path} has {len(names)} classes, not num_classes={num_classes}"
        )
    model = DemoNet(len(names))
    _load_state(model, state, path, "the demo CNN")
    return LoadedModel(
        model=model,
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=_preprocess_from(meta, input_size, path),
        class_names=names,
        default_layer=DEMO_CAM_LAYER,
        num_classes=len(names),
    )


def _load_torchvision(
    plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None
) -> LoadedModel:
    if plan.weights is not None:
        return _load_torchvision_weights(plan, num_classes, input_size)
    name, path = plan.target, plan.checkpoint
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if path is not None:
        state, meta = _split_checkpoint(_read_checkpoint(path), path)
        if num_classes is None:
            num_classes = _head_size(name, state)
    model = _build_torchvision(name, num_classes, init_weights=state is None)
    if state is not None and path is not None:
        _load_state(model, state, path, f"torchvision:{name} with {num_classes or 'default'} classes")
    classes = num_classes or _TORCHVISION_DEFAULT_CLASSES
    return LoadedModel(
        model=model,
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=_preprocess_from(meta, input_size, path),
        class_names=_class_names_from(meta, classes, path),
        default_layer=_torchvision_default_layer(name),
        num_classes=classes,
    )


def _load_torchvision_weights(
    plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None
) -> LoadedModel:
    """Pretrained torchvision weights: their own preprocessing, categories and file."""
    from workers.zoo import tv_weights

    weights, path = plan.weights, plan.checkpoint
    assert path is not None
    categories = list(weights.meta["categories"])
    if num_classes is not None and num_classes != len(categories):
        raise ModelLoadError(
            f"{plan.ref} classifies {len(categories)} categories, not num_classes={num_classes}"
        )
    preprocess = tv_weights.preprocess_of(weights)
    if input_size is not None:
        preprocess = preprocess.with_overrides(size=input_size)
    return LoadedModel(
        model=tv_weights.build(plan.target, weights),
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=preprocess,
        class_names=categories,
        default_layer=_torchvision_default_layer(plan.target),
        num_classes=len(categories),
        weights={
            "zoo": "torchvision",
            "weights": f"{type(weights).__name__}.{weights.name}",
            "file": str(path),
            "sha256": _cached_sha256(path),
            "url": weights.url,
        },
    )


def _build_torchvision(name: str, num_classes: int | None, *, init_weights: bool = True) -> nn.Module:
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3"):
        # Skips a slow random init when a checkpoint overwrites it, and silences the notice
        # about the default changing.
        kwargs["init_weights"] = init_weights
    try:
        return torchvision.models.get_model(name, **kwargs)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"cannot build torchvision:{name} with {kwargs}: {error}") from error


def _head_size(name: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count implied by the checkpoint: the leading size of tensors that are 1000 by default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                reference = _build_torchvision(name, None, init_weights=False)
        except Exception:  # some inits do not run on meta tensors; build for real instead
            reference = _build_torchvision(name, None, init_weights=False)
    sizes = set()
    for key, default in reference.state_dict().items():
        given = state.get(key)
        if (
            given is not None
            and given.dim() == default.dim()
            and default.dim() >= 1
            and default.shape[0] == _TORCHVISION_DEFAULT_CLASSES
            and given.shape[1:] == default.shape[1:]
        ):
            sizes.add(int(given.shape[0]))
    return sizes.pop() if len(sizes) == 1 else None


def _torchvision_default_layer(name: str) -> str | None:
    """The last spatial feature map of each family, where CAMs are conventionally taken."""
    families = (
        (("resnet", "resnext", "wide_resnet"), "layer4"),
        (("regnet",), "trunk_output"),
        (("densenet", "vgg", "alexnet", "squeezenet", "mobilenet", "efficientnet", "convnext"), "features"),
        (("mnasnet",), "layers"),
        (("shufflenet",), "conv5"),
        (("googlenet",), "inception5b"),
        (("inception",), "Mixed_7c"),
    )
    for prefixes, layer in families:
        if name.startswith(prefixes):
            return layer
    return None  # transformers (vit, swin, maxvit): token maps need the engine's own handling


def _load_timm(plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None) -> LoadedModel:
    """timm models with their pretrained_cfg preprocessing, from timm's cache or a checkpoint."""
    from workers.zoo import timm_models

    path = plan.checkpoint
    assert path is not None
    meta: dict[str, Any] = {}
    weights = None
    if plan.weights == "cache":
        model = timm_models.build(plan.target, weights_file=path, num_classes=num_classes)
        weights = {"zoo": "timm", "weights": plan.target, "file": str(path), "sha256": _cached_sha256(path)}
    else:
        state, meta = _split_checkpoint(_read_checkpoint(path), path)
        if num_classes is None:
            num_classes = timm_models.head_size(plan.target, state)
        model = timm_models.build(plan.target, weights_file=None, num_classes=num_classes)
        _load_state(model, state, path, plan.ref)
    classes = int(getattr(model, "num_classes", 0) or 0) or num_classes
    preprocess = timm_models.preprocess_of(timm_models.data_config(model))
    preprocess = _with_checkpoint_preprocess(preprocess, meta, input_size, path)
    names = _class_names_from(meta, classes, path)
    if names is None and classes:
        names = timm_models.class_names(model, classes)
    return LoadedModel(
        model=model,
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=preprocess,
        class_names=names,
        default_layer=timm_models.default_layer(model),
        num_classes=classes,
        weights=weights,
        reshape=timm_models.reshape_for(model),
    )


def _load_hf(plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None) -> LoadedModel:
    """Hugging Face image classifiers: the image processor's preprocessing, id2label as class names."""
    from workers.zoo import hf_models

    folder = Path(plan.target)
    loaded = hf_models.load(folder)
    if num_classes is not None and num_classes != loaded.num_classes:
        raise ModelLoadError(
            f"{plan.ref} classifies {loaded.num_classes} classes, not num_classes={num_classes}"
        )
    preprocess = loaded.preprocess
    if input_size is not None:
        preprocess = preprocess.with_overrides(size=input_size)
    path = plan.checkpoint
    assert path is not None
    return LoadedModel(
        model=loaded.model,
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=preprocess,
        class_names=loaded.class_names,
        default_layer=loaded.default_layer,
        num_classes=loaded.num_classes,
        weights={
            "zoo": "hf",
            "weights": plan.ref.removeprefix("hf:"),
            "folder": str(folder),
            "file": str(path),
            "sha256": _cached_sha256(path),
        },
        reshape=loaded.reshape,
    )


def _with_checkpoint_preprocess(
    preprocess: Preprocess, meta: Mapping[str, Any], input_size: tuple[int, int] | None, path: Path | None
) -> Preprocess:
    """A zoo's preprocessing with what a checkpoint says about its own (input size, mean, std)."""
    try:
        if "mean" in meta or "std" in meta:
            preprocess = replace(
                preprocess,
                mean=tuple(float(v) for v in meta.get("mean", preprocess.mean)),
                std=tuple(float(v) for v in meta.get("std", preprocess.std)),
            )
        size = input_size or (_check_size(meta["input_size"], "input_size") if "input_size" in meta else None)
        return preprocess.with_overrides(size=size) if size is not None else preprocess
    except (TypeError, ValueError, PreprocessError) as error:
        raise ModelLoadError(f"checkpoint {path} has unusable preprocessing metadata: {error}") from error


def _load_torchscript(
    plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None
) -> LoadedModel:
    path = plan.checkpoint
    assert path is not None
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but still the format users hand over.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError or ValueError depending on the damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"{path} is not a TorchScript archive ({reason}); write one with "
            f"torch.jit.save(torch.jit.script(model), path), or use 'torchvision:NAME' or 'python:...' "
            f"with this file as checkpoint if it holds a state_dict"
        ) from error
    return LoadedModel(
        model=model,
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=_preprocess_from({}, input_size, path),
        class_names=None,
        default_layer=None,
        num_classes=num_classes,
    )


def _load_python(plan: _Plan, num_classes: int | None, input_size: tuple[int, int] | None) -> LoadedModel:
    module_name, _, attr_path = plan.target.partition(":")
    factory = import_callable(module_name, attr_path)
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        model = factory(**kwargs)
    except TypeError as error:
        if kwargs:
            raise ModelLoadError(f"{plan.ref} does not accept num_classes: {error}") from error
        raise ModelLoadError(f"{plan.ref} could not be called without arguments: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{plan.ref} returned a {type(model).__name__}, expected a torch.nn.Module")
    meta: dict[str, Any] = {}
    if plan.checkpoint is not None:
        state, meta = _split_checkpoint(_read_checkpoint(plan.checkpoint), plan.checkpoint)
        _load_state(model, state, plan.checkpoint, plan.ref)
    return LoadedModel(
        model=model,
        ref=plan.ref,
        checkpoint_sha256=None,
        preprocess=_preprocess_from(meta, input_size, plan.checkpoint),
        class_names=_class_names_from(meta, num_classes, plan.checkpoint),
        default_layer=None,
        num_classes=num_classes if num_classes is not None else _maybe_len(meta.get("class_names")),
    )


def import_callable(module_name: str, attr_path: str) -> Any:
    """``module:attr.path`` imported; a wrong name fails with the closest ones that exist."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise ModelLoadError(
                f"cannot import module {module_name!r} (no module named {error.name!r}); "
                f"is its directory on PYTHONPATH?"
            ) from error
        raise ModelLoadError(f"importing {module_name!r} failed: {error}") from error
    except Exception as error:
        raise ModelLoadError(f"importing {module_name!r} failed: {type(error).__name__}: {error}") from error
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            options = [n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None))]
            close = difflib.get_close_matches(part, options, n=5)
            hint = f"closest: {', '.join(close)}" if close else f"callables there: {', '.join(options[:10])}"
            raise ModelLoadError(f"{module_name}:{attr_path}: no attribute {part!r}; {hint}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"{module_name}:{attr_path} is a {type(target).__name__}, not a callable")
    return target


def _maybe_len(names: Any) -> int | None:
    return len(names) if isinstance(names, list | tuple) else None


_LOADERS = {
    "demo": _load_demo,
    "torchvision": _load_torchvision,
    "timm": _load_timm,
    "hf": _load_hf,
    "torchscript": _load_torchscript,
    "python": _load_python,
}


# --- helpers ----------------------------------------------------------------------------------


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit() and text.count("-") <= 1


def _unknown_layer_message(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if close:
        hint = f"closest: {', '.join(close)}"
    else:
        top = [n for n, _ in model.named_children()]
        hint = f"top-level layers: {', '.join(top[:12]) or '(none)'}"
    return (
        f"model has no layer {name!r}; {hint}. Layers are dotted module names as in "
        f"model.named_modules(), e.g. 'layer4' or 'features.3'; integer parts may be negative"
    )
