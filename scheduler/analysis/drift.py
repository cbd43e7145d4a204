"""Run-to-run drift: did the model look at the same places of the same images as last time?

Two runs are compared on what they share: items with the same ``source_uri`` and, for each,
heatmaps of the same (method, layer, target class). A nightly audit with top-1 targets only
shares a class where both runs predicted it; items whose prediction changed are counted, not
compared. For every shared heatmap pair:

* **correlation** — Pearson correlation of the two raw low-resolution maps (the stored
  ``.npy``). It ignores scale, so a model that grew more confident but looks at the same pixels
  keeps 1.0. Maps of different resolution (a new architecture) are resampled bilinearly to
  the finer of the two grids first. Two flat maps count as identical (1.0); a flat map
  against a structured one as uncorrelated (0.0).
* **iou** — intersection over union of the cells of the two stored top-L patch lists. When
  the runs cut different grids (another patch size or input size) the cells cannot be matched
  one to one, so the IoU is taken of the source-image area their boxes cover.
* **centre_shift_px** — how far the map's centre of mass moved, in run B's model-input pixels.

When the runs prepared images differently (another input size, a centre crop instead of a
stretch, a letterbox), their maps cover different parts of the source. Each raw map is then
resampled through its run's recorded transform onto one grid over the part of the source that
both models saw, so correlation, centre and mean maps compare the same pixels.

Per (method, layer, class) the pairs are averaged, and the class's mean normalised map of each
run (per-map min-max, as people see them) is compared: ``l1_shift`` is half the L1 distance
between the two mean maps after each is scaled to sum 1, i.e. the fraction of the class's
attention mass that sits elsewhere (0 = same place, 1 = disjoint), and ``centre_shift_px`` is
the move of their centres of mass. A class is **drifted** when its mean correlation is below
``1 - threshold``: with the default 0.5, when the maps of its images agree less than half.

Maps are read and reduced chunk by chunk (a few hundred pairs at a time, objects fetched on
a thread pool), so memory stays flat however large the runs are.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from scheduler.query import DELETING, QueryError, get_run
from schema.db import session_scope
from schema.models import Heatmap, Item, ItemStatus, PatchScore, Run, Shard, ShardStatus
from workers.map_reads import MapRef, read_map_raw
from workers.preprocess import ImageTransform, Preprocess
from workers.storage import ObjectNotFoundError, Storage, open_storage

__all__ = [
    "ClassShift",
    "DriftError",
    "HeatmapDrift",
    "RunDiff",
    "diff_runs",
    "drift_rule",
    "pearson",
]

CHUNK = 256  # heatmap pairs read and reduced at once
READERS = 16  # concurrent object reads
# Correlations of identical float maps can land a rounding error below 1.0; that is no drift.
_TOLERANCE = 1e-6


log = logging.getLogger("camaudit.drift")


class DriftError(ValueError):
    """The two runs cannot be compared (unknown run, bad threshold, stored map missing)."""


@dataclass(frozen=True)
class HeatmapDrift:
    """One shared heatmap compared between the two runs."""

    source_uri: str
    item_a: int
    item_b: int
    method: str
    layer: str
    target_class: int
    class_name: str | None
    correlation: float
    iou: float
    centre_shift_px: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassShift:
    """The drift of one (method, layer, class) over all its shared heatmaps."""

    method: str
    layer: str
    target_class: int
    class_name: str | None
    n: int
    mean_correlation: float
    mean_iou: float
    centre_shift_px: float
    l1_shift: float
    drifted: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        name = self.class_name if self.class_name is not None else str(self.target_class)
        return f"{self.method}/{self.layer}/{name}"


@dataclass(frozen=True)
class RunDiff:
    """Run A (before, the baseline) against run B (after)."""

    run_a: str
    run_b: str
    threshold: float
    items_a: int
    items_b: int
    common_items: int
    prediction_changed: int
    pairs: int
    unmatched_a: int
    unmatched_b: int
    mean_correlation: float | None
    mean_iou: float | None
    classes: list[ClassShift] = field(default_factory=list)
    movers: list[HeatmapDrift] = field(default_factory=list)
    # differences in how the two runs were computed (device, precision) that move maps too
    warnings: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> list[ClassShift]:
        return [c for c in self.classes if c.drifted]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "threshold": self.threshold,
            "rule": drift_rule(self.threshold),
            "items_a": self.items_a,
            "items_b": self.items_b,
            "common_items": self.common_items,
            "prediction_changed": self.prediction_changed,
            "pairs": self.pairs,
            "unmatched_a": self.unmatched_a,
            "unmatched_b": self.unmatched_b,
            "mean_correlation": self.mean_correlation,
            "mean_iou": self.mean_iou,
            "drifted": [c.label for c in self.drifted],
            "classes": [c.as_dict() for c in self.classes],
            "movers": [m.as_dict() for m in self.movers],
            "warnings": list(self.warnings),
        }


def drift_rule(threshold: float) -> str:
    return f"a class is drifted when its mean map correlation is below {1.0 - threshold:.3g} (1 - threshold)"


# --------------------------------------------------------------------------- map arithmetic


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of one shape; two flat maps are identical, one flat map is not."""
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    nx = math.sqrt(float(x @ x))
    ny = math.sqrt(float(y @ y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return max(-1.0, min(1.0, float(x @ y) / (nx * ny)))


def resample(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear, half-pixel centres (align_corners=False): the convention the maps were upsampled with."""
    if arr.shape == shape:
        return arr.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def normalise(arr: np.ndarray) -> np.ndarray:
    """Per-map min-max to [0, 1]; a flat map becomes zeros, as the CAM convention has it."""
    x = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def centre_of_mass(arr: np.ndarray) -> tuple[float, float]:
    """(x, y) of the map's centre of mass as fractions of its width and height (cell centres)."""
    h, w = arr.shape
    total = float(arr.sum())
    if total <= 0.0:
        return 0.5, 0.5
    ys = (np.arange(h, dtype=np.float64) + 0.5) / h
    xs = (np.arange(w, dtype=np.float64) + 0.5) / w
    return float((arr.sum(axis=0) * xs).sum() / total), float((arr.sum(axis=1) * ys).sum() / total)


def shift_px(a: tuple[float, float], b: tuple[float, float], size: tuple[float, float]) -> float:
    """Distance between two fractional centres in pixels of an input of ``size`` = (H, W)."""
    height, width = size
    return math.hypot((a[0] - b[0]) * width, (a[1] - b[1]) * height)


def mass_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Half the L1 distance of two maps scaled to sum 1: the fraction of mass that is elsewhere."""
    sa, sb = float(a.sum()), float(b.sum())
    pa = a / sa if sa > 0 else np.full_like(a, 1.0 / a.size)
    pb = b / sb if sb > 0 else np.full_like(b, 1.0 / b.size)
    return float(0.5 * np.abs(pa - pb).sum())


Box = tuple[int, int, int, int]


def cell_iou(a: set[tuple[int, int]], b: set[tuple[int, int]]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def area_iou(a: list[Box], b: list[Box]) -> float:
    """IoU of the areas two sets of boxes cover, exactly, on the grid their edges cut."""
    if not a and not b:
        return 1.0
    xs = np.unique([v for x0, _, x1, _ in a + b for v in (x0, x1)])
    ys = np.unique([v for _, y0, _, y1 in a + b for v in (y0, y1)])
    cell_area = np.outer(np.diff(ys), np.diff(xs)).astype(np.float64)

    def cover(boxes: list[Box]) -> np.ndarray:
        mask = np.zeros(cell_area.shape, dtype=bool)
        for x0, y0, x1, y1 in boxes:
            c0, c1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
            r0, r1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
            mask[r0:r1, c0:c1] = True
        return mask

    ma, mb = cover(a), cover(b)
    union = float(cell_area[ma | mb].sum())
    return float(cell_area[ma & mb].sum()) / union if union else 1.0


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Side:
    run: Run
    storage: Storage
    input_size: tuple[int, int]
    geometry: Preprocess  # the run's recorded transform (statistics not needed here)


@dataclass(frozen=True)
class _Pair:
    source_uri: str
    item_a: int
    item_b: int
    source_size: tuple[int, int]  # (w, h) of the source, as run A decoded it
    heatmap_a: int
    heatmap_b: int
    map_a: MapRef
    map_b: MapRef


@dataclass
class _Group:
    """Running sums of one (method, layer, class)."""

    n: int = 0
    correlation: float = 0.0
    iou: float = 0.0
    mean_a: np.ndarray | None = None
    mean_b: np.ndarray | None = None

    def add_maps(self, a: np.ndarray, b: np.ndarray) -> None:
        if self.mean_a is None or self.mean_b is None:
            self.mean_a = np.zeros(a.shape, dtype=np.float64)
            self.mean_b = np.zeros(a.shape, dtype=np.float64)
        shape = (int(self.mean_a.shape[0]), int(self.mean_a.shape[1]))
        self.mean_a += resample(a, shape)
        self.mean_b += resample(b, shape)


def _open_side(database_url: str, run_id: str, endpoint_url: str | None, region: str | None) -> _Side:
    try:
        run = get_run(database_url, run_id)
    except QueryError as exc:
        raise DriftError(str(exc)) from exc
    if run.status == DELETING:
        raise DriftError(f"run {run_id} is being deleted; compare runs that are kept")
    storage = open_storage(run.output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False)
    geometry = Preprocess.from_dict(run.preprocess, geometry_only=True)
    return _Side(run, storage, geometry.size, geometry)


def _check_classes(a: Run, b: Run) -> None:
    """Maps are paired by class index, which only means the same class if both models name it alike."""
    names_a, names_b = list(a.class_names or []), list(b.class_names or [])
    for index, (name_a, name_b) in enumerate(zip(names_a, names_b, strict=False)):
        if name_a != name_b:
            raise DriftError(
                f"runs {a.id} and {b.id} name class {index} differently ({name_a!r} vs {name_b!r}); "
                "their maps of one class index explain different classes and cannot be compared"
            )


def _read_map(side: _Side, stored: MapRef) -> np.ndarray:
    try:
        return read_map_raw(side.storage, stored)
    except ObjectNotFoundError as exc:
        raise DriftError(
            f"raw map of run {side.run.id} is missing at {side.storage.locate(stored.raw_key)}; "
            "was its storage moved or emptied?"
        ) from exc


def _pairs(session: Session, run_a: str, run_b: str) -> Iterator[tuple[tuple[str, str, int], _Pair]]:
    """Shared heatmaps in (method, layer, class, item) order; each heatmap is used at most once.

    A manifest that lists one image twice would otherwise pair every copy with every copy.
    """
    ia, ib = aliased(Item), aliased(Item)
    ha, hb = aliased(Heatmap), aliased(Heatmap)
    stmt = (
        select(
            ha.method,
            ha.layer,
            ha.target_class,
            ia.source_uri,
            ia.id,
            ib.id,
            ia.width,
            ia.height,
            ha.id,
            hb.id,
            ha.object_key,
            ha.raw_key,
            ha.raw_offset,
            ha.raw_length,
            hb.object_key,
            hb.raw_key,
            hb.raw_offset,
            hb.raw_length,
        )
        .join(ia, ia.id == ha.item_id)
        .join(ib, and_(ib.run_id == run_b, ib.source_uri == ia.source_uri))
        .join(
            hb,
            and_(
                hb.item_id == ib.id,
                hb.method == ha.method,
                hb.layer == ha.layer,
                hb.target_class == ha.target_class,
            ),
        )
        .where(ha.run_id == run_a)
        .order_by(ha.method, ha.layer, ha.target_class, ia.ordinal, ib.ordinal)
        .execution_options(yield_per=2000)
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    for method, layer, target, uri, item_a, item_b, w, h, h_a, h_b, *where in session.execute(stmt):
        if h_a in used_a or h_b in used_b:
            continue
        used_a.add(h_a)
        used_b.add(h_b)
        size = (int(w or 0), int(h or 0))
        map_a = MapRef(where[0], where[1], raw_offset=where[2], raw_length=where[3])
        map_b = MapRef(where[4], where[5], raw_offset=where[6], raw_length=where[7])
        yield (method, layer, int(target)), _Pair(uri, item_a, item_b, size, h_a, h_b, map_a, map_b)


def _patches(session: Session, heatmap_ids: list[int]) -> dict[int, list[tuple[int, int, Box]]]:
    found: dict[int, list[tuple[int, int, Box]]] = {h: [] for h in heatmap_ids}
    rows = session.execute(
        select(
            PatchScore.heatmap_id,
            PatchScore.row,
            PatchScore.col,
            PatchScore.x0,
            PatchScore.y0,
            PatchScore.x1,
            PatchScore.y1,
        ).where(PatchScore.heatmap_id.in_(heatmap_ids))
    )
    for heatmap_id, row, col, x0, y0, x1, y1 in rows:
        found[heatmap_id].append((row, col, (x0, y0, x1, y1)))
    return found


def _counts(session: Session, run_a: str, run_b: str) -> tuple[int, int, int, int]:
    """Done items of A and of B, A's items that B also has, and how many of those changed prediction."""

    def done(run_id: str) -> int:
        stmt = select(func.count()).where(Item.run_id == run_id, Item.status == ItemStatus.DONE)
        return int(session.execute(stmt).scalar_one())

    ia, ib = aliased(Item), aliased(Item)
    shared = (
        select(func.count(func.distinct(ia.id)))
        .join(ib, and_(ib.run_id == run_b, ib.source_uri == ia.source_uri, ib.status == ItemStatus.DONE))
        .where(ia.run_id == run_a, ia.status == ItemStatus.DONE)
    )
    common = int(session.execute(shared).scalar_one())
    changed = int(session.execute(shared.where(ia.pred_class != ib.pred_class)).scalar_one())
    return done(run_a), done(run_b), common, changed


def _precisions(session: Session, run_id: str) -> set[tuple[str, str]]:
    """(device type, autocast dtype) of a run's done shards, leaving out those stored without them."""
    rows = session.execute(
        select(Shard.device_type, Shard.autocast_dtype)
        .where(Shard.run_id == run_id, Shard.status == ShardStatus.DONE, Shard.device_type.is_not(None))
        .distinct()
    ).all()
    return {(str(device), str(dtype)) for device, dtype in rows}


def _label(precisions: set[tuple[str, str]]) -> str:
    return " + ".join(sorted(f"{device}/{dtype}" for device, dtype in precisions))


def precision_warnings(session: Session, run_a: str, run_b: str) -> list[str]:
    """Say when the runs (or the shards within one) ran on different devices or in different precision.

    Maps then differ slightly whatever the model did, so a small drift may be the precision's.
    """
    a, b = _precisions(session, run_a), _precisions(session, run_b)
    warnings = [
        f"run {run_id} mixes shards computed as {_label(found)}; its maps are not all computed alike"
        for run_id, found in ((run_a, a), (run_b, b))
        if len(found) > 1
    ]
    if a and b and a != b:
        devices = {d for d, _ in a} != {d for d, _ in b}
        dtypes = {t for _, t in a} != {t for _, t in b}
        what = (
            " and ".join(w for w, differs in (("device", devices), ("precision", dtypes)) if differs)
            or "setup"
        )
        warnings.append(
            f"the runs differ in {what}: baseline {run_a} ran as {_label(a)}, run {run_b} as {_label(b)}; "
            "part of the map differences comes from that, not from the model"
        )
    return warnings


def _heatmap_count(session: Session, run_id: str) -> int:
    return int(session.execute(select(func.count()).where(Heatmap.run_id == run_id)).scalar_one())


# --------------------------------------------------------------------------- comparison


def same_transform(a: Preprocess, b: Preprocess) -> bool:
    """Both runs put every source pixel at the same input pixel: maps compare cell by cell."""
    return (a.size, a.resize, a.fit) == (b.size, b.resize, b.fit)


def common_frame(
    raw_a: np.ndarray, a: ImageTransform, raw_b: np.ndarray, b: ImageTransform
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Two raw maps resampled onto one grid over the source region both transforms kept.

    Returns the two maps and the grid's size in run B's input pixels (height, width), the
    unit of ``centre_shift_px``. The grid is as fine as the finer map.
    """
    va, vb = a.visible_source(), b.visible_source()
    x0, y0 = max(va[0], vb[0]), max(va[1], vb[1])
    x1, y1 = max(min(va[2], vb[2]), x0 + 1e-6), max(min(va[3], vb[3]), y0 + 1e-6)
    rows, cols = max(raw_a.shape[0], raw_b.shape[0]), max(raw_a.shape[1], raw_b.shape[1])
    xs = x0 + (np.arange(cols) + 0.5) * (x1 - x0) / cols
    ys = y0 + (np.arange(rows) + 0.5) * (y1 - y0) / rows
    sx, sy = b.scale
    return _sample(raw_a, a, xs, ys), _sample(raw_b, b, xs, ys), ((y1 - y0) * sy, (x1 - x0) * sx)


def _sample(raw: np.ndarray, transform: ImageTransform, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples of a raw map (which spans the whole input) at source coordinates."""
    (sx, sy), (ox, oy), (in_w, in_h) = transform.scale, transform.offset, transform.input
    grid = np.nan_to_num(raw.astype(np.float32), nan=0.0)
    rows, cols = grid.shape

    def axis(source: np.ndarray, scale: float, offset: int, n_in: int, n_raw: int) -> tuple[Any, Any, Any]:
        position = np.clip((source * scale + offset) * n_raw / n_in - 0.5, 0.0, n_raw - 1.0)
        low = np.floor(position).astype(np.int64)
        return low, np.minimum(low + 1, n_raw - 1), (position - low).astype(np.float32)

    c0, c1, cf = axis(xs, sx, ox, in_w, cols)
    r0, r1, rf = axis(ys, sy, oy, in_h, rows)
    across = grid[:, c0] * (1.0 - cf) + grid[:, c1] * cf
    return across[r0, :] * (1.0 - rf)[:, None] + across[r1, :] * rf[:, None]


@dataclass
class _Comparison:
    a: _Side
    b: _Side
    same_grid: bool
    same_geometry: bool
    groups: dict[tuple[str, str, int], _Group] = field(default_factory=dict)
    movers: list[tuple[float, float, int, HeatmapDrift]] = field(default_factory=list)
    limit: int = 50
    _order: Iterator[int] = field(default_factory=itertools.count)

    def class_name(self, target: int) -> str | None:
        names = list(self.b.run.class_names or self.a.run.class_names or [])
        return names[target] if 0 <= target < len(names) else None

    def add(
        self,
        key: tuple[str, str, int],
        pair: _Pair,
        raw_a: np.ndarray,
        raw_b: np.ndarray,
        patches_a: list[tuple[int, int, Box]],
        patches_b: list[tuple[int, int, Box]],
    ) -> None:
        if self.same_geometry or min(pair.source_size) < 1:
            shape = (max(raw_a.shape[0], raw_b.shape[0]), max(raw_a.shape[1], raw_b.shape[1]))
            map_a, map_b = resample(raw_a, shape), resample(raw_b, shape)
            frame = (float(self.b.input_size[0]), float(self.b.input_size[1]))
        else:
            width, height = pair.source_size
            map_a, map_b, frame = common_frame(
                raw_a,
                self.a.geometry.transform(width, height),
                raw_b,
                self.b.geometry.transform(width, height),
            )
        correlation = pearson(map_a, map_b)
        if self.same_grid:
            iou = cell_iou({(r, c) for r, c, _ in patches_a}, {(r, c) for r, c, _ in patches_b})
        else:
            iou = area_iou([box for *_, box in patches_a], [box for *_, box in patches_b])
        norm_a, norm_b = normalise(map_a), normalise(map_b)
        moved = shift_px(centre_of_mass(norm_a), centre_of_mass(norm_b), frame)
        group = self.groups.setdefault(key, _Group())
        group.n += 1
        group.correlation += correlation
        group.iou += iou
        group.add_maps(norm_a, norm_b)
        if self.limit == 0:
            return
        method, layer, target = key
        drift = HeatmapDrift(
            pair.source_uri,
            pair.item_a,
            pair.item_b,
            method,
            layer,
            target,
            self.class_name(target),
            correlation,
            iou,
            moved,
        )
        # Keep the `limit` least similar pairs: a min-heap on similarity, negated.
        entry = (-correlation, -iou, -next(self._order), drift)
        if len(self.movers) < self.limit:
            heapq.heappush(self.movers, entry)
        else:
            heapq.heappushpop(self.movers, entry)

    def classes(self, threshold: float) -> list[ClassShift]:
        shifts = []
        for (method, layer, target), group in self.groups.items():
            assert group.mean_a is not None and group.mean_b is not None
            mean_a, mean_b = group.mean_a / group.n, group.mean_b / group.n
            correlation = group.correlation / group.n
            shifts.append(
                ClassShift(
                    method=method,
                    layer=layer,
                    target_class=target,
                    class_name=self.class_name(target),
                    n=group.n,
                    mean_correlation=correlation,
                    mean_iou=group.iou / group.n,
                    centre_shift_px=shift_px(
                        centre_of_mass(mean_a), centre_of_mass(mean_b), self.b.input_size
                    ),
                    l1_shift=mass_shift(mean_a, mean_b),
                    drifted=correlation < 1.0 - threshold - _TOLERANCE,
                )
            )
        return sorted(
            shifts, key=lambda c: (c.mean_correlation, c.mean_iou, c.method, c.layer, c.target_class)
        )


def _reduce_chunk(
    comparison: _Comparison,
    session: Session,
    pool: ThreadPoolExecutor,
    chunk: list[tuple[tuple[str, str, int], _Pair]],
) -> None:
    a, b = comparison.a, comparison.b
    maps_a = pool.map(lambda item: _read_map(a, item[1].map_a), chunk)
    maps_b = pool.map(lambda item: _read_map(b, item[1].map_b), chunk)
    patches = _patches(session, [p.heatmap_a for _, p in chunk] + [p.heatmap_b for _, p in chunk])
    for (key, pair), raw_a, raw_b in zip(chunk, maps_a, maps_b, strict=True):
        comparison.add(key, pair, raw_a, raw_b, patches[pair.heatmap_a], patches[pair.heatmap_b])


def diff_runs(
    database_url: str,
    run_a: str,
    run_b: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    threshold: float = 0.5,
    limit: int = 50,
) -> RunDiff:
    """Compare run A (the baseline, before) with run B (after) over the heatmaps they share.

    ``threshold`` in [0, 1]: a (method, layer, class) is drifted when its mean correlation is
    below ``1 - threshold``. ``limit``: how many of the most changed heatmaps to list (0: none).
    """
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise DriftError(
            "threshold must be within [0, 1] (a class is drifted when its mean correlation is below "
            f"1 - threshold), got {threshold}"
        )
    if limit < 0:
        raise DriftError(f"limit is how many changed heatmaps to list and must be >= 0, got {limit}")
    a = _open_side(database_url, run_a, endpoint_url, region)
    b = _open_side(database_url, run_b, endpoint_url, region)
    _check_classes(a.run, b.run)
    same_geometry = same_transform(a.geometry, b.geometry)
    same_grid = a.run.patch_size == b.run.patch_size and same_geometry
    comparison = _Comparison(a, b, same_grid, same_geometry, limit=limit)
    with session_scope(database_url) as session, ThreadPoolExecutor(READERS, "drift-read") as pool:
        items_a, items_b, common, changed = _counts(session, run_a, run_b)
        chunk: list[tuple[tuple[str, str, int], _Pair]] = []
        with session_scope(database_url) as lookups:
            for entry in _pairs(session, run_a, run_b):
                chunk.append(entry)
                if len(chunk) == CHUNK:
                    _reduce_chunk(comparison, lookups, pool, chunk)
                    chunk = []
            if chunk:
                _reduce_chunk(comparison, lookups, pool, chunk)
        heatmaps_a, heatmaps_b = _heatmap_count(session, run_a), _heatmap_count(session, run_b)
        warnings = precision_warnings(session, run_a, run_b)
    for warning in warnings:
        log.warning("drift %s -> %s: %s", run_a, run_b, warning)
    pairs = sum(g.n for g in comparison.groups.values())
    movers = [entry[-1] for entry in sorted(comparison.movers, reverse=True)]
    return RunDiff(
        run_a=run_a,
        run_b=run_b,
        threshold=threshold,
        items_a=items_a,
        items_b=items_b,
        common_items=common,
        prediction_changed=changed,
        pairs=pairs,
        unmatched_a=heatmaps_a - pairs,
        unmatched_b=heatmaps_b - pairs,
        mean_correlation=sum(g.correlation for g in comparison.groups.values()) / pairs if pairs else None,
        mean_iou=sum(g.iou for g in comparison.groups.values()) / pairs if pairs else None,
        classes=comparison.classes(threshold),
        movers=movers,
        warnings=warnings,
    )
