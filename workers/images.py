"""Image decoding for the model: any common file in, a fixed-size float tensor out.

Decoding is where bad data shows up, so every failure becomes an ``ImageDecodeError`` with
a reason that is stored on the item; the shard goes on with the other images.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Far larger than any model input, small enough that one bad file cannot take the worker's memory.
MAX_PIXELS = 40_000 * 40_000


class ImageDecodeError(ValueError):
    """The bytes of one item could not become an image."""


@dataclass(frozen=True)
class DecodedImage:
    tensor: torch.Tensor  # float32 [3, H, W] normalised, at model input size
    width: int  # source width in pixels, after EXIF orientation
    height: int


def _to_rgb(img: Image.Image) -> Image.Image:
    """Bring 16-bit, float, palette, alpha and CMYK images to 8-bit RGB without clipping highlights."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(
    data: bytes,
    size: tuple[int, int],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> DecodedImage:
    """Decode, orient and resize (stretch) to ``size`` = (H, W), then normalise."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    height, width = size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(f"image of {img.width}x{img.height} pixels exceeds the limit")
            src_w, src_h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation that turns by 90 degrees
                src_w, src_h = src_h, src_w
            if img.format == "JPEG":
                # Let libjpeg downscale while decoding: a 20k x 20k scan never exists in full.
                # Boxes still map to the original pixel grid recorded above.
                img.draft("RGB", (width * 2, height * 2))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    except Warning as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
    tensor = arr.to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return DecodedImage(tensor=(tensor - mean_t) / std_t, width=src_w, height=src_h)
