"""Read an item's bytes from wherever its URI points: a local path, a ``file://`` URI or an ``s3://`` object.

A manifest is untrusted: a row may name any path. Items are therefore read with
:func:`read_source`, which reads a local file only when its real path (symlinks resolved) lies
under one of the run's source roots (the source folder or the manifest's folder, plus
``CAMAUDIT_SOURCE_ROOTS``), only when it is a regular file (never a FIFO, a device or a
folder), and never more than a byte cap (``CAMAUDIT_MAX_SOURCE_BYTES``), checked before reading.
A run whose source is on S3 reads only S3 objects.

S3 URIs are split by hand, never by ``urllib.parse``: object keys may hold ``#``, ``?`` and ``%``,
which a URL parser would take for a fragment, a query or an escape and so read another object.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

_clients: dict[tuple[str | None, str | None], Any] = {}
_lock = threading.Lock()
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
DEFAULT_MAX_SOURCE_BYTES = 256 * 1024 * 1024
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


# What an O_NOFOLLOW open of a symlink fails with: ELOOP on Linux and macOS, EMLINK on FreeBSD.
_FINAL_SYMLINK = frozenset({errno.ELOOP, errno.EMLINK})


class SourceRefused(ValueError):
    """An item's URI may not be read (outside the roots, not a regular file, too large): the item fails."""


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """One client per endpoint: boto3 clients are thread-safe and expensive to build."""
    key = (endpoint_url, region)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
            )
            _clients[key] = client
        return client


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``); the key is taken verbatim, maybe empty."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}; expected s3://bucket/key")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} names no bucket; expected s3://bucket/key")
    return bucket, key


def local_path(uri: str) -> Path:
    """A plain path, or the path of a ``file://`` URI (percent-escapes decoded, host empty or localhost)."""
    if not uri.startswith("file:"):
        return Path(uri).expanduser()
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names host {parsed.netloc!r}; only local files can be read")
    return Path(unquote(parsed.path))


