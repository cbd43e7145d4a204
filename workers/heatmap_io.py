"""Heatmap encodings written to storage: 8-bit PNG, raw float16 ``.npy`` and a JPEG overlay.

Three artefacts serve three readers. The grayscale PNG is the compact, lossless picture of the
normalised map at input resolution; the float16 array keeps the raw low-resolution map so
magnitudes stay comparable across images (min-max normalisation throws that away); the JPEG
overlay is what a person looks at in the gallery. Quantisation to uint8 happens on the
device so only one byte per pixel crosses to the host.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from isal import isal_zlib
from PIL import Image

from workers.preprocess import ImageTransform

__all__ = [
    "JET_LUT",
    "decode_npy",
    "decode_png_gray",
    "encode_npy",
    "encode_png_gray",
    "jet_colormap",
    "map_to_source",
    "overlay_jpeg",
    "overlay_rgb",
    "to_uint8",
]

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _jet_lut() -> np.ndarray:
    """The JET colormap as a 256 x 3 RGB table, computed exactly in half-units.

    Each channel is the piecewise-linear ramp ``1.5 - |4x - c|`` clipped to [0, 1] with
    ``x = i / 255``. Scaled by 510 it is an integer, so rounding the half-units with
    round-half-to-even reproduces OpenCV's ``COLORMAP_JET`` table (one entry of 768 differs
    by one level, where OpenCV's own float table lands just below a tie).
    """
    i = np.arange(256, dtype=np.int64)
    centres = (765, 510, 255)  # red, green, blue ramps peak at x = 3/4, 1/2, 1/4
    twice = np.stack([765 - 2 * np.abs(4 * i - c) for c in centres], axis=-1).clip(0, 510)
    return np.round(twice / 2).astype(np.uint8)


JET_LUT: np.ndarray = _jet_lut()
JET_LUT.setflags(write=False)


def to_uint8(map01: torch.Tensor) -> torch.Tensor:
    """Quantise maps in [0, 1] to uint8 as ``round(x * 255)``, on the tensor's own device.

    The arithmetic runs in float32 even for half-precision maps: 255 * x in float16 has a
    step of 0.125 near the top, which is enough to push ties to the wrong level. Values
    outside [0, 1] are clipped and NaN becomes 0, so a degenerate map still encodes.
    """
    if not map01.is_floating_point():
        raise TypeError(f"to_uint8 expects a floating-point map in [0, 1], got dtype {map01.dtype}")
    if map01.dim() < 2:
        raise ValueError(f"to_uint8 expects a map shaped [..., H, W], got shape {tuple(map01.shape)}")
    x = torch.nan_to_num(map01.float(), nan=0.0).clamp_(0.0, 1.0)
    return x.mul_(255.0).round_().to(torch.uint8)


def _check_gray_u8(u8: np.ndarray) -> np.ndarray:
    if not isinstance(u8, np.ndarray) or u8.dtype != np.uint8 or u8.ndim != 2:
        shape = getattr(u8, "shape", None)
        dtype = getattr(u8, "dtype", type(u8).__name__)
        raise ValueError(
            f"expected a 2-D uint8 array [H, W], got dtype {dtype} and shape {shape}; "
            "quantise with to_uint8() and move one map to the CPU first"
        )
    return np.ascontiguousarray(u8)


def encode_png_gray(u8: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode one [H, W] uint8 map as an 8-bit grayscale PNG.

    Every row uses PNG's "Sub" filter (difference to the left neighbour), which suits smooth
    maps; encoders that try all five filters per row (Pillow, libpng) spend most of their
    time choosing. The deflate stream comes from ISA-L (``isal``, levels 0-3), which on a
    smooth 224 x 224 map is 4x faster than zlib at level 1 and 10 % smaller (0.08 vs 0.33 ms,
    8.2 vs 9.1 KB, ``bench/host_steps.py``); it sits in the upload path of every heatmap. The
    stream is standard zlib, so any PNG reader decodes it.
    """
    if compress_level not in ISAL_LEVELS:
        raise ValueError(f"compress_level is one of ISA-L's levels {ISAL_LEVELS}, not {compress_level!r}")
    levels = _check_gray_u8(u8)
    height, width = levels.shape
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty map of shape {levels.shape}")
    filtered = np.empty((height, width + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type Sub
    filtered[:, 1] = levels[:, 0]
    np.subtract(levels[:, 1:], levels[:, :-1], out=filtered[:, 2:])  # wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", isal_zlib.compress(filtered, compress_level)),
            _png_chunk(b"IEND", b""),
        )
    )


