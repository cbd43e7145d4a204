"""What each page shows, read with bounded queries so a page costs the same on any run size.

Every list is a page: the runs list uses LIMIT/OFFSET (the runs table holds one row per
audit, never millions), the region gallery walks ``ix_patch_scores_top`` with a keyset
cursor (score, id) so page 1000 costs what page 1 costs, and an item's maps come through the
``(item_id, method, layer, target_class)`` and ``(heatmap_id, rank)`` unique indexes. No
query here reads all the items or patches of a run.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Subquery

from scheduler.alerts import fired_counts
from scheduler.query import (
    DELETING,
    QueryError,
    RegionFilters,
    patch_fields,
    prediction_name,
    resolve_class,
    top_regions_statement,
)
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run, Shard

__all__ = [
    "Card",
    "Cursor",
    "GalleryPage",
    "GalleryQuery",
    "ItemView",
    "MapView",
    "NotFoundError",
    "RunsPage",
    "box_css",
    "class_label",
    "gallery",
    "gallery_statement",
    "item_run",
    "item_view",
    "prediction_label",
    "recent_run_ids",
    "run_shards",
    "runs_page",
    "scan_window",
]

MAX_PAGE = 200
# Index rows a filtered gallery page may read: bounds its cost when few items pass the filters.
SCAN_WINDOW = 10_000
FIRST_WINDOW = 200


class NotFoundError(QueryError):
    """The page or image names an item or run that is not (or no longer) in the database."""


def _choices_hint(value: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{hint} ({what}: {', '.join(choices)})" if choices else f"{hint} (there are no {what})"


def class_label(run: Run, index: int | None) -> str:
    """``3 (cross)`` where the model names its classes, the bare index where it does not."""
    if index is None:
        return "–"
    names = list(run.class_names or [])
    return names[index] if 0 <= index < len(names) else str(index)


def prediction_label(run: Run, pred: int | None) -> str:
    """An item's or case's prediction in words: its class, or a binary head's decision."""
    if pred is None:
        return "–"
    return prediction_name(run, pred) or str(pred)


def box_css(x0: int, y0: int, x1: int, y1: int, width: int | None, height: int | None) -> str:
    """A box in source pixels as CSS percentages, so its outline scales with any thumbnail."""
    if not width or not height:
        return "display:none"
    left, top = 100 * x0 / width, 100 * y0 / height
    w, h = 100 * (x1 - x0) / width, 100 * (y1 - y0) / height
    return f"left:{left:.2f}%;top:{top:.2f}%;width:{w:.2f}%;height:{h:.2f}%"


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunsPage:
    runs: list[Run]
    total: int
    page: int
    size: int
    alerts: dict[str, int] = field(default_factory=dict)  # run id -> fired alert rules

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.size))


def runs_page(database_url: str, *, page: int = 1, size: int = 25) -> RunsPage:
    """Newest first; runs being deleted are left out, as every query leaves them out."""
    if page < 1:
        raise QueryError(f"page numbers start at 1, got {page}")
    if not 1 <= size <= MAX_PAGE:
        raise QueryError(f"page size must be within 1..{MAX_PAGE}, got {size}")
    with session_scope(database_url) as session:
        visible = Run.status != DELETING
        total = session.execute(select(func.count()).select_from(Run).where(visible)).scalar_one()
        runs = list(
            session.execute(
                select(Run)
                .where(visible)
                .order_by(Run.created_at.desc(), Run.id)
                .limit(size)
                .offset((page - 1) * size)
            ).scalars()
        )
        session.expunge_all()
    alerts = fired_counts(database_url, [run.id for run in runs])
    return RunsPage(runs=runs, total=total, page=page, size=size, alerts=alerts)


