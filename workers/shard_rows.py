"""The rows a shard commits, built from one batch's CAM result.

Kept apart from claiming and committing so that what is measured on a map (its statistics)
and how it is written down (the rows) can change without touching the shard's life cycle.
Every map of a batch is addressed by one index ``n = b * n_targets + t``, shared by every
method and layer (:class:`MapLayout`).
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from schema.models import ItemStatus
from workers.cam import CamResult
from workers.heatmap_io import to_uint8
from workers.images import DecodedPixels
from workers.localisation import localisation_columns
from workers.patches import distinct_ranks, patch_boxes, top_patches
from workers.preprocess import ImageTransform

if TYPE_CHECKING:
    from workers.shard import ShardWork, WorkItem

# patch rows wait for their heatmap's id: keyed by (item, method, layer, class)
HeatmapKey = tuple[int, str, str, int]


@dataclass
class ShardRows:
    items: list[dict[str, Any]] = field(default_factory=list)
    heatmaps: list[dict[str, Any]] = field(default_factory=list)
    # heatmap rows and the encoder task that returns their PNGs' sha256, in the same order
    encoded: list[tuple[list[dict[str, Any]], Future[list[str]]]] = field(default_factory=list)
    patches: list[tuple[HeatmapKey, dict[str, Any]]] = field(default_factory=list)
    # the shard row's provenance columns (workers/provenance.py)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_done(self) -> int:
        return sum(1 for row in self.items if row["status"] == ItemStatus.DONE)

    @property
    def n_failed(self) -> int:
        return sum(1 for row in self.items if row["status"] == ItemStatus.FAILED)


@dataclass(frozen=True)
class MapLayout:
    """Whose map each index ``n`` of a batch is: item, explained class and that class's score."""

    item_ids: list[int]
    targets: list[int]
    scores: list[float]
    transforms: list[ImageTransform]  # how map n's source image went into the input
    boxes: list[list[float] | None]  # map n's labelled box in source pixels, if its item has one


def map_layout(batch: list[tuple[WorkItem, DecodedPixels]], result: CamResult) -> MapLayout:
    """Only the valid maps: an item with fewer targets than the batch's widest has padded columns."""
    chosen = result.targets.cpu()
    scores = result.scores.float().cpu().tolist()
    layout = layout_of(batch, chosen.reshape(-1).tolist(), [s for per_item in scores for s in per_item])
    keep = result.valid.cpu().reshape(-1).tolist()
    if all(keep):
        return layout

    def kept(values: list[Any]) -> list[Any]:
        return [value for value, ok in zip(values, keep, strict=True) if ok]

    return MapLayout(
        item_ids=kept(layout.item_ids),
        targets=kept(layout.targets),
        scores=kept(layout.scores),
        transforms=kept(layout.transforms),
        boxes=kept(layout.boxes),
    )


def layout_of(
    batch: list[tuple[WorkItem, DecodedPixels]], targets: list[int], scores: list[float]
) -> MapLayout:
    """The layout from host lists: ``targets`` and ``scores`` of map ``n = b * K + t``."""
    n_targets = len(targets) // len(batch)
    return MapLayout(
        item_ids=[item.id for item, _ in batch for _t in range(n_targets)],
        targets=targets,
        scores=scores,
        transforms=map_transforms(batch, n_targets),
        boxes=[item.box for item, _ in batch for _t in range(n_targets)],
    )


def map_transforms(batch: list[tuple[WorkItem, DecodedPixels]], n_targets: int) -> list[ImageTransform]:
    """How the source of each map ``n = b * n_targets + t`` went into the model's input."""
    return [img.transform for _, img in batch for _t in range(n_targets)]


