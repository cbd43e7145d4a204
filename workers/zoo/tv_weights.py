"""torchvision's weights API: ``torchvision:NAME@WEIGHTS``, built the way torchvision builds it.

``torchvision.models.get_model(name, weights=...)`` loads the weights from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``) and would download them when
the file is missing; camaudit never downloads, so a missing file fails before any work with
the path torchvision reads and where the file comes from.
"""

from __future__ import annotations

from typing import Any

from torchvision.transforms import _presets

from workers.preprocess import Preprocess


def preprocess_of(weights: Any) -> Preprocess:
    """The preprocessing of ``weights.transforms()``: resize the shorter side, crop the centre."""
    preset = weights.transforms()
    if not isinstance(preset, _presets.ImageClassification):
        raise TypeError(f"{weights} has {type(preset).__name__} transforms, not ImageClassification")
    crop = int(preset.crop_size[0])
    resize = int(preset.resize_size[0])
    return Preprocess(
        size=(crop, crop),
        mean=tuple(float(v) for v in preset.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in preset.std),  # type: ignore[arg-type]
        resize="center-crop",
        interpolation=str(preset.interpolation.value),
        resize_to=(resize, resize),
    )
