"""Where heatmaps land: a local folder or an S3-compatible bucket, behind one small interface.

Workers write many small objects (a few KB each) and must never leave a half-written or
misplaced one behind, because object keys are deterministic and a retried shard overwrites
what an earlier attempt wrote. So every backend

* accepts only relative keys without ``.``/``..`` segments and never touches anything outside
  its root (the same key is valid on both backends, so a run can move between them);
* verifies each write (local: size after an atomic rename; S3: the MD5 sent with the request
  and the ETag that comes back) and reports transient failures as
  :class:`TransientStorageError`, which :class:`ConcurrentWriter` retries with backoff.

Uploads are latency-bound (one round trip per object), so :class:`ConcurrentWriter` keeps
many in flight from a bounded thread pool while bounding the bytes waiting in memory.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import difflib
import hashlib
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from workers.libc import libc_function

__all__ = [
    "ConcurrentWriter",
    "InvalidKeyError",
    "InvalidRangeError",
    "LocalStorage",
    "ObjectNotFoundError",
    "PutResult",
    "S3Storage",
    "Storage",
    "StorageError",
    "TransientStorageError",
    "UploadError",
    "check_key",
    "check_prefix",
    "open_storage",
]

logger = logging.getLogger(__name__)

DEFAULT_CONTENT_TYPE = "application/octet-stream"

# Temporary files of in-progress local writes start with this; keys may not, so a listing
# never confuses a half-written file with an object.
_PARTIAL_PREFIX = ".camaudit-partial-"


class StorageError(RuntimeError):
    """A storage operation failed; the message names the object and what to do about it."""


class TransientStorageError(StorageError):
    """A failure that may succeed when repeated: connection loss, timeout, throttling, 5xx."""


class ObjectNotFoundError(StorageError):
    """The key names no object."""


class InvalidKeyError(StorageError, ValueError):
    """A key or prefix that could escape the storage root or differs between backends."""


class InvalidRangeError(StorageError, ValueError):
    """A byte range that is empty, negative or reaches past the end of its object."""


class UploadError(StorageError):
    """Some uploads of a :class:`ConcurrentWriter` failed for good; ``failures`` maps key -> cause."""

    def __init__(self, message: str, failures: dict[str, BaseException]) -> None:
        super().__init__(message)
        self.failures = failures


@dataclass(frozen=True)
class PutResult:
    """What was stored: the key relative to the storage root and checks of its content."""

    key: str
    size: int
    sha256: str
    etag: str | None


@runtime_checkable
class Storage(Protocol):
    """A flat namespace of objects under one root, addressed by ``/``-separated keys."""

    url: str

    def put(
        self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE, *, sync: bool = True
    ) -> PutResult:
        """Store one object; ``sync=False`` may leave it volatile until :meth:`sync` is called."""
        ...

    def sync(self, keys: Iterable[str] = ()) -> None:
        """Make objects put with ``sync=False`` (``keys``, or everything so far) durable."""
        ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from byte ``offset``; all of them, or an error."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def locate(self, key: str) -> str: ...


# --------------------------------------------------------------------------- keys


def _check_segments(value: str, what: str, segments: list[str]) -> None:
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidKeyError(
                f"{what} {value!r} has an empty, '.' or '..' segment; use plain relative "
                "segments such as 'runs/42/gradcam/layer4/7/3.png'"
            )
        if segment.startswith(_PARTIAL_PREFIX):
            raise InvalidKeyError(
                f"{what} {value!r}: segments starting with {_PARTIAL_PREFIX!r} are reserved"
            )


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a str, got {type(value).__name__}")
    if value.startswith("/"):
        raise InvalidKeyError(f"{what} {value!r} is absolute; keys are relative to the storage root")
    if "\\" in value or "\x00" in value:
        raise InvalidKeyError(f"{what} {value!r} contains a backslash or NUL; use '/' between segments")
    return value


def check_key(key: str) -> str:
    """Validate an object key (``a/b/c.png``) and return it unchanged."""
    _check_text(key, "key")
    if not key:
        raise InvalidKeyError("key is empty; name an object such as 'runs/42/map.png'")
    if key.endswith("/"):
        raise InvalidKeyError(f"key {key!r} ends with '/'; that names a folder, not an object")
    _check_segments(key, "key", key.split("/"))
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: empty, a folder (``a/b/``) or the start of a key (``a/b``)."""
    _check_text(prefix, "prefix")
    if prefix:
        segments = prefix.split("/")
        if segments[-1] == "":
            segments.pop()  # a trailing slash marks a folder
        _check_segments(prefix, "prefix", segments)
    return prefix


