"""Heatmap uploads per second to S3: ConcurrentWriter against one ``put_object`` at a time.

Real object stores are a round trip away, and each small upload costs about one round trip,
so a writer that keeps many requests in flight should scale with its thread count until
the server's CPU is the limit. The benchmark starts a moto S3 server, puts a TCP proxy in
front of it that adds ``--rtt-ms`` of round-trip latency, and uploads the same grayscale
PNG heatmaps (about 11 KB each, as the workers write them) three ways: plain boto3
``put_object`` calls one at a time (the baseline), ``S3Storage.put`` one at a time (which
skips botocore's ``Expect: 100-continue`` round trip for small bodies), and
``ConcurrentWriter``.

    python bench/storage_s3.py [--count 300] [--workers 16] [--rtt-ms 20]

Exits non-zero when the concurrent writer is less than ``--floor`` times faster than the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import numpy as np
import torch
import torch.nn.functional as F

# Run as a script from a checkout: the test plugin provides the moto server and the proxy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.plugins.s3 import DUMMY_AWS_ENV, MotoServer, TcpProxy
from workers.heatmap_io import encode_png_gray, to_uint8
from workers.storage import ConcurrentWriter, S3Storage


def make_heatmaps(count: int, size: int = 224, cells: int = 7, seed: int = 0) -> list[bytes]:
    """PNG heatmaps as the workers make them: a 7 x 7 CAM upsampled bilinearly and min-max scaled."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 1, cells, cells, generator=generator)
    maps = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    u8 = to_uint8((maps - lo) / (hi - lo)).numpy()
    return [encode_png_gray(m) for m in u8]


def plain_client(endpoint_url: str) -> Any:
    """A boto3 client with its defaults, as a script without this project would use it."""
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


def sequential_put_object(client: Any, bucket: str, blobs: list[bytes], prefix: str) -> float:
    """The baseline: one ``put_object`` after the other."""
    start = time.perf_counter()
    for index, data in enumerate(blobs):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{index}.png", Body=data, ContentType="image/png")
    return time.perf_counter() - start


def sequential_storage(storage: S3Storage, blobs: list[bytes], prefix: str) -> float:
    """One verified ``S3Storage.put`` after the other: the writer's work without its threads."""
    start = time.perf_counter()
    for index, data in enumerate(blobs):
        storage.put(f"{prefix}/{index}.png", data, "image/png")
    return time.perf_counter() - start


def concurrent(storage: S3Storage, blobs: list[bytes], prefix: str, workers: int) -> float:
    start = time.perf_counter()
    with ConcurrentWriter(storage, max_workers=workers) as writer:
        for index, data in enumerate(blobs):
            writer.submit(f"{prefix}/{index}.png", data, "image/png")
    elapsed = time.perf_counter() - start
    if len(writer.results()) != len(blobs):
        raise RuntimeError(f"expected {len(blobs)} results, got {len(writer.results())}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="heatmaps uploaded by each method")
    parser.add_argument("--workers", type=int, default=16, help="ConcurrentWriter threads")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip latency the proxy adds")
    parser.add_argument("--floor", type=float, default=4.0, help="least acceptable speed-up")
    args = parser.parse_args(argv)

    os.environ.update(DUMMY_AWS_ENV)
    blobs = make_heatmaps(args.count)
    sizes = np.array([len(b) for b in blobs])
    with MotoServer() as server:
        upstream = urlsplit(server.url)
        delay = args.rtt_ms / 2000.0
        with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80, one_way_delay_s=delay) as proxy:
            storage = S3Storage(
                "camaudit-bench",
                "heatmaps",
                endpoint_url=proxy.url,
                max_pool_connections=max(64, args.workers),
            )
            client = plain_client(proxy.url)
            warm = blobs[: min(len(blobs), args.workers)]
            sequential_put_object(client, "camaudit-bench", warm[:2], "warm")  # connect, load models
            sequential_storage(storage, warm[:2], "warm")
            concurrent(storage, warm, "warm", args.workers)
            timings = {
                "sequential boto3 put_object": sequential_put_object(client, "camaudit-bench", blobs, "seq"),
                "sequential S3Storage.put": sequential_storage(storage, blobs, "seq-storage"),
                f"ConcurrentWriter x{args.workers}": concurrent(storage, blobs, "conc", args.workers),
            }

    rates = {name: len(blobs) / seconds for name, seconds in timings.items()}
    baseline = rates["sequential boto3 put_object"]
    ratio = rates[f"ConcurrentWriter x{args.workers}"] / baseline
    print(
        f"{len(blobs)} PNG heatmaps, {sizes.min() / 1024:.1f}-{sizes.max() / 1024:.1f} KB "
        f"(mean {sizes.mean() / 1024:.1f} KB), moto S3 behind a proxy adding {args.rtt_ms:.0f} ms RTT"
    )
    for name, rate in rates.items():
        print(f"{name:<30s}: {rate:8.1f} objects/s  {rate / baseline:5.1f} x  ({timings[name]:.2f} s)")
    print(f"speed-up of the writer over put_object: {ratio:.1f} x (floor {args.floor:.1f} x)")
    if ratio < args.floor:
        print(f"FAIL: concurrent uploads are only {ratio:.1f} x faster than sequential ones", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
