"""A finalisation message delivered twice at the same instant raises and delivers the alerts once.

Two finalisations of one finished run start together on PostgreSQL, each in the Celery task
embedded mode runs (finalise, then deliver). The webhook receiver holds the first POST until the
other finalisation has either finished, is waiting for the run's delivery lock, or has posted
too: without the locks of ``scheduler/run_locks.py`` the second POST arrives while the first is
still open.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from schema.db import get_engine, session_scope, upgrade
from schema.models import Alert, Run, RunStatus, utcnow
from schema.settings import get_settings

HOLD_LIMIT_S = 60.0


class HoldingReceiver:
    """Counts POSTs; holds each one open until ``release()`` says the other side has moved on."""

    def __init__(self, release: Any) -> None:
        self.posts: list[dict[str, Any]] = []
        self.timed_out = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                receiver.posts.append(json.loads(self.rfile.read(length)))
                deadline = time.monotonic() + HOLD_LIMIT_S
                while not release(receiver):
                    if time.monotonic() > deadline:
                        receiver.timed_out = True
                        break
                    time.sleep(0.01)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/finalise"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def finished_run(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    """A finished run with no items whose rule fires on its status, and one webhook."""
    upgrade(postgres_url)
    now = utcnow()
    with session_scope(postgres_url) as session:
        session.add(
            Run(
                id="r-twice",
                audit_name="nightly",
                status=RunStatus.FINISHED,
                model_ref="demo",
                methods=["gradcam"],
                layers=["features"],
                target_spec="top1",
                source_uri=str(tmp_path / "data"),
                output_uri=str(tmp_path / "maps"),
                preprocess={"size": [64, 64]},
                patch_size=16,
                top_patches=3,
                config={
                    "alerts": {"status": ["finished"]},
                    "notify": [{"webhook": "${CAMAUDIT_ALERT_WEBHOOK}"}],
                },
                versions={},
                started_at=now,
                finished_at=now,
            )
        )
    yield "r-twice"


def advisory_waiters(database_url: str) -> int:
    with get_engine(database_url).connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar_one()
        )


@pytest.mark.slow
def test_two_finalisations_at_once_post_the_alert_once(
    postgres_url: str, finished_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scheduler.control_tasks import finalize_run_task

    finished: list[str] = []
    results: list[Any] = []

    def other_moved_on(receiver: HoldingReceiver) -> bool:
        return len(receiver.posts) >= 2 or len(finished) >= 1 or advisory_waiters(postgres_url) > 0

    receiver = HoldingReceiver(other_moved_on)
    monkeypatch.setenv("CAMAUDIT_DATABASE_URL", postgres_url)
    monkeypatch.setenv("CAMAUDIT_ALERT_WEBHOOK", receiver.url)
    monkeypatch.setenv("CAMAUDIT_ALERT_BACKOFF_S", "0.05")
    get_settings.cache_clear()
    start = threading.Barrier(2)

    def finalise(name: str) -> None:
        start.wait(timeout=30)
        results.append(finalize_run_task.apply((finished_run,), throw=False))
        finished.append(name)

    threads = [threading.Thread(target=finalise, args=(name,)) for name in ("a", "b")]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=2 * HOLD_LIMIT_S)
    finally:
        receiver.close()
        get_settings.cache_clear()
    assert sorted(finished) == ["a", "b"]
    assert all(r.successful() for r in results), [r.result for r in results]
    assert not receiver.timed_out
    assert len(receiver.posts) == 1, receiver.posts
    assert receiver.posts[0]["run_id"] == finished_run
    with session_scope(postgres_url) as session:
        alerts = list(session.execute(select(Alert).where(Alert.run_id == finished_run)).scalars())
    assert [(a.rule, a.state, a.attempts) for a in alerts] == [("status", "fired", 1)]
    assert alerts[0].delivered_at is not None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_run_lock_has_one_holder_per_job_and_run(backend: str, tmp_path: Path, request: Any) -> None:
    from scheduler.run_locks import run_lock

    db = (
        f"sqlite:///{tmp_path / 'runs.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    seen: list[bool] = []

    def try_other(job: str, run_id: str) -> None:
        with run_lock(db, job, run_id, wait=False) as held:
            seen.append(held)

    def in_thread(job: str, run_id: str) -> bool:
        thread = threading.Thread(target=try_other, args=(job, run_id))
        thread.start()
        thread.join(timeout=30)
        return seen.pop()

    with run_lock(db, "finalize", "r1", wait=False) as held:
        assert held
        assert not in_thread("finalize", "r1")  # the same job of the same run: taken
        assert in_thread("finalize", "r2") and in_thread("deliver", "r1")  # others are free
    assert in_thread("finalize", "r1")  # released with the block
    refused = run_lock(db, "finalise", "r1", wait=False)
    with pytest.raises(ValueError, match="unknown run job 'finalise'; use one of finalize, deliver"):
        refused.__enter__()
