"""Shard leases on SQLite and PostgreSQL: who may run a shard, who may commit it, who re-enqueues it.

These drive the claim, heartbeat, sweep and commit functions directly against a real database;
tests/test_faults.py kills real worker processes.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import sessionmaker

from scheduler.plan import PlanError, reopen_run
from schema.db import get_engine, session_scope
from schema.models import Heatmap, Run, RunStatus, Shard
from schema.settings import Settings
from tests.test_results_pg import SeededRun, database_for, seed_run, shard_rows, snapshot
from workers.lease import Heartbeat, LeaseLost, db_now, hand_back_for_retry
from workers.lease_sweep import sweep_expired_leases
from workers.shard import ShardOutcome, ShardWork, claim_shard, commit_shard
from workers.shard_rows import ShardRows
from workers.storage import UploadError

SETTINGS = Settings(lease_s=30, heartbeat_interval_s=0.2, max_lost_leases=3)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_for(request, tmp_path)


@pytest.fixture
def run(database_url: str) -> SeededRun:
    return seed_run(database_url, "r1", status=RunStatus.PENDING)


def claim(run: SeededRun, shard_id: int, worker: str) -> ShardWork:
    work = claim_shard(run.database_url, run.run_id, shard_id, SETTINGS, worker=worker)
    assert isinstance(work, ShardWork), work
    return work


def shard(database_url: str, shard_id: int) -> Shard:
    with session_scope(database_url) as session:
        found = session.get(Shard, shard_id)
        assert found is not None
        session.expunge(found)
        return found


def expire(database_url: str, shard_id: int) -> None:
    """What the passing of ``lease_s`` without a heartbeat does, without waiting for it."""
    with session_scope(database_url) as session:
        past = db_now(session) - timedelta(seconds=1)
        session.execute(update(Shard).where(Shard.id == shard_id).values(lease_expires_at=past))


def set_run_status(database_url: str, run_id: str, status: str) -> None:
    with session_scope(database_url) as session:
        session.execute(update(Run).where(Run.id == run_id).values(status=status))


def rows_for(run: SeededRun, shard_id: int, seed: int = 0) -> ShardRows:
    rows = shard_rows(run, shard_id, seed=seed)
    return ShardRows(items=rows.items, heatmaps=rows.heatmaps, patches=rows.patches)


def test_a_live_lease_keeps_other_workers_off_and_an_expired_one_is_taken_over(run: SeededRun) -> None:
    first = claim(run, run.shard_ids[0], "a@host:1")
    held = shard(run.database_url, run.shard_ids[0])
    assert (held.status, held.attempts, held.worker) == ("running", 1, "a@host:1")
    assert held.lease_expires_at is not None and held.heartbeat_at is not None

    duplicate = claim_shard(run.database_url, run.run_id, run.shard_ids[0], SETTINGS, worker="b@host:2")
    assert isinstance(duplicate, ShardOutcome) and duplicate.status == "skipped"
    assert "a@host:1" in (duplicate.reason or "")
    assert shard(run.database_url, run.shard_ids[0]).attempts == 1

    expire(run.database_url, run.shard_ids[0])
    second = claim(run, run.shard_ids[0], "b@host:2")
    assert (first.attempt, second.attempt) == (1, 2)
    taken = shard(run.database_url, run.shard_ids[0])
    assert (taken.worker, taken.lost_leases, taken.lost_worker) == ("b@host:2", 1, "a@host:1")


def test_only_the_latest_attempt_commits(run: SeededRun) -> None:
    shard_id = run.shard_ids[0]
    late = claim(run, shard_id, "a@host:1")
    expire(run.database_url, shard_id)
    current = claim(run, shard_id, "b@host:2")
    before = snapshot(run.database_url)

    with pytest.raises(LeaseLost, match="attempt 1 was overtaken"):
        commit_shard(run.database_url, late, rows_for(run, shard_id, seed=1))
    assert snapshot(run.database_url) == before  # nothing of the late attempt was kept
    assert shard(run.database_url, shard_id).status == "running"

    outcome = commit_shard(run.database_url, current, rows_for(run, shard_id))
    assert outcome.status == "done"
    after = snapshot(run.database_url)
    with pytest.raises(LeaseLost):  # the late original, arriving after the re-run committed
        commit_shard(run.database_url, late, rows_for(run, shard_id, seed=1))
    assert snapshot(run.database_url) == after
    done = shard(run.database_url, shard_id)
    assert (done.status, done.lease_expires_at) == ("done", None)


def test_an_attempt_whose_shard_was_enqueued_again_but_not_yet_claimed_still_commits(run: SeededRun) -> None:
    shard_id = run.shard_ids[0]
    work = claim(run, shard_id, "a@host:1")
    expire(run.database_url, shard_id)
    sent: list[tuple[str, int]] = []
    sweep_expired_leases(
        sessionmaker(get_engine(run.database_url)), max_lost=3, enqueue=lambda *a: sent.append(a)
    )
    assert sent == [(run.run_id, shard_id)] and shard(run.database_url, shard_id).status == "pending"
    assert commit_shard(run.database_url, work, rows_for(run, shard_id)).status == "done"
    # the delivery the sweep sent finds nothing to do
    late = claim_shard(run.database_url, run.run_id, shard_id, SETTINGS, worker="b@host:2")
    assert isinstance(late, ShardOutcome) and late.reason == "already done"


def test_a_commit_whose_objects_did_not_become_durable_keeps_nothing(run: SeededRun) -> None:
    shard_id = run.shard_ids[0]
    work = claim(run, shard_id, "a@host:1")
    before = snapshot(run.database_url)

    def not_durable() -> None:
        raise UploadError("1 of 2 uploads failed", {"k": OSError("the disk is full")})

    with pytest.raises(UploadError):
        commit_shard(run.database_url, work, rows_for(run, shard_id), not_durable)
    assert snapshot(run.database_url) == before
    assert shard(run.database_url, shard_id).status == "running"
    assert commit_shard(run.database_url, work, rows_for(run, shard_id), lambda: None).status == "done"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_commit_waiting_for_its_uploads_holds_only_its_own_rows(run: SeededRun) -> None:
    """Another shard of the same run commits while this one waits for its objects: the wait comes
    before the run's row is locked."""
    first, second = run.shard_ids[0], run.shard_ids[1]
    waiting = claim(run, first, "a@host:1")
    other = claim(run, second, "b@host:2")
    outcomes: list[ShardOutcome] = []

    def durable() -> None:
        done = threading.Thread(
            target=lambda: outcomes.append(commit_shard(run.database_url, other, rows_for(run, second)))
        )
        done.start()
        done.join(20)
        assert not done.is_alive(), "the other shard's commit waited on this one"

    assert commit_shard(run.database_url, waiting, rows_for(run, first), durable).status == "done"
    assert [outcome.status for outcome in outcomes] == ["done"]
    assert {shard(run.database_url, s).status for s in (first, second)} == {"done"}


