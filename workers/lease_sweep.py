"""Finding shards whose worker is gone, and enqueueing them again within a lease.

Every ``camaudit worker`` runs this sweep in a thread of its main process, so recovery needs
nothing besides the workers themselves (no beat, no control worker). Any number of sweepers
may run: each shard is taken with ``SELECT … FOR UPDATE SKIP LOCKED`` under its run's lock
and a conditional update, so exactly one sweeper records the loss and enqueues it again.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from schema.db import new_engine
from schema.models import Run, RunStatus, Shard, ShardStatus
from workers.lease import db_now, short_error
from workers.shard import note_lost_lease

log = logging.getLogger("camaudit.lease")

__all__ = ["LeaseSweeper", "Reclaimed", "sweep_expired_leases"]

Enqueue = Callable[[str, int], None]
RunEnded = Callable[[str], None]


@dataclass(frozen=True)
class Reclaimed:
    run_id: str
    shard_id: int
    shard_index: int
    lost_worker: str | None
    status: str  # "pending" (enqueued again) or "failed" (lost too many workers)


def _expired(now: object) -> list[object]:
    return [
        Shard.status.in_([ShardStatus.RUNNING, ShardStatus.PENDING]),
        Shard.lease_expires_at.is_not(None),
        Shard.lease_expires_at < now,
    ]


def _lock(session: Session, stmt: object, *, key_share: bool = False) -> object:
    locked = stmt.with_for_update(skip_locked=True, key_share=key_share)  # type: ignore[attr-defined]
    return session.execute(locked).scalar_one_or_none()


def _reclaim_one(
    session: Session, shard_id: int, max_lost: int, enqueue: Enqueue
) -> tuple[Reclaimed, str | None] | None:
    """One shard in one transaction; None when another sweeper (or a claim) got there first."""
    run_id = session.execute(select(Shard.run_id).where(Shard.id == shard_id)).scalar_one_or_none()
    if run_id is None:
        return None
    # Run before shard, the order every writer of a shard's status takes them in.
    # NO KEY UPDATE, as claims and commits take it (workers/shard.py lock_run_row): a plain
    # FOR UPDATE would skip the run whenever any shard commit's inserts hold a key-share lock.
    run = _lock(session, select(Run).where(Run.id == run_id), key_share=True)
    fresh = select(Shard).where(Shard.id == shard_id).execution_options(populate_existing=True)
    shard = _lock(session, fresh)
    if not isinstance(run, Run) or not isinstance(shard, Shard) or run.status == RunStatus.DELETING:
        return None
    now = db_now(session)
    # The conditional update is what makes one sweeper win where the database has no row locks (SQLite).
    won = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.attempts == shard.attempts, *_expired(now))
        .values(lease_expires_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not won:
        return None
    run_status = note_lost_lease(session, run, shard, now, max_lost)
    if shard.status == ShardStatus.PENDING:
        session.flush()
        # Sent before the commit: if the commit fails, the delivery finds the lease expired and takes it.
        enqueue(run.id, shard.id)
    return Reclaimed(run.id, shard.id, shard.index, shard.lost_worker, shard.status), run_status


def sweep_expired_leases(
    sessions: Callable[[], Session],
    *,
    max_lost: int,
    enqueue: Enqueue,
    run_ended: RunEnded | None = None,
    limit: int = 100,
) -> list[Reclaimed]:
    """One pass: every shard whose lease ran out is enqueued again (or failed after ``max_lost``)."""
    with sessions() as session:
        now = db_now(session)
        candidates = list(
            session.execute(
                select(Shard.id)
                .join(Run, Run.id == Shard.run_id)
                .where(*_expired(now), Run.status != RunStatus.DELETING)
                .order_by(Shard.lease_expires_at)
                .limit(limit)
            ).scalars()
        )
        session.rollback()
    reclaimed = []
    for shard_id in candidates:
        with sessions() as session, session.begin():
            outcome = _reclaim_one(session, shard_id, max_lost, enqueue)
        if outcome is None:
            continue
        shard, run_status = outcome
        reclaimed.append(shard)
        log.warning(
            "run=%s shard=%d: lease of %s ran out; %s",
            shard.run_id,
            shard.shard_index,
            shard.lost_worker,
            "enqueued again" if shard.status == ShardStatus.PENDING else "failed: it lost too many workers",
        )
        if run_status is not None and run_ended is not None:
            run_ended(shard.run_id)
    return reclaimed


class LeaseSweeper:
    """Runs :func:`sweep_expired_leases` every ``interval_s`` (with jitter) on a daemon thread."""

    def __init__(
        self,
        database_url: str,
        *,
        interval_s: float,
        max_lost: int,
        enqueue: Enqueue,
        run_ended: RunEnded | None = None,
    ) -> None:
        # A private engine: the worker's pool children are forked from this process.
        self._engine = new_engine(database_url, pool_size=1, max_overflow=1)
        self._sessions = sessionmaker(self._engine)
        self.interval_s = interval_s
        self.max_lost = max_lost
        self._enqueue = enqueue
        self._run_ended = run_ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-sweeper", daemon=True)
        self._failing = False

    def start(self) -> LeaseSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._engine.dispose()

    def sweep(self) -> list[Reclaimed]:
        return sweep_expired_leases(
            self._sessions, max_lost=self.max_lost, enqueue=self._enqueue, run_ended=self._run_ended
        )

    def _run(self) -> None:
        # Jitter keeps many workers' sweeps from arriving at the database together.
        while not self._stop.wait(self.interval_s * random.uniform(0.8, 1.0)):
            try:
                self.sweep()
            except Exception as exc:
                if not self._failing:
                    log.warning("lease sweep failed (%s); trying again", short_error(exc))
                    self._failing = True
                continue
            self._failing = False
