"""torchvision's weights API: ``torchvision:NAME@WEIGHTS``, built the way torchvision builds it.

``torchvision.models.get_model(name, weights=...)`` loads the weights from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``) and would download them when
the file is missing; camaudit never downloads, so a missing file fails before any work with
the path torchvision reads and where the file comes from.
"""

from __future__ import annotations

import difflib
import os
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import _presets

from workers.models import ModelLoadError
from workers.preprocess import Preprocess
from workers.zoo.safe_load import tensors_only_loads


def preprocess_of(weights: Any) -> Preprocess:
    """The preprocessing of ``weights.transforms()``: resize the shorter side, crop the centre."""
    preset = weights.transforms()
    if not isinstance(preset, _presets.ImageClassification):
        raise ModelLoadError(f"{weights} has {type(preset).__name__} transforms, not ImageClassification")
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


def resolve(name: str, text: str) -> Any:
    """The weights enum member ``text`` names for architecture ``name`` (``DEFAULT`` resolved).

    Accepts the member name (``IMAGENET1K_V2``), ``DEFAULT``, or the full ``ResNet50_Weights.IMAGENET1K_V2``.
    """
    try:
        enum = torchvision.models.get_model_weights(name)
    except (KeyError, ValueError) as error:
        raise ModelLoadError(f"torchvision:{name} has no pretrained weights to name: {error}") from error
    members = [member.name for member in enum]
    valid = ["DEFAULT", *members]
    wanted = text.strip()
    prefix, dot, member = wanted.rpartition(".")
    if dot:
        if prefix != enum.__name__:
            raise ModelLoadError(
                f"weights {wanted!r} are not weights of torchvision:{name}, whose weights are "
                f"{enum.__name__}.{{{', '.join(valid)}}}"
            )
        wanted = member
    if wanted.upper() == "DEFAULT":
        return enum.DEFAULT
    for candidate in members:
        if candidate.upper() == wanted.upper():
            return enum[candidate]
    close = difflib.get_close_matches(wanted.upper(), valid, n=3, cutoff=0.4)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise ModelLoadError(
        f"torchvision:{name} has no weights {text!r}; {hint}valid: {', '.join(valid)} "
        f"(e.g. torchvision:{name}@DEFAULT)"
    )


def weights_file(weights: Any) -> Path:
    """Where torchvision's loader reads these weights: the torch hub cache, by the URL's file name."""
    file_name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def require_file(name: str, weights: Any) -> Path:
    """The weights file, or an error that says where it belongs and where it comes from (never a download)."""
    path = weights_file(weights)
    if not path.is_file():
        raise ModelLoadError(
            f"weights {type(weights).__name__}.{weights.name} of torchvision:{name} are not in the torch hub "
            f"cache: expected {path}. camaudit never downloads; on a connected machine run "
            f"`python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='{weights}')\"` (or fetch {weights.url}) and copy the file there, "
            "or point TORCH_HOME at a cache that has it"
        )
    return path


def build(name: str, weights: Any) -> nn.Module:
    """``get_model(name, weights=...)``, with torch.hub's load of the file made tensors-only."""
    try:
        with tensors_only_loads(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torchvision.models.get_model(name, weights=weights)
    except Exception as error:  # unpickling, shapes, a damaged file: all mean the file is unusable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load weights {type(weights).__name__}.{weights.name} of torchvision:{name} "
            f"from {weights_file(weights)}: {reason}"
        ) from error
