"""Deleting a run: its heatmap objects and every row it owns, and nothing else.

A nightly audit leaves millions of rows and objects per run, so deletion works in batches,
each its own short transaction: a huge run never holds one giant transaction (with its
locks and its WAL) and a crash loses at most one batch of work. The run is marked
``deleting`` before anything goes, so queries stop reporting it and a second ``gc`` of the
same run picks up where an interrupted one stopped: every step deletes "what is left",
and the run row, which names the storage, goes last.

Shards still in flight when the run is marked are fenced, not raced: from that moment no claim
starts, no lease is renewed and no commit lands (``workers/shard.py``), and each running
shard stops at its next heartbeat, lets its uploads finish and gives its lease up. gc waits
for every lease of the run to be given up or to run out before it deletes a single object,
so no object can be written under ``runs/{run_id}/`` after the prefix is emptied.

On PostgreSQL the bulk tables (``items``, ``heatmaps``, ``patch_scores``) are partitioned by
run (``schema/partitions.py``): their rows go by DETACH + DROP of the run's partitions, one
short transaction per table, the three at once on connections of their own (the time is the
removal of the files at commit), in constant time and without dead tuples. The batched delete
remains for SQLite, for tables that are not partitioned, and for ``shards``.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select
from sqlalchemy.orm import InstrumentedAttribute

from scheduler.query import DELETING
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run, RunStatus, Shard, ShardStatus
from schema.partitions import drop_run_partitions, is_partitioned
from schema.redact import hide_password
from schema.settings import get_settings
from workers.lease import db_now
from workers.storage import open_storage

__all__ = ["DEFAULT_BATCH", "GcError", "GcReport", "gc_run"]

DEFAULT_BATCH = 10_000
# Longest wait for the lock a partition's DETACH takes on its parent table.
LOCK_TIMEOUT_S = 30

# Children before parents, so no batch leans on ON DELETE CASCADE to take an unbounded number of rows.
_TABLES: tuple[tuple[str, type, InstrumentedAttribute[str]], ...] = (
    ("patch_scores", PatchScore, PatchScore.run_id),
    ("heatmaps", Heatmap, Heatmap.run_id),
    ("items", Item, Item.run_id),
    ("shards", Shard, Shard.run_id),
)

Progress = Callable[[str, int], None]
Waiting = Callable[[int, list[str]], None]


class GcError(ValueError):
    """The run cannot be deleted (unknown, or still being written)."""


@dataclass
class GcReport:
    run_id: str
    objects: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    resumed: bool = False
    # Tables whose rows went with a dropped partition, and those whose count is the
    # planner's estimate (a big partition is not counted, to keep the drop constant-time).
    partitioned: set[str] = field(default_factory=set)
    estimated: set[str] = field(default_factory=set)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def _start(database_url: str, run_id: str, force: bool) -> tuple[str, bool]:
    """Mark the run ``deleting`` (committed at once) and return its storage URL."""
    with session_scope(database_url) as session:
        run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
        if run is None:
            ids = list(session.execute(select(Run.id).order_by(Run.created_at.desc()).limit(1000)).scalars())
            close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            shown = f" (recent runs: {', '.join(ids[:5])})" if ids else " (no runs are recorded there)"
            raise GcError(
                f"no run {run_id!r} in {hide_password(database_url)}{hint}{shown}; it may be deleted already"
            )
        resumed = run.status == DELETING
        if not resumed and run.status not in RunStatus.TERMINAL and not force:
            raise GcError(
                f"run {run_id} is {run.status}: workers may still write to it. Wait until it is "
                f"{' / '.join(sorted(RunStatus.TERMINAL))}, or pass force=True (--force) to delete it anyway"
            )
        run.status = DELETING
        return run.output_uri, resumed


def _in_flight(database_url: str, run_id: str) -> list[str]:
    """Workers still holding a live lease on a shard of the run."""
    with session_scope(database_url) as session:
        now = db_now(session)
        return [
            str(worker)
            for worker in session.execute(
                select(func.coalesce(Shard.worker, "?")).where(
                    Shard.run_id == run_id,
                    Shard.status == ShardStatus.RUNNING,
                    Shard.lease_expires_at > now,
                )
            ).scalars()
        ]


def _wait_for_in_flight(
    database_url: str, run_id: str, timeout_s: float, waiting: Waiting | None, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    told = -1
    while workers := _in_flight(database_url, run_id):
        if len(workers) != told and waiting is not None:
            waiting(len(workers), workers)
            told = len(workers)
        if time.monotonic() > deadline:
            holders = ", ".join(sorted(set(workers)))
            raise GcError(
                f"{len(workers)} shards of run {run_id} are still in flight on {holders} "
                f"after {timeout_s:g}s; nothing was deleted yet. The run stays 'deleting' (no shard of it "
                f"can start or commit): run gc again to finish once they have stopped"
            )
        time.sleep(poll_s)


def _delete_batches(
    database_url: str,
    name: str,
    model: type,
    run_column: InstrumentedAttribute[str],
    run_id: str,
    batch: int,
    progress: Progress | None,
) -> int:
    id_column = model.id  # type: ignore[attr-defined]
    total = 0
    while True:
        with session_scope(database_url) as session:
            ids = select(id_column).where(run_column == run_id).limit(batch).scalar_subquery()
            deleted = session.execute(delete(model).where(id_column.in_(ids))).rowcount or 0
        if deleted == 0:
            return total
        total += deleted
        if progress is not None:
            progress(name, deleted)


def _drop_partition(database_url: str, table: str, run_id: str) -> tuple[int, set[str]] | None:
    """Rows of the run's dropped partition of ``table`` and the tables whose count is estimated;
    None where the table is not partitioned."""
    with session_scope(database_url) as session:
        conn = session.connection()
        if not is_partitioned(conn, table):
            return None
        # A short lock wait bound: DETACH takes an ACCESS EXCLUSIVE lock on the parent, and
        # must not queue every other run's writers behind a long reader for long.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s'")
        try:
            rows, estimated = drop_run_partitions(conn, run_id, tables=(table,))
        except Exception as exc:
            # 55P03 lock_not_available, from the driver or wrapped by SQLAlchemy.
            state = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
            if state != "55P03":
                raise
            raise GcError(
                f"could not lock {table} within {LOCK_TIMEOUT_S}s to detach run {run_id}'s partition "
                f"(a long query or transaction holds it); the run stays 'deleting': run gc again later"
            ) from None
    return rows.get(table, 0), set(estimated)


def gc_run(
    database_url: str,
    run_id: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    batch: int = DEFAULT_BATCH,
    force: bool = False,
    progress: Progress | None = None,
    waiting: Waiting | None = None,
    wait_s: float | None = None,
) -> GcReport:
    """Delete run ``run_id``: objects under ``runs/{run_id}/`` of its storage, then its rows.

    ``progress(step, count)`` is called after each batch ("objects" once, then table names).
    Shards in flight are waited for first (``waiting(count, workers)`` says so), at most
    ``wait_s`` (default: two leases, by when every lease has run out).
    Safe to call again after an interruption: it finishes what the first call left.
    """
    if batch < 1:
        raise GcError(f"batch must be at least 1 row, got {batch}")
    if wait_s is None:
        wait_s = 2 * get_settings().lease_s + 5
    output_uri, resumed = _start(database_url, run_id, force)
    _wait_for_in_flight(database_url, run_id, wait_s, waiting)
    report = GcReport(run_id=run_id, resumed=resumed)
    storage = open_storage(output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False)
    report.objects = storage.delete_prefix(f"runs/{run_id}")
    if progress is not None:
        progress("objects", report.objects)
    # Each table's partition on a connection of its own: a drop's time is the removal of its
    # files at commit, and the three tables' files go at once instead of one after the other.
    with ThreadPoolExecutor(max_workers=len(_TABLES), thread_name_prefix="gc-drop") as pool:
        drops = [pool.submit(_drop_partition, database_url, name, run_id) for name, _, _ in _TABLES]
        outcomes = [drop.result() for drop in drops]
    for (name, model, run_column), dropped in zip(_TABLES, outcomes, strict=True):
        if dropped is not None:
            report.rows[name], estimated = dropped
            report.partitioned.add(name)
            report.estimated |= estimated
            if progress is not None:
                progress(name, report.rows[name])
            continue
        report.rows[name] = _delete_batches(database_url, name, model, run_column, run_id, batch, progress)
    with session_scope(database_url) as session:
        # Runs that used this one as their baseline lose only the reference (ON DELETE SET NULL).
        report.rows["runs"] = session.execute(delete(Run).where(Run.id == run_id)).rowcount or 0
    if progress is not None:
        progress("runs", report.rows["runs"])
    return report
