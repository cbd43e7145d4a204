"""End-to-end throughput: the CAM engine alone, the whole pipeline, and the loop users write today.

All three explain the same synthetic images (``workers.synth.make_dataset``: PNGs of 160-256
px per side) with the same model, methods and device, and write to the same kind of storage:

1. **engine only**: the images already decoded, stacked in batches on the device, through
   the worker's own ``CamEngine`` with nothing else: the ceiling for the pipeline.
2. **end to end**: ``plan_run`` and then ``explain_shard`` for every shard, in this process
   (embedded mode), so it counts decoding, the engine, PNG/npy encoding, uploads and SQL.
3. **user loop**: per image ``cv2.imread`` + resize + normalise, pytorch-grad-cam ``GradCAM``
   on a batch of one for each method (the plain CAM has no class of its own there, so users
   run ``GradCAM`` again), ``cv2.applyColorMap`` + PNG, one write (a file, or one boto3
   ``put_object``) per heatmap and one SQL INSERT + commit per image.

The pipeline should stay close to the engine (``end to end / engine only``, floor 0.8), since
its I/O runs on threads beside the model, and beat the user loop by batching (floor 3x).
Everything is warmed up before timing: the model, the engine, the storage connection, the
database schema and pytorch-grad-cam's hooks, as in a long-lived worker or notebook. The user
loop is given its best case: its CAM objects are built once, its files are not fsynced,
and it writes one PNG per heatmap where the pipeline also writes the raw map and patch scores.
It explains the first ``--loop-n`` images (64) per round: one image at a time, its rate does
not depend on how many. On a CPU the engine and the pipeline's own decoding, encoding and
writing share the same cores, so there the ratio to the engine is bounded by how much of the
work per image the model is (docs/PERFORMANCE.md); on a GPU they do not compete.

With ``--s3`` both write to a moto S3 server behind a TCP proxy adding ``--rtt-ms`` of round
trip; the default is a local folder. ``--layout`` picks where the pipeline's maps go (packed:
one tar per shard, method and layer; files: one object per map; both: each, as two contenders,
with the objects each writes per image), and with ``--s3`` every layout also runs to a local
folder in the same rounds, for the ratio of S3 to folder. ``--database-url`` points both at one database (e.g.
PostgreSQL) and deletes the benchmark's runs from it afterwards; the default is SQLite files in
a temporary folder. Each contender runs ``--rounds`` times and the best round counts: on a
shared machine a slow round measures the neighbours. Figures and their reading: docs/PERFORMANCE.md.

    python bench/pipeline.py                                  # demo model, 256 images, CPU
    python bench/pipeline.py --s3                             # heatmaps to S3 over 20 ms RTT
    python bench/pipeline.py --s3 --layout both               # packed vs files, S3 vs folder
    python bench/pipeline.py --model torchvision:resnet50 --size 224 --n 256
    python bench/pipeline.py --quick --check                  # smoke-sized, exit 1 below a floor
    python bench/pipeline.py --engine null                    # the host pipeline alone (null engine)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Run as a script from a checkout: the test plugin provides the moto server and the proxy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import cv2
import numpy as np
import torch
from pytorch_grad_cam.utils.image import preprocess_image
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from bench import null_pipeline
from bench.engine import PERTURBATION, REFERENCE
from scheduler.gc import gc_run
from scheduler.plan import PlanError, check_methods, plan_run, resolve_layers
from schema.db import session_scope
from schema.models import Heatmap, Run
from schema.payloads import RunSpec
from schema.settings import Settings
from tests.plugins.s3 import DUMMY_AWS_ENV, MotoServer, TcpProxy
from workers.cam.precision import resolve_amp
from workers.images import decode_image
from workers.models import LoadedModel, load_model_cached, resolve_layer
from workers.runtime import amp_argument, engine_for, pick_device
from workers.shard import explain_shard
from workers.storage import open_storage
from workers.synth import make_dataset

# What a user reaches for in pytorch-grad-cam for each of our methods (the engine benchmark's
# table), less the perturbation methods, which one image at a time cannot be timed here.
USER_CAM = {method: cam for method, cam in REFERENCE.items() if method not in PERTURBATION}
BUCKET = "camaudit-bench"
FLOOR_ENGINE = 0.8
FLOOR_LOOP = 3.0


@dataclass(frozen=True)
class Target:
    """Where both contenders write: the pipeline's settings and the user loop's equivalents."""

    settings: Settings
    loop_database_url: str
    loop_write: Callable[[str, bytes], None]
    describe: str


@dataclass(frozen=True)
class Timing:
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=None, help="images in the data set (256; null: a shard)")
    parser.add_argument("--model", default="demo", help="demo, torchvision:NAME (random weights), ...")
    parser.add_argument("--size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--methods", default="gradcam,cam", help="comma-separated CAM methods")
    parser.add_argument("--batch", type=int, default=None, help="images per engine call (16; null: 64)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (128; null: 2048)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--s3", action="store_true", help="write heatmaps to moto S3 behind a slow proxy")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the S3 proxy adds")
    parser.add_argument("--database-url", default=None, help="one database for both (default: SQLite)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each; the best is kept")
    parser.add_argument(
        "--loop-n",
        type=int,
        default=64,
        help="images the user loop explains per round (its rate per image is steady; default 64)",
    )
    parser.add_argument(
        "--layout",
        choices=["packed", "files", "both"],
        default="packed",
        help="where the pipeline's maps go: one tar per shard, method and layer, one object per map, or both",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-sized: 48 images, shards of 24")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio misses its floor")
    parser.add_argument(
        "--engine",
        choices=["cam", "null"],
        default="cam",
        help="null: a stand-in engine at no cost, to time the host pipeline alone (bench/null_pipeline.py)",
    )
    null_pipeline.add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("n", "batch", "shard_size", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.engine == "null":
        return args
    for name, default in (("n", 256), ("batch", 16), ("shard_size", 128)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.quick:
        args.n, args.shard_size = min(args.n, 48), min(args.shard_size, 24)
    args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    try:
        check_methods(args.methods)
    except PlanError as exc:
        parser.error(str(exc))
    missing = [m for m in args.methods if m not in USER_CAM]
    if missing:
        parser.error(
            f"{', '.join(missing)} cannot be timed here: one image at a time it costs hundreds of "
            f"forwards per map; choose from {', '.join(USER_CAM)}"
        )
    if args.loop_n < 1:
        parser.error(f"--loop-n must be at least 1, got {args.loop_n}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here; use --device cpu")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the data and model


def load_data(root: Path, n: int, seed: int) -> tuple[Path, list[dict[str, Any]]]:
    manifest = make_dataset(root, n, seed)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line]
    return manifest, rows


def sub_manifest(manifest: Path, rows: list[dict[str, Any]], name: str) -> Path:
    """A manifest beside the full one (so relative URIs still resolve) naming only ``rows``."""
    path = manifest.with_name(name)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare_model(args: argparse.Namespace) -> LoadedModel:
    """Load once into the per-process cache the planner (on CPU) and the worker both read.

    A given ``--size`` is fixed here, because both look models up by reference alone.
    """
    extra = {"input_size": (args.size, args.size)} if args.size else {}
    for device in dict.fromkeys(["cpu", args.device]):
        loaded = load_model_cached(args.model, None, device=device, **extra)
    return loaded


# --------------------------------------------------------------------------- where results go


@contextlib.contextmanager
def output_target(args: argparse.Namespace, tmp: Path) -> Iterator[Target]:
    database_url = args.database_url or f"sqlite:///{tmp / 'camaudit.db'}"
    loop_database_url = args.database_url or f"sqlite:///{tmp / 'user-loop.db'}"
    database = "SQLite files" if not args.database_url else make_url(database_url).get_backend_name()
    if not args.s3:
        folder = tmp / "heatmaps"

        def write_file(key: str, data: bytes) -> None:
            path = folder / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        settings = Settings(database_url=database_url, storage_url=str(folder), device=args.device)
        yield Target(settings, loop_database_url, write_file, f"local folder, {database}")
        return
    os.environ.update(DUMMY_AWS_ENV)
    with MotoServer() as server:
        upstream = urlsplit(server.url)
        delay = args.rtt_ms / 2000.0
        with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80, one_way_delay_s=delay) as proxy:
            # The client a script would make: boto3's defaults, through the same slow link.
            client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)

            def put_object(key: str, data: bytes) -> None:
                client.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/png")

            settings = Settings(
                database_url=database_url,
                storage_url=f"s3://{BUCKET}/pipeline",
                s3_endpoint_url=proxy.url,
                s3_region="us-east-1",
                device=args.device,
            )
            where = f"moto S3 behind a {args.rtt_ms:g} ms RTT proxy, {database}"
            yield Target(settings, loop_database_url, put_object, where)


# --------------------------------------------------------------------------- 1. engine only


def engine_only(
    loaded: LoadedModel,
    args: argparse.Namespace,
    layers: list[str],
    settings: Settings,
    images: list[torch.Tensor],
) -> Timing:
    device = pick_device(settings.device)
    engine = engine_for(loaded, args.methods, layers, settings)
    batches = [
        torch.stack(images[start : start + args.batch]).to(device)
        for start in range(0, len(images), args.batch)
    ]
    engine(batches[0])  # warm-up: kernels, allocator, hooks
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        result = engine(batch)
    sync(device)
    seconds = time.perf_counter() - start
    expected = (batches[-1].shape[0], 1, *loaded.preprocess.size)
    for method in args.methods:
        if tuple(result.maps[method].shape) != expected:
            raise RuntimeError(f"{method} maps are {tuple(result.maps[method].shape)}, expected {expected}")
    return Timing(len(images), seconds)


def decode_all(loaded: LoadedModel, paths: list[Path]) -> list[torch.Tensor]:
    pre = loaded.preprocess
    return [decode_image(p.read_bytes(), pre.size, pre.mean, pre.std).tensor for p in paths]


# --------------------------------------------------------------------------- 2. end to end


def pipeline_run(spec: RunSpec, settings: Settings, run_ids: list[str]) -> tuple[str, float, float]:
    """Plan and explain every shard in this process; returns the run id, plan and shard seconds.

    The run id joins ``run_ids`` as soon as it exists, so a run that fails can still be cleaned up.
    """
    start = time.perf_counter()
    planned = plan_run(spec, settings)
    planned_at = time.perf_counter()
    run_ids.append(planned.run_id)
    for shard_id in planned.shard_ids:
        outcome = explain_shard(planned.run_id, shard_id, settings)
        if outcome.status != "done" or outcome.n_failed:
            raise RuntimeError(f"shard {shard_id} of run {planned.run_id} ended {outcome}")
    end = time.perf_counter()
    return planned.run_id, planned_at - start, end - planned_at


def count_objects(settings: Settings, run_id: str) -> int:
    """Objects the run wrote: what every PUT (and later every delete) pays for."""
    storage = open_storage(
        settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    return sum(1 for _ in storage.list(f"runs/{run_id}/"))


def check_run(settings: Settings, run_id: str, n_images: int, n_maps: int) -> None:
    with session_scope(settings.database_url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        heatmaps = session.scalar(select(func.count()).select_from(Heatmap).where(Heatmap.run_id == run_id))
        status, done = run.status, run.n_done
    if (status, done, heatmaps) != ("finished", n_images, n_maps):
        raise RuntimeError(
            f"run {run_id} ended {status} with {done} images and {heatmaps} heatmaps; "
            f"expected finished with {n_images} images and {n_maps} heatmaps"
        )


# --------------------------------------------------------------------------- 3. the user loop


class LoopDatabase:
    """One DBAPI connection, one INSERT and one commit per image, as a script does it."""

    TABLE = "bench_user_loop"

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._engine = None
        if parsed.get_backend_name() == "sqlite":
            self.conn: Any = sqlite3.connect(parsed.database or ":memory:")
            mark = "?"
        else:
            self._engine = create_engine(url)
            self.conn = self._engine.raw_connection()
            style = self._engine.dialect.paramstyle
            mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(style)
            if mark is None:
                raise ValueError(
                    f"the driver of {parsed.drivername} takes {style!r} parameters; use one that takes "
                    "qmark or format parameters (sqlite3, psycopg, pymysql)"
                )
        cur = self.conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {self.TABLE}")
        cur.execute(
            f"CREATE TABLE {self.TABLE} (image VARCHAR(1000) PRIMARY KEY, pred_class INTEGER, "
            "score REAL, object_keys VARCHAR(4000))"
        )
        self.conn.commit()
        self.insert = f"INSERT INTO {self.TABLE} VALUES ({', '.join([mark] * 4)})"

    def add(self, image: str, pred_class: int, score: float, keys: list[str]) -> None:
        cur = self.conn.cursor()
        cur.execute(self.insert, (image, pred_class, score, json.dumps(keys)))
        self.conn.commit()

    def count(self) -> int:
        cur = self.conn.cursor()
        cur.execute(f"SELECT COUNT(*) FROM {self.TABLE}")
        return int(cur.fetchone()[0])

    def close(self) -> None:
        cur = self.conn.cursor()
        cur.execute(f"DROP TABLE {self.TABLE}")
        self.conn.commit()
        self.conn.close()
        if self._engine is not None:
            self._engine.dispose()


def user_loop(
    loaded: LoadedModel,
    args: argparse.Namespace,
    layers: list[str],
    target: Target,
    paths: list[Path],
    prefix: str,
) -> Timing:
    device = pick_device(args.device)
    model = loaded.model
    target_layers = [resolve_layer(model, name) for name in layers]
    cams = {method: USER_CAM[method](model=model, target_layers=target_layers) for method in args.methods}
    height, width = loaded.preprocess.size
    mean, std = list(loaded.preprocess.mean), list(loaded.preprocess.std)
    database = LoopDatabase(target.loop_database_url)

    def explain(path: Path, tag: str) -> None:
        bgr = cv2.imread(str(path))
        if bgr is None:
            raise RuntimeError(f"cv2 cannot read {path}")
        rgb = cv2.cvtColor(cv2.resize(bgr, (width, height)), cv2.COLOR_BGR2RGB)
        x = preprocess_image(np.float32(rgb) / 255, mean=mean, std=std).to(device)
        keys = []
        for method, cam in cams.items():
            gray = cam(input_tensor=x, targets=None)[0]
            colored = cv2.applyColorMap(np.uint8(255 * gray), cv2.COLORMAP_JET)
            ok, png = cv2.imencode(".png", colored)
            if not ok:
                raise RuntimeError(f"cv2 cannot encode the {method} heatmap of {path}")
            key = f"user-loop/{tag}/{method}/{path.stem}.png"
            target.loop_write(key, png.tobytes())
            keys.append(key)
        logits = cams[args.methods[-1]].outputs.detach()
        database.add(f"{tag}/{path.name}", int(logits.argmax()), float(logits.max()), keys)

    try:
        explain(paths[0], f"{prefix}-warmup")
        start = time.perf_counter()
        for path in paths:
            explain(path, prefix)
        sync(device)
        seconds = time.perf_counter() - start
        rows = database.count()
        if rows != len(paths) + 1:
            raise RuntimeError(f"the user loop stored {rows} rows, expected {len(paths) + 1}")
    finally:
        database.close()
        for cam in cams.values():
            cam.activations_and_grads.release()
    return Timing(len(paths), seconds)


# --------------------------------------------------------------------------- report

ENGINE = "engine only (decoded, on device)"
LOOP = "user loop (cv2 + grad-cam, 1 image)"


def report(
    args: argparse.Namespace,
    loaded: LoadedModel,
    target: Target,
    rounds: dict[str, list[Timing]],
    decode_s: float,
    plan_s: float,
    load_before: float,
    objects: dict[str, int],
) -> list[str]:
    """Print the best round of each (the machine is shared; a slow round says nothing of the code)."""
    height, width = loaded.preprocess.size
    device = pick_device(args.device)
    dtype = resolve_amp(amp_argument(target.settings.amp), device)
    print(
        f"{args.n} synthetic PNGs (160-256 px), model {loaded.ref} at {width}x{height}, "
        f"methods {','.join(args.methods)}, batch {args.batch}, shards of {args.shard_size}, "
        f"{device.type} (torch threads {torch.get_num_threads()}), "
        f"autocast {str(dtype).removeprefix('torch.') if dtype else 'off'}"
    )
    print(f"output: {target.describe}")
    # Other work on the machine moves every figure; the load shows whether it was there.
    print(
        f"load average at start {load_before:.2f}, at end {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})"
    )
    print(f"the user loop explains the first {min(args.n, args.loop_n)} of them in each round")
    print(f"{'':38s} {'images/s':>9s} {'seconds':>8s}   every round, images/s")
    best = {name: max(timings, key=lambda t: t.rate) for name, timings in rounds.items()}
    for name, timings in rounds.items():
        every = ", ".join(f"{t.rate:.1f}" for t in timings)
        print(f"{name:38s} {best[name].rate:9.1f} {best[name].seconds:8.2f}   {every}")
    print(f"{'decoding alone (PIL, one thread)':38s} {args.n / decode_s:9.1f} {decode_s:8.2f}")
    print(f"{'planning (plan_run, in end to end)':38s} {'':9s} {plan_s:8.2f}")
    for name, count in objects.items():
        print(f"{'objects per image, ' + name.removeprefix('end to end, '):38s} {count / args.n:9.4f}")
    pipelines = [name for name in rounds if name.startswith("end to end")]
    for name in pipelines[1:]:
        ratio = best[name].rate / best[pipelines[0]].rate
        versus = f"{name.removeprefix('end to end, ')} / {pipelines[0].removeprefix('end to end, ')}"
        print(f"{versus:38s} {ratio:9.2f}")
    ours = best[pipelines[0]].rate
    missed = []
    for name, ratio, floor in (
        ("end to end / engine only", ours / best[ENGINE].rate, FLOOR_ENGINE),
        ("end to end / user loop", ours / best[LOOP].rate, FLOOR_LOOP),
    ):
        verdict = "ok" if ratio >= floor else "BELOW FLOOR"
        print(f"{name:38s} {ratio:9.2f}   (floor {floor:g}) {verdict}")
        if ratio < floor:
            missed.append(f"{name} is {ratio:.2f}, below its floor of {floor:g}")
    return missed


def pipelines(args: argparse.Namespace, settings: Settings, folder: Path) -> list[tuple[str, Settings, str]]:
    """(name, settings, layout) of every end-to-end contender; the first is the one the floors judge."""
    layouts = ["packed", "files"] if args.layout == "both" else [args.layout]
    kind = "S3" if args.s3 else "folder"
    found = [(f"end to end, {layout}, {kind}", settings, layout) for layout in layouts]
    if args.s3:
        local = settings.model_copy(update={"storage_url": str(folder), "s3_endpoint_url": None})
        found += [(f"end to end, {layout}, folder", local, layout) for layout in layouts]
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine == "null":
        return null_pipeline.main(args)
    load_before = os.getloadavg()[0]
    loaded = prepare_model(args)
    layers, _ = resolve_layers(loaded, RunSpec(source="-", model=args.model, methods=args.methods))
    spec_args = {"model": args.model, "methods": args.methods, "batch_size": args.batch}
    with (
        tempfile.TemporaryDirectory(prefix="camaudit-bench-") as name,
        output_target(args, Path(name)) as target,
    ):
        manifest, rows = load_data(Path(name) / "data", args.n, args.seed)
        paths = [manifest.parent / row["uri"] for row in rows]
        settings = target.settings
        run_ids: list[str] = []
        try:
            # Warm the pipeline as a running worker is warm: schema, model, engine, storage client.
            warm = sub_manifest(manifest, rows[: args.batch], "warmup.jsonl")
            pipeline_run(
                RunSpec(source=str(warm), shard_size=args.shard_size, **spec_args), settings, run_ids
            )
            start = time.perf_counter()
            images = decode_all(loaded, paths)
            decode_s = time.perf_counter() - start

            spec = RunSpec(source=str(manifest), shard_size=args.shard_size, **spec_args)
            contenders = pipelines(args, settings, Path(name) / "folder")
            rounds: dict[str, list[Timing]] = {ENGINE: [], **{c[0]: [] for c in contenders}, LOOP: []}
            objects: dict[str, int] = {}
            plan_times = []
            for index in range(args.rounds):
                rounds[ENGINE].append(engine_only(loaded, args, layers, settings, images))
                for contender, where, layout in contenders:
                    laid = spec.model_copy(update={"layout": layout})
                    run_id, plan_s, shards_s = pipeline_run(laid, where, run_ids)
                    check_run(where, run_id, args.n, args.n * len(args.methods) * len(layers))
                    objects[contender] = count_objects(where, run_id)
                    rounds[contender].append(Timing(args.n, plan_s + shards_s))
                    plan_times.append(plan_s)
                rounds[LOOP].append(
                    user_loop(loaded, args, layers, target, paths[: args.loop_n], f"round-{index}")
                )
        finally:
            if args.database_url:  # leave a user's database as it was; temporary ones go whole
                for run_id in run_ids:
                    gc_run(
                        settings.database_url,
                        run_id,
                        endpoint_url=settings.s3_endpoint_url,
                        region=settings.s3_region,
                        force=True,
                    )
        missed = report(args, loaded, target, rounds, decode_s, min(plan_times), load_before, objects)
    if missed and args.check:
        print("FAIL: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