def _folder_prefix(prefix: str) -> str:
    """Deletion works on whole folders so that 'runs/1' can never take 'runs/10' with it."""
    check_prefix(prefix)
    if not prefix.strip("/"):
        raise InvalidKeyError("refusing to delete the whole storage root; pass a folder such as 'runs/42/'")
    return prefix if prefix.endswith("/") else prefix + "/"


def _check_range(key: str, offset: int, length: int) -> None:
    if (
        isinstance(offset, bool)
        or isinstance(length, bool)
        or not isinstance(offset, int)
        or not isinstance(length, int)
    ):
        raise InvalidRangeError(f"byte range of {key!r} must be two integers, got {offset!r} and {length!r}")
    if offset < 0 or length < 1:
        raise InvalidRangeError(
            f"byte range of {key!r} starts at {offset} with length {length}; "
            "the offset must be >= 0 and the length >= 1"
        )


def _short_range(key: str, offset: int, length: int, got: int, size: int | None) -> InvalidRangeError:
    whole = f"the object has {size} bytes" if size is not None else f"only {got} bytes came back"
    return InvalidRangeError(
        f"byte range {offset}..{offset + length - 1} of {key!r} reaches past its end: {whole}; "
        "the row's offset and length do not match the stored object (rewritten or damaged?)"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- local folder


class LocalStorage:
    """Objects as files under a root folder, written atomically.

    A write goes to a temporary file in the target folder, is flushed to disk and then
    renamed over the key, so readers (and a crash) see either the old object or the new
    one, never a prefix of it.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, durable: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StorageError(f"storage folder {self.root} does not exist; create it or pass create=True")
        self.durable = durable
        self.url = self.root.as_uri()
        # Folders already made and checked to lie inside the root: one mkdir and realpath each.
        self._made: set[Path] = set()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(*check_key(key).split("/"))
        if path.parent in self._made:
            return path
        # A symlinked folder inside the root could otherwise lead a write outside it.
        parent = Path(os.path.realpath(path.parent))
        if parent != self.root and self.root not in parent.parents:
            raise InvalidKeyError(f"key {key!r} resolves to {parent}, outside the storage root {self.root}")
        return path

    def put(
        self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE, *, sync: bool = True
    ) -> PutResult:
        """Write atomically; with ``sync=False`` the flush to disk waits for :meth:`sync`.

        Deferring pays off when many small objects are written before one commit point: a
        single :meth:`sync` costs one ``syncfs`` instead of one ``fsync`` (a journal commit) each.
        """
        path = self._path(key)
        try:
            fd, tmp_name = self._open_partial(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.durable and sync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException as exc:
            Path(tmp_name).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc
            raise
        written = path.stat().st_size
        if written != len(data):
            raise TransientStorageError(f"wrote {len(data)} bytes to {key!r} but {written} are on disk")
        return PutResult(key=key, size=len(data), sha256=_sha256(data), etag=None)

    def sync(self, keys: Iterable[str] = ()) -> None:
        """Flush the files and renames of earlier ``sync=False`` puts to disk.

        One ``syncfs`` of the root's file system where the OS has it (Linux); elsewhere each
        named key's file and folder are fsynced.
        """
        if not self.durable:
            return
        try:
            if _syncfs(self.root):
                return
            folders: set[Path] = set()
            for key in keys:
                path = self._path(key)
                _fsync_path(path, os.O_RDONLY)
                folders.add(path.parent)
            for folder in folders:
                _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise TransientStorageError(f"cannot flush writes under {self.root} to disk: {exc}") from exc

    def _open_partial(self, folder: Path) -> tuple[int, str]:
        if folder in self._made:
            try:
                return tempfile.mkstemp(prefix=_PARTIAL_PREFIX, dir=folder)
            except FileNotFoundError:  # removed since (gc): make it again below
                self._made.discard(folder)
        folder.mkdir(parents=True, exist_ok=True)
        opened = tempfile.mkstemp(prefix=_PARTIAL_PREFIX, dir=folder)
        if len(self._made) >= _FOLDER_MEMORY:
            self._made.clear()
        self._made.add(folder)
        return opened

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} under {self.root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """One seek and one read: a member of a packed tar without reading the rest of it."""
        _check_range(key, offset, length)
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if offset + length > size:
                    raise _short_range(key, offset, length, 0, size)
                handle.seek(offset)
                data = handle.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} under {self.root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc
        if len(data) != length:  # shrunk while being read
            raise _short_range(key, offset, length, len(data), None)
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix`` (plain string match, like S3), in byte order."""
        check_prefix(prefix)
        folder, _, _ = prefix.rpartition("/")
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        real = Path(os.path.realpath(base))
        if real != self.root and self.root not in real.parents:
            raise InvalidKeyError(
                f"prefix {prefix!r} resolves to {real}, outside the storage root {self.root}"
            )
        return self._walk(base, prefix)

    def _walk(self, base: Path, prefix: str) -> Iterator[str]:
        keys: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(base):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            lead = "" if relative == "." else relative + "/"
            for name in filenames:
                if name.startswith(_PARTIAL_PREFIX):
                    continue
                key = lead + name
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort(key=lambda k: k.encode("utf-8"))
        yield from keys

    def delete_prefix(self, prefix: str) -> int:
        """Delete the folder ``prefix`` (a trailing ``/`` is implied) and return how many objects went."""
        folder = _folder_prefix(prefix)
        self._made.clear()
        count = 0
        for key in list(self.list(folder)):
            self._path(key).unlink(missing_ok=True)
            count += 1
        base = self.root.joinpath(*folder.rstrip("/").split("/"))
        if base.is_dir() and not base.is_symlink():
            for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only succeeds for folders left empty
        return count

    def locate(self, key: str) -> str:
        return str(self._path(key))


# Folders a LocalStorage remembers as made and checked before starting over.
_FOLDER_MEMORY = 4096


def _syncfs(folder: Path) -> bool:
    """``syncfs(2)`` on the file system holding ``folder``; False where the OS lacks it."""
    function = libc_function("syncfs", ctypes.c_int)
    if function is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        if function(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(folder))
    finally:
        os.close(fd)
    return True


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Error codes S3-compatible stores use for "slow down" or "try again"; 5xx statuses also retry.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout"}
    | {"InternalError", "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


# Below this size an upload is cheaper to send outright than to hold back for a
# "100 Continue" answer: that wait costs a whole extra round trip per object.
_EXPECT_CONTINUE_MIN_BYTES = 1 << 20


def _drop_expect_for_small_bodies(model: Any, params: dict[str, Any], **_kwargs: Any) -> None:
    """Remove botocore's ``Expect: 100-continue`` from small PutObject requests.

    botocore adds the header to every upload so a large body is not sent when the server
    would refuse it anyway. For heatmaps of a few KB the body costs less than the extra
    round trip, which otherwise halves the upload rate of each connection. It runs after
    botocore's own handler, which sits on the generic ``before-call.s3`` event.
    """
    if model.name != "PutObject":
        return
    body = params.get("body")
    headers = params.get("headers", {})
    if "Expect" not in headers:
        return
    size: int | None = None
    if isinstance(body, bytes | bytearray):
        size = len(body)
    elif hasattr(body, "seek") and hasattr(body, "tell"):
        position = body.tell()
        size = body.seek(0, os.SEEK_END) - position
        body.seek(position)
    if size is not None and size < _EXPECT_CONTINUE_MIN_BYTES:
        del headers["Expect"]


def _client_error_details(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Storage:
    """Objects in an S3-compatible bucket (AWS, MinIO, Ceph, moto) under an optional prefix.

    Credentials come from boto3's standard chain (environment, config files, instance role)
    and are never part of a message or ``repr``. The client's connection pool is sized for
    ``max_pool_connections`` concurrent requests; keep it at least as large as the number
    of upload threads, or connections are thrown away and re-opened.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = True,
        max_pool_connections: int = 64,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        verify: bool = True,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise StorageError(
                f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-', "
                "starting and ending with a letter or digit"
            )
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self._root = prefix + "/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.max_pool_connections = max_pool_connections
        self.verify = verify
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        config = Config(
            region_name=region,
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Third-party stores often lack virtual-host routing and the newer CRC checksums;
            # path-style requests with a Content-MD5 work everywhere.
            s3={"addressing_style": "path"} if endpoint_url else None,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._client.meta.events.register_last("before-call.s3", _drop_expect_for_small_bodies)
        self._ensure_bucket(create_bucket, region or self._client.meta.region_name)

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage({self.url!r}{where})"

    # -- errors ---------------------------------------------------------------

    def _error(self, exc: Exception, action: str, key: str | None = None) -> StorageError:
        """Translate a botocore failure into our error classes, naming the object."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            SSLError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        target = f"{self.url}/{key}" if key is not None else self.url
        if isinstance(exc, ClientError):
            code, status = _client_error_details(exc)
            message = f"{action} {target} failed: {code or status} ({exc})"
            if code in _NOT_FOUND_CODES and key is not None:
                return ObjectNotFoundError(f"no object {target}")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return TransientStorageError(message)
            if code == "NoSuchBucket":
                return StorageError(f"{message}; the bucket {self.bucket!r} does not exist (any more)")
            return StorageError(message)
        if isinstance(exc, SSLError):
            return StorageError(
                f"{action} {target} failed: TLS error ({exc}); check the endpoint's certificate"
            )
        if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
            return TransientStorageError(f"{action} {target} failed: {exc}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{action} {target} failed: {exc}")
        return StorageError(f"{action} {target} failed: {type(exc).__name__}: {exc}")

    def _ensure_bucket(self, create: bool, region: str | None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code, status = _client_error_details(exc)
            if status != 404 and code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error(exc, "checking bucket") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "checking bucket") from exc
        if not create:
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'the default S3 endpoint'}; "
                "create it first or open the storage with create_bucket=True"
            )
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
            logger.info("created bucket %s", self.bucket)
        except ClientError as exc:
            code, _ = _client_error_details(exc)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(exc, "creating bucket") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "creating bucket") from exc

    # -- objects --------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    def put(
        self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE, *, sync: bool = True
    ) -> PutResult:
        """Upload one object in a single request and check the store received exactly ``data``.

        A successful PUT is already durable, so ``sync`` changes nothing here.

        The Content-MD5 header makes the store reject a body damaged on the way; the ETag
        of a single-part upload is the MD5 of what was stored, which pins content and size.
        Stores whose ETags are not MD5s (SSE-KMS, some gateways) need ``verify=False``.
        """
        full_key = self._key(key)
        md5 = hashlib.md5(data, usedforsecurity=False)
        try:
            response = self._client.put_object(
                Bucket=self.bucket,
                Key=full_key,
                Body=data,
                ContentType=content_type,
                ContentMD5=base64.b64encode(md5.digest()).decode("ascii"),
            )
        except Exception as exc:
            raise self._error(exc, "uploading", key) from exc
        etag = str(response.get("ETag", "")).strip('"') or None
        if self.verify and etag is not None and etag != md5.hexdigest():
            raise TransientStorageError(
                f"uploaded {len(data)} bytes to {self.url}/{key} but the store reports ETag {etag}, "
                f"not their MD5 {md5.hexdigest()}; "
                "if this store's ETags are not MD5s, open it with verify=False"
            )
        return PutResult(key=key, size=len(data), sha256=_sha256(data), etag=etag)

    def sync(self, keys: Iterable[str] = ()) -> None:
        """Nothing to do: every PUT that returned is stored."""

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except InvalidKeyError:
            raise
        except Exception as exc:
            raise self._error(exc, "downloading", key) from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """One ``Range: bytes=a-b`` GET: a member of a packed tar for one round trip."""
        _check_range(key, offset, length)
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}"
            )
            data = response["Body"].read()
        except InvalidKeyError:
            raise
        except Exception as exc:
            code, _ = _client_error_details(exc)
            if code == "InvalidRange":
                raise _short_range(key, offset, length, 0, None) from exc
            raise self._error(exc, "downloading a range of", key) from exc
        if len(data) != length:
            total = str(response.get("ContentRange", "")).rpartition("/")[2]
            raise _short_range(key, offset, length, len(data), int(total) if total.isdigit() else None)
        return data

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full_key = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=full_key)
            return True
        except ClientError as exc:
            code, status = _client_error_details(exc)
            if status == 404 or code in _NOT_FOUND_CODES:
                return False
            raise self._error(exc, "checking", key) from exc
        except Exception as exc:
            raise self._error(exc, "checking", key) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix`` (relative to this storage's prefix), page by page."""
        check_prefix(prefix)
        return self._pages(prefix)

    def _pages(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self._root + prefix, PaginationConfig={"PageSize": 1000}
        )
        cut = len(self._root)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][cut:]
        except Exception as exc:
            raise self._error(exc, "listing", prefix) from exc

    def delete_prefix(self, prefix: str) -> int:
        """Delete the folder ``prefix`` (a trailing ``/`` is implied) and return how many objects went."""
        folder = _folder_prefix(prefix)
        count = 0
        batch: list[str] = []
        for key in self.list(folder):
            batch.append(key)
            if len(batch) == 1000:  # the most one DeleteObjects request accepts
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def _delete_batch(self, keys: list[str]) -> int:
        objects = [{"Key": self._root + key} for key in keys]
        try:
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
            )
        except Exception as exc:
            raise self._error(exc, "deleting", keys[0]) from exc
        errors = response.get("Errors", [])
        if errors:
            shown = ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in errors[:5])
            raise StorageError(
                f"could not delete {len(errors)} of {len(keys)} objects in {self.url}: {shown}"
            )
        return len(keys)

    def locate(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


# --------------------------------------------------------------------------- URLs

_SCHEMES = ("s3", "file")
_URL_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def open_storage(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    create_bucket: bool = True,
    max_pool_connections: int = 64,
) -> Storage:
    """Open ``s3://bucket/prefix`` as :class:`S3Storage`, ``file:///dir`` or a path as :class:`LocalStorage`.

    One URL setting then serves laptops (a folder) and clusters (a bucket) alike.
    """
    if not isinstance(url, str) or not url.strip():
        raise StorageError("storage URL is empty; use s3://bucket/prefix, file:///abs/dir or a folder path")
    url = url.strip()
    match = _URL_SCHEME_RE.match(url)
    if match is None:
        return LocalStorage(url)
    scheme = match.group(1).lower()
    if scheme not in _SCHEMES or not url[match.end() :].startswith("//"):
        close = difflib.get_close_matches(scheme, _SCHEMES, n=2, cutoff=0.3)
        hint = f" (did you mean {' or '.join(c + '://' for c in close)}?)" if close else ""
        raise StorageError(
            f"unsupported storage URL {url!r}{hint}; use s3://bucket/prefix, file:///abs/dir or a folder path"
        )
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise StorageError(f"storage URL {url!r} has a query or fragment; remove the part after '?' or '#'")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(
                f"file URL {url!r} names host {parts.netloc!r}; use file:///abs/dir for a local folder"
            )
        return LocalStorage(unquote(parts.path))
    if not parts.netloc:
        raise StorageError(f"S3 URL {url!r} has no bucket; use s3://bucket/prefix")
    return S3Storage(
        parts.netloc,
        unquote(parts.path),
        endpoint_url=endpoint_url,
        region=region,
        create_bucket=create_bucket,
        max_pool_connections=max_pool_connections,
    )


# --------------------------------------------------------------------------- concurrent writes

RetryCallback = Callable[[str, int, BaseException], None]


class ConcurrentWriter:
    """Upload many objects at once from a bounded thread pool, retrying transient failures.

    ``submit`` blocks once ``max_pending`` uploads are queued or running, so a fast producer
    cannot pile up unbounded heatmap bytes in memory. Each upload is tried up to
    ``retries + 1`` times; :class:`TransientStorageError` waits ``backoff * 2**n`` seconds
    (with jitter, at most ``max_backoff``) before the next try, any other error fails that
    key at once. ``flush`` and leaving the ``with`` block wait for everything and raise
    :class:`UploadError` naming every key that failed; with ``defer_sync`` (the default) the
    objects are written without a flush each and ``flush`` makes them durable with one
    ``storage.sync``, so what ``flush`` returns is on disk. ``on_retry(key, attempt, error)`` is
    called from the upload thread before each wait, for metrics or logs; an exception it
    raises fails that upload.
    """

    def __init__(
        self,
        storage: Storage,
        max_workers: int = 16,
        max_pending: int = 256,
        retries: int = 5,
        backoff: float = 0.2,
        *,
        max_backoff: float = 10.0,
        on_retry: RetryCallback | None = None,
        defer_sync: bool = True,
    ) -> None:
        if max_workers < 1 or max_pending < 1:
            raise ValueError(f"max_workers and max_pending must be >= 1, got {max_workers} and {max_pending}")
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"retries, backoff and max_backoff must be >= 0, got {retries}, {backoff}, {max_backoff}"
            )
        pool_size = getattr(storage, "max_pool_connections", None)
        if isinstance(pool_size, int) and pool_size < max_workers:
            logger.warning(
                "%r keeps %d connections but the writer runs %d uploads at once; "
                "open the storage with max_pool_connections >= %d",
                storage,
                pool_size,
                max_workers,
                max_workers,
            )
        self.storage = storage
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._on_retry = on_retry
        self._defer_sync = defer_sync
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="camaudit-upload")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Future[PutResult]]] = []
        self._results: list[PutResult] = []
        self._retried = 0
        self._closed = False

    @property
    def retried(self) -> int:
        """How many tries were repeated after a transient failure, over the writer's life."""
        with self._lock:
            return self._retried

    def submit(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Queue one upload; blocks while ``max_pending`` uploads are already in the queue."""
        if self._closed:
            raise StorageError(f"cannot submit {key!r}: this ConcurrentWriter is closed")
        check_key(key)
        self._slots.acquire()
        try:
            future = self._pool.submit(self._upload, key, bytes(data), content_type)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _f: self._slots.release())
        with self._lock:
            self._pending.append((key, future))

    def _upload(self, key: str, data: bytes, content_type: str) -> PutResult:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self.storage.put(key, data, content_type, sync=not self._defer_sync)
            except TransientStorageError as exc:
                if attempt == self.retries:
                    raise
                with self._lock:
                    self._retried += 1
                logger.info("retrying %s after try %d failed: %s", key, attempt + 1, exc)
                if self._on_retry is not None:
                    self._on_retry(key, attempt + 1, exc)
                # Jitter keeps threads that failed together from retrying in lockstep.
                time.sleep(random.uniform(0.5, 1.0) * min(delay, self.max_backoff))
                delay *= 2
        raise AssertionError("unreachable: the loop returns or raises")

    def flush(self) -> list[PutResult]:
        """Wait for every upload submitted so far; return all results in submission order.

        Failures are raised once, as one :class:`UploadError`; the results of the uploads that
        succeeded are still kept and returned by later calls and :meth:`results`.
        """
        with self._lock:
            batch, self._pending = self._pending, []
        wait([future for _key, future in batch])
        failures: dict[str, BaseException] = {}
        succeeded: list[PutResult] = []
        for key, future in batch:
            error = future.exception()
            if error is None:
                succeeded.append(future.result())
            else:
                failures[key] = error
        with self._lock:
            self._results.extend(succeeded)
            results = list(self._results)
        if self._defer_sync and succeeded:  # before any failure is raised: kept results are durable
            self.storage.sync([result.key for result in succeeded])
        if failures:
            raise UploadError(_describe_failures(failures, len(batch), self.retries + 1), failures)
        return results

    def results(self) -> list[PutResult]:
        """Results of the uploads collected by the last :meth:`flush` or by leaving the ``with`` block."""
        with self._lock:
            return list(self._results)

    def close(self) -> list[PutResult]:
        """Flush and stop the threads; the writer accepts nothing afterwards."""
        try:
            return self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ConcurrentWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # The block already failed: drop queued uploads, let running ones finish, keep its error.
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)


def _describe_failures(failures: dict[str, BaseException], total: int, tries: int) -> str:
    shown = list(failures.items())[:10]
    lines = "; ".join(f"{key}: {error}" for key, error in shown)
    more = f"; and {len(failures) - len(shown)} more" if len(failures) > len(shown) else ""
    return f"{len(failures)} of {total} uploads failed (up to {tries} tries each): {lines}{more}"
