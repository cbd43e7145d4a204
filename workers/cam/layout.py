"""How a layer's output becomes a channels-first feature grid ``[N, C, h, w]``.

Convolutional layers already are grids. Transformers are not: a ViT emits tokens
``[B, 1 + h*w, C]`` (class token first) and a Swin emits channels-last ``[B, h, w, C]``.
The layout is chosen per layer from the model's type, so the same engine call works for
CNNs, ``torchvision`` ViT/Swin, and anything else given a user ``reshape``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer

from workers.cam.errors import CamConfigError

Reshape = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Turns one layer's captured output (or its gradient) into ``[N, C, h, w]``.

    ``channel_axis`` is the axis of the *captured* tensor that becomes ``C``; Ablation-CAM
    needs it to switch a channel off in the layer's own format. None means "find out by probing
    ``to_grid``" (a user reshape).
    """

    to_grid: Reshape
    channel_axis: int | None


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _vit_tokens_to_grid(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + h*w, C]`` -> ``[B, C, h, w]``: drop the class token, lay patches out row-major."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() != 3:
        raise CamConfigError(f"expected ViT tokens [B, tokens, C], got shape {tuple(tensor.shape)}")
    batch, tokens, channels = tensor.shape
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise CamConfigError(
            f"ViT output has {tokens} tokens; expected 1 class token + a square grid of patches "
            "(pass reshape=... for other token layouts)"
        )
    return tensor[:, 1:, :].reshape(batch, side, side, channels).permute(0, 3, 1, 2)


def _channels_last_to_grid(tensor: torch.Tensor) -> torch.Tensor:
    """Swin's ``[B, h, w, C]`` -> ``[B, C, h, w]``."""
    if tensor.dim() != 4:
        raise CamConfigError(f"expected Swin features [B, h, w, C], got shape {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2)


def _enclosing(model: nn.Module, name: str, kind: type[nn.Module]) -> str | None:
    """Name (relative to ``model``) of the innermost ``kind`` module containing layer ``name``."""
    parts = name.split(".") if name else []
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if isinstance(model.get_submodule(prefix), kind):
            return prefix
    return None


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


def layout_for(model: nn.Module, name: str, reshape: Reshape | None) -> Layout:
    """Pick the layout for layer ``name``: the user's reshape, else one chosen by model type."""
    if reshape is not None:
        return Layout(reshape, None)
    vit = _enclosing(model, name, VisionTransformer)
    if vit is not None and _relative(name, vit).startswith("encoder"):
        return Layout(_vit_tokens_to_grid, -1)
    swin = _enclosing(model, name, SwinTransformer)
    if swin is not None:
        relative = _relative(name, swin)
        module = model.get_submodule(name)
        in_features = relative == "features" or relative.startswith("features.")
        if (in_features or relative == "norm") and not isinstance(module, nn.Conv2d):
            return Layout(_channels_last_to_grid, 3)
    return Layout(_identity, 1)


def vit_default_layer(model: nn.Module) -> str | None:
    """The usual ViT target: the last encoder block's first LayerNorm.

    A ViT head reads only the class token, so the patch tokens at the encoder output get zero
    gradient; the input of the last block's attention is the last place where patch tokens
    still reach the class token.
    """
    for prefix, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            last = list(module.encoder.layers.named_children())[-1][0]
            return ".".join(p for p in (prefix, "encoder.layers", last, "ln_1") if p)
    return None


def channel_axis(layout: Layout, sample: torch.Tensor) -> int:
    """The axis of ``sample`` that ``layout`` maps to channels (probed for user reshapes)."""
    if layout.channel_axis is not None:
        return layout.channel_axis % sample.dim()
    for axis in range(1, sample.dim()):
        size = sample.shape[axis]
        shape = [1] * sample.dim()
        shape[axis] = size
        probe = torch.arange(size, dtype=torch.float32, device=sample.device).reshape(shape)
        grid = layout.to_grid(probe.expand(sample.shape).contiguous())
        if grid.dim() == 4 and grid.shape[1] == size:
            expected = torch.arange(size, dtype=torch.float32, device=sample.device).view(1, -1, 1, 1)
            if torch.equal(grid, expected.expand_as(grid)):
                return axis
    raise CamConfigError(
        "could not tell which axis of the layer output the reshape turns into channels; "
        "ablationcam needs a reshape that only moves/reshapes axes (no mixing of channels)"
    )
