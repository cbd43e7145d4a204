"""A run's counters (shards and items done and failed): kept per shard, recounted when rare.

Every shard commit of a run used to recount the run from all of its shards while it held the
run row, so one run committed one shard at a time for as long as that aggregate took, and the
aggregate grew with the run (40,000 shards at the end of a 10-million-image night). Now the
transaction that moves a shard into or out of ``done``/``failed`` adds the difference of that
one shard's contribution to the run row (``UPDATE runs SET x = x + d``): O(1) whatever the
run's size. :func:`recount` derives the counters from the shards again; resume and the lease
sweep call it (rare), and tests check that the kept counters always equal it.

Why the kept counters stay exact: every writer that changes a shard's status or counts takes
the run row's lock first (``FOR NO KEY UPDATE`` or gc's ``FOR UPDATE``; SQLite serialises
writers) and the shard row's second, and applies the shard's difference in the same
transaction: ``commit_shard``, ``fail_shard``, ``note_lost_lease`` (claims taking over a lease
and the sweep), ``reopen_run``. So while one transaction holds the run row no other has an
uncommitted change of a shard's contribution, each committed change has been added exactly
once, and a rolled-back one has added nothing. (gc deletes shards only after marking the run
``deleting``, which no commit passes and from which no run ends.) The fence refuses to re-finish a shard
(``commit_shard`` of a done shard raises ``LeaseLost``; ``fail_shard`` leaves a finished shard
alone), and even a re-finish would add only its difference (:func:`add_change`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from schema.models import Run, RunStatus, Shard, ShardStatus, utcnow

__all__ = ["Counts", "add_change", "counts_of", "recount", "recount_counts", "settle"]

# A run that may still end: not already ended, and not being deleted by gc.
_OPEN = (RunStatus.PENDING, RunStatus.RUNNING)


@dataclass(frozen=True)
class Counts:
    """One shard's part of its run's counters, or a run's counters."""

    shards_done: int = 0
    shards_failed: int = 0
    n_done: int = 0
    n_failed: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.shards_done - other.shards_done,
            self.shards_failed - other.shards_failed,
            self.n_done - other.n_done,
            self.n_failed - other.n_failed,
        )


def counts_of(shard: Shard) -> Counts:
    """What the shard adds to its run now; the same rule :func:`recount` sums over the shards."""
    return Counts(
        int(shard.status == ShardStatus.DONE),
        int(shard.status == ShardStatus.FAILED),
        shard.n_done or 0,
        shard.n_failed or 0,
    )


def _ending(shards_done: int, shards_failed: int) -> str:
    if shards_failed == 0:
        return RunStatus.FINISHED
    return RunStatus.PARTIAL if shards_done > 0 else RunStatus.FAILED


def settle(
    session: Session, run_id: str, status: str, n_shards: int, shards_done: int, shards_failed: int
) -> str | None:
    """End the run if every shard is done or failed; the run row must be locked by the caller.

    Returns the final status when this call ended the run: with the row locked, exactly one
    transaction sees the last shard land, so the run is ended (and finalised) once.
    """
    if status not in _OPEN or shards_done + shards_failed < n_shards:
        return None
    ending = _ending(shards_done, shards_failed)
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status.in_(_OPEN))
        .values(status=ending, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return ending


def add_change(session: Session, run_id: str, before: Counts, after: Counts) -> str | None:
    """Add one shard's change of contribution to its run; the run's final status if it ended it.

    One ``UPDATE … SET x = x + d … RETURNING``: it locks the run row (already locked by the
    callers, who take it before the shard's) and reads the counters it left, without touching
    the run's other shards.
    """
    delta = after - before
    session.flush()
    row = session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(
            shards_done=Run.shards_done + delta.shards_done,
            shards_failed=Run.shards_failed + delta.shards_failed,
            n_done=Run.n_done + delta.n_done,
            n_failed=Run.n_failed + delta.n_failed,
        )
        .returning(Run.status, Run.n_shards, Run.shards_done, Run.shards_failed)
        .execution_options(synchronize_session=False)
    ).one()
    ended = settle(session, run_id, row.status, row.n_shards, row.shards_done, row.shards_failed)
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Run) and obj.id == run_id:
            session.expire(obj)  # its counters and status changed behind the ORM's back
    return ended


def recount_counts(session: Session, run_id: str) -> Counts:
    """The run's counters derived from its shards: one aggregate over every shard of the run."""
    session.flush()
    counts = session.execute(
        select(
            func.count().filter(Shard.status == ShardStatus.DONE),
            func.count().filter(Shard.status == ShardStatus.FAILED),
            func.coalesce(func.sum(Shard.n_done), 0),
            func.coalesce(func.sum(Shard.n_failed), 0),
        ).where(Shard.run_id == run_id)
    ).one()
    return Counts(*(int(v) for v in counts))


def recount(session: Session, run: Run) -> str | None:
    """Set the locked run's counters from its shards and end it if complete (resume, the sweep).

    Reads every shard of the run: kept for the rare paths, where it also repairs counters
    written by anything older than :func:`add_change`.
    """
    counts = recount_counts(session, run.id)
    run.shards_done, run.shards_failed = counts.shards_done, counts.shards_failed
    run.n_done, run.n_failed = counts.n_done, counts.n_failed
    if run.status not in _OPEN or counts.shards_done + counts.shards_failed < run.n_shards:
        return None
    run.status = _ending(counts.shards_done, counts.shards_failed)
    run.finished_at = utcnow()
    return run.status
