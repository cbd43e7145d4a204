"""Worker processes per GPU: images/s of P processes sharing one device, end to end.

A shard's decode, encode, upload and row threads share one interpreter lock with the thread
feeding the device, and on a machine of many cores one process did not use them (docs/
PERFORMANCE.md, "Why 16 cores feed it no faster than two"); a worker started with ``camaudit
worker --concurrency P`` runs P processes, each with its own lock, its share of the cores and its
own copy of the model on the device. This starts P processes at once (spawned, as Celery's children are
separate interpreters), each explaining the same data set end to end in its own run (plan + every
shard, its own SQLite file and output folder), released together by a barrier, and prints the
images/s of all of them together against one process, for each P. Each process sizes its thread
pools as a worker child does (``workers/pools.py``).

    python bench/gpu_workers.py                  # CUDA when present: P = 1, 2, 4, 8 (a CPU: small sizes)
    python bench/gpu_workers.py --sources png    # the synthetic PNGs of 160-256 px
    python bench/gpu_workers.py --processes 1,2 --torch-threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMEOUT_S = 600.0
SETUP_S = 120.0  # starting the processes, loading the model, the warm-up run
GPU_SIZES = {"model": "torchvision:resnet50", "size": 224, "n": 2048, "batch": 64, "shard_size": 1024}
CPU_SIZES = {"model": "demo", "size": 64, "n": 64, "batch": 8, "shard_size": 32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated process counts")
    parser.add_argument("--model", default=None, help="torchvision:resnet50 (CPU: demo)")
    parser.add_argument("--size", type=int, default=None, help="224 (CPU: 64)")
    parser.add_argument("--methods", default="gradcam,cam")
    parser.add_argument("--n", type=int, default=None, help="images each process explains: 2048 (CPU: 64)")
    parser.add_argument("--batch", type=int, default=None, help="64 (CPU: 8)")
    parser.add_argument("--shard-size", type=int, default=None, help="1024 (CPU: 32)")
    parser.add_argument("--device", default=None, help="cuda when present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="a process count whose run takes longer is stopped, and so is the sweep",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch's CPU threads per process (default: the worker's: 1 on a GPU, every core on a CPU)",
    )
    parser.add_argument(
        "--sources",
        choices=["jpeg", "png"],
        default="jpeg",
        help="jpeg: a folder of photo-like JPEGs of 375-500 px; png: the synthetic set (160-256 px)",
    )
    args = parser.parse_args(argv)
    try:
        args.processes = [int(p) for p in args.processes.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--processes takes whole numbers separated by commas, got {args.processes!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds must be above 0, got {args.max_seconds:g}")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error(f"--torch-threads must be at least 1, got {args.torch_threads}")
    for name in ("n", "batch", "shard_size", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.processes or min(args.processes) < 1:
        parser.error(f"--processes must name counts of at least 1, got {args.processes}")
    if args.device is None:
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asks NVML; CUDA stays untouched
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # What a GPU worker runs; on a CPU, sizes that end in seconds (the sweep's shape, not a GPU figure).
    sizes = GPU_SIZES if args.device.startswith("cuda") else CPU_SIZES
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _child(
    index: int, processes: int, args: argparse.Namespace, manifest: str, folder: str, barrier: Any, out: Any
) -> None:
    """One worker process: warm up, wait for the others, explain the data set, report its seconds."""
    try:
        from bench import pipeline
        from schema.payloads import RunSpec
        from schema.settings import Settings

        settings = Settings(
            database_url=f"sqlite:///{folder}/p{processes}-{index}.db",
            storage_url=f"{folder}/p{processes}-{index}",
            device=args.device,
            worker_processes=processes,
            torch_threads=args.torch_threads,
        )
        pipeline.prepare_model(argparse.Namespace(model=args.model, size=args.size, device=args.device))
        spec = {"model": args.model, "methods": args.methods, "batch_size": args.batch}
        ids: list[str] = []
        pipeline.pipeline_run(
            RunSpec(source=_warm_up_set(args, manifest, processes, index), **spec), settings, ids
        )
        barrier.wait(TIMEOUT_S)
        start, cpu = time.perf_counter(), time.process_time()
        pipeline.pipeline_run(RunSpec(source=manifest, shard_size=args.shard_size, **spec), settings, ids)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        pipeline.check_run(settings, ids[-1], args.n, args.n * len(args.methods))
        out.put((index, seconds, cpu, None))
    except BaseException as exc:  # the parent reports it; a broken barrier frees the others
        barrier.abort()
        out.put((index, None, None, f"{type(exc).__name__}: {exc}"))


def _warm_up_set(args: argparse.Namespace, source: str, processes: int, index: int) -> str:
    """A manifest of the data set's first batch: kernels, allocator and pools warm before the clock."""
    path = Path(source)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())[: args.batch]
        lines = [json.dumps({"uri": str(path / name)}) for name in names]
        warm = path.parent / f"warm-{processes}-{index}.jsonl"
    else:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line][: args.batch]
        warm = path.with_name(f"warm-{processes}-{index}.jsonl")
    warm.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(warm)


