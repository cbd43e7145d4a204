"""Explaining one shard: claim it, run the images through the CAM engine, store, commit.

The order is what keeps results honest: objects are written and verified first, then one
transaction upserts every row and marks the shard done. A crash before the commit leaves
the shard pending for another delivery; a crash after it leaves nothing to redo.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch
from PIL import Image
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session, sessionmaker

from schema.db import get_engine, session_scope
from schema.models import Item, Run, RunStatus, Shard, ShardStatus, utcnow
from schema.redact import hide_password
from schema.settings import Settings, get_settings
from workers import metrics, results, run_counters
from workers.cam import CamEngine, CamResult
from workers.cam.device_errors import is_device_error, is_out_of_memory
from workers.device_decode import (
    DecodeChoice,
    PendingJpeg,
    calibrate,
    decided,
    decode_on_device,
    prepare_jpeg,
    remember,
)
from workers.device_defaults import defaults_for
from workers.fetch import LocalSources, SourceRefused, read_source, run_roots
from workers.heatmap_io import JPEG_MAX_SIDE, encode_npy, encode_png_gray, overlay_jpeg
from workers.images import (
    DecodedPixels,
    ImageDecodeError,
    decode_pixels,
    normalise_batch,
    open_rgb,
    stack_pixels,
)
from workers.lease import (
    Heartbeat,
    LeaseLost,
    aware,
    db_now,
    expire_lease,
    hand_back_for_retry,
    short_error,
)
from workers.localisation import localisation_columns
from workers.models import LoadedModel
from workers.multiview import case_batches, explain_cases, order_cases
from workers.packed_statistics import PackedBatch, pack, unpack
from workers.packing import MapWriter, Sink, map_writer
from workers.pools import PoolSizes, pool_sizes
from workers.preprocess import ImageTransform, Preprocess
from workers.provenance import shard_provenance
from workers.run_targets import batch_spec, depends_on_item, label_targets
from workers.runtime import (
    amp_argument,
    apply_torch_threads,
    engine_for,
    host_threads,
    model_for,
    storage_for,
)
from workers.shard_rows import (
    MapLayout,
    MapStatistics,
    ShardRows,
    failed_item_row,
    heatmap_rows,
    layout_of,
    map_layout,
    map_statistics,
    map_transforms,
    non_finite_reasons,
    patch_rows,
    prediction_rows,
    prediction_rows_of,
    valid_maps,
)
from workers.storage import ConcurrentWriter, S3Storage

log = logging.getLogger("camaudit.worker")


@dataclass(frozen=True)
class WorkItem:
    id: int
    source_uri: str
    label: str | None
    box: list[float] | None = None
    group_id: str | None = None
    view: str | None = None


@dataclass
class ShardWork:
    run_id: str
    shard_id: int
    shard_index: int
    model_ref: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    methods: list[str]
    layers: list[str]
    target_spec: str
    patch_size: int
    top_patches: int
    top_k_predictions: int
    batch_size: int | None  # None: by the worker's device
    output_uri: str
    class_names: list[str] | None
    items: list[WorkItem]
    preprocess_record: dict[str, Any]  # the run's recorded transform: the same on every worker
    overlay: bool = False
    # Real folders local items may be read from; empty for a source on S3 (objects only).
    source_roots: list[str] = field(default_factory=list)
    views: list[str] | None = None  # a multi-view model's views in input order: workers/multiview.py
    missing_view: str = "fail"
    attempt: int = 0  # the fencing token: only this attempt's holder may commit
    worker: str = ""
    score_batch_size: int | None = None  # None: by the worker's device
    max_targets: int | None = None  # with above:T targets, the most per image
    layout: str = "files"  # where maps go: workers/packing.py

    @functools.cached_property
    def preprocess(self) -> Preprocess:
        """Parsed when the shard is computed: a record that cannot work fails the shard with why."""
        return Preprocess.from_dict(self.preprocess_record)


@dataclass(frozen=True)
class ShardOutcome:
    run_id: str
    shard_index: int
    # "done", "skipped" (done already, held by another worker, run being deleted),
    # "failed", or "fenced" (this attempt lost the shard; nothing of it was kept)
    status: str
    n_done: int = 0
    n_failed: int = 0
    run_status: str | None = None  # set when this shard finished the run
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def worker_name(node: str | None = None) -> str:
    """The Celery node (``gpu0@host``) or the host, and the process: who holds a lease."""
    return f"{node or socket.gethostname()}:{os.getpid()}"


def lock_run_row(run_id: str) -> Select[tuple[Run]]:
    """The run row, locked ``FOR NO KEY UPDATE``: what commits, sweeps and claims changing it take.

    Every shard commit inserts heatmaps whose foreign key takes a ``KEY SHARE`` lock on this
    row first, and only then locks the row to update its counters. A plain ``FOR UPDATE``
    conflicts with ``KEY SHARE``: two commits of one run at once each waited for the other's
    key-share lock, and PostgreSQL aborted one of them as deadlocked (bench/scale.py at two
    workers), while every other worker's inserts queued behind the one commit holding it.
    ``NO KEY UPDATE`` still serialises the commits' counter updates with each other and with
    gc (whose ``FOR UPDATE`` waits for every key-share holder), and leaves inserts alone.
    SQLite has no row locks; there it changes nothing.
    """
    return select(Run).where(Run.id == run_id).with_for_update(key_share=True)


def _run_for_claim(session: Session, run_id: str, shard_id: int) -> tuple[Run | None, bool]:
    """The run row for a claim, and whether it is locked to be changed (``FOR NO KEY UPDATE``).

    Most claims only read the run: a ``FOR KEY SHARE`` lock keeps gc (``FOR UPDATE``) from
    marking it deleting meanwhile, and neither waits for other claims nor for commits holding
    the run row (bench/scale.py: at eight workers, claims spent most of their time there). The
    first claims of a pending run and a claim taking over an expired lease change the run, and
    lock it so before the shard, in the order commits take them.
    """
    readable = select(Run).where(Run.id == run_id).with_for_update(read=True, key_share=True)
    run = session.execute(readable).scalar_one_or_none()
    if run is None:
        return None, False
    lease = session.execute(
        select(Shard.status, Shard.lease_expires_at).where(Shard.id == shard_id)
    ).one_or_none()
    expired = (
        lease is not None
        and lease.status == ShardStatus.RUNNING
        and lease.lease_expires_at is not None
        and aware(lease.lease_expires_at) <= db_now(session)
    )
    if run.status != RunStatus.PENDING and not expired:
        return run, False
    locked = lock_run_row(run_id).execution_options(populate_existing=True)
    return session.execute(locked).scalar_one(), True


def _lock_shard(session: Session, shard_id: int) -> Shard | None:
    return session.execute(
        select(Shard).where(Shard.id == shard_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()


def note_lost_lease(session: Session, run: Run, shard: Shard, now: datetime, max_lost: int) -> str | None:
    """The shard's worker is gone (its lease ran out): record who held it, and make it runnable.

    A shard that has lost ``max_lost`` workers is failed instead: it is most likely what kills
    them (memory, the hard time limit), and enqueueing it again would only kill the next one.
    Called with the run and the shard locked; returns the run's final status if this ended it.
    """
    shard.lost_leases += 1
    shard.lost_worker = shard.worker
    shard.lost_at = now
    shard.lease_expires_at = None
    if shard.lost_leases < max_lost:
        shard.status = ShardStatus.PENDING
        return None
    shard.status = ShardStatus.FAILED
    shard.error = (
        f"lost its worker {shard.lost_leases} times (last {shard.worker}, attempt {shard.attempts}): "
        "the shard probably kills its workers (memory, the hard time limit); "
        "make it smaller or raise CAMAUDIT_MAX_LOST_LEASES, then `camaudit resume`"
    )
    shard.finished_at = now
    return _refresh_run(session, run)


def claim_shard(
    database_url: str,
    run_id: str,
    shard_id: int,
    settings: Settings | None = None,
    *,
    worker: str | None = None,
    extra_roots: str | None = None,
) -> ShardWork | ShardOutcome:
    """Take the shard's lease for a new attempt, or say why this delivery has nothing to do.

    A shard held under a live lease by another worker is left to it (a duplicate delivery);
    one whose lease ran out is taken over, and the loss is recorded.
    """
    settings = settings or get_settings()
    me = worker or worker_name()
    with session_scope(database_url) as session:
        run, run_locked = _run_for_claim(session, run_id, shard_id)
        shard = _lock_shard(session, shard_id)
        if shard is None or run is None or shard.run_id != run_id:
            raise LookupError(
                f"shard {shard_id} of run {run_id} does not exist in {hide_password(database_url)}"
            )
        if shard.status == ShardStatus.DONE:
            return ShardOutcome(run_id, shard.index, "skipped", reason="already done")
        if shard.status == ShardStatus.FAILED:
            # A late or restored delivery must not revive it; `camaudit resume` makes it pending first.
            return ShardOutcome(run_id, shard.index, "skipped", reason="failed already; resume runs it again")
        if run.status == RunStatus.DELETING:
            return ShardOutcome(run_id, shard.index, "skipped", reason="its run is being deleted")
        now = db_now(session)
        expires = aware(shard.lease_expires_at) if shard.lease_expires_at is not None else None
        if shard.status == ShardStatus.RUNNING and expires is not None:
            if expires > now and shard.worker != me:
                holder = f"attempt {shard.attempts} holds it on {shard.worker} until {expires:%H:%M:%S}"
                return ShardOutcome(run_id, shard.index, "skipped", reason=holder)
            if expires <= now and not run_locked:
                # It ran out after _run_for_claim looked; the lease sweep records the loss.
                reason = f"the lease of attempt {shard.attempts} ran out just now; it is enqueued again"
                return ShardOutcome(run_id, shard.index, "skipped", reason=reason)
            if expires <= now:
                run_status = note_lost_lease(session, run, shard, now, settings.max_lost_leases)
                if shard.status == ShardStatus.FAILED:
                    return ShardOutcome(
                        run_id, shard.index, "failed", run_status=run_status, reason=shard.error
                    )
        # Conditional on the attempt read above: of two claims at once (SQLite has no row
        # locks) only one takes the next attempt number.
        attempt = shard.attempts + 1
        taken = session.execute(
            update(Shard)
            .where(Shard.id == shard_id, Shard.attempts == shard.attempts)
            .values(
                status=ShardStatus.RUNNING,
                attempts=attempt,
                worker=me,
                started_at=now,
                heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=settings.lease_s),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if not taken:
            return ShardOutcome(run_id, shard.index, "skipped", reason="another worker claimed it just now")
        if run.status == RunStatus.PENDING:
            run.status = RunStatus.RUNNING
            run.started_at = now
        rows = session.execute(
            select(Item.id, Item.source_uri, Item.label, Item.box, Item.group_id, Item.view)
            .where(Item.shard_id == shard_id)
            .order_by(Item.ordinal)
        ).all()
        return ShardWork(
            run_id=run_id,
            shard_id=shard_id,
            shard_index=shard.index,
            model_ref=run.model_ref,
            checkpoint=run.checkpoint_uri,
            checkpoint_sha256=run.checkpoint_sha256,
            methods=list(run.methods),
            layers=list(run.layers),
            target_spec=run.target_spec,
            patch_size=run.patch_size,
            top_patches=run.top_patches,
            top_k_predictions=int(run.config.get("top_k_predictions", 5)),
            batch_size=run.config.get("batch_size"),
            score_batch_size=run.config.get("score_batch_size"),
            output_uri=run.output_uri,
            class_names=list(run.class_names) if run.class_names else None,
            preprocess_record=dict(run.preprocess),
            overlay=bool(run.config.get("overlay", False)),
            source_roots=run_roots(run.config, run.source_uri, extra_roots),
            items=[
                WorkItem(r.id, r.source_uri, r.label, r.box, group_id=r.group_id, view=r.view) for r in rows
            ],
            views=list(run.config.get("views") or []) or None,
            missing_view=str(run.config.get("missing_view") or "fail"),
            attempt=attempt,
            worker=me,
            max_targets=run.config.get("max_targets"),
            layout=str(run.config.get("layout") or "files"),
        )


Decoded = tuple[DecodedPixels, bytes | None]
Opened = tuple[DecodedPixels | PendingJpeg, bytes | None]


def _decoded_stream(
    work: ShardWork, settings: Settings, sizes: PoolSizes, *, on_device: bool = False
) -> Iterator[tuple[WorkItem, Opened | str]]:
    """Fetch and decode ahead of the model; yields (item, image or failure reason) in order.

    S3 reads run on a fetch pool of their own (tens of round trips in flight) and hand their
    bytes to the decode pool, so a decode thread never waits on the network; a local file is
    read by the decode thread itself (one thread hop less per image). The source
    bytes come along only when overlays are wanted, to draw them at source size. With
    ``on_device`` a decode thread only reads the header of a JPEG the device can decode and
    yields it as a :class:`PendingJpeg` (:func:`_device_decoded` decodes those by batch).
    """

    def failure(item: WorkItem, exc: Exception) -> str:
        if isinstance(exc, FileNotFoundError):
            return f"file not found: {item.source_uri}"
        if isinstance(exc, SourceRefused | ImageDecodeError):
            return str(exc)
        # one unreadable item must never fail its shard
        return f"cannot read {item.source_uri}: {type(exc).__name__}: {exc}"

    local = LocalSources(work.source_roots)

    def fetch(item: WorkItem) -> bytes:
        return read_source(
            item.source_uri,
            roots=work.source_roots,
            max_bytes=settings.max_source_bytes,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            local=local,
        )

    def decode(item: WorkItem, data: bytes, done: Future[Opened | str]) -> None:
        try:
            if on_device:
                pending = prepare_jpeg(data, work.preprocess, max_pixels=settings.max_image_pixels)
                if pending is not None:
                    done.set_result((pending, data if work.overlay else None))
                    return
            pixels = decode_pixels(
                data, work.preprocess, max_pixels=settings.max_image_pixels, name=item.source_uri
            )
            done.set_result((pixels, data if work.overlay else None))
        except Exception as exc:
            done.set_result(failure(item, exc))

    def read_and_decode(item: WorkItem, done: Future[Opened | str]) -> None:
        try:
            data = fetch(item)
        except Exception as exc:
            done.set_result(failure(item, exc))
            return
        decode(item, data, done)

    def start(item: WorkItem) -> Future[Opened | str]:
        done: Future[Opened | str] = Future()
        if not item.source_uri.startswith("s3://"):
            # A local read takes microseconds: a hop through the fetch pool would cost more.
            decoder.submit(read_and_decode, item, done)
            return done

        def fetched(read: Future[bytes]) -> None:
            try:
                data = read.result()
            except Exception as exc:
                done.set_result(failure(item, exc))
                return
            decoder.submit(decode, item, data, done)

        fetcher.submit(fetch, item).add_done_callback(fetched)
        return done

    assert work.batch_size is not None
    window = max(2 * work.batch_size, sizes.fetch + sizes.decode)
    # the fetch pool shuts down first (its callbacks still hand work to the decoders)
    with (
        ThreadPoolExecutor(max_workers=sizes.decode, thread_name_prefix="decode") as decoder,
        ThreadPoolExecutor(max_workers=sizes.fetch, thread_name_prefix="fetch") as fetcher,
    ):
        pending: list[tuple[WorkItem, Future[Opened | str]]] = []
        items = iter(work.items)
        for item in items:
            pending.append((item, start(item)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.pop(0)
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt, start(nxt)))
            yield item, fut.result()


def _device_decoded(
    work: ShardWork,
    settings: Settings,
    device: torch.device,
    stream: Iterator[tuple[WorkItem, Opened | str]],
    counts: collections.Counter[str],
) -> Iterator[tuple[WorkItem, Decoded | str]]:
    """Decode the stream's pending JPEGs on the device, a batch at a time, keeping the order.

    A file the device refuses is decoded on the CPU here (and fails only if that fails too).
    ``counts`` tallies where each JPEG was decoded, for the shard's log line.
    """
    assert work.batch_size is not None
    group: list[tuple[WorkItem, Opened | str]] = []

    def flush() -> Iterator[tuple[WorkItem, Decoded | str]]:
        waiting = [
            n
            for n, (_, opened) in enumerate(group)
            if not isinstance(opened, str) and isinstance(opened[0], PendingJpeg)
        ]
        pending = [group[n][1][0] for n in waiting]  # type: ignore[index]
        decoded = decode_on_device(pending, work.preprocess, device) if pending else []  # type: ignore[arg-type]
        done: dict[int, Decoded | str] = {}
        for n, jpeg, pixels in zip(waiting, pending, decoded, strict=True):
            source = group[n][1][1]  # type: ignore[index]
            if pixels is not None:
                counts["device"] += 1
                done[n] = (pixels, source)
                continue
            counts["cpu fallback"] += 1
            try:
                cpu = decode_pixels(
                    jpeg.data,
                    work.preprocess,
                    max_pixels=settings.max_image_pixels,
                    name=group[n][0].source_uri,
                )
                done[n] = (cpu, source)
            except ImageDecodeError as exc:
                done[n] = str(exc)
            except Exception as exc:  # one unreadable item must never fail its shard
                done[n] = f"cannot read {group[n][0].source_uri}: {type(exc).__name__}: {exc}"
        for n, (item, opened) in enumerate(group):
            yield item, done.get(n, opened)  # type: ignore[misc]
        group.clear()

    for entry in stream:
        group.append(entry)
        if len(group) >= work.batch_size:
            yield from flush()
    yield from flush()


def _decode_choice(
    work: ShardWork, settings: Settings, device: torch.device, sizes: PoolSizes
) -> DecodeChoice:
    """Where this worker decodes JPEGs; in ``auto`` on CUDA, measured once on the first batch's JPEGs."""
    known = decided(settings.device_decode, device)
    if known is not None:
        return known
    assert work.batch_size is not None
    pre = work.preprocess
    samples: list[PendingJpeg] = []
    for item in work.items[: work.batch_size]:
        try:
            data = read_source(
                item.source_uri,
                roots=work.source_roots,
                max_bytes=settings.max_source_bytes,
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
            )
        except Exception:
            continue  # the shard reports it; the measurement uses the files it can read
        jpeg = prepare_jpeg(data, pre, max_pixels=settings.max_image_pixels)
        if jpeg is not None:
            samples.append(jpeg)
    if len(samples) < max(1, min(8, len(work.items), work.batch_size) // 2):
        # too few JPEGs to measure (PNG sources, a tiny shard): the CPU for now, measured on a later shard
        return DecodeChoice(
            False, f"auto: {len(samples)} device-decodable JPEGs in the first batch; not measured"
        )

    def on_cpu() -> None:
        list(pool.map(lambda p: decode_pixels(p.data, pre, max_pixels=settings.max_image_pixels), samples))

    def on_device() -> None:
        decode_on_device(samples, pre, device)
        torch.cuda.synchronize(device)

    with ThreadPoolExecutor(max_workers=sizes.decode, thread_name_prefix="decode") as pool:
        try:
            refused = sum(pixels is None for pixels in decode_on_device(samples, pre, device))
            if 2 * refused > len(samples):
                # every refusal is a CPU decode on the main thread: fast-looking, slow in fact
                choice = DecodeChoice(
                    False, f"auto: the device decoder refused {refused} of {len(samples)} JPEGs"
                )
            else:
                choice = calibrate(on_cpu, on_device, len(samples), sizes.decode)
        except Exception as exc:
            if is_device_error(exc):
                raise
            choice = DecodeChoice(False, f"auto: device decoding unavailable ({type(exc).__name__}: {exc})")
    return remember(device, choice)


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
    writer: Sink,
    keys: list[tuple[str, str]],
    maps_u8: np.ndarray,
    raws16: np.ndarray,
    sources: list[bytes | None],
    transforms: list[ImageTransform],
) -> list[str]:
    """Runs on the encoder pool (zlib releases the GIL), so the device never waits on PNG encoding.

    One task per method, layer and batch: ``keys[n]`` are the PNG and npy names of map ``n`` in
    ``writer`` (the storage, or the shard's tar: workers/packing.py).
    Returns each PNG's sha256, in order. An item's source is decoded once per task for its
    overlays, however many targets it has.
    """
    digests = []
    upright: dict[int, Image.Image] = {}
    for (png_key, npy_key), map_u8, raw16, source, transform in zip(
        keys, maps_u8, raws16, sources, transforms, strict=True
    ):
        png = encode_png_gray(map_u8)
        writer.submit(png_key, png, "image/png")
        writer.submit(npy_key, encode_npy(raw16), "application/octet-stream")
        if source is not None:
            if id(source) not in upright:
                upright[id(source)] = open_rgb(source)
            overlay = overlay_jpeg(
                upright[id(source)], map_u8.astype(np.float32) / 255.0, transform=transform
            )
            writer.submit(png_key.removesuffix(".png") + ".jpg", overlay, "image/jpeg")
        digests.append(hashlib.sha256(png).hexdigest())
    return digests


