"""Pseudo-labels for weak supervision: each map at source size, thresholded into a mask with boxes.

The stored PNG is the map as people see it (min-max normalised, at model-input size). It is
mapped back onto source pixels through the run's own transform (the stretch, centre crop or
letterbox the model's input was made with; ``workers.preprocess.ImageTransform``), sampled
bilinearly with half-pixel centres, so a threshold means the same share of the map's peak in
every image and a mask lies on the source pixels the map's input pixels showed. Source pixels a
centre crop cut off were never seen by the model and are never in a mask. Connected
components (8-connected, ``scipy.ndimage.label``) of at least ``min_area`` source pixels
become the instances; smaller specks are dropped from the mask too.

Two formats: ``png`` writes one 1-bit PNG per (item, class) and a ``masks.jsonl`` manifest with
each mask's instance boxes; ``coco`` writes one COCO instances file, ``coco.json``, whose
segmentations are uncompressed RLE (column-major run lengths, as pycocotools reads them).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from scheduler.exports.common import (
    ExportError,
    ExportReport,
    MapChoice,
    existing_keys,
    iter_maps,
    start_export,
    write_manifest,
)
from schema.models import Heatmap, Item, Run
from workers.heatmap_io import map_to_source
from workers.map_reads import read_map_png
from workers.preprocess import ImageTransform, Preprocess, PreprocessError
from workers.storage import ObjectNotFoundError, Storage, StorageError, open_storage

__all__ = [
    "COCO_KEY",
    "FORMATS",
    "MANIFEST_KEY",
    "Instance",
    "check_options",
    "export_masks",
    "instances",
    "map_at_source",
    "mask_key",
    "rle_encode",
]

FORMATS = ("png", "coco")
MANIFEST_KEY = "masks.jsonl"
COCO_KEY = "coco.json"
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def mask_key(choice: MapChoice, item_id: int, target: int) -> str:
    return f"masks/{choice.method}/{choice.layer}/{item_id}/c{target}.png"


def map_at_source(levels: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """[h, w] float32 in [0, 1] at the source's size: a stored uint8 map (input size) mapped back
    through the image's transform; 0 where the model saw nothing of the source (cropped off)."""
    values, seen = map_to_source(np.asarray(levels, dtype=np.float32) / 255.0, transform)
    values[~seen] = 0.0
    return np.clip(values, 0.0, 1.0, out=values)


class Instance:
    """One connected component: its pixels, tight box (x1/y1 exclusive), area and peak map value."""

    __slots__ = ("area", "box", "mask", "peak")

    def __init__(self, mask: np.ndarray, box: list[int], area: int, peak: float) -> None:
        self.mask = mask
        self.box = box
        self.area = area
        self.peak = peak