def measure(
    args: argparse.Namespace, processes: int, manifest: Path, folder: Path
) -> tuple[float, float, float]:
    """(images/s of all processes together, slowest process's seconds, cores their CPU time filled).

    CPU time counts every thread of a process, OpenMP's spinning helpers too: cores busy far
    above what the stages need is time spent waiting actively.
    """
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(processes), context.Queue()
    children = [
        context.Process(
            target=_child, args=(i, processes, args, str(manifest), str(folder), barrier, out), daemon=True
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    deadline = time.monotonic() + SETUP_S + args.max_seconds
    reports: list[tuple[int, float | None, float | None, str | None]] = []
    try:
        for _ in children:
            try:
                reports.append(out.get(timeout=max(1.0, deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(
                    f"{processes} processes did not finish within {args.max_seconds:g} s "
                    f"(and {SETUP_S:g} s to start)"
                ) from None
    finally:
        for child in children:  # all reported: they are ending; else (a timeout, an error) stop them
            child.join(timeout=60 if len(reports) == len(children) else 0)
            if child.is_alive():
                child.kill()
                child.join()
    errors = [f"process {i}: {error}" for i, _, _, error in reports if error]
    if errors:
        raise RuntimeError("; ".join(errors))
    slowest = max(seconds or 0.0 for _, seconds, _, _ in reports)
    return processes * args.n / slowest, slowest, sum(cpu or 0.0 for _, _, cpu, _ in reports) / slowest


@dataclass(frozen=True)
class SweepRow:
    processes: int
    rate: float | None = None  # images/s of all processes together; None: stopped before the end
    slowest: float = 0.0  # seconds of the slowest process's run
    busy: float = 0.0  # cores their CPU time filled
    stopped: str | None = None  # why the sweep ended here


def sweep(args: argparse.Namespace, source: Path, folder: Path) -> Iterator[SweepRow]:
    """One row per count of ``args.processes``; the sweep ends after a count that ran out of time."""
    for processes in args.processes:
        try:
            rate, slowest, busy = measure(args, processes, source, folder)
        except TimeoutError as exc:
            yield SweepRow(processes, stopped=str(exc))
            return
        over = slowest > args.max_seconds
        reason = f"its run took over {args.max_seconds:g} s" if over else None
        yield SweepRow(processes, rate, slowest, busy, reason)
        if over:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.null_pipeline import make_sources
    from workers.synth import make_dataset

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="camaudit-workers-") as name:
        if args.sources == "png":
            manifest = make_dataset(Path(name) / "data", args.n, args.seed)
            data = f"{args.n} PNGs of 160-256 px"
        else:
            manifest = Path(name) / "jpeg"
            make_sources(manifest, args.n, "jpeg", args.seed)
            data = f"{args.n} JPEGs of 375-500 px (a folder)"
        print(
            f"{args.model} {args.size}px, {','.join(args.methods)}, batch {args.batch}, shards of "
            f"{args.shard_size}, {data} per process, {args.device}, {cores} cores, "
            f"local folder + SQLite per process",
            flush=True,
        )
        threads = args.torch_threads or ("1 (a GPU worker's)" if args.device.startswith("cuda") else "all")
        print(f"torch CPU threads per process: {threads}", flush=True)
        print(f"{'processes':>9} {'img/s':>9} {'x one':>6} {'slowest s':>9} {'cores busy':>10}", flush=True)
        one = None
        for row in sweep(args, manifest, Path(name)):
            if row.rate is None:
                print(f"{row.processes:9d} stopped: {row.stopped}", flush=True)
                break
            one = one or (row.rate if row.processes == 1 else None)
            ratio = f"{row.rate / one:6.2f}" if one else f"{'':6}"
            timing = f"{row.rate:9.1f} {ratio} {row.slowest:9.2f} {row.busy:10.1f}"
            print(f"{row.processes:9d} {timing}", flush=True)
            if row.stopped:
                print(f"stopped after {row.processes}: {row.stopped}", flush=True)
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f} (1 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
