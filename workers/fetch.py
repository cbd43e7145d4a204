"""Read an item's bytes from wherever its URI points: a local path or an ``s3://`` object."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config

_clients: dict[tuple[str | None, str | None], Any] = {}
_lock = threading.Lock()


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


def read_bytes(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        client = s3_client(endpoint_url, region)
        return client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    return path.read_bytes()
