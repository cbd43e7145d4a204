"""A batch's results, reduced on the device and brought to the host in three copies.

The serial path reads every statistic back on its own (``.cpu()`` / ``.tolist()``: 4 + 9 per
method and layer, each a device sync). Here every number the rows need (predictions, targets,
scores and each map's statistics and top patches) is packed into one float32 tensor, the maps
into one uint8 and the raw maps into one float16 tensor, and each is copied once, without
blocking, into pinned host memory on CUDA; an event says when they have arrived. The same torch
operations as :func:`workers.shard_rows.map_statistics` and ``prediction_rows`` compute them,
and float32 holds every packed integer exactly (class indices and patch positions are far below
2**24), so the rows are the same, byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workers.cam import CamResult
from workers.heatmap_io import to_uint8
from workers.patches import patch_boxes, top_patches
from workers.preprocess import ImageTransform
from workers.shard_rows import MapStatistics, class_probabilities

_FIXED = 4  # raw_max, raw_mean, map_mean, patch_total


@dataclass(frozen=True)
class _Block:
    method: str
    layer: str
    raw_shape: tuple[int, int]
    patches: int  # L


@dataclass
class PackedBatch:
    """The host copies of one batch's results; :meth:`wait` before reading them."""

    numbers: torch.Tensor  # float32 [P]
    maps_u8: torch.Tensor  # uint8 [M * N * H * W]
    raw16: torch.Tensor  # float16 [sum over blocks of N * h * w]
    blocks: list[_Block]
    images: int  # B
    targets: int  # K
    top_k: int
    map_size: tuple[int, int]
    event: torch.cuda.Event | None
    single_logit: bool = False  # a binary head: its predicted class is a decision on the sigmoid

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy into pinned memory on CUDA; the tensor itself on the CPU."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def pack(
    result: CamResult,
    methods: list[str],
    input_size: tuple[int, int],
    patch_size: int,
    n_patches: int,
    top_k_predictions: int,
) -> PackedBatch:
    """Reduce ``result`` on its device and start the copies to the host (see the module docstring)."""
    probs = class_probabilities(result.logits)  # softmax, or a single logit's sigmoid
    k = min(top_k_predictions, probs.shape[1])
    top_p, top_c = torch.topk(probs, k, dim=1)
    images, targets = result.targets.shape
    numbers = [top_p.float().reshape(-1), top_c.float().reshape(-1)]
    numbers += [result.targets.float().reshape(-1), result.scores.float().reshape(-1)]
    maps_u8, raws, blocks = [], [], []
    for method in methods:
        for layer in result.layers:
            maps = result.layer_maps[method][layer]
            raw = result.raw[method][layer].float()
            n = images * targets
            flat_raw = raw.reshape(n, *raw.shape[-2:])
            top = top_patches(flat_raw, input_size, patch_size, n_patches)
            stats = torch.cat(
                [
                    flat_raw.amax(dim=(1, 2))[:, None],
                    flat_raw.mean(dim=(1, 2))[:, None],
                    maps.reshape(n, -1).float().mean(dim=1)[:, None],
                    top.total[:, None],
                    top.scores,
                    top.rows.float(),
                    top.cols.float(),
                ],
                dim=1,
            )
            numbers.append(stats.reshape(-1))
            maps_u8.append(to_uint8(maps).reshape(-1))
            raws.append(flat_raw.to(torch.float16).reshape(-1))
            blocks.append(_Block(method, layer, tuple(raw.shape[-2:]), top.scores.shape[1]))
    packed = torch.cat(numbers)
    u8 = torch.cat(maps_u8)
    raw16 = torch.cat(raws)
    host = [_to_host(t) for t in (packed, u8, raw16)]
    event = None
    if packed.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return PackedBatch(
        numbers=host[0],
        maps_u8=host[1],
        raw16=host[2],
        blocks=blocks,
        images=images,
        targets=targets,
        top_k=k,
        map_size=tuple(result.layer_maps[methods[0]][result.layers[0]].shape[-2:]),
        event=event,
        single_logit=probs.shape[1] == 1,
    )


@dataclass(frozen=True)
class Unpacked:
    top_p: list[list[float]]  # [B][k]
    top_c: list[list[int]]
    targets: list[int]  # [N]
    scores: list[float]
    statistics: dict[tuple[str, str], MapStatistics]
    single_logit: bool = False


def unpack(
    packed: PackedBatch, patch_size: int, input_size: tuple[int, int], transforms: Sequence[ImageTransform]
) -> Unpacked:
    """Host-side lists and arrays, as the serial path makes them (after :meth:`PackedBatch.wait`)."""
    packed.wait()
    numbers = packed.numbers.numpy()
    u8 = packed.maps_u8.numpy()
    raw16 = packed.raw16.numpy()
    b, kk, k = packed.images, packed.targets, packed.top_k
    n = b * kk
    at = 0

    def take(count: int) -> np.ndarray:
        nonlocal at
        part = numbers[at : at + count]
        at += count
        return part

    top_p = take(b * k).reshape(b, k).tolist()
    top_c = take(b * k).reshape(b, k).astype(np.int64).tolist()
    targets = take(n).astype(np.int64).tolist()
    scores = take(n).tolist()
    statistics = {}
    u8_at = raw_at = 0
    height, width = packed.map_size
    for block in packed.blocks:
        ell = block.patches
        stats = take(n * (_FIXED + 3 * ell)).reshape(n, _FIXED + 3 * ell)
        rows = stats[:, _FIXED + ell : _FIXED + 2 * ell].astype(np.int64)
        cols = stats[:, _FIXED + 2 * ell :].astype(np.int64)
        h, w = block.raw_shape
        statistics[(block.method, block.layer)] = MapStatistics(
            maps_u8=u8[u8_at : u8_at + n * height * width].reshape(n, height, width),
            raw16=raw16[raw_at : raw_at + n * h * w].reshape(n, h, w),
            raw_max=stats[:, 0].tolist(),
            raw_mean=stats[:, 1].tolist(),
            map_mean=stats[:, 2].tolist(),
            patch_scores=stats[:, _FIXED : _FIXED + ell].tolist(),
            patch_rows=rows.tolist(),
            patch_cols=cols.tolist(),
            patch_boxes=patch_boxes(rows, cols, patch_size, input_size, transforms).tolist(),
            patch_total=stats[:, 3].tolist(),
        )
        u8_at += n * height * width
        raw_at += n * h * w
    return Unpacked(top_p, top_c, targets, scores, statistics, packed.single_logit)
