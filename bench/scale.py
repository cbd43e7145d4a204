"""Many workers against one PostgreSQL and one bucket: shard commits per second as workers grow.

No model runs. Each of N worker processes claims shards of a planned run and commits them with
the worker's own functions (``claim_shard``, ``ConcurrentWriter`` over the worker's storage,
``commit_shard``), with rows built by the worker's own row builders (``heatmap_rows``,
``patch_rows``, ``prediction_rows_of``) from synthetic maps of realistic size. A shard is what
a real one is: ``--images`` items (256), one map per image for each of two methods, top-5
patches per map, and the heatmaps packed as one tar per (method, layer) holding every map's
8-bit PNG (224 px, bilinear like a CAM upsampled from 7 x 7) and raw float16 npy, encoded
with ``workers/heatmap_io.py``. So what is timed is the part of a night that grows with the
number of workers: the database's commits and the bucket's PUTs.

Per N it prints rows/s, objects/s and shard commits/s, their ratio to N=1 measured in the same
process, and where each shard's time went (claim, upload, commit; inside the commit, the wait
for the run row's lock and how long it was then held). A sampler thread reads
``pg_stat_activity`` every 10 ms and names what the bench's backends waited on (the run row,
a foreign-key check, WAL), the PostgreSQL backends' CPU and the S3 server's CPU (from /proc),
and the WAL written (``pg_current_wal_lsn``; cluster-wide, so other users of a shared cluster
count too).

    python bench/scale.py                              # N = 1, 2, 4, 8; moto S3, direct
    python bench/scale.py --rtt-ms 20                  # moto behind a proxy adding 20 ms RTT
    python bench/scale.py --processes 1,2 --shards 2   # smaller
    python bench/scale.py --prior-shards 39063         # late in a 10-million-image run
    python bench/scale.py --admin-url postgresql+psycopg://postgres@127.0.0.1:55432/test

It creates a database of its own on the server of ``--admin-url`` and drops it afterwards.
A round that has not committed every shard after ``--time-limit`` seconds is reported as
stalled (how many shards committed, how many deadlocks) and the larger N are skipped.
Figures and their reading: docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

# Run as a script from a checkout: the test plugin provides the moto server and the proxy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from bench.scale_sampler import Sampled, Sampler
from bench.scale_shard import (
    BuiltShard,
    Shape,
    SyntheticMaps,
    build_shard,
    rows_of,
    synthetic_maps,
)
from workers.packing import build_tar, sample_key

DEFAULT_ADMIN_URL = os.environ.get(
    "CAMAUDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/test"
)
BUCKET = "camaudit-scale"


@dataclass
class ShardTiming:
    claim_s: float = 0.0
    upload_s: float = 0.0
    commit_s: float = 0.0
    lock_wait_s: float = 0.0  # commit_shard's SELECT … FROM runs … FOR UPDATE
    lock_hold_s: float = 0.0  # from that lock to the end of the commit
    rows: int = 0
    objects: int = 0
    bytes: int = 0
    put_s: float = 0.0  # summed over the upload threads
    deadlocks: int = 0  # commits PostgreSQL aborted as deadlocked, then tried again


@dataclass
class RoundResult:
    processes: int
    run_id: str
    shards: int
    wall_s: float
    timings: list[ShardTiming]
    sampled: Sampled
    run_status: str
    load: tuple[float, float, float]

    def total(self, name: str) -> float:
        return float(sum(getattr(t, name) for t in self.timings))

    def mean_ms(self, name: str) -> float:
        return 1000 * self.total(name) / max(1, len(self.timings))

    @property
    def commits_per_s(self) -> float:
        return self.shards / self.wall_s

    @property
    def rows_per_s(self) -> float:
        return self.total("rows") / self.wall_s

    @property
    def objects_per_s(self) -> float:
        return self.total("objects") / self.wall_s

    @property
    def mb_per_s(self) -> float:
        return self.total("bytes") / self.wall_s / 1e6


# ------------------------------------------------------------------------------------ one worker


@dataclass(frozen=True)
class WorkerArgs:
    index: int
    database_url: str
    storage_url: str
    endpoint_url: str | None
    run_id: str
    shard_ids: list[int]
    shape: Shape
    upload_workers: int
    maps: SyntheticMaps


def _worker(args: WorkerArgs, ready: Any, go: Any, out: Any) -> None:
    """One worker process: claim, upload and commit its shards as fast as it can."""
    try:
        out.put((args.index, _work(args, ready, go)))
    except BaseException as exc:  # the parent reports it instead of waiting forever
        out.put((args.index, f"{type(exc).__name__}: {exc}"))
        raise


def _work(args: WorkerArgs, ready: Any, go: Any) -> list[ShardTiming]:
    from schema.settings import Settings
    from workers import shard as shard_module
    from workers.runtime import storage_for
    from workers.shard import ShardOutcome, claim_shard, commit_shard
    from workers.storage import ConcurrentWriter

    settings = Settings(
        database_url=args.database_url,
        storage_url=args.storage_url,
        s3_endpoint_url=args.endpoint_url,
        s3_region="us-east-1",
        device="cpu",
    )
    storage = storage_for(args.storage_url, settings)
    me = f"scale-{args.index}@bench:{os.getpid()}"
    current = ShardTiming()
    lock_run = shard_module._lock_run

    def timed_lock_run(session: Any, run_id: str) -> Any:
        asked = time.monotonic()
        run = lock_run(session, run_id)
        current.lock_wait_s = time.monotonic() - asked
        current.lock_hold_s = -time.monotonic()  # completed when the commit returns
        return run

    shard_module._lock_run = timed_lock_run  # type: ignore[assignment]
    put = storage.put
    put_lock = threading.Lock()

    def timed_put(*a: Any, **kw: Any) -> Any:
        started = time.monotonic()
        try:
            return put(*a, **kw)
        finally:
            with put_lock:
                current.put_s += time.monotonic() - started

    storage.put = timed_put  # type: ignore[method-assign]
    maps = args.maps
    # Rows are built before the clock starts: a real worker builds them while its device
    # computes, on its own host; what is timed here is what all workers share.
    from sqlalchemy import select

    from schema.db import session_scope
    from schema.models import Item, Run, Shard
    from workers.shard import WorkItem

    prepared: list[tuple[int, BuiltShard]] = []
    with session_scope(args.database_url) as session:
        run = session.get(Run, args.run_id)
        assert run is not None
        for shard_id in args.shard_ids:
            index = session.execute(select(Shard.index).where(Shard.id == shard_id)).scalar_one()
            ids = session.execute(
                select(Item.id).where(Item.shard_id == shard_id).order_by(Item.ordinal)
            ).scalars()
            work = SimpleNamespace(
                run_id=args.run_id,
                shard_index=index,
                methods=list(run.methods),
                layers=list(run.layers),
                class_names=list(run.class_names) if run.class_names else None,
                top_k_predictions=5,
                items=[WorkItem(i, "", None) for i in ids],
            )
            prepared.append((shard_id, build_shard(work, args.shape, maps, seed=shard_id)))
    ready.wait()
    go.wait()
    timings = []
    for shard_id, built in prepared:
        current = ShardTiming()
        started = time.monotonic()
        work = claim_shard(args.database_url, args.run_id, shard_id, settings, worker=me)
        if isinstance(work, ShardOutcome):
            raise RuntimeError(f"shard {shard_id} was not claimed: {work.reason}")
        claimed = time.monotonic()
        with ConcurrentWriter(storage, max_workers=args.upload_workers) as writer:
            for key, data in built.objects:
                writer.submit(key, data, "application/x-tar")
            writer.flush()
        uploaded = time.monotonic()
        while True:
            try:
                outcome = commit_shard(args.database_url, work, built.rows)
                break
            except OperationalError as exc:
                # A worker's task would retry the whole shard; the bench retries the commit.
                if not isinstance(exc.orig, psycopg.errors.DeadlockDetected):
                    raise
                current.deadlocks += 1
        done = time.monotonic()
        if outcome.status != "done":
            raise RuntimeError(f"shard {shard_id} did not commit: {outcome}")
        current.claim_s, current.upload_s, current.commit_s = (
            claimed - started,
            uploaded - claimed,
            done - uploaded,
        )
        current.lock_hold_s += done
        current.rows = rows_of(built.rows)
        current.objects = len(built.objects)
        current.bytes = sum(len(data) for _, data in built.objects)
        timings.append(current)
    return timings


# ------------------------------------------------------------------------------------ one round


def plan_synthetic_run(
    database_url: str, storage_url: str, endpoint_url: str | None, n_images: int, shape: Shape, tmp: Path
) -> Any:
    """Plan a run as `camaudit run` would (real rows for run, shards and items); the sources
    are never read, since no model runs."""
    from scheduler.plan import plan_run
    from schema.payloads import RunSpec
    from schema.settings import Settings

    manifest = tmp / f"manifest-{uuid.uuid4().hex[:8]}.jsonl"
    with manifest.open("w") as f:
        for i in range(n_images):
            f.write(json.dumps({"uri": f"images/{i:08d}.jpg"}) + "\n")
    settings = Settings(
        database_url=database_url, storage_url=storage_url, s3_endpoint_url=endpoint_url, device="cpu"
    )
    spec = RunSpec(
        source=str(manifest),
        model="demo",
        methods=list(shape.methods),
        top_patches=shape.top_patches,
        shard_size=shape.images,
        name="scale bench",
    )
    return plan_run(spec, settings)


def run_round(
    database_url: str,
    storage_url: str,
    endpoint_url: str | None,
    processes: int,
    shards_per_process: int,
    shape: Shape = Shape(),
    *,
    s3_pid: int | None = None,
    upload_workers: int = 16,
    prior_shards: int = 0,
    time_limit_s: float = 900.0,
    tmp: Path | None = None,
) -> RoundResult:
    """Plan one run of ``processes * shards_per_process`` shards and commit them from N processes.

    ``prior_shards`` more shards of the run are recorded as done already (rows of the shards
    table only): the state late in a long night, when every commit's run row has that many
    shards under it. A round still running after ``time_limit_s`` raises :class:`RoundStalled`.
    """
    from schema.db import dispose_engines, session_scope
    from schema.models import Run

    with tempfile.TemporaryDirectory() as scratch:
        planned = plan_synthetic_run(
            database_url,
            storage_url,
            endpoint_url,
            processes * shards_per_process * shape.images,
            shape,
            tmp or Path(scratch),
        )
    if prior_shards:
        add_done_shards(database_url, planned.run_id, prior_shards, shape.images)
    # Forked, so the workers start at once with everything imported; the parent's pooled
    # connections are closed first, and the workers run no torch code (the maps are made here).
    dispose_engines()
    maps = synthetic_maps(shape, seed=0)
    ctx = mp.get_context("fork")
    ready = ctx.Barrier(processes + 1)
    go = ctx.Barrier(processes + 1)
    out = ctx.Queue()
    children = [
        ctx.Process(
            target=_worker,
            args=(
                WorkerArgs(
                    index=p,
                    database_url=database_url,
                    storage_url=storage_url,
                    endpoint_url=endpoint_url,
                    run_id=planned.run_id,
                    shard_ids=planned.shard_ids[p::processes],
                    shape=shape,
                    upload_workers=upload_workers,
                    maps=maps,
                ),
                ready,
                go,
                out,
            ),
            daemon=True,
        )
        for p in range(processes)
    ]
    for child in children:
        child.start()
    started = time.monotonic()
    try:
        ready.wait(timeout=600)
        load = os.getloadavg()
        with Sampler(database_url, s3_pid) as sampler:
            go.wait(timeout=60)
            started = time.monotonic()
            results: dict[int, list[ShardTiming]] = {}
            while len(results) < processes:
                try:
                    index, got = out.get(timeout=max(0.1, started + time_limit_s - time.monotonic()))
                except queue.Empty:
                    raise RoundStalled(stalled(database_url, planned.run_id, time_limit_s)) from None
                if isinstance(got, str):
                    raise RuntimeError(f"worker {index} failed: {got}")
                results[index] = got
            wall = time.monotonic() - started
    finally:
        for child in children:
            child.join(timeout=0 if time.monotonic() > started + time_limit_s else 60)
            if child.is_alive():
                child.terminate()
                child.join(timeout=30)
    with session_scope(database_url) as session:
        run = session.get(Run, planned.run_id)
        assert run is not None
        status = run.status
    return RoundResult(
        processes=processes,
        run_id=planned.run_id,
        shards=len(planned.shard_ids),
        wall_s=wall,
        timings=[t for index in sorted(results) for t in results[index]],
        sampled=sampler.result,
        run_status=status,
        load=load,
    )


class RoundStalled(RuntimeError):
    """The workers did not commit every shard in time; the message says how far they got."""


def stalled(database_url: str, run_id: str, time_limit_s: float) -> str:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            done, total = conn.execute(
                text(
                    "select count(*) filter (where status = 'done'), count(*) from shards where run_id = :r"
                ),
                {"r": run_id},
            ).one()
            deadlocks = conn.execute(
                text("select deadlocks from pg_stat_database where datname = current_database()")
            ).scalar_one()
    finally:
        engine.dispose()
    return (
        f"stalled: {done} of {total} shards committed after {time_limit_s:g} s; "
        f"{deadlocks} deadlocks in this database so far"
    )


def add_done_shards(database_url: str, run_id: str, count: int, images: int) -> None:
    """Shards (and their counts on the run) as if ``count`` shards had committed before."""
    from sqlalchemy import func, insert, select

    from schema.db import session_scope
    from schema.models import Run, Shard, ShardStatus

    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        first = session.execute(select(func.max(Shard.index)).where(Shard.run_id == run_id)).scalar_one() + 1
        for start in range(0, count, 5000):
            session.execute(
                insert(Shard),
                [
                    {
                        "run_id": run_id,
                        "index": first + i,
                        "status": ShardStatus.DONE,
                        "n_items": images,
                        "n_done": images,
                        "attempts": 1,
                    }
                    for i in range(start, min(count, start + 5000))
                ],
            )
        run.n_shards += count
        run.n_items += count * images
        run.shards_done += count  # the counters their commits would have added
        run.n_done += count * images


# ------------------------------------------------------------------------------------ servers


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"camaudit_scale_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        from schema.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def s3_server(rtt_ms: float) -> Iterator[tuple[str, int | None]]:
    """A moto S3 server (its pid, for its CPU time), behind a delaying proxy when ``rtt_ms``."""
    from tests.plugins.s3 import DUMMY_AWS_ENV, MotoServer, TcpProxy

    os.environ.update(DUMMY_AWS_ENV)
    with MotoServer() as server:
        pid = server._process.pid if server._process else None
        if not rtt_ms:
            yield server.url, pid
            return
        upstream = urlsplit(server.url)
        with TcpProxy(
            upstream.hostname or "127.0.0.1", upstream.port or 80, one_way_delay_s=rtt_ms / 2000
        ) as proxy:
            yield proxy.url, pid


# ------------------------------------------------------------------------------------- report


def flattening(results: list[RoundResult]) -> str:
    """The first N at which the workers get less than half of N times one worker's commits/s
    (parallel efficiency below 0.5), and what the backends waited on there."""
    base = results[0].commits_per_s
    for r in results[1:]:
        efficiency = r.commits_per_s / (r.processes * base)
        if efficiency < 0.5:
            waits = r.sampled.waits.most_common(3)
            shown = ", ".join(f"{what} {n / max(1, r.sampled.samples):.2f}" for what, n in waits) or "nothing"
            return (
                f"flattens at N={r.processes}: x{r.commits_per_s / base:.2f} of N=1's commits/s "
                f"(efficiency {efficiency:.2f}); mean backends waiting there: {shown}"
            )
    return f"no flattening up to N={results[-1].processes} (efficiency stays >= 0.5)"


def report(results: list[RoundResult], describe: str) -> None:
    base = results[0]
    print(f"\n{describe}")
    head = (
        f"{'N':>2} {'shards':>6} {'wall s':>7} {'commits/s':>9} {'rows/s':>8} {'objects/s':>9} {'MB/s':>6} "
        f"{'x N=1':>6} {'claim ms':>8} {'upload ms':>9} {'commit ms':>9} {'lock wait':>9} {'lock hold':>9} "
        f"{'PG cpu ms':>9} {'S3 cpu ms':>9} {'WAL MB':>7} {'deadlk':>6} {'load':>5}"
    )
    print(head)
    for r in results:
        per = 1000 / r.shards
        print(
            f"{r.processes:>2} {r.shards:>6} {r.wall_s:>7.2f} {r.commits_per_s:>9.2f} {r.rows_per_s:>8.0f} "
            f"{r.objects_per_s:>9.1f} {r.mb_per_s:>6.1f} {r.commits_per_s / base.commits_per_s:>6.2f} "
            f"{r.mean_ms('claim_s'):>8.1f} {r.mean_ms('upload_s'):>9.1f} {r.mean_ms('commit_s'):>9.1f} "
            f"{r.mean_ms('lock_wait_s'):>9.1f} {r.mean_ms('lock_hold_s'):>9.1f} "
            f"{r.sampled.pg_cpu_s * per:>9.1f} {r.sampled.s3_cpu_s * per:>9.1f} "
            f"{r.sampled.wal_bytes / r.shards / 1e6:>7.2f} {int(r.total('deadlocks')):>6} {r.load[0]:>5.1f}"
        )
    print("per shard: claim/upload/commit/lock/CPU ms are means; WAL is cluster-wide per shard")
    for r in results:
        waits = ", ".join(
            f"{what} {n / max(1, r.sampled.samples):.2f}" for what, n in r.sampled.waits.most_common(5)
        )
        active = r.sampled.active / max(1, r.sampled.samples)
        print(f"N={r.processes}: mean active backends {active:.2f}; waiting on: {waits or 'nothing'}")
    print(flattening(results))


def table_sizes(database_url: str) -> list[tuple[str, int, int]]:
    """(table, rows, bytes with indexes and TOAST) of the tables a shard commit writes."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [
                (
                    table,
                    int(conn.execute(text(f"select count(*) from {table}")).scalar_one()),
                    int(conn.execute(text(f"select pg_total_relation_size('{table}')")).scalar_one()),
                )
                for table in ("items", "heatmaps", "patch_scores", "shards")
            ]
    finally:
        engine.dispose()


