"""The worst cases instead of the best: maps that miss the object, regions off it, borders.

Papers and dashboards show the maps that look right; an audit needs the ones that do not.
Three orders, each one index walk within a run, method and class:

* ``worst``: least energy inside the labelled box first (``ix_heatmaps_box_energy``);
* ``border``: most mass in the outer 10 % band first (``ix_heatmaps_border_share``);
* ``outside-box``: the top-scoring patches that do not overlap their item's labelled box
  (``ix_patch_scores_top``, filtered page by page): where the model looks instead of the object.

Only items with a labelled box take part in ``worst`` and ``outside-box``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, select

from scheduler.query import (
    MAX_LIMIT,
    QueryError,
    Region,
    RegionFilters,
    ResultRow,
    checked_question,
    class_name,
    filter_items,
    patch_fields,
    serial_plan,
    top_regions_statement,
)
from schema.db import session_scope
from schema.models import Heatmap, Item

__all__ = ["ORDERS", "WorstMap", "outside_box_regions", "overlaps", "worst_maps"]

ORDERS = ("worst", "border")
PAGE = 1000


@dataclass(frozen=True)
class WorstMap(ResultRow):
    item_id: int
    source_uri: str
    label: str | None
    target_class: int
    class_name: str | None
    method: str
    layer: str
    box_energy: float | None
    box_hit: bool | None
    outside_mass: float | None
    border_share: float | None
    pred_class: int | None = None
    correct: bool | None = None


def overlaps(box: list[float] | None, x0: int, y0: int, x1: int, y1: int) -> bool:
    """Whether the patch (x1/y1 exclusive) shares any area with the labelled box."""
    if not box:
        return False
    bx0, by0, bx1, by1 = (float(v) for v in box)
    return x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1


def worst_maps(
    database_url: str,
    run_id: str,
    class_: str | int,
    method: str,
    *,
    order: str = "worst",
    layer: str | None = None,
    limit: int = 10,
    label: str | None = None,
    correct: bool | None = None,
) -> list[WorstMap]:
    """The maps of one class and method that miss their box most (``worst``) or sit on the border."""
    if order not in ORDERS:
        raise QueryError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    run, target = checked_question(database_url, run_id, class_, method, layer=layer, limit=limit)
    key = Heatmap.box_energy.asc() if order == "worst" else Heatmap.border_share.desc()
    column = Heatmap.box_energy if order == "worst" else Heatmap.border_share
    stmt = (
        select(Heatmap, Item.source_uri, Item.label, Item.pred_class, Item.correct)
        # run_id on both sides: PostgreSQL then reads one partition of each table.
        .join(Item, and_(Item.id == Heatmap.item_id, Item.run_id == run.id))
        .where(
            Heatmap.run_id == run.id,
            Heatmap.method == method,
            Heatmap.target_class == target,
            column.is_not(None),
        )
        .order_by(key, Heatmap.id)
        .limit(limit)
    )
    if layer is not None:
        stmt = stmt.where(Heatmap.layer == layer)
    stmt = filter_items(stmt, run, RegionFilters(label=label, correct=correct))
    with session_scope(database_url) as session:
        serial_plan(session)
        return [
            WorstMap(
                item_id=h.item_id,
                source_uri=uri,
                label=item_label,
                target_class=h.target_class,
                class_name=class_name(run, h.target_class),
                method=h.method,
                layer=h.layer,
                box_energy=h.box_energy,
                box_hit=h.box_hit,
                outside_mass=h.outside_mass,
                border_share=h.border_share,
                pred_class=pred,
                correct=ok,
            )
            for h, uri, item_label, pred, ok in session.execute(stmt).all()
        ]


def outside_box_regions(
    database_url: str,
    run_id: str,
    class_: str | int,
    method: str,
    *,
    layer: str | None = None,
    limit: int = 10,
    label: str | None = None,
    correct: bool | None = None,
) -> list[Region]:
    """The best-scoring patches of a class that lie off their item's labelled box, best first."""
    run, target = checked_question(database_url, run_id, class_, method, layer=layer, limit=limit)
    filters = RegionFilters(label=label, correct=correct)
    found: list[Region] = []
    offset = 0
    with session_scope(database_url) as session:
        serial_plan(session)
        while len(found) < limit:
            stmt = top_regions_statement(run, target, method, layer=layer, limit=PAGE, filters=filters)
            page = session.execute(
                stmt.add_columns(Item.box).where(Item.box.is_not(None)).offset(offset)
            ).all()
            for patch, uri, item_label, pred, ok, box in page:
                if box and not overlaps(box, patch.x0, patch.y0, patch.x1, patch.y1):
                    found.append(
                        Region(
                            **patch_fields(patch),
                            source_uri=uri,
                            label=item_label,
                            class_name=class_name(run, patch.target_class),
                            pred_class=pred,
                            correct=ok,
                        )
                    )
                    if len(found) == limit:
                        break
            if len(page) < PAGE or offset + PAGE > MAX_LIMIT * 10:
                break
            offset += PAGE
    return found