def _overlay_refusal(image: DecodedPixels) -> str | None:
    """An overlay is a JPEG at source size: a source JPEG cannot hold fails alone, before any work."""
    if max(image.width, image.height) <= JPEG_MAX_SIDE:
        return None
    return (
        f"--overlay: the source is {image.width}x{image.height} pixels, and a JPEG overlay at source "
        f"size can be at most {JPEG_MAX_SIDE:,} pixels on a side; audit it without --overlay "
        "(`camaudit serve` and `camaudit render` draw overlays on demand) or downscale it"
    )


def _batch_targets(
    work: ShardWork,
    batch: list[tuple[WorkItem, DecodedPixels]],
    rows: ShardRows,
) -> tuple[Any, list[tuple[WorkItem, DecodedPixels]]]:
    """The engine's targets for the items that have one; the others fail here with their reason.

    Class targets stay on the host: the engine checks them there, without a read back from the
    device between forward and backward, and copies them over itself.
    """
    targets, target_errors = _targets_for(work, [item for item, _ in batch])
    keep = [i for i, err in enumerate(target_errors) if err is None]
    for (item, _), err in zip(batch, target_errors, strict=True):
        if err is not None:
            rows.items.append(failed_item_row(item, err))
    if isinstance(targets, torch.Tensor) and keep:
        targets = targets[keep]
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
    writer: MapWriter,
    encoder: ThreadPoolExecutor,
) -> tuple[list[tuple[str, str]], Future[list[str]]]:
    """The PNG and npy keys of every map's row, and the encoder task that writes them (and overlays)."""
    keys = writer.keys(method, layer, layout.item_ids, layout.targets)
    shas = encoder.submit(
        _encode_and_upload, keys.sink, keys.names, stats.maps_u8, stats.raw16, sources, layout.transforms
    )
    return keys.rows, shas


