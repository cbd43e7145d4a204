"""A run's counters kept per shard equal the recount from its shards, whatever the order.

Shard commits and failures add their shard's change to the run row instead of recounting the
run (workers/run_counters.py). These drive many commits, retries, failures, lease take-overs
and resumes of one run at once on SQLite and PostgreSQL and compare the kept counters with a
recount from the shards table. A run ends exactly once: the one outcome carrying
``run_status`` is what enqueues its finalisation (workers/tasks.py).
"""

from __future__ import annotations

import contextlib
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from scheduler.plan import reopen_run
from schema.db import get_engine, session_scope, upgrade
from schema.models import Run, RunStatus, Shard, ShardStatus
from tests.test_leases import SETTINGS, expire, rows_for
from tests.test_results_pg import SeededRun, database_for, seed_run
from workers import run_counters
from workers.lease import LeaseLost, hand_back_for_retry
from workers.lease_sweep import sweep_expired_leases
from workers.run_counters import Counts
from workers.shard import ShardOutcome, ShardWork, claim_shard, commit_shard, fail_shard


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_for(request, tmp_path)


def kept_and_recounted(database_url: str, run_id: str) -> tuple[Counts, Counts, str]:
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        kept = Counts(run.shards_done, run.shards_failed, run.n_done, run.n_failed)
        return kept, run_counters.recount_counts(session, run_id), run.status


def claimed(run: SeededRun, shard_id: int, worker: str) -> ShardWork | ShardOutcome:
    return claim_shard(run.database_url, run.run_id, shard_id, SETTINGS, worker=worker)


def claim_and_commit(run: SeededRun, shard_id: int, worker: str) -> ShardOutcome:
    work = claimed(run, shard_id, worker)
    assert isinstance(work, ShardWork), work
    return commit_shard(run.database_url, work, rows_for(run, shard_id))


def test_concurrent_commits_of_one_run_count_every_shard_once_and_end_it_once(database_url: str) -> None:
    run = seed_run(database_url, "r1", n_items=48, shard_size=3, status=RunStatus.PENDING)
    assert len(run.shard_ids) == 16
    works = [claimed(run, shard_id, f"w{n % 8}@host:{n % 8}") for n, shard_id in enumerate(run.shard_ids)]
    start = threading.Barrier(8, timeout=60)

    def worker(n: int) -> list[ShardOutcome]:
        start.wait()
        return [
            commit_shard(database_url, work, rows_for(run, work.shard_id))
            for work in works[n::8]
            if isinstance(work, ShardWork)
        ]

    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for batch in pool.map(worker, range(8)) for o in batch]
    assert [o.status for o in outcomes] == ["done"] * 16
    kept, recounted, status = kept_and_recounted(database_url, "r1")
    assert kept == recounted == Counts(16, 0, 48, 0)
    assert status == RunStatus.FINISHED
    assert [o.run_status for o in outcomes if o.run_status is not None] == [RunStatus.FINISHED]


def test_a_commit_reads_no_other_shard_of_its_run(database_url: str) -> None:
    """The commit's work on the run row does not grow with the run: no aggregate over its shards."""
    run = seed_run(database_url, "r1", status=RunStatus.PENDING)
    work = claimed(run, run.shard_ids[0], "a@host:1")
    assert isinstance(work, ShardWork)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(" ".join(statement.lower().split()))

    engine = get_engine(database_url)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        commit_shard(database_url, work, rows_for(run, run.shard_ids[0]))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    on_shards = [s for s in statements if " from shards" in s]
    assert on_shards and all("where shards.id =" in s for s in on_shards), on_shards
    counted = [s for s in statements if s.startswith("update runs set")]
    assert len(counted) == 1 and "shards_done=(runs.shards_done +" in counted[0], statements