def test_claims_and_commits_refuse_a_run_being_deleted(run: SeededRun) -> None:
    work = claim(run, run.shard_ids[0], "a@host:1")
    set_run_status(run.database_url, run.run_id, RunStatus.DELETING)
    with pytest.raises(LeaseLost, match="being deleted"):
        commit_shard(run.database_url, work, rows_for(run, run.shard_ids[0]))
    with session_scope(run.database_url) as session:
        assert session.execute(select(func.count()).select_from(Heatmap)).scalar_one() == 0
        assert session.get(Run, run.run_id).status == RunStatus.DELETING  # type: ignore[union-attr]
    refused = claim_shard(run.database_url, run.run_id, run.shard_ids[1], SETTINGS, worker="b@host:2")
    assert isinstance(refused, ShardOutcome) and refused.reason == "its run is being deleted"
    assert shard(run.database_url, run.shard_ids[1]).status == "pending"


def test_resume_refuses_a_run_being_deleted(run: SeededRun) -> None:
    set_run_status(run.database_url, run.run_id, RunStatus.DELETING)
    with pytest.raises(PlanError, match=r"being deleted.*camaudit gc --run r1"):
        reopen_run(run.database_url, run.run_id)
    assert {shard(run.database_url, sid).status for sid in run.shard_ids} == {"pending"}


