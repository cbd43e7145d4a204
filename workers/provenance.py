"""How a shard's numbers were computed: device, autocast dtype, TF32 flags, torch and cuDNN.

A run can mix shards from CPU workers (float32) and GPU workers (bf16, TF32 convolutions); their
maps differ slightly for reasons that have nothing to do with the model. Stored per shard, so
drift can tell a precision or device change from a model change.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.cam.precision import resolve_amp


def shard_provenance(device: torch.device, amp: str | bool | None) -> dict[str, Any]:
    """Column values for the ``shards`` row; TF32 flags and cuDNN only where they apply (CUDA)."""
    dtype = resolve_amp(amp, device)  # type: ignore[arg-type]
    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {
        "device_type": device.type,
        "autocast_dtype": str(dtype or torch.float32).removeprefix("torch."),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        "torch_version": torch.__version__,
        "cudnn_version": str(cudnn) if cudnn is not None else None,
    }


def precision_label(device_type: str | None, autocast_dtype: str | None) -> str:
    return f"{device_type or '?'}/{autocast_dtype or '?'}"
