"""From raw low-resolution maps to normalised input-size maps, on the device.

Reproduces the reference's order of operations exactly (it runs them in numpy/cv2 per image):
per layer ``ReLU -> min-max -> bilinear resize`` (``cv2.INTER_LINEAR`` equals torch bilinear
with ``align_corners=False`` when upsampling), then the mean over layers and one more min-max.
Min-max is ``(x - min) / (max' + 1e-7)`` with ``max'`` taken after subtracting the minimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Normalise each map of ``[..., h, w]`` to [0, 1] as the reference does."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + 1e-7)


def upsample(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[..., h, w]`` raw maps -> ReLU, min-max, bilinear resize to ``size``: ``[..., H, W]``.

    The result is not normalised again: the reference averages layers at this stage.
    """
    lead = raw.shape[:-2]
    scaled = min_max(raw.clamp_min(0)).reshape(-1, 1, *raw.shape[-2:])
    if tuple(scaled.shape[-2:]) != tuple(size):
        scaled = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)
    return scaled.reshape(*lead, *size)


def fuse(upsampled: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers, normalised again; a single layer is just normalised."""
    if len(upsampled) == 1:
        return min_max(upsampled[0])
    return min_max(torch.stack(upsampled).mean(dim=0))
