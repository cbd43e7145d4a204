"""The host pipeline alone: ``bench/pipeline.py --engine null``.

The CAM engine is replaced by a stand-in that returns maps, raw maps, logits and scores of the
right shapes at no cost, so what is left is what the host does per image: fetching, decoding,
batching, per-map statistics, rows, PNG/npy encoding, uploads and the commits. It prints
images/s and host milliseconds per image by stage for JPEG and PNG sources of ImageNet-like
sizes (375-500 px a side), next to the rate at which one thread decodes the same files, for
three set-ups: sources in a folder and results to a folder; sources in a folder and results to
moto S3 behind a proxy adding ``--rtt-ms`` of round trip; and sources read from that bucket too.
The moto server and the proxy run as processes of their own (as a real endpoint costs the
worker no CPU); their CPU per image is printed beside, since on this machine they share its
cores. Batch and shard sizes default to a GPU worker's (``workers/device_defaults.py``): on a
GPU worker the engine's time overlaps all of this, so ``images/s`` here is the most a worker
can feed the device.

    python bench/pipeline.py --engine null                 # folder and S3, JPEG and PNG
    python bench/pipeline.py --engine null --formats jpeg --no-s3 --n 512 --shard-size 512
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scheduler.plan import plan_run
from schema.payloads import RunSpec
from schema.settings import Settings
from tests.plugins.s3 import DUMMY_AWS_ENV, MotoServer, TcpProxy
from workers import runtime, shard, storage
from workers.cam import CamResult
from workers.device_defaults import CUDA
from workers.images import decode_pixels
from workers.models import load_model_cached
from workers.synth import render_sample, sample_rng

BUCKET = "camaudit-null"
FEATURES = (7, 7)  # resnet50's layer4 at 224 px
CLASSES = 1000
FLOOR_DECODE = 0.6  # of twice the single-thread decode rate (both cores decoding)
FLOOR_S3 = 0.8  # of the rate to a folder
# Stages that run on the engine's device: on a CPU worker they cost host time, on a GPU they do not.
DEVICE_SIDE = ("batch", "engine", "statistics")

# Stages of workers/shard.py timed by wrapping the functions it calls (those it has).
STAGES = {
    "fetch": ("read_source",),
    "decode": ("decode_pixels", "prepare_jpeg"),  # prepare_jpeg: a JPEG's header, for the device path
    "batch": ("stack_pixels", "normalise_batch", "decode_on_device"),
    "engine": (),
    "statistics": ("map_statistics", "map_layout", "pack", "unpack"),
    "rows": (
        "prediction_rows",
        "prediction_rows_of",
        "layout_of",
        "heatmap_rows",
        "patch_rows",
        "localisation_columns",
    ),
    "encode": ("encode_png_gray", "encode_npy"),
    "claim+commit": ("claim_shard", "commit_shard"),
}


# Every stage a run reports: the shard's own, then the storage's.
REPORTED_STAGES = (*STAGES, "upload", "flush")


def stage_summary(cpu: dict[str, float], n: int, wall: dict[str, float] | None = None) -> str:
    """``stage ms`` (or ``stage cpu/wall ms``) per image for every stage that ran, in order."""

    def one(stage: str) -> str:
        ms = f"{1000 * cpu[stage] / n:.2f}"
        return f"{stage} {ms}" if wall is None else f"{stage} {ms}/{1000 * wall[stage] / n:.2f}"

    return ", ".join(one(stage) for stage in REPORTED_STAGES if stage in cpu)


class StageClock:
    """CPU seconds (of the calling thread) and wall seconds spent in each stage, summed over threads."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.cpu[stage] += time.thread_time() - cpu
                    self.wall[stage] += time.perf_counter() - wall

        return timed

    def reset(self) -> None:
        self.cpu.clear()
        self.wall.clear()


