"""The rows and packed objects of one synthetic shard, built with the worker's own row and tar builders.

bench/scale.py commits these from many processes; the maps are real encodings
(``workers/heatmap_io.py``) of CAM-like maps, so the bytes and rows have a real shard's size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from workers.packing import build_tar, packed_key, sample_key


@dataclass(frozen=True)
class Shape:
    """What one shard writes: its images, methods, top patches, and the size of every map."""

    images: int = 256
    methods: tuple[str, ...] = ("gradcam", "cam")
    top_patches: int = 5
    map_side: int = 224  # the normalised PNG, at input resolution
    raw_side: int = 7  # the raw map: a ResNet's last stage at 224 px
    distinct_maps: int = 32  # real encodings, reused across the shard's images


@dataclass(frozen=True)
class SyntheticMaps:
    """Real encodings of CAM-like maps: what the encoders of a worker would have produced."""

    png: list[bytes]
    npy: list[bytes]
    sha256: list[str]
    maps_u8: np.ndarray  # [distinct, H, W]
    raw16: np.ndarray  # [distinct, h, w]


def synthetic_maps(shape: Shape, seed: int) -> SyntheticMaps:
    """Raw maps as a CAM leaves them (non-negative, low resolution), upsampled bilinearly."""
    import torch
    import torch.nn.functional as F

    from workers.heatmap_io import encode_npy, encode_png_gray, to_uint8

    generator = torch.Generator().manual_seed(seed)
    raw = torch.relu(torch.randn(shape.distinct_maps, 1, shape.raw_side, shape.raw_side, generator=generator))
    up = F.interpolate(raw, size=(shape.map_side, shape.map_side), mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    maps_u8 = to_uint8((up - lo) / (hi - lo).clamp_min(1e-6)).numpy()
    raw16 = raw[:, 0].to(torch.float16).numpy()
    png = [encode_png_gray(m) for m in maps_u8]
    npy = [encode_npy(r) for r in raw16]
    return SyntheticMaps(png, npy, [hashlib.sha256(p).hexdigest() for p in png], maps_u8, raw16)


@dataclass
class BuiltShard:
    rows: Any  # workers.shard_rows.ShardRows
    objects: list[tuple[str, bytes]]


def build_shard(work: Any, shape: Shape, maps: SyntheticMaps, seed: int) -> BuiltShard:
    """The rows and packed objects one shard commits, from the worker's own row builders."""
    from workers.preprocess import ImageTransform
    from workers.shard_rows import (
        MapLayout,
        MapStatistics,
        ShardRows,
        heatmap_rows,
        patch_rows,
        prediction_rows_of,
    )

    rng = np.random.default_rng(seed)
    n = len(work.items)
    pick = rng.integers(0, len(maps.png), size=n)
    side = shape.map_side
    transform = ImageTransform(source=(side, side), resized=(side, side), offset=(0, 0), input=(side, side))
    n_classes = len(work.class_names) if work.class_names else 1000
    top_c = [list(map(int, rng.choice(n_classes, size=5, replace=False))) for _ in range(n)]
    probs = np.sort(rng.dirichlet(np.ones(n_classes) * 0.1, size=n)[:, :5], axis=1)[:, ::-1]
    batch = [(item, SimpleNamespace(width=side, height=side, transform=transform)) for item in work.items]
    rows = ShardRows(items=prediction_rows_of(work, batch, probs.tolist(), top_c))
    layout = MapLayout(
        item_ids=[item.id for item in work.items],
        targets=[c[0] for c in top_c],
        scores=[float(p[0]) for p in probs],
        transforms=[transform] * n,
        boxes=[None] * n,
    )
    grid = 224 // 32
    k = shape.top_patches
    cells = np.stack([rng.choice(grid * grid, size=k, replace=False) for _ in range(n)])
    scores = np.sort(rng.random((n, k)), axis=1)[:, ::-1]
    stats = MapStatistics(
        maps_u8=maps.maps_u8[pick],
        raw16=maps.raw16[pick],
        raw_max=maps.raw16[pick].max(axis=(1, 2)).astype(float).tolist(),
        raw_mean=maps.raw16[pick].mean(axis=(1, 2), dtype=np.float64).tolist(),
        map_mean=(maps.maps_u8[pick].mean(axis=(1, 2)) / 255).tolist(),
        patch_scores=scores.tolist(),
        patch_rows=(cells // grid).tolist(),
        patch_cols=(cells % grid).tolist(),
        patch_boxes=[
            [
                [int(c % grid) * 32, int(c // grid) * 32, int(c % grid) * 32 + 32, int(c // grid) * 32 + 32]
                for c in row
            ]
            for row in cells
        ],
        patch_total=(scores.sum(axis=1) * 4).tolist(),
    )
    objects = []
    for method in work.methods:
        for layer in work.layers:
            key = packed_key(work.run_id, method, layer, work.shard_index)
            members: dict[str, bytes] = {}
            for item_id, target, m in zip(layout.item_ids, layout.targets, pick, strict=True):
                name = sample_key(item_id, target)
                members[f"{name}.png"], members[f"{name}.npy"] = maps.png[m], maps.npy[m]
            tar, spans = build_tar(members)
            objects.append((key, tar))
            heatmaps = heatmap_rows(work.run_id, method, layer, layout, stats, [(key, key)] * n)
            for row, m in zip(heatmaps, pick, strict=True):
                name = sample_key(row["item_id"], row["target_class"])
                row["sha256"] = maps.sha256[m]
                row["object_offset"], row["object_length"] = spans[f"{name}.png"]
                row["raw_offset"], row["raw_length"] = spans[f"{name}.npy"]
            rows.heatmaps.extend(heatmaps)
            rows.patches.extend(patch_rows(work.run_id, method, layer, layout, stats))
    return BuiltShard(rows, objects)


def rows_of(rows: Any) -> int:
    return len(rows.items) + len(rows.heatmaps) + len(rows.patches)
