"""What a night can throw at a run: a killed worker, a restarted broker, an unreachable store.

Each test runs real `camaudit worker` processes against Redis, PostgreSQL and the S3 API,
breaks one of them in the middle of a run, and requires the run to finish with exactly one
row per (item, method, layer, class) and every object present.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from schema.db import session_scope
from schema.models import Run, Shard
from tests.checks import assert_run_complete
from tests.plugins.s3 import TcpProxy
from tests.plugins.services import WorkerProcess, wait_until
from tests.test_e2e_embedded import run_cli
from workers.storage import open_storage
from workers.synth import make_dataset

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", 24, seed=9)


def base_env(database: str, broker: str, storage: str, endpoint: str) -> dict[str, str]:
    return {
        "CAMAUDIT_DATABASE_URL": database,
        "CAMAUDIT_BROKER_URL": broker,
        "CAMAUDIT_STORAGE_URL": storage,
        "CAMAUDIT_S3_ENDPOINT_URL": endpoint,
    }


def start_run(dataset: Path, env: dict[str, str], methods: str, shard_size: int) -> str:
    proc = run_cli(
        "run",
        "--source",
        str(dataset),
        "--methods",
        methods,
        "--shard-size",
        str(shard_size),
        "--json",
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["run_id"])


def run_status(database_url: str, run_id: str) -> str:
    with session_scope(database_url) as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run.status


def running_shard(database_url: str, run_id: str) -> int | None:
    with session_scope(database_url) as s:
        return s.execute(
            select(Shard.id).where(Shard.run_id == run_id, Shard.status == "running")
        ).scalar_one_or_none()


@dataclass(frozen=True)
class RunState:
    """Where a run stood at one moment: its status and the status of each shard, by shard id."""

    status: str
    shards: dict[int, str]
    attempts: dict[int, int]

    def with_status(self, status: str) -> list[int]:
        return [shard_id for shard_id, s in self.shards.items() if s == status]


def run_state(database_url: str, run_id: str) -> RunState:
    with session_scope(database_url) as s:
        run = s.get(Run, run_id)
        assert run is not None
        rows = s.execute(select(Shard.id, Shard.status, Shard.attempts).where(Shard.run_id == run_id)).all()
        return RunState(run.status, {r.id: r.status for r in rows}, {r.id: r.attempts for r in rows})


def assert_mid_run(state: RunState, shard_id: int, fault: str) -> None:
    """The fault must land inside the run: that shard still running, and work still to do."""
    assert state.status == "running", f"the run was {state.status} when {fault}"
    assert state.shards[shard_id] == "running", f"shard {shard_id} was {state.shards[shard_id]} when {fault}"
    assert state.attempts[shard_id] == 1, "the shard should be on its first delivery when the fault hits"
    assert len(state.with_status("done")) < len(state.shards) - 1, f"the run was nearly over when {fault}"


def wait_finished(database_url: str, run_id: str, timeout: float = 300) -> None:
    def finished() -> bool:
        status = run_status(database_url, run_id)
        assert status not in ("failed", "partial"), status
        return status == "finished"

    wait_until(finished, timeout, f"run {run_id} to finish", interval=0.5)


def test_worker_killed_mid_shard_is_redelivered(
    dataset: Path,
    postgres_url: str,
    redis_url: str,
    s3_endpoint_url: str,
    s3_storage_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    env = base_env(postgres_url, redis_url, s3_storage_url, s3_endpoint_url)
    env |= {"CAMAUDIT_VISIBILITY_TIMEOUT_S": "5", "CAMAUDIT_UNACKED_RESTORE_INTERVAL_S": "1"}
    doomed = start_worker(env, name="doomed")
    # Score-CAM makes a 12-image shard take seconds, long enough to be killed inside it.
    run_id = start_run(dataset, env, "gradcam,scorecam", 12)
    shard_id = wait_until(lambda: running_shard(postgres_url, run_id), 120, "a shard to start")
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait()
    # Read after the kill: nothing can finish the shard now, so this is its state at the fault.
    at_kill = run_state(postgres_url, run_id)
    assert_mid_run(at_kill, shard_id, "the worker was killed")
    start_worker(env, name="survivor")
    wait_finished(postgres_url, run_id)
    assert_run_complete(postgres_url, run_id, open_storage(s3_storage_url, endpoint_url=s3_endpoint_url))
    with session_scope(postgres_url) as s:
        shard = s.get(Shard, shard_id)
        assert shard is not None and shard.status == "done" and shard.attempts >= 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private Redis with an append-only file, so a restart keeps the queue as a real one would."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run `make services`")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )

        def answers() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        wait_until(answers, 30, f"redis on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_restart_mid_run(
    dataset: Path,
    postgres_url: str,
    private_redis: RedisServer,
    s3_endpoint_url: str,
    s3_storage_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    env = base_env(postgres_url, private_redis.url, s3_storage_url, s3_endpoint_url)
    env |= {"CAMAUDIT_VISIBILITY_TIMEOUT_S": "10", "CAMAUDIT_UNACKED_RESTORE_INTERVAL_S": "1"}
    worker = start_worker(env, name="w1")
    run_id = start_run(dataset, env, "gradcam,scorecam", 6)
    shard_id = wait_until(lambda: running_shard(postgres_url, run_id), 120, "a shard to start")
    assert isinstance(shard_id, int)
    before_stop = run_state(postgres_url, run_id)
    private_redis.stop()
    # Both sides of the stop: the shard was running before Redis went away and is still running
    # once it is gone, so Redis stopped while the shard was in the worker's hands.
    at_stop = run_state(postgres_url, run_id)
    assert_mid_run(before_stop, shard_id, "Redis was about to stop")
    assert_mid_run(at_stop, shard_id, "Redis stopped")
    assert at_stop.with_status("pending"), "no shard was left waiting in the queue when Redis stopped"
    private_redis.start()
    wait_finished(postgres_url, run_id)
    assert worker.proc.poll() is None, worker.log()[-2000:]
    assert "connection to broker lost" in worker.log().lower(), "the worker never noticed Redis go away"
    assert_run_complete(postgres_url, run_id, open_storage(s3_storage_url, endpoint_url=s3_endpoint_url))


def test_unreachable_s3_delays_but_loses_nothing(
    dataset: Path,
    postgres_url: str,
    redis_url: str,
    s3_endpoint_url: str,
    s3_storage_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    host, port = s3_endpoint_url.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        env = base_env(postgres_url, redis_url, s3_storage_url, proxy.url)
        worker = start_worker(env, name="w1")
        # Score-CAM keeps each shard busy for seconds, so the outage lands inside the run.
        run_id = start_run(dataset, env, "gradcam,scorecam", 6)
        wait_until(lambda: running_shard(postgres_url, run_id), 120, "a shard to start")
        proxy.down()
        # The store stays away until the worker has visibly hit the outage and is retrying.
        wait_until(lambda: "retrying" in worker.log(), 120, "the worker to retry its uploads", interval=0.2)
        with session_scope(postgres_url) as s:
            done = s.execute(select(Shard.index).where(Shard.run_id == run_id, Shard.status == "done")).all()
        proxy.up()
        wait_finished(postgres_url, run_id)
    storage = open_storage(s3_storage_url, endpoint_url=s3_endpoint_url)
    assert_run_complete(postgres_url, run_id, storage)
    assert len(done) < 4, "the outage began after the run had finished"
