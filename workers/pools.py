"""How many threads each stage of a shard gets: fetching, decoding, encoding, uploading.

On a GPU worker these threads use cores the device does not need; on a CPU worker they share
the model's cores, so more of them than cores only adds switching. Decoding and PNG work are
CPU-bound (libjpeg, zlib and Pillow release the GIL) and follow the core count. Reading sources
and uploading results wait on round trips: with S3 many stay in flight whatever the cores (one
20 ms read per image caps a single thread at 50 images/s), and they get pools of their own so
that no decode thread sits waiting on the network. Rows are built on one thread beside the
one feeding the model: more of them only contend for the interpreter lock (measured on a 16-core
GPU host: 413 images/s with one, 377 with four), but a run whose row work is mostly NumPy can
set more. Several worker processes on one machine (``camaudit worker --concurrency``) each size
their pools to their share of the cores. A number in the settings always wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from schema.settings import Settings

REMOTE_CONNECTIONS = 32


@dataclass(frozen=True)
class PoolSizes:
    fetch: int
    decode: int
    encode: int
    upload: int
    rows: int = 1


def pool_sizes(
    settings: Settings, *, remote_storage: bool, remote_sources: bool = False, cpus: int | None = None
) -> PoolSizes:
    cores = max(1, (cpus if cpus is not None else (os.cpu_count() or 1)) // settings.worker_processes)
    return PoolSizes(
        fetch=settings.fetch_workers or (REMOTE_CONNECTIONS if remote_sources else cores),
        decode=settings.decode_workers or cores,
        encode=settings.encode_workers or cores,
        upload=settings.upload_workers or (REMOTE_CONNECTIONS if remote_storage else cores),
        rows=settings.row_workers or 1,
    )
