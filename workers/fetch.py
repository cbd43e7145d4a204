"""Read an item's bytes from wherever its URI points: a local path, a ``file://`` URI or an ``s3://`` object.

S3 URIs are split by hand, never by ``urllib.parse``: object keys may hold ``#``, ``?`` and ``%``,
which a URL parser would take for a fragment, a query or an escape and so read another object.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

_clients: dict[tuple[str | None, str | None], Any] = {}
_lock = threading.Lock()
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


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
        return body.read()