def instances(prob: np.ndarray, threshold: float, min_area: int) -> list[Instance]:
    """Components of ``prob >= threshold`` with at least ``min_area`` pixels, largest first."""
    labels, count = ndimage.label(prob >= threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    found = []
    for index, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None or areas[index] < min_area:
            continue
        mask = labels == index
        ys, xs = where
        found.append(
            Instance(mask, [xs.start, ys.start, xs.stop, ys.stop], int(areas[index]), float(prob[mask].max()))
        )
    return sorted(found, key=lambda inst: (-inst.area, inst.box))


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _png_1bit(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask).convert("1").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def check_options(threshold: float, min_area: int, fmt: str) -> None:
    if not 0.0 < threshold < 1.0:
        raise ExportError(
            f"--threshold is a share of each map's peak and must be within (0, 1), got {threshold}"
        )
    if min_area < 0:
        raise ExportError(f"--min-area counts source pixels and must be 0 or more, got {min_area}")
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")


def _read_map(heatmaps: Storage, heatmap: Heatmap) -> np.ndarray:
    try:
        return read_map_png(heatmaps, heatmap)
    except ObjectNotFoundError as exc:
        raise ExportError(f"its map is missing at {heatmaps.locate(heatmap.object_key)}") from exc
    except ValueError as exc:
        raise ExportError(
            f"its stored map {heatmaps.locate(heatmap.object_key)} is not a heatmap: {exc}"
        ) from exc


def _categories(run: Run, targets: set[int]) -> list[dict[str, Any]]:
    names = list(run.class_names or [])
    return [
        {"id": t, "name": str(names[t]) if 0 <= t < len(names) else str(t), "supercategory": "object"}
        for t in sorted(targets)
    ]


def export_masks(
    database_url: str,
    choice: MapChoice,
    storage: Storage,
    *,
    threshold: float = 0.3,
    min_area: int = 16,
    fmt: str = "png",
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ExportReport:
    """Threshold every chosen map at source size; write masks (png) or one COCO file (coco)."""
    check_options(threshold, min_area, fmt)
    start_export(
        storage,
        {
            "kind": "masks",
            "run": choice.run.id,
            "method": choice.method,
            "layer": choice.layer,
            "class": choice.target,
            "threshold": threshold,
            "min_area": min_area,
            "format": fmt,
        },
    )
    try:
        heatmaps = open_storage(
            choice.run.output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False
        )
    except StorageError as exc:
        raise ExportError(f"cannot open the run's heatmaps at {choice.run.output_uri}: {exc}") from exc
    try:
        geometry = Preprocess.from_dict(choice.run.preprocess, geometry_only=True)
    except PreprocessError as exc:
        raise ExportError(f"run {choice.run.id} records no usable preprocessing: {exc}") from exc
    key = MANIFEST_KEY if fmt == "png" else COCO_KEY
    report = ExportReport(out=storage.url, manifest=storage.locate(key))
    have = existing_keys(storage, f"masks/{choice.method}/{choice.layer}/") if fmt == "png" else set()
    rows: list[dict[str, Any]] = []
    images: dict[int, dict[str, Any]] = {}
    annotations: list[dict[str, Any]] = []
    for item, heatmap in iter_maps(database_url, choice):
        if item.id in report.failed:
            continue
        try:
            found = _item_instances(heatmaps, geometry, item, heatmap, threshold, min_area)
        except ExportError as exc:
            report.failed[item.id] = str(exc)
            continue
        if fmt == "png":
            rows.append(_png_row(choice, storage, have, report, item, heatmap, found, threshold))
            continue
        images[item.id] = {
            "id": item.id,
            "file_name": item.source_uri,
            "width": item.width,
            "height": item.height,
        }
        for inst in found:
            x0, y0, x1, y1 = inst.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": item.id,
                    "category_id": heatmap.target_class,
                    "segmentation": rle_encode(inst.mask),
                    "area": inst.area,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                    "score": inst.peak,
                    "target_score": heatmap.target_score,
                }
            )
    if fmt == "png":
        write_manifest(storage, MANIFEST_KEY, rows, report)
        return report
    targets = {a["category_id"] for a in annotations} | (
        {choice.target} if choice.target is not None else set()
    )
    coco = {
        "info": {
            "description": f"pseudo-masks of run {choice.run.id}, {choice.method} / {choice.layer}",
            "threshold": threshold,
            "min_area": min_area,
        },
        "images": list(images.values()),
        "annotations": annotations,
        "categories": _categories(choice.run, targets),
    }
    _write_if_changed(storage, COCO_KEY, (json.dumps(coco) + "\n").encode(), report)
    report.rows = len(annotations)
    report.rows_are = "annotations"
    return report


def _item_instances(
    heatmaps: Storage, geometry: Preprocess, item: Item, heatmap: Heatmap, threshold: float, min_area: int
) -> list[Instance]:
    if not item.width or not item.height:
        raise ExportError("the run recorded no source size for it")
    levels = _read_map(heatmaps, heatmap)
    transform = geometry.transform(item.width, item.height)
    if levels.shape != (transform.input[1], transform.input[0]):
        raise ExportError(
            f"its stored map is {levels.shape[1]}x{levels.shape[0]}, not the run's input size "
            f"{transform.input[0]}x{transform.input[1]}"
        )
    return instances(map_at_source(levels, transform), threshold, min_area)


def _png_row(
    choice: MapChoice,
    storage: Storage,
    have: set[str],
    report: ExportReport,
    item: Item,
    heatmap: Heatmap,
    found: list[Instance],
    threshold: float,
) -> dict[str, Any]:
    key = mask_key(choice, item.id, heatmap.target_class)
    if key in have:
        report.kept += 1
    else:
        mask = np.zeros((item.height or 0, item.width or 0), dtype=bool)
        for inst in found:
            mask |= inst.mask
        storage.put(key, _png_1bit(mask), "image/png")
        report.written += 1
    return {
        "uri": item.source_uri,
        "mask": key,
        "label": item.label,
        "group": item.group_id,
        "item": item.id,
        "method": choice.method,
        "layer": choice.layer,
        "target_class": heatmap.target_class,
        "target_name": choice.class_name(heatmap.target_class),
        "threshold": threshold,
        "instances": [{"box": inst.box, "area": inst.area, "score": inst.peak} for inst in found],
    }


def _write_if_changed(storage: Storage, key: str, data: bytes, report: ExportReport) -> None:
    try:
        if storage.get(key) == data:
            report.kept += 1
            return
    except ObjectNotFoundError:
        pass
    storage.put(key, data, "application/json")
    report.written += 1
    report.manifest_written = True
