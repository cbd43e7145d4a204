"""What a night can throw at a run: a killed worker, a restarted broker, an unreachable store.

Each test runs real `camaudit worker` processes against Redis, PostgreSQL and the S3 API,
breaks one of them in the middle of a run, and requires the run to finish with exactly one
row per (item, method, layer, class) and every object present.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler.plan import plan_run
from schema.db import dispose_engines, session_scope
from schema.models import Run, Shard
from schema.payloads import RunSpec
from schema.settings import Settings
from tests.checks import assert_run_complete
from tests.plugins.s3 import TcpProxy
from tests.plugins.services import WorkerProcess, wait_until
from workers.celery_app import configure
from workers.storage import open_storage
from workers.synth import make_dataset
from workers.tasks import explain_shard_task

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", 24, seed=9)


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Celery's two mature brokers: Redis (restores unacked messages itself) and RabbitMQ."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


def base_env(database: str, broker: str, storage: str, endpoint: str) -> dict[str, str]:
    return {
        "CAMAUDIT_DATABASE_URL": database,
        "CAMAUDIT_BROKER_URL": broker,
        "CAMAUDIT_STORAGE_URL": storage,
        "CAMAUDIT_S3_ENDPOINT_URL": endpoint,
    }


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


# Leases short enough to keep the tests quick; the defaults recover in about a minute (bench/recovery.py).
LEASE_ENV = {
    "CAMAUDIT_LEASE_S": "3",
    "CAMAUDIT_HEARTBEAT_INTERVAL_S": "0.5",
    "CAMAUDIT_LEASE_SWEEP_INTERVAL_S": "0.5",
}


def shard_row(database_url: str, shard_id: int) -> Shard:
    with session_scope(database_url) as s:
        shard = s.get(Shard, shard_id)
        assert shard is not None
        s.expunge(shard)
        return shard


def plan_in_process(
    dataset: Path, env: dict[str, str], methods: str, shard_size: int
) -> tuple[str, list[int]]:
    """What `camaudit run` does with a broker, without paying for a second interpreter and model load."""
    settings = Settings(
        database_url=env["CAMAUDIT_DATABASE_URL"],
        broker_url=env["CAMAUDIT_BROKER_URL"],
        storage_url=env["CAMAUDIT_STORAGE_URL"],
        s3_endpoint_url=env["CAMAUDIT_S3_ENDPOINT_URL"],
    )
    spec = RunSpec(source=str(dataset), methods=methods.split(","), shard_size=shard_size, batch_size=2)
    planned = plan_run(spec, settings)
    # A connection of its own: the app's pool still points at the broker of an earlier test.
    app = configure(settings)
    with app.connection_for_write(settings.broker_url) as connection:
        for shard_id in planned.shard_ids:
            explain_shard_task.apply_async((planned.run_id, shard_id), connection=connection)
    return planned.run_id, planned.shard_ids


def holder(
    workers: list[WorkerProcess], database_url: str, shard_id: int, attempt: int
) -> WorkerProcess | None:
    """The live worker running this attempt of the shard, once it runs."""
    shard = shard_row(database_url, shard_id)
    if (shard.status, shard.attempts) != ("running", attempt):
        return None
    return next(w for w in workers if (shard.worker or "").startswith(f"{w.name}@"))


def kill_while_running(worker: WorkerProcess, database_url: str, shard_id: int, attempt: int) -> None:
    """SIGKILL the worker and its pool child, then check the kill really landed inside the shard."""
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    shard = shard_row(database_url, shard_id)
    assert (shard.status, shard.attempts) == ("running", attempt), "the shard was not running at the kill"
    assert (shard.worker or "").startswith(f"{worker.name}@"), shard.worker


def test_the_worker_of_the_same_shard_killed_twice_and_the_run_still_finishes(
    tmp_path: Path,
    postgres_url: str,
    broker_url: str,
    s3_endpoint_url: str,
    s3_storage_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    env = base_env(postgres_url, broker_url, s3_storage_url, s3_endpoint_url) | LEASE_ENV
    workers = [start_worker(env, name=name, ready=False) for name in ("w1", "w2")]
    for worker in workers:
        worker.wait_ready()
    # One shard, so whichever worker is idle takes it up again; Score-CAM keeps it busy for seconds.
    run_id, (shard_id,) = plan_in_process(
        make_dataset(tmp_path / "data", 8, seed=9), env, "gradcam,scorecam", 8
    )
    first = wait_until(lambda: holder(workers, postgres_url, shard_id, 1), 120, "the shard to start")
    kill_while_running(first, postgres_url, shard_id, attempt=1)  # type: ignore[arg-type]
    # The survivor boots while the other worker sweeps the lost lease and takes the shard.
    workers.append(start_worker(env, name="survivor", ready=False))
    second = wait_until(lambda: holder(workers, postgres_url, shard_id, 2), 120, "the shard to run again")
    kill_while_running(second, postgres_url, shard_id, attempt=2)  # type: ignore[arg-type]

    wait_finished(postgres_url, run_id)
    assert_run_complete(postgres_url, run_id, open_storage(s3_storage_url, endpoint_url=s3_endpoint_url))
    shard = shard_row(postgres_url, shard_id)
    assert (shard.status, shard.attempts, shard.lost_leases) == ("done", 3, 2)
    assert (shard.lost_worker or "").startswith(f"{second.name}@")  # type: ignore[union-attr]


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
    # Planned in this process: a `camaudit run` subprocess may take longer to exit on a loaded
    # machine than the worker takes to finish shards, and the fault must land on the first one.
    run_id, _ = plan_in_process(dataset, env, "gradcam,scorecam", 6)
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
        run_id, _ = plan_in_process(dataset, env, "gradcam,scorecam", 6)
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


class PostgresCluster:
    """A throwaway PostgreSQL cluster of this test's own, which it may stop and start at will.

    The shared server on 5432 must never be restarted. PostgreSQL refuses to run as root, so
    when the tests run as root the cluster belongs to the ``postgres`` user.
    """

    def __init__(self) -> None:
        initdbs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not initdbs:
            pytest.fail("PostgreSQL's server binaries are not installed; run `make services`")
        self.bin = initdbs[-1].parent
        self.root = Path(tempfile.mkdtemp(prefix="camaudit-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{tool} failed: {proc.stdout}{proc.stderr}"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        """A fast shutdown, as a restart or a failover does it: open sessions are cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        dispose_engines()
        cluster.remove()


