"""Where a shard's maps go: one object per map (``files``) or one tar per method and layer (``packed``).

Per-map objects cost four PUTs per image with two methods, and at a round trip each they are
what bounds a run that writes to S3. The packed layout writes a shard's maps of one method and
layer as a single tar in the WebDataset style (``tar tf`` lists ``<sample>.png`` and
``<sample>.npy`` per map, ``<sample>.jpg`` with overlays), which anyone can open without
camaudit and training loaders read as it is. Each heatmap row records where its members' bytes
lie in that object, so a reader fetches one map with a ranged read (``workers/map_reads.py``).

The tar is built in memory with fixed metadata and members in sorted order, so a retried shard
writes byte-identical content under the same key and the same rows.
"""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from schema.settings import LAYOUT_CHOICES, parse_layout
from workers.storage import ConcurrentWriter

__all__ = [
    "LAYOUTS",
    "OFFSET_COLUMNS",
    "FileMaps",
    "MapKeys",
    "MapWriter",
    "PackedMaps",
    "build_tar",
    "check_layout",
    "heatmap_key",
    "join_members",
    "map_writer",
    "packed_key",
    "sample_key",
    "tar_member",
]

LAYOUTS = LAYOUT_CHOICES
# A heatmap row's byte ranges of its PNG and npy inside ``object_key``; NULL in the files layout.
OFFSET_COLUMNS = ("object_offset", "object_length", "raw_offset", "raw_length")
TAR_CONTENT_TYPE = "application/x-tar"


check_layout = parse_layout


def heatmap_key(run_id: str, method: str, layer: str, item_id: int, target: int, ext: str) -> str:
    """Files layout: deterministic, so a retried shard overwrites its own objects."""
    return f"runs/{run_id}/{method}/{layer}/{item_id}/{target}.{ext}"


def packed_key(run_id: str, method: str, layer: str, shard_index: int) -> str:
    """Packed layout: one tar per shard, method and layer, under the run's prefix (gc deletes it)."""
    return f"runs/{run_id}/packed/{method}/{layer}/shard-{shard_index:05d}.tar"


def sample_key(item_id: int, target: int) -> str:
    """A map's WebDataset sample key: no dot, since a loader splits the member name at the first one."""
    return f"{item_id}_{target}"