def _drop_non_finite(
    work: ShardWork, batch: Batch, result: CamResult, failed: list[dict[str, Any]]
) -> tuple[Batch, CamResult]:
    """Images whose model output is NaN or infinite fail alone; the rest of the batch goes on."""
    reasons = non_finite_reasons(result)
    if not any(reasons):
        return batch, result
    for (item, _), reason in zip(batch, reasons, strict=True):
        if reason is not None:
            log.warning("run=%s item=%d failed: %s", work.run_id, item.id, reason)
            failed.append(failed_item_row(item, reason))
    keep = [b for b, reason in enumerate(reasons) if reason is None]
    if not keep:
        return [], result
    return [batch[b] for b in keep], result.select_images(keep)


def _explain_batch(
    work: ShardWork,
    loaded: LoadedModel,
    engine: CamEngine,
    batch: list[tuple[WorkItem, DecodedPixels]],
    writer: MapWriter,
    encoder: ThreadPoolExecutor,
    rows: ShardRows,
    sources: dict[int, bytes],
) -> None:
    device = next(loaded.model.parameters()).device
    pre = work.preprocess
    targets, batch = _batch_targets(work, batch, rows)
    if not batch:
        return
    if work.views:
        result = explain_cases(engine, batch, work.views, tuple(pre.mean), tuple(pre.std), targets, device)
    else:
        result = _explain_or_split(work, engine, batch, targets, device)
        if result is None:
            del targets
            for part in _halves(batch):
                _explain_batch(work, loaded, engine, part, writer, encoder, rows, sources)
            return
        with host_threads(device):
            batch, result = _drop_non_finite(work, batch, result, rows.items)
        if not batch:
            return
    with host_threads(device):
        _store_batch(work, batch, result, writer, encoder, rows, sources)


