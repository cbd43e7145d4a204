"""How long a shard whose worker was SIGKILLed waits before it runs again, with default lease settings.

Two real `camaudit worker` processes share a broker (a private Redis, or a private virtual host
on the local RabbitMQ) and a fresh PostgreSQL database; a one-shard run starts, the worker
running it is killed with SIGKILL, and the clock runs until the shard is `running` again
under its next attempt on the other worker. Repeated, since the kill lands at a random point
of the heartbeat cycle.

    python bench/recovery.py --broker redis --repeat 3
    python bench/recovery.py --broker amqp --repeat 3

The lease settings are the defaults unless CAMAUDIT_LEASE_S and friends are set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.plan import plan_run  # noqa: E402
from schema.db import dispose_engines, session_scope  # noqa: E402
from schema.models import Run, Shard  # noqa: E402
from schema.payloads import RunSpec  # noqa: E402
from schema.settings import Settings  # noqa: E402
from workers.celery_app import configure  # noqa: E402
from workers.synth import make_dataset  # noqa: E402

POSTGRES_ADMIN = os.environ.get(
    "CAMAUDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(condition, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = condition()
            if value:
                return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        wait(lambda: redis.Redis(port=port).ping(), 30, "redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    vhost = f"camaudit-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    try:
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    name = f"camaudit_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Worker:
    def __init__(self, name: str, env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "worker", "--hostname", f"{name}@%h"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}")
        return "ready." in self.log.read_text(errors="replace")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def shard_state(database_url: str, shard_id: int) -> tuple[str, int, str | None]:
    with session_scope(database_url) as s:
        shard = s.get(Shard, shard_id)
        assert shard is not None
        return shard.status, shard.attempts, shard.worker


def running_as(database_url: str, shard_id: int, attempt: int) -> str | None:
    """The worker running this attempt of the shard, if it runs."""
    status, attempts, worker = shard_state(database_url, shard_id)
    return worker if (status, attempts) == ("running", attempt) else None


def measure(broker_url: str, database_url: str, workdir: Path, repeat: int) -> list[float]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CAMAUDIT_DATABASE_URL": database_url,
        "CAMAUDIT_BROKER_URL": broker_url,
        "CAMAUDIT_STORAGE_URL": str(workdir / "out"),
    }
    settings = Settings(database_url=database_url, broker_url=broker_url, storage_url=str(workdir / "out"))
    print(
        f"lease_s={settings.lease_s:g} heartbeat_interval_s={settings.heartbeat_interval_s:g} "
        f"lease_sweep_interval_s={settings.lease_sweep_interval_s:g}",
        flush=True,
    )
    data = make_dataset(workdir / "data", 8, seed=1)
    # Score-CAM keeps the shard busy long enough to be killed inside it.
    spec = RunSpec(source=str(data), methods=["gradcam", "scorecam"], shard_size=8, batch_size=2)
    app = configure(settings)
    workers = {n: Worker(f"w{n}", env, workdir) for n in (0, 1)}
    spare = 2
    figures = []
    try:
        for round_ in range(repeat):
            for worker in workers.values():
                wait(worker.ready, 180, f"worker {worker.name}")
            planned = plan_run(spec, settings)
            (shard_id,) = planned.shard_ids
            with app.connection_for_write(broker_url) as connection:
                app.send_task(
                    "camaudit.explain_shard", (planned.run_id, shard_id), queue="gpu", connection=connection
                )
            holder = wait(lambda sid=shard_id: running_as(database_url, sid, 1), 120, "the shard to start")
            key = next(k for k, w in workers.items() if holder.startswith(f"{w.name}@"))
            killed_at = time.monotonic()
            workers[key].kill()
            assert running_as(database_url, shard_id, 1), "the shard ended before the kill"
            wait(lambda sid=shard_id: running_as(database_url, sid, 2), 600, "the shard to run again")
            seconds = time.monotonic() - killed_at
            figures.append(seconds)
            print(f"round {round_ + 1}: SIGKILL to running again: {seconds:.1f}s", flush=True)

            def finished(run_id: str = planned.run_id) -> bool:
                with session_scope(database_url) as s:
                    run = s.get(Run, run_id)
                    return run is not None and run.status == "finished"

            wait(finished, 300, "the run to finish")
            workers[key] = Worker(f"w{spare}", env, workdir)
            spare += 1
    finally:
        for worker in workers.values():
            worker.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name in ("CAMAUDIT_BROKER_URL", "CAMAUDIT_DATABASE_URL", "CAMAUDIT_STORAGE_URL"):
        os.environ.pop(name, None)
    workdir = Path(tempfile.mkdtemp(prefix="camaudit-recovery-"))
    try:
        broker = private_redis(workdir) if args.broker == "redis" else private_vhost()
        with broker as broker_url, fresh_database() as database_url:
            figures = measure(broker_url, database_url, workdir, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.broker}: SIGKILL to the shard running again, {len(figures)} rounds: "
        f"min {min(figures):.1f}s, median {statistics.median(figures):.1f}s, max {max(figures):.1f}s"
    )


if __name__ == "__main__":
    main()
