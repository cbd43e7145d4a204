"""Explaining one shard: claim it, run the images through the CAM engine, store, commit.

The order is what keeps results honest: objects are written and verified first, then one
transaction upserts every row and marks the shard done. A crash before the commit leaves
the shard pending for another delivery; a crash after it leaves nothing to redo.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schema.db import session_scope
from schema.models import Item, Run, RunStatus, Shard, ShardStatus, utcnow
from schema.settings import Settings, get_settings
from workers import metrics, results
from workers.cam import CamEngine
from workers.fetch import read_bytes
from workers.heatmap_io import encode_npy, encode_png_gray, overlay_jpeg
from workers.images import (
    DecodedPixels,
    ImageDecodeError,
    decode_pixels,
    normalise_batch,
    open_rgb,
    stack_pixels,
)
from workers.models import LoadedModel
from workers.pools import pool_sizes
from workers.run_targets import batch_spec, depends_on_item, label_targets
from workers.runtime import engine_for, model_for, storage_for
from workers.shard_rows import (
    MapLayout,
    MapStatistics,
    ShardRows,
    failed_item_row,
    heatmap_rows,
    map_layout,
    map_statistics,
    patch_rows,
    prediction_rows,
    valid_maps,
)
from workers.storage import ConcurrentWriter, S3Storage

log = logging.getLogger("camaudit.worker")


@dataclass(frozen=True)
class WorkItem:
    id: int
    source_uri: str
    label: str | None


@dataclass
class ShardWork:
    run_id: str
    shard_id: int
    shard_index: int
    model_ref: str
    checkpoint: str | None
    methods: list[str]
    layers: list[str]
    target_spec: str
    patch_size: int
    top_patches: int
    top_k_predictions: int
    batch_size: int
    output_uri: str
    class_names: list[str] | None
    items: list[WorkItem]
    overlay: bool = False
    max_targets: int | None = None


@dataclass(frozen=True)
class ShardOutcome:
    run_id: str
    shard_index: int
    status: str  # "done", "skipped" (already done) or "failed"
    n_done: int = 0
    n_failed: int = 0
    run_status: str | None = None  # set when this shard finished the run

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def heatmap_key(run_id: str, method: str, layer: str, item_id: int, target: int, ext: str) -> str:
    """Deterministic, so a retried shard overwrites its own objects instead of adding new ones."""
    return f"runs/{run_id}/{method}/{layer}/{item_id}/{target}.{ext}"


def claim_shard(database_url: str, run_id: str, shard_id: int) -> ShardWork | None:
    with session_scope(database_url) as session:
        shard = session.get(Shard, shard_id)
        run = session.get(Run, run_id)
        if shard is None or run is None or shard.run_id != run_id:
            raise LookupError(f"shard {shard_id} of run {run_id} does not exist in {database_url}")
        if shard.status == ShardStatus.DONE:
            return None
        shard.status = ShardStatus.RUNNING
        shard.attempts += 1
        shard.worker = worker_name()
        shard.started_at = utcnow()
        if run.status == RunStatus.PENDING:
            run.status = RunStatus.RUNNING
            run.started_at = utcnow()
        rows = session.execute(
            select(Item.id, Item.source_uri, Item.label)
            .where(Item.shard_id == shard_id)
            .order_by(Item.ordinal)
        ).all()
        return ShardWork(
            run_id=run_id,
            shard_id=shard_id,
            shard_index=shard.index,
            model_ref=run.model_ref,
            checkpoint=run.checkpoint_uri,
            methods=list(run.methods),
            layers=list(run.layers),
            target_spec=run.target_spec,
            patch_size=run.patch_size,
            top_patches=run.top_patches,
            top_k_predictions=int(run.config.get("top_k_predictions", 5)),
            batch_size=int(run.config.get("batch_size", 16)),
            output_uri=run.output_uri,
            class_names=list(run.class_names) if run.class_names else None,
            overlay=bool(run.config.get("overlay", False)),
            max_targets=run.config.get("max_targets"),
            items=[WorkItem(id=r.id, source_uri=r.source_uri, label=r.label) for r in rows],
        )


Decoded = tuple[DecodedPixels, bytes | None]


def _decoded_stream(
    work: ShardWork, settings: Settings, size: tuple[int, int], threads: int
) -> Iterator[tuple[WorkItem, Decoded | str]]:
    """Decode ahead of the model on a thread pool; yields (item, image or failure reason) in order.

    The source bytes come along only when overlays are wanted, to draw them at source size.
    """

    def load(item: WorkItem) -> Decoded | str:
        try:
            data = read_bytes(
                item.source_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
            )
            return decode_pixels(data, size, max_pixels=settings.max_image_pixels, name=item.source_uri), (
                data if work.overlay else None
            )
        except FileNotFoundError:
            return f"file not found: {item.source_uri}"
        except ImageDecodeError as exc:
            return str(exc)
        except Exception as exc:  # one unreadable item must never fail its shard
            return f"cannot read {item.source_uri}: {type(exc).__name__}: {exc}"

    window = max(2 * work.batch_size, threads)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: list[tuple[WorkItem, Future[Decoded | str]]] = []
        items = iter(work.items)
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.pop(0)
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield item, fut.result()


def _targets_for(work: ShardWork, batch: list[WorkItem]) -> tuple[Any, list[str | None]]:
    """Translate the run's target spec into the engine's argument; per-item errors for bad labels."""
    spec = work.target_spec
    errors: list[str | None] = [None] * len(batch)
    if spec.startswith("classes:"):
        classes = [int(c) for c in spec.split(":", 1)[1].split(",")]
        return torch.tensor([classes] * len(batch), dtype=torch.int64), errors
    if depends_on_item(spec):  # label, labels: the ground truth of each item
        labels = [item.label for item in batch]
        return label_targets(labels, work.class_names or [], every=spec == "labels")
    return batch_spec(spec, work.max_targets), errors


def _encode_and_upload(
    writer: ConcurrentWriter,
    keys: list[tuple[str, str]],
    maps_u8: np.ndarray,
    raws16: np.ndarray,
    sources: list[bytes | None],
) -> list[str]:
    """Runs on the encoder pool (zlib releases the GIL), so the device never waits on PNG encoding.

    One task per method, layer and batch: ``keys[n]`` are the PNG and npy keys of map ``n``.
    Returns each PNG's sha256, in order. An item's source is decoded once per task for its
    overlays, however many targets it has.
    """
    digests = []
    upright: dict[int, Image.Image] = {}
    for (png_key, npy_key), map_u8, raw16, source in zip(keys, maps_u8, raws16, sources, strict=True):
        png = encode_png_gray(map_u8)
        writer.submit(png_key, png, "image/png")
        writer.submit(npy_key, encode_npy(raw16), "application/octet-stream")
        if source is not None:
            if id(source) not in upright:
                upright[id(source)] = open_rgb(source)
            overlay = overlay_jpeg(upright[id(source)], map_u8.astype(np.float32) / 255.0)
            writer.submit(png_key.removesuffix(".png") + ".jpg", overlay, "image/jpeg")
        digests.append(hashlib.sha256(png).hexdigest())
    return digests


def _batch_targets(
    work: ShardWork,
    batch: list[tuple[WorkItem, DecodedPixels]],
    rows: ShardRows,
    device: torch.device,
) -> tuple[Any, list[tuple[WorkItem, DecodedPixels]]]:
    """The engine's targets for the items that have one; the others fail here with their reason."""
    targets, target_errors = _targets_for(work, [item for item, _ in batch])
    keep = [i for i, err in enumerate(target_errors) if err is None]
    for (item, _), err in zip(batch, target_errors, strict=True):
        if err is not None:
            rows.items.append(failed_item_row(item, err))
    if isinstance(targets, torch.Tensor) and keep:
        targets = targets[keep].to(device)
    elif isinstance(targets, list):
        targets = [targets[i] for i in keep]
    return targets, [batch[i] for i in keep]


