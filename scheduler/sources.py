"""Dataset sources: what items a run covers, listed before any work starts.

Listing never decodes an image: a missing or corrupt file is still an item, so that it is
recorded as failed with its reason instead of silently vanishing from the audit.

Sources are a folder (recursive), a manifest (JSON Lines or CSV, local or on S3) or an
``s3://bucket/prefix`` folder. Folders and prefixes list in sorted order and skip hidden
entries (any name starting with ``.``, such as ``.git`` or macOS ``._`` files), so one
dataset always yields the same items in the same order, whether on disk or uploaded to S3.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from workers.fetch import local_path, read_bytes, s3_client, split_s3_uri

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".dcm", ".dicom"}
)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
MANIFEST_SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES
URI_FIELDS = ("uri", "path")
CORNER_FIELDS = ("x0", "y0", "x1", "y1")
GROUP_FIELDS = ("group_id", "group")
MANIFEST_FIELDS = (*URI_FIELDS, "label", "box", *CORNER_FIELDS, *GROUP_FIELDS, "view")
MAX_REPORTED_ERRORS = 20


class SourceError(ValueError):
    """The source cannot be listed; raised before a run is created."""


@dataclass(frozen=True)
class SourceItem:
    uri: str
    label: str | None = None
    box: list[float] | None = None  # [x0, y0, x1, y1] in source pixels
    group_id: str | None = None
    view: str | None = None  # the view's name within its group, e.g. L-CC


def list_source(
    source: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    extensions: Iterable[str] | None = None,
) -> list[SourceItem]:
    """A folder (recursive), a manifest (.jsonl/.csv, local or s3://) or an s3:// prefix.

    ``extensions`` (default ``IMAGE_EXTENSIONS``) filters folders and prefixes, not manifests,
    which list exactly what they name.
    """
    wanted = _extensions(extensions)
    if source.startswith("s3://"):
        bucket, key = _s3_parts(source)
        if key.lower().endswith(MANIFEST_SUFFIXES):
            items = read_manifest(source, endpoint_url=endpoint_url, region=region)
        else:
            items = _list_s3(bucket, key, wanted, source, endpoint_url, region)
    else:
        path = _local(source)
        if not path.exists():
            raise SourceError(
                f"source {source} does not exist; give a folder, a .jsonl/.csv manifest or s3://bucket/prefix"
            )
        if path.is_dir():
            items = _list_folder(path, wanted)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            items = read_manifest(path)
        else:
            raise SourceError(
                f"source {source} is a file but not a manifest; give its folder, or a manifest ending in "
                f"{', '.join(MANIFEST_SUFFIXES)}"
            )
    if not items:
        raise SourceError(f"source {source} holds no images (extensions: {', '.join(sorted(wanted))})")
    return items


# --- folders --------------------------------------------------------------------------------------


def _list_folder(root: Path, extensions: frozenset[str]) -> list[SourceItem]:
    root = root.resolve()
    sniff_dicom = ".dcm" in extensions
    found: list[str] = []

    def unreadable(exc: OSError) -> None:
        raise SourceError(f"cannot list folder {exc.filename}: {exc.strerror}; fix its permissions") from exc

    for folder, subfolders, files in os.walk(root, onerror=unreadable):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            path = os.path.join(folder, name)
            if suffix in extensions or (not suffix and sniff_dicom and _has_dicom_magic(path)):
                found.append(path)
    # By the path below the root, as S3 orders keys: the same dataset lists alike in both places.
    found.sort(key=lambda path: Path(path).relative_to(root).as_posix())
    return [SourceItem(uri=path) for path in found]


def _has_dicom_magic(path: str) -> bool:
    """PACS exports often name files ``IM0001``: recognise them by ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


# --- S3 prefixes ----------------------------------------------------------------------------------


def _s3_parts(source: str) -> tuple[str, str]:
    try:
        return split_s3_uri(source)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc


def _list_s3(
    bucket: str,
    key: str,
    extensions: frozenset[str],
    source: str,
    endpoint_url: str | None,
    region: str | None,
) -> list[SourceItem]:
    # A prefix names a folder: s3://b/images must not pick up s3://b/images-old/...
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    try:
        keys = sorted(_s3_keys(bucket, prefix, endpoint_url, region))
    except NoCredentialsError as exc:
        raise SourceError(
            f"cannot list {source}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        where = f" at {endpoint_url}" if endpoint_url else ""
        if code == "NoSuchBucket":
            raise SourceError(f"cannot list {source}: bucket {bucket!r} does not exist{where}") from exc
        if code in ("AccessDenied", "403"):
            raise SourceError(f"cannot list {source}: access denied to bucket {bucket!r}{where}") from exc
        raise SourceError(f"cannot list {source}: {code}: {exc}") from exc
    except BotoCoreError as exc:
        raise SourceError(f"cannot list {source}: {exc}") from exc
    items = []
    for object_key in keys:
        below = object_key[len(prefix) :]
        if any(part.startswith(".") for part in below.split("/")):
            continue
        if posixpath.splitext(object_key)[1].lower() in extensions:
            items.append(SourceItem(uri=f"s3://{bucket}/{object_key}"))
    return items


def _s3_keys(bucket: str, prefix: str, endpoint_url: str | None, region: str | None) -> Iterator[str]:
    paginator = s3_client(endpoint_url, region).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            yield obj["Key"]


# --- manifests ------------------------------------------------------------------------------------


def read_manifest(
    manifest: Path | str, *, endpoint_url: str | None = None, region: str | None = None
) -> list[SourceItem]:
    """JSON Lines (one object per line) or CSV with a header, on disk or on S3.

    Fields: ``uri`` (or ``path``): a path relative to the manifest's folder, an absolute path, a
    ``file://`` URI or an ``s3://`` object; ``label`` (in JSON Lines also a list of labels, for
    multi-label items; stored as a JSON list); ``box`` as ``[x0, y0, x1, y1]`` (in CSV a
    JSON string, or the four columns ``x0, y0, x1, y1``); ``group_id`` (or ``group``). Other
    fields are ignored, except ones that look like a misspelling of these. Every bad row is
    reported with its ``file:line``.
    """
    name = str(manifest)
    if name.startswith("s3://"):
        bucket, key = _s3_parts(name)
        base = f"s3://{bucket}/{posixpath.dirname(key)}"
        try:
            raw = read_bytes(name, endpoint_url=endpoint_url, region=region)
        except FileNotFoundError as exc:
            raise SourceError(f"manifest {name} does not exist") from exc
        except (ClientError, BotoCoreError) as exc:
            raise SourceError(f"cannot read manifest {name}: {exc}") from exc
    else:
        path = _local(name)
        base = str(path.resolve().parent)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SourceError(f"cannot read manifest {name}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"manifest {name} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    suffix = posixpath.splitext(name.lower())[1]
    if suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(text)
    elif suffix in CSV_SUFFIXES:
        rows = _csv_rows(text, name)
    else:
        raise SourceError(f"manifest {name} must end in one of {', '.join(MANIFEST_SUFFIXES)}")
    return _items(rows, base, name)


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, object] | str]]:
    """(line, row) or (line, error); split on newlines only: JSON strings may hold U+2028."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = " (a .json manifest holds one object per line, not an array)" if line[0] == "[" else ""
            yield number, f"not valid JSON: {exc.msg} at column {exc.colno}{hint}"
            continue
        yield number, row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, dict[str, object] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [column.strip().lower() for column in next(reader)]
    except StopIteration:
        raise SourceError(
            f"{name}:1: empty CSV; the first line must be a header with a 'uri' column"
        ) from None
    except csv.Error as exc:
        raise SourceError(f"{name}:1: unreadable CSV header: {exc}") from exc
    if not any(field in header for field in URI_FIELDS):
        raise SourceError(
            f"{name}:1: the header {header} has no 'uri' column{_did_you_mean(header, URI_FIELDS)}"
        )
    for column in header:
        close = _misspelt(column)
        if close:
            raise SourceError(f"{name}:1: unknown column {column!r}; did you mean {close!r}?")
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, f"unreadable CSV row: {exc}"
            continue
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            yield reader.line_num, f"row has {len(cells)} fields but the header has {len(header)}"
            continue
        yield reader.line_num, {column: cell.strip() for column, cell in zip(header, cells, strict=False)}


def _items(rows: Iterable[tuple[int, dict[str, object] | str]], base: str, name: str) -> list[SourceItem]:
    items: list[SourceItem] = []
    errors: list[str] = []
    for number, row in rows:
        try:
            if isinstance(row, str):
                raise SourceError(row)
            items.append(_item(row, base))
        except SourceError as exc:
            errors.append(f"{name}:{number}: {exc}")
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        tail = f"\n... and {more} more bad rows" if more else ""
        raise SourceError(f"{len(errors)} bad manifest rows:\n" + "\n".join(shown) + tail)
    return items


def _item(fields: dict[str, object], base: str) -> SourceItem:
    row = {str(key).strip().lower(): value for key, value in fields.items()}
    for key in row:
        close = _misspelt(key)
        if close:
            raise SourceError(f"unknown field {key!r}; did you mean {close!r}?")
    uri = next((row[field] for field in URI_FIELDS if _present(row.get(field))), None)
    if uri is None:
        empty = next((field for field in URI_FIELDS if field in row), None)
        if empty is not None:
            raise SourceError(f"{empty!r} is empty; give a path or an s3:// object")
        hint = _did_you_mean(list(row), URI_FIELDS) or f"; its fields are {sorted(row)}"
        raise SourceError(f"the row needs a 'uri' (a path or s3:// object){hint}")
    if not isinstance(uri, str):
        raise SourceError(f"'uri' must be a string, got {uri!r}")
    return SourceItem(
        uri=_resolve(uri.strip(), base),
        label=_label(row.get("label")),
        box=_box(row),
        group_id=_scalar(next((row[f] for f in GROUP_FIELDS if _present(row.get(f))), None), "group_id"),
        view=_scalar(row.get("view"), "view"),
    )


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _scalar(value: object, field: str) -> str | None:
    if not _present(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SourceError(f"{field!r} must be a string or a number, got {value!r}")
    return str(value).strip()


def _label(value: object) -> str | None:
    """One label, or a list of them (multi-label items), kept as a JSON list."""
    if not isinstance(value, list):
        return _scalar(value, "label")
    labels = [_scalar(one, "label") for one in value]
    if not labels or any(one is None for one in labels):
        raise SourceError(f"'label' lists need at least one non-empty string or number, got {value!r}")
    return json.dumps(labels)


def _box(row: dict[str, object]) -> list[float] | None:
    box = row.get("box")
    corners = [row.get(field) for field in CORNER_FIELDS]
    given = [_present(value) for value in corners]
    if _present(box) and any(given):
        raise SourceError("give either 'box' or the columns x0, y0, x1, y1, not both")
    if any(given):
        if not all(given):
            missing = [field for field, ok in zip(CORNER_FIELDS, given, strict=True) if not ok]
            raise SourceError(
                f"box columns {', '.join(missing)} are empty; give all four of x0, y0, x1, y1 or none"
            )
        box = corners
    elif not _present(box):
        return None
    if isinstance(box, str):
        try:
            box = json.loads(box)
        except json.JSONDecodeError as exc:
            raise SourceError(f"'box' is not a JSON list: {box!r} ({exc.msg})") from exc
    if not isinstance(box, list) or len(box) != 4:
        raise SourceError(f"'box' must be [x0, y0, x1, y1], got {box!r}")
    values = [_coordinate(value) for value in box]
    x0, y0, x1, y1 = values
    if not (x1 > x0 and y1 > y0):
        raise SourceError(
            f"box {values} has no area: corners [x0, y0, x1, y1] need x1 > x0 and y1 > y0 "
            "(a box given as [x, y, width, height] must be converted)"
        )
    return values


def _coordinate(value: object) -> float:
    if isinstance(value, bool):
        raise SourceError(f"box coordinates must be numbers, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SourceError(f"box coordinates must be numbers, got {value!r}") from None
    if not math.isfinite(number):
        raise SourceError(f"box coordinates must be finite, got {value!r}")
    return number


def _resolve(uri: str, base: str) -> str:
    """Relative URIs resolve against the manifest's folder: a local path, or an s3:// 'folder'."""
    if uri.startswith("s3://"):
        _s3_parts(uri)
        return uri
    scheme = uri.split(":", 1)[0] if "://" in uri else ""
    if scheme and scheme != "file":
        raise SourceError(f"unsupported URI scheme {scheme!r} in {uri!r}; use a path, file:// or s3://")
    path = _local(uri)
    if path.is_absolute():
        return os.path.normpath(path)
    if base.startswith("s3://"):
        bucket, key = split_s3_uri(base)
        joined = posixpath.normpath(posixpath.join("/", key, path.as_posix())).lstrip("/")
        return f"s3://{bucket}/{joined}"
    return os.path.normpath(os.path.join(base, path))


def _local(uri: str) -> Path:
    try:
        return local_path(uri)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc


def _extensions(extensions: Iterable[str] | None) -> frozenset[str]:
    if extensions is None:
        return IMAGE_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    wanted = frozenset("." + ext.lower().lstrip(".") for ext in extensions if ext.strip("."))
    if not wanted:
        raise SourceError(f"no file extensions given; for example {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return wanted


def _misspelt(field: str) -> str | None:
    """A known field this unknown one is probably meant to be ('lable' for 'label')."""
    if field in MANIFEST_FIELDS:
        return None
    close = difflib.get_close_matches(field, MANIFEST_FIELDS, n=1, cutoff=0.75)
    return close[0] if close else None


def _did_you_mean(fields: list[str], wanted: tuple[str, ...]) -> str:
    matches = [f for f in fields if f not in wanted and difflib.get_close_matches(f, wanted, n=1, cutoff=0.6)]
    return f" (did you mean {wanted[0]!r} for {', '.join(map(repr, matches))}?)" if matches else ""
