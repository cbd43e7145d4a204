"""Gallery read latency of one stored map: a ranged read of a packed tar against a whole-object GET.

The gallery and ``camaudit render`` fetch one map at a time. In the files layout that is one GET
of a small object; in the packed layout one GET with a ``Range`` header (or a seek in a file)
inside the shard's tar. This writes the same maps both ways (PNG + npy of smooth synthetic maps
at ``--size``, ``--n`` per shard), then reads ``--reads`` maps in a random order through
``workers.map_reads.map_bytes``, the function every reader uses, and prints the median and p95
of each, with their ratio, on a local folder and on a moto S3 server behind a proxy adding
``--rtt-ms`` of round trip. Each is measured ``--rounds`` times, interleaved, and the best
round (lowest median) counts: on a shared machine a slow round measures the neighbours.

    python bench/map_reads.py                      # folder and S3 over 20 ms RTT
    python bench/map_reads.py --size 224 --n 2048  # a GPU-sized shard of resnet-sized maps
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from tests.plugins.s3 import DUMMY_AWS_ENV, MotoServer, TcpProxy
from workers.heatmap_io import encode_npy, encode_png_gray
from workers.map_reads import MapRef, map_bytes
from workers.packing import build_tar, heatmap_key, packed_key, sample_key
from workers.storage import Storage, open_storage

BUCKET = "camaudit-bench-reads"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256, help="maps in the shard")
    parser.add_argument("--size", type=int, default=128, help="map side in pixels (the model input)")
    parser.add_argument("--reads", type=int, default=200, help="single-map reads per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best (lowest median) counts")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the S3 proxy adds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("n", "size", "reads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def synthetic_maps(n: int, size: int, seed: int) -> list[tuple[bytes, bytes]]:
    """PNG and npy bytes of ``n`` smooth maps (a Gaussian blob each), compressed as stored maps are."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    maps = []
    for _ in range(n):
        cy, cx, width = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * width**2))
        raw = blob[:: max(1, size // 8), :: max(1, size // 8)].astype(np.float16)
        maps.append((encode_png_gray(np.round(blob * 255).astype(np.uint8)), encode_npy(raw)))
    return maps


def write_both(storage: Storage, maps: list[tuple[bytes, bytes]]) -> tuple[list[MapRef], list[MapRef]]:
    """The maps as per-map objects and as one packed tar; the references readers get from rows."""
    files, members = [], {}
    for item_id, (png, npy) in enumerate(maps):
        png_key = heatmap_key("bench", "gradcam", "layer4", item_id, 0, "png")
        npy_key = heatmap_key("bench", "gradcam", "layer4", item_id, 0, "npy")
        storage.put(png_key, png, "image/png")
        storage.put(npy_key, npy)
        files.append(MapRef(png_key, npy_key))
        members[f"{sample_key(item_id, 0)}.png"] = png
        members[f"{sample_key(item_id, 0)}.npy"] = npy
    tar_key = packed_key("bench", "gradcam", "layer4", 0)
    data, spans = build_tar(members)
    storage.put(tar_key, data, "application/x-tar")
    packed = []
    for item_id in range(len(maps)):
        (png_at, png_len), (npy_at, npy_len) = (
            spans[f"{sample_key(item_id, 0)}.{ext}"] for ext in ("png", "npy")
        )
        packed.append(MapRef(tar_key, tar_key, png_at, png_len, npy_at, npy_len))
    for ref, (png, _) in zip(packed, maps, strict=True):  # the ranges hold the maps, or nothing counts
        assert map_bytes(storage, ref) == png
    return files, packed


def latencies(read: Callable[[], bytes], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        read()
        out.append(time.perf_counter() - start)
    return out


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def measure(where: str, storage: Storage, args: argparse.Namespace) -> None:
    maps = synthetic_maps(args.n, args.size, args.seed)
    files, packed = write_both(storage, maps)
    order = random.Random(args.seed).choices(range(args.n), k=args.reads)
    rounds: dict[str, list[list[float]]] = {"whole-object GET (files)": [], "ranged read (packed)": []}
    for _ in range(args.rounds):
        for name, refs in zip(rounds, (files, packed), strict=True):
            picks = iter(order)
            rounds[name].append(
                latencies(lambda refs=refs, picks=picks: map_bytes(storage, refs[next(picks)]), args.reads)
            )
    best = {name: min(found, key=statistics.median) for name, found in rounds.items()}
    png_size = statistics.mean(len(png) for png, _ in maps)
    print(
        f"\n{where}: {args.n} maps of {args.size}x{args.size} (PNG {png_size / 1024:.1f} KiB on average), "
        f"{args.reads} reads per round, best of {args.rounds}; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':28s} {'median ms':>10s} {'p95 ms':>8s}   every round's median ms")
    for name, values in best.items():
        every = ", ".join(f"{statistics.median(v) * 1e3:.2f}" for v in rounds[name])
        print(f"{name:28s} {statistics.median(values) * 1e3:10.2f} {p95(values) * 1e3:8.2f}   {every}")
    files_best, packed_best = best.values()
    median_ratio = statistics.median(packed_best) / statistics.median(files_best)
    print(
        f"{'ranged / whole object':28s} {median_ratio:10.2f} "
        f"{p95(packed_best) / p95(files_best):8.2f}   (below 1: the ranged read is faster)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average at start {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory(prefix="camaudit-map-reads-") as name:
        measure("local folder", open_storage(str(Path(name) / "maps")), args)
    os.environ.update(DUMMY_AWS_ENV)
    with MotoServer() as server:
        upstream = urlsplit(server.url)
        delay = args.rtt_ms / 2000.0
        with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80, one_way_delay_s=delay) as proxy:
            storage = open_storage(f"s3://{BUCKET}/maps", endpoint_url=proxy.url, region="us-east-1")
            measure(f"moto S3 behind a {args.rtt_ms:g} ms RTT proxy", storage, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