def test_concurrent_sweeps_enqueue_each_expired_shard_once(run: SeededRun) -> None:
    for n, shard_id in enumerate(run.shard_ids):
        claim(run, shard_id, f"w{n}@host:{n}")
        expire(run.database_url, shard_id)
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def enqueue(run_id: str, shard_id: int) -> None:
        with lock:
            sent.append((run_id, shard_id))

    def sweeper() -> None:
        sessions = sessionmaker(get_engine(run.database_url))
        start.wait()
        for _ in range(3):
            try:
                sweep_expired_leases(sessions, max_lost=3, enqueue=enqueue)
            except Exception as exc:  # SQLite: a sweeper that lost the race for the write lock
                assert "locked" in str(exc)

    threads = [threading.Thread(target=sweeper) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sent) == sorted((run.run_id, sid) for sid in run.shard_ids)
    for n, shard_id in enumerate(run.shard_ids):
        lost = shard(run.database_url, shard_id)
        assert (lost.status, lost.lost_leases, lost.lost_worker) == ("pending", 1, f"w{n}@host:{n}")
        assert lost.lease_expires_at is None


def test_sweep_leaves_live_leases_and_runs_being_deleted_alone(database_url: str) -> None:
    live = seed_run(database_url, "live", status=RunStatus.RUNNING)
    going = seed_run(database_url, "going", status=RunStatus.RUNNING)
    claim(live, live.shard_ids[0], "a@host:1")
    claim(going, going.shard_ids[0], "a@host:1")
    expire(database_url, going.shard_ids[0])
    set_run_status(database_url, "going", RunStatus.DELETING)
    sent: list[tuple[str, int]] = []
    swept = sweep_expired_leases(
        sessionmaker(get_engine(database_url)), max_lost=3, enqueue=lambda *a: sent.append(a)
    )
    assert swept == [] and sent == []
    assert shard(database_url, live.shard_ids[0]).status == "running"


def test_a_shard_that_keeps_losing_its_worker_fails_and_ends_the_run(database_url: str) -> None:
    run = seed_run(database_url, "poison", n_items=3, shard_size=3, status=RunStatus.PENDING)
    (shard_id,) = run.shard_ids
    sent: list[tuple[str, int]] = []
    ended: list[str] = []
    sessions = sessionmaker(get_engine(database_url))
    for n in range(3):
        claim(run, shard_id, f"w{n}@host:{n}")
        expire(database_url, shard_id)
        sweep_expired_leases(sessions, max_lost=3, enqueue=lambda *a: sent.append(a), run_ended=ended.append)
    assert len(sent) == 2 and ended == ["poison"]
    failed = shard(database_url, shard_id)
    assert failed.status == "failed" and failed.lost_leases == 3
    assert "lost its worker 3 times (last w2@host:2" in (failed.error or "")
    with session_scope(database_url) as session:
        assert session.get(Run, "poison").status == RunStatus.FAILED  # type: ignore[union-attr]
    # the broker handing back an old delivery later does not run it again
    late = claim_shard(database_url, "poison", shard_id, SETTINGS, worker="w9@host:9")
    assert isinstance(late, ShardOutcome) and late.status == "skipped"
    assert shard(database_url, shard_id).status == "failed"


def test_a_retry_hands_the_shard_back_and_a_lost_retry_is_swept(run: SeededRun) -> None:
    shard_id = run.shard_ids[0]
    work = claim(run, shard_id, "a@host:1")
    with session_scope(run.database_url) as session:
        hand_back_for_retry(session, shard_id, work.attempt, due_in_s=30)
    assert shard(run.database_url, shard_id).status == "pending"
    sent: list[tuple[str, int]] = []
    sessions = sessionmaker(get_engine(run.database_url))
    assert sweep_expired_leases(sessions, max_lost=3, enqueue=lambda *a: sent.append(a)) == []
    expire(run.database_url, shard_id)  # the retry's message never came
    sweep_expired_leases(sessions, max_lost=3, enqueue=lambda *a: sent.append(a))
    assert sent == [(run.run_id, shard_id)]
    # any worker may take a handed-back shard at once, the one that failed included
    assert claim(run, shard_id, "b@host:2").attempt == 2