def test_a_repeated_or_retried_commit_of_a_shard_counts_it_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = seed_run(database_url, "r1", status=RunStatus.PENDING)
    first, second = run.shard_ids
    work = claimed(run, first, "a@host:1")
    assert isinstance(work, ShardWork)
    settle = run_counters.settle
    calls = []

    def settle_failing_once(*args: object) -> str | None:
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("the database went away before the commit")
        return settle(*args)  # type: ignore[arg-type]

    # The first commit adds its counts and then fails: the whole transaction rolls back.
    monkeypatch.setattr(run_counters, "settle", settle_failing_once)
    with pytest.raises(ConnectionError):
        commit_shard(database_url, work, rows_for(run, first))
    assert kept_and_recounted(database_url, "r1")[0] == Counts()
    assert commit_shard(database_url, work, rows_for(run, first)).status == "done"
    # A duplicated delivery of the same commit finds the shard done: refused, nothing added.
    with pytest.raises(LeaseLost):
        commit_shard(database_url, work, rows_for(run, first))
    kept, recounted, status = kept_and_recounted(database_url, "r1")
    assert kept == recounted == Counts(1, 0, 3, 0)
    assert status == RunStatus.RUNNING
    assert claim_and_commit(run, second, "b@host:2").run_status == RunStatus.FINISHED
    assert kept_and_recounted(database_url, "r1")[:2] == (Counts(2, 0, 6, 0), Counts(2, 0, 6, 0))


def test_a_shard_failed_after_its_retries_counts_once(database_url: str) -> None:
    run = seed_run(database_url, "r1", status=RunStatus.PENDING)
    first, second = run.shard_ids
    work = claimed(run, first, "a@host:1")
    assert isinstance(work, ShardWork)
    with session_scope(database_url) as session:
        hand_back_for_retry(session, first, work.attempt, 0.0)
    expire(database_url, first)
    outcomes = [fail_shard(database_url, "r1", first, "boom") for _ in range(3)]
    assert [o.status for o in outcomes] == ["failed"] * 3
    assert kept_and_recounted(database_url, "r1")[:2] == (Counts(0, 1, 0, 0), Counts(0, 1, 0, 0))
    # Failing a done shard changes nothing either.
    assert claim_and_commit(run, second, "b@host:2").run_status == RunStatus.PARTIAL
    assert fail_shard(database_url, "r1", second, "late").run_status is None
    kept, recounted, status = kept_and_recounted(database_url, "r1")
    assert kept == recounted == Counts(1, 1, 3, 0)
    assert status == RunStatus.PARTIAL


def test_resume_recounts_a_partial_run_and_it_ends_again_once(database_url: str) -> None:
    run = seed_run(database_url, "r1", n_items=9, status=RunStatus.PENDING)
    done, failed, last = run.shard_ids
    claim_and_commit(run, done, "a@host:1")
    fail_shard(database_url, "r1", failed, "boom")
    assert fail_shard(database_url, "r1", last, "boom").run_status == RunStatus.PARTIAL
    # Counters that drifted (written by anything that did not keep them) are repaired by resume.
    with session_scope(database_url) as session:
        session.execute(update(Run).where(Run.id == "r1").values(shards_done=7, n_failed=5))
    assert sorted(reopen_run(database_url, "r1")) == sorted([failed, last])
    kept, recounted, status = kept_and_recounted(database_url, "r1")
    assert kept == recounted == Counts(1, 0, 3, 0)
    assert status == RunStatus.RUNNING
    assert claim_and_commit(run, failed, "b@host:2").run_status is None
    assert claim_and_commit(run, last, "c@host:3").run_status == RunStatus.FINISHED
    assert kept_and_recounted(database_url, "r1")[:2] == (Counts(3, 0, 9, 0), Counts(3, 0, 9, 0))


def _deadlocked(exc: OperationalError) -> bool:
    return isinstance(exc.orig, psycopg.errors.DeadlockDetected)


