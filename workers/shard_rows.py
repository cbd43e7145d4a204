"""The rows a shard commits, built from one batch's CAM result.

Kept apart from claiming and committing so that what is measured on a map (its statistics)
and how it is written down (the rows) can change without touching the shard's life cycle.
Every map of a batch is addressed by one index ``n = b * n_targets + t``, shared by every
method and layer (:class:`MapLayout`).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from schema.models import ItemStatus
from workers.cam import CamResult
from workers.heatmap_io import to_uint8
from workers.images import DecodedPixels
from workers.patches import patch_boxes, top_patches

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
    source_sizes: np.ndarray  # int [N, 2]: (width, height) of map n's source image


def map_layout(batch: list[tuple[WorkItem, DecodedPixels]], result: CamResult) -> MapLayout:
    """Only the valid maps: an item with fewer targets than the batch's widest has padded columns."""
    chosen = result.targets.cpu()
    n_targets = chosen.shape[1]
    keep = result.valid.cpu().reshape(-1).tolist()
    scores = [score for per_item in result.scores.float().cpu().tolist() for score in per_item]
    item_ids = [item.id for item, _ in batch for _t in range(n_targets)]
    sizes = np.repeat(np.array([(img.width, img.height) for _, img in batch]), n_targets, axis=0)
    return MapLayout(
        item_ids=[item_id for item_id, ok in zip(item_ids, keep, strict=True) if ok],
        targets=[target for target, ok in zip(chosen.reshape(-1).tolist(), keep, strict=True) if ok],
        scores=[score for score, ok in zip(scores, keep, strict=True) if ok],
        source_sizes=sizes[np.array(keep, dtype=bool)],
    )


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
    source_sizes: np.ndarray,
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
    boxes = patch_boxes(p_rows, p_cols, patch_size, input_size, source_sizes).tolist()
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


def failed_item_row(item: WorkItem, error: str) -> dict[str, Any]:
    return {"id": item.id, "status": ItemStatus.FAILED, "error": error}


def prediction_rows(
    work: ShardWork, batch: list[tuple[WorkItem, DecodedPixels]], result: CamResult
) -> list[dict[str, Any]]:
    """One done item row per image: its top-k predictions, predicted class and whether it is right."""
    logits = result.logits.float()
    # a single logit or a multi-label head scores each class on its own: sigmoid, not softmax
    independent = (
        logits.shape[1] == 1 or work.target_spec in ("labels",) or work.target_spec.startswith("above:")
    )
    probs = torch.sigmoid(logits) if independent else torch.softmax(logits, dim=1)
    k = min(work.top_k_predictions, probs.shape[1])
    top_p, top_c = (t.cpu() for t in torch.topk(probs, k, dim=1))
    names = work.class_names
    rows = []
    for b, (item, img) in enumerate(batch):
        preds = [
            {
                "class": int(c),
                "name": names[int(c)] if names and int(c) < len(names) else None,
                "prob": float(p),
            }
            for p, c in zip(top_p[b].tolist(), top_c[b].tolist(), strict=True)
        ]
        pred = int(top_c[b, 0])
        correct = None
        if item.label is not None and names:
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
) -> list[dict[str, Any]]:
    """One row per map; ``keys[n]`` are its PNG and npy keys. ``sha256`` is filled in once encoded."""
    rows = []
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
                "sha256": "",
                "raw_max": stats.raw_max[n],
                "raw_mean": stats.raw_mean[n],
                "map_mean": stats.map_mean[n],
                "top_patch_fraction": stats.patch_scores[n][0] / total if total > 0 else 0.0,
            }
        )
    return rows


def patch_rows(
    run_id: str, method: str, layer: str, layout: MapLayout, stats: MapStatistics
) -> list[tuple[HeatmapKey, dict[str, Any]]]:
    """The top patches of every map, ranked, each keyed by the heatmap it belongs to."""
    rows = []
    for n, (item_id, target) in enumerate(zip(layout.item_ids, layout.targets, strict=True)):
        key = (item_id, method, layer, target)
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
                zip(
                    stats.patch_scores[n],
                    stats.patch_rows[n],
                    stats.patch_cols[n],
                    stats.patch_boxes[n],
                    strict=True,
                )
            )
        )
    return rows
