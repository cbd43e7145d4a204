"""A case's views side by side, every view on one colour scale.

Per-view min-max normalisation makes a faint view look as hot as a strong one, which hides
exactly what a multi-view audit asks (which view drives the case). So these overlays come
from the raw maps (``.npy``) divided by one ``vmax``, the largest raw value over the case's
shown maps: the same colour means the same activation in every view.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np
from botocore.exceptions import ClientError
from PIL import Image
from sqlalchemy import select

from scheduler.query import QueryError, get_run, resolve_class
from scheduler.render import RenderError, read_item_source
from schema.db import session_scope
from schema.models import Group, Heatmap, Item, Run
from workers.fetch import SourceRefused
from workers.heatmap_io import overlay_jpeg
from workers.images import ImageDecodeError, open_rgb
from workers.map_reads import read_map_raw
from workers.storage import ObjectNotFoundError, open_storage

__all__ = ["GroupView", "ViewMap", "group_view", "shared_scale_overlay"]

MAX_SIDE = 2048


@dataclass(frozen=True)
class ViewMap:
    item: Item
    heatmap: Heatmap | None


@dataclass(frozen=True)
class GroupView:
    run: Run
    group_id: str
    verdict: Group | None
    method: str
    target: int
    views: list[ViewMap]
    vmax: float


def group_view(
    database_url: str, run_id: str, group_id: str, method: str | None, class_: str | None
) -> GroupView:
    run = get_run(database_url, run_id)
    methods = [str(m) for m in run.methods]
    method = method or methods[0]
    if method not in methods:
        close = difflib.get_close_matches(method, methods, n=3, cutoff=0.4)
        raise QueryError(
            f"run {run.id} has no method {method!r}; did you mean {', '.join(close) or methods[0]}?"
        )
    with session_scope(database_url) as session:
        items = list(
            session.execute(
                select(Item).where(Item.run_id == run.id, Item.group_id == group_id).order_by(Item.ordinal)
            ).scalars()
        )
        if not items:
            known = list(
                session.execute(
                    select(Item.group_id)
                    .where(Item.run_id == run.id, Item.group_id.is_not(None))
                    .distinct()
                    .limit(5000)
                ).scalars()
            )
            close = difflib.get_close_matches(group_id, [str(k) for k in known], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LookupError(f"run {run.id} has no case {group_id!r}{hint}")
        verdict = session.execute(
            select(Group).where(Group.run_id == run.id, Group.group_id == group_id)
        ).scalar_one_or_none()
        if class_:
            target = resolve_class(run, class_)
        elif verdict is not None and verdict.pred_class is not None:
            target = verdict.pred_class
        else:
            target = next((i.pred_class for i in items if i.pred_class is not None), 0)
        layer = str(run.layers[0]) if run.layers else ""
        maps = {
            h.item_id: h
            for h in session.execute(
                select(Heatmap).where(
                    Heatmap.item_id.in_([i.id for i in items]),
                    Heatmap.method == method,
                    Heatmap.layer == layer,
                    Heatmap.target_class == target,
                )
            ).scalars()
        }
        session.expunge_all()
    views = [ViewMap(item, maps.get(item.id)) for item in items]
    vmax = max((v.heatmap.raw_max for v in views if v.heatmap is not None), default=0.0)
    return GroupView(run, group_id, verdict, method, target, views, float(vmax))


def shared_scale_overlay(
    database_url: str,
    heatmap_id: int,
    vmax: float,
    *,
    max_side: int = 512,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> bytes:
    """JPEG of one raw map divided by ``vmax`` (clipped to [0, 1]) over its source image."""
    if not (math.isfinite(vmax) and vmax > 0):
        raise QueryError(f"vmax must be a positive finite number, got {vmax}")
    if not 16 <= max_side <= MAX_SIDE:
        raise QueryError(f"max_side must be within 16..{MAX_SIDE}, got {max_side}")
    with session_scope(database_url) as session:
        heatmap = session.get(Heatmap, heatmap_id)
        if heatmap is None:
            raise LookupError(f"no heatmap {heatmap_id}")
        item = session.get(Item, heatmap.item_id)
        run = session.get(Run, heatmap.run_id)
        assert item is not None and run is not None
        session.expunge_all()
    storage = open_storage(run.output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False)
    try:
        raw = read_map_raw(storage, heatmap).astype(np.float32)
    except ObjectNotFoundError as exc:
        raise RenderError(
            f"the raw map of item {item.id} is missing at {storage.locate(heatmap.raw_key)}"
        ) from exc
    except ValueError as exc:
        raise RenderError(f"the raw map of item {item.id} is not a map: {exc}") from exc
    try:
        image = open_rgb(
            read_item_source(run, item.source_uri, endpoint_url=endpoint_url, region=region),
            name=item.source_uri,
        )
    except (OSError, ClientError, ImageDecodeError, SourceRefused) as exc:
        raise RenderError(f"cannot read the source image of item {item.id}: {type(exc).__name__}") from exc
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    scaled = np.clip(np.nan_to_num(raw, nan=0.0) / vmax, 0.0, 1.0)
    return overlay_jpeg(image, scaled, alpha=0.5)