def _store_batch(
    work: ShardWork,
    batch: list[tuple[WorkItem, DecodedPixels]],
    result: CamResult,
    writer: MapWriter,
    encoder: ThreadPoolExecutor,
    rows: ShardRows,
    sources: dict[int, bytes],
) -> None:
    """The serial path's rows of one explained batch, each statistic read back on its own."""
    rows.items.extend(prediction_rows(work, batch, result))
    layout = map_layout(batch, result)
    if not layout.item_ids:  # e.g. no class of any image passed an 'above:T' threshold
        return
    map_sources = [sources.get(item_id) for item_id in layout.item_ids]
    pre = work.preprocess
    for method in work.methods:
        for layer in result.layers:
            stats = map_statistics(
                valid_maps(result.layer_maps[method][layer], result.valid),
                valid_maps(result.raw[method][layer], result.valid),
                pre.size,
                work.patch_size,
                work.top_patches,
                layout.transforms,
            )
            keys, shas = _submit_encoding(work, method, layer, layout, stats, map_sources, writer, encoder)
            heatmaps = heatmap_rows(work.run_id, method, layer, layout, stats, keys)
            rows.heatmaps.extend(heatmaps)
            rows.encoded.append((heatmaps, shas))
            rows.patches.extend(patch_rows(work.run_id, method, layer, layout, stats))


