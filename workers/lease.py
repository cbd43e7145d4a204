"""Shard leases: a running shard belongs to the worker that renews its lease, and to no one else.

A worker that is killed (SIGKILL, a lost node, the OOM killer) stops renewing; once its lease
runs out the shard is enqueued again by a sweep (``workers/lease_sweep.py``) instead of waiting
hours for the broker to redeliver it. The claim's attempt number is the fencing token: the
renewal, the hand-back and the commit all name it, so a worker that lost its lease (paused,
partitioned, late) can no longer write anything once another worker has claimed the shard.

Times come from the database's clock (PostgreSQL ``now()``), so workers on hosts whose clocks
disagree still agree on when a lease ran out. SQLite lives on one host; its clock is the host's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from schema.models import Run, RunStatus, Shard, ShardStatus

log = logging.getLogger("camaudit.lease")

__all__ = ["Heartbeat", "LeaseLost", "aware", "db_now", "expire_lease", "hand_back_for_retry"]


class LeaseLost(RuntimeError):
    """This worker no longer holds the shard: another attempt took it, or its run is being deleted.

    Nothing of this attempt may be committed; the shard's rows belong to the current holder.
    """


def db_now(session: Session) -> datetime:
    """The database's current time (timezone-aware UTC): one clock for every worker."""
    if session.get_bind().dialect.name == "postgresql":
        return aware(session.execute(select(func.now())).scalar_one())
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def short_error(exc: BaseException) -> str:
    """The driver's own first line, without the statement and parameters SQLAlchemy appends."""
    cause = getattr(exc, "orig", None) or exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first}"[:300]


def _held_by(shard_id: int, attempt: int) -> list[object]:
    """The rows a holder of ``attempt`` may still touch: its running shard of a run not being deleted."""
    run_alive = exists().where(Run.id == Shard.run_id, Run.status != RunStatus.DELETING)
    return [Shard.id == shard_id, Shard.attempts == attempt, Shard.status == ShardStatus.RUNNING, run_alive]


def renew(session: Session, shard_id: int, attempt: int, lease_s: float) -> bool:
    """Extend the lease; False when this attempt no longer holds it."""
    now = db_now(session)
    result = session.execute(
        update(Shard)
        .where(*_held_by(shard_id, attempt))
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


def expire_lease(session: Session, shard_id: int, attempt: int) -> None:
    """An attempt that stopped without committing gives its lease up now (gc waits for that).

    The shard stays ``running`` with an expired lease, so the sweep enqueues it again unless
    its run is being deleted; a later attempt's lease is left alone.
    """
    now = db_now(session)
    session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.attempts == attempt, Shard.status == ShardStatus.RUNNING)
        .values(lease_expires_at=now)
        .execution_options(synchronize_session=False)
    )


def hand_back_for_retry(session: Session, shard_id: int, attempt: int, due_in_s: float) -> None:
    """A failed attempt whose task will retry: any worker may claim the shard, and the sweep
    enqueues it again if no retry has claimed it within ``due_in_s`` (its message was lost).
    """
    now = db_now(session)
    session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.attempts == attempt, Shard.status == ShardStatus.RUNNING)
        .values(status=ShardStatus.PENDING, lease_expires_at=now + timedelta(seconds=due_in_s))
        .execution_options(synchronize_session=False)
    )


class Heartbeat:
    """Renews one attempt's lease from a thread, a short UPDATE every ``interval_s``.

    It costs the shard nothing on the device: the thread sleeps between renewals and a renewal
    is one statement. When the lease is lost (another attempt took the shard, the run is being
    deleted) or cannot be renewed before it runs out (the database is unreachable), ``lost``
    is set and :meth:`check` raises :class:`LeaseLost` in the shard's own thread.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        shard_id: int,
        attempt: int,
        *,
        lease_s: float,
        interval_s: float,
        name: str = "",
        claimed_at: float | None = None,
    ) -> None:
        self._sessions = session_factory
        self.shard_id = shard_id
        self.attempt = attempt
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.name = name or f"shard {shard_id}"
        self.lost = threading.Event()
        self.reason = ""
        self._stop = threading.Event()
        # ``time.monotonic()`` taken before the claim's transaction: this side's idea of when the
        # lease runs out is then never later than the database's.
        self._renewed_at = time.monotonic() if claimed_at is None else claimed_at
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{shard_id}", daemon=True)
        self._failing = False

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(self.reason)

    def _lose(self, reason: str) -> None:
        self.reason = reason
        self.lost.set()
        log.warning("%s: %s", self.name, reason)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            started = time.monotonic()
            try:
                with self._sessions() as session, session.begin():
                    held = renew(session, self.shard_id, self.attempt, self.lease_s)
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "%s: cannot renew the lease (%s); retrying every %gs",
                        self.name,
                        short_error(exc),
                        self.interval_s,
                    )
                    self._failing = True
                if time.monotonic() - self._renewed_at > self.lease_s:
                    self._lose(f"lease of attempt {self.attempt} ran out while the database was unreachable")
                    return
                continue
            if not held:
                self._lose(
                    f"attempt {self.attempt} no longer holds the shard (a later attempt took it, "
                    "or its run is being deleted)"
                )
                return
            if self._failing:
                log.info("%s: lease renewed again", self.name)
                self._failing = False
            self._renewed_at = started
