"""Reading one stored map, whichever layout wrote it: the one place readers fetch map bytes.

In the files layout a heatmap row's ``object_key`` and ``raw_key`` are whole objects; in the
packed layout they name the shard's tar and the row holds each member's byte range, fetched
with one ranged read (an S3 ``Range`` GET, a file seek), so a gallery thumbnail costs one
small request either way (workers/packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from workers.heatmap_io import decode_npy, decode_png_gray
from workers.storage import Storage

__all__ = ["MapRef", "StoredMap", "map_bytes", "raw_bytes", "read_map_png", "read_map_raw"]


class StoredMap(Protocol):
    """What a reader needs of a heatmap row (an ORM ``Heatmap`` or any row with these fields)."""

    object_key: str
    raw_key: str
    object_offset: int | None
    object_length: int | None
    raw_offset: int | None
    raw_length: int | None


@dataclass(frozen=True)
class MapRef:
    """Where one map's bytes are, apart from its row: for readers that select columns, not rows."""

    object_key: str
    raw_key: str
    object_offset: int | None = None
    object_length: int | None = None
    raw_offset: int | None = None
    raw_length: int | None = None

    @classmethod
    def of(cls, heatmap: StoredMap) -> MapRef:
        return cls(
            heatmap.object_key,
            heatmap.raw_key,
            heatmap.object_offset,
            heatmap.object_length,
            heatmap.raw_offset,
            heatmap.raw_length,
        )


def _read(storage: Storage, key: str, offset: Any, length: Any) -> bytes:
    if offset is None and length is None:
        return storage.get(key)
    if offset is None or length is None:
        raise ValueError(
            f"a stored map in {key!r} has a byte offset or a length but not both; its row is damaged"
        )
    return storage.get_range(key, int(offset), int(length))


def map_bytes(storage: Storage, heatmap: StoredMap) -> bytes:
    """The PNG of the normalised map, as stored."""
    return _read(storage, heatmap.object_key, heatmap.object_offset, heatmap.object_length)


def raw_bytes(storage: Storage, heatmap: StoredMap) -> bytes:
    """The ``.npy`` of the raw float16 map, as stored."""
    return _read(storage, heatmap.raw_key, heatmap.raw_offset, heatmap.raw_length)


def read_map_png(storage: Storage, heatmap: StoredMap) -> np.ndarray:
    """The normalised map as uint8 [H, W]; ValueError when the bytes are not such a PNG."""
    return decode_png_gray(map_bytes(storage, heatmap))


def read_map_raw(storage: Storage, heatmap: StoredMap) -> np.ndarray:
    """The raw map as stored (float16 [h, w]); ValueError when the bytes are not an npy array."""
    return decode_npy(raw_bytes(storage, heatmap))