def test_postgres_restart_mid_run_loses_and_doubles_nothing(
    tmp_path: Path,
    private_postgres: PostgresCluster,
    redis_url: str,
    s3_endpoint_url: str,
    s3_storage_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    database = private_postgres.url
    # A 1.5 s lease, and Score-CAM over 32 images per shard: the first shard is still computing
    # when its lease runs out during the outage, so the outage ends its lease, not its commit.
    env = base_env(database, redis_url, s3_storage_url, s3_endpoint_url) | LEASE_ENV
    env |= {"CAMAUDIT_LEASE_S": "1.5"}
    worker = start_worker(env, name="w1")
    # Two shards: one running when the database goes away, one whose claim then fails and retries.
    data = make_dataset(tmp_path / "data", 64, seed=5)
    run_id, _ = plan_in_process(data, env, "gradcam,scorecam", 32)
    wait_until(lambda: running_shard(database, run_id), 120, "a shard to start")
    with session_scope(database) as s:
        running = s.execute(select(Shard.id).where(Shard.run_id == run_id, Shard.status == "running")).all()
    dispose_engines()  # this process's own connections must not outlive the server either
    private_postgres.stop()
    assert len(running) == 1, "no shard was running when the database went away"
    # The server stays away until the running shard has lost its lease to the outage and the
    # next shard's claim has failed and is being retried.
    wait_until(lambda: "database was unreachable" in worker.log(), 60, "the running shard to give up")
    wait_until(lambda: "attempt 1 failed (" in worker.log(), 60, "the next shard to retry its claim")
    private_postgres.start()
    wait_finished(database, run_id)
    assert worker.proc.poll() is None, worker.log()[-2000:]
    assert_run_complete(database, run_id, open_storage(s3_storage_url, endpoint_url=s3_endpoint_url))
    interrupted = shard_row(database, running[0][0])
    assert interrupted.attempts >= 2 and interrupted.lost_leases == 1
    # The attempt cut off by the outage was dropped, not retried on top of the re-run.
    assert "attempt=1 discarded, nothing of it kept" in worker.log()
