"""``gc`` deletes one run's objects and rows, only those, and finishes after an interruption."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.gc import GcError, gc_run
from scheduler.query import DELETING, QueryError, top_regions
from schema.db import get_engine, session_scope, upgrade
from schema.models import Heatmap, Item, PatchScore, Run, RunStatus, Shard
from tests.test_results_pg import SeededRun, seed_run, shard_rows, write_shard
from workers.storage import Storage, open_storage


@dataclass
class Backend:
    database_url: str
    storage_url: str
    endpoint_url: str | None

    def storage(self) -> Storage:
        return open_storage(self.storage_url, endpoint_url=self.endpoint_url)


@pytest.fixture(params=["sqlite+folder", "postgresql+s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite+folder":
        found = Backend(f"sqlite:///{tmp_path / 'gc.db'}", str(tmp_path / "heatmaps"), None)
    else:
        found = Backend(
            str(request.getfixturevalue("postgres_url")),
            str(request.getfixturevalue("s3_storage_url")),
            str(request.getfixturevalue("s3_endpoint_url")),
        )
    upgrade(found.database_url)
    return found


def populate(backend: Backend, run_id: str, **kwargs: Any) -> SeededRun:
    """A finished run with rows and a PNG + npy object per heatmap, as a worker leaves it."""
    run = seed_run(backend.database_url, run_id, output_uri=backend.storage_url, **kwargs)
    storage = backend.storage()
    for shard_id in run.shard_ids:
        rows = shard_rows(run, shard_id)
        write_shard(backend.database_url, rows)
        for heatmap in rows.heatmaps:
            storage.put(heatmap["object_key"], b"png " + heatmap["sha256"].encode(), "image/png")
            storage.put(heatmap["raw_key"], b"npy " + heatmap["sha256"].encode())
    return run


def rows_of(database_url: str, run_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every column of every row that belongs to one run, table by table, in id order."""
    tables = {"shards": Shard, "items": Item, "heatmaps": Heatmap, "patch_scores": PatchScore}
    with get_engine(database_url).connect() as conn:
        return {
            name: [
                tuple(r)
                for r in conn.execute(
                    select(model.__table__).where(model.run_id == run_id).order_by(model.id)
                )
            ]
            for name, model in tables.items()
        }


def run_row(database_url: str, run_id: str) -> Run | None:
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        if run is not None:
            session.expunge(run)
        return run


def test_gc_deletes_one_run_and_leaves_the_others_untouched(backend: Backend) -> None:
    # "r1" is a string prefix of "r10": deleting runs/r1 must not take runs/r10 with it.
    populate(backend, "r1")
    populate(backend, "r10")
    populate(backend, "r2", n_items=3)
    storage = backend.storage()
    storage.put("elsewhere/r1/keep.txt", b"not a heatmap")
    others_before = {rid: rows_of(backend.database_url, rid) for rid in ("r10", "r2")}
    objects_before = list(storage.list())
    r1_objects = [k for k in objects_before if k.startswith("runs/r1/")]
    assert r1_objects and all(others_before[rid]["patch_scores"] for rid in others_before)

    report = gc_run(backend.database_url, "r1", endpoint_url=backend.endpoint_url, batch=7)

    assert report.objects == len(r1_objects)
    assert report.rows["runs"] == 1 and report.rows["shards"] == 2 and report.rows["items"] == 6
    assert report.rows["patch_scores"] == 6 * 2 * 2 * 3  # items x methods x classes x ranks
    assert not report.resumed
    assert run_row(backend.database_url, "r1") is None
    assert all(rows == [] for rows in rows_of(backend.database_url, "r1").values())
    for rid, before in others_before.items():
        assert rows_of(backend.database_url, rid) == before
        assert run_row(backend.database_url, rid) is not None
    assert list(storage.list()) == [k for k in objects_before if not k.startswith("runs/r1/")]


