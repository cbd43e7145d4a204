"""Forked worker children and CUDA.

Celery's prefork pool forks its children from the parent process. CUDA cannot be used in a
child forked from a process that had initialised it, and one ``torch.cuda.is_available()``
in the parent used to be enough (it initialised the driver). With
``PYTORCH_NVML_BASED_CUDA_CHECK=1`` that check asks NVML instead and leaves CUDA alone; set
for every process that imports the Celery app. A child that is nonetheless poisoned would fail
every shard with the same error, so it stops at once, loudly, instead.
"""

from __future__ import annotations

import os

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def use_nvml_cuda_check() -> None:
    """Make ``torch.cuda.is_available()`` ask NVML, so the check never initialises CUDA."""
    os.environ.setdefault(NVML_CHECK, "1")


class PoisonedForkError(RuntimeError):
    pass


def check_child_can_use_cuda(device: str) -> None:
    """Raise when this forked child cannot use CUDA because its parent had initialised it."""
    if device == "cpu":
        return
    import torch

    if torch.cuda._is_in_bad_fork():
        raise PoisonedForkError(
            "this worker process was forked from a parent that had initialised CUDA, so it cannot "
            f"use the GPU (device setting {device!r}); nothing in the worker's parent may touch CUDA "
            f"before the pool forks (keep {NVML_CHECK}=1 set, and call torch.cuda only in tasks), "
            "or run with --pool solo / device cpu"
        )
