"""What one shard commit does on its run's row: the old recount against the kept counters.

``bench/scale.py`` times the whole section on the run row under many workers; on a shared VM
that figure moves with the load. This times only the part that changed, in one process and
one database, alternating the two so both see the same load: with the run row locked, the
recount of every shard of the run (what every commit did before) against the one ``UPDATE``
adding a shard's counts (``workers/run_counters.py``), each rolled back. Best and median of
``--repeats``, their ratio, and the load average next to each.

    python bench/run_counters.py --shards 39063     # the end of a 10-million-image run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert

from bench.scale import DEFAULT_ADMIN_URL, fresh_database
from schema.db import session_scope, upgrade
from schema.models import Run, RunStatus, Shard, ShardStatus
from workers import run_counters
from workers.shard import lock_run_row


def seed(database_url: str, shards: int) -> str:
    """A running run whose ``shards`` shards are all done but one."""
    with session_scope(database_url) as session:
        session.add(
            Run(
                id="bench",
                name="counters bench",
                status=RunStatus.RUNNING,
                model_ref="demo",
                methods=["gradcam"],
                layers=["layer4"],
                target_spec="top1",
                source_uri="data",
                output_uri="out",
                preprocess={},
                patch_size=8,
                top_patches=5,
                config={},
                versions={},
                n_shards=shards + 1,  # one more still to run: no add ends it
                shards_done=shards - 1,
                n_done=(shards - 1) * 256,
            )
        )
        session.flush()
        for start in range(0, shards, 5000):
            session.execute(
                insert(Shard),
                [
                    {
                        "run_id": "bench",
                        "index": i,
                        "status": ShardStatus.DONE if i else ShardStatus.RUNNING,
                        "n_items": 256,
                        "n_done": 256 if i else 0,
                        "attempts": 1,
                    }
                    for i in range(start, min(shards, start + 5000))
                ],
            )
    return "bench"


def timed(database_url: str, body: Callable[..., object]) -> float:
    """Milliseconds from the run row locked to the end of ``body``, rolled back afterwards."""
    with session_scope(database_url) as session:
        run = session.execute(lock_run_row("bench")).scalar_one()
        started = time.perf_counter()
        body(session, run)
        elapsed = time.perf_counter() - started
        session.rollback()
    return elapsed * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=39063, help="shards of the run")
    parser.add_argument("--repeats", type=int, default=50, help="timings of each, alternating")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    args = parser.parse_args(argv)
    done, kept = run_counters.Counts(), run_counters.Counts(1, 0, 256, 0)
    with fresh_database(args.admin_url) as database_url:
        upgrade(database_url)
        seed(database_url, args.shards)
        recount: list[float] = []
        add: list[float] = []
        for _ in range(args.repeats):
            recount.append(timed(database_url, lambda s, run: run_counters.recount(s, run)))
            add.append(timed(database_url, lambda s, run: run_counters.add_change(s, "bench", done, kept)))
    load = os.getloadavg()[0]
    print(f"run of {args.shards} shards, run row locked, {args.repeats} of each (load {load:.1f})")
    for name, values in (("recount from the shards", recount), ("add one shard's counts", add)):
        print(f"  {name:24} best {min(values):7.2f} ms  median {statistics.median(values):7.2f} ms")
    print(
        f"  ratio recount / add: best {min(recount) / min(add):.0f}x, "
        f"median {statistics.median(recount) / statistics.median(add):.0f}x (load {load:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
