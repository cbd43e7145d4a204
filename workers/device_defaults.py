"""Batch, shard and score-batch sizes that suit the device, for runs that do not set them.

A batch of 16 and shards of 256 images suit a CPU worker. On a GPU a batch of 16 leaves the
device mostly idle, and a shard of 256 resnet50 images is ~0.1 s of its work, comparable to a
shard's fixed costs (claim, model lookup, commit); there the defaults are 4x and 8x larger.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SizeDefaults:
    batch_size: int
    shard_size: int
    score_batch_size: int


CPU = SizeDefaults(batch_size=16, shard_size=256, score_batch_size=64)
CUDA = SizeDefaults(batch_size=64, shard_size=2048, score_batch_size=256)


def defaults_for(device: str) -> SizeDefaults:
    """Defaults for a device setting (``cpu``, ``cuda``, ``cuda:N`` or ``auto``).

    ``auto`` asks NVML whether a GPU is there, which does not initialise CUDA (a process that
    forks workers must not).
    """
    if device == "cpu":
        return CPU
    if device.startswith("cuda"):
        return CUDA
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return CUDA if torch.cuda.is_available() else CPU