def _explain_or_split(
    work: ShardWork,
    engine: CamEngine,
    batch: list[tuple[WorkItem, DecodedPixels]],
    targets: Any,
    device: torch.device,
    *,
    pinned: bool = False,
) -> CamResult | None:
    """The engine's result for the batch, or None when the device ran out of memory on more than
    one image: the attempt's tensors are then dropped and the cached blocks handed back, and the
    caller explains :func:`_halves` of the batch one after the other. Out of memory on a single
    image, and every other error, propagates.

    ``pinned``: on CUDA the stacked pixels go through pinned memory, so the copy to the device is
    truly asynchronous (the overlapped path, which must not wait on it).
    """
    with host_threads(device):
        pixels = stack_pixels([img for _, img in batch])
        if pinned and device.type == "cuda" and pixels.device.type == "cpu":  # not when decoded on the device
            pixels = pixels.pin_memory()
        pixels = pixels.to(device, non_blocking=True)
    try:
        return engine(_normalised(work, pixels), targets=targets)
    except Exception as exc:
        if not is_out_of_memory(exc) or len(batch) == 1:
            raise
    # past the handler, whose traceback held the batch's tensors
    half = len(batch) // 2
    log.warning(
        "run=%s shard=%d: out of device memory on a batch of %d; retrying as %d + %d",
        work.run_id,
        work.shard_index,
        len(batch),
        half,
        len(batch) - half,
    )
    del pixels, targets
    release_cached_memory(device)
    return None


def _normalised(work: ShardWork, pixels: torch.Tensor) -> torch.Tensor:
    pre = work.preprocess
    with host_threads(pixels.device):
        return normalise_batch(pixels, tuple(pre.mean), tuple(pre.std))


def _halves(
    batch: list[tuple[WorkItem, DecodedPixels]],
) -> tuple[list[tuple[WorkItem, DecodedPixels]], list[tuple[WorkItem, DecodedPixels]]]:
    half = len(batch) // 2
    return batch[:half], batch[half:]


def release_cached_memory(device: torch.device) -> None:
    """Hand the failed attempt's cached blocks back before a smaller retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Launched:
    """A batch whose engine call has been issued and whose results are on their way to the host.

    On a CPU device ``packed`` is None and ``result`` the engine's result: the row builder checks
    and packs it there, beside the main thread's staging of the next batch.
    """

    batch: list[tuple[WorkItem, DecodedPixels]]
    packed: PackedBatch | None
    sources: dict[int, bytes]
    result: CamResult | None = None


def _launch(
    work: ShardWork,
    loaded: LoadedModel,
    engine: CamEngine,
    batch: list[tuple[WorkItem, DecodedPixels]],
    sources: dict[int, bytes],
    failed: list[dict[str, Any]],
) -> list[_Launched]:
    """Stage the batch, run the engine and start the copies back; on the device nothing waits.

    On CUDA the stacked pixels go through pinned memory, so the copy to the device is truly
    asynchronous. Out of device memory splits the batch in halves, as in the serial path.
    """
    device = next(loaded.model.parameters()).device
    rows = ShardRows()
    targets, batch = _batch_targets(work, batch, rows)
    failed.extend(rows.items)
    if not batch:
        return []
    result = _explain_or_split(work, engine, batch, targets, device, pinned=True)
    if result is None:
        del targets
        return [
            launched
            for part in _halves(batch)
            for launched in _launch(work, loaded, engine, part, sources, failed)
        ]
    if device.type == "cpu":
        # Nothing to overlap with the device there: checking and packing the result are host work
        # like the rows', so they go to the row builder instead of lengthening the main thread's.
        return [_Launched(batch, None, sources, result)]
    checked = _checked_and_packed(work, batch, result, failed)
    return [] if checked is None else [_Launched(*checked, sources)]


def _checked_and_packed(
    work: ShardWork, batch: Batch, result: CamResult, failed: list[dict[str, Any]]
) -> tuple[Batch, PackedBatch] | None:
    """The batch without the images whose output is not finite, and its statistics packed for
    one copy back; None when no image is left."""
    batch, result = _drop_non_finite(work, batch, result, failed)
    if not batch:
        return None
    pre = work.preprocess
    return batch, pack(
        result, work.methods, pre.size, work.patch_size, work.top_patches, work.top_k_predictions
    )


@dataclass
class _BuiltRows:
    """A batch's rows that depend on nothing before it: built on a row thread, applied in order."""

    failed: list[dict[str, Any]]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    layout: MapLayout | None = None
    map_sources: list[bytes | None] = field(default_factory=list)
    # (method, layer, statistics, localisation columns, patch rows) of each map block
    blocks: list[tuple[str, str, MapStatistics, list[dict[str, Any]], list[Any]]] = field(
        default_factory=list
    )