class NullEngine:
    """Maps of the right shapes at no cost: one smooth map, shared by every image and method."""

    def __init__(self, methods: list[str], layers: list[str], size: tuple[int, int]) -> None:
        self.methods, self.layers = methods, layers
        generator = torch.Generator().manual_seed(0)
        raw = torch.rand(1, 1, *FEATURES, generator=generator)
        up = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        self._raw = raw
        self._map = (up - up.min()) / (up.max() - up.min())
        self._logits = torch.linspace(0, 1, CLASSES)[None]

    def __call__(self, images: torch.Tensor, targets: Any = None) -> CamResult:
        if self._map.device != images.device:  # on a GPU worker the maps are the device's
            self._raw, self._map = self._raw.to(images.device), self._map.to(images.device)
            self._logits = self._logits.to(images.device)
        batch = images.shape[0]
        if isinstance(targets, torch.Tensor):
            classes = targets.reshape(batch, -1)
        else:
            k = int(targets.split(":")[1]) if isinstance(targets, str) and targets.startswith("topk:") else 1
            classes = torch.arange(CLASSES - k, CLASSES, device=images.device).flip(0).expand(batch, k)
        k = classes.shape[1]
        maps = self._map.expand(batch, k, *self._map.shape[-2:])
        raw = self._raw.expand(batch, k, *FEATURES)
        per_layer = {layer: maps for layer in self.layers}
        return CamResult(
            maps={m: maps for m in self.methods},
            layer_maps={m: dict(per_layer) for m in self.methods},
            raw={m: {layer: raw for layer in self.layers} for m in self.methods},
            unrectified={m: {layer: raw for layer in self.layers} for m in self.methods},
            targets=classes,
            scores=torch.ones(batch, k, device=images.device),
            valid=torch.ones(batch, k, dtype=torch.bool, device=images.device),
            logits=self._logits.expand(batch, CLASSES),
            layers=list(self.layers),
        )


@contextlib.contextmanager
def instrumented(clock: StageClock, size: tuple[int, int], stand_in: bool = True) -> Iterator[None]:
    """Time the shard's stages into ``clock``; with ``stand_in`` the engine is a :class:`NullEngine`."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    for stage, names in STAGES.items():
        for name in names:
            if hasattr(shard, name):
                patch(shard, name, clock.wrap(stage, getattr(shard, name)))
    for cls in (storage.LocalStorage, storage.S3Storage):
        patch(cls, "put", clock.wrap("upload", cls.put))
    patch(storage.ConcurrentWriter, "flush", clock.wrap("flush", storage.ConcurrentWriter.flush))

    engines: dict[tuple[str, ...], Any] = {}

    def engine_for(loaded: Any, methods: list[str], layers: list[str], *args: Any, **kwargs: Any) -> Any:
        key = (*methods, "|", *layers)
        if key not in engines:
            engines[key] = clock.wrap("engine", NullEngine(methods, layers, size))
            # What the worker's engine_for does besides building an engine, once per engine.
            runtime.keep_freed_memory()
            runtime.settle_heap()
        return engines[key]

    real_engine_for = shard.engine_for

    def timed_engine_for(*args: Any, **kwargs: Any) -> Any:
        engine = real_engine_for(*args, **kwargs)
        return clock.wrap("engine", engine)

    patch(shard, "engine_for", engine_for if stand_in else timed_engine_for)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def make_sources(folder: Path, n: int, fmt: str, seed: int) -> list[Path]:
    """``n`` synthetic photos-like images of 375-500 px a side (ImageNet's typical sizes).

    Each image has a generator of its own, so writing them on every core gives the same files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda index: _make_source(folder, index, fmt, seed), range(n)))


def _make_source(folder: Path, index: int, fmt: str, seed: int) -> Path:
    rng = sample_rng(seed, index)
    sample = render_sample(rng, min_size=375, max_size=500)
    image = Image.fromarray(sample.image, mode="RGB")
    width, height = int(rng.integers(375, 501)), int(rng.integers(375, 501))
    image = image.resize((width, height))
    path = folder / f"{index:06d}.{'jpg' if fmt == 'jpeg' else 'png'}"
    if fmt == "jpeg":
        image.save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="PNG", optimize=False)
    return path


def single_thread_decode_rate(paths: list[Path], size: tuple[int, int]) -> float:
    data = [p.read_bytes() for p in paths]
    decode_pixels(data[0], size)
    start = time.perf_counter()
    for blob in data:
        decode_pixels(blob, size)
    return len(data) / (time.perf_counter() - start)


def explain_all(spec: RunSpec, settings: Settings) -> float:
    planned = plan_run(spec, settings)
    start = time.perf_counter()
    for shard_id in planned.shard_ids:
        outcome = shard.explain_shard(planned.run_id, shard_id, settings)
        if outcome.status != "done" or outcome.n_failed:
            raise RuntimeError(f"shard {shard_id} ended {outcome}")
    return time.perf_counter() - start


def _serve_proxy(host: str, port: int, delay: float, pipe: Any) -> None:
    """A child process: the delaying proxy, until the parent says stop (or goes away)."""
    with TcpProxy(host, port, one_way_delay_s=delay) as proxy:
        pipe.send(proxy.port)
        with contextlib.suppress(EOFError):
            pipe.recv()


