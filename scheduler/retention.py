"""Retention of an audit's runs: delete whole runs beyond ``keep_last`` or older than ``older_than``.

The choice is made from the ``runs`` table alone (``expired_runs``) and every chosen run goes
through :func:`scheduler.gc.gc_run`, so retention deletes exactly as ``camaudit gc --run``
does: objects first, partitions dropped on PostgreSQL, fenced against shards in flight.
Runs still pending or running are never chosen; a run already ``deleting`` (an interrupted
gc) is, so the next pass finishes it.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from scheduler.gc import GcError, GcReport, gc_run
from scheduler.query import DELETING
from schema.db import session_scope
from schema.models import Run, RunStatus
from schema.retention import Retention

__all__ = ["RetentionReport", "apply_retention", "expired_runs", "retain_after"]

log = logging.getLogger("camaudit.retention")

# Status of runs retention may delete.
_DELETABLE = RunStatus.TERMINAL | {DELETING}


@dataclass
class RetentionReport:
    audit: str
    chosen: list[str] = field(default_factory=list)
    deleted: list[GcReport] = field(default_factory=list)


def _as_utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; the values were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def expired_runs(
    database_url: str, audit: str, retention: Retention, *, now: datetime | None = None
) -> list[str]:
    """Ids of the audit's runs the rule deletes, oldest first.

    The newest ``keep_last`` runs of the audit (whatever their status) are kept, and so is
    every run younger than ``older_than``; with both rules a run goes only when neither keeps
    it. Unknown audits fail naming the closest audit names recorded.
    """
    now = now or datetime.now(UTC)
    max_age: timedelta | None = retention.max_age
    with session_scope(database_url) as session:
        runs = session.execute(
            select(Run.id, Run.status, Run.created_at)
            .where(Run.audit_name == audit)
            .order_by(Run.created_at.desc(), Run.id.desc())
        ).all()
        if not runs:
            names = list(
                session.execute(
                    select(Run.audit_name).where(Run.audit_name.is_not(None)).distinct()
                ).scalars()
            )
            close = difflib.get_close_matches(audit, [str(n) for n in names], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            known = f" (audits with runs: {', '.join(sorted(map(str, names))[:10])})" if names else ""
            raise GcError(f"no run of audit {audit!r} is recorded{hint}{known}")
    chosen: list[str] = []
    for position, (run_id, status, created_at) in enumerate(runs):
        kept_by_count = retention.keep_last is not None and position < retention.keep_last
        kept_by_age = max_age is not None and now - _as_utc(created_at) < max_age
        # One rule alone decides; with both, either keeps the run.
        if retention.keep_last is None:
            keep = kept_by_age
        elif max_age is None:
            keep = kept_by_count
        else:
            keep = kept_by_count or kept_by_age
        if not keep and status in _DELETABLE:
            chosen.append(run_id)
    return list(reversed(chosen))


def apply_retention(
    database_url: str,
    audit: str,
    retention: Retention,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    progress: Callable[[str, int], None] | None = None,
    announce: Callable[[int, int, str], None] | None = None,
) -> RetentionReport:
    """Delete the runs :func:`expired_runs` chooses, one after the other (``announce(n, of, run)``)."""
    report = RetentionReport(audit, expired_runs(database_url, audit, retention, now=now))
    if dry_run:
        return report
    for n, run_id in enumerate(report.chosen, start=1):
        if announce is not None:
            announce(n, len(report.chosen), run_id)
        report.deleted.append(
            gc_run(database_url, run_id, endpoint_url=endpoint_url, region=region, progress=progress)
        )
        log.info("audit=%s retention deleted run=%s (%d/%d)", audit, run_id, n, len(report.chosen))
    return report


def retain_after(
    database_url: str, run_id: str, *, endpoint_url: str | None = None, region: str | None = None
) -> RetentionReport | None:
    """After an audit run is finalised: apply the retention its audit file set, if any.

    The rule travels in the run's stored spec (``config["retention"]``), checked when the
    audit file was loaded; None when the run belongs to no audit or its audit keeps all.
    """
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        if run is None or not run.audit_name or not (run.config or {}).get("retention"):
            return None
        audit, rule = run.audit_name, Retention.model_validate(run.config["retention"])
    return apply_retention(database_url, audit, rule, endpoint_url=endpoint_url, region=region)
