"""A real S3 API for tests: moto in server mode, in its own process, spoken to over HTTP.

In-process mocking would skip exactly what the storage code must get right (HTTP, the
connection pool, retries, pagination), so tests talk to a moto server over a socket. The
:class:`TcpProxy` sits between a client and that server when a test (or a benchmark) needs
the network to misbehave: added latency, or an endpoint that is down for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "MotoServer",
    "TcpProxy",
    "free_port",
    "s3_bucket",
    "s3_client",
    "s3_endpoint_url",
    "s3_storage_url",
]

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never reach for an instance-metadata service or a developer's own profile.
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it, so collisions are rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Talk to the local server directly even where the environment configures an HTTP proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _ExitedEarly(RuntimeError):
    pass


class MotoServer:
    """``python -m moto.server`` as a child process; ``start`` returns once it answers HTTP."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server, closed in close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (benchmarks read its CPU time)."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 60.0) -> str:
        """Start (or restart, on the same port) and wait until the server answers."""
        if self._process is not None and self._process.poll() is None:
            return self.url
        for _attempt in range(3):
            try:
                return self._start_once(timeout)
            except _ExitedEarly:
                if self._fixed_port:
                    raise
                self.port = free_port(self.host)  # another process took the port meanwhile
        raise RuntimeError(f"moto server did not start on three free ports:\n{self.log_tail()}")

    def _start_once(self, timeout: float) -> str:
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._answers():
                return self.url
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(timeout=0.1)  # also notices a server that died
                self._process = None
                raise _ExitedEarly(f"moto server on port {self.port} exited with {code}:\n{self.log_tail()}")
        self.stop()
        raise RuntimeError(f"moto server on port {self.port} did not answer within {timeout:.0f}s")

    def _answers(self) -> bool:
        try:
            with _DIRECT.open(self.url, timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False

    def log_tail(self, size: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-size:]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpProxy:
    """A TCP relay on 127.0.0.1 with optional one-way delay, that can be taken down and up.

    Each direction of each connection forwards chunks in order, each no earlier than
    ``one_way_delay_s`` after it arrived, so a request/response pair costs twice that in
    round-trip time without limiting bandwidth. ``down`` stops listening and cuts live
    connections, so clients see refused connections exactly as with a dead endpoint;
    ``up`` listens again on the same port.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        one_way_delay_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = one_way_delay_s
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._relays: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def start(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        self._call(self._listen())

    def down(self) -> None:
        self._call(self._close())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # Cut relays finish promptly (their sockets are gone); wait so none outlives the loop.
        await asyncio.gather(*self._relays, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        writers = (client_writer, upstream_writer)
        self._writers.update(writers)
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer),
                self._pipe(upstream_reader, client_writer),
            )
        finally:
            for writer in writers:
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while chunk := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + self.delay, chunk))
        except OSError:
            pass
        queue.put_nowait((loop.time() + self.delay, b""))
        with contextlib.suppress(OSError):
            await sender
        # Either side closing ends the relay; HTTP clients never half-close a keep-alive socket.
        writer.transport.abort()


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """URL of a moto S3 server shared by the session, with dummy credentials in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in DUMMY_AWS_ENV.items():
            patch.setenv(name, value)
        for name in _UNSET_AWS_ENV:
            patch.delenv(name, raising=False)
        config_dir = Path(tempfile.mkdtemp(prefix="camaudit-aws-"))
        patch.setenv("AWS_CONFIG_FILE", os.fspath(config_dir / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.fspath(config_dir / "credentials"))
        with MotoServer() as server:
            yield server.url


@pytest.fixture(scope="session")
def s3_client(s3_endpoint_url: str) -> Any:
    """A plain boto3 client of the test endpoint, for arranging and inspecting buckets directly."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    """A fresh, empty bucket for one test; removed afterwards (if the test left it)."""
    name = f"camaudit-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(s3_client.exceptions.NoSuchBucket):
        paginator = s3_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if objects:
                s3_client.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
        s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_storage_url(s3_bucket: str) -> str:
    """``s3://<fresh bucket>/out``: open it with ``endpoint_url=s3_endpoint_url``."""
    return f"s3://{s3_bucket}/out"
