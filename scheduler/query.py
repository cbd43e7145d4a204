"""Questions users ask of finished runs: which regions drive a class, and how far along a run is.

The common question (one run, method and class, best scores first) is answered by walking
the index ``ix_patch_scores_top (run_id, method, target_class, score)`` backwards and
stopping after ``limit`` rows, so it costs the same on ten thousand rows as on ten million.
Filters on the item (label, prediction, correctness) join each index row to its item by
primary key and keep walking until enough rows pass; a score range narrows the index range.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import Select, and_, select, text
from sqlalchemy.orm import Session

from schema.db import session_scope
from schema.models import Item, PatchScore, Run, RunStatus, Shard, ShardStatus
from schema.redact import hide_password

__all__ = [
    "DELETING",
    "QueryError",
    "Region",
    "RegionFilters",
    "ResultRow",
    "checked_question",
    "class_name",
    "explain_top_regions",
    "filter_items",
    "get_run",
    "predicted_class",
    "prediction_name",
    "resolve_class",
    "shard_leases",
    "single_logit",
    "top_regions",
    "top_regions_statement",
]

# A run that gc has started to delete; its rows are going and must not be reported.
DELETING = RunStatus.DELETING
MAX_LIMIT = 100_000


class QueryError(ValueError):
    """The question names a run, class or method that does not exist."""


class ResultRow:
    """What every answer's rows (frozen dataclasses) share: a dict for JSON, the CSV columns."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Region(ResultRow):
    item_id: int
    source_uri: str
    label: str | None
    target_class: int
    class_name: str | None
    method: str
    layer: str
    rank: int
    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    pred_class: int | None = None
    correct: bool | None = None


def patch_fields(patch: PatchScore) -> dict[str, Any]:
    """What a region shows of its patch-score row, shared by the CLI's regions and the gallery's cards."""
    return {
        "item_id": patch.item_id,
        "target_class": patch.target_class,
        "method": patch.method,
        "layer": patch.layer,
        "rank": patch.rank,
        "x0": patch.x0,
        "y0": patch.y0,
        "x1": patch.x1,
        "y1": patch.y1,
        "score": patch.score,
    }


@dataclass(frozen=True)
class RegionFilters:
    """Narrow the regions to some items or a score range; ``None`` means no condition."""

    label: str | None = None
    predicted: str | int | None = None
    correct: bool | None = None
    min_score: float | None = None
    max_score: float | None = None

    def check(self) -> None:
        lo, hi = self.min_score, self.max_score
        if lo is not None and hi is not None and lo > hi:
            raise QueryError(f"min score {lo} is above max score {hi}; swap them or drop one")


