"""timm models: ``timm:NAME`` and ``timm:NAME.TAG``, with their ``pretrained_cfg`` preprocessing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.preprocess import DEFAULT_CROP_PCT, Preprocess, crop_pct_size

# timm's crop modes and the camaudit modes that do the same thing.
CROP_MODES = {"center": "center-crop", "squash": "stretch", "border": "letterbox"}


def preprocess_of(config: Mapping[str, Any]) -> Preprocess:
    """The eval transform of a ``resolve_data_config`` dict, as ``timm.data.create_transform`` builds it."""
    size = tuple(int(v) for v in config["input_size"][-2:])
    crop_pct = float(config.get("crop_pct") or DEFAULT_CROP_PCT)
    crop_mode = str(config.get("crop_mode") or "center")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"timm crop mode {crop_mode!r} is not supported ({', '.join(CROP_MODES)} are)")
    mean = tuple(float(v) for v in config["mean"])
    interpolation = str(config.get("interpolation") or "bilinear")
    if interpolation == "random":  # a training choice; evaluation uses bilinear
        interpolation = "bilinear"
    fill = tuple(round(255 * v) for v in mean) if crop_mode == "border" else (0, 0, 0)
    return Preprocess(
        size=size,  # type: ignore[arg-type]
        mean=mean,  # type: ignore[arg-type]
        std=tuple(float(v) for v in config["std"]),  # type: ignore[arg-type]
        resize=CROP_MODES[crop_mode],
        interpolation=interpolation,
        resize_to=crop_pct_size(size, crop_pct),  # type: ignore[arg-type]
        fill=fill,  # type: ignore[arg-type]
    )
