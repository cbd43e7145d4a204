"""JPEGs for the pages: heatmap overlays and source crops, rendered on demand and cached.

Workers store only the grayscale map, so each overlay is drawn here from the stored map and
the source image (``scheduler.render``). A gallery page asks for the same map several times
(the top patches of one heatmap sit next to each other), so finished overlays are kept in a
small in-process LRU keyed by the map's sha256, and browsers get an ETag derived from that
hash: a revisit is answered 304 after one indexed lookup, without reading any image.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

from botocore.exceptions import ClientError
from PIL import Image
from sqlalchemy import select

from scheduler.query import QueryError
from scheduler.render import Rendered, RenderError, read_item_source, render_overlay
from schema.db import session_scope
from schema.models import Heatmap, Item, Run
from workers.images import ImageDecodeError, open_rgb

__all__ = ["Crop", "ImageService", "JpegImage"]

MIN_SIDE, MAX_SIDE = 16, 4096
MAX_RENDERS = 4  # overlays and sources drawn at once per server; more requests wait their turn
MAX_COORDINATE = 2**31 - 1  # source pixels: beyond any image a worker accepts


@dataclass(frozen=True)
class Crop:
    """What part of the image to return and how large: a box (source pixels) with context, a size cap."""

    box: tuple[int, int, int, int] | None = None
    pad: float = 0.0
    max_side: int | None = None

    @classmethod
    def from_params(cls, box: str | None, pad: float, max_side: int | None) -> Crop:
        parsed: tuple[int, int, int, int] | None = None
        if box:
            try:
                corners = [float(v) for v in box.split(",")]
                if len(corners) != 4 or not all(0 <= v <= MAX_COORDINATE for v in corners):
                    raise ValueError(box)
                x0, y0, x1, y1 = (int(v) for v in corners)
            except ValueError:
                raise QueryError(
                    f"box must be x0,y0,x1,y1 in source pixels, each 0..{MAX_COORDINATE:,} "
                    f"(e.g. 0,0,32,32), got {box[:80]!r}"
                ) from None
            if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
                raise QueryError(f"box {box!r} is empty or negative; x1 > x0 >= 0 and y1 > y0 >= 0")
            parsed = (x0, y0, x1, y1)
        if not 0.0 <= pad <= 4.0:
            raise QueryError(f"pad is the context around the box as a fraction of its size, 0..4; got {pad}")
        if max_side is not None and not MIN_SIDE <= max_side <= MAX_SIDE:
            raise QueryError(f"max_side must be within {MIN_SIDE}..{MAX_SIDE} pixels, got {max_side}")
        return cls(parsed, pad, max_side)

    @property
    def identity(self) -> bool:
        return self.box is None and self.max_side is None

    def key(self) -> str:
        return f"{self.box}|{self.pad}|{self.max_side}"

    def frame(self, width: int, height: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        """The source region to draw and the size to draw it at (never above ``MAX_SIDE`` a side)."""
        left, top, right, bottom = 0, 0, width, height
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            dx, dy = round((x1 - x0) * self.pad), round((y1 - y0) * self.pad)
            left, top = max(0, x0 - dx), max(0, y0 - dy)
            right, bottom = min(width, x1 + dx), min(height, y1 + dy)
            if right <= left or bottom <= top:
                raise QueryError(f"box {self.box} lies outside the {width}x{height} image")
        wide, high = right - left, bottom - top
        scale = min(1.0, (self.max_side or MAX_SIDE) / max(wide, high))
        size = (max(1, round(wide * scale)), max(1, round(high * scale)))
        return (left, top, right, bottom), size

    def apply(self, image: Image.Image) -> Image.Image:
        region, size = self.frame(image.width, image.height)
        if region == (0, 0, image.width, image.height) and size == image.size:
            return image
        return image.resize(size, Image.Resampling.LANCZOS, box=region, reducing_gap=3.0)


@dataclass(frozen=True)
class JpegImage:
    data: bytes
    etag: str


def _etag(*parts: object) -> str:
    return '"' + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32] + '"'


def _jpeg(image: Image.Image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class _MapRef:
    sha256: str
    layer: str
    source_uri: str


class ImageService:
    """Renders and caches the JPEGs of one database; safe to share between request threads."""

    def __init__(
        self,
        database_url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        cache_size: int = 128,
        max_renders: int = MAX_RENDERS,
    ) -> None:
        self.database_url = database_url
        self.endpoint_url = endpoint_url
        self.region = region
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[object, ...], Rendered] = OrderedDict()
        self._lock = threading.Lock()
        # Each render holds a decoded source; a gallery page asks for two dozen at once.
        self._renders = threading.BoundedSemaphore(max_renders)

    # ------------------------------------------------------------------ overlays

    def overlay_etag(
        self, item_id: int, method: str, target: int, layer: str | None, crop: Crop
    ) -> str | None:
        """The ETag an overlay will have, from one indexed row; ``None`` if the map is ambiguous or absent."""
        ref = self._map_ref(item_id, method, target, layer)
        return None if ref is None else _etag("overlay", ref.sha256, ref.source_uri, item_id, crop.key())

    def overlay(self, item_id: int, method: str, target: int, layer: str | None, crop: Crop) -> JpegImage:
        ref = self._map_ref(item_id, method, target, layer)
        if ref is None:
            # render_overlay explains what the item has instead (methods, classes, layers).
            render_overlay(
                self.database_url,
                item_id,
                method,
                target,
                layer=layer,
                endpoint_url=self.endpoint_url,
                region=self.region,
            )
            raise RenderError(f"item {item_id} has no single {method} map of class {target}")
        rendered = self._rendered(item_id, method, target, ref, crop)
        return JpegImage(rendered.jpeg, _etag("overlay", ref.sha256, ref.source_uri, item_id, crop.key()))

    def _map_ref(self, item_id: int, method: str, target: int, layer: str | None) -> _MapRef | None:
        stmt = (
            select(Heatmap.sha256, Heatmap.layer, Item.source_uri)
            .join(Item, Item.id == Heatmap.item_id)
            .where(Heatmap.item_id == item_id, Heatmap.method == method, Heatmap.target_class == target)
            .limit(2)
        )
        if layer is not None:
            stmt = stmt.where(Heatmap.layer == layer)
        with session_scope(self.database_url) as session:
            rows = session.execute(stmt).all()
        if len(rows) != 1:
            return None
        sha256, found_layer, source_uri = rows[0]
        return _MapRef(sha256, found_layer, source_uri)

    def _rendered(self, item_id: int, method: str, target: int, ref: _MapRef, crop: Crop) -> Rendered:
        key = (item_id, method, target, ref.layer, ref.sha256, ref.source_uri, crop.key())
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        with self._renders:
            rendered = render_overlay(
                self.database_url,
                item_id,
                method,
                target,
                layer=ref.layer,
                endpoint_url=self.endpoint_url,
                region=self.region,
                frame=crop.frame,
            )
        with self._lock:
            self._cache[key] = rendered
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return rendered

    # ------------------------------------------------------------------ sources

    def source_etag(self, item_id: int, crop: Crop) -> str:
        return _etag("source", self._source_uri(item_id)[0], item_id, crop.key())

    def source(self, item_id: int, crop: Crop) -> JpegImage:
        uri, run = self._source_uri(item_id)
        with self._renders:
            return self._source(item_id, uri, run, crop)

    def _source(self, item_id: int, uri: str, run: Run, crop: Crop) -> JpegImage:
        try:
            data = read_item_source(run, uri, endpoint_url=self.endpoint_url, region=self.region)
        except (OSError, ClientError, ValueError) as exc:
            raise RenderError(f"cannot read the source image {uri} of item {item_id}: {exc}") from exc
        try:
            image = open_rgb(data, name=uri)
        except ImageDecodeError as exc:
            raise RenderError(f"cannot decode the source image {uri} of item {item_id}: {exc}") from exc
        return JpegImage(_jpeg(crop.apply(image)), _etag("source", uri, item_id, crop.key()))

    def _source_uri(self, item_id: int) -> tuple[str, Run]:
        """The item's source and its run, whose roots bound what may be read."""
        with session_scope(self.database_url) as session:
            found = session.execute(
                select(Item.source_uri, Run).join(Run, Run.id == Item.run_id).where(Item.id == item_id)
            ).one_or_none()
            if found is None:
                raise RenderError(f"no item {item_id} in this database; the run pages link to existing items")
            session.expunge_all()
        return found[0], found[1]
