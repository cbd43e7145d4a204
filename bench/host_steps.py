"""Five host steps of a shard against what they replaced, timed in one process.

Each line prints the old way, the new way and their ratio, best of ``--rounds``:

1. **PNG deflate** of a smooth 224 x 224 heatmap (the worker's Sub-filtered rows): zlib at
   level 1 against ISA-L at level 1 (``workers.heatmap_io.encode_png_gray``), with the sizes.
2. **Normalising a batch** of 64 channels-last 224 x 224 images on one CPU thread: the plain
   broadcast ``(x / 255 - mean) / std`` against the blocked rows of ``normalise_batch``
   (identical values, checked here too).
3. **A shard's result rows into SQLite** (512 items, 1,024 heatmaps, 5,120 patch scores, fresh
   rows in a new database each round): SQLAlchemy's statements against the driver's
   ``executemany`` (``workers.results``).
4. **Localisation columns** of a batch's 128 maps with boxes, on one thread: a boolean mask per
   map against one rectangle per box (``workers.localisation``; identical values, checked).
5. **Reading 256 local JPEGs** within a source root: the whole path and the root resolved for
   every file and read through a file object, against a shard's ``LocalSources`` (roots and
   folders resolved once, read from the descriptor; the same bytes, checked).

    python bench/host_steps.py
    python bench/host_steps.py --rounds 10
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from isal import isal_zlib

from schema.db import upgrade
from tests.test_results_pg import seed_run, shard_rows, write_shard
from workers import results
from workers.fetch import LocalSources
from workers.images import normalise_batch
from workers.localisation import box_mask, localisation_columns
from workers.preprocess import Preprocess
from workers.runtime import keep_freed_memory

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def best(fn: Callable[[], Any], rounds: int, repeat: int = 1) -> float:
    """Best seconds per call over ``rounds`` rounds of ``repeat`` calls."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - start) / repeat)
    return min(times)


def line(what: str, old: float, new: float, note: str = "") -> None:
    print(f"{what:56} {1000 * old:9.3f} ms {1000 * new:9.3f} ms {old / new:6.2f}x  {note}")