ISAL_LEVELS = (0, 1, 2, 3)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_MAX_SIDE = 65_500  # the largest width or height libjpeg (and so Pillow) writes


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def decode_png_gray(data: bytes) -> np.ndarray:
    """Decode a PNG written by :func:`encode_png_gray` back to an [H, W] uint8 array."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.mode != "L":
            raise ValueError(f"expected an 8-bit grayscale PNG (mode 'L'), got mode {image.mode!r}")
        return np.array(image, dtype=np.uint8)


def encode_npy(arr: np.ndarray) -> bytes:
    """Serialise a raw map as float16 ``.npy`` bytes (no pickle, shape and dtype in the header).

    Raw maps are un-normalised, so their magnitude matters; a finite value beyond float16's
    range would silently become infinity, which is refused instead.
    """
    source = np.asarray(arr)
    if not (np.issubdtype(source.dtype, np.floating) or np.issubdtype(source.dtype, np.integer)):
        raise ValueError(f"encode_npy expects a numeric array, got dtype {source.dtype}")
    finite = source[np.isfinite(source)] if np.issubdtype(source.dtype, np.floating) else source
    if finite.size and float(np.abs(finite).max()) > _FLOAT16_MAX:
        raise ValueError(
            f"map values up to {float(np.abs(finite).max()):.6g} exceed float16's range "
            f"(±{_FLOAT16_MAX:g}); divide by a scale factor and store the scale alongside"
        )
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(source, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Load ``.npy`` bytes; pickled object arrays are refused so stored bytes cannot run code."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def jet_colormap(u8: np.ndarray) -> np.ndarray:
    """Map uint8 levels to JET colours, returning RGB uint8 with a trailing channel axis."""
    if u8.dtype != np.uint8:
        raise ValueError(f"jet_colormap expects uint8 levels, got dtype {u8.dtype}")
    return JET_LUT[u8]


def _resize_bilinear(map01: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), as the CAM maps use."""
    tensor = torch.from_numpy(np.ascontiguousarray(map01, dtype=np.float32))[None, None]
    if tensor.shape[-2:] == (height, width):
        return tensor[0, 0].numpy()
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


# Brightness of source pixels the model never saw (outside a centre crop): no attention there.
OUTSIDE_DIM = 0.35


def map_to_source(
    map01: np.ndarray,
    transform: ImageTransform,
    region: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """An input-size map resampled onto source pixels through the run's transform.

    ``region`` (source pixels, default the whole source) drawn at ``size`` = (w, h) (default
    one value per source pixel). Returns (values float32 [h, w], seen bool [h, w]): bilinear
    with half-pixel centres (the maps' own convention), and which output pixels' centres fell
    inside the input at all (everything unless a crop cut them off). Separable, so a
    12-megapixel source costs two small gathers, not a full grid.
    """
    source = np.nan_to_num(np.asarray(map01, dtype=np.float32), nan=0.0)
    in_w, in_h = transform.input
    if source.shape != (in_h, in_w):
        raise ValueError(f"map of shape {source.shape} is not at the input size {(in_h, in_w)}")
    left, top, right, bottom = region or (0, 0, *transform.source)
    out_w, out_h = size or (right - left, bottom - top)
    (sx, sy), (ox, oy) = transform.scale, transform.offset
    xs = left + (np.arange(out_w, dtype=np.float64) + 0.5) * (right - left) / out_w
    ys = top + (np.arange(out_h, dtype=np.float64) + 0.5) * (bottom - top) / out_h
    (c0, c1, cf), seen_x = _axis_weights(xs * sx + ox, in_w)
    (r0, r1, rf), seen_y = _axis_weights(ys * sy + oy, in_h)
    across = source[:, c0] * (1.0 - cf) + source[:, c1] * cf  # [H, w]
    values = across[r0, :] * (1.0 - rf)[:, None] + across[r1, :] * rf[:, None]  # [h, w]
    return values.astype(np.float32), seen_y[:, None] & seen_x[None, :]


def _axis_weights(
    centres: np.ndarray, n_input: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Bilinear taps along one axis for sample points given in input pixels."""
    seen = (centres >= 0.0) & (centres < n_input)
    position = np.clip(centres - 0.5, 0.0, n_input - 1.0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_input - 1)
    return (low, high, (position - low).astype(np.float32)), seen


def overlay_rgb(
    image: Image.Image,
    map01: np.ndarray,
    alpha: float = 0.5,
    transform: ImageTransform | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Blend a JET-coloured map over an image: ``alpha * jet + (1 - alpha) * image``.

    The map is resized to the image (not the other way round) so the overlay keeps the
    source's pixels and size. With the run's ``transform`` the map goes back through the
    crop or padding the model saw; source pixels outside a crop get no colour and are dimmed
    (the model never saw them). ``image`` may be the source ``region`` (source pixels) drawn at
    any size. Returns an [H, W, 3] uint8 RGB array.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the heatmap's weight and must be within [0, 1], got {alpha}")
    source = np.asarray(map01)
    if source.ndim != 2:
        raise ValueError(f"overlay expects one [H, W] map, got shape {source.shape}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    seen = None
    if transform is None or (region is None and _plain_stretch(transform, source.shape)):
        resized = _resize_bilinear(np.nan_to_num(source.astype(np.float32), nan=0.0), height, width)
    else:
        if region is None and transform.source != (width, height):
            raise ValueError(f"transform of a {transform.source} source, image is {(width, height)}")
        resized, seen = map_to_source(source, transform, region, (width, height))
    levels = np.round(np.clip(resized, 0.0, 1.0) * 255.0).astype(np.uint8)
    colours = JET_LUT[levels].astype(np.float32)
    blended = alpha * colours + (1.0 - alpha) * rgb
    if seen is not None and not seen.all():
        blended = np.where(seen[..., None], blended, rgb * OUTSIDE_DIM)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _plain_stretch(transform: ImageTransform, shape: tuple[int, ...]) -> bool:
    return transform.offset == (0, 0) and transform.resized == transform.input == (shape[1], shape[0])


def overlay_jpeg(
    image: Image.Image,
    map01: np.ndarray,
    alpha: float = 0.5,
    quality: int = 90,
    transform: ImageTransform | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> bytes:
    """JPEG of :func:`overlay_rgb`, the same size as ``image``, for people to look at."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, got {quality}")
    blended = Image.fromarray(overlay_rgb(image, map01, alpha, transform, region))
    buffer = io.BytesIO()
    blended.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