@contextlib.contextmanager
def s3_endpoint(rtt_ms: float) -> Iterator[tuple[str, list[int]]]:
    """The proxy's URL and the process ids of the server side (moto, the proxy)."""
    os.environ.update(DUMMY_AWS_ENV)
    with MotoServer() as server:
        upstream = urlsplit(server.url)
        context = multiprocessing.get_context("spawn")  # no copy of this process's torch state
        ours, theirs = context.Pipe()
        proxy = context.Process(
            target=_serve_proxy,
            args=(upstream.hostname or "127.0.0.1", upstream.port or 80, rtt_ms / 2000.0, theirs),
            daemon=True,
        )
        proxy.start()
        try:
            if not ours.poll(60):
                raise RuntimeError("the S3 proxy process did not start within 60 s")
            port = ours.recv()
            boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            assert server.pid is not None and proxy.pid is not None
            yield f"http://127.0.0.1:{port}", [server.pid, proxy.pid]
        finally:
            ours.send("stop")
            proxy.join(timeout=30)


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def upload_sources(endpoint: str, paths: list[Path], prefix: str) -> str:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in paths:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}/"


SETUPS = (("folder", "folder"), ("folder", "s3"), ("s3", "s3"))  # (sources, results)


def run(args: argparse.Namespace) -> int:
    load_start = os.getloadavg()
    results = measure(args)
    report(args, results, load_start, os.getloadavg())
    return 0 if check(results) or not args.check else 1


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per format and set-up: images/s (best of ``args.rounds``) and CPU/wall by stage."""
    model = "demo"
    size = (args.size, args.size)
    load_model_cached(model, None, device="cpu", input_size=size)
    load_model_cached(model, None, device=args.device, input_size=size)
    clock = StageClock()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="camaudit-null-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        endpoint, servers = stack.enter_context(s3_endpoint(args.rtt_ms)) if args.s3 else (None, [])
        for fmt in args.formats:
            paths = make_sources(tmp / f"src-{fmt}", args.n, fmt, args.seed)
            decode_rate = single_thread_decode_rate(paths, size)
            bucket_sources = upload_sources(endpoint, paths, f"src-{fmt}") if endpoint else None
            for source_at, results_at in SETUPS:
                if endpoint is None and "s3" in (source_at, results_at):
                    continue
                where = f"{fmt}-{source_at}-{results_at}"
                settings = Settings(
                    database_url=f"sqlite:///{tmp / f'{where}.db'}",
                    storage_url=f"s3://{BUCKET}/out-{where}"
                    if results_at == "s3"
                    else str(tmp / f"out-{where}"),
                    s3_endpoint_url=endpoint,
                    s3_region="us-east-1" if endpoint else None,
                    device=args.device,
                    amp="off",
                )
                spec = RunSpec(
                    source=bucket_sources if source_at == "s3" else str(tmp / f"src-{fmt}"),
                    model=model,
                    methods=args.methods,
                    batch_size=args.batch,
                    shard_size=args.shard_size,
                )
                best: tuple[float, dict[str, float], dict[str, float], float] | None = None
                with instrumented(clock, size):
                    explain_all(spec.model_copy(update={"shard_size": args.batch}), settings)  # warm-up
                    for _ in range(args.rounds):
                        clock.reset()
                        server_cpu = process_cpu(servers)
                        seconds = explain_all(spec, settings)
                        server_cpu = process_cpu(servers) - server_cpu
                        if best is None or seconds < best[0]:
                            best = (seconds, dict(clock.cpu), dict(clock.wall), server_cpu)
                assert best is not None
                results.append(
                    {
                        "format": fmt,
                        "source": source_at,
                        "where": results_at,
                        "rate": args.n / best[0],
                        "decode_rate": decode_rate,
                        "cpu": best[1],
                        "wall": best[2],
                        "server_cpu": best[3],
                    }
                )
                print(
                    f"  measured {fmt} {source_at} -> {results_at}: {args.n / best[0]:.1f} images/s",
                    flush=True,
                )
    return results


def host_seconds_per_image(row: dict[str, Any], n: int) -> float:
    """Host CPU seconds per image, leaving out the stages a GPU worker's device does."""
    return sum(v for stage, v in row["cpu"].items() if stage not in DEVICE_SIDE) / n


def _folder_to_folder(row: dict[str, Any]) -> bool:
    return (row["source"], row["where"]) == ("folder", "folder")


def folder_rates(results: list[dict[str, Any]]) -> dict[str, float]:
    """Images/s of each format from folder to folder: what the other set-ups are compared with."""
    return {row["format"]: row["rate"] for row in results if _folder_to_folder(row)}