def read_bytes(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    """The whole object; a missing S3 object raises ``FileNotFoundError`` like a missing file."""
    if not uri.startswith("s3://"):
        return local_path(uri).read_bytes()
    return _read_s3(uri, None, endpoint_url, region)


def split_roots(value: str | Iterable[str] | None) -> list[str]:
    """``CAMAUDIT_SOURCE_ROOTS``: folders separated by ``os.pathsep`` (``:``), or a list of them."""
    if value is None:
        return []
    parts = value.split(os.pathsep) if isinstance(value, str) else list(value)
    return [part.strip() for part in parts if part and part.strip()]


def allowed_roots(source: str, extra: str | Iterable[str] | None = None) -> list[str]:
    """The real folders a run's local items may lie in: the source folder, or the manifest's folder.

    ``extra`` (``CAMAUDIT_SOURCE_ROOTS``) adds folders for manifests that name images elsewhere.
    A source on S3 (a prefix or an ``s3://`` manifest) names only objects: no folder at all.
    """
    if source.startswith("s3://"):
        return []
    path = local_path(source)
    roots = [path if path.is_dir() else path.parent]
    roots += [Path(root).expanduser() for root in split_roots(extra)]
    return list(dict.fromkeys(os.path.realpath(root) for root in roots))


def run_roots(config: Mapping[str, Any], source_uri: str, extra: str | Iterable[str] | None) -> list[str]:
    """The roots recorded on a run at planning; runs planned before roots existed derive them again."""
    recorded = config.get("source_roots")
    if isinstance(recorded, list) and all(isinstance(root, str) for root in recorded):
        return recorded
    return allowed_roots(source_uri, extra)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_source(
    uri: str,
    *,
    roots: Sequence[str],
    max_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
    endpoint_url: str | None = None,
    region: str | None = None,
    local: LocalSources | None = None,
) -> bytes:
    """An item's bytes, read only within ``roots`` and ``max_bytes``; otherwise :class:`SourceRefused`.

    ``local``: the :class:`LocalSources` of the same roots, kept across the reads of a shard.
    """
    if uri.startswith("s3://"):
        return _read_s3(uri, max_bytes, endpoint_url, region)
    if not roots:
        raise SourceRefused(
            "a local path in a run whose source is on S3: an s3:// source or manifest "
            "names only s3:// objects"
        )
    return (local or LocalSources(roots)).read(uri, max_bytes)


class LocalSources:
    """Local files read within a set of roots, each root and each folder resolved once.

    A file's real path is its folder's real path and its name: resolving the whole path
    (``os.path.realpath``, one ``lstat`` per component, in Python) for every file of a shard
    cost four times the read itself. A name that is itself a symlink is refused by the
    ``O_NOFOLLOW`` open and resolved in full, so it is read exactly when its target lies within
    the roots, as before. Folders are resolved once per instance: a shard keeps one.
    """

    _MAX_FOLDERS = 4096

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = list(roots)
        self._real_roots = [os.path.realpath(root) for root in roots]
        self._folders: dict[str, str] = {}

    def read(self, uri: str, max_bytes: int) -> bytes:
        path = os.path.expanduser(uri) if not uri.startswith("file:") else os.fspath(local_path(uri))
        real = self._checked(self._real_path(path))
        try:
            return read_regular_file(real, max_bytes)
        except OSError as exc:
            if exc.errno not in _FINAL_SYMLINK:
                raise
        return read_regular_file(self._checked(os.path.realpath(path)), max_bytes)

    def _real_path(self, path: str) -> str:
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = os.path.realpath(folder)
            if len(self._folders) < self._MAX_FOLDERS:
                self._folders[folder] = real_folder
        return os.path.join(real_folder, name)

    def _checked(self, real: str) -> str:
        if not any(_inside(real, root) for root in self._real_roots):
            raise SourceRefused(
                f"the path lies outside the folders this run may read ({', '.join(self.roots)}); a manifest "
                "names files below its own folder or the source folder, or below a folder in "
                "CAMAUDIT_SOURCE_ROOTS"
            )
        return real


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """A regular file's bytes, refused before reading when it is something else or over ``max_bytes``.

    Opened without blocking (a FIFO with no writer would hang a plain ``open``) and without
    following a final symlink, then checked with ``fstat`` on the open descriptor; a regular
    file ignores ``O_NONBLOCK``, so it is read from the descriptor as it is.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
            raise SourceRefused(f"not an image file: the path is {kind}; only regular files are read")
        _check_size(info.st_size, max_bytes)
        # Asking for the size, not the cap: a read of n bytes reserves n bytes first.
        wanted = min(info.st_size, max_bytes) + 1
        chunks: list[bytes] = []
        got = 0
        while got < wanted:
            chunk = os.read(fd, wanted - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    _check_size(len(data), max_bytes, at_least=True)  # the file grew after fstat
    return data


def _check_size(size: int, max_bytes: int, *, at_least: bool = False) -> None:
    if size > max_bytes:
        amount = f"more than {max_bytes:,}" if at_least else f"{size:,}"
        raise SourceRefused(
            f"the file has {amount} bytes, over the limit of {max_bytes:,} bytes (CAMAUDIT_MAX_SOURCE_BYTES)"
        )


def _read_s3(uri: str, max_bytes: int | None, endpoint_url: str | None, region: str | None) -> bytes:
    """An object's bytes (at most ``max_bytes``, else :class:`SourceRefused`; None: no cap).

    A missing object or bucket raises ``FileNotFoundError``, like a missing file.
    """
    bucket, key = split_s3_uri(uri)
    if not key:
        raise ValueError(f"S3 URI {uri!r} names a bucket but no object key")
    try:
        response = s3_client(endpoint_url, region).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_CODES:
            raise FileNotFoundError(f"no object {uri}") from exc
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"no bucket {bucket!r} for {uri}") from exc
        raise
    with response["Body"] as body:
        if max_bytes is None:
            return body.read()
        length = int(response.get("ContentLength") or 0)
        _check_size(length, max_bytes)
        data = body.read(min(length, max_bytes) + 1 if length else max_bytes + 1)
    _check_size(len(data), max_bytes, at_least=True)
    return data