def _close(value: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    shown = ", ".join(choices[:20]) + (f" … ({len(choices)} in all)" if len(choices) > 20 else "")
    return f"{hint} ({what}: {shown})" if choices else f"{hint} (there are no {what})"


def get_run(database_url: str, run_id: str) -> Run:
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        if run is None:
            where = hide_password(database_url)
            newest = select(Run.id).order_by(Run.created_at.desc()).limit(1000)
            recent = list(session.execute(newest).scalars())
            if not recent:
                raise QueryError(f"no run {run_id!r} in {where}; no runs are recorded there")
            close = difflib.get_close_matches(run_id, recent, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise QueryError(f"no run {run_id!r} in {where}{hint} (recent runs: {', '.join(recent[:5])})")
        session.expunge(run)
        return run


def shard_leases(database_url: str, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """Who runs the run's shards, whose lease ran out (a lost worker not yet replaced), and
    which shards have lost workers before, with the last worker lost."""
    from workers.lease import aware, db_now

    report: dict[str, list[dict[str, Any]]] = {"running": [], "expired": [], "lost": []}
    with session_scope(database_url) as session:
        now = db_now(session)
        shards = session.execute(
            select(Shard)
            .where(Shard.run_id == run_id)
            .where((Shard.status == ShardStatus.RUNNING) | (Shard.lost_leases > 0))
            .order_by(Shard.index)
        ).scalars()
        for shard in shards:
            if shard.status == ShardStatus.RUNNING and shard.lease_expires_at is not None:
                expires = aware(shard.lease_expires_at)
                entry = {
                    "shard": shard.index,
                    "attempt": shard.attempts,
                    "worker": shard.worker,
                    "lease_expires_at": expires.isoformat(),
                }
                if expires > now:
                    report["running"].append(entry)
                else:
                    report["expired"].append(
                        {**entry, "expired_s": round((now - expires).total_seconds(), 1)}
                    )
            if shard.lost_leases:
                report["lost"].append(
                    {
                        "shard": shard.index,
                        "lost_workers": shard.lost_leases,
                        "last_lost_worker": shard.lost_worker,
                        "lost_at": aware(shard.lost_at).isoformat() if shard.lost_at else None,
                        "status": shard.status,
                    }
                )
    return report


def resolve_class(run: Run, value: str | int) -> int:
    names = list(run.class_names or [])
    text_value = str(value)
    if text_value.lstrip("-").isdigit():
        return int(text_value)
    if text_value in names:
        return names.index(text_value)
    close = difflib.get_close_matches(text_value, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    valid = f" (classes: {', '.join(names)})" if names else " (this model has no class names: use an index)"
    raise QueryError(f"unknown class {text_value!r}{hint}{valid}")


def class_name(run: Run, target: int) -> str | None:
    """The run's name of a class index; None for an unnamed class or a scalar target (-1)."""
    names = list(run.class_names or [])
    return str(names[target]) if 0 <= target < len(names) else None


def single_logit(run: Run) -> bool:
    """Whether the run's model has one output (a binary head): its items' ``pred_class`` is then a
    decision, 1 (positive: the class its one name names) or 0, not an index into its names."""
    return len(run.class_names or []) == 1 or run.target_spec == "positive"


def predicted_class(run: Run, value: str | int) -> int:
    """The ``pred_class`` a ``--predicted`` name or index means; a binary head's one name means 1."""
    if single_logit(run) and str(value) in [str(n) for n in run.class_names or []]:
        return 1
    return resolve_class(run, value)


def prediction_name(run: Run, pred: int) -> str | None:
    """What an item's ``pred_class`` says in words: a class name, or a binary head's decision."""
    if single_logit(run):
        names = list(run.class_names or [])
        positive = str(names[0]) if names else "positive"
        return positive if pred == 1 else (f"not {positive}" if names else "negative")
    return class_name(run, pred)


def checked_question(
    database_url: str, run_id: str, class_: str | int, method: str, *, layer: str | None, limit: int
) -> tuple[Run, int]:
    """The run and class index a question about one class and method names, checked against the
    run (it exists and is not being deleted; its method, layer and class; the limit)."""
    run = get_run(database_url, run_id)
    _check_question(run, method, layer, limit)
    return run, resolve_class(run, class_)


def _check_question(run: Run, method: str, layer: str | None, limit: int) -> None:
    if run.status == DELETING:
        raise QueryError(f"run {run.id} is being deleted; `camaudit gc --run {run.id}` finishes the job")
    methods = [str(m) for m in run.methods]
    if method not in methods:
        raise QueryError(f"run {run.id} has no method {method!r}{_close(method, methods, 'its methods')}")
    layers = [str(name) for name in run.layers]
    if layer is not None and layer not in layers:
        raise QueryError(f"run {run.id} has no layer {layer!r}{_close(layer, layers, 'its layers')}")
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be within 1..{MAX_LIMIT}, got {limit}")


def top_regions_statement(
    run: Run, target: int, method: str, *, layer: str | None, limit: int, filters: RegionFilters
) -> Select[Any]:
    """The SQL of :func:`top_regions`, for a run, class and method already checked."""
    stmt = (
        select(PatchScore, Item.source_uri, Item.label, Item.pred_class, Item.correct)
        # run_id on both sides: PostgreSQL then reads one partition of each table.
        .join(Item, and_(Item.id == PatchScore.item_id, Item.run_id == run.id))
        .where(PatchScore.run_id == run.id, PatchScore.method == method, PatchScore.target_class == target)
        .order_by(PatchScore.score.desc(), PatchScore.id)
        .limit(limit)
    )
    if layer is not None:
        stmt = stmt.where(PatchScore.layer == layer)
    if filters.min_score is not None:
        stmt = stmt.where(PatchScore.score >= filters.min_score)
    if filters.max_score is not None:
        stmt = stmt.where(PatchScore.score <= filters.max_score)
    return filter_items(stmt, run, filters)


def filter_items(stmt: Select[Any], run: Run, filters: RegionFilters) -> Select[Any]:
    """``stmt`` (joined to ``items``) narrowed to the items the filters keep: label, prediction, right."""
    if filters.label is not None:
        stmt = stmt.where(Item.label == filters.label)
    if filters.predicted is not None:
        stmt = stmt.where(Item.pred_class == predicted_class(run, filters.predicted))
    if filters.correct is not None:
        stmt = stmt.where(Item.correct.is_(filters.correct))
    return stmt


def serial_plan(session: Session) -> None:
    """Keep this transaction's top-N reads off parallel workers (PostgreSQL; nothing elsewhere).

    A top-N over one run's partition is a short index walk; parallel workers only add their
    start-up (130-190 ms measured on a busy host against 1 ms for the walk). The planner
    picked them when the partitioned parents lacked inherited statistics (the finalisation
    analyses them, ``schema.partitions.analyze_parents``; autovacuum never does).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


def _check_label(session: Session, run: Run, label: str) -> None:
    """Only asked when nothing matched, so the common query never pays for the label scan."""
    labels = list(
        session.execute(
            select(Item.label).where(Item.run_id == run.id, Item.label.is_not(None)).distinct().limit(10_000)
        ).scalars()
    )
    if label not in labels:
        raise QueryError(
            f"no item of run {run.id} has label {label!r}{_close(label, sorted(labels), 'its labels')}"
        )


def top_regions(
    database_url: str,
    run_id: str,
    class_: str | int,
    method: str,
    *,
    layer: str | None = None,
    limit: int = 10,
    label: str | None = None,
    predicted: str | int | None = None,
    correct: bool | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
) -> list[Region]:
    """The highest-scoring patches of one class and method across a run (one index scan).

    ``label`` keeps items with that ground-truth label, ``predicted`` those whose top-1
    prediction is that class (name or index), ``correct`` those whose prediction was right
    (``True``) or wrong (``False``); ``min_score``/``max_score`` bound the score, inclusive.
    """
    filters = RegionFilters(label, predicted, correct, min_score, max_score)
    filters.check()
    run, target = checked_question(database_url, run_id, class_, method, layer=layer, limit=limit)
    stmt = top_regions_statement(run, target, method, layer=layer, limit=limit, filters=filters)
    with session_scope(database_url) as session:
        serial_plan(session)
        found = session.execute(stmt).all()
        if not found and label is not None:
            _check_label(session, run, label)
        return [
            Region(
                **patch_fields(p),
                source_uri=uri,
                label=item_label,
                class_name=class_name(run, p.target_class),
                pred_class=pred,
                correct=ok,
            )
            for p, uri, item_label, pred, ok in found
        ]


def explain_top_regions(
    database_url: str,
    run_id: str,
    class_: str | int,
    method: str,
    *,
    layer: str | None = None,
    limit: int = 10,
    analyze: bool = False,
    **filters: Any,
) -> str:
    """PostgreSQL's plan for :func:`top_regions` with the same arguments, to check it uses the index."""
    run, target = checked_question(database_url, run_id, class_, method, layer=layer, limit=limit)
    stmt = top_regions_statement(
        run, target, method, layer=layer, limit=limit, filters=RegionFilters(**filters)
    )
    with session_scope(database_url) as session:
        serial_plan(session)
        dialect = session.get_bind().dialect
        if dialect.name != "postgresql":
            raise QueryError(f"explain_top_regions reads PostgreSQL plans; this database is {dialect.name}")
        sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        prefix = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
        return "\n".join(session.execute(text(prefix + sql)).scalars())
