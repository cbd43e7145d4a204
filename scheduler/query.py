"""Questions users ask of finished runs: which regions drive a class, and how far along a run is."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from schema.db import session_scope
from schema.models import Item, PatchScore, Run


class QueryError(ValueError):
    """The question names a run, class or method that does not exist."""


@dataclass(frozen=True)
class Region:
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_run(database_url: str, run_id: str) -> Run:
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        if run is None:
            recent = session.execute(select(Run.id).order_by(Run.created_at.desc()).limit(5)).scalars().all()
            hint = f"; recent runs: {', '.join(recent)}" if recent else "; no runs are recorded there"
            raise QueryError(f"no run {run_id!r} in {database_url}{hint}")
        session.expunge(run)
        return run


def resolve_class(run: Run, value: str | int) -> int:
    names = list(run.class_names or [])
    text = str(value)
    if text.lstrip("-").isdigit():
        return int(text)
    if text in names:
        return names.index(text)
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    valid = f" (classes: {', '.join(names)})" if names else " (this model has no class names: use an index)"
    raise QueryError(f"unknown class {text!r}{hint}{valid}")


def top_regions(
    database_url: str,
    run_id: str,
    class_: str | int,
    method: str,
    *,
    layer: str | None = None,
    limit: int = 10,
) -> list[Region]:
    """The highest-scoring patches of one class and method across a run (one index scan)."""
    run = get_run(database_url, run_id)
    if method not in run.methods:
        raise QueryError(f"run {run_id} has no method {method!r}; it has {', '.join(run.methods)}")
    target = resolve_class(run, class_)
    names = list(run.class_names or [])
    stmt = (
        select(PatchScore, Item.source_uri, Item.label)
        .join(Item, Item.id == PatchScore.item_id)
        .where(PatchScore.run_id == run_id, PatchScore.method == method, PatchScore.target_class == target)
        .order_by(PatchScore.score.desc(), PatchScore.id)
        .limit(limit)
    )
    if layer is not None:
        stmt = stmt.where(PatchScore.layer == layer)
    with session_scope(database_url) as session:
        return [
            Region(
                item_id=p.item_id,
                source_uri=uri,
                label=label,
                target_class=p.target_class,
                class_name=names[p.target_class] if 0 <= p.target_class < len(names) else None,
                method=p.method,
                layer=p.layer,
                rank=p.rank,
                x0=p.x0,
                y0=p.y0,
                x1=p.x1,
                y1=p.y1,
                score=p.score,
            )
            for p, uri, label in session.execute(stmt).all()
        ]
