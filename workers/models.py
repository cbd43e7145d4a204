"""Model loading: every way a user names a model ends as a ``LoadedModel`` in eval mode.

Everything that can be wrong with a reference (unknown name, missing file, weights that do
not fit) raises ``ModelLoadError`` here, before any shard is planned.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

ASSETS = Path(__file__).with_name("assets")
DEMO_CHECKPOINT = ASSETS / "demo_cnn.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(ValueError):
    """The model reference, its checkpoint or a layer name cannot work."""


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "stretch"

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LoadedModel:
    model: nn.Module
    ref: str
    checkpoint_sha256: str | None
    preprocess: Preprocess
    class_names: list[str] | None
    default_layer: str | None
    num_classes: int | None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"{what} {p} does not exist (or is not a file)")
    return p


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from exc


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path} holds no state_dict (expected a dict of tensors, or one under 'state_dict')"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:3]}")
        raise ModelLoadError(f"checkpoint {path} does not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _head_classes(state: dict[str, torch.Tensor]) -> int | None:
    for key in (
        "fc.weight",
        "classifier.weight",
        "head.weight",
        "heads.head.weight",
        "classifier.6.weight",
        "classifier.3.weight",
        "classifier.1.weight",
        "classifier.2.weight",
        "classifier.0.weight",
    ):
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def _default_layer(model: nn.Module) -> str | None:
    names = dict(model.named_modules())
    for candidate in ("layer4", "features", "trunk"):
        if candidate in names:
            return candidate
    return None


def _load_demo(checkpoint: str | Path | None) -> tuple[nn.Module, dict[str, Any], Path]:
    from workers.demo.net import DemoNet

    path = _existing(checkpoint or DEMO_CHECKPOINT, "demo checkpoint")
    data = _torch_load(path)
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ModelLoadError(f"{path} is not a demo checkpoint (no 'state_dict')")
    names = list(data.get("class_names") or [])
    model = DemoNet(len(names) or _head_classes(data["state_dict"]) or 1)
    _load_weights(model, _state_dict(data, path), path)
    return model, data, path


def load_model(
    ref: str,
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> LoadedModel:
    ref = ref.strip()
    sha: str | None = None
    class_names: list[str] | None = None
    if ref == "demo":
        model, meta, path = _load_demo(checkpoint)
        sha = file_sha256(path)
        class_names = list(meta.get("class_names") or []) or None
        pre = Preprocess(
            size=tuple(input_size or meta.get("input_size", (128, 128))),  # type: ignore[arg-type]
            mean=tuple(meta.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(meta.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        )
        norm_ref = "demo"
    elif ref.startswith("torchscript"):
        target = ref.split(":", 1)[1] if ":" in ref else checkpoint
        if not target:
            raise ModelLoadError("torchscript needs a file: torchscript:PATH or --checkpoint PATH")
        path = _existing(target, "TorchScript file")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a TorchScript file: {exc}") from exc
        sha = file_sha256(path)
        pre = Preprocess(tuple(input_size or (224, 224)), IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]
        norm_ref = f"torchscript:{path}"
    elif ref.startswith("python:"):
        spec = ref.split(":", 1)[1]
        if ":" not in spec:
            raise ModelLoadError(f"python model reference {ref!r} must be python:package.module:factory")
        module_name, func_name = spec.rsplit(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelLoadError(f"cannot import {module_name!r} for {ref}: {exc}") from exc
        factory = getattr(module, func_name, None)
        if not callable(factory):
            options = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
            close = difflib.get_close_matches(func_name, options, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(f"{module_name} has no callable {func_name!r}{hint}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
        if checkpoint:
            path = _existing(checkpoint, "checkpoint")
            _load_weights(model, _state_dict(_torch_load(path), path), path)
            sha = file_sha256(path)
        pre = Preprocess(tuple(input_size or (224, 224)), IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]
        norm_ref = ref
    else:
        name = ref.split(":", 1)[1] if ref.startswith("torchvision:") else ref
        valid = torchvision_names()
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelLoadError(
                f"unknown model {ref!r}{hint} (use demo, torchvision:NAME, torchscript:PATH or python:mod:fn)"
            )
        state = None
        if checkpoint:
            path = _existing(checkpoint, "checkpoint")
            state = _state_dict(_torch_load(path), path)
            sha = file_sha256(path)
            num_classes = num_classes or _head_classes(state)
        kwargs: dict[str, Any] = {"weights": None}
        if num_classes:
            kwargs["num_classes"] = num_classes
        if name.startswith("inception") or name.startswith("googlenet"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = False
        model = torchvision.models.get_model(name, **kwargs)
        if state is not None:
            _load_weights(model, state, path)
        pre = Preprocess(tuple(input_size or (224, 224)), IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]
        norm_ref = f"torchvision:{name}"
    model.eval().to(device)
    head = getattr(model, "fc", None)
    n_classes = (
        head.out_features if isinstance(head, nn.Linear) else (len(class_names) if class_names else None)
    )
    return LoadedModel(
        model=model,
        ref=norm_ref,
        checkpoint_sha256=sha,
        preprocess=pre,
        class_names=class_names,
        default_layer=_default_layer(model) if not isinstance(model, torch.jit.ScriptModule) else None,
        num_classes=n_classes,
    )


_cache: dict[tuple[str, str | None, str], LoadedModel] = {}
_cache_lock = threading.Lock()


def load_model_cached(
    ref: str, checkpoint: str | Path | None = None, *, device: str | torch.device = "cpu", **kwargs: Any
) -> LoadedModel:
    """Once per process per (reference, checkpoint content, device)."""
    path = checkpoint or (DEMO_CHECKPOINT if ref.strip() == "demo" else None)
    sha = file_sha256(path) if path and Path(path).is_file() else None
    key = (ref.strip(), sha, str(torch.device(device)))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_model(ref, checkpoint, device=device, **kwargs)
        return _cache[key]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelLoadError(f"the model has no layer {name!r}{hint}")
