"""Dataset sources: what items a run covers, listed before any work starts.

Listing never opens an image: a missing or corrupt file is still an item, so that it is
recorded as failed with its reason instead of silently vanishing from the audit.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from workers.fetch import s3_client

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".dcm", ".dicom"}
)


class SourceError(ValueError):
    """The source cannot be listed; raised before a run is created."""


@dataclass(frozen=True)
class SourceItem:
    uri: str
    label: str | None = None
    box: list[float] | None = None
    group_id: str | None = None


def _resolve(uri: str, base: Path) -> str:
    if uri.startswith("s3://") or uri.startswith("file://"):
        return uri
    path = Path(uri)
    return str(path if path.is_absolute() else (base / path).resolve())


def _manifest_row(row: dict[str, object], base: Path, where: str) -> SourceItem:
    uri = row.get("uri") or row.get("path")
    if not uri or not isinstance(uri, str):
        raise SourceError(f"{where}: each row needs a 'uri' (a path or s3:// object), got {row!r}")
    box = row.get("box")
    if isinstance(box, str):
        box = json.loads(box) if box.strip() else None
    if box is not None and (not isinstance(box, list) or len(box) != 4):
        raise SourceError(f"{where}: 'box' must be [x0, y0, x1, y1], got {box!r}")
    label = row.get("label")
    group = row.get("group_id") or row.get("group")
    return SourceItem(
        uri=_resolve(uri, base),
        label=str(label) if label not in (None, "") else None,
        box=[float(v) for v in box] if box else None,
        group_id=str(group) if group not in (None, "") else None,
    )


def read_manifest(path: Path) -> list[SourceItem]:
    """JSONL (one object per line) or CSV with a header; columns uri, label, box, group_id."""
    base = path.parent.resolve()
    items: list[SourceItem] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            items.append(_manifest_row(row, base, f"{path}:{n}"))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=2):
                items.append(_manifest_row(dict(row), base, f"{path}:{n}"))
    else:
        raise SourceError(f"manifest {path} must end in .jsonl or .csv")
    return items


def _list_folder(root: Path) -> list[SourceItem]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [SourceItem(uri=str(p.resolve())) for p in files]


def _list_s3(uri: str, endpoint_url: str | None, region: str | None) -> Iterator[SourceItem]:
    parsed = urlparse(uri)
    prefix = parsed.path.lstrip("/")
    paginator = s3_client(endpoint_url, region).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=parsed.netloc, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if Path(key).suffix.lower() in IMAGE_EXTENSIONS:
                yield SourceItem(uri=f"s3://{parsed.netloc}/{key}")


def list_source(
    source: str, *, endpoint_url: str | None = None, region: str | None = None
) -> list[SourceItem]:
    """A folder (recursive), a manifest (.jsonl/.csv) or an s3:// prefix."""
    if source.startswith("s3://"):
        try:
            items = list(_list_s3(source, endpoint_url, region))
        except Exception as exc:
            raise SourceError(f"cannot list {source}: {exc}") from exc
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(
                f"source {source} does not exist; give a folder, a .jsonl/.csv manifest or s3://"
            )
        items = _list_folder(path) if path.is_dir() else read_manifest(path)
    if not items:
        raise SourceError(
            f"source {source} holds no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return items