class Chaos:
    """Random steps of many workers on one run; records every outcome that ended the run."""

    def __init__(self, run: SeededRun) -> None:
        self.run = run
        self.sessions = sessionmaker(get_engine(run.database_url))
        self.endings: list[str] = []
        self._lock = threading.Lock()

    def _ended(self, outcome: object) -> None:
        if isinstance(outcome, ShardOutcome) and outcome.run_status is not None:
            with self._lock:
                self.endings.append(outcome.run_status)

    def _commit(self, work: ShardWork, seed: int) -> None:
        with contextlib.suppress(LeaseLost):  # overtaken: nothing of it is kept
            self._ended(commit_shard(self.run.database_url, work, rows_for(self.run, work.shard_id, seed)))

    def step(self, rng: random.Random, me: str, held: list[ShardWork]) -> None:
        url, shard_id, action = self.run.database_url, rng.choice(self.run.shard_ids), rng.random()
        if action < 0.1 and held:
            self._commit(held.pop(), rng.randrange(3))  # late: its lease may have been taken over
        elif action < 0.2:
            expire(url, shard_id)  # its worker is gone; a sweep or a claim takes it over
            sweep_expired_leases(self.sessions, max_lost=SETTINGS.max_lost_leases, enqueue=lambda *_: None)
        else:
            work = claimed(self.run, shard_id, me)
            self._ended(work)
            if not isinstance(work, ShardWork):
                return
            if action < 0.35:  # retries used up: handed back, then failed (twice, as a redelivery would)
                with session_scope(url) as session:
                    hand_back_for_retry(session, shard_id, work.attempt, 0.0)
                expire(url, shard_id)
                self._ended(fail_shard(url, self.run.run_id, shard_id, "gave up"))
                self._ended(fail_shard(url, self.run.run_id, shard_id, "gave up"))
            elif action < 0.45:
                held.append(work)  # still computing
            else:
                self._commit(work, rng.randrange(3))

    def worker(self, n: int, steps: int) -> None:
        rng, held = random.Random(n), []
        for _ in range(steps):
            try:
                self.step(rng, f"t{n}@host:{n}", held)
            except OperationalError as exc:
                if not _deadlocked(exc):  # a real worker retries a deadlocked shard
                    raise


def unfinished(database_url: str, run_id: str) -> list[int]:
    with session_scope(database_url) as session:
        return list(
            session.execute(
                select(Shard.id).where(
                    Shard.run_id == run_id, Shard.status.not_in([ShardStatus.DONE, ShardStatus.FAILED])
                )
            ).scalars()
        )


def test_random_interleavings_on_postgresql_keep_the_counters_equal_to_the_recount(postgres_url: str) -> None:
    """Threads commit, fail, repeat late commits, let leases run out, take over, sweep and resume."""
    upgrade(postgres_url)
    chaos = Chaos(seed_run(postgres_url, "r1", n_items=60, shard_size=3, status=RunStatus.PENDING))
    for epoch in range(2):
        open_before = kept_and_recounted(postgres_url, "r1")[2] not in RunStatus.TERMINAL
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: chaos.worker(n, 25), range(epoch * 8, epoch * 8 + 8)))
        kept, recounted, status = kept_and_recounted(postgres_url, "r1")
        assert kept == recounted
        assert (status in RunStatus.TERMINAL) == (not unfinished(postgres_url, "r1"))
        assert len(chaos.endings) == int(open_before and status in RunStatus.TERMINAL)
        chaos.endings.clear()
        if status in RunStatus.TERMINAL:
            reopen_run(postgres_url, "r1")
            kept, recounted, _ = kept_and_recounted(postgres_url, "r1")
            assert kept == recounted
    # Whatever is left runs to the end, one shard after another: the run ends exactly once.
    open_before = kept_and_recounted(postgres_url, "r1")[2] not in RunStatus.TERMINAL
    for shard_id in unfinished(postgres_url, "r1"):
        expire(postgres_url, shard_id)
        work = claimed(chaos.run, shard_id, "last@host:0")
        chaos._ended(work)
        if isinstance(work, ShardWork):
            chaos._commit(work, 0)
    kept, recounted, status = kept_and_recounted(postgres_url, "r1")
    assert kept == recounted
    assert status in RunStatus.TERMINAL and not unfinished(postgres_url, "r1")
    assert len(chaos.endings) == int(open_before)
