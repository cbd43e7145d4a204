"""Result storage at production scale: shard writes, the top-regions query, S3 uploads.

Three figures decide whether a nightly audit keeps up:

* patch-score rows per second written to PostgreSQL through ``workers.results``, one
  transaction per shard exactly as ``workers.shard.commit_shard`` issues them (binary COPY +
  merge), against multi-row ``INSERT … ON CONFLICT`` (the baseline), and for a re-run of the
  same shards (every row conflicts);
* latency of ``top_regions`` (top-100 of one class and method) over ``--rows`` patch-score rows,
  loaded with ``generate_series`` straight into the tables, after ANALYZE, warm;
* uploads per second to S3, concurrent against sequential (``bench/storage_s3.py``).

    python bench/storage.py [--rows 10000000] [--shards 20] [--skip-s3]

It creates its own database next to ``--postgres-url`` and drops it at the end. Exits
non-zero when a floor is missed (``--min-write-rate`` rows/s, ``--max-query-ms``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text

# Run as a script from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import storage_s3
from scheduler.query import explain_top_regions, top_regions
from schema.db import dispose_engines, get_engine, normalise_url, session_scope, upgrade
from schema.models import Item, Run, Shard
from schema.partitions import create_run_partitions
from workers import results

CLASS_NAMES = [f"class_{c:04d}" for c in range(1000)]
METHODS = ["gradcam", "cam"]
LAYER = "layer4"


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A database of the benchmark's own, dropped afterwards whatever happens."""
    admin = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    name = f"camaudit_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = normalise_url(admin_url).rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def add_run(url: str, run_id: str, n_items: int, shard_items: int) -> dict[int, list[int]]:
    """Run, shards and items as the planner writes them; returns item ids by shard id."""
    n_shards = (n_items + shard_items - 1) // shard_items
    with session_scope(url) as session:
        session.add(
            Run(
                id=run_id,
                status="finished",
                model_ref="bench",
                methods=METHODS,
                layers=[LAYER],
                target_spec="top1",
                source_uri="bench",
                output_uri="bench-output",
                preprocess={},
                patch_size=32,
                top_patches=5,
                class_names=CLASS_NAMES,
                config={},
                versions={},
                n_items=n_items,
                n_shards=n_shards,
            )
        )
        session.flush()
        shard_ids = list(
            session.execute(
                insert(Shard).returning(Shard.id, sort_by_parameter_order=True),
                [{"run_id": run_id, "index": s, "n_items": shard_items} for s in range(n_shards)],
            ).scalars()
        )
        item_ids = list(
            session.execute(
                insert(Item).returning(Item.id, sort_by_parameter_order=True),
                [
                    {
                        "run_id": run_id,
                        "shard_id": shard_ids[n // shard_items],
                        "ordinal": n,
                        "source_uri": f"s3://bench/images/{n:08d}.jpg",
                        "label": CLASS_NAMES[n % len(CLASS_NAMES)],
                    }
                    for n in range(n_items)
                ],
            ).scalars()
        )
    by_shard: dict[int, list[int]] = {}
    for n, item_id in enumerate(item_ids):
        by_shard.setdefault(shard_ids[n // shard_items], []).append(item_id)
    return by_shard


@dataclass
class ShardRows:
    items: list[dict[str, Any]]
    heatmaps: list[dict[str, Any]]
    patches: list[tuple[tuple[int, str, str, int], dict[str, Any]]]


def make_shard(run_id: str, item_ids: list[int], patches: int, seed: int) -> ShardRows:
    """What ``workers.shard`` hands to ``commit_shard`` for top-1 targets and two methods."""
    rng = random.Random(seed)
    rows = ShardRows([], [], [])
    for item_id in item_ids:
        pred = rng.randrange(len(CLASS_NAMES))
        rows.items.append(
            {
                "id": item_id,
                "status": "done",
                "error": None,
                "width": 640,
                "height": 480,
                "predictions": [{"class": pred, "name": CLASS_NAMES[pred], "prob": rng.random()}],
                "pred_class": pred,
                "correct": rng.random() < 0.8,
            }
        )
        for method in METHODS:
            key = f"runs/{run_id}/{method}/{LAYER}/{item_id}/{pred}"
            rows.heatmaps.append(
                {
                    "item_id": item_id,
                    "run_id": run_id,
                    "method": method,
                    "layer": LAYER,
                    "target_class": pred,
                    "target_score": rng.gauss(5, 2),
                    "object_key": key + ".png",
                    "raw_key": key + ".npy",
                    "sha256": f"{rng.getrandbits(256):064x}",
                    "raw_max": rng.random() * 10,
                    "raw_mean": rng.random(),
                    "map_mean": rng.random(),
                    "top_patch_fraction": rng.random(),
                    "box_energy": rng.random(),
                    "box_hit": rng.random() < 0.5,
                    "outside_mass": rng.random(),
                    "border_share": rng.random(),
                }
            )
            scores = sorted((rng.random() for _ in range(patches)), reverse=True)
            for rank, score in enumerate(scores):
                row, col = rng.randrange(7), rng.randrange(7)
                rows.patches.append(
                    (
                        (item_id, method, LAYER, pred),
                        {
                            "run_id": run_id,
                            "item_id": item_id,
                            "method": method,
                            "layer": LAYER,
                            "target_class": pred,
                            "rank": rank,
                            "row": row,
                            "col": col,
                            "x0": col * 91,
                            "y0": row * 68,
                            "x1": col * 91 + 91,
                            "y1": row * 68 + 68,
                            "score": score,
                        },
                    )
                )
    return rows


def commit(url: str, rows: ShardRows, patches: int, mode: results.WriteMode) -> tuple[float, float]:
    """The result writes of one shard in one transaction; returns (transaction s, patch-score s)."""
    start = time.perf_counter()
    with session_scope(url) as session:
        results.update_items(session, rows.items, mode=mode)
        ids = results.upsert_heatmaps(session, rows.heatmaps, mode=mode)
        results.delete_stale_patch_scores(session, list(ids.values()), patches)
        patch_rows = [{"heatmap_id": ids[key], **row} for key, row in rows.patches]
        patch_start = time.perf_counter()
        results.upsert_patch_scores(session, patch_rows, mode=mode)
        patch_s = time.perf_counter() - patch_start
    return time.perf_counter() - start, patch_s


def bench_writes(url: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Rows/s of whole shard transactions and of the patch-score statement alone, per mode."""
    n_items = args.shards * args.shard_items
    rates: dict[str, tuple[float, float]] = {}
    passes: list[tuple[str, str, results.WriteMode]] = [
        ("values (baseline)", "w-values", "values"),
        ("copy", "w-copy", "copy"),
        ("copy, re-run", "w-copy", "copy"),
    ]
    prepared: dict[str, list[ShardRows]] = {}
    for run_id in ("w-values", "w-copy"):
        by_shard = add_run(url, run_id, n_items, args.shard_items)
        prepared[run_id] = [
            make_shard(run_id, ids, args.patches, seed=n) for n, ids in enumerate(by_shard.values())
        ]
    warm = add_run(url, "w-warm", args.shard_items, args.shard_items)
    for mode in ("values", "copy"):
        commit(url, make_shard("w-warm", next(iter(warm.values())), args.patches, 0), args.patches, mode)
    for name, run_id, mode in passes:
        shards = prepared[run_id]
        total = patch = 0.0
        for rows in shards:
            t, p = commit(url, rows, args.patches, mode)
            total += t
            patch += p
        count = sum(len(r.patches) for r in shards)
        rates[name] = (count / total, count / patch)
    return rates


# The top-1 class of item n: its label (class n * 7919 mod C), except every fifth item, which is wrong.
PRED = "CASE WHEN {n} % 5 = 0 THEN ({n} * 104729) % :classes ELSE ({n} * 7919) % :classes END"
LOAD_SQL = [
    "SET synchronous_commit = off",
    "SET maintenance_work_mem = '512MB'",
    """INSERT INTO runs (id, name, status, model_ref, methods, layers, target_spec, source_uri,
            output_uri, preprocess, patch_size, top_patches, class_names, config, versions,
            n_items, n_shards, n_done, n_failed, shards_done, shards_failed, created_at)
       VALUES (:run, 'query benchmark', 'finished', 'bench', '["gradcam", "cam"]', '["layer4"]', 'top1',
               'bench', 'bench-output', '{}', 32, :patches, CAST(:names AS json), '{}', '{}',
               :items, :shards, :items, 0, :shards, 0, now())""",
    """INSERT INTO shards (id, run_id, index, status, n_items, n_done, n_failed, attempts)
       SELECT :shard0 + s, :run, s, 'done', 256, 256, 0, 1 FROM generate_series(0, :shards - 1) AS s""",
    f"""INSERT INTO items (id, run_id, shard_id, ordinal, source_uri, label, status, width, height,
            pred_class, correct)
       SELECT :item0 + n, :run, :shard0 + n / 256, n, 's3://bench/images/' || n || '.jpg',
              'class_' || lpad(((n * 7919) % :classes)::text, 4, '0'), 'done', 640, 480,
              {PRED.format(n="n")}, n % 5 <> 0
       FROM generate_series(CAST(0 AS bigint), :items - 1) AS n""",
    f"""INSERT INTO heatmaps (id, item_id, run_id, method, layer, target_class, target_score, object_key,
            raw_key, sha256, raw_max, raw_mean, map_mean, top_patch_fraction)
       SELECT :heat0 + h, :item0 + h / 2, :run, m.name, 'layer4', {PRED.format(n="(h / 2)")}, 5.0,
              CAST(:prefix AS text) || m.name || '/layer4/' || (:item0 + h / 2) || '.png',
              CAST(:prefix AS text) || m.name || '/layer4/' || (:item0 + h / 2) || '.npy',
              md5(h::text) || md5(h::text), 1.0, 0.5, 0.5, 0.2
       FROM generate_series(CAST(0 AS bigint), :heatmaps - 1) AS h
       JOIN (VALUES (0, 'gradcam'), (1, 'cam')) AS m(k, name) ON m.k = h % 2""",
    f"""INSERT INTO patch_scores (id, heatmap_id, run_id, item_id, method, layer, target_class, rank,
            "row", col, x0, y0, x1, y1, score)
       SELECT :patch0 + p, :heat0 + p / :patches, :run, :item0 + p / (2 * :patches),
              CASE WHEN (p / :patches) % 2 = 0 THEN 'gradcam' ELSE 'cam' END, 'layer4',
              {PRED.format(n="(p / (2 * :patches))")}, p % :patches, p % 7, (p / 7) % 7,
              0, 0, 91, 68, random()
       FROM generate_series(CAST(0 AS bigint), :rows - 1) AS p""",
]
# Secondary structures built after the load: building an index once is far cheaper than
# maintaining it row by row, and one FK validation join beats ten million trigger calls.
DROP_SQL = [
    "ALTER TABLE patch_scores DROP CONSTRAINT uq_patch_scores_run_id_heatmap_id_rank",
    "DROP INDEX ix_patch_scores_top",
]
REBUILD_SQL = [
    "ALTER TABLE patch_scores ADD CONSTRAINT uq_patch_scores_run_id_heatmap_id_rank "
    "UNIQUE (run_id, heatmap_id, rank)",
    "CREATE INDEX ix_patch_scores_top ON patch_scores (run_id, method, target_class, score)",
    "SELECT setval(pg_get_serial_sequence('shards', 'id'), (SELECT max(id) FROM shards))",
    "SELECT setval(pg_get_serial_sequence('items', 'id'), (SELECT max(id) FROM items))",
    "SELECT setval(pg_get_serial_sequence('heatmaps', 'id'), (SELECT max(id) FROM heatmaps))",
    "SELECT setval(pg_get_serial_sequence('patch_scores', 'id'), (SELECT max(id) FROM patch_scores))",
]


def load_rows(url: str, run_id: str, rows: int, patches: int, classes: int) -> float:
    """``rows`` patch scores of top-1 heatmaps (2 methods) over ``classes`` classes; returns seconds."""
    heatmaps = -(-rows // patches)
    items = -(-heatmaps // 2)
    shards = -(-items // 256)
    start = time.perf_counter()
    with get_engine(url).begin() as conn:
        base = {
            name: conn.execute(text(f"SELECT coalesce(max(id), 0) + 1 FROM {name}")).scalar_one()
            for name in ("shards", "items", "heatmaps", "patch_scores")
        }
        params = {
            "run": run_id,
            "prefix": f"runs/{run_id}/",
            "rows": rows,
            "patches": patches,
            "heatmaps": heatmaps,
            "items": items,
            "shards": shards,
            "classes": classes,
            "names": json.dumps(CLASS_NAMES[:classes]),
            "shard0": base["shards"],
            "item0": base["items"],
            "heat0": base["heatmaps"],
            "patch0": base["patch_scores"],
        }
        for sql in DROP_SQL:
            conn.execute(text(sql))
        for sql in LOAD_SQL:
            conn.execute(text(sql), {k: v for k, v in params.items() if f":{k}" in sql})
            if sql.lstrip().startswith("INSERT INTO runs"):
                # The run row went in by SQL, past the ORM event that makes its partitions.
                create_run_partitions(conn, run_id)
        for sql in REBUILD_SQL:
            conn.execute(text(sql))
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    return time.perf_counter() - start


def timed(repeats: int, call: Any) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def bench_query(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    run_id = "q-run"
    seconds = load_rows(url, run_id, args.rows, args.patches, args.classes)
    with get_engine(url).connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM patch_scores")).scalar_one()
        of_class = conn.execute(
            text(
                "SELECT count(*) FROM patch_scores"
                " WHERE run_id = :r AND method = 'gradcam' AND target_class = 7"
            ),
            {"r": run_id},
        ).scalar_one()
    print(
        f"loaded {args.rows:,} patch-score rows in {seconds:.1f} s (indexes and ANALYZE included); "
        f"patch_scores holds {total:,} rows, {of_class:,} of them gradcam / class 7"
    )
    questions = {
        "top-100 of one class": {},
        "  + --incorrect": {"correct": False},
        "  + --label": {"label": CLASS_NAMES[7]},
        "  + --min-score 0.5": {"min_score": 0.5},
    }
    latencies: dict[str, list[float]] = {}
    for name, filters in questions.items():

        def ask(filters: dict[str, Any] = filters) -> None:
            top_regions(url, run_id, CLASS_NAMES[7], "gradcam", limit=100, **filters)

        timed(3, ask)  # warm: connection pool, catalog and buffer caches
        latencies[name] = timed(args.repeats, ask)
    plan = explain_top_regions(url, run_id, 7, "gradcam", limit=100, analyze=True)
    # On PostgreSQL the scan uses the run's partition's copy of ix_patch_scores_top.
    used = [line.strip() for line in plan.splitlines() if "run_id_method_target_class_score_idx" in line]
    executed = [line.strip() for line in plan.splitlines() if line.startswith("Execution Time")]
    print(f"plan: {used[0] if used else 'ix_patch_scores_top NOT USED'}; {executed[0] if executed else ''}")
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:55432/test")
    parser.add_argument("--rows", type=int, default=10_000_000, help="patch-score rows for the query")
    parser.add_argument("--classes", type=int, default=1000, help="classes the rows spread over")
    parser.add_argument("--shards", type=int, default=20, help="shards written per write pass")
    parser.add_argument("--shard-items", type=int, default=256, help="items per shard")
    parser.add_argument("--patches", type=int, default=5, help="patch scores per heatmap")
    parser.add_argument("--repeats", type=int, default=30, help="timed queries per question")
    parser.add_argument("--min-write-rate", type=float, default=50_000, help="floor, patch rows/s")
    parser.add_argument("--max-query-ms", type=float, default=100.0, help="ceiling, median ms")
    parser.add_argument("--s3-count", type=int, default=300, help="heatmaps per S3 upload method")
    parser.add_argument("--skip-s3", action="store_true", help="leave out the S3 upload figures")
    args = parser.parse_args(argv)
    if args.classes > len(CLASS_NAMES) or args.classes < 8:
        parser.error(f"--classes must be within 8..{len(CLASS_NAMES)}")

    failures: list[str] = []
    with scratch_database(args.postgres_url) as url:
        upgrade(url)
        per_shard = args.shard_items * len(METHODS) * args.patches
        print(
            f"== shard writes: {args.shards} shards x {args.shard_items} items x {len(METHODS)} methods "
            f"x {args.patches} patches = {per_shard:,} patch-score rows per transaction"
        )
        rates = bench_writes(url, args)
        baseline = rates["values (baseline)"][0]
        for name, (whole, alone) in rates.items():
            print(
                f"{name:<18s}: {whole:9,.0f} rows/s per shard transaction ({whole / baseline:4.1f} x), "
                f"{alone:9,.0f} rows/s in the patch-score statement"
            )
        if rates["copy"][0] < args.min_write_rate:
            failures.append(f"shard writes reach {rates['copy'][0]:,.0f} rows/s < {args.min_write_rate:,.0f}")

        print(
            f"== top_regions over {args.rows:,} rows ({args.classes} classes, {args.repeats} warm runs each)"
        )
        latencies = bench_query(url, args)
        for name, values in latencies.items():
            median = statistics.median(values)
            p95 = sorted(values)[max(0, int(len(values) * 0.95) - 1)]
            print(f"{name:<22s}: median {median:7.2f} ms, p95 {p95:7.2f} ms, max {max(values):7.2f} ms")
        median = statistics.median(latencies["top-100 of one class"])
        if median >= args.max_query_ms:
            failures.append(f"top-100 query takes {median:.1f} ms >= {args.max_query_ms:.0f} ms")

    if not args.skip_s3:
        print("== S3 uploads (bench/storage_s3.py)")
        if storage_s3.main(["--count", str(args.s3_count)]) != 0:
            failures.append("concurrent S3 uploads below their floor")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
