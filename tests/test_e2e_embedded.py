"""The whole product in one process: SQLite, a local folder, the same task code a worker runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select, update

from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Shard
from schema.settings import Settings
from tests.checks import assert_run_complete
from tests.cli_runner import run_cli
from workers.shard import explain_shard
from workers.storage import open_storage
from workers.synth import make_dataset

REPO = Path(__file__).resolve().parents[1]
__all__ = ["REPO", "run_cli"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    manifest = make_dataset(root, 20, seed=11)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "empty.jpg").write_bytes(b"")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "corrupt.png", "label": "circle"}) + "\n")
        fh.write(json.dumps({"uri": "empty.jpg", "label": "square"}) + "\n")
    return manifest


def test_embedded_run_end_to_end(dataset: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    out = tmp_path / "heatmaps"
    proc = run_cli(
        "run",
        "--source",
        str(dataset),
        "--model",
        "demo",
        "--methods",
        "gradcam,cam",
        "--layer",
        "features",
        "--shard-size",
        "8",
        "--database-url",
        db,
        "--storage-url",
        str(out),
        "--json",
        process=True,  # the entry point itself, in a process of its own
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished"
    assert (status["items"], status["done"], status["failed"], status["shards"]) == (22, 20, 2, 3)
    run = assert_run_complete(db, status["run_id"], open_storage(str(out)), failed=2)
    with session_scope(db) as s:
        errors = dict(s.execute(select(Item.source_uri, Item.error).where(Item.status == "failed")).all())
    assert "0 bytes" in errors[str(dataset.parent / "empty.jpg")]
    assert "truncated" in errors[str(dataset.parent / "corrupt.png")]
    # deterministic keys under the run's prefix: by default one tar per shard, method and layer
    keys = list(open_storage(str(out)).list(f"runs/{run.id}/"))
    assert sorted(keys) == sorted(
        f"runs/{run.id}/packed/{method}/features/shard-{index:05d}.tar"
        for method in ("cam", "gradcam")
        for index in range(3)
    )

    top = run_cli(
        "top",
        "--run",
        run.id,
        "--class",
        "circle",
        "--method",
        "gradcam",
        "--limit",
        "7",
        "--json",
        "--database-url",
        db,
    )
    assert top.returncode == 0, top.stderr
    regions = json.loads(top.stdout)
    assert 0 < len(regions) <= 7
    assert [r["score"] for r in regions] == sorted((r["score"] for r in regions), reverse=True)
    assert all(r["class_name"] == "circle" for r in regions)


def _snapshot(db: str, run_id: str) -> tuple[list[tuple], list[tuple]]:
    with session_scope(db) as s:
        heatmaps = [
            tuple(getattr(h, c.key) for c in Heatmap.__table__.columns)
            for h in s.execute(select(Heatmap).where(Heatmap.run_id == run_id).order_by(Heatmap.id)).scalars()
        ]
        patches = [
            tuple(getattr(p, c.key) for c in PatchScore.__table__.columns)
            for p in s.execute(
                select(PatchScore).where(PatchScore.run_id == run_id).order_by(PatchScore.id)
            ).scalars()
        ]
    return heatmaps, patches


def test_rerunning_a_shard_leaves_the_same_rows_and_objects(dataset: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    out = tmp_path / "heatmaps"
    proc = run_cli(
        "run",
        "--source",
        str(dataset),
        "--shard-size",
        "8",
        "--database-url",
        db,
        "--storage-url",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    before = _snapshot(db, run_id)
    storage = open_storage(str(out))
    objects_before = {k: storage.get(k) for k in storage.list(f"runs/{run_id}/")}
    # A re-delivered shard (as after a worker crash between commit and ack) runs from scratch again.
    # Its rows are spoiled first in every column a shard writes, so only a write that refreshes
    # each of them can bring back what the first run stored.
    with session_scope(db) as s:
        shard_id = s.execute(select(Shard.id).where(Shard.run_id == run_id, Shard.index == 1)).scalar_one()
        s.execute(update(Shard).where(Shard.id == shard_id).values(status="pending"))
        shard_items = select(Item.id).where(Item.shard_id == shard_id).scalar_subquery()
        spoiled = s.execute(
            update(Heatmap)
            .where(Heatmap.item_id.in_(shard_items))
            .values(
                target_score=-1.0,
                object_key="stale.png",
                raw_key="stale.npy",
                sha256="0" * 64,
                raw_max=-1.0,
                raw_mean=-1.0,
                map_mean=-1.0,
                top_patch_fraction=-1.0,
            )
        ).rowcount
        s.execute(
            update(PatchScore)
            .where(PatchScore.item_id.in_(shard_items))
            .values(row=-1, col=-1, x0=-1, y0=-1, x1=-1, y1=-1, score=-1.0)
        )
    assert spoiled > 0
    settings = Settings(database_url=db, storage_url=str(out))
    outcome = explain_shard(run_id, shard_id, settings)
    assert outcome.status == "done" and outcome.n_done == 8
    assert _snapshot(db, run_id) == before
    assert {k: storage.get(k) for k in storage.list(f"runs/{run_id}/")} == objects_before
    # and a shard that is already done is not run again
    assert explain_shard(run_id, shard_id, settings).status == "skipped"


@pytest.mark.slow
def test_overlays_are_written_at_source_size_only_when_asked(dataset: Path, tmp_path: Path) -> None:
    import io

    from PIL import Image

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    out = tmp_path / "heatmaps"
    proc = run_cli(
        "run",
        "--source",
        str(dataset),
        "--methods",
        "gradcam",
        "--targets",
        "topk:2",
        "--overlay",
        "--layout",
        "files",
        "--json",
        "--database-url",
        db,
        "--storage-url",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    storage = open_storage(str(out))
    with session_scope(db) as s:
        items = s.execute(select(Item).where(Item.run_id == run_id, Item.status == "done")).scalars().all()
        heatmaps = s.execute(select(Heatmap).where(Heatmap.run_id == run_id)).scalars().all()
    sizes = {item.id: (item.width, item.height) for item in items}
    assert len(items) == 20 and len(heatmaps) == 40  # two targets per item, one overlay each
    overlays: dict[int, list[bytes]] = {}
    for heatmap in heatmaps:
        data = storage.get(heatmap.object_key.removesuffix(".png") + ".jpg")
        jpeg = Image.open(io.BytesIO(data))
        assert jpeg.format == "JPEG" and jpeg.size == sizes[heatmap.item_id]
        overlays.setdefault(heatmap.item_id, []).append(data)
    assert all(len(set(pair)) == 2 for pair in overlays.values())  # each target its own map
    # the default run stores none
    plain = run_cli(
        "run",
        "--source",
        str(dataset),
        "--methods",
        "gradcam",
        "--json",
        "--database-url",
        db,
        "--storage-url",
        str(out),
    )
    plain_id = json.loads(plain.stdout)["run_id"]
    assert not [k for k in storage.list(f"runs/{plain_id}/") if k.endswith(".jpg")]