def _submit_encoding(
    work: ShardWork,
    method: str,
    layer: str,
    layout: MapLayout,
    stats: MapStatistics,
    sources: list[bytes | None],
    writer: ConcurrentWriter,
    encoder: ThreadPoolExecutor,
) -> tuple[list[tuple[str, str]], Future[list[str]]]:
    """The PNG and npy keys of every map, and the encoder task that writes them (and overlays)."""
    keys = [
        (
            heatmap_key(work.run_id, method, layer, item_id, target, "png"),
            heatmap_key(work.run_id, method, layer, item_id, target, "npy"),
        )
        for item_id, target in zip(layout.item_ids, layout.targets, strict=True)
    ]
    shas = encoder.submit(_encode_and_upload, writer, keys, stats.maps_u8, stats.raw16, sources)
    return keys, shas


def _explain_batch(
    work: ShardWork,
    loaded: LoadedModel,
    engine: CamEngine,
    batch: list[tuple[WorkItem, DecodedPixels]],
    writer: ConcurrentWriter,
    encoder: ThreadPoolExecutor,
    rows: ShardRows,
    sources: dict[int, bytes],
) -> None:
    device = next(loaded.model.parameters()).device
    pre = loaded.preprocess
    targets, batch = _batch_targets(work, batch, rows, device)
    if not batch:
        return
    pixels = stack_pixels([img for _, img in batch]).to(device, non_blocking=True)
    result = engine(normalise_batch(pixels, tuple(pre.mean), tuple(pre.std)), targets=targets)
    rows.items.extend(prediction_rows(work, batch, result))

    layout = map_layout(batch, result)
    if not layout.item_ids:  # e.g. no class of any image passed an 'above:T' threshold
        return
    map_sources = [sources.get(item_id) for item_id in layout.item_ids]
    for method in work.methods:
        for layer in result.layers:
            stats = map_statistics(
                valid_maps(result.layer_maps[method][layer], result.valid),
                valid_maps(result.raw[method][layer], result.valid),
                pre.size,
                work.patch_size,
                work.top_patches,
                layout.source_sizes,
            )
            keys, shas = _submit_encoding(work, method, layer, layout, stats, map_sources, writer, encoder)
            heatmaps = heatmap_rows(work.run_id, method, layer, layout, stats, keys)
            rows.heatmaps.extend(heatmaps)
            rows.encoded.append((heatmaps, shas))
            rows.patches.extend(patch_rows(work.run_id, method, layer, layout, stats))