def test_heartbeat_renews_and_notices_when_the_shard_is_no_longer_its_own(run: SeededRun) -> None:
    shard_id = run.shard_ids[0]
    work = claim(run, shard_id, "a@host:1")
    first = shard(run.database_url, shard_id).lease_expires_at
    sessions = sessionmaker(get_engine(run.database_url))
    with Heartbeat(sessions, shard_id, work.attempt, lease_s=30, interval_s=0.05) as beat:
        deadline = time.monotonic() + 10
        while shard(run.database_url, shard_id).lease_expires_at == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        beat.check()  # still ours
        set_run_status(run.database_url, run.run_id, RunStatus.DELETING)
        assert beat.lost.wait(10), "a run being deleted must end the lease"
        with pytest.raises(LeaseLost, match="no longer holds"):
            beat.check()

    set_run_status(run.database_url, run.run_id, RunStatus.RUNNING)
    other = claim(run, run.shard_ids[1], "a@host:1")
    # A beat every 2 s, not every 50 ms: a renewal landing between the expiry and the other
    # claim (likely on a loaded machine) would hand the lease back to this attempt.
    with Heartbeat(sessions, run.shard_ids[1], other.attempt, lease_s=30, interval_s=2) as beat:
        expire(run.database_url, run.shard_ids[1])
        claim(run, run.shard_ids[1], "b@host:2")
        assert beat.lost.wait(10), "a later attempt must end this one's lease"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"lease_s": "20", "heartbeat_interval_s": "10"}, "at least 3 x heartbeat_interval_s"),
        ({"lease_s": "0"}, "positive number of seconds"),
        ({"lease_sweep_interval_s": "-1"}, "positive number of seconds"),
        ({"max_lost_leases": "0"}, "at least 1"),
    ],
)
def test_bad_lease_settings_fail_with_what_would_be_right(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(f"CAMAUDIT_{key.upper()}", value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_default_settings_recover_a_lost_worker_within_two_minutes() -> None:
    defaults = Settings()
    assert defaults.lease_s + defaults.lease_sweep_interval_s <= 120


def test_status_names_the_worker_whose_lease_ran_out(run: SeededRun) -> None:
    from typer.testing import CliRunner

    from scheduler.cli import app

    claim(run, run.shard_ids[0], "doomed@gpu-7:4242")
    claim(run, run.shard_ids[1], "alive@gpu-8:77")
    expire(run.database_url, run.shard_ids[0])
    runner = CliRunner()
    result = runner.invoke(app, ["status", run.run_id, "--database-url", run.database_url, "--json"])
    assert result.exit_code == 0, result.output
    leases = json.loads(result.output)["leases"]
    assert [(e["shard"], e["worker"]) for e in leases["expired"]] == [(0, "doomed@gpu-7:4242")]
    assert [(e["shard"], e["worker"]) for e in leases["running"]] == [(1, "alive@gpu-8:77")]

    sessions = sessionmaker(get_engine(run.database_url))
    sweep_expired_leases(sessions, max_lost=3, enqueue=lambda *a: None)
    shown = runner.invoke(app, ["status", run.run_id, "--database-url", run.database_url])
    assert shown.exit_code == 0, shown.output
    assert "lost workers" in shown.output and "doomed@gpu-7:4242" in shown.output


def test_resume_command_refuses_a_run_being_deleted(run: SeededRun) -> None:
    from typer.testing import CliRunner

    from scheduler.cli import app

    set_run_status(run.database_url, run.run_id, RunStatus.DELETING)
    result = CliRunner().invoke(app, ["resume", run.run_id, "--database-url", run.database_url])
    assert result.exit_code == 2
    assert "being deleted" in result.output


@pytest.mark.parametrize("command", [["worker"], ["run", "--source", "data"]])
def test_a_bad_lease_setting_stops_a_command_before_any_work(command: list[str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scheduler.cli import app

    database = tmp_path / "never.db"
    env = {
        "CAMAUDIT_LEASE_S": "20",
        "CAMAUDIT_HEARTBEAT_INTERVAL_S": "10",
        "CAMAUDIT_DATABASE_URL": f"sqlite:///{database}",
        "CAMAUDIT_BROKER_URL": "redis://127.0.0.1:1/0",
    }
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == 2, result.output
    assert "bad setting" in result.output and "CAMAUDIT_LEASE_S=30" in result.output
    assert "Value error" not in result.output  # the reason in our words, not pydantic's
    assert not database.exists()