def recent_run_ids(database_url: str, limit: int = 50) -> list[tuple[str, str]]:
    """(id, label) of the newest runs, for the drift page's pickers."""
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Run.id, Run.name, Run.audit_name, Run.created_at)
            .where(Run.status != DELETING)
            .order_by(Run.created_at.desc(), Run.id)
            .limit(limit)
        ).all()
    return [
        (rid, f"{rid} · {name or audit or 'unnamed'} · {created:%Y-%m-%d %H:%M}")
        for rid, name, audit, created in rows
    ]


def run_shards(database_url: str, run_id: str, *, limit: int = 20) -> list[Shard]:
    """Failed shards first (with their errors), served by the ``shards.run_id`` index."""
    with session_scope(database_url) as session:
        shards = list(
            session.execute(
                select(Shard)
                .where(Shard.run_id == run_id, Shard.status == "failed")
                .order_by(Shard.index)
                .limit(limit)
            ).scalars()
        )
        session.expunge_all()
    return shards


# --------------------------------------------------------------------------- gallery


MAX_ID = 2**63 - 1  # ids are 64-bit integers in both databases


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after the patch with this score and id, in (score desc, id) order."""

    score: float
    id: int

    def encode(self) -> str:
        # repr of a float reads back to the same double, so no row is skipped or repeated.
        return f"{self.score!r}_{self.id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        score, sep, ident = text.rpartition("_")
        try:
            if not sep:
                raise ValueError(text)
            cursor = cls(float(score), int(ident))
        except ValueError:
            raise QueryError(
                f"bad page cursor {text!r}: expected SCORE_ID as the 'next' link writes it; "
                "start again from the first page"
            ) from None
        if not math.isfinite(cursor.score):
            raise QueryError(f"bad page cursor {text[:80]!r}: the score must be a finite number")
        if not 0 <= cursor.id <= MAX_ID:
            raise QueryError(f"bad page cursor {text[:80]!r}: the id must be within 0..{MAX_ID}")
        return cursor


@dataclass(frozen=True)
class GalleryQuery:
    """The run page's filters, checked against the run: the form can only send valid values."""

    target: int
    method: str
    layer: str | None = None
    label: str | None = None
    correct: bool | None = None

    @classmethod
    def from_params(
        cls,
        run: Run,
        *,
        class_: str | None,
        method: str | None,
        layer: str | None,
        label: str | None,
        correct: str | None,
    ) -> GalleryQuery:
        if run.status == DELETING:
            raise QueryError(f"run {run.id} is being deleted; `camaudit gc --run {run.id}` finishes the job")
        methods = [str(m) for m in run.methods]
        method = method or (methods[0] if methods else "")
        if method not in methods:
            raise QueryError(
                f"run {run.id} has no method {method!r}{_choices_hint(method, methods, 'methods')}"
            )
        layers = [str(name) for name in run.layers]
        layer = layer or None
        if layer is not None and layer not in layers:
            raise QueryError(f"run {run.id} has no layer {layer!r}{_choices_hint(layer, layers, 'layers')}")
        target = resolve_class(run, class_) if class_ else 0
        verdicts = {"": None, "correct": True, "incorrect": False}
        verdict = (correct or "").strip().lower()
        if verdict not in verdicts:
            raise QueryError(f"correct must be 'correct', 'incorrect' or empty (any), got {correct!r}")
        return cls(target=target, method=method, layer=layer, label=label or None, correct=verdicts[verdict])


@dataclass(frozen=True)
class Card:
    """One region of the gallery: a patch, its item and where the patch sits in the source image."""

    patch_id: int
    item_id: int
    source_uri: str
    label: str | None
    target_class: int
    method: str
    layer: str
    rank: int
    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    pred_class: int | None
    correct: bool | None
    width: int | None
    height: int | None

    @property
    def box(self) -> str:
        return f"{self.x0},{self.y0},{self.x1},{self.y1}"

    @property
    def box_style(self) -> str:
        return box_css(self.x0, self.y0, self.x1, self.y1, self.width, self.height)


def _after(after: Cursor | None, score: Any, ident: Any) -> list[Any]:
    """Rows after the cursor in (score desc, id) order; ``score <= s`` keeps it an index range."""
    if after is None:
        return []
    return [score <= after.score, or_(score < after.score, and_(score == after.score, ident > after.id))]


