"""``camaudit export rois``: each map's top patches cut from the source image, with a manifest."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.sources import read_manifest
from tests.test_drift import cli_run
from workers.fetch import read_bytes
from workers.storage import open_storage
from workers.synth import make_dataset

N_IMAGES = 8
runner = CliRunner()


@dataclass(frozen=True)
class ExportRun:
    db: str
    run_id: str
    data: Path


@pytest.fixture(scope="module")
def export_run(tmp_path_factory: pytest.TempPathFactory) -> ExportRun:
    root = tmp_path_factory.mktemp("rois")
    manifest = make_dataset(root / "data", N_IMAGES, seed=41)
    db = f"sqlite:///{root / 'runs.db'}"
    run_id = cli_run(manifest, db, root / "heatmaps", "--targets", "topk:2")
    return ExportRun(db, run_id, root / "data")


def export(run: ExportRun, *args: str) -> Any:
    result = runner.invoke(app, ["export", "rois", run.run_id, "--database-url", run.db, "--json", *args])
    return result


def rows_of(manifest: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_crops_are_the_source_pixels_of_the_stored_boxes(export_run: ExportRun, tmp_path: Path) -> None:
    out = tmp_path / "rois"
    result = export(export_run, "--out", str(out), "--method", "gradcam", "--top", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = rows_of(out / "rois.jsonl")
    assert report["written"] == len(rows) == N_IMAGES * 2 * 3
    assert len({row["uri"] for row in rows}) == len(rows)
    for row in rows:
        with Image.open(row["source_uri"]) as source, Image.open(out / row["uri"]) as crop:
            expected = np.asarray(source.convert("RGB").crop(tuple(row["source_box"])))
            assert np.array_equal(np.asarray(crop.convert("RGB")), expected)
        assert row["uri"] == f"crops/gradcam/features/{row['item']}/c{row['target_class']}_r{row['rank']}.png"
        assert row["rank"] in (0, 1, 2) and row["label"] is not None
    # the first-ranked crop of a map is its best patch
    by_map: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        by_map.setdefault((row["item"], row["target_class"]), []).append(row)
    for ranked in by_map.values():
        scores = [r["score"] for r in sorted(ranked, key=lambda r: r["rank"])]
        assert scores == sorted(scores, reverse=True)


def test_a_second_call_writes_nothing_and_a_lost_crop_is_rewritten(
    export_run: ExportRun, tmp_path: Path
) -> None:
    out = tmp_path / "rois"
    first = export(export_run, "--out", str(out), "--top", "2", "--size", "24", "--class", "circle")
    assert first.exit_code == 0, first.output
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    manifest_bytes = (out / "rois.jsonl").read_bytes()
    second = json.loads(
        export(export_run, "--out", str(out), "--top", "2", "--size", "24", "--class", "0").stdout
    )
    assert second["written"] == 0 and second["kept"] == json.loads(first.stdout)["written"] > 0
    assert not second["manifest_written"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp
    assert (out / "rois.jsonl").read_bytes() == manifest_bytes
    lost = out / rows_of(out / "rois.jsonl")[0]["uri"]
    lost.unlink()
    third = json.loads(
        export(export_run, "--out", str(out), "--top", "2", "--size", "24", "--class", "0").stdout
    )
    assert third["written"] == 1
    with Image.open(lost) as crop:
        assert crop.size == (24, 24)
    refused = export(export_run, "--out", str(out), "--top", "3", "--class", "0")
    assert refused.exit_code == 2 and "records another export" in refused.output


class CropDataset(torch.utils.data.Dataset[tuple[torch.Tensor, str]]):
    """What a second model's training code would write: the manifest and the crops, nothing of camaudit."""

    def __init__(self, manifest: Path) -> None:
        self.root = manifest.parent
        self.rows = [json.loads(line) for line in manifest.read_text().splitlines()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        row = self.rows[index]
        with Image.open(self.root / row["uri"]) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return pixels, row["label"]


def test_the_manifest_is_a_source_for_a_run_and_a_plain_dataset(
    export_run: ExportRun, tmp_path: Path
) -> None:
    out = tmp_path / "rois"
    assert export(export_run, "--out", str(out), "--top", "2", "--size", "32").exit_code == 0
    moved = tmp_path / "moved"
    shutil.move(out, moved)  # relative uris: the export can move
    manifest = moved / "rois.jsonl"
    rows = rows_of(manifest)
    items = read_manifest(manifest)
    assert [i.uri for i in items] == [str(moved / r["uri"]) for r in rows]
    assert [i.label for i in items] == [r["label"] for r in rows]
    assert all(i.box is None for i in items)  # the source box is not the crop's object box
    batch, labels = next(iter(torch.utils.data.DataLoader(CropDataset(manifest), batch_size=8)))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.uint8 and len(labels) == 8
    second = cli_run(manifest, export_run.db, tmp_path / "second-heatmaps")
    status = runner.invoke(app, ["status", second, "--database-url", export_run.db, "--json"])
    assert json.loads(status.stdout)["done"] == len(rows)


def test_export_to_s3(export_run: ExportRun, s3_storage_url: str, s3_endpoint_url: str) -> None:
    args = ("--out", s3_storage_url, "--top", "1", "--s3-endpoint-url", s3_endpoint_url)
    first = export(export_run, *args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["written"] == N_IMAGES * 2
    storage = open_storage(s3_storage_url, endpoint_url=s3_endpoint_url)
    keys = set(storage.list(""))
    assert {"export.json", "rois.jsonl"} <= keys and len(keys) == N_IMAGES * 2 + 2
    assert json.loads(export(export_run, *args).stdout)["written"] == 0
    items = read_manifest(f"{s3_storage_url}/rois.jsonl", endpoint_url=s3_endpoint_url)
    assert all(i.uri.startswith(s3_storage_url + "/crops/gradcam/features/") for i in items)
    row = json.loads(storage.get("rois.jsonl").decode().splitlines()[0])
    crop = Image.open(__import__("io").BytesIO(read_bytes(items[0].uri, endpoint_url=s3_endpoint_url)))
    with Image.open(row["source_uri"]) as source:
        assert np.array_equal(
            np.asarray(crop.convert("RGB")), np.asarray(source.convert("RGB").crop(row["source_box"]))
        )


def test_bad_requests_fail_before_writing_with_the_reason(export_run: ExportRun, tmp_path: Path) -> None:
    out = tmp_path / "never"
    cases = {
        ("--out", str(out), "--method", "gradcma"): "did you mean gradcam",
        ("--out", str(out), "--top", "1000000"): "--top must be within 1..5",
        ("--out", str(out), "--top", "0"): "--top must be within",
        ("--out", str(out), "--size", "0"): "--size must be within",
        ("--out", str(out), "--layer", "featurs"): "did you mean features",
        ("--out", str(out), "--class", "circel"): "did you mean circle",
    }
    for args, reason in cases.items():
        result = export(export_run, *args)
        assert result.exit_code == 2 and reason in " ".join(result.output.split()), (args, result.output)
    assert not (out / "rois.jsonl").exists()
    bad_run = runner.invoke(
        app, ["export", "rois", "nope", "--out", str(out), "--database-url", export_run.db]
    )
    assert bad_run.exit_code == 2 and "no run 'nope'" in bad_run.output
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in " ".join(export(export_run, "--out", str(a_file)).output.split())


def test_an_unreadable_source_leaves_out_that_item_only(export_run: ExportRun, tmp_path: Path) -> None:
    db_file = Path(export_run.db.removeprefix("sqlite:///"))
    db = f"sqlite:///{tmp_path / 'copy.db'}"
    with sqlite3.connect(db_file) as source, sqlite3.connect(tmp_path / "copy.db") as copy:
        source.backup(copy)  # the database may be in WAL mode: a file copy could miss rows
    from sqlalchemy import update

    from schema.db import session_scope
    from schema.models import Item

    with session_scope(db) as session:
        items = session.query(Item).filter(Item.run_id == export_run.run_id).order_by(Item.id).all()
        first, second = items[0].id, items[1].id
        # Both stay below the run's source folder: a path outside it is refused before any read.
        root = Path(export_run.data)
        session.execute(update(Item).where(Item.id == first).values(source_uri=str(root / "gone.png")))
        (root / "changed").mkdir(exist_ok=True)
        Image.new("RGB", (10, 10)).save(root / "changed" / "small.png")
        session.execute(
            update(Item).where(Item.id == second).values(source_uri=str(root / "changed" / "small.png"))
        )
    result = runner.invoke(
        app,
        ["export", "rois", export_run.run_id, "--out", str(tmp_path / "o"), "--database-url", db, "--json"],
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert set(report["failed"]) == {str(first), str(second)}
    assert "No such file" in report["failed"][str(first)]
    assert "has changed since" in report["failed"][str(second)]
    assert report["rows"] == (N_IMAGES - 2) * 2 * 3