def valid_maps(maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K, ...]`` maps -> ``[N, 1, ...]`` with only the valid ones, in ``map_layout`` order."""
    if bool(valid.all()):
        return maps
    return maps.flatten(0, 1)[valid.reshape(-1).to(maps.device)][:, None]


@dataclass(frozen=True)
class MapStatistics:
    """Everything the rows and objects of one (method, layer) need from its maps, on the host.

    Gathered in one place so the reductions can move to the device and come back in one copy.
    """

    maps_u8: np.ndarray  # uint8 [N, H, W]: the normalised maps as stored in PNG
    raw16: np.ndarray  # float16 [N, h, w]: the raw maps as stored in npy
    raw_max: list[float]
    raw_mean: list[float]
    map_mean: list[float]  # mean of the normalised map, before quantisation
    patch_scores: list[list[float]]  # [N][L], descending
    patch_rows: list[list[int]]
    patch_cols: list[list[int]]
    patch_boxes: list[list[list[int]]]  # [N][L] (x0, y0, x1, y1) in source pixels
    patch_total: list[float]  # sum over all patches of map n


def map_statistics(
    maps: torch.Tensor,
    raw: torch.Tensor,
    input_size: tuple[int, int],
    patch_size: int,
    n_patches: int,
    transforms: list[ImageTransform],
) -> MapStatistics:
    """``maps`` [B, K, H, W] in [0, 1] and ``raw`` [B, K, h, w] of one method and layer."""
    raw = raw.float()
    bsz, kk, h, w = raw.shape
    u8 = to_uint8(maps).cpu().numpy().reshape(bsz * kk, *maps.shape[-2:])
    flat_raw = raw.reshape(bsz * kk, h, w)
    raw16 = flat_raw.to(torch.float16).cpu().numpy()
    top = top_patches(flat_raw, input_size, patch_size, n_patches)
    raw_max = flat_raw.amax(dim=(1, 2)).cpu().tolist()
    raw_mean = flat_raw.mean(dim=(1, 2)).cpu().tolist()
    map_mean = maps.reshape(bsz * kk, -1).float().mean(dim=1).cpu().tolist()
    p_scores = top.scores.cpu().tolist()
    p_rows = top.rows.cpu().numpy()
    p_cols = top.cols.cpu().numpy()
    boxes = patch_boxes(p_rows, p_cols, patch_size, input_size, transforms).tolist()
    return MapStatistics(
        maps_u8=u8,
        raw16=raw16,
        raw_max=raw_max,
        raw_mean=raw_mean,
        map_mean=map_mean,
        patch_scores=p_scores,
        patch_rows=p_rows.tolist(),
        patch_cols=p_cols.tolist(),
        patch_boxes=boxes,
        patch_total=top.total.cpu().tolist(),
    )


def non_finite_reasons(result: CamResult) -> list[str | None]:
    """Per image, why its model output cannot be stored (NaN or infinity), or ``None``.

    A database stores NaN as NULL (or refuses it), and a map with NaN ranks nothing; such an
    image fails alone instead of failing its whole shard at the commit.
    """
    checks: list[tuple[str, torch.Tensor]] = []
    if result.logits is not None:
        checks.append(("its class scores (logits)", result.logits))
    checks.append(("the scores of its explained classes", result.scores))
    for method, per_layer in result.raw.items():
        for layer, raw in per_layer.items():
            checks.append((f"its {method} map of layer {layer}", raw))
            checks.append((f"its normalised {method} map of layer {layer}", result.layer_maps[method][layer]))
    finite = torch.stack([_finite_per_image(t) for _, t in checks]).cpu()
    if bool(finite.all()):
        return [None] * finite.shape[1]
    reasons: list[str | None] = []
    for b in range(finite.shape[1]):
        bad = [what for (what, _), ok in zip(checks, finite[:, b].tolist(), strict=True) if not ok]
        reasons.append(
            f"the model's output for this image is not finite: NaN or infinity in {bad[0]}; "
            "check the model (overflow under mixed precision: CAMAUDIT_AMP=off) and the input"
            if bad
            else None
        )
    return reasons


def _finite_per_image(values: torch.Tensor) -> torch.Tensor:
    """bool [B]: whether every value of image b is finite.

    Maximum and minimum propagate NaN and keep an infinity, so both are finite exactly when every
    value is: two vectorised reductions, without the boolean copy of every map that ``isfinite``
    writes first (on one CPU thread 0.005 ms against 0.1 ms for a 224 x 224 map).
    """
    if values.dim() == 1:
        return torch.isfinite(values)
    if math.prod(values.shape[1:]) == 0:
        return torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    dims = tuple(range(1, values.dim()))  # not flattened: a broadcast view would be copied
    return torch.isfinite(values.amax(dim=dims)) & torch.isfinite(values.amin(dim=dims))


def failed_item_row(item: WorkItem, error: str) -> dict[str, Any]:
    return {"id": item.id, "status": ItemStatus.FAILED, "error": error}


def class_probabilities(logits: torch.Tensor, independent: bool = False) -> torch.Tensor:
    """[B, C] probabilities: sigmoid where each output is scored on its own, else softmax.

    A single logit is always scored on its own: the softmax of one value is 1 whatever it is.
    """
    logits = logits.float()
    if independent or logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def prediction_rows(
    work: ShardWork, batch: list[tuple[WorkItem, DecodedPixels]], result: CamResult
) -> list[dict[str, Any]]:
    """One done item row per image: its top-k predictions, predicted class and whether it is right."""
    # a multi-label head scores each class on its own: sigmoid, not softmax
    independent = work.target_spec in ("labels",) or work.target_spec.startswith("above:")
    probs = class_probabilities(result.logits, independent)
    k = min(work.top_k_predictions, probs.shape[1])
    top_p, top_c = (t.cpu() for t in torch.topk(probs, k, dim=1))
    return prediction_rows_of(work, batch, top_p.tolist(), top_c.tolist(), single_logit=probs.shape[1] == 1)


def prediction_rows_of(
    work: ShardWork,
    batch: list[tuple[WorkItem, DecodedPixels]],
    top_p: list[list[float]],
    top_c: list[list[int]],
    *,
    single_logit: bool = False,
) -> list[dict[str, Any]]:
    """The rows from host lists: each image's top-k probabilities and classes.

    A single-logit (binary) head's one prediction is its logit's sigmoid, and its predicted
    class is the decision: 1 (positive, the class its one name names) when the sigmoid is above
    one half, i.e. the logit above 0, else 0. Such an item is correct when the decision agrees
    with whether its label is that name.
    """
    names = work.class_names
    rows = []
    for b, (item, img) in enumerate(batch):
        preds = [
            {
                "class": int(c),
                "name": names[int(c)] if names and int(c) < len(names) else None,
                "prob": float(p),
            }
            for p, c in zip(top_p[b], top_c[b], strict=True)
        ]
        pred = int(top_c[b][0])
        correct = None
        if single_logit:
            pred = int(float(top_p[b][0]) > 0.5)
            if item.label is not None and names:
                correct = (pred == 1) == (item.label == names[0])
        elif item.label is not None and names:
            correct = names[pred] == item.label if pred < len(names) else False
        rows.append(
            {
                "id": item.id,
                "status": ItemStatus.DONE,
                "error": None,
                "width": img.width,
                "height": img.height,
                "predictions": preds,
                "pred_class": pred,
                "correct": correct,
            }
        )
    return rows


def heatmap_rows(
    run_id: str,
    method: str,
    layer: str,
    layout: MapLayout,
    stats: MapStatistics,
    keys: list[tuple[str, str]],
    located: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per map; ``keys[n]`` are its PNG and npy keys. ``sha256`` is filled in once encoded,
    and in the packed layout the byte ranges once the shard's tars are built (workers/packing.py).
    ``located``: the maps' :func:`localisation_columns`, when a row-building thread has them."""
    rows = []
    if located is None:
        located = localisation_columns(stats.maps_u8, stats.raw16, layout.boxes, layout.transforms)
    for n, (item_id, target) in enumerate(zip(layout.item_ids, layout.targets, strict=True)):
        total = stats.patch_total[n]
        rows.append(
            {
                "item_id": item_id,
                "run_id": run_id,
                "method": method,
                "layer": layer,
                "target_class": target,
                "target_score": layout.scores[n],
                "object_key": keys[n][0],
                "raw_key": keys[n][1],
                "object_offset": None,
                "object_length": None,
                "raw_offset": None,
                "raw_length": None,
                "sha256": "",
                "raw_max": stats.raw_max[n],
                "raw_mean": stats.raw_mean[n],
                "map_mean": stats.map_mean[n],
                "top_patch_fraction": stats.patch_scores[n][0] / total if total > 0 else 0.0,
                **located[n],
            }
        )
    return rows


