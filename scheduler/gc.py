"""Deleting a run: its heatmap objects and every row it owns, and nothing else.

A nightly audit leaves millions of rows and objects per run, so deletion works in batches,
each its own short transaction: a huge run never holds one giant transaction (with its
locks and its WAL) and a crash loses at most one batch of work. The run is marked
``deleting`` before anything goes, so queries stop reporting it and a second ``gc`` of the
same run picks up where an interrupted one stopped: every step deletes "what is left",
and the run row, which names the storage, goes last.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import InstrumentedAttribute

from scheduler.query import DELETING
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run, RunStatus, Shard
from schema.redact import hide_password
from workers.storage import open_storage

__all__ = ["DEFAULT_BATCH", "GcError", "GcReport", "gc_run"]

DEFAULT_BATCH = 10_000

# Children before parents, so no batch leans on ON DELETE CASCADE to take an unbounded number of rows.
_TABLES: tuple[tuple[str, type, InstrumentedAttribute[str]], ...] = (
    ("patch_scores", PatchScore, PatchScore.run_id),
    ("heatmaps", Heatmap, Heatmap.run_id),
    ("items", Item, Item.run_id),
    ("shards", Shard, Shard.run_id),
)

Progress = Callable[[str, int], None]


class GcError(ValueError):
    """The run cannot be deleted (unknown, or still being written)."""


@dataclass
class GcReport:
    run_id: str
    objects: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    resumed: bool = False

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


def gc_run(
    database_url: str,
    run_id: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    batch: int = DEFAULT_BATCH,
    force: bool = False,
    progress: Progress | None = None,
) -> GcReport:
    """Delete run ``run_id``: objects under ``runs/{run_id}/`` of its storage, then its rows.

    ``progress(step, count)`` is called after each batch ("objects" once, then table names).
    Safe to call again after an interruption: it finishes what the first call left.
    """
    if batch < 1:
        raise GcError(f"batch must be at least 1 row, got {batch}")
    output_uri, resumed = _start(database_url, run_id, force)
    report = GcReport(run_id=run_id, resumed=resumed)
    storage = open_storage(output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False)
    report.objects = storage.delete_prefix(f"runs/{run_id}")
    if progress is not None:
        progress("objects", report.objects)
    for name, model, run_column in _TABLES:
        report.rows[name] = _delete_batches(database_url, name, model, run_column, run_id, batch, progress)
    with session_scope(database_url) as session:
        # Runs that used this one as their baseline lose only the reference (ON DELETE SET NULL).
        report.rows["runs"] = session.execute(delete(Run).where(Run.id == run_id)).rowcount or 0
    if progress is not None:
        progress("runs", report.rows["runs"])
    return report
