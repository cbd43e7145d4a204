"""A multi-view model sees every view of a case at once; each view keeps its own maps and boxes."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select

from schema.db import session_scope
from schema.models import Group, Heatmap, Item
from tests.test_e2e_embedded import run_cli
from workers.demo.multiview import write_checkpoint

N_CASES = 24


def views_run(tmp_path: Path, manifest: Path, *extra: str) -> tuple[str, dict]:
    checkpoint = write_checkpoint(tmp_path / "multiview.pt")
    assert checkpoint.stat().st_size <= 1_000_000
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = run_cli(
        "run", "--source", str(manifest), "--model", "python:workers.demo.multiview:build",
        "--checkpoint", str(checkpoint), "--layer", "features", "--methods", "gradcam",
        "--views", "V0,V1", "--database-url", db, "--storage-url", str(tmp_path / "maps"), "--json", *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return db, json.loads(proc.stdout)


def test_pointing_game_per_view(tmp_path: Path) -> None:
    assert (
        run_cli(
            "synth", "--out", str(tmp_path / "d"), "--n", str(N_CASES), "--seed", "8", "--views", "2"
        ).returncode
        == 0
    )
    db, status = views_run(tmp_path, tmp_path / "d" / "manifest.jsonl", "--batch-size", "5")
    assert status["status"] == "finished" and status["done"] == 2 * N_CASES
    assert (status["groups"], status["groups_done"]) == (N_CASES, N_CASES)
    with session_scope(db) as session:
        rows = session.execute(
            select(Item.view, Item.group_id, Item.pred_class, Heatmap.box_hit, Heatmap.target_class).join(
                Heatmap, Heatmap.item_id == Item.id
            )
        ).all()
        groups = {g.group_id: g for g in session.execute(select(Group)).scalars()}
    hits: dict[str, list[bool]] = defaultdict(list)
    preds: dict[str, set[int]] = defaultdict(set)
    for view, group, pred, hit, target in rows:
        hits[view].append(bool(hit))
        preds[group].add(pred)
        assert target == pred  # top1 of the case, explained in every view
    pointing = {view: sum(h) / len(h) for view, h in hits.items()}
    print(f"multi-view pointing game per view: {pointing}")
    assert set(pointing) == {"V0", "V1"} and all(len(h) == N_CASES for h in hits.values())
    assert all(p >= 0.9 for p in pointing.values()), pointing
    assert all(len(p) == 1 for p in preds.values())  # one forward per case: one prediction for its views
    assert all(g.status == "done" for g in groups.values())


def test_a_case_missing_a_view_fails_whole_or_is_filled(tmp_path: Path) -> None:
    assert (
        run_cli("synth", "--out", str(tmp_path / "d"), "--n", "3", "--seed", "9", "--views", "2").returncode
        == 0
    )
    manifest = tmp_path / "d" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    duplicate = json.loads(lines[2])
    duplicate["uri"] = json.loads(lines[3])["uri"]
    manifest.write_text("\n".join([lines[0], lines[2], json.dumps(duplicate), *lines[4:]]) + "\n")
    # case 0 lost V1, case 1 has V0 twice, case 2 is whole
    db, status = views_run(tmp_path, manifest)
    assert status["done"] == 2 and status["failed"] == 3
    with session_scope(db) as session:
        errors = dict(session.execute(select(Item.group_id, Item.error).where(Item.status == "failed")).all())
    assert "case case000000: view V1 is missing" in errors["case000000"]
    assert "case case000001: view V0 appears 2 times" in errors["case000001"]
    (tmp_path / "zeros").mkdir()
    _, status = views_run(tmp_path / "zeros", manifest, "--missing-view", "zeros")
    assert status["done"] == 3 and status["failed"] == 2  # case 0's V0 explained beside a black V1


def test_views_are_checked_before_any_work(tmp_path: Path) -> None:
    proc = run_cli("run", "--source", str(tmp_path), "--views", "V0")
    assert proc.returncode == 2 and "at least two distinct views" in proc.stderr
    proc = run_cli("run", "--source", str(tmp_path), "--views", "V0,V1", "--missing-view", "skip")
    assert proc.returncode == 2 and "fail" in proc.stderr and "zeros" in proc.stderr
    assert run_cli("synth", "--out", str(tmp_path / "d"), "--n", "1", "--views", "2").returncode == 0
    checkpoint = write_checkpoint(tmp_path / "multiview.pt")
    source = str(tmp_path / "d" / "manifest.jsonl")
    proc = run_cli(
        "run", "--source", source, "--model", "python:workers.demo.multiview:build",
        "--checkpoint", str(checkpoint), "--layer", "features", "--methods", "gradcam,scorecam",
        "--views", "V0,V1", "--database-url", f"sqlite:///{tmp_path / 'r.db'}",
        "--storage-url", str(tmp_path / "m"),
    )  # fmt: skip
    assert proc.returncode == 2 and "do not support multi-view input" in proc.stderr
