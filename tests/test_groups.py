"""Grouped items (the views of one case) are planned into one shard; ``synth --views`` writes such cases."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler.grouping import cut_shards
from scheduler.groups import fuse
from schema.db import session_scope
from schema.models import Group, Item, Shard
from tests.test_e2e_embedded import run_cli


def test_groups_are_never_split_and_singles_fill_the_gaps() -> None:
    groups = ["a", None, "b", "a", "b", None, "c", "c", "c", None, "a"]
    shards = cut_shards(groups, 4)
    for group in ("a", "b", "c"):
        assert len({s for g, s in zip(groups, shards, strict=True) if g == group}) == 1
    sizes = defaultdict(int)
    for shard in shards:
        sizes[shard] += 1
    assert max(sizes.values()) <= 4 and sorted(sizes) == list(range(len(sizes)))
    assert cut_shards([None] * 7, 3) == [0, 0, 0, 1, 1, 1, 2]  # ungrouped: as before
    assert cut_shards(["big"] * 5 + [None], 2) == [0] * 5 + [1]  # a group larger than a shard stays whole
    assert cut_shards([], 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        cut_shards(["a"], 0)


def test_synth_views_run_keeps_each_case_in_one_shard(tmp_path: Path) -> None:
    proc = run_cli("synth", "--out", str(tmp_path / "data"), "--n", "5", "--seed", "3", "--views", "2")
    assert proc.returncode == 0, proc.stderr
    manifest = tmp_path / "data" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 10 and [r["view"] for r in rows[:2]] == ["V0", "V1"]
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        assert first["group_id"] == second["group_id"] and first["label"] == second["label"]
        assert first["box"] != second["box"]  # two views, two images
    broken = tmp_path / "data" / rows[9]["uri"]
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")  # case 4 loses its second view
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = run_cli(
        "run", "--source", str(manifest), "--methods", "gradcam", "--shard-size", "3",
        "--database-url", db, "--storage-url", str(tmp_path / "maps"), "--json", "--group-fusion", "max",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished" and status["done"] == 9
    assert (status["groups"], status["groups_done"], status["groups_failed"]) == (5, 4, 1)
    with session_scope(db) as session:
        groups = {g.group_id: g for g in session.execute(select(Group)).scalars()}
        session.expunge_all()
    failed = groups["case000004"]
    assert failed.status == "failed" and broken.name in (failed.error or "") and failed.pred_class is None
    for case, first in zip(sorted(groups)[:4], rows[::2], strict=False):
        group = groups[case]
        assert group.fusion == "max" and group.n_items == 2 and group.label == first["label"]
        assert group.score is not None and 0 < group.score <= 1 and group.pred_class is not None
    listed = run_cli(
        "top", "--run", status["run_id"], "--class", "0", "--method", "gradcam", "--by", "group",
        "--limit", "10", "--json", "--database-url", db,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    cases = json.loads(listed.stdout)
    assert len({c["group_id"] for c in cases}) == len(cases) >= 1
    scores = [c["score"] for c in cases]
    assert scores == sorted(scores, reverse=True)
    with session_scope(db) as session:
        items = session.execute(
            select(Item.group_id, Item.shard_id, Item.ordinal).order_by(Item.ordinal)
        ).all()
        counts = dict(session.execute(select(Shard.id, Shard.n_items)).all())
    by_group = defaultdict(set)
    for group, shard, _ in items:
        by_group[group].add(shard)
    assert all(len(shards) == 1 for shards in by_group.values()) and len(by_group) == 5
    assert [ordinal for *_, ordinal in items] == list(range(10))
    assert sorted(counts.values()) == [2] * 5  # a third view would split a case: shards of 2, not 3


def test_fusion_of_view_probabilities() -> None:
    views = [
        [{"class": 0, "prob": 0.6}, {"class": 1, "prob": 0.4}],
        [{"class": 1, "prob": 0.9}, {"class": 2, "prob": 0.1}],
    ]
    assert fuse(views, "mean") == pytest.approx({0: 0.3, 1: 0.65, 2: 0.05})
    assert fuse(views, "max") == pytest.approx({0: 0.6, 1: 0.9, 2: 0.1})
    with pytest.raises(ValueError, match="mean, max"):
        fuse(views, "median")


def test_bad_views_are_refused(tmp_path: Path) -> None:
    for args, reason in (
        (("--views", "9"), "within 2..8"),
        (("--views", "2", "--shortcut", "corner"), "combine"),
    ):
        proc = run_cli("synth", "--out", str(tmp_path / "x"), "--n", "2", *args)
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
