"""CAM-guided regions for a second model: each map's top patches cut from the source image.

Patch boxes are stored in source pixels, so a crop is the source's own pixels at its own
resolution (optionally resized to ``size`` x ``size`` for a model that wants one input size),
not the model-input image the first model saw. The manifest is an ordinary ``camaudit``
source manifest: ``uri`` (relative to the manifest), ``label`` (the item's ground truth) and
``group`` are the fields a run reads; the rest say where the crop came from.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image
from sqlalchemy import select

from scheduler.exports.common import (
    ExportError,
    ExportReport,
    MapChoice,
    existing_keys,
    iter_maps,
    read_source,
    start_export,
    write_manifest,
)
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore
from workers.storage import Storage

__all__ = ["MANIFEST_KEY", "MAX_SIZE", "check_options", "crop_key", "export_rois"]

MANIFEST_KEY = "rois.jsonl"
MAX_SIZE = 4096


def crop_key(choice: MapChoice, item_id: int, target: int, rank: int) -> str:
    """Deterministic: the same run, map and rank always land at the same key."""
    return f"crops/{choice.method}/{choice.layer}/{item_id}/c{target}_r{rank}.png"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _patches(database_url: str, heatmap_ids: list[int], top: int) -> dict[int, list[PatchScore]]:
    found: dict[int, list[PatchScore]] = {h: [] for h in heatmap_ids}
    with session_scope(database_url) as session:
        stmt = (
            select(PatchScore)
            .where(PatchScore.heatmap_id.in_(heatmap_ids), PatchScore.rank < top)
            .order_by(PatchScore.heatmap_id, PatchScore.rank)
        )
        for patch in session.execute(stmt).scalars():
            found[patch.heatmap_id].append(patch)
        session.expunge_all()
    return found


def check_options(choice: MapChoice, top: int, size: int | None) -> None:
    stored = choice.run.top_patches
    if not 1 <= top <= stored:
        raise ExportError(
            f"--top must be within 1..{stored}: run {choice.run.id} stores {stored} patches per map"
        )
    if size is not None and not 1 <= size <= MAX_SIZE:
        raise ExportError(f"--size must be within 1..{MAX_SIZE} pixels, got {size}")


def export_rois(
    database_url: str,
    choice: MapChoice,
    storage: Storage,
    *,
    top: int,
    size: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ExportReport:
    """Write the top ``top`` crops of every chosen map, then the manifest; skip crops already there."""
    check_options(choice, top, size)
    start_export(
        storage,
        {
            "kind": "rois",
            "run": choice.run.id,
            "method": choice.method,
            "layer": choice.layer,
            "class": choice.target,
            "top": top,
            "size": size,
        },
    )
    report = ExportReport(out=storage.url, manifest=storage.locate(MANIFEST_KEY))
    have = existing_keys(storage, f"crops/{choice.method}/{choice.layer}/")
    rows: list[dict[str, Any]] = []
    maps = list(iter_maps(database_url, choice))
    for start in range(0, len(maps), 200):
        page = maps[start : start + 200]
        patches = _patches(database_url, [h.id for _, h in page], top)
        for item, heatmap in page:
            if item.id in report.failed:
                continue
            try:
                rows.extend(
                    _item_rows(
                        choice,
                        item,
                        heatmap,
                        patches[heatmap.id],
                        storage,
                        have,
                        report,
                        size=size,
                        endpoint_url=endpoint_url,
                        region=region,
                    )
                )
            except ExportError as exc:
                report.failed[item.id] = str(exc)
    write_manifest(storage, MANIFEST_KEY, rows, report)
    return report


def _item_rows(
    choice: MapChoice,
    item: Item,
    heatmap: Heatmap,
    patches: list[PatchScore],
    storage: Storage,
    have: set[str],
    report: ExportReport,
    *,
    size: int | None,
    endpoint_url: str | None,
    region: str | None,
) -> list[dict[str, Any]]:
    keys = [crop_key(choice, item.id, heatmap.target_class, p.rank) for p in patches]
    missing = [k not in have for k in keys]
    image = read_source(choice.run, item, endpoint_url=endpoint_url, region=region) if any(missing) else None
    rows = []
    for patch, key, to_write in zip(patches, keys, missing, strict=True):
        box = [patch.x0, patch.y0, patch.x1, patch.y1]
        if image is not None and to_write:
            if not (0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height):
                raise ExportError(f"patch box {box} lies outside the {image.width}x{image.height} source")
            crop = image.crop(tuple(box))
            if size is not None:
                crop = crop.resize((size, size), Image.Resampling.BILINEAR)
            storage.put(key, _png(crop), "image/png")
            report.written += 1
        else:
            report.kept += 1
        rows.append(
            {
                "uri": key,
                "label": item.label,
                "group": item.group_id,
                "item": item.id,
                "rank": patch.rank,
                "source_uri": item.source_uri,
                "source_box": box,
                "score": patch.score,
                "method": choice.method,
                "layer": choice.layer,
                "target_class": heatmap.target_class,
                "target_name": choice.class_name(heatmap.target_class),
            }
        )
    return rows