def _build_rows(work: ShardWork, loaded: LoadedModel, launched: _Launched) -> _BuiltRows:
    """Wait for a batch's host copies, then compute everything its rows need but their keys."""
    batch, packed = launched.batch, launched.packed
    failed: list[dict[str, Any]] = []
    if packed is None:
        assert launched.result is not None
        with host_threads(next(loaded.model.parameters()).device):
            checked = _checked_and_packed(work, batch, launched.result, failed)
        if checked is None:
            return _BuiltRows(failed)
        batch, packed = checked
    transforms = map_transforms(batch, packed.targets)
    host = unpack(packed, work.patch_size, work.preprocess.size, transforms)
    layout = layout_of(batch, host.targets, host.scores)
    return _BuiltRows(
        failed,
        prediction_rows_of(work, batch, host.top_p, host.top_c, single_logit=host.single_logit),
        layout,
        [launched.sources.get(item_id) for item_id in layout.item_ids],
        [
            (
                method,
                layer,
                stats,
                localisation_columns(stats.maps_u8, stats.raw16, layout.boxes, layout.transforms),
                patch_rows(work.run_id, method, layer, layout, stats),
            )
            for (method, layer), stats in host.statistics.items()
        ],
    )


def _apply_rows(
    work: ShardWork, writer: MapWriter, encoder: ThreadPoolExecutor, rows: ShardRows, built: _BuiltRows
) -> None:
    """Add a built batch to the shard's rows and hand its maps to the encoders: in batch order,
    since keys (and in the packed layout, byte ranges) follow the order maps are written in."""
    rows.items.extend(built.failed)
    rows.items.extend(built.predictions)
    for method, layer, stats, located, patches in built.blocks:
        assert built.layout is not None
        keys, shas = _submit_encoding(
            work, method, layer, built.layout, stats, built.map_sources, writer, encoder
        )
        heatmaps = heatmap_rows(work.run_id, method, layer, built.layout, stats, keys, located)
        rows.heatmaps.extend(heatmaps)
        rows.encoded.append((heatmaps, shas))
        rows.patches.extend(patches)


