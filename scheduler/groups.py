"""Per-case rows for grouped items: a single-view model's predictions fused across a case's views.

A case (the items sharing a ``group_id``) is judged as one: its class probabilities are the
``mean`` or ``max`` over its views of each view's softmax probabilities (``items.predictions``),
its prediction the most probable class, its score that class's fused probability. A case with
a failed view is ``failed`` with the reason naming the view, never judged on the views left.
Written when a run is finalised; ``top_groups`` ranks cases by their best region across views.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, func, select

from scheduler.query import (
    QueryError,
    Region,
    RegionFilters,
    checked_question,
    class_name,
    get_run,
    patch_fields,
    single_logit,
)
from scheduler.query import top_regions_statement as _regions
from schema.db import session_scope
from schema.models import Group, Item, ItemStatus, Run

__all__ = ["FUSIONS", "GroupRegion", "fuse", "group_counts", "top_groups", "write_groups"]

FUSIONS = ("mean", "max")
PAGE = 1000


def fuse(predictions: list[list[dict[str, Any]]], fusion: str) -> dict[int, float]:
    """Class -> fused probability over views; a class missing from a view's top-k counts as 0 there."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown group fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    per_view = [{int(p["class"]): float(p["prob"]) for p in view} for view in predictions]
    classes = sorted({c for view in per_view for c in view})
    if fusion == "mean":
        return {c: sum(view.get(c, 0.0) for view in per_view) / len(per_view) for c in classes}
    return {c: max(view.get(c, 0.0) for view in per_view) for c in classes}


def _group_row(run: Run, group: str, items: list[Item], fusion: str) -> dict[str, Any]:
    labels = Counter(i.label for i in items if i.label is not None)
    row: dict[str, Any] = {
        "run_id": run.id,
        "group_id": group,
        "label": labels.most_common(1)[0][0] if labels else None,
        "n_items": len(items),
        "fusion": fusion,
        "status": ItemStatus.DONE,
        "error": None,
        "pred_class": None,
        "score": None,
        "correct": None,
    }
    bad = [i for i in items if i.status != ItemStatus.DONE or not i.predictions]
    if bad:
        row["status"] = ItemStatus.FAILED
        row["error"] = "; ".join(
            f"view {i.source_uri} is {i.status}: {i.error or 'no prediction'}" for i in bad
        )
        return row
    fused = fuse([list(i.predictions or []) for i in items], fusion)
    names = list(run.class_names or [])
    if single_logit(run):  # the fused sigmoid decides, as each view's does (shard_rows.prediction_rows_of)
        positive = fused.get(0, 0.0)
        pred = int(positive > 0.5)
        row.update(pred_class=pred, score=positive if pred else 1.0 - positive)
        if row["label"] is not None and names:
            row["correct"] = (pred == 1) == (row["label"] == names[0])
        return row
    pred = max(fused, key=lambda c: (fused[c], -c))
    row.update(pred_class=pred, score=fused[pred])
    if row["label"] is not None and names:
        row["correct"] = 0 <= pred < len(names) and names[pred] == row["label"]
    return row


def write_groups(database_url: str, run_id: str) -> int:
    """Replace the run's group rows from its items; returns how many groups it has."""
    run = get_run(database_url, run_id)
    fusion = str((run.config or {}).get("group_fusion") or "mean")
    with session_scope(database_url) as session:
        items = session.execute(
            select(Item).where(Item.run_id == run.id, Item.group_id.is_not(None)).order_by(Item.ordinal)
        ).scalars()
        groups: dict[str, list[Item]] = {}
        for item in items:
            groups.setdefault(str(item.group_id), []).append(item)
        rows = [_group_row(run, group, members, fusion) for group, members in groups.items()]
        session.execute(delete(Group).where(Group.run_id == run.id))
        for start in range(0, len(rows), 5000):
            session.add_all(Group(**row) for row in rows[start : start + 5000])
    return len(rows)


def group_counts(database_url: str, run_id: str) -> dict[str, int]:
    """Cases of a run: all (from its items), and done / failed once the run is finalised."""
    with session_scope(database_url) as session:
        total = session.execute(
            select(func.count(func.distinct(Item.group_id))).where(Item.run_id == run_id)
        ).scalar_one()
        by_status = dict(
            session.execute(
                select(Group.status, func.count()).where(Group.run_id == run_id).group_by(Group.status)
            ).all()
        )
    return {
        "groups": int(total),
        "groups_done": int(by_status.get(ItemStatus.DONE, 0)),
        "groups_failed": int(by_status.get(ItemStatus.FAILED, 0)),
    }


@dataclass(frozen=True)
class GroupRegion:
    """A case's best region of a class across its views, with the case's fused verdict."""

    group_id: str
    group_label: str | None
    group_pred: int | None
    group_score: float | None
    region: Region

    def as_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "group_label": self.group_label,
            "group_pred": self.group_pred,
            "group_score": self.group_score,
            **asdict(self.region),
        }


def top_groups(
    database_url: str,
    run_id: str,
    class_: str | int,
    method: str,
    *,
    layer: str | None = None,
    limit: int = 10,
) -> list[GroupRegion]:
    """Cases ranked by their best patch of a class across their views (one row per case)."""
    run, target = checked_question(database_url, run_id, class_, method, layer=layer, limit=limit)
    found: list[GroupRegion] = []
    seen: set[str] = set()
    offset = 0
    with session_scope(database_url) as session:
        verdicts = {
            g.group_id: g for g in session.execute(select(Group).where(Group.run_id == run.id)).scalars()
        }
        if (
            not verdicts
            and not session.execute(
                select(Item.id).where(Item.run_id == run.id, Item.group_id.is_not(None)).limit(1)
            ).first()
        ):
            raise QueryError(f"run {run.id} has no grouped items; a manifest's group_id makes cases")
        while len(found) < limit:
            stmt = _regions(run, target, method, layer=layer, limit=PAGE, filters=RegionFilters())
            page = session.execute(
                stmt.add_columns(Item.group_id).where(Item.group_id.is_not(None)).offset(offset)
            ).all()
            for patch, uri, label, pred, ok, group in page:
                if group in seen:
                    continue
                seen.add(group)
                verdict = verdicts.get(group)
                region = Region(
                    **patch_fields(patch),
                    source_uri=uri,
                    label=label,
                    class_name=class_name(run, patch.target_class),
                    pred_class=pred,
                    correct=ok,
                )
                found.append(
                    GroupRegion(
                        group_id=str(group),
                        group_label=verdict.label if verdict else None,
                        group_pred=verdict.pred_class if verdict else None,
                        group_score=verdict.score if verdict else None,
                        region=region,
                    )
                )
                if len(found) == limit:
                    break
            if len(page) < PAGE:
                break
            offset += PAGE
    return found
