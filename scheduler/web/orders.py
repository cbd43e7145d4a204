"""The gallery's other orders: worst maps, regions off the labelled box, attention on borders.

The default gallery shows the best regions; these show what an audit most needs to see,
through the same queries as ``camaudit top --worst / --outside-box / --border``. A map in the
``worst`` and ``border`` orders is shown by its first-ranked patch, where it peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from scheduler.query import QueryError
from scheduler.web.data import Card, GalleryQuery
from scheduler.worst import outside_box_regions, worst_maps
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run

__all__ = ["ORDERS", "OrderedCard", "ordered_cards"]

ORDERS = {
    "": "best regions first",
    "worst": "least energy in the labelled box first",
    "outside-box": "best regions off the labelled box first",
    "border": "most mass on the border first",
}


@dataclass(frozen=True)
class OrderedCard(Card):
    note: str = ""


def ordered_cards(
    database_url: str, run: Run, query: GalleryQuery, order: str, size: int
) -> list[OrderedCard]:
    if order not in ORDERS or not order:
        raise QueryError(f"unknown order {order!r}; use one of {', '.join(o for o in ORDERS if o)}")
    if order == "outside-box":
        regions = outside_box_regions(
            database_url, run.id, query.target, query.method, layer=query.layer, limit=size,
            label=query.label, correct=query.correct,
        )  # fmt: skip
        keyed = [((r.item_id, r.method, r.layer, r.target_class, r.rank), "off the box") for r in regions]
    else:
        maps = worst_maps(
            database_url, run.id, query.target, query.method, order=order, layer=query.layer, limit=size,
            label=query.label, correct=query.correct,
        )  # fmt: skip
        keyed = [
            (
                (m.item_id, m.method, m.layer, m.target_class, 0),
                f"energy in box {m.box_energy:.3f}"
                if order == "worst"
                else f"border share {m.border_share:.3f}",
            )
            for m in maps
        ]
    return _cards(database_url, run.id, keyed)


def _cards(
    database_url: str, run_id: str, keyed: list[tuple[tuple[int, str, str, int, int], str]]
) -> list[OrderedCard]:
    if not keyed:
        return []
    items = {key[0] for key, _ in keyed}
    with session_scope(database_url) as session:
        rows = session.execute(
            select(
                PatchScore,
                Item.source_uri,
                Item.label,
                Item.pred_class,
                Item.correct,
                Item.width,
                Item.height,
            )
            .join(Heatmap, Heatmap.id == PatchScore.heatmap_id)
            .join(Item, Item.id == PatchScore.item_id)
            # the run on every table, so PostgreSQL reads one partition of each
            .where(PatchScore.item_id.in_(items), PatchScore.run_id == run_id)
            .where(Heatmap.run_id == run_id, Item.run_id == run_id)
        ).all()
    found = {(p.item_id, p.method, p.layer, p.target_class, p.rank): row for row in rows for p in [row[0]]}
    cards = []
    for key, note in keyed:
        if key not in found:
            continue
        p, uri, label, pred, ok, width, height = found[key]
        cards.append(
            OrderedCard(
                patch_id=p.id, item_id=p.item_id, source_uri=uri, label=label, target_class=p.target_class,
                method=p.method, layer=p.layer, rank=p.rank, x0=p.x0, y0=p.y0, x1=p.x1, y1=p.y1,
                score=p.score, pred_class=pred, correct=ok, width=width, height=height, note=note,
            )
        )  # fmt: skip
    return cards
