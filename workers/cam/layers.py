"""Finding target layers: by dotted name, or the model's last spatial feature map.

The default costs one probe forward of a single image, once per engine; it records which
modules produce a feature grid (after the layer's layout) and picks the last to finish, so a
container such as ``layer4`` wins over its last child and pooling layers (which resample,
not compute, features) are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import pooling

from workers.cam.errors import CamConfigError, unknown_name
from workers.cam.layout import Layout, vit_default_layer

_POOLING = tuple(
    cls
    for cls in vars(pooling).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == pooling.__name__
)


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``; unknown names list the closest valid ones."""
    if not isinstance(name, str) or not name:
        raise CamConfigError(f"layer names are dotted module names such as 'layer4', got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise unknown_name("layer", name, module_names(model)) from None


def _is_grid(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.shape[-1] * tensor.shape[-2] > 1


def default_layer(model: nn.Module, sample: torch.Tensor, layout_of: Callable[[str], Layout]) -> str:
    """Name of the last module whose output is a spatial feature grid, found by a probe forward."""
    vit = vit_default_layer(model)
    if vit is not None:
        return vit
    calls: dict[str, int] = {}
    finished: list[str] = []

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(module, _POOLING) or not isinstance(output, torch.Tensor):
                return
            try:
                grid = layout_of(name).to_grid(output)
            except Exception:  # a layout that does not fit this output: not a candidate
                return
            if _is_grid(grid):
                finished.append(name)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    for name in reversed(finished):
        if calls[name] == 1:
            return name
    raise CamConfigError(
        "no module of this model outputs a spatial feature map [B, C, h, w] with h*w > 1 for this "
        "input size; pass layers=[...] explicitly (and reshape=... for token outputs)"
    )
