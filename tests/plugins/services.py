"""Real servers for the tests: PostgreSQL, Redis, and `camaudit worker` processes.

`make test` starts Redis and PostgreSQL when they are not running; these fixtures only
connect, and fail loudly (never skip) when a server is missing, because a skipped
integration test would pass with the feature broken.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from schema.db import dispose_engines

POSTGRES_ADMIN_URL = os.environ.get(
    "CAMAUDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/test"
)
REDIS_BASE_URL = os.environ.get("CAMAUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ = os.environ.get("CAMAUDIT_TEST_RABBITMQ", "127.0.0.1:5672")
REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll a condition with a deadline; the test fails with a message instead of hanging."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last_error}" if last_error else "")
    )


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({exc}); run `make services`")
    finally:
        engine.dispose()
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database per test, dropped afterwards."""
    name = f"camaudit_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    yield url
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# Databases 1-15 are lent to tests; database 0 only holds the leases on them.
REDIS_TEST_DBS = range(1, 16)
REDIS_LEASE_S = 1800  # longer than any test may run (pytest's timeout), so only a crashed run leaks one


def lease_redis_db(admin: redis.Redis, timeout: float = 300) -> tuple[int, str]:
    """Take a database no other running test holds, whatever process or checkout that test runs in.

    Tests run side by side (pytest-xdist workers, other checkouts on the same server), and a
    test flushes its database: two tests on one database would wipe each other's queues. A
    ``SET NX`` lease in database 0 makes the choice exclusive; it expires if its holder dies.
    """
    token = uuid.uuid4().hex
    start = uuid.uuid4().int % len(REDIS_TEST_DBS)
    order = [REDIS_TEST_DBS[(start + i) % len(REDIS_TEST_DBS)] for i in range(len(REDIS_TEST_DBS))]

    def take() -> int | None:
        for db in order:
            if admin.set(f"camaudit-test:redis-db:{db}", token, nx=True, ex=REDIS_LEASE_S):
                return db
        return None

    db = wait_until(
        take, timeout, f"a free Redis test database (all of {len(order)} are leased)", interval=0.5
    )
    return int(db), token  # type: ignore[arg-type]


def release_redis_db(admin: redis.Redis, db: int, token: str) -> None:
    """Give the database back, unless its lease expired and another test holds it now."""
    key = f"camaudit-test:redis-db:{db}"
    if admin.get(key) == token.encode():
        admin.delete(key)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of its own for each test, flushed before and after."""
    admin = redis.Redis.from_url(f"{REDIS_BASE_URL}/0")
    try:
        admin.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_BASE_URL} ({exc}); run `make services`")
    db, token = lease_redis_db(admin)
    url = f"{REDIS_BASE_URL}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()
        release_redis_db(admin, db, token)
        admin.close()


def rabbitmqctl(*args: str) -> str:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        pytest.fail("rabbitmqctl is not installed; run `make services`")
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed ({proc.stderr.strip()}); run `make services`")
    return proc.stdout


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A virtual host of its own on the shared RabbitMQ: its queues are this test's alone."""
    vhost = f"camaudit-t-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def camaudit_command() -> list[str]:
    return [sys.executable, "-m", "scheduler.cli"]


class WorkerProcess:
    """A real `camaudit worker` subprocess with its own log file."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self.name = name
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [*camaudit_command(), "worker", "--hostname", f"{name}@%h", "--loglevel", "INFO"],
            env=env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return "ready." in self.log()

        wait_until(ready, timeout, f"worker {self.name} to be ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(env_overrides: dict[str, str], name: str = "w1", *, ready: bool = True) -> WorkerProcess:
        """``ready=False`` returns at once: start several, then ``wait_ready`` each, booting in parallel."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_overrides}
        worker = WorkerProcess(env, tmp_path / f"worker-{name}.log", name)
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:  # all shut down together, then each is waited for
        if worker.proc.poll() is None:
            worker.proc.terminate()
    for worker in started:
        worker.stop()
