"""How a source image becomes the model's input, and how input pixels map back to the source.

A pretrained classifier was trained on images prepared one exact way (resize the shorter side,
crop the centre, a given filter and statistics). Explaining it on images prepared another way
explains a different model, so the preparation is part of the model: it comes from the weights,
the timm or Hugging Face config or the checkpoint, is recorded on the run, and every box,
overlay and metric maps back through it.

Every mode is one resize followed by one centre crop-or-pad, so the geometry of an image is an
axis-aligned affine map ``input = source * scale + offset`` (:class:`ImageTransform`):

* ``stretch``: resize to ``resize_to`` ignoring the aspect ratio (``resize_to`` = the input size
  unless a crop fraction is set: timm's ``squash`` crop mode).
* ``center-crop``: keep the aspect ratio and make the shorter side ``resize_to`` (torchvision's
  ``Resize(int)``; for a non-square ``resize_to``, timm's ``ResizeKeepRatio``), then crop the
  centre. ``crop_pct`` = input size / ``resize_to``, as torchvision and timm define it.
* ``letterbox``: keep the aspect ratio and fit the longer side (timm's ``border`` mode), then
  pad the centre with ``fill``.

Crop offsets, padding and rounding are those of torchvision's ``center_crop`` and timm's
``center_crop_or_pad``, so the same pixels land in the same places; pixel arithmetic is Pillow's
resize on 8-bit images, the path both libraries take for PIL images.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

RESIZE_MODES = ("stretch", "center-crop", "letterbox")
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP_ROUNDINGS = ("round", "floor")
DEFAULT_CROP_PCT = 0.875  # timm's and torchvision's 224 of 256, for a centre crop asked for by name


class PreprocessError(ValueError):
    """A preprocessing description that cannot work; the message says what would."""


@dataclass(frozen=True)
class ImageTransform:
    """The geometry one image went through: ``input = source * scale + offset``, per axis.

    Coordinates are continuous pixel edges: source pixel ``i`` covers ``[i, i + 1)``. Pillow's
    resize samples output pixel ``j`` at source ``(j + 0.5) * source / resized``, which is this
    map at pixel centres.
    """

    source: tuple[int, int]  # (w, h) upright source pixels
    resized: tuple[int, int]  # (w, h) after the resize
    offset: tuple[int, int]  # (x, y) of the resized image's corner in the input; negative = cropped
    input: tuple[int, int]  # (W, H) model input

    @property
    def scale(self) -> tuple[float, float]:
        return self.resized[0] / self.source[0], self.resized[1] / self.source[1]

    def to_input(self, boxes: Any) -> np.ndarray:
        """Source-pixel boxes [..., 4] (x0, y0, x1, y1) -> input pixels, as float64, unclipped."""
        sx, sy = self.scale
        b = np.asarray(boxes, dtype=np.float64)
        ox, oy = self.offset
        return np.stack(
            [b[..., 0] * sx + ox, b[..., 1] * sy + oy, b[..., 2] * sx + ox, b[..., 3] * sy + oy], axis=-1
        )

    def to_source(self, boxes: Any) -> np.ndarray:
        """Input-pixel boxes [..., 4] -> source pixels, as float64, unclipped."""
        ix, iy = self.source[0] / self.resized[0], self.source[1] / self.resized[1]
        b = np.asarray(boxes, dtype=np.float64)
        ox, oy = self.offset
        return np.stack(
            [(b[..., 0] - ox) * ix, (b[..., 1] - oy) * iy, (b[..., 2] - ox) * ix, (b[..., 3] - oy) * iy],
            axis=-1,
        )

    def visible_source(self) -> tuple[float, float, float, float]:
        """The part of the source the model sees (all of it unless cropped), in source pixels."""
        x0, y0, x1, y1 = self.to_source([0.0, 0.0, float(self.input[0]), float(self.input[1])]).tolist()
        w, h = self.source
        return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)

    def content_input(self) -> tuple[int, int, int, int]:
        """The part of the input that shows the source (all of it unless padded), in input pixels."""
        ox, oy = self.offset
        width, height = self.input
        return (
            max(0, ox),
            max(0, oy),
            min(width, ox + self.resized[0]),
            min(height, oy + self.resized[1]),
        )

    def clips(self, box: Sequence[float], tolerance: float = 0.5) -> bool:
        """Whether a source-pixel box reaches outside what the model sees (by more than ``tolerance`` px)."""
        vx0, vy0, vx1, vy1 = self.visible_source()
        x0, y0, x1, y1 = (float(v) for v in box)
        return x0 < vx0 - tolerance or y0 < vy0 - tolerance or x1 > vx1 + tolerance or y1 > vy1 + tolerance

    def as_dict(self) -> dict[str, list[int]]:
        return {
            "source": list(self.source),
            "resized": list(self.resized),
            "offset": list(self.offset),
            "input": list(self.input),
        }


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for the model; stored with the run so results can be reproduced."""

    size: tuple[int, int]  # (H, W) model input size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "stretch"  # one of RESIZE_MODES
    interpolation: str = "bilinear"  # Pillow filter, one of INTERPOLATIONS
    resize_to: tuple[int, int] | None = None  # (H, W) fitted before the centre crop/pad; None = size
    fill: tuple[int, int, int] = (0, 0, 0)  # 8-bit RGB of padding
    # Where an odd crop margin goes: "round" half to even (torchvision, timm) or "floor" (Hugging Face).
    crop_rounding: str = "round"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(v) != v or v < 1 for v in self.size):
            raise PreprocessError(f"input size must be two positive integers (H, W), got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise PreprocessError(f"mean and std need 3 values (RGB), got mean={self.mean}, std={self.std}")
        if any(not v > 0 for v in self.std):
            raise PreprocessError(f"std values must be positive, got {self.std}")
        if self.resize not in RESIZE_MODES:
            raise PreprocessError(_unknown("resize mode", self.resize, RESIZE_MODES))
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessError(_unknown("interpolation", self.interpolation, tuple(INTERPOLATIONS)))
        if self.resize_to is not None and (
            len(self.resize_to) != 2 or any(int(v) != v or v < 1 for v in self.resize_to)
        ):
            raise PreprocessError(f"resize_to must be two positive integers (H, W), got {self.resize_to!r}")
        if len(self.fill) != 3 or any(int(v) != v or not 0 <= v <= 255 for v in self.fill):
            raise PreprocessError(f"fill must be three integers 0..255 (RGB), got {self.fill!r}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise PreprocessError(_unknown("crop rounding", self.crop_rounding, CROP_ROUNDINGS))
        if self.resize_to is not None and tuple(self.resize_to) == tuple(self.size):
            object.__setattr__(self, "resize_to", None)  # one spelling per transform: equal means equal

    @property
    def fit(self) -> tuple[int, int]:
        """(H, W) the source is resized to (stretch) or fitted into (the other modes)."""
        return self.resize_to if self.resize_to is not None else self.size

    @property
    def crop_pct(self) -> float:
        """Input size over resize size (1.0 = no crop), as torchvision and timm define it."""
        return self.size[0] / self.fit[0]

    @property
    def resample(self) -> Image.Resampling:
        return INTERPOLATIONS[self.interpolation]

    def transform(self, width: int, height: int) -> ImageTransform:
        """The geometry of a ``width`` x ``height`` upright source under this preprocessing."""
        if width < 1 or height < 1:
            raise PreprocessError(f"source size must be positive, got {width}x{height}")
        fit_h, fit_w = self.fit
        if self.resize == "stretch":
            new_w, new_h = fit_w, fit_h
        elif self.resize == "center-crop" and fit_h == fit_w:
            # torchvision Resize(int): the shorter side exactly, the longer one truncated.
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = fit_h, int(fit_h * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            # timm ResizeKeepRatio: one ratio for both sides (the smaller one fills, the larger fits).
            ratio_h, ratio_w = height / fit_h, width / fit_w
            ratio = min(ratio_h, ratio_w) if self.resize == "center-crop" else max(ratio_h, ratio_w)
            new_h, new_w = round(height / ratio), round(width / ratio)
        new_w, new_h = max(1, new_w), max(1, new_h)
        in_h, in_w = self.size
        return ImageTransform(
            source=(width, height),
            resized=(new_w, new_h),
            offset=(
                _centre_offset(new_w, in_w, self.crop_rounding),
                _centre_offset(new_h, in_h, self.crop_rounding),
            ),
            input=(in_w, in_h),
        )

    def apply(self, image: Image.Image) -> Image.Image:
        """Resize, crop and pad an upright 8-bit image to the input size, on Pillow."""
        geometry = self.transform(image.width, image.height)
        return self.place(image.resize(geometry.resized, self.resample), geometry)

    def place(self, resized: Image.Image, geometry: ImageTransform) -> Image.Image:
        """Crop and pad an image already resized to ``geometry.resized`` into the input."""
        if (resized.width, resized.height) != geometry.resized:
            raise PreprocessError(f"expected a {geometry.resized} image, got {resized.size}")
        ox, oy = geometry.offset
        in_w, in_h = geometry.input
        if ox <= 0 and oy <= 0 and geometry.resized[0] + ox >= in_w and geometry.resized[1] + oy >= in_h:
            if (ox, oy) == (0, 0) and geometry.resized == geometry.input:
                return resized
            return resized.crop((-ox, -oy, -ox + in_w, -oy + in_h))
        fill: Any = self.fill if resized.mode == "RGB" else round(sum(self.fill) / 3)
        canvas = Image.new(resized.mode, (in_w, in_h), fill)
        canvas.paste(resized, (ox, oy))
        return canvas

    def place_tensor(self, resized: Any, geometry: ImageTransform) -> Any:
        """:meth:`place` for a uint8 ``[3, h, w]`` tensor on any device (images decoded there).

        The same crop offsets and the same fill, so a tensor placed here equals the Pillow image
        placed by :meth:`place`, pixel for pixel.
        """
        import torch  # the scheduler reads preprocessing records without torch's import cost

        if tuple(resized.shape[1:]) != (geometry.resized[1], geometry.resized[0]):
            raise PreprocessError(f"expected a {geometry.resized} image, got {tuple(resized.shape)}")
        ox, oy = geometry.offset
        in_w, in_h = geometry.input
        fill = torch.tensor(self.fill, dtype=resized.dtype, device=resized.device).view(3, 1, 1)
        canvas = fill.expand(3, in_h, in_w).clone()
        # the overlap of the resized image, placed at (ox, oy), with the input
        x0, y0 = max(0, ox), max(0, oy)
        x1, y1 = min(in_w, ox + geometry.resized[0]), min(in_h, oy + geometry.resized[1])
        if x1 > x0 and y1 > y0:
            canvas[:, y0:y1, x0:x1] = resized[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        return canvas

    def with_overrides(
        self, *, resize: str | None = None, size: tuple[int, int] | None = None, crop_pct: float | None = None
    ) -> Preprocess:
        """The model's default changed by a user's ``--preprocess`` / ``--input-size``.

        A new input size keeps the crop fraction. A new mode takes the crop fraction given, else
        for a centre crop the model's own (0.875 when it had none), else 1.0: ``stretch`` and
        ``letterbox`` then show the whole source. Letterbox padding is the mean colour (zero after
        normalisation).
        """
        mode = resize or self.resize
        if mode not in RESIZE_MODES:
            raise PreprocessError(_unknown("resize mode", mode, RESIZE_MODES))
        new_size = size or self.size
        if crop_pct is None:
            if mode == self.resize:
                crop_pct = self.crop_pct
            elif mode == "center-crop":
                crop_pct = self.crop_pct if self.crop_pct < 1.0 else DEFAULT_CROP_PCT
            else:
                crop_pct = 1.0
        if not 0.0 < crop_pct <= 1.0:
            raise PreprocessError(f"crop_pct must be within (0, 1], got {crop_pct}")
        if crop_pct == self.crop_pct and new_size == self.size:
            resize_to = self.resize_to
        else:
            resize_to = _scaled(new_size, crop_pct)
        fill = self.fill
        if mode == "letterbox" and self.resize != "letterbox":
            fill = tuple(round(255 * m) for m in self.mean)  # type: ignore[assignment]
        return replace(self, size=new_size, resize=mode, resize_to=resize_to, fill=fill)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "resize_to": list(self.fit),
            "crop_pct": self.crop_pct,
            "fill": list(self.fill),
            "crop_rounding": self.crop_rounding,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, geometry_only: bool = False) -> Preprocess:
        """Read what :meth:`as_dict` wrote (runs recorded before crops existed were stretched bilinearly).

        ``geometry_only``: a reader that only maps boxes and maps needs no statistics.
        """
        try:
            size = tuple(int(v) for v in data["size"])
            resize_to = data.get("resize_to")
            if geometry_only:
                mean, std = data.get("mean", (0.0, 0.0, 0.0)), data.get("std", (1.0, 1.0, 1.0))
            else:
                mean, std = data["mean"], data["std"]
            return cls(
                size=size,  # type: ignore[arg-type]
                mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
                std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                resize=str(data.get("resize", "stretch")),
                interpolation=str(data.get("interpolation", "bilinear")),
                resize_to=None if resize_to is None else tuple(int(v) for v in resize_to),  # type: ignore[arg-type]
                fill=tuple(int(v) for v in data.get("fill", (0, 0, 0))),  # type: ignore[arg-type]
                crop_rounding=str(data.get("crop_rounding", "round")),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, PreprocessError):
                raise
            raise PreprocessError(f"unusable preprocessing record {dict(data)!r}: {error}") from error


def crop_pct_size(size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """timm's resize size for a crop fraction: ``floor(side / crop_pct)`` per side."""
    return _scaled(size, crop_pct)


def parse_mode(text: str) -> tuple[str, float | None]:
    """``center-crop``, ``center-crop:0.9``, ``letterbox``, ``stretch`` -> (mode, crop_pct or None)."""
    mode, sep, pct = text.strip().lower().partition(":")
    mode = mode.replace("_", "-")
    if mode == "centre-crop":
        mode = "center-crop"
    if mode not in RESIZE_MODES:
        raise PreprocessError(_unknown("preprocessing mode", mode, RESIZE_MODES))
    if not sep:
        return mode, None
    try:
        value = float(pct)
    except ValueError:
        raise PreprocessError(
            f"crop fraction in {text!r} must be a number in (0, 1], e.g. center-crop:0.875"
        ) from None
    if not 0.0 < value <= 1.0:
        raise PreprocessError(f"crop fraction in {text!r} must be within (0, 1], e.g. center-crop:0.875")
    return mode, value


def _scaled(size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    if crop_pct == 1.0:
        return size[0], size[1]
    return math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct)


def _centre_offset(resized: int, wanted: int, rounding: str = "round") -> int:
    """Where the resized side starts in the input: torchvision's centre crop, or its padding."""
    if resized >= wanted:
        margin = (resized - wanted) / 2.0
        return -(math.floor(margin) if rounding == "floor" else round(margin))
    return (wanted - resized) // 2


def _unknown(what: str, value: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(valid), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {what} {value!r}{hint} (valid: {', '.join(valid)})"