def _member_order(name: str) -> tuple[str, str]:
    sample, _, ext = name.partition(".")
    return sample, ext


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_SIZE_FIELD = slice(124, 136)
_CHECKSUM_FIELD = slice(148, 156)
# tarfile's own header for an empty name and size, with the checksum field blank (eight spaces)
_BLANK_HEADER = bytearray(_tar_info("", 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
_BLANK_HEADER[_CHECKSUM_FIELD] = b" " * 8


def tar_member(name: str, data: bytes) -> bytes:
    """One member as it lies in the tar: its USTAR header, its data and the padding to a block.

    The same bytes as :mod:`tarfile` writes for the metadata of :func:`build_tar`, without its
    per-field encoding (a tenth of the time): a short ASCII name and the size are the only fields
    that differ between members. Anything else (a long or non-ASCII name) goes through tarfile.
    """
    encoded = name.encode("ascii") if name.isascii() else b""
    if encoded and len(encoded) <= 100 and len(data) < 8**11:
        header = bytearray(_BLANK_HEADER)
        header[: len(encoded)] = encoded
        header[_SIZE_FIELD] = b"%011o\0" % len(data)
        header[_CHECKSUM_FIELD] = b"%06o\0 " % sum(header)
    else:
        info = _tar_info(name, len(data))
        header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    padding = -len(data) % tarfile.BLOCKSIZE
    return b"".join((header, data, b"\0" * padding))


def join_members(blocks: Mapping[str, bytes]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The tar of members already laid out by :func:`tar_member`, and each one's (data offset, length).

    Members go in sample order (one sample's files next to each other, as WebDataset wants); the
    end is tarfile's: two zero blocks, then zeros up to a whole record.
    """
    spans: dict[str, tuple[int, int]] = {}
    parts = []
    offset = 0
    for name in sorted(blocks, key=_member_order):
        block = blocks[name]
        parts.append(block)
        spans[name] = (offset + tarfile.BLOCKSIZE, int(block[_SIZE_FIELD][:11], 8))
        offset += len(block)
    end = offset + 2 * tarfile.BLOCKSIZE
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
    return b"".join(parts), spans


def build_tar(members: Mapping[str, bytes]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A POSIX tar of ``members`` and each member's (data offset, length) in it.

    Members go in sample order (one sample's files next to each other, as WebDataset wants)
    with a zero mtime, owner and group and mode 0644: the same members give the same bytes.
    """
    return join_members({name: tar_member(name, data) for name, data in members.items()})


@dataclass(frozen=True)
class MapKeys:
    """The keys of one batch's maps of one method and layer.

    ``rows[n]``: what heatmap row ``n`` records as its PNG and npy objects; ``names[n]``: the
    names its encoder task writes the PNG and npy under (an overlay takes the PNG's name with
    ``.jpg``); ``sink``: where it writes them.
    """

    rows: list[tuple[str, str]]
    names: list[tuple[str, str]]
    sink: Sink


class Sink(Protocol):
    def submit(self, key: str, data: bytes, content_type: str = ...) -> None: ...


class MapWriter(Protocol):
    """A storage layout: names a shard's maps, takes their bytes, fills in the rows at the end."""

    writer: ConcurrentWriter

    def keys(self, method: str, layer: str, item_ids: list[int], targets: list[int]) -> MapKeys: ...

    def finish(self, heatmaps: list[dict[str, Any]]) -> None:
        """After every encoder task: write what is still held and complete the heatmap rows."""
        ...


class FileMaps:
    """One object per map, uploaded as soon as it is encoded."""

    def __init__(self, writer: ConcurrentWriter, run_id: str) -> None:
        self.writer = writer
        self._run_id = run_id

    def keys(self, method: str, layer: str, item_ids: list[int], targets: list[int]) -> MapKeys:
        keys = [
            (
                heatmap_key(self._run_id, method, layer, item_id, target, "png"),
                heatmap_key(self._run_id, method, layer, item_id, target, "npy"),
            )
            for item_id, target in zip(item_ids, targets, strict=True)
        ]
        return MapKeys(rows=keys, names=keys, sink=self.writer)

    def finish(self, heatmaps: list[dict[str, Any]]) -> None:
        """Everything is uploaded already; the rows keep NULL byte ranges (whole objects)."""


class _Members:
    """The members of one tar, written to from several encoder threads.

    Each member is laid out (header, data, padding) by the encoder thread that submits it, so
    that the shard's end only has to put them in order.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self.blocks: dict[str, bytes] = {}
        self._lock = lock

    def submit(self, key: str, data: bytes, content_type: str = "") -> None:
        block = tar_member(key, bytes(data))
        with self._lock:
            self.blocks[key] = block


class PackedMaps:
    """One tar per method and layer of the shard, uploaded once every map is encoded."""

    def __init__(self, writer: ConcurrentWriter, run_id: str, shard_index: int) -> None:
        self.writer = writer
        self._run_id = run_id
        self._shard_index = shard_index
        self._lock = threading.Lock()
        self._tars: dict[str, _Members] = {}

    def keys(self, method: str, layer: str, item_ids: list[int], targets: list[int]) -> MapKeys:
        key = packed_key(self._run_id, method, layer, self._shard_index)
        with self._lock:
            members = self._tars.setdefault(key, _Members(self._lock))
        samples = [sample_key(item_id, target) for item_id, target in zip(item_ids, targets, strict=True)]
        return MapKeys(
            rows=[(key, key)] * len(samples),
            names=[(f"{s}.png", f"{s}.npy") for s in samples],
            sink=members,
        )

    def finish(self, heatmaps: list[dict[str, Any]]) -> None:
        spans: dict[str, dict[str, tuple[int, int]]] = {}
        for key in sorted(self._tars):
            data, spans[key] = join_members(self._tars.pop(key).blocks)
            self.writer.submit(key, data, TAR_CONTENT_TYPE)
        for row in heatmaps:
            sample = sample_key(row["item_id"], row["target_class"])
            try:
                png = spans[row["object_key"]][f"{sample}.png"]
                raw = spans[row["raw_key"]][f"{sample}.npy"]
            except KeyError as exc:  # a row whose encoder task never wrote: never commit it
                raise RuntimeError(f"map {sample} of {row['object_key']} was not packed") from exc
            row["object_offset"], row["object_length"] = png
            row["raw_offset"], row["raw_length"] = raw


def map_writer(layout: str, writer: ConcurrentWriter, run_id: str, shard_index: int) -> MapWriter:
    """The shard's layout, recorded on its run (``runs.config["layout"]``)."""
    if check_layout(layout) == "packed":
        return PackedMaps(writer, run_id, shard_index)
    return FileMaps(writer, run_id)
