"""Autocast selection: one place decides which dtype the model forward runs in.

The CAM arithmetic never runs under autocast (the engine casts activations and gradients to
float32 first); only the model's own forward and masked forwards do.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from workers.cam.errors import CamConfigError

AmpSetting = Literal["bf16", "fp16"] | bool | None

_NAMED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def validate_amp(amp: object) -> None:
    """Reject a setting early, at engine construction, instead of on the first batch."""
    if amp is None or isinstance(amp, bool) or amp in _NAMED:
        return
    raise CamConfigError(
        f"unknown amp setting {amp!r}; use None (auto: bf16 on CUDA where supported, else fp16; "
        "off on CPU), 'bf16', 'fp16', True (on with the device's best dtype) or False (off)"
    )


def resolve_amp(amp: AmpSetting, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for this device, or None for a plain float32 forward."""
    validate_amp(amp)
    if amp is False:
        return None
    if isinstance(amp, str):
        return _NAMED[amp]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is True:
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """Autocast for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