def check(results: list[dict[str, Any]], quiet: bool = False) -> bool:
    """The floors: folder to folder >= 0.6 x twice the 1-thread decode rate; to S3 >= 0.8 x to a folder.

    "To S3" is the same folder sources with results written to the bucket. Sources read from
    the bucket are reported beside, with no floor: on this machine the moto server answering
    every GET is a Python process on the worker's own two cores.
    """
    missed = []
    folder = folder_rates(results)
    for row in results:
        floor = FLOOR_DECODE * 2 * row["decode_rate"]
        if _folder_to_folder(row) and row["rate"] < floor:
            missed.append(f"{row['format']} folder {row['rate']:.1f} < {floor:.1f} images/s")
        if (row["source"], row["where"]) == ("folder", "s3") and row["rate"] < FLOOR_S3 * folder[
            row["format"]
        ]:
            missed.append(f"{row['format']} to S3 {row['rate']:.1f} < {FLOOR_S3} x folder")
    if not quiet:
        for line in missed:
            print(f"FLOOR MISSED: {line}")
    return not missed


def report(args: argparse.Namespace, results: list[dict[str, Any]], before: tuple, after: tuple) -> None:
    cores = os.cpu_count()
    print(
        f"\nnull engine | {args.n} images of 375-500 px -> {args.size} px, batch {args.batch}, "
        f"shards of {args.shard_size}, methods {','.join(args.methods)} | {cores} cores | "
        f"load average {before[0]:.1f} -> {after[0]:.1f} (1 min)"
    )
    folder = folder_rates(results)
    header = (
        f"{'format':6} {'from':6} {'to':6} {'img/s':>7} {'1-thr dec':>9} {'/2xdec':>6} {'/folder':>7} "
        + " ".join(f"{s[:10]:>10}" for s in REPORTED_STAGES)
        + f" {'servers':>8}"
    )
    print("host CPU ms per image by stage (thread CPU time, summed over threads); servers: moto + proxy")
    print(header)
    print("-" * len(header))
    for row in results:
        per = [1000.0 * row["cpu"].get(s, 0.0) / args.n for s in REPORTED_STAGES]
        print(
            f"{row['format']:6} {row['source']:6} {row['where']:6} {row['rate']:7.1f} "
            f"{row['decode_rate']:9.1f} {row['rate'] / (2 * row['decode_rate']):6.2f} "
            f"{row['rate'] / folder[row['format']]:7.2f} "
            + " ".join(f"{v:10.2f}" for v in per)
            + f" {1000.0 * row['server_cpu'] / args.n:8.2f}"
        )
    print("wall ms per image by stage (summed over threads: waiting included)")
    for row in results:
        per = [1000.0 * row["wall"].get(s, 0.0) / args.n for s in REPORTED_STAGES]
        print(
            f"{row['format']:6} {row['source']:6} {row['where']:6} {'':7} {'':9} {'':6} {'':7} "
            + " ".join(f"{v:10.2f}" for v in per)
        )
    host = [host_seconds_per_image(row, args.n) for row in results if _folder_to_folder(row)]
    if host:
        worst = max(host)
        print(
            f"host CPU per image without {', '.join(DEVICE_SIDE)} (on a GPU worker the device does "
            f"those): up to {1000 * worst:.2f} ms, so one GPU at 2,000 images/s needs about "
            f"{2000 * worst:.1f} cores for its host work"
        )
    verdict = "met" if check(results, quiet=True) else "MISSED"
    print(
        f"floors: folder >= {FLOOR_DECODE} x twice the single-thread decode rate; folder sources to S3 >= "
        f"{FLOOR_S3} x to a folder: {verdict} (sources on S3: no floor, see the module's check)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--engine null")
    group.add_argument("--formats", default="jpeg,png", help="source formats (jpeg, png)")
    group.add_argument("--no-s3", dest="null_s3", action="store_false", help="folder only")
    parser.set_defaults(null_s3=True)


def main(args: argparse.Namespace) -> int:
    args.formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.formats) - {"jpeg", "png"})
    if unknown:
        raise SystemExit(f"unknown formats {unknown}; use jpeg and/or png")
    args.s3 = args.s3 or args.null_s3
    args.size = args.size or 224
    # A GPU worker's sizes unless given: the null engine stands for the device.
    args.batch = CUDA.batch_size if args.batch is None else args.batch
    args.shard_size = CUDA.shard_size if args.shard_size is None else args.shard_size
    args.n = args.shard_size if args.n is None else args.n
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    np.seterr(all="ignore")
    return run(args)
