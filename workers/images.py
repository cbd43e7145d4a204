"""Image decoding for the model: any common file in, a fixed-size float tensor out.

Decoding is where bad data shows up, so every failure becomes an ``ImageDecodeError`` with
a reason that is stored on the item; the shard goes on with the other images.

Conventions, chosen so that one raw value means the same 8-bit level in every image of a run
(maps are compared across a dataset, so per-image contrast stretching would be a bias):

* 16-bit unsigned integer images are scaled by their bit depth: ``round(v * 255 / (2**bits - 1))``
  with ``bits`` = 16, or the significant bits a PNG declares in its ``sBIT`` chunk (12-bit
  scanner output stored in 16-bit PNGs). Pillow reduces 16-bit RGB(A) to 8 bits by the same
  rule (it keeps the high byte), so grey and colour images agree.
* Images with no full scale (signed or 32-bit integers, floats) are stretched by their own
  finite min..max; there is no other defensible reference for them.
* Transparency is composited over black: transparent pixels carry arbitrary colours, and a
  fixed background makes them one uniform, model-neutral value.
* EXIF orientation is applied; ``width``/``height`` are the upright source size, even when a
  JPEG is decoded at a reduced scale, because patch boxes are mapped back to source pixels.
* DICOM follows the standard's display pipeline: modality LUT (rescale slope/intercept), then
  the first VOI window (or VOI LUT) when the file has one, else the min..max of the modality
  values; MONOCHROME1 is inverted so that higher values are darker, as radiologists see them.
  Multi-frame files use their first frame.
"""

from __future__ import annotations

import functools
import io
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from workers.preprocess import ImageTransform, Preprocess

# 12k x 12k: a 100-megapixel camera frame fits, and one image stays near 430 MB as 8-bit RGB, so
# a few decode threads cannot take a worker's memory. Pillow keeps its own process-wide cap
# (2 * PIL.Image.MAX_IMAGE_PIXELS, about 179M) in front of this one.
MAX_PIXELS = 12_000 * 12_000

# Pillow decoders accepted: the formats datasets come in. Exotic decoders are attack surface and
# would let unreviewed formats into an audit silently.
PIL_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "WEBP", "BMP", "DIB", "GIF")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED = "JPEG, PNG, TIFF, WebP, BMP, GIF, DICOM"

