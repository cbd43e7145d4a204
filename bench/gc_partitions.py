"""Deleting a run by dropping its partitions against today's batched delete, and top-100 with pruning.

Builds two identical runs in a fresh PostgreSQL database (filled with ``generate_series``,
server side), each with ``--patch-rows`` patch scores (5 per heatmap, 2 methods, 10 classes),
then:

- the top-100 regions of one class and method of the first run (``scheduler.query.top_regions``,
  median of ``--repeats``), and the plan's partitions (one expected);
- ``gc_run`` of the first run: its partitions are detached and dropped;
- the batched delete ``gc`` used before partitioning (``DELETE … WHERE id IN (SELECT … LIMIT
  10000)`` per transaction) of the second, identical run, with the dead tuples and the disk
  space it leaves behind until a VACUUM.

Usage::

    PYTHONPATH=. python bench/gc_partitions.py --patch-rows 10000000

The database (default ``camaudit_bench_gc`` on the test cluster) is dropped and re-created.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text

from schema.db import dispose_engines, get_engine, session_scope, upgrade
from schema.models import Run, RunStatus

ADMIN_URL = os.environ.get("CAMAUDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/test")
CLASSES = [f"class{n}" for n in range(10)]
PATCHES_PER_HEATMAP = 5
METHODS = ("gradcam", "cam")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f}"


def fresh_database(name: str) -> str:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def make_run(url: str, run_id: str, output: str, n_items: int, shard_size: int) -> None:
    """The run row (its partitions come with it) and its shards."""
    n_shards = (n_items + shard_size - 1) // shard_size
    with session_scope(url) as session:
        session.add(
            Run(
                id=run_id,
                name=run_id,
                status=RunStatus.FINISHED,
                model_ref="demo",
                methods=list(METHODS),
                layers=["layer4"],
                target_spec="top1",
                source_uri="data",
                output_uri=output,
                preprocess={"size": [224, 224]},
                patch_size=32,
                top_patches=PATCHES_PER_HEATMAP,
                class_names=CLASSES,
                config={},
                versions={},
                n_items=n_items,
                n_shards=n_shards,
            )
        )
        session.flush()
        session.execute(
            text(
                'INSERT INTO shards (run_id, "index", status, n_items, n_done, n_failed, '
                "attempts, lost_leases) "
                "SELECT :run, s, 'done', :size, :size, 0, 1, 0 FROM generate_series(0, :n - 1) s"
            ),
            {"run": run_id, "size": shard_size, "n": n_shards},
        )


def bare(conn: Any, table: str, run_id: str) -> tuple[str, str]:
    """Detach the run's (empty) partition of ``table`` and strip its keys and indexes for a bulk load."""
    from schema.partitions import ddl, run_partitions

    name = run_partitions(conn, table, run_id)[0]
    ddl(conn, f'ALTER TABLE {table} DETACH PARTITION "{name}"')
    for (constraint,) in conn.execute(
        text(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid = to_regclass(:n) AND contype IN ('p', 'u', 'f')"
        ),
        {"n": f'"{name}"'},
    ).all():
        ddl(conn, f'ALTER TABLE "{name}" DROP CONSTRAINT "{constraint}"')
    for (index,) in conn.execute(
        text("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = to_regclass(:n)"),
        {"n": f'"{name}"'},
    ).all():
        ddl(conn, f"DROP INDEX {index}")
    return table, name


