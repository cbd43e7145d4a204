"""Where each map's mass lies relative to the item's labelled box and to the image border.

Measured once, when a shard commits, so "the worst maps of class X" is an index scan rather
than a re-read of every stored map. On the normalised map at model-input size (the PNG's
levels, as ``camaudit quality`` reads them) with the box mapped from source pixels to input
pixels by pixel centres (an input pixel is inside when its centre is):

* ``box_energy``: the fraction of the map's mass inside the box (NULL without a box);
* ``box_hit``: whether the map's first maximum lies inside the box (the pointing game);
* ``outside_mass``: the raw map's mass outside the box per input pixel, the patch scores'
  scale, so it ranks across the images of a run (a faint map has little to misplace);
* ``border_share``: the fraction of the map's mass in the outer band (10 % of each side),
  where watermarks, rulers and scanner marks sit; for every map, box or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.preprocess import ImageTransform

__all__ = ["BORDER_BAND", "border_mask", "box_mask", "localisation_columns"]

BORDER_BAND = 0.1


def box_mask(box: Sequence[float], transform: ImageTransform) -> np.ndarray:
    """Input pixels [H, W] whose centres, mapped back to the source, fall inside a source-pixel box."""
    cols, rows = transform.input
    x0, y0, x1, y1 = (float(v) for v in box)
    (width, height), (new_w, new_h), (ox, oy) = transform.source, transform.resized, transform.offset
    xs = (np.arange(cols) + 0.5 - ox) * (width / new_w)
    ys = (np.arange(rows) + 0.5 - oy) * (height / new_h)
    inside_x = (xs >= x0) & (xs <= x1)
    inside_y = (ys >= y0) & (ys <= y1)
    return inside_y[:, None] & inside_x[None, :]


def border_mask(input_size: tuple[int, int], band: float = BORDER_BAND) -> np.ndarray:
    """Pixels within ``band`` of the image's width or height from any edge (at least one pixel)."""
    rows, cols = input_size
    dy, dx = _band_widths(input_size, band)
    inner = np.zeros(input_size, dtype=bool)
    inner[dy : rows - dy, dx : cols - dx] = True
    return ~inner


def _band_widths(input_size: tuple[int, int], band: float = BORDER_BAND) -> tuple[int, int]:
    rows, cols = input_size
    return max(1, round(rows * band)), max(1, round(cols * band))


def localisation_columns(
    maps_u8: np.ndarray,
    raw: np.ndarray,
    boxes: Sequence[Sequence[float] | None],
    transforms: Sequence[ImageTransform],
) -> list[dict[str, Any]]:
    """The four columns of every map ``n``: ``maps_u8`` [N, H, W], ``raw`` [N, h, w], ``boxes[n]`` or None."""
    n, height, width = maps_u8.shape
    # Sums of levels in integers: exact, as the float64 sums were (far below 2**53), at a fraction
    # of the cost; the band's sum is the whole less the inner rectangle.
    totals = maps_u8.reshape(n, -1).sum(axis=1, dtype=np.int64)
    dy, dx = _band_widths((height, width))
    border = totals - maps_u8[:, dy : height - dy, dx : width - dx].sum(axis=(1, 2), dtype=np.int64)
    boxed = [i for i in range(n) if boxes[i] is not None]
    raw_up = np.zeros((0, height, width))
    if boxed:
        tensor = torch.from_numpy(np.asarray(raw[boxed], dtype=np.float32))[:, None]
        raw_up = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[
            :, 0
        ].numpy()
    columns: list[dict[str, Any]] = []
    row_of = {item: k for k, item in enumerate(boxed)}
    for i in range(n):
        total = float(totals[i])
        found: dict[str, Any] = {
            "box_energy": None,
            "box_hit": None,
            "outside_mass": None,
            "border_share": float(border[i]) / total if total > 0 else 0.0,
        }
        box = boxes[i]
        if box is not None:
            inside = box_mask(box, transforms[i])
            if inside.shape != (height, width):
                raise ValueError(
                    f"map {i} is {height}x{width}, its input {inside.shape[0]}x{inside.shape[1]}"
                )
            peak = np.unravel_index(int(np.argmax(maps_u8[i])), (height, width))
            positive = np.maximum(raw_up[row_of[i]], 0.0)
            found["box_energy"] = float(maps_u8[i][inside].sum(dtype=np.int64)) / total if total > 0 else 0.0
            found["box_hit"] = bool(inside[peak])
            found["outside_mass"] = float(positive[~inside].sum(dtype=np.float64)) / (height * width)
        columns.append(found)
    return columns
