"""Many workers on one run's row in PostgreSQL: commits at once, and claims beside a commit.

Every shard commit's heatmap inserts take a key-share lock on the run row through their
foreign key before the commit locks the row to recount the run. These pin the two lock modes
that keep that from serialising or deadlocking the workers (workers/shard.py lock_run_row).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from schema.db import session_scope, upgrade
from schema.models import Run, RunStatus
from tests.test_leases import SETTINGS, claim, rows_for
from tests.test_results_pg import seed_run
from workers import shard as shard_module
from workers.shard import ShardWork, claim_shard, commit_shard, lock_run_row


@pytest.fixture
def database_url(postgres_url: str, tmp_path: Path) -> str:
    upgrade(postgres_url)
    return postgres_url


def test_two_commits_of_one_run_at_the_same_moment_both_land(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = seed_run(database_url, "r1", status=RunStatus.RUNNING)
    works = [claim(run, shard_id, f"w{n}@host:{n}") for n, shard_id in enumerate(run.shard_ids[:2])]
    both_inserted = threading.Barrier(2, timeout=30)
    lock_run = shard_module._lock_run

    def lock_together(session: Any, run_id: str) -> Run:
        # Both commits have written their heatmaps (holding the key-share locks) before either
        # locks the run row: the moment two workers' commits overlap.
        both_inserted.wait()
        return lock_run(session, run_id)

    monkeypatch.setattr(shard_module, "_lock_run", lock_together)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(
            pool.map(lambda work: commit_shard(database_url, work, rows_for(run, work.shard_id)), works)
        )
    assert [o.status for o in outcomes] == ["done", "done"]
    with session_scope(database_url) as session:
        found = session.execute(select(Run.shards_done).where(Run.id == "r1")).scalar_one()
    assert found == 2


def test_a_claim_does_not_wait_for_a_commit_holding_the_run_row(database_url: str) -> None:
    run = seed_run(database_url, "r1", n_items=9, status=RunStatus.RUNNING)
    first = claim(run, run.shard_ids[0], "w0@host:0")
    assert isinstance(first, ShardWork)
    held = threading.Event()
    release = threading.Event()

    def commit_holding_the_run_row() -> None:
        with session_scope(database_url) as session:
            session.execute(lock_run_row(run.run_id)).scalar_one()
            held.set()
            release.wait(60)

    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(commit_holding_the_run_row)
        try:
            assert held.wait(30), "the run row was never locked"
            claimed = pool.submit(
                claim_shard, database_url, run.run_id, run.shard_ids[1], SETTINGS, worker="w1@h:1"
            )
            work = claimed.result(timeout=20)
        finally:
            release.set()
        holder.result(timeout=30)
    assert isinstance(work, ShardWork) and work.attempt == 1