def patch_rows(
    run_id: str, method: str, layer: str, layout: MapLayout, stats: MapStatistics
) -> list[tuple[HeatmapKey, dict[str, Any]]]:
    """The top patches of every map, ranked, each keyed by the heatmap it belongs to.

    A patch whose source box a better one already has is left out (sources smaller than the
    patch grid), and the ranks stay contiguous.
    """
    rows = []
    distinct = distinct_ranks(
        np.asarray(stats.patch_boxes, dtype=np.int64).reshape(len(layout.item_ids), -1, 4)
    )
    for n, (item_id, target) in enumerate(zip(layout.item_ids, layout.targets, strict=True)):
        key = (item_id, method, layer, target)
        kept = distinct[n]
        rows.extend(
            (
                key,
                {
                    "run_id": run_id,
                    "item_id": item_id,
                    "method": method,
                    "layer": layer,
                    "target_class": target,
                    "rank": rank,
                    "row": row,
                    "col": col,
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    "score": score,
                },
            )
            for rank, (score, row, col, (x0, y0, x1, y1)) in enumerate(
                (
                    stats.patch_scores[n][k],
                    stats.patch_rows[n][k],
                    stats.patch_cols[n][k],
                    stats.patch_boxes[n][k],
                )
                for k in kept
            )
        )
    return rows
