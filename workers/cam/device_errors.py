"""Telling device failures apart from a model that cannot take an input.

The engine retries some forwards another way when they raise ``RuntimeError`` (contiguous
instead of channels-last input, N copies instead of a broadcast image). Out-of-memory and CUDA
errors are ``RuntimeError`` too, but retrying another way hides them: an out-of-memory would
switch channels-last off for good, and after a CUDA error the context is unusable, so every
later call fails as well. These must reach the caller, which can split the batch (memory) or
end the process (a CUDA error).
"""

from __future__ import annotations

import torch

_ACCELERATOR_ERROR: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(torch, "AcceleratorError", None),) if isinstance(cls, type)
)


def is_out_of_memory(exc: BaseException) -> bool:
    """The allocator could not serve a request: a smaller batch may fit."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def is_device_error(exc: BaseException) -> bool:
    """A CUDA (accelerator) error other than out-of-memory: the context may be unusable from now on."""
    if is_out_of_memory(exc):
        return False
    return isinstance(exc, _ACCELERATOR_ERROR) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


def is_device_failure(exc: BaseException) -> bool:
    return is_out_of_memory(exc) or is_device_error(exc)
