"""Run-level summaries written once a run's last shard has landed: drift and localisation quality.

Everything here is an upsert on a natural key plus the removal of rows the new result no
longer has, in one transaction, so finalising a run twice (a retried control task, a
``camaudit diff --save`` after the fact) leaves exactly the rows one call would have left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from scheduler.alerts import RunFacts, run_facts
from scheduler.analysis.drift import RunDiff, diff_runs
from scheduler.analysis.quality import LocalisationReport, localisation
from scheduler.groups import write_groups
from scheduler.notify import RaisedAlerts, raise_alerts
from scheduler.query import DELETING, get_run
from scheduler.run_locks import run_lock
from schema.db import dialect_name, session_scope
from schema.models import ClassDrift, RunQuality, RunStatus, utcnow

__all__ = ["QUALITY_ITEMS", "Finalised", "finalize_run", "store_class_drift", "store_run_quality"]

log = logging.getLogger("camaudit.finalize")

# Localisation at finalisation reads one PNG per boxed item and method: a spread sample bounds
# the cost of a nightly run of millions of items (``camaudit quality`` reads them all).
QUALITY_ITEMS = 2000


def _upsert(session: Session, model: type, rows: list[dict[str, Any]], key: Sequence[str]) -> None:
    if not rows:
        return
    dialect = dialect_name(session)
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(model)
    elif dialect == "sqlite":
        stmt = sqlite.insert(model)
    else:
        raise NotImplementedError(f"summaries are written to PostgreSQL or SQLite, not {dialect}")
    update = {name: stmt.excluded[name] for name in rows[0] if name not in key}
    session.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=update), rows)


def store_class_drift(database_url: str, diff: RunDiff) -> int:
    """Write ``diff``'s per-class drift as rows of run B against baseline A; returns how many."""
    now = utcnow()
    rows = [
        {
            "run_id": diff.run_b,
            "baseline_run_id": diff.run_a,
            "method": c.method,
            "layer": c.layer,
            "target_class": c.target_class,
            "n": c.n,
            "mean_correlation": c.mean_correlation,
            "mean_iou": c.mean_iou,
            "centre_shift_px": c.centre_shift_px,
            "l1_shift": c.l1_shift,
            "drifted": c.drifted,
            "threshold": diff.threshold,
            "computed_at": now,
        }
        for c in diff.classes
    ]
    key = ("run_id", "baseline_run_id", "method", "layer", "target_class")
    with session_scope(database_url) as session:
        _upsert(session, ClassDrift, rows, key)
        keep = [(c.method, c.layer, c.target_class) for c in diff.classes]
        stale = delete(ClassDrift).where(
            ClassDrift.run_id == diff.run_b, ClassDrift.baseline_run_id == diff.run_a
        )
        if keep:
            columns = tuple_(ClassDrift.method, ClassDrift.layer, ClassDrift.target_class)
            stale = stale.where(columns.not_in(keep))
        session.execute(stale)
    return len(rows)


def store_run_quality(database_url: str, run_id: str, report: LocalisationReport) -> int:
    """Write a run's localisation figures per method and layer; returns how many rows."""
    now = utcnow()
    rows = [
        {
            "run_id": run_id,
            "method": m.method,
            "layer": m.layer,
            "n": m.n,
            "pointing_game": m.pointing_game,
            "energy_in_box": m.energy_in_box,
            "computed_at": now,
        }
        for m in report.methods
    ]
    with session_scope(database_url) as session:
        _upsert(session, RunQuality, rows, ("run_id", "method", "layer"))
        stale = delete(RunQuality).where(RunQuality.run_id == run_id)
        if rows:
            columns = tuple_(RunQuality.method, RunQuality.layer)
            stale = stale.where(columns.not_in([(m.method, m.layer) for m in report.methods]))
        session.execute(stale)
    return len(rows)


@dataclass(frozen=True)
class Finalised:
    """What finalisation measured, and the alerts it raised (None: the run has no rules)."""

    facts: RunFacts
    alerts: RaisedAlerts | None


def finalize_run(
    database_url: str,
    run_id: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    threshold: float = 0.5,
) -> Finalised | None:
    """Drift against the run's baseline (when it has one) and localisation quality, stored in SQL,
    then the run's alert rules judged against them.

    Meant for a run whose shards have all landed; a run still in progress is refused, since
    its summaries would describe only part of it. None for a run being deleted, and for a run
    another finaliser is finalising at this moment (a message delivered twice): only one of
    them judges the alerts (``scheduler/run_locks.py``).
    """
    with run_lock(database_url, "finalize", run_id, wait=False) as sole:
        if not sole:
            log.info("run=%s is being finalised elsewhere right now; this finalisation is skipped", run_id)
            return None
        return _finalize(database_url, run_id, endpoint_url, region, threshold)


def _finalize(
    database_url: str, run_id: str, endpoint_url: str | None, region: str | None, threshold: float
) -> Finalised | None:
    run = get_run(database_url, run_id)
    if run.status == DELETING:
        log.info("run=%s is being deleted; nothing to finalise", run_id)
        return None
    if run.status not in RunStatus.TERMINAL:
        raise ValueError(
            f"run {run_id} is {run.status}; finalise it once every shard is done or failed "
            f"({run.shards_done + run.shards_failed} of {run.n_shards} so far)"
        )
    groups = write_groups(database_url, run_id)
    if groups:
        log.info("run=%s: %d groups", run_id, groups)
    report = localisation(
        database_url, run_id, endpoint_url=endpoint_url, region=region, max_items=QUALITY_ITEMS
    )
    stored = store_run_quality(database_url, run_id, report)
    log.info(
        "run=%s localisation: %d method/layer rows over %d boxed items", run_id, stored, report.boxed_items
    )
    _store_drift(database_url, run_id, run.baseline_run_id, endpoint_url, region, threshold)
    facts = run_facts(database_url, run_id)
    return Finalised(facts, raise_alerts(database_url, facts))


def _store_drift(
    database_url: str,
    run_id: str,
    baseline: str | None,
    endpoint_url: str | None,
    region: str | None,
    threshold: float,
) -> None:
    if baseline is None:
        return
    if get_run(database_url, baseline).status == DELETING:
        log.info("run=%s: baseline %s is being deleted; no drift computed", run_id, baseline)
        return
    diff = diff_runs(
        database_url, baseline, run_id, endpoint_url=endpoint_url, region=region, threshold=threshold
    )
    stored = store_class_drift(database_url, diff)
    log.info(
        "run=%s drift vs %s: %d classes, %d drifted, %d heatmap pairs",
        run_id,
        baseline,
        stored,
        len(diff.drifted),
        diff.pairs,
    )
