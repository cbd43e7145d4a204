"""Pillow's resize, bit for bit, on 8-bit image tensors on any device.

Images decoded on the GPU must reach the model as the CPU path's images do: resized by Pillow
(workers/preprocess.py). Pillow resizes in two separable passes, horizontal then vertical, with
filter weights rounded to 22-bit fixed point and every pass rounded and clipped to 8 bits
(libImaging/Resample.c). Here each pass is one product with a weight matrix built the same way,
in float64, where every partial sum of 8-bit levels and 22-bit weights is an exact integer: the
result equals Pillow's for every filter it offers (nearest is Pillow's affine pixel pick).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Resample.c


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


_F32_054, _F32_046 = float(np.float32(0.54)), float(np.float32(0.46))


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))  # float literals in C


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# name -> (filter, support), as workers.preprocess.INTERPOLATIONS names Pillow's filters
FILTERS: dict[str, tuple[Callable[[float], float], float]] = {
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
    "box": (_box, 0.5),
    "hamming": (_hamming, 1.0),
    "lanczos": (_lanczos, 3.0),
}
INTERPOLATIONS = ("nearest", *FILTERS)
RESAMPLE = {name: getattr(Image.Resampling, name.upper()) for name in INTERPOLATIONS}


@functools.lru_cache(maxsize=256)
def weights(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """float64 [out, in]: one pass of Pillow's fixed-point filter weights, as integers (x 2**22)."""
    filter_, base_support = FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ss = 1.0 / filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = [filter_((x + xmin - center + 0.5) * ss) for x in range(xmax - xmin)]
        total = sum(k)
        for x, w in enumerate(k):
            if total != 0.0:
                w /= total
            # normalize_coeffs_8bpc: C's (int) truncates toward zero
            fixed = w * (1 << PRECISION_BITS)
            matrix[xx, xmin + x] = float(int(fixed - 0.5) if w < 0 else int(fixed + 0.5))
    return matrix


def _nearest(in_size: int, out_size: int) -> torch.Tensor:
    """ImagingScaleAffine's source index per output pixel: a position stepped on in float64."""
    step = in_size / out_size
    position = step * 0.5
    picks = []
    for _ in range(out_size):
        picks.append(min(in_size - 1, int(position)))
        position += step
    return torch.tensor(picks, dtype=torch.int64)


@functools.lru_cache(maxsize=256)
def _on_device(in_size: int, out_size: int, interpolation: str, device: torch.device) -> torch.Tensor:
    """:func:`weights` copied to the device once, not once per image."""
    return torch.from_numpy(weights(in_size, out_size, interpolation)).to(device)


def _pass(x: torch.Tensor, matrix: np.ndarray | torch.Tensor, dim: int) -> torch.Tensor:
    """One pass along ``dim`` of float64 integer levels: weights, Pillow's rounding, clip to 8 bits."""
    w = matrix if isinstance(matrix, torch.Tensor) else torch.from_numpy(matrix).to(x.device)
    moved = x.movedim(dim, -1)
    acc = moved @ w.T + float(1 << (PRECISION_BITS - 1))
    out = torch.floor(acc / float(1 << PRECISION_BITS)).clamp_(0.0, 255.0)
    return out.movedim(-1, dim)


_PROBE_ROWS = 8


@functools.lru_cache(maxsize=4096)
def pillow_order(source: tuple[int, int], size: tuple[int, int], interpolation: str) -> str | None:
    """Which pass this Pillow runs first for this resize: "horizontal", "vertical", or None.

    Pillow's C code has run the horizontal pass first for years, but newer builds choose the
    order by size, and the order changes rounding (every pass rounds to 8 bits). So the order is
    asked of the installed Pillow itself, once per geometry: a noise image of the source's size
    is resized by Pillow and its first rows compared with both orders computed here. None: neither
    matches (a Pillow that resizes another way); the caller then leaves the image to Pillow.
    """
    (in_w, in_h), (out_w, out_h) = source, size
    noise = np.random.default_rng(in_w * 65_537 + in_h).integers(0, 256, (in_h, in_w), dtype=np.uint8)
    want = np.asarray(Image.fromarray(noise, mode="L").resize(size, RESAMPLE[interpolation]))[:_PROBE_ROWS]
    if interpolation == "nearest" or in_w == out_w or in_h == out_h:
        candidates = ["horizontal"]  # one pass, or a pick of pixels: the order cannot matter
    else:
        candidates = ["horizontal", "vertical"]
    for candidate in candidates:
        if interpolation == "nearest":
            got = resize(torch.from_numpy(noise)[None], size, interpolation, rows=_PROBE_ROWS)[0].numpy()
        else:
            got = _first_rows(noise, size, interpolation, candidate)
        if np.array_equal(got, want):
            return candidate
    return None


def _first_rows(image: np.ndarray, size: tuple[int, int], interpolation: str, order: str) -> np.ndarray:
    """The probe's first output rows of a grey image in numpy (no torch threads on a decode thread)."""
    (out_w, out_h), (in_h, in_w) = size, image.shape
    half, one = float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)

    def rounded(acc: np.ndarray) -> np.ndarray:
        return np.clip(np.floor((acc + half) / one), 0.0, 255.0)

    x = image.astype(np.float64)
    horizontal = weights(in_w, out_w, interpolation) if out_w != in_w else None
    vertical = weights(in_h, out_h, interpolation)[:_PROBE_ROWS] if out_h != in_h else None
    if vertical is None:
        x = x[:_PROBE_ROWS]
    elif order == "horizontal":
        used = np.flatnonzero(vertical.any(axis=0))
        x, vertical = x[used[0] : used[-1] + 1], vertical[:, used[0] : used[-1] + 1]
    if order == "vertical" and vertical is not None:
        x = rounded(vertical @ x)
    if horizontal is not None:
        x = rounded(x @ horizontal.T)
    if order == "horizontal" and vertical is not None:
        x = rounded(vertical @ x)
    return x.astype(np.uint8)


def resize(
    chw: torch.Tensor,
    size: tuple[int, int],
    interpolation: str,
    *,
    order: str = "horizontal",
    rows: int | None = None,
) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, h, w] with ``size`` = (w, h), as ``Image.resize(size, filter)``.

    A side that keeps its length is not filtered (Pillow skips that pass too). ``order``: the
    pass that runs first (:func:`pillow_order`); ``rows``: only the first output rows (a probe).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    out_w, out_h = size
    _, in_h, in_w = chw.shape
    keep = slice(0, rows)
    if (out_w, out_h) == (in_w, in_h):
        return chw[:, keep].clone()
    if interpolation == "nearest":
        picks, cols = _nearest(in_h, out_h)[keep], _nearest(in_w, out_w)
        return chw[:, picks.to(chw.device)][:, :, cols.to(chw.device)]
    vertical = weights(in_h, out_h, interpolation)[keep] if out_h != in_h else None
    x = chw.to(torch.float64)
    if vertical is None:
        x = x[:, keep]
    elif order == "horizontal":
        used = np.flatnonzero(vertical.any(axis=0))  # the source rows the kept output rows read
        first, last = int(used[0]), int(used[-1]) + 1
        x, vertical = x[:, first:last], vertical[:, first:last]
    if order == "vertical" and vertical is not None:
        x = _pass(x, vertical, dim=1)
    if out_w != in_w:
        x = _pass(x, _on_device(in_w, out_w, interpolation, x.device), dim=2)
    if order == "horizontal" and vertical is not None:
        x = _pass(x, vertical, dim=1)
    return x.to(torch.uint8)