def compute_shard(work: ShardWork, settings: Settings) -> ShardRows:
    loaded = model_for(work.model_ref, work.checkpoint, settings)
    engine = engine_for(loaded, work.methods, work.layers, settings)
    storage = storage_for(work.output_uri, settings)
    sizes = pool_sizes(settings, remote_storage=isinstance(storage, S3Storage))
    rows = ShardRows()
    with (
        ConcurrentWriter(storage, max_workers=sizes.upload) as writer,
        ThreadPoolExecutor(max_workers=sizes.encode, thread_name_prefix="encode") as encoder,
    ):
        batch: list[tuple[WorkItem, DecodedPixels]] = []
        sources: dict[int, bytes] = {}
        for item, opened in _decoded_stream(work, settings, loaded.preprocess.size, sizes.decode):
            if isinstance(opened, str):
                log.warning(
                    "run=%s shard=%d item=%d failed: %s", work.run_id, work.shard_index, item.id, opened
                )
                rows.items.append(failed_item_row(item, opened))
                continue
            decoded, source = opened
            batch.append((item, decoded))
            if source is not None:
                sources[item.id] = source
            if len(batch) == work.batch_size:
                _explain_batch(work, loaded, engine, batch, writer, encoder, rows, sources)
                batch, sources = [], {}
        if batch:
            _explain_batch(work, loaded, engine, batch, writer, encoder, rows, sources)
        for heatmap_rows, shas in rows.encoded:
            for row, sha in zip(heatmap_rows, shas.result(), strict=True):
                row["sha256"] = sha
        writer.flush()
    return rows