def best(rounds: list[RoundResult]) -> RoundResult:
    return max(rounds, key=lambda r: r.commits_per_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--shards", type=int, default=4, help="shards per process per round")
    parser.add_argument("--images", type=int, default=256, help="images per shard")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per N; the best counts")
    parser.add_argument(
        "--rtt-ms", type=float, default=0.0, help="round trip the proxy adds to S3 (0: direct)"
    )
    parser.add_argument(
        "--upload-workers", type=int, default=16, help="upload threads per worker (S3 default)"
    )
    parser.add_argument("--time-limit", type=float, default=600, help="seconds a round may take")
    parser.add_argument(
        "--prior-shards",
        type=int,
        default=0,
        help="shards of the run recorded as done before (39063: 10M images)",
    )
    parser.add_argument(
        "--admin-url", default=DEFAULT_ADMIN_URL, help="a PostgreSQL database to create one in"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.processes.split(",")]
    shape = Shape(images=args.images)
    maps = synthetic_maps(shape, seed=0)
    png = sum(map(len, maps.png)) / len(maps.png)
    npy = sum(map(len, maps.npy)) / len(maps.npy)
    distinct = len(maps.png)
    tar_bytes = len(
        build_tar(
            {
                f"{sample_key(i, 0)}.{ext}": data
                for i in range(shape.images)
                for ext, data in (("png", maps.png[i % distinct]), ("npy", maps.npy[i % distinct]))
            }
        )[0]
    )
    print(
        f"one map: PNG {png:.0f} B ({shape.map_side} px) + npy {npy:.0f} B "
        f"({shape.raw_side} x {shape.raw_side} "
        f"float16); one shard: {shape.images} images x {len(shape.methods)} methods, top-{shape.top_patches} "
        f"patches, {len(shape.methods)} tars of {tar_bytes / 1e6:.2f} MB "
        f"({tar_bytes / shape.images:.0f} B per map)"
    )
    with s3_server(args.rtt_ms) as (endpoint, s3_pid), fresh_database(args.admin_url) as database_url:
        storage_url = f"s3://{BUCKET}/scale"
        results = []
        for n in counts:
            rounds = []
            for _ in range(args.rounds):
                try:
                    r = run_round(
                        database_url,
                        storage_url,
                        endpoint,
                        n,
                        args.shards,
                        shape,
                        s3_pid=s3_pid,
                        upload_workers=args.upload_workers,
                        prior_shards=args.prior_shards,
                        time_limit_s=args.time_limit,
                    )
                except RoundStalled as exc:
                    print(f"  N={n}: {exc}", flush=True)
                    break
                if r.run_status != "finished":
                    print(f"run {r.run_id} ended {r.run_status}, not finished", file=sys.stderr)
                    return 1
                print(
                    f"  N={n}: {r.commits_per_s:.2f} commits/s, {r.rows_per_s:.0f} rows/s "
                    f"(load {r.load[0]:.1f})",
                    flush=True,
                )
                rounds.append(r)
            if not rounds:
                break  # more workers would stall as well
            results.append(best(rounds))
        where = f"moto S3 behind a {args.rtt_ms:g} ms RTT proxy" if args.rtt_ms else "moto S3, direct"
        if not results:
            return 1
        report(
            results,
            f"PostgreSQL {make_url(database_url).host}:{make_url(database_url).port}, {where}; "
            f"best of {args.rounds} rounds"
            + (f"; {args.prior_shards} shards of each run done before" if args.prior_shards else ""),
        )
        for table, rows, size in table_sizes(database_url):
            print(
                f"{table}: {rows} rows, {size / 1e6:.1f} MB with indexes, {size / max(1, rows):.0f} B per row"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