def scan_window(run: Run, query: GalleryQuery, *, after: Cursor | None, window: int) -> Subquery:
    """The next ``window`` patches of the class in score order, straight from the top index."""
    conditions = [
        PatchScore.run_id == run.id,
        PatchScore.method == query.method,
        PatchScore.target_class == query.target,
        *_after(after, PatchScore.score, PatchScore.id),
    ]
    if query.layer is not None:
        conditions.append(PatchScore.layer == query.layer)
    return (
        select(PatchScore.id, PatchScore.score)
        .where(*conditions)
        .order_by(PatchScore.score.desc(), PatchScore.id)
        .limit(window)
        .subquery("window")
    )


def gallery_statement(
    run: Run, query: GalleryQuery, *, after: Cursor | None, size: int, window: int = SCAN_WINDOW
) -> Select[Any]:
    """One page of regions, one row more than the page to know whether a next page exists.

    Without item filters this is ``scheduler.query``'s statement (the web and ``camaudit top``
    rank regions alike) plus the cursor. With a label or correctness filter, matching rows may
    be rare, and walking the index until a page fills could read a whole class of a run; so
    the filter looks at no more than ``window`` index rows per page, and the page says so.
    """
    if query.label is None and query.correct is None:
        stmt = top_regions_statement(
            run, query.target, query.method, layer=query.layer, limit=size + 1, filters=RegionFilters()
        )
        return stmt.add_columns(Item.width, Item.height).where(
            *_after(after, PatchScore.score, PatchScore.id)
        )
    scanned = scan_window(run, query, after=after, window=window)
    stmt = (
        select(
            PatchScore, Item.source_uri, Item.label, Item.pred_class, Item.correct, Item.width, Item.height
        )
        .join(scanned, scanned.c.id == PatchScore.id)
        .join(Item, Item.id == PatchScore.item_id)
        .where(PatchScore.run_id == run.id, Item.run_id == run.id)  # one partition of each
        .order_by(scanned.c.score.desc(), scanned.c.id)
        .limit(size + 1)
    )
    if query.label is not None:
        stmt = stmt.where(Item.label == query.label)
    if query.correct is not None:
        stmt = stmt.where(Item.correct.is_(query.correct))
    return stmt


@dataclass(frozen=True)
class GalleryPage:
    cards: list[Card]
    following: Cursor | None
    # Set when the filters kept fewer regions than a page from a full window of index rows.
    scanned: int | None = None


def _card(row: Any) -> Card:
    p, uri, label, pred, ok, width, height = row
    return Card(
        patch_id=p.id,
        **patch_fields(p),
        source_uri=uri,
        label=label,
        pred_class=pred,
        correct=ok,
        width=width,
        height=height,
    )


def gallery(
    database_url: str,
    run: Run,
    query: GalleryQuery,
    *,
    after: Cursor | None = None,
    size: int = 24,
    window: int = SCAN_WINDOW,
) -> GalleryPage:
    """One page of the run's best regions for a class and method, and where the next page starts."""
    if not 1 <= size <= MAX_PAGE:
        raise QueryError(f"page size must be within 1..{MAX_PAGE}, got {size}")
    if window < size + 1:
        raise QueryError(f"the scan window ({window}) must exceed the page size ({size})")
    with session_scope(database_url) as session:
        if query.label is None and query.correct is None:
            rows = session.execute(gallery_statement(run, query, after=after, size=size)).all()
            cards = [_card(row) for row in rows[:size]]
            following = Cursor(cards[-1].score, cards[-1].patch_id) if len(rows) > size else None
            return GalleryPage(cards, following)
        # Common filters fill a page from a few hundred rows; grow the window only when they do not.
        tried = max(size + 1, FIRST_WINDOW)
        while True:
            tried = min(tried, window)
            rows = session.execute(gallery_statement(run, query, after=after, size=size, window=tried)).all()
            cards = [_card(row) for row in rows[:size]]
            if len(rows) > size:
                return GalleryPage(cards, Cursor(cards[-1].score, cards[-1].patch_id))
            scanned = scan_window(run, query, after=after, window=tried)
            if session.execute(select(func.count()).select_from(scanned)).scalar_one() < tried:
                return GalleryPage(cards, None)  # the index ran out: this was the last page
            if tried == window:
                break
            tried *= 8
        score, ident = session.execute(
            select(scanned.c.score, scanned.c.id).order_by(scanned.c.score, scanned.c.id.desc()).limit(1)
        ).one()
    return GalleryPage(cards, Cursor(score, ident), scanned=window)