def test_an_interrupted_gc_is_finished_by_the_next_one(backend: Backend) -> None:
    populate(backend, "r1")
    populate(backend, "r2", n_items=3)
    others_before = rows_of(backend.database_url, "r2")
    steps: list[tuple[str, int]] = []

    def stop_after_first_patch_batch(step: str, count: int) -> None:
        steps.append((step, count))
        if step == "patch_scores":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gc_run(
            backend.database_url,
            "r1",
            endpoint_url=backend.endpoint_url,
            batch=5,
            progress=stop_after_first_patch_batch,
        )
    # PostgreSQL drops the run's whole patch_scores partition in one step; elsewhere rows go in batches.
    partitioned = backend.database_url.startswith("postgresql")
    all_patches = 6 * 2 * 2 * 3
    assert steps[-1] == ("patch_scores", all_patches if partitioned else 5)
    half = run_row(backend.database_url, "r1")
    assert half is not None and half.status == DELETING
    left = rows_of(backend.database_url, "r1")
    assert len(left["patch_scores"]) == (0 if partitioned else all_patches - 5)
    # PostgreSQL drops the three tables' partitions at once (their files go in parallel), so
    # only the run row and its shards are left; elsewhere the next table has not started.
    assert (not left["heatmaps"]) if partitioned else left["heatmaps"]
    with pytest.raises(QueryError, match="being deleted"):
        top_regions(backend.database_url, "r1", "circle", "gradcam")

    report = gc_run(backend.database_url, "r1", endpoint_url=backend.endpoint_url, batch=5)

    assert report.resumed
    assert report.rows["patch_scores"] == len(left["patch_scores"])
    assert report.rows["heatmaps"] == len(left["heatmaps"])
    assert run_row(backend.database_url, "r1") is None
    assert all(rows == [] for rows in rows_of(backend.database_url, "r1").values())
    assert rows_of(backend.database_url, "r2") == others_before
    assert not any(k.startswith("runs/r1/") for k in backend.storage().list())


def test_gc_refuses_a_running_run_and_names_close_run_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gc.db'}"
    upgrade(url)
    seed_run(url, "nightly-0423", output_uri=str(tmp_path / "out"), status=RunStatus.RUNNING)
    with pytest.raises(GcError, match="is running: workers may still write"):
        gc_run(url, "nightly-0423")
    with pytest.raises(GcError, match="did you mean nightly-0423"):
        gc_run(url, "nightly-0432")
    report = gc_run(url, "nightly-0423", force=True)
    assert report.rows["runs"] == 1


def test_a_baseline_reference_is_cleared_not_followed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gc.db'}"
    upgrade(url)
    seed_run(url, "old", output_uri=str(tmp_path / "out"))
    seed_run(url, "new", output_uri=str(tmp_path / "out"))
    with session_scope(url) as session:
        session.get(Run, "new").baseline_run_id = "old"  # type: ignore[union-attr]
    gc_run(url, "old")
    new = run_row(url, "new")
    assert new is not None and new.baseline_run_id is None


def test_gc_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gc.db'}"
    upgrade(url)
    backend = Backend(url, str(tmp_path / "out"), None)
    populate(backend, "r1", n_items=3)
    populate(backend, "r2", n_items=3)
    runner = CliRunner()
    result = runner.invoke(app, ["gc", "--run", "r1", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "deleted run r1" in result.output
    with session_scope(url) as session:
        assert list(session.execute(select(Run.id)).scalars()) == ["r2"]
    again = runner.invoke(app, ["gc", "--run", "r1", "--database-url", url])
    assert again.exit_code == 2
    assert "no run 'r1'" in again.output


def test_gc_force_waits_for_a_shard_in_flight_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """A shard still uploading when gc starts stops at its next heartbeat; gc deletes only after."""
    from scheduler.plan import plan_run
    from schema.payloads import RunSpec
    from schema.settings import Settings
    from tests.plugins.services import wait_until
    from workers.shard import ShardOutcome, explain_shard
    from workers.synth import make_dataset

    url = f"sqlite:///{tmp_path / 'gc.db'}"
    out = tmp_path / "heatmaps"
    settings = Settings(database_url=url, storage_url=str(out), lease_s=1.5, heartbeat_interval_s=0.3)
    dataset = make_dataset(tmp_path / "data", 8, seed=3)
    # one object per map, uploaded while the shard runs (a packed shard writes only at its end)
    spec = RunSpec(
        source=str(dataset), methods=["gradcam", "scorecam"], shard_size=8, batch_size=2, layout="files"
    )
    planned = plan_run(spec, settings)
    outcome: list[ShardOutcome] = []
    shard = threading.Thread(
        target=lambda: outcome.append(explain_shard(planned.run_id, planned.shard_ids[0], settings))
    )
    shard.start()
    objects = out / "runs" / planned.run_id
    wait_until(lambda: objects.is_dir() and any(objects.rglob("*.png")), 120, "the shard to upload maps")
    waited: list[tuple[int, list[str]]] = []
    try:
        with session_scope(url) as session:
            assert session.get(Shard, planned.shard_ids[0]).status == "running"  # type: ignore[union-attr]
        report = gc_run(
            url, planned.run_id, force=True, waiting=lambda n, w: waited.append((n, w)), wait_s=60
        )
    finally:
        shard.join(timeout=120)
    assert waited and waited[0][0] == 1, "gc did not see the shard in flight"
    assert outcome and outcome[0].status == "fenced", outcome
    assert report.rows["runs"] == 1 and run_row(url, planned.run_id) is None
    assert not objects.exists() or not any(p.is_file() for p in objects.rglob("*"))
    assert all(rows == [] for rows in rows_of(url, planned.run_id).values())
