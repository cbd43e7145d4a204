"""What every export shares: choosing a run's maps, the destination, resuming, the manifest.

An export is a folder (or ``s3://`` prefix) that holds ``export.json`` (what was asked for),
the exported objects under deterministic keys, and a manifest written last. Keys depend only
on the run's rows and the options, so a second call with the same options finds every object
already there and writes nothing; a call with other options into the same place is refused
instead of mixing two exports.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image
from sqlalchemy import select

from scheduler.query import DELETING, QueryError, get_run, resolve_class
from scheduler.render import read_item_source
from schema.db import session_scope
from schema.models import Heatmap, Item, ItemStatus, Run
from workers.fetch import SourceRefused
from workers.images import ImageDecodeError, open_rgb
from workers.storage import ObjectNotFoundError, Storage, StorageError, open_storage

__all__ = [
    "PARAMS_KEY",
    "ExportError",
    "ExportReport",
    "MapChoice",
    "choose_maps",
    "iter_maps",
    "open_destination",
    "read_source",
    "start_export",
    "write_manifest",
]

PARAMS_KEY = "export.json"
PAGE = 500


class ExportError(ValueError):
    """The export cannot start: unknown run, method, layer or class, bad option, bad destination."""


@dataclass(frozen=True)
class MapChoice:
    """Which of a run's heatmaps an export reads: one method and layer, every class or one."""

    run: Run
    method: str
    layer: str
    target: int | None

    def class_name(self, target: int) -> str | None:
        names = list(self.run.class_names or [])
        return str(names[target]) if 0 <= target < len(names) else None


@dataclass
class ExportReport:
    """What a call did; ``failed`` maps an item id to the reason it was left out."""

    out: str
    manifest: str
    written: int = 0
    kept: int = 0
    rows: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    manifest_written: bool = False
    rows_are: str = "manifest rows"

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "manifest": self.manifest,
            "written": self.written,
            "kept": self.kept,
            "rows": self.rows,
            "failed": {str(k): v for k, v in self.failed.items()},
            "manifest_written": self.manifest_written,
        }


def _closest(value: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{hint} ({what}: {', '.join(choices) or 'none'})"


def choose_maps(
    database_url: str, run_id: str, method: str, *, layer: str | None, class_: str | int | None
) -> MapChoice:
    """Check the run, method, layer and class against what the run holds, before anything is written."""
    try:
        run = get_run(database_url, run_id)
    except QueryError as exc:
        raise ExportError(str(exc)) from exc
    if run.status == DELETING:
        raise ExportError(f"run {run.id} is being deleted; `camaudit gc --run {run.id}` finishes the job")
    methods = [str(m) for m in run.methods]
    if method not in methods:
        raise ExportError(f"run {run.id} has no method {method!r}{_closest(method, methods, 'its methods')}")
    layers = [str(name) for name in run.layers]
    if layer is None:
        if len(layers) != 1:
            raise ExportError(
                f"run {run.id} has several layers; choose one with --layer ({', '.join(layers)})"
            )
        layer = layers[0]
    elif layer not in layers:
        raise ExportError(f"run {run.id} has no layer {layer!r}{_closest(layer, layers, 'its layers')}")
    target = None
    if class_ is not None:
        try:
            target = resolve_class(run, class_)
        except QueryError as exc:
            raise ExportError(str(exc)) from exc
    return MapChoice(run=run, method=method, layer=layer, target=target)


def iter_maps(database_url: str, choice: MapChoice) -> Iterator[tuple[Item, Heatmap]]:
    """Done items and their chosen maps in item then class order, a page at a time."""
    after = (-1, -1)
    while True:
        stmt = (
            select(Item, Heatmap)
            .join(Heatmap, Heatmap.item_id == Item.id)
            .where(
                Heatmap.run_id == choice.run.id,
                Item.run_id == choice.run.id,  # one partition of items too
                Heatmap.method == choice.method,
                Heatmap.layer == choice.layer,
                Item.status == ItemStatus.DONE,
                (Item.id > after[0]) | ((Item.id == after[0]) & (Heatmap.target_class > after[1])),
            )
            .order_by(Item.id, Heatmap.target_class)
            .limit(PAGE)
        )
        if choice.target is not None:
            stmt = stmt.where(Heatmap.target_class == choice.target)
        with session_scope(database_url) as session:
            page = [(item, heatmap) for item, heatmap in session.execute(stmt).all()]
            session.expunge_all()
        yield from page
        if len(page) < PAGE:
            return
        after = (page[-1][0].id, page[-1][1].target_class)


def open_destination(out: str, *, endpoint_url: str | None, region: str | None) -> Storage:
    """A folder (created) or an existing ``s3://bucket/prefix``; a file in the way is refused."""
    if not out.strip():
        raise ExportError("--out is empty; give a folder or s3://bucket/prefix")
    if "://" not in out and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise ExportError(f"--out {out} is a file; give a folder (it is created) or s3://bucket/prefix")
    try:
        return open_storage(out, endpoint_url=endpoint_url, region=region, create_bucket=False)
    except StorageError as exc:
        raise ExportError(str(exc)) from exc


def start_export(storage: Storage, params: dict[str, Any]) -> None:
    """Record what this export is; refuse a destination that holds a different export."""
    wanted = json.dumps(params, sort_keys=True, indent=1) + "\n"
    try:
        found = storage.get(PARAMS_KEY).decode("utf-8", errors="replace")
    except ObjectNotFoundError:
        storage.put(PARAMS_KEY, wanted.encode(), "application/json")
        return
    if found != wanted:
        try:
            earlier = json.loads(found)
            described = ", ".join(f"{k}={earlier[k]}" for k in sorted(earlier) if earlier[k] != params.get(k))
        except (json.JSONDecodeError, TypeError, KeyError):
            described = "unreadable parameters"
        raise ExportError(
            f"{storage.locate(PARAMS_KEY)} records another export ({described or 'other options'}); "
            "give another --out, or repeat that export's options to resume it"
        )


def read_source(run: Run, item: Item, *, endpoint_url: str | None, region: str | None) -> Image.Image:
    """The item's source image, oriented and in 8-bit RGB as the worker decoded it, at its stored size.

    Read as the workers read it: within the run's source roots and the byte cap.
    """
    try:
        data = read_item_source(run, item.source_uri, endpoint_url=endpoint_url, region=region)
    except SourceRefused as exc:
        raise ExportError(f"cannot read the source image: {exc}") from exc
    except OSError as exc:
        raise ExportError(f"cannot read the source image: {exc.strerror or type(exc).__name__}") from exc
    except (ValueError, ClientError, BotoCoreError) as exc:
        raise ExportError(f"cannot read the source image: {type(exc).__name__}") from exc
    try:
        image = open_rgb(data, name=item.source_uri)
    except ImageDecodeError as exc:
        raise ExportError(f"cannot decode the source image: {exc}") from exc
    if item.width is not None and item.height is not None and image.size != (item.width, item.height):
        raise ExportError(
            f"the source is now {image.width}x{image.height} but was {item.width}x{item.height} when "
            "the run explained it; it has changed since, so its stored boxes do not fit"
        )
    return image


def existing_keys(storage: Storage, prefix: str) -> set[str]:
    return set(storage.list(prefix))


def write_manifest(storage: Storage, key: str, rows: list[dict[str, Any]], report: ExportReport) -> None:
    """One JSON object per line, written last and only when it differs from what is there."""
    data = "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows).encode()
    report.rows = len(rows)
    try:
        if storage.get(key) == data:
            return
    except ObjectNotFoundError:
        pass
    storage.put(key, data, "application/x-ndjson")
    report.manifest_written = True
