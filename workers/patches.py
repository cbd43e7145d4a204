"""Patch scores: which M x M regions of a map carry its mass, on a scale that compares across images.

Min-max normalised maps all peak at 1.0, so they cannot rank regions across a dataset. Patch
scores come from the raw map instead: the raw low-resolution map is bilinearly upsampled to
the model input and each patch's score is its sum divided by the number of input pixels,
i.e. the patch's share of the map's spatial mean. For ``cam`` the scores of all patches add
up to the class logit without bias (where the map is non-negative), so a score means the
same thing in every image of a run.

Boxes are cut on the input and mapped back through the run's exact transform (stretch, centre
crop or letterbox), so a box names the source pixels the model saw there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.preprocess import ImageTransform


@dataclass(frozen=True)
class PatchTop:
    scores: torch.Tensor  # float32 [N, L], descending
    rows: torch.Tensor  # int64 [N, L]
    cols: torch.Tensor  # int64 [N, L]
    total: torch.Tensor  # float32 [N]: sum over all patches (= spatial mean of the upsampled raw map)
    grid: tuple[int, int]  # patches per column and per row


def patch_grid(raw: torch.Tensor, input_size: tuple[int, int], patch: int) -> torch.Tensor:
    """[N, h, w] raw maps -> [N, rows, cols] patch scores; edge patches are partial, not dropped."""
    height, width = input_size
    up = F.interpolate(raw.float().unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
    pad_h = (-height) % patch
    pad_w = (-width) % patch
    if pad_h or pad_w:
        up = F.pad(up, (0, pad_w, 0, pad_h))
    sums = F.avg_pool2d(up, kernel_size=patch, stride=patch) * float(patch * patch)
    return sums.squeeze(1) / float(height * width)


def top_patches(raw: torch.Tensor, input_size: tuple[int, int], patch: int, top: int) -> PatchTop:
    grid = patch_grid(raw, input_size, patch)
    n, rows, cols = grid.shape
    flat = grid.reshape(n, rows * cols)
    k = min(top, rows * cols)
    scores, index = torch.topk(flat, k, dim=1, largest=True, sorted=True)
    return PatchTop(
        scores=scores,
        rows=torch.div(index, cols, rounding_mode="floor"),
        cols=index % cols,
        total=flat.sum(dim=1),
        grid=(rows, cols),
    )


def patch_boxes(
    rows: np.ndarray,
    cols: np.ndarray,
    patch: int,
    input_size: tuple[int, int],
    transforms: Sequence[ImageTransform],
) -> np.ndarray:
    """Patches' boxes at model input size, mapped back to source pixels through each image's transform.

    rows/cols [N, L] index the patch grid of map n, whose source went into the input through
    ``transforms[n]``. Returns int64 [N, L, 4] as (x0, y0, x1, y1), x1/y1 exclusive, rounded half
    to even. Edge patches are clipped to the input, boxes to the source (a patch over letterbox
    padding keeps the source pixels next to it), and every box is at least one source pixel wide.
    When the source has fewer pixels than the grid has patches (a 1 x 1 source, or a 100,000 x 1
    strip), several patches share one box (see :func:`distinct_ranks`).
    """
    height, width = input_size
    n = len(transforms)
    source = np.array([t.source for t in transforms], dtype=np.float64).reshape(n, 2)
    resized = np.array([t.resized for t in transforms], dtype=np.float64).reshape(n, 2)
    offset = np.array([t.offset for t in transforms], dtype=np.float64).reshape(n, 2)
    # Source pixels per input pixel, as a ratio of the sizes (for a stretch: w / W exactly).
    inv_x, inv_y = (source[:, 0] / resized[:, 0])[:, None], (source[:, 1] / resized[:, 1])[:, None]
    ox, oy = offset[:, 0:1], offset[:, 1:2]
    src_w, src_h = source[:, 0:1], source[:, 1:2]
    x0 = np.asarray(cols, dtype=np.int64) * patch
    y0 = np.asarray(rows, dtype=np.int64) * patch
    x1 = np.minimum(x0 + patch, width)
    y1 = np.minimum(y0 + patch, height)
    left = np.clip(np.round((x0 - ox) * inv_x), 0, src_w - 1)
    top = np.clip(np.round((y0 - oy) * inv_y), 0, src_h - 1)
    right = np.maximum(np.minimum(np.round((x1 - ox) * inv_x), src_w), left + 1)
    bottom = np.maximum(np.minimum(np.round((y1 - oy) * inv_y), src_h), top + 1)
    return np.stack([left, top, right, bottom], axis=-1).astype(np.int64)


def distinct_ranks(boxes: np.ndarray) -> list[list[int]]:
    """Per map, the ranks whose source box no better rank already has.

    Patches of a grid finer than the source map onto the same source pixels; storing each of
    them would list one region several times, so only its best-scoring patch is kept.
    """
    kept: list[list[int]] = []
    for per_map in np.asarray(boxes).tolist():
        seen: set[tuple[int, ...]] = set()
        ranks = []
        for rank, box in enumerate(per_map):
            key = tuple(box)
            if key not in seen:
                seen.add(key)
                ranks.append(rank)
        kept.append(ranks)
    return kept
