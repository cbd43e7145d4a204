"""How many threads each stage of a shard gets: decoding, encoding, uploading.

On a GPU worker these threads use cores the device does not need; on a CPU worker they share
the model's cores, so more of them than cores only adds switching. Local writes and PNG work
are CPU-bound and follow the core count; S3 uploads wait on round trips, so many stay in
flight whatever the cores. A number in the settings always wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from schema.settings import Settings


@dataclass(frozen=True)
class PoolSizes:
    decode: int
    encode: int
    upload: int


def pool_sizes(settings: Settings, *, remote_storage: bool, cpus: int | None = None) -> PoolSizes:
    cores = max(1, cpus if cpus is not None else (os.cpu_count() or 1))
    return PoolSizes(
        decode=settings.decode_workers or min(4, cores),
        encode=settings.encode_workers or min(2, cores),
        upload=settings.upload_workers or (16 if remote_storage else min(4, cores)),
    )