def _finish_run_if_complete(session: Session, run: Run) -> str | None:
    """Called with the run row locked: exactly one shard completion sees the last shard land."""
    if run.status in RunStatus.TERMINAL or run.shards_done + run.shards_failed < run.n_shards:
        return None
    if run.shards_failed == 0:
        run.status = RunStatus.FINISHED
    elif run.shards_done > 0:
        run.status = RunStatus.PARTIAL
    else:
        run.status = RunStatus.FAILED
    run.finished_at = utcnow()
    return run.status


def _refresh_run(session: Session, run: Run) -> str | None:
    """Derive the run's counters from its shards, so no order of deliveries can double-count."""
    session.flush()
    counts = session.execute(
        select(
            func.count().filter(Shard.status == ShardStatus.DONE),
            func.count().filter(Shard.status == ShardStatus.FAILED),
            func.coalesce(func.sum(Shard.n_done), 0),
            func.coalesce(func.sum(Shard.n_failed), 0),
        ).where(Shard.run_id == run.id)
    ).one()
    run.shards_done, run.shards_failed, run.n_done, run.n_failed = (int(v) for v in counts)
    return _finish_run_if_complete(session, run)


def _lock_run(session: Session, run_id: str) -> Run:
    run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one()
    return run


def commit_shard(database_url: str, work: ShardWork, rows: ShardRows) -> ShardOutcome:
    with session_scope(database_url) as session:
        results.update_items(session, rows.items)
        ids = results.upsert_heatmaps(session, rows.heatmaps)
        results.delete_stale_patch_scores(session, list(ids.values()), work.top_patches)
        results.upsert_patch_scores(session, [{"heatmap_id": ids[key], **row} for key, row in rows.patches])
        run = _lock_run(session, work.run_id)
        shard = session.get(Shard, work.shard_id, populate_existing=True)
        assert shard is not None
        run_status = None
        if shard.status != ShardStatus.DONE:
            shard.status = ShardStatus.DONE
            shard.error = None
            shard.finished_at = utcnow()
            shard.n_done, shard.n_failed = rows.n_done, rows.n_failed
            run_status = _refresh_run(session, run)
    return ShardOutcome(work.run_id, work.shard_index, "done", rows.n_done, rows.n_failed, run_status)


def fail_shard(database_url: str, run_id: str, shard_id: int, error: str) -> ShardOutcome:
    """A shard that has used its retries ends failed, so its run can end ``partial`` instead of hanging."""
    with session_scope(database_url) as session:
        run = _lock_run(session, run_id)
        shard = session.get(Shard, shard_id, populate_existing=True)
        assert shard is not None
        run_status = None
        if shard.status not in (ShardStatus.DONE, ShardStatus.FAILED):
            shard.status = ShardStatus.FAILED
            shard.error = error[:4000]
            shard.finished_at = utcnow()
            run_status = _refresh_run(session, run)
        index = shard.index
    return ShardOutcome(run_id, index, "failed", run_status=run_status)


def explain_shard(run_id: str, shard_id: int, settings: Settings | None = None) -> ShardOutcome:
    settings = settings or get_settings()
    work = claim_shard(settings.database_url, run_id, shard_id)
    if work is None:
        log.info("run=%s shard_id=%d already done; nothing to do", run_id, shard_id)
        return ShardOutcome(run_id, -1, "skipped")
    log.info("run=%s shard=%d: %d items", run_id, work.shard_index, len(work.items))
    started = time.perf_counter()
    rows = compute_shard(work, settings)
    outcome = commit_shard(settings.database_url, work, rows)
    metrics.record_shard(outcome.n_done, outcome.n_failed, time.perf_counter() - started)
    log.info(
        "run=%s shard=%d done: %d items ok, %d failed%s",
        run_id,
        work.shard_index,
        outcome.n_done,
        outcome.n_failed,
        f"; run {outcome.run_status}" if outcome.run_status else "",
    )
    return outcome