def dress(conn: Any, table: str, name: str, run_id: str) -> None:
    """Attach the loaded partition again: its indexes and keys are built once, from the rows."""
    from schema.partitions import ddl

    ddl(conn, f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_run" CHECK (run_id = \'{run_id}\')')
    ddl(conn, f"ALTER TABLE {table} ATTACH PARTITION \"{name}\" FOR VALUES IN ('{run_id}')")
    ddl(conn, f'ALTER TABLE "{name}" DROP CONSTRAINT "{name}_run"')


def fill(url: str, run_id: str, n_patches: int, base: int, shard_size: int) -> None:
    """Items, heatmaps and patch scores of one run, written server side; ids start after ``base``.

    The run's partitions are loaded detached and bare, then attached (indexes built once,
    from the rows) and vacuumed: the state a run is in days after its night, when
    retention deletes it.
    """
    n_heatmaps = n_patches // PATCHES_PER_HEATMAP
    n_items = n_heatmaps // len(METHODS)
    with get_engine(url).begin() as conn:
        conn.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
        stripped = [bare(conn, table, run_id) for table in ("items", "heatmaps", "patch_scores")]
        into = {table: f'"{name}"' for table, name in stripped}
        first_shard = conn.execute(
            text("SELECT min(id) FROM shards WHERE run_id = :r"), {"r": run_id}
        ).scalar()
        conn.execute(
            text(
                f"INSERT INTO {into['items']} (id, run_id, shard_id, ordinal, source_uri, label, status, "
                "pred_class, correct) "
                "SELECT :base + i, :run, :shard + i / :size, i, 'data/' || i || '.jpg', 'class' || (i % 10), "
                "'done', i % 10, (i % 7) <> 0 FROM generate_series(0, :n - 1) i"
            ),
            {"base": base, "run": run_id, "shard": first_shard, "size": shard_size, "n": n_items},
        )
        conn.execute(
            text(
                f"INSERT INTO {into['heatmaps']} (id, item_id, run_id, method, layer, target_class, "
                "target_score, "
                "object_key, "
                "raw_key, sha256, raw_max, raw_mean, map_mean, top_patch_fraction) "
                "SELECT :base + h, :base + h / 2, CAST(:run AS text), "
                "CASE WHEN h % 2 = 0 THEN 'gradcam' ELSE 'cam' END, "
                "'layer4', (h / 2) % 10, random(), 'runs/' || CAST(:run AS text) || '/' || h || '.png', "
                "'runs/' || CAST(:run AS text) || '/' || h || '.npy', md5(h::text) || md5(h::text), "
                "random() * 10, random(), "
                "random(), random() FROM generate_series(0, :n - 1) h"
            ),
            {"base": base, "run": run_id, "n": n_heatmaps},
        )
        conn.execute(
            text(
                f"INSERT INTO {into['patch_scores']} (id, heatmap_id, run_id, item_id, method, layer, "
                "target_class, "
                "rank, "
                '"row", col, x0, y0, x1, y1, score) '
                "SELECT :base + g, :base + g / 5, :run, :base + g / 10, "
                "CASE WHEN (g / 5) % 2 = 0 THEN 'gradcam' ELSE 'cam' END, 'layer4', (g / 10) % 10, g % 5, "
                "g % 7, g % 7, (g % 7) * 32, (g % 7) * 32, (g % 7) * 32 + 32, (g % 7) * 32 + 32, random() "
                "FROM generate_series(0, :n - 1) g"
            ),
            {"base": base, "run": run_id, "n": n_patches},
        )
        for table, name in stripped:
            dress(conn, table, name, run_id)
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for _, name in stripped:
            conn.execute(text(f'VACUUM ANALYZE "{name}"'))  # what autovacuum does after a load


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def top_sql_times(url: str, run_id: str, repeats: int) -> list[float]:
    """The top-100 statement of ``top_regions`` alone, without the run lookup and checks around it."""
    from scheduler.query import RegionFilters, get_run, top_regions_statement

    run = get_run(url, run_id)
    stmt = top_regions_statement(
        run, 3, "gradcam", layer=None, limit=100, filters=RegionFilters(None, None, None, None, None)
    )
    times = []
    with get_engine(url).connect() as conn:
        conn.execute(text("SET max_parallel_workers_per_gather = 0"))  # as top_regions sends it
        for _ in range(repeats):
            seconds, rows = timed(lambda: conn.execute(stmt).all())
            assert len(rows) == 100
            times.append(seconds)
    return times


def partition_of(url: str, table: str, run_id: str) -> str:
    from schema.partitions import run_partitions

    with get_engine(url).connect() as conn:
        return run_partitions(conn, table, run_id)[0]


def space(url: str, name: str) -> tuple[int, int, int]:
    """(live rows, dead rows, bytes on disk with indexes) of one partition."""
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        live, dead = conn.execute(
            text("SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relname = :n"), {"n": name}
        ).one()
        size = conn.execute(
            text("SELECT pg_total_relation_size(to_regclass(:n))"), {"n": f'"{name}"'}
        ).scalar()
    return int(live), int(dead), int(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch-rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--database", default="camaudit_bench_gc")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the batched delete")
    parser.add_argument("--no-analyze", action="store_true", help="leave the parents unanalysed")
    args = parser.parse_args()
    url = fresh_database(args.database)
    upgrade(url)
    n_items = args.patch_rows // PATCHES_PER_HEATMAP // len(METHODS)
    output = tempfile.mkdtemp(prefix="camaudit-bench-gc-")
    runs = (
        {"dropped": "benchdrop"} if args.skip_baseline else {"dropped": "benchdrop", "deleted": "benchdelete"}
    )
    print(f"# {args.patch_rows:,} patch scores, {args.patch_rows // 5:,} heatmaps, {n_items:,} items per run")
    for n, run_id in enumerate(runs.values()):
        make_run(url, run_id, output, n_items, args.shard_size)
        seconds, _ = timed(
            lambda r=run_id, n=n: fill(url, r, args.patch_rows, n * args.patch_rows, args.shard_size)
        )
        print(f"fill {run_id}: {seconds:.1f} s ({load()})")
    if not args.no_analyze:
        from schema.partitions import analyze_parents

        with get_engine(url).begin() as conn:  # what the finalisation of each run does
            seconds, _ = timed(lambda: analyze_parents(conn))
        print(f"ANALYZE of the partitioned parents: {seconds:.1f} s ({load()})")

    from scheduler.query import explain_top_regions, top_regions

    target = runs["dropped"]
    times = []
    for _ in range(args.repeats):
        seconds, regions = timed(lambda: top_regions(url, target, "class3", "gradcam", limit=100))
        times.append(seconds)
    assert len(regions) == 100
    sql_times = top_sql_times(url, target, args.repeats)
    plan = explain_top_regions(url, target, "class3", "gradcam", limit=100)
    scanned = sorted({word for line in plan.splitlines() for word in line.split() if "_r_bench" in word})
    print(
        f"top-100 one class (top_regions): median {statistics.median(times) * 1000:.1f} ms, "
        f"best {min(times) * 1000:.1f} ms "
        f"over {args.repeats} ({load()}); partitions in the plan: {', '.join(scanned)}"
    )
    print(
        f"  the statement alone on an open connection: median {statistics.median(sql_times) * 1000:.2f} ms, "
        f"best {min(sql_times) * 1000:.2f} ms ({load()})"
    )

    from scheduler.gc import _TABLES, _delete_batches, gc_run

    steps: list[tuple[str, float]] = []
    started = time.perf_counter()
    seconds, report = timed(
        lambda: gc_run(url, target, progress=lambda s, n: steps.append((s, time.perf_counter())))
    )
    marks = [f"{step} at {(at - started) * 1000:.0f} ms" for step, at in steps]
    print("  gc steps: " + ", ".join(marks))
    print(
        f"gc --run {target} (partition drop): {seconds:.3f} s, rows {report.rows} "
        f"(estimated: {sorted(report.estimated)}) ({load()})"
    )

    if args.skip_baseline:
        drop_database(args.database)
        return
    other = runs["deleted"]
    parts = {table: partition_of(url, table, other) for table in ("patch_scores", "heatmaps", "items")}
    before = {table: space(url, name) for table, name in parts.items()}
    start = time.perf_counter()
    for name, model, column in _TABLES[:3]:
        _delete_batches(url, name, model, column, other, 10_000, None)
    batched = time.perf_counter() - start
    after = {table: space(url, name) for table, name in parts.items()}
    print(f"batched delete of {other} (10,000 rows per transaction): {batched:.1f} s ({load()})")
    for table in parts:
        print(
            f"  {table}: {before[table][2] / 2**20:.0f} MiB before, {after[table][2] / 2**20:.0f} MiB after, "
            f"{after[table][1]:,} dead tuples left for VACUUM"
        )
    print(f"ratio batched / partition drop: {batched / seconds:.0f}x ({load()})")
    drop_database(args.database)


def drop_database(name: str) -> None:
    dispose_engines()
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


if __name__ == "__main__":
    main()