_ORIENTATION_TAG = 0x0112
# What brings the stored pixels upright, per EXIF orientation (Exif 2.32, tag 0x0112).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# The resize of a plain (H, W) size: the stretch every run used before crops existed.
_STRETCH_STATS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
_ROW_BLOCK_PIXELS = 1 << 22  # rows per conversion step: bounds the float temporaries to ~16 MB
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_FOREIGN_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)
# Image formats that are recognised by their magic number but not accepted. Unknown files are
# never handed to every Pillow plugin just to name them: each plugin is code that parses the bytes.
_OTHER_IMAGE_SIGNATURES = (
    (b"8BPS", "a Photoshop document"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xffO\xffQ", "a JPEG 2000 codestream"),
    (b"\x76\x2f\x31\x01", "an OpenEXR image"),
    (b"#?RADIANCE", "a Radiance HDR image"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
)
# Magic numbers of accepted formats: a file that starts like one but cannot be opened is damaged.
_OWN_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageDecodeError(ValueError):
    """The bytes of one item could not become an image."""


@dataclass(frozen=True)
class DecodedImage:
    tensor: torch.Tensor  # float32 [3, H, W] normalised, at model input size
    width: int  # source width in pixels, after EXIF orientation
    height: int
    transform: ImageTransform  # where the source's pixels went in the input


@dataclass(frozen=True)
class DecodedPixels:
    """An image at model input size, still 8-bit and as decoded (rows of RGB pixels).

    A quarter of the bytes to stack and move, and no transpose on the decode thread:
    :func:`stack_pixels` turns a batch of them into the channels-last layout the engine feeds
    its convolutions, and :func:`normalise_batch` normalises it in one vectorised step.
    """

    pixels: torch.Tensor  # uint8 [H, W, 3], upright, at model input size; on the CPU or the decoding device
    width: int  # source width in pixels, after EXIF orientation
    height: int
    transform: ImageTransform  # where the source's pixels went in the input


@dataclass
class _Opened:
    """A source image before resizing: pixels still in stored orientation."""

    image: Image.Image  # 8-bit RGB or L, possibly reduced in scale (JPEG draft)
    width: int  # upright source size
    height: int
    orientation: int  # EXIF value 1..8


def as_preprocess(size: tuple[int, int] | Preprocess) -> Preprocess:
    """A plain (H, W) means the bilinear stretch; a :class:`Preprocess` is taken as it is."""
    if isinstance(size, Preprocess):
        return size
    return Preprocess(size=(int(size[0]), int(size[1])), mean=_STRETCH_STATS[0], std=_STRETCH_STATS[1])


def decode_pixels(
    data: bytes,
    size: tuple[int, int] | Preprocess,
    *,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> DecodedPixels:
    """Decode, orient, resize, crop or pad to the model input, keeping 8-bit RGB.

    ``size`` is the run's :class:`Preprocess` (a plain (H, W) = stretch, bilinear).
    ``max_pixels`` bounds the source's declared size (checked before any pixel is decoded).
    ``name`` (a file name or URI) lets a ``.dcm`` file without the DICOM preamble be read.

    The pixels equal Pillow's resize of the full decoded image, then the centre crop or pad
    (what torchvision's and timm's transforms do to a PIL image), except where speed wins:
    a JPEG over twice the resize size is decoded at a reduced scale (libjpeg's DCT scaling),
    so it is never held in memory in full. No ``reducing_gap``: its shortcut changes pixels,
    and it halves a resize that costs far less than decoding the source.
    """
    pre = as_preprocess(size)
    opened = _open(data, name=name, max_pixels=max_pixels, draft_for=lambda w, h: pre.transform(w, h).resized)
    geometry = pre.transform(opened.width, opened.height)
    new_w, new_h = geometry.resized
    if new_w * new_h > max_pixels:
        # A centre crop of a long strip resizes its short side up: 100,000 x 1 would become 25.6e9 pixels.
        raise ImageDecodeError(
            f"a {opened.width}x{opened.height} image would be resized to {new_w}x{new_h} = {new_w * new_h:,} "
            f"pixels for its {pre.resize} to {pre.size[1]}x{pre.size[0]}, over the limit of {max_pixels:,} "
            "(max_pixels); an aspect ratio this extreme needs stretch or letterbox"
        )
    swaps = opened.orientation in (5, 6, 7, 8)
    # Resize in stored orientation and turn the small result: never transpose the full image.
    stored_size = (new_h, new_w) if swaps else (new_w, new_h)
    resized = opened.image.resize(stored_size, pre.resample)
    if opened.orientation in _UPRIGHT:
        resized = resized.transpose(_UPRIGHT[opened.orientation])
    if resized.mode != "RGB":
        resized = resized.convert("RGB")
    placed = pre.place(resized, geometry)
    hwc = torch.from_numpy(np.array(placed))  # writable: torch refuses to wrap read-only memory
    return DecodedPixels(pixels=hwc, width=opened.width, height=opened.height, transform=geometry)


def stack_pixels(images: Sequence[DecodedPixels]) -> torch.Tensor:
    """A batch as uint8 [B, 3, H, W] in channels-last memory: one copy, no transpose.

    Images decoded on an accelerator stay there; a batch that mixes them with images decoded on
    the CPU (a file the device decoder refused) is stacked on the accelerator.
    """
    devices = {image.pixels.device for image in images}
    if len(devices) > 1:
        device = next(d for d in devices if d.type != "cpu")
        return torch.stack([image.pixels.to(device) for image in images]).permute(0, 3, 1, 2)
    return torch.stack([image.pixels for image in images]).permute(0, 3, 1, 2)


def normalise_batch(
    pixels: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any device) -> float32 ``(x / 255 - mean) / std``, where it lies.

    The values are those of torchvision's ``ToTensor``/``Normalize`` (and timm's) on every
    device. On the CPU it is their arithmetic itself: divide, subtract, divide, in float32. On
    an accelerator, where a division by a scalar may be computed as a multiplication by its
    reciprocal (CUDA does), it is a gather from a 3 x 256 table computed on the CPU that way:
    no arithmetic, so no rounding of its own. Channels-last memory stays channels-last.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected uint8 pixels [B, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    if pixels.device.type == "cpu" and pixels.is_contiguous(memory_format=torch.channels_last):
        return _normalise_channels_last(pixels, mean, std)
    if pixels.device.type == "cpu":
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        x = pixels.to(torch.float32)  # keeps the layout: channels-last stays channels-last
        return x.div_(255.0).sub_(mean_t).div_(std_t)
    return normalise_by_table(pixels, mean, std)


# Elements per step of the CPU normalisation: ~1 MB of float32, which stays in the core's cache
# through the step's four passes.
_NORMALISE_STEP = 1 << 18


def _normalise_channels_last(
    pixels: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """:func:`normalise_batch` on the CPU for channels-last pixels: the same three operations.

    In memory the batch is rows of ``R G B R G B ...``; each row is divided by 255, has a row
    of repeated means subtracted and is divided by a row of repeated deviations, a few rows at
    a time. Every element sees the same float32 operations in the same order as the plain
    broadcast, so the values are identical; but the broadcast of a 3-vector over the innermost
    dimension does not vectorise, and four passes over the whole batch leave the cache
    (64 x 224 x 224 on one core: 28 ms against 8 ms, ``bench/host_steps.py``).
    """
    b, c, h, w = pixels.shape
    rows_in = pixels.permute(0, 2, 3, 1).reshape(b * h, w * c)  # a view: channels-last is NHWC
    out = torch.empty((b, h, w, c), dtype=torch.float32)
    rows_out = out.view(b * h, w * c)
    mean_row = torch.tensor(mean, dtype=torch.float32).repeat(w)
    std_row = torch.tensor(std, dtype=torch.float32).repeat(w)
    step = max(1, _NORMALISE_STEP // max(1, w * c))
    for start in range(0, b * h, step):
        block = rows_out[start : start + step]
        block.copy_(rows_in[start : start + step])
        block.div_(255.0).sub_(mean_row).div_(std_row)
    return out.permute(0, 3, 1, 2)


def normalise_by_table(
    pixels: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """:func:`normalise_batch` as one gather from :func:`normalise_table`, on the pixels' device."""
    table = torch.from_numpy(normalise_table(tuple(mean), tuple(std))).to(pixels.device).view(-1)
    nhwc = pixels.permute(0, 2, 3, 1)
    offsets = torch.arange(0, 3 * 256, 256, device=pixels.device)
    return table[nhwc.to(torch.int64) + offsets].permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=32)
def normalise_table(mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """float32 [3, 256]: each 8-bit level normalised the way torchvision and timm do it.

    Divide by 255, subtract the mean, divide by the std, in float32 on the CPU.
    """
    levels = torch.arange(256, dtype=torch.float32) / 255.0
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1)
    return ((levels.view(1, 256) - mean_t) / std_t).numpy()


def decode_image(
    data: bytes,
    size: tuple[int, int] | Preprocess,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> DecodedImage:
    """:func:`decode_pixels`, then normalised: one model-ready float32 image."""
    decoded = decode_pixels(data, size, max_pixels=max_pixels, name=name)
    chw = decoded.pixels.numpy().transpose(2, 0, 1)
    return DecodedImage(
        tensor=_normalise(chw, mean, std),
        width=decoded.width,
        height=decoded.height,
        transform=decoded.transform,
    )


def open_rgb(data: bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """The upright, full-resolution 8-bit RGB image that ``decode_image`` resizes (for overlays)."""
    opened = _open(data, name=name, max_pixels=max_pixels, draft_for=None)
    image = opened.image
    if opened.orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[opened.orientation])
    return image.convert("RGB") if image.mode != "RGB" else image


def is_dicom(data: bytes, name: str | None = None) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble; bare datasets only a name."""
    if data[128:132] == b"DICM":
        return True
    return bool(name) and name.lower().endswith(DICOM_EXTENSIONS)


def _may_be_bare_dicom(data: bytes) -> bool:
    """Starts with a little-endian tag of the file meta (0002) or identifying (0008) group."""
    return len(data) >= 8 and data[1] == 0 and data[0] in (0x02, 0x08) and data[2] % 2 == 0


def _normalise(
    chw_u8: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """The table of :func:`normalise_batch` looked up into a fresh CHW float32 array.

    numpy, not torch: on a decode thread, torch would split these small ops over its intra-op
    pool, which the model and the other decode threads are using (10-40x slower when busy).
    """
    table = normalise_table(tuple(mean), tuple(std))
    chw = np.empty(chw_u8.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], chw_u8[channel], out=chw[channel])
    return torch.from_numpy(chw)


def _open(
    data: bytes,
    *,
    name: str | None,
    max_pixels: int,
    draft_for: Callable[[int, int], tuple[int, int]] | None,
) -> _Opened:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data, name):
        pixels = _decode_dicom(data, max_pixels)
        return _Opened(pixels, pixels.width, pixels.height, 1)
    try:
        img = _identify(data, max_pixels)
    except ImageDecodeError:
        if not _may_be_bare_dicom(data):
            raise
        try:  # a dataset written without preamble and without a .dcm name
            pixels = _decode_dicom(data, max_pixels)
        except ImageDecodeError:
            raise ImageDecodeError(_unidentified_reason(data)) from None
        return _Opened(pixels, pixels.width, pixels.height, 1)
    src_w, src_h = img.size  # the declared size: a JPEG draft below shrinks img.size
    try:
        if draft_for is not None:
            apply_draft(img, draft_for)
        img.load()
        bits = _png_significant_bits(data) if img.format == "PNG" else None
        eight = _to_8bit(img, significant_bits=bits)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        raise ImageDecodeError(
            f"cannot decode {img.format} image ({_corrupt_reason(exc)}): {_decoder_says(exc)}"
        ) from exc
    # Read after loading: Pillow's TIFF reader turns the pixels itself, reports the upright size
    # from the start and drops the tag, so only what is still tagged is left to apply here.
    orientation = _orientation(img)
    if orientation in (5, 6, 7, 8):
        src_w, src_h = src_h, src_w
    return _Opened(eight, src_w, src_h, orientation)


def apply_draft(img: Image.Image, draft_for: Callable[[int, int], tuple[int, int]]) -> None:
    """Let libjpeg downscale a JPEG while decoding (by up to 8): a 20k x 20k scan never exists in
    full. Twice the resize size keeps the final resize antialiased. Other formats are left alone;
    ``img.size`` shrinks when the draft applies."""
    if not isinstance(img, JpegImagePlugin.JpegImageFile):
        return
    src_w, src_h = img.size
    turned = _orientation(img) in (5, 6, 7, 8)
    upright = draft_for(src_h, src_w) if turned else draft_for(src_w, src_h)
    want = (upright[1], upright[0]) if turned else upright
    img.draft("RGB", (2 * want[0], 2 * want[1]))


def identify(data: bytes, max_pixels: int) -> Image.Image:
    """The header of an accepted image (nothing decoded); :class:`ImageDecodeError` otherwise."""
    return _identify(data, max_pixels)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation 1..8 (1 when absent or unreadable)."""
    return _orientation(img)


def _identify(data: bytes, max_pixels: int) -> Image.Image:
    """Open (headers only) with the accepted decoders; reject oversized images before decoding."""
    try:
        img = Image.open(io.BytesIO(data), formats=_pil_formats())
    except Image.DecompressionBombError as exc:
        match = _BOMB_PIXELS.search(str(exc))
        claimed = f"{int(match.group(1)):,} pixels" if match else "more pixels than Pillow allows"
        raise ImageDecodeError(
            f"image declares {claimed}, over the limit of {min(max_pixels, _pillow_cap()):,} pixels "
            "(a decompression bomb, or an image to downscale before the audit)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified_reason(data)) from exc
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        raise ImageDecodeError(
            f"cannot read the image header ({_corrupt_reason(exc)}): {_decoder_says(exc)}"
        ) from exc
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"image of {img.width}x{img.height} = {pixels:,} pixels is over the limit of {max_pixels:,} "
            "pixels (max_pixels): a decompression bomb, or an image to downscale before the audit"
        )
    if img.width == 0 or img.height == 0:
        raise ImageDecodeError(f"image declares an empty size {img.width}x{img.height}")
    return img


@functools.cache
def _pil_formats() -> tuple[str, ...]:
    """The accepted formats this Pillow build can read (asking for a missing one is a KeyError)."""
    Image.init()
    return tuple(name for name in PIL_FORMATS if name in Image.OPEN)


def _pillow_cap() -> int:
    cap = Image.MAX_IMAGE_PIXELS
    return 2 * cap if cap else 2**63


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, struct.error, TypeError, IndexError):
        return 1  # unreadable EXIF: the pixels are still good, take them as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")
_QUOTED = re.compile(r"'[^']{9,}'|\"[^\"]{9,}\"")


def _decoder_says(exc: BaseException) -> str:
    """A decoder's message without the file's bytes it may quote (a chunk name, a tag's value)."""
    text = _BYTES_LITERAL.sub("b'…'", str(exc))
    return _QUOTED.sub("'…'", text)[:300]


def _corrupt_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "truncated" in text or "end of file" in text or isinstance(exc, EOFError):
        return "the file is truncated"
    return "the file is corrupt"


def _unidentified_reason(data: bytes) -> str:
    head = data[:512]
    damaged = "the file is truncated or corrupt"
    for signature, fmt in _OWN_SIGNATURES:
        if head.startswith(signature):
            return f"cannot read the {fmt} header: {damaged} ({len(data)} bytes)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return f"cannot read the WEBP header: {damaged} ({len(data)} bytes)"
    for signature, what in _FOREIGN_SIGNATURES:
        if head.startswith(signature):
            return f"not an image: the file is {what} (supported: {SUPPORTED})"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return f"unsupported format: ISO media file of brand {brand!r} (HEIF/AVIF?); supported: {SUPPORTED}"
    for signature, what in _OTHER_IMAGE_SIGNATURES:
        if head.startswith(signature):
            return f"unsupported image format: the file is {what} (supported: {SUPPORTED})"
    if _as_text(head) is not None:
        # The kind of content only: the bytes of a file that is not an image may be a secret.
        return f"not an image: the file holds text (supported: {SUPPORTED})"
    if head.startswith(b"BM"):  # two bytes only: checked after text, which may start with them
        return f"cannot read the BMP header: {damaged} ({len(data)} bytes)"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return f"unsupported image format: the file is a Netpbm image (supported: {SUPPORTED})"
    return f"unrecognised image format ({len(data)} bytes); supported: {SUPPORTED}"


def _as_text(head: bytes) -> str | None:
    """The head as text when it reads as printable UTF-8 (a multi-byte character may be cut at the end)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    return text if text and all(ch.isprintable() or ch.isspace() for ch in text) else None


def _png_significant_bits(data: bytes) -> int | None:
    """The grey depth a PNG's sBIT chunk declares; Pillow reads the chunk but does not keep it."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in (b"IDAT", b"IEND"):
            return None  # sBIT must precede the image data
        if kind == b"sBIT" and length >= 1:
            return data[pos + 8]
        pos += 12 + length
    return None


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB by the module's conventions (no PNG ``sBIT`` known here)."""
    eight = _to_8bit(img, significant_bits=None)
    return eight.convert("RGB") if eight.mode != "RGB" else eight


def _to_8bit(img: Image.Image, *, significant_bits: int | None) -> Image.Image:
    """Any Pillow mode to 8-bit "RGB", or "L" for grey (widened after resizing: a third of the work)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and img.format == "PNG"):
        bits = significant_bits if significant_bits and 1 <= significant_bits <= 16 else 16
        return Image.fromarray(_scale_to_uint8(np.asarray(img), 0.0, float(2**bits - 1)), mode="L")
    if mode in ("I", "F"):
        arr = np.asarray(img)
        lo, hi = _finite_range(arr)
        return Image.fromarray(_scale_to_uint8(arr, lo, hi), mode="L")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(f"image mode {mode} cannot be converted to RGB: {exc}") from exc


# The earlier private name, still imported by the overlay renderer.
_to_rgb = to_rgb8


def _finite_range(arr: np.ndarray) -> tuple[float, float]:
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def _scale_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """round((arr - lo) * 255 / (hi - lo)) clipped to 0..255, in row blocks so temporaries stay small."""
    out = np.zeros(arr.shape, dtype=np.uint8)
    if hi <= lo:
        return out
    scale = np.float32(255.0 / (hi - lo))
    rows = max(1, _ROW_BLOCK_PIXELS // max(1, int(np.prod(arr.shape[1:]))))
    for start in range(0, arr.shape[0], rows):
        block = arr[start : start + rows].astype(np.float32)
        block -= np.float32(lo)
        block *= scale
        np.nan_to_num(block, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(block, 0.0, 255.0, out=block)
        np.rint(block, out=block)
        out[start : start + rows] = block
    return out


def _decode_dicom(data: bytes, max_pixels: int) -> Image.Image:
    try:
        import pydicom
        from pydicom import pixels as dicom_pixels
    except ImportError as exc:
        raise ImageDecodeError("the file is DICOM; reading it needs pydicom (pip install pydicom)") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageDecodeError(f"cannot parse DICOM: {type(exc).__name__}: {_decoder_says(exc)}") from exc
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = (
            f"only {kinds[0]}, which is not supported"
            if kinds
            else "no Pixel Data element: a non-image object such as a report, or a truncated file"
        )
        sop = ds.get("SOPClassUID")
        sop_name = getattr(sop, "name", sop) or "unknown SOP class"
        raise ImageDecodeError(f"DICOM file holds no image: {what} ({sop_name})")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(f"DICOM declares an empty size: Rows={rows}, Columns={cols}")
    if rows * cols > max_pixels:
        raise ImageDecodeError(
            f"DICOM image of {cols}x{rows} = {rows * cols:,} pixels is over the limit of {max_pixels:,} "
            "pixels (max_pixels)"
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        arr = dicom_pixels.pixel_array(ds, index=0 if frames > 1 else None)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric.startswith("MONOCHROME"):
            levels = _dicom_grey(arr, ds, dicom_pixels)
            if photometric == "MONOCHROME1":
                np.subtract(255, levels, out=levels)
            return Image.fromarray(levels, mode="L")
        if photometric == "PALETTE COLOR":
            rgb = dicom_pixels.apply_color_lut(arr, ds)[..., :3]
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return Image.fromarray(_scale_to_uint8(rgb, 0.0, float(2**bits - 1)), mode="RGB")
        if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB, and YBR that pydicom converted to RGB
            if arr.dtype == np.uint8:
                return Image.fromarray(arr, mode="RGB")
            bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
            return Image.fromarray(_scale_to_uint8(arr, 0.0, float(2**bits - 1)), mode="RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:  # decoder plugins and malformed pixel data raise many types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        where = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise ImageDecodeError(
            f"cannot decode DICOM pixel data{where}: {type(exc).__name__}: {_decoder_says(exc)}"
        ) from exc
    raise ImageDecodeError(
        f"DICOM photometric interpretation {photometric!r} with {arr.shape} pixels is not supported "
        "(MONOCHROME1, MONOCHROME2, RGB, YBR_* and PALETTE COLOR are)"
    )


def _first(value: Any) -> float:
    """Window values may be multi-valued (alternative views): the first is the default view."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _dicom_grey(arr: np.ndarray, ds: Any, dicom_pixels: Any) -> np.ndarray:
    """Stored values -> modality values -> VOI window -> 8-bit levels (PS3.3 C.11.2.1.2)."""
    if "ModalityLUTSequence" in ds:
        values = dicom_pixels.apply_modality_lut(arr, ds).astype(np.float32, copy=False)
    else:
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
        values = arr.astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            values *= np.float32(slope)
            values += np.float32(intercept)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None and _first(width) >= 1.0:
        return _window(values, _first(center), _first(width), str(ds.get("VOILUTFunction") or "LINEAR"))
    if ds.get("VOILUTSequence"):
        mapped = dicom_pixels.apply_voi(np.rint(values).astype(np.int64), ds, index=0)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return _scale_to_uint8(mapped, 0.0, float(2**bits - 1))
    lo, hi = _finite_range(values)
    return _scale_to_uint8(values, lo, hi)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI LUT functions of PS3.3 C.11.2.1.2-3, straight to 0..255."""
    function = function.upper()
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # far below the centre exp overflows to inf: level 0
            levels = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return np.rint(levels).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return _scale_to_uint8(values, center - width / 2.0, center + width / 2.0)
    if function != "LINEAR":
        raise ImageDecodeError(
            f"DICOM VOI LUT function {function!r} is not supported (LINEAR, LINEAR_EXACT, SIGMOID are)"
        )
    # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, i.e. a ramp from c - 0.5 - (w - 1) / 2.
    lo = center - 0.5 - (width - 1.0) / 2.0
    if width == 1.0:  # a threshold: below or at c - 0.5 is black, above is white
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    return _scale_to_uint8(values, lo, lo + (width - 1.0))