class _RowBuilder:
    """Builds batches' rows on ``workers`` threads and applies them on the calling thread, in
    submission order: the serial path's order, whichever batch is built first.

    At most ``depth`` entries wait (default: one more than the threads), which bounds the
    results held on the host; an entry is a batch's build or the in-order append of the rows of
    items that failed before it, so with one thread a batch's build is waited for when the next
    batch's is submitted.
    """

    def __init__(self, workers: int = 1, depth: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rows")
        self._pending: collections.deque[tuple[Future[Any] | None, Callable[[Any], None]]] = (
            collections.deque()
        )
        self._depth = depth if depth is not None else workers + 1

    def submit(self, build: Callable[[], Any] | None, apply: Callable[[Any], None]) -> None:
        """``apply(build())``, with ``build`` on a row thread (None: ``apply(None)``, in its turn)."""
        self._pending.append((None if build is None else self._pool.submit(build), apply))
        while len(self._pending) > self._depth:
            self._apply_oldest()

    def _apply_oldest(self) -> None:
        future, apply = self._pending.popleft()
        apply(None if future is None else future.result())

    def drain(self) -> None:
        while self._pending:
            self._apply_oldest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


Batch = list[tuple[WorkItem, DecodedPixels]]


def _batches(
    work: ShardWork,
    stream: Iterator[tuple[WorkItem, Decoded | str]],
    failed: Callable[[dict[str, Any]], None],
    check: Callable[[], None],
) -> Iterator[tuple[Batch, dict[int, bytes]]]:
    """Group decoded items into batches; items that cannot be explained go to ``failed``.

    ``check`` runs before each batch is handed on: it raises when the shard's lease is lost.
    """
    batch: Batch = []
    sources: dict[int, bytes] = {}
    for item, opened in stream:
        if isinstance(opened, str):
            log.warning("run=%s shard=%d item=%d failed: %s", work.run_id, work.shard_index, item.id, opened)
            failed(failed_item_row(item, opened))
            continue
        decoded, source = opened
        too_wide = _overlay_refusal(decoded) if work.overlay else None
        if too_wide is not None:
            failed(failed_item_row(item, too_wide))
            continue
        batch.append((item, decoded))
        if source is not None:
            sources[item.id] = source
        if len(batch) == work.batch_size:
            check()
            yield batch, sources
            batch, sources = [], {}
    if batch:
        check()
        yield batch, sources


def _compute_overlapped(
    work: ShardWork,
    loaded: LoadedModel,
    engine: CamEngine,
    batches: Callable[[Callable[[dict[str, Any]], None]], Iterator[tuple[Batch, dict[int, bytes]]]],
    writer: MapWriter,
    encoder: ThreadPoolExecutor,
    rows: ShardRows,
    row_workers: int = 1,
) -> None:
    """Batch N's rows are built on ``row_workers`` threads while batch N+1 is decoded, staged
    and computed.

    Every change to ``rows`` happens on this thread, in the serial path's order.
    """
    builder = _RowBuilder(row_workers)
    apply = functools.partial(_apply_rows, work, writer, encoder, rows)
    try:
        for batch, sources in batches(lambda row: builder.submit(None, lambda _: rows.items.append(row))):
            failed: list[dict[str, Any]] = []
            launched = _launch(work, loaded, engine, batch, sources, failed)
            builder.submit(None, lambda _, failed=failed: rows.items.extend(failed))
            for each in launched:
                builder.submit(functools.partial(_build_rows, work, loaded, each), apply)
        builder.drain()
    finally:
        builder.close()


def _compute_serial(
    work: ShardWork,
    loaded: LoadedModel,
    engine: CamEngine,
    batches: Callable[[Callable[[dict[str, Any]], None]], Iterator[tuple[Batch, dict[int, bytes]]]],
    writer: MapWriter,
    encoder: ThreadPoolExecutor,
    rows: ShardRows,
) -> None:
    for batch, sources in batches(rows.items.append):
        _explain_batch(work, loaded, engine, batch, writer, encoder, rows, sources)


def _packs_results(work: ShardWork) -> bool:
    """Whether the overlapped path's one packed copy-back covers the run's targets.

    It holds softmax predictions (a single logit's sigmoid) and the same number of maps for every
    image; sigmoid targets (``positive``, ``labels``, ``above:T``) and ``python:`` scores take the
    serial path.
    """
    spec = work.target_spec
    return spec in ("top1", "all", "label") or spec.startswith(("topk:", "classes:"))


def compute_shard(
    work: ShardWork,
    settings: Settings,
    check: Callable[[], None] | None = None,
    *,
    overlap: bool = True,
) -> ShardRows:
    """Explain a shard's items; every object is durable when this returns.

    ``check`` runs before each batch and before the final flush; it raises to stop the shard
    (its lease is lost), so a worker that no longer holds the shard stops spending the device
    on it. ``overlap=False`` runs one batch at a time, reading every statistic back on its own:
    the plain reference the overlapped pipeline is tested against.
    """
    with shard_results(work, settings, check, overlap=overlap) as (rows, durable):
        durable()
        return rows


@contextlib.contextmanager
def shard_results(
    work: ShardWork,
    settings: Settings,
    check: Callable[[], None] | None = None,
    *,
    overlap: bool = True,
) -> Iterator[tuple[ShardRows, Callable[[], object]]]:
    """:func:`compute_shard`, handing the rows over while the last uploads and the storage's
    sync still run: ``durable()`` waits for them (and raises what failed).

    The commit writes its rows meanwhile and calls ``durable()`` before it takes the run's lock
    and marks the shard done (:func:`commit_shard`), so no row is committed before its objects
    are on disk or in the bucket; a packed shard's tars, uploaded at its end, no longer wait
    in line before the commit.
    """
    check = check or (lambda: None)
    work.preprocess  # noqa: B018  (parsed up front: a record that cannot work fails the shard)
    loaded = model_for(work.model_ref, work.checkpoint, settings, expected_sha256=work.checkpoint_sha256)
    device = next(loaded.model.parameters()).device
    apply_torch_threads(device, settings)
    if work.batch_size is None:
        work = dataclasses.replace(work, batch_size=defaults_for(device.type).batch_size)
    engine = engine_for(loaded, work.methods, work.layers, settings, work.score_batch_size)
    storage = storage_for(work.output_uri, settings)
    remote_sources = any(item.source_uri.startswith("s3://") for item in work.items[:1])
    sizes = pool_sizes(settings, remote_storage=isinstance(storage, S3Storage), remote_sources=remote_sources)
    rows = ShardRows(provenance=shard_provenance(device, amp_argument(settings.amp)))
    with (
        ConcurrentWriter(storage, max_workers=sizes.upload) as uploads,
        ThreadPoolExecutor(max_workers=sizes.encode, thread_name_prefix="encode") as encoder,
    ):
        writer = map_writer(work.layout, uploads, work.run_id, work.shard_index)
        if work.views:
            work = replace(work, items=order_cases(work.items))
            for cases, failed in case_batches(work, _decoded_stream(work, settings, sizes)):
                rows.items.extend(failed)
                if cases:
                    check()
                    _explain_batch(work, loaded, engine, cases, writer, encoder, rows, {})
        else:
            choice = _decode_choice(work, settings, device, sizes)
            counts: collections.Counter[str] = collections.Counter()
            stream = _decoded_stream(work, settings, sizes, on_device=choice.on_device)
            if choice.on_device:
                stream = _device_decoded(work, settings, device, stream, counts)

            def batches(
                failed: Callable[[dict[str, Any]], None],
            ) -> Iterator[tuple[Batch, dict[int, bytes]]]:
                return _batches(work, stream, failed, check)

            if overlap and _packs_results(work):
                _compute_overlapped(work, loaded, engine, batches, writer, encoder, rows, sizes.rows)
            else:
                _compute_serial(work, loaded, engine, batches, writer, encoder, rows)
            if counts:
                log.info(
                    "run=%s shard=%d: JPEGs decoded on %s: %d, on the CPU after the device refused them: %d",
                    work.run_id,
                    work.shard_index,
                    device,
                    counts["device"],
                    counts["cpu fallback"],
                )
        for heatmap_rows, shas in rows.encoded:
            for row, sha in zip(heatmap_rows, shas.result(), strict=True):
                row["sha256"] = sha
        writer.finish(rows.heatmaps)
        check()
        flushed = encoder.submit(uploads.flush)  # the encoder threads are idle by now
        yield rows, flushed.result
        flushed.result()


def _refresh_run(session: Session, run: Run) -> str | None:
    """Recount the locked run from all its shards and end it if complete: for the rare paths.

    Shard commits and failures add their own shard's change instead (workers/run_counters.py):
    a recount reads every shard of the run, which under the run row's lock capped one run's
    commits at one aggregate over ~40,000 shards at a time.
    """
    return run_counters.recount(session, run)


def _lock_run(session: Session, run_id: str) -> Run:
    return session.execute(lock_run_row(run_id)).scalar_one()


def _check_holder(run: Run, shard: Shard, work: ShardWork) -> None:
    """The fence: only the latest attempt may write, and nothing may write to a run being deleted.

    The shard may be ``pending`` again under the same attempt (its lease ran out and it was
    enqueued again, but no one claimed it yet): this attempt is still the latest, so its
    complete work is kept and the new delivery finds the shard done.
    """
    if run.status == RunStatus.DELETING:
        raise LeaseLost(f"run {run.id} is being deleted")
    if shard.attempts != work.attempt or shard.status not in (ShardStatus.RUNNING, ShardStatus.PENDING):
        raise LeaseLost(
            f"attempt {work.attempt} was overtaken: the shard is {shard.status} under attempt "
            f"{shard.attempts} ({shard.worker})"
        )


def commit_shard(
    database_url: str, work: ShardWork, rows: ShardRows, durable: Callable[[], object] | None = None
) -> ShardOutcome:
    """Write the shard's rows and mark it done in one transaction, if this attempt still holds it.

    ``durable`` (from :func:`shard_results`) waits until the shard's objects are stored; it is
    called after the rows are written, which locks only this shard's own rows, and before the
    run's row is locked, so other shards' commits never wait on this one's uploads. When it
    raises, nothing is committed. Raises :class:`LeaseLost` (and writes nothing) when another
    attempt took the shard or its run is being deleted.
    """
    with session_scope(database_url) as session:
        results.update_items(session, rows.items, run_id=work.run_id)
        ids = results.upsert_heatmaps(session, rows.heatmaps)
        results.delete_stale_patch_scores(session, list(ids.values()), work.top_patches, run_id=work.run_id)
        results.upsert_patch_scores(session, [{"heatmap_id": ids[key], **row} for key, row in rows.patches])
        if durable is not None:
            durable()
        run = _lock_run(session, work.run_id)
        shard = _lock_shard(session, work.shard_id)
        assert shard is not None
        _check_holder(run, shard, work)
        before = run_counters.counts_of(shard)
        shard.status = ShardStatus.DONE
        shard.error = None
        shard.finished_at = utcnow()
        shard.lease_expires_at = None
        shard.n_done, shard.n_failed = rows.n_done, rows.n_failed
        for column, value in rows.provenance.items():
            setattr(shard, column, value)
        run_status = run_counters.add_change(session, work.run_id, before, run_counters.counts_of(shard))
    return ShardOutcome(work.run_id, work.shard_index, "done", rows.n_done, rows.n_failed, run_status)


def fail_shard(database_url: str, run_id: str, shard_id: int, error: str) -> ShardOutcome:
    """A shard that has used its retries ends failed, so its run can end ``partial`` instead of hanging.

    A shard another worker is running under a live lease is left to that worker.
    """
    with session_scope(database_url) as session:
        run = _lock_run(session, run_id)
        shard = _lock_shard(session, shard_id)
        if shard is None or shard.run_id != run_id:
            return ShardOutcome(run_id, -1, "failed")  # nothing of this run to mark
        run_status = None
        index = shard.index
        now = db_now(session)
        if (
            shard.status == ShardStatus.RUNNING
            and shard.lease_expires_at is not None
            and aware(shard.lease_expires_at) > now
        ):
            return ShardOutcome(
                run_id, index, "skipped", reason=f"attempt {shard.attempts} runs it on {shard.worker}"
            )
        if shard.status not in (ShardStatus.DONE, ShardStatus.FAILED):
            before = run_counters.counts_of(shard)
            shard.status = ShardStatus.FAILED
            shard.error = error[:4000]
            shard.finished_at = now
            shard.lease_expires_at = None
            run_status = run_counters.add_change(session, run.id, before, run_counters.counts_of(shard))
    return ShardOutcome(run_id, index, "failed", run_status=run_status)


def _best_effort(database_url: str, what: str, change: Callable[[Session], None]) -> None:
    """Lease bookkeeping after an attempt stopped: if the database is away, the lease runs out anyway."""
    try:
        with session_scope(database_url) as session:
            change(session)
    except Exception as exc:
        log.warning("could not %s (%s); the lease runs out by itself", what, short_error(exc))


def explain_shard(
    run_id: str,
    shard_id: int,
    settings: Settings | None = None,
    *,
    worker: str | None = None,
    retry_in_s: float = 0.0,
) -> ShardOutcome:
    """Claim, compute under a renewed lease, commit; ``retry_in_s``: when a failed attempt's retry runs."""
    settings = settings or get_settings()
    claiming = time.monotonic()
    claimed = claim_shard(
        settings.database_url, run_id, shard_id, settings, worker=worker, extra_roots=settings.source_roots
    )
    if isinstance(claimed, ShardOutcome):
        log.info("run=%s shard_id=%d %s: %s", run_id, shard_id, claimed.status, claimed.reason)
        return claimed
    work = claimed
    where = f"run={run_id} shard={work.shard_index} attempt={work.attempt}"
    log.info("%s: %d items", where, len(work.items))
    started = time.perf_counter()
    heartbeat = Heartbeat(
        sessionmaker(get_engine(settings.database_url)),
        shard_id,
        work.attempt,
        lease_s=settings.lease_s,
        interval_s=settings.heartbeat_interval_s,
        name=where,
        claimed_at=claiming,
    )
    try:
        with heartbeat, shard_results(work, settings, heartbeat.check) as (rows, durable):
            outcome = commit_shard(settings.database_url, work, rows, durable)
    except LeaseLost as exc:
        # Logged and dropped, never retried: the shard's current holder (or gc) owns it now.
        log.warning("%s discarded, nothing of it kept: %s", where, exc)
        _best_effort(
            settings.database_url,
            "give the lease up",
            lambda session: expire_lease(session, shard_id, work.attempt),
        )
        return ShardOutcome(run_id, work.shard_index, "fenced", reason=str(exc))
    except BaseException:
        due_in_s = retry_in_s + settings.lease_s
        _best_effort(
            settings.database_url,
            "hand the shard back for its retry",
            lambda session: hand_back_for_retry(session, shard_id, work.attempt, due_in_s),
        )
        raise
    metrics.record_shard(outcome.n_done, outcome.n_failed, time.perf_counter() - started)
    log.info(
        "%s done: %d items ok, %d failed%s",
        where,
        outcome.n_done,
        outcome.n_failed,
        f"; run {outcome.run_status}" if outcome.run_status else "",
    )
    return outcome
