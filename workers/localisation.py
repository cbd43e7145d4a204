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

__all__ = ["BORDER_BAND", "border_mask", "box_bounds", "box_mask", "localisation_columns"]

BORDER_BAND = 0.1


def box_bounds(box: Sequence[float], transform: ImageTransform) -> tuple[int, int, int, int]:
    """Rows ``r0:r1`` and columns ``c0:c1`` of the input pixels whose centres, mapped back to the
    source, fall inside a source-pixel box (empty when ``r1 == r0`` or ``c1 == c0``).

    Centres grow along each axis, so those inside an interval are one run of them, and a box is
    one rectangle: sums over it are slices, not a mask per map.
    """
    cols, rows = transform.input
    x0, y0, x1, y1 = (float(v) for v in box)
    (width, height), (new_w, new_h), (ox, oy) = transform.source, transform.resized, transform.offset
    xs = (np.arange(cols) + 0.5 - ox) * (width / new_w)
    ys = (np.arange(rows) + 0.5 - oy) * (height / new_h)
    c0, r0 = int(np.searchsorted(xs, x0, "left")), int(np.searchsorted(ys, y0, "left"))
    c1, r1 = int(np.searchsorted(xs, x1, "right")), int(np.searchsorted(ys, y1, "right"))
    return r0, max(r0, r1), c0, max(c0, c1)


def box_mask(box: Sequence[float], transform: ImageTransform) -> np.ndarray:
    """Input pixels [H, W] whose centres, mapped back to the source, fall inside a source-pixel box."""
    cols, rows = transform.input
    r0, r1, c0, c1 = box_bounds(box, transform)
    mask = np.zeros((rows, cols), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


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
    """The four columns of every map ``n``: ``maps_u8`` [N, H, W], ``raw`` [N, h, w], ``boxes[n]`` or None.

    Sums of levels are integers: exact, as float64 sums were (far below 2**53), at a fraction of
    the cost. The band's sum is the whole less the inner rectangle, the box's a slice of the map,
    and the raw mass outside the box the sum of the four slices around it (no difference of large
    sums, so nothing cancels).
    """
    n, height, width = maps_u8.shape
    flat = maps_u8.reshape(n, -1)
    totals = flat.sum(axis=1, dtype=np.int64)
    dy, dx = _band_widths((height, width))
    border = totals - maps_u8[:, dy : height - dy, dx : width - dx].sum(axis=(1, 2), dtype=np.int64)
    peaks = flat.argmax(axis=1)  # the first maximum, in row-major order
    boxed = [i for i in range(n) if boxes[i] is not None]
    positive = np.zeros((0, height, width), dtype=np.float32)
    if boxed:
        tensor = torch.from_numpy(np.asarray(raw[boxed], dtype=np.float32))[:, None]
        up = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
        positive = up[:, 0].clamp_(min=0.0).numpy()
    columns: list[dict[str, Any]] = []
    row_of = {item: k for k, item in enumerate(boxed)}
    for i in range(n):
        total = int(totals[i])
        found: dict[str, Any] = {
            "box_energy": None,
            "box_hit": None,
            "outside_mass": None,
            "border_share": float(border[i]) / total if total > 0 else 0.0,
        }
        box = boxes[i]
        if box is not None:
            cols, rows = transforms[i].input
            if (rows, cols) != (height, width):
                raise ValueError(f"map {i} is {height}x{width}, its input {rows}x{cols}")
            r0, r1, c0, c1 = box_bounds(box, transforms[i])
            peak_row, peak_col = divmod(int(peaks[i]), width)
            inside = int(maps_u8[i, r0:r1, c0:c1].sum(dtype=np.int64))
            mass = positive[row_of[i]]
            outside = (
                mass[:r0].sum(dtype=np.float64)
                + mass[r1:].sum(dtype=np.float64)
                + mass[r0:r1, :c0].sum(dtype=np.float64)
                + mass[r0:r1, c1:].sum(dtype=np.float64)
            )
            found["box_energy"] = inside / total if total > 0 else 0.0
            found["box_hit"] = r0 <= peak_row < r1 and c0 <= peak_col < c1
            found["outside_mass"] = float(outside) / (height * width)
        columns.append(found)
    return columns