# --------------------------------------------------------------------------- item


@dataclass(frozen=True)
class MapView:
    heatmap: Heatmap
    patches: list[PatchScore]

    def box_style(self, patch: PatchScore, width: int | None, height: int | None) -> str:
        return box_css(patch.x0, patch.y0, patch.x1, patch.y1, width, height)


@dataclass(frozen=True)
class ItemView:
    item: Item
    run: Run
    maps_by_class: dict[int, list[MapView]] = field(default_factory=dict)
    previous_id: int | None = None
    next_id: int | None = None

    @property
    def n_maps(self) -> int:
        return sum(len(maps) for maps in self.maps_by_class.values())

    def predictions(self) -> list[dict[str, Any]]:
        """Top-k as stored by the worker: [{"class", "name", "prob"}], most probable first."""
        preds = [p for p in (self.item.predictions or []) if isinstance(p, dict)]
        return sorted(preds, key=lambda p: -float(p.get("prob", 0.0)))


def _item_and_run(session: Session, item_id: int) -> tuple[Item, Run]:
    item = session.get(Item, item_id)
    if item is None:
        highest = session.execute(select(func.max(Item.id))).scalar_one()
        known = f"item ids run from 1 to {highest}" if highest else "there are no items at all"
        raise NotFoundError(
            f"no item {item_id} in this database ({known}); the run pages link to existing items"
        )
    run = session.get(Run, item.run_id)
    if run is None or run.status == DELETING:
        raise NotFoundError(f"item {item_id} belongs to run {item.run_id}, which is being deleted")
    return item, run


def item_run(database_url: str, item_id: int) -> Run:
    """The run of an item, for its class names."""
    with session_scope(database_url) as session:
        _item, run = _item_and_run(session, item_id)
        session.expunge_all()
    return run


def item_view(database_url: str, item_id: int) -> ItemView:
    with session_scope(database_url) as session:
        item, run = _item_and_run(session, item_id)
        heatmaps = list(
            session.execute(
                select(Heatmap)
                .where(Heatmap.item_id == item_id)
                .order_by(Heatmap.target_class, Heatmap.method, Heatmap.layer)
            ).scalars()
        )
        patches: dict[int, list[PatchScore]] = {h.id: [] for h in heatmaps}
        if heatmaps:
            for patch in session.execute(
                select(PatchScore)
                .where(PatchScore.heatmap_id.in_(list(patches)))
                .order_by(PatchScore.heatmap_id, PatchScore.rank)
            ).scalars():
                patches[patch.heatmap_id].append(patch)
        neighbours = dict(
            session.execute(
                select(Item.ordinal, Item.id).where(
                    Item.run_id == item.run_id, Item.ordinal.in_([item.ordinal - 1, item.ordinal + 1])
                )
            ).all()
        )
        session.expunge_all()
    by_class: dict[int, list[MapView]] = {}
    for heatmap in heatmaps:
        by_class.setdefault(heatmap.target_class, []).append(MapView(heatmap, patches[heatmap.id]))
    return ItemView(
        item=item,
        run=run,
        maps_by_class=by_class,
        previous_id=neighbours.get(item.ordinal - 1),
        next_id=neighbours.get(item.ordinal + 1),
    )