def png_deflate(rounds: int) -> None:
    generator = torch.Generator().manual_seed(0)
    raw = torch.rand(1, 1, 7, 7, generator=generator)
    up = F.interpolate(raw, size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    levels = ((up - up.min()) / (up.max() - up.min()) * 255).round().to(torch.uint8).numpy()
    rows = np.empty((224, 225), dtype=np.uint8)
    rows[:, 0], rows[:, 1] = 1, levels[:, 0]
    np.subtract(levels[:, 1:], levels[:, :-1], out=rows[:, 2:])
    data = rows.tobytes()
    old = best(lambda: zlib.compress(data, 1), rounds, 200)
    new = best(lambda: isal_zlib.compress(data, 1), rounds, 200)
    assert zlib.decompress(isal_zlib.compress(data, 1)) == data
    sizes = f"{len(zlib.compress(data, 1)):,} -> {len(isal_zlib.compress(data, 1)):,} bytes"
    line("PNG deflate, one 224 x 224 map (zlib, ISA-L)", old, new, sizes)


def normalise(rounds: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker's own tensor work on a CPU device runs
    try:
        _normalise(rounds)
    finally:
        torch.set_num_threads(threads)


def _normalise(rounds: int) -> None:
    pixels = torch.randint(0, 256, (64, 224, 224, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    mean_t, std_t = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def plain() -> torch.Tensor:
        return pixels.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)

    assert torch.equal(plain(), normalise_batch(pixels, MEAN, STD))
    old = best(plain, rounds)
    new = best(lambda: normalise_batch(pixels, MEAN, STD), rounds)
    line("normalise 64 x 3 x 224 x 224, one thread", old, new, "identical values")


def sqlite_rows(rounds: int) -> None:
    def write(folder: Path, n: int, through_sqlalchemy: bool) -> float:
        url = f"sqlite:///{folder / f'{n}.db'}"
        upgrade(url)
        run = seed_run(url, "bench", n_items=512, shard_size=512, methods=("gradcam", "cam"))
        rows = shard_rows(run, run.shard_ids[0], top_patches=5, classes=(0,))
        saved = results._sqlite_upsert, results._sqlite_update_items
        if through_sqlalchemy:
            results._sqlite_upsert = lambda session, staged, rows, what: results._values_upsert(  # type: ignore[assignment]
                session, staged, rows
            )
            results._sqlite_update_items = lambda session, columns, rows, run_id: session.execute(  # type: ignore[assignment]
                results.update(results.Item), list(rows)
            )
        try:
            start = time.perf_counter()
            write_shard(url, rows, top_patches=5)
            return time.perf_counter() - start
        finally:
            results._sqlite_upsert, results._sqlite_update_items = saved

    with tempfile.TemporaryDirectory(prefix="camaudit-host-steps-") as name:
        folder = Path(name)
        old = min(write(folder, 2 * r, True) for r in range(rounds))
        new = min(write(folder, 2 * r + 1, False) for r in range(rounds))
    line("SQLite rows of a 512-image shard (SQLAlchemy, driver)", old, new, "fresh rows")


def _masked_columns(maps: np.ndarray, raw: np.ndarray, boxes: list[Any], transforms: list[Any]) -> list[Any]:
    """The columns as they were computed before: a mask per map, sums through boolean indexing."""
    n, height, width = maps.shape
    totals = maps.reshape(n, -1).sum(axis=1, dtype=np.int64)
    tensor = torch.from_numpy(raw.astype(np.float32))[:, None]
    up = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    positive = np.maximum(up[:, 0].numpy(), 0.0)
    columns = []
    for i in range(n):
        inside = box_mask(boxes[i], transforms[i])
        peak = np.unravel_index(int(np.argmax(maps[i])), (height, width))
        columns.append(
            (
                float(maps[i][inside].sum(dtype=np.int64)) / float(totals[i]),
                bool(inside[peak]),
                float(positive[i][~inside].sum(dtype=np.float64)) / (height * width),
            )
        )
    return columns


def localisation(rounds: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        maps = rng.integers(0, 256, (128, 224, 224), dtype=np.uint8)
        raw = rng.standard_normal((128, 7, 7)).astype(np.float16)
        pre = Preprocess((224, 224), MEAN, STD, resize="center-crop", resize_to=(256, 256))
        transforms = [pre.transform(int(w), int(h)) for w, h in rng.integers(375, 501, (128, 2))]
        boxes = [[x, y, x + 150.0, y + 120.0] for x, y in rng.uniform(0, 220, (128, 2))]

        def rectangles() -> list[Any]:
            return localisation_columns(maps, raw, boxes, transforms)

        expected = [(c["box_energy"], c["box_hit"], c["outside_mass"]) for c in rectangles()]
        assert _masked_columns(maps, raw, boxes, transforms) == expected
        old = best(lambda: _masked_columns(maps, raw, boxes, transforms), rounds)
        new = best(rectangles, rounds)
    finally:
        torch.set_num_threads(threads)
    line("localisation of 128 maps with boxes, one thread", old, new, "identical values")


def _read_resolving_each(path: str, root: str, max_bytes: int) -> bytes:
    """The read before ``LocalSources``: realpath of the file and the root, then a file object."""
    real = os.path.realpath(path)
    if not (real == root or real.startswith(os.path.realpath(root).rstrip(os.sep) + os.sep)):
        raise ValueError(f"{path} lies outside {root}")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    assert stat.S_ISREG(info.st_mode)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(min(info.st_size, max_bytes) + 1)


def local_reads(rounds: int) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="camaudit-reads-") as name:
        root = Path(name) / "images"
        root.mkdir()
        rng = np.random.default_rng(0)
        paths = []
        for index in range(256):
            path = root / f"{index:06d}.jpg"
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        cap = 1 << 26

        def each() -> list[bytes]:
            return [_read_resolving_each(path, str(root), cap) for path in paths]

        def shard_reader() -> list[bytes]:
            local = LocalSources([str(root)])
            return [local.read(path, cap) for path in paths]

        assert each() == shard_reader()
        old = best(each, rounds)
        new = best(shard_reader, rounds)
    line("reading 256 local JPEGs, within one root", old, new, "the same bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each; the best counts")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as a worker does: large buffers are reused, not page-faulted in again
    print(f"{'step':56} {'before':>12} {'after':>12} {'ratio':>7}")
    png_deflate(args.rounds)
    normalise(args.rounds)
    sqlite_rows(args.rounds)
    localisation(args.rounds)
    local_reads(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
