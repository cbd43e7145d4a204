"""One holder at a time of a run-level job (finalising a run, delivering its alerts).

A control message may be delivered twice at the same instant (a broker redelivery, a retried
task, two control workers): two finalisers of one run would judge its alerts twice and two
deliverers would POST the same notification twice. On PostgreSQL the job holds a
transaction-level advisory lock keyed by the job and the run, on a connection of its own, for
as long as it runs: it blocks no row (the job's own writes, ``camaudit gc``, the web UI go on)
and it is released when the job ends or its connection drops, so a crashed holder never leaves
it taken. SQLite serves one process (embedded mode): a lock in that process does the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from schema.db import get_engine, normalise_url

__all__ = ["JOBS", "run_lock"]

# The first key of PostgreSQL's two-key advisory locks, one per job ("caf" + a digit, in ASCII),
# so these never meet a lock someone else keys by a run's hash alone.
JOBS = {"finalize": 0x63616631, "deliver": 0x63616632}

_local_guard = threading.Lock()
_local: dict[tuple[str, str, str], threading.Lock] = {}


@contextmanager
def run_lock(database_url: str, job: str, run_id: str, *, wait: bool) -> Iterator[bool]:
    """Hold ``job``'s lock of ``run_id`` for the block; yields whether it is held.

    ``wait=False`` gives up at once when another holder has it (yields False: the caller skips
    the job, someone is doing it right now); ``wait=True`` waits for it (yields True).
    """
    if job not in JOBS:
        raise ValueError(f"unknown run job {job!r}; use one of {', '.join(JOBS)}")
    engine = get_engine(database_url)
    if engine.dialect.name == "postgresql":
        call = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        with engine.connect() as conn, conn.begin():
            got = conn.execute(
                text(f"SELECT {call}(:job, hashtext(:run_id))"), {"job": JOBS[job], "run_id": run_id}
            ).scalar()
            yield bool(got) if not wait else True
        return
    with _local_guard:
        lock = _local.setdefault((normalise_url(database_url), job, run_id), threading.Lock())
    held = lock.acquire(blocking=wait)
    try:
        yield held
    finally:
        if held:
            lock.release()
