"""One heatmap as people look at it: the JET overlay on the source image, at the source's size.

Workers store maps at model-input size only (the PNG) and never an overlay, which would
cost a JPEG per map per run; this renders one on demand from the stored PNG and the
source image. The map goes back to the source through the run's recorded transform (stretch,
centre crop or letterbox), so every activation lies over the pixels that caused it; what a
crop cut off is shown dimmed, since the model never saw it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from botocore.exceptions import ClientError
from PIL import Image
from sqlalchemy import select

from scheduler.query import DELETING, resolve_class
from schema.db import session_scope
from schema.models import Heatmap, Item, Run
from schema.redact import hide_password
from schema.settings import get_settings
from workers.fetch import read_source, run_roots
from workers.heatmap_io import JPEG_MAX_SIDE, overlay_jpeg
from workers.images import ImageDecodeError, open_rgb
from workers.map_reads import read_map_png
from workers.preprocess import Preprocess
from workers.storage import ObjectNotFoundError, open_storage

__all__ = ["Frame", "RenderError", "Rendered", "render_overlay"]

# (source width, height) -> (the source region to draw (left, top, right, bottom), output size)
Frame = Callable[[int, int], tuple[tuple[int, int, int, int], tuple[int, int]]]


class RenderError(ValueError):
    """The item, its heatmap, the stored map or the source image cannot be found or read."""


@dataclass(frozen=True)
class Rendered:
    jpeg: bytes
    width: int
    height: int
    item_id: int
    method: str
    layer: str
    target_class: int
    object_key: str
    source_uri: str


@dataclass(frozen=True)
class _Target:
    run: Run
    item: Item
    heatmap: Heatmap


def _describe(heatmaps: list[Heatmap], names: list[str]) -> str:
    def label(c: int) -> str:
        return f"{c} ({names[c]})" if 0 <= c < len(names) else str(c)

    return "; ".join(sorted({f"{h.method} / {h.layer} / class {label(h.target_class)}" for h in heatmaps}))


def _pick(
    heatmaps: list[Heatmap], run: Run, item_id: int, method: str, target: int, layer: str | None
) -> Heatmap:
    names = list(run.class_names or [])
    if not heatmaps:
        raise RenderError(f"item {item_id} has no heatmaps (its status may be failed or pending)")
    methods = sorted({h.method for h in heatmaps})
    if method not in methods:
        close = difflib.get_close_matches(method, methods, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RenderError(f"item {item_id} has no {method!r} heatmap{hint} (methods: {', '.join(methods)})")
    found = [h for h in heatmaps if h.method == method and h.target_class == target]
    if layer is not None:
        layers = sorted({h.layer for h in found})
        found = [h for h in found if h.layer == layer]
        if not found and layers:
            close = difflib.get_close_matches(layer, layers, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RenderError(f"item {item_id} has no layer {layer!r}{hint} (layers: {', '.join(layers)})")
    if not found:
        raise RenderError(
            f"item {item_id} has no {method} heatmap of class {target} (it has: {_describe(heatmaps, names)})"
        )
    if len(found) > 1:
        layers = ", ".join(sorted(h.layer for h in found))
        raise RenderError(
            f"item {item_id} has {method} maps at several layers ({layers}); pick one with layer="
        )
    return found[0]


def _find(database_url: str, item_id: int, method: str, class_: str | int, layer: str | None) -> _Target:
    with session_scope(database_url) as session:
        item = session.get(Item, item_id)
        if item is None:
            raise RenderError(
                f"no item {item_id} in {hide_password(database_url)}; `camaudit top` lists item ids"
            )
        run = session.get(Run, item.run_id)
        if run is None or run.status == DELETING:
            raise RenderError(f"item {item_id} belongs to run {item.run_id}, which is being deleted")
        target = resolve_class(run, class_)
        heatmaps = list(session.execute(select(Heatmap).where(Heatmap.item_id == item_id)).scalars())
        heatmap = _pick(heatmaps, run, item_id, method, target, layer)
        session.expunge_all()
        return _Target(run, item, heatmap)


def read_item_source(run: Run, uri: str, *, endpoint_url: str | None, region: str | None) -> bytes:
    """An item's source read as its workers read it: within the run's source roots and the byte cap."""
    settings = get_settings()
    return read_source(
        uri,
        roots=run_roots(run.config, run.source_uri, settings.source_roots),
        max_bytes=settings.max_source_bytes,
        endpoint_url=endpoint_url,
        region=region,
    )


def _source_image(data: bytes, uri: str) -> Image.Image:
    """Oriented and in 8-bit RGB exactly as the worker decoded it, so map and pixels line up."""
    try:
        return open_rgb(data, name=uri)
    except ImageDecodeError as exc:
        raise RenderError(f"cannot decode the source image {uri}: {exc}") from exc


def render_overlay(
    database_url: str,
    item_id: int,
    method: str,
    class_: str | int,
    *,
    layer: str | None = None,
    alpha: float = 0.5,
    quality: int = 90,
    endpoint_url: str | None = None,
    region: str | None = None,
    frame: Frame | None = None,
) -> Rendered:
    """JPEG of the item's stored map (JET, weight ``alpha``) over its source image, at the source's size.

    With ``frame``, only that region is drawn, at that size: the source is cut and shrunk first
    and the map sampled there through the run's transform, so a thumbnail of a 12-megapixel
    source costs a thumbnail's memory.
    """
    found = _find(database_url, item_id, method, class_, layer)
    storage = open_storage(
        found.run.output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False
    )
    try:
        levels = read_map_png(storage, found.heatmap)
    except ObjectNotFoundError as exc:
        raise RenderError(
            f"the map of item {item_id} is missing at {storage.locate(found.heatmap.object_key)}; "
            "was the storage moved or emptied? `camaudit resume` cannot rewrite maps of done shards"
        ) from exc
    except ValueError as exc:
        raise RenderError(
            f"stored map {storage.locate(found.heatmap.object_key)} is not a heatmap: {exc}"
        ) from exc
    try:
        data = read_item_source(found.run, found.item.source_uri, endpoint_url=endpoint_url, region=region)
    except (OSError, ClientError, ValueError) as exc:
        raise RenderError(
            f"cannot read the source image {found.item.source_uri} of item {item_id}: {exc}"
        ) from exc
    image = _source_image(data, found.item.source_uri)
    transform = Preprocess.from_dict(found.run.preprocess, geometry_only=True).transform(
        image.width, image.height
    )
    if levels.shape != (transform.input[1], transform.input[0]):
        raise RenderError(
            f"stored map {found.heatmap.object_key} is {levels.shape[1]}x{levels.shape[0]}, not the run's "
            f"input size {transform.input[0]}x{transform.input[1]}"
        )
    region = None
    if frame is not None:
        region, size = frame(image.width, image.height)
        image = image.resize(size, Image.Resampling.BILINEAR, box=region, reducing_gap=2.0)
    if max(image.size) > JPEG_MAX_SIDE:
        raise RenderError(
            f"the source of item {item_id} is {image.width}x{image.height} pixels; a JPEG overlay can be "
            f"at most {JPEG_MAX_SIDE:,} pixels on a side: draw a part of it or a smaller copy"
        )
    map01 = levels.astype(np.float32) / 255.0
    jpeg = overlay_jpeg(image, map01, alpha=alpha, quality=quality, transform=transform, region=region)
    return Rendered(
        jpeg=jpeg,
        width=image.width,
        height=image.height,
        item_id=item_id,
        method=found.heatmap.method,
        layer=found.heatmap.layer,
        target_class=found.heatmap.target_class,
        object_key=found.heatmap.object_key,
        source_uri=found.item.source_uri,
    )
