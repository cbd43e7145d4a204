"""Grouped items (the views of one case) are planned into one shard; ``synth --views`` writes such cases."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from scheduler.grouping import cut_shards
from scheduler.groups import _group_row, fuse
from schema.db import session_scope
from schema.models import Group, Heatmap, Item, ItemStatus, Run, Shard
from tests.test_e2e_embedded import run_cli
from workers.heatmap_io import overlay_rgb
from workers.map_reads import MapRef, read_map_raw
from workers.storage import open_storage


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


def test_a_binary_heads_case_is_decided_by_its_fused_sigmoid() -> None:
    """A single logit's views carry its sigmoid; the case is positive (1) when their fusion is above 0.5."""
    run = Run(id="r", class_names=["lesion"], target_spec="positive")

    def case(label: str, *probs: float) -> dict[str, object]:
        views = [
            Item(
                status=ItemStatus.DONE,
                label=label,
                source_uri=f"v{n}.png",
                predictions=[{"class": 0, "prob": p}],
            )
            for n, p in enumerate(probs)
        ]
        return _group_row(run, "case", views, "mean")

    positive = case("lesion", 0.9, 0.4)
    assert (positive["pred_class"], positive["correct"]) == (1, True)
    assert positive["score"] == pytest.approx(0.65)
    negative = case("lesion", 0.3, 0.4)
    assert (negative["pred_class"], negative["correct"]) == (0, False)
    assert negative["score"] == pytest.approx(0.65)
    assert case("healthy", 0.3, 0.4)["correct"] is True


def test_bad_views_are_refused(tmp_path: Path) -> None:
    for args, reason in (
        (("--views", "9"), "within 2..8"),
        (("--views", "2", "--shortcut", "corner"), "combine"),
    ):
        proc = run_cli("synth", "--out", str(tmp_path / "x"), "--n", "2", *args)
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr


def test_web_shows_a_case_side_by_side_on_one_colour_scale(tmp_path: Path) -> None:
    import io
    import re

    from fastapi.testclient import TestClient
    from PIL import Image

    from scheduler.web.app import create_app

    assert (
        run_cli("synth", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "4", "--views", "2").returncode
        == 0
    )
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = run_cli(
        "run", "--source", str(tmp_path / "d" / "manifest.jsonl"), "--methods", "gradcam",
        "--database-url", db, "--storage-url", str(tmp_path / "maps"), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    client = TestClient(create_app(db), base_url="http://localhost")
    page = client.get(f"/runs/{run_id}/groups/case000000")
    assert page.status_code == 200, page.text
    sources = re.findall(r'src="(/heatmaps/\d+/shared\.jpg\?vmax=[^"]+)"', page.text)
    assert len(sources) == 2 and len({s.split("?")[1] for s in sources}) == 1  # one vmax for both views
    with session_scope(db) as session:
        peaks = dict(
            session.execute(
                select(Item.id, Heatmap.raw_max)
                .join(Heatmap, Heatmap.item_id == Item.id)
                .where(Item.group_id == "case000000")
            ).all()
        )
    vmax = float(re.search(r'data-vmax="([^"]+)"', page.text).group(1))  # type: ignore[union-attr]
    assert vmax == pytest.approx(max(peaks.values()))
    storage = open_storage(str(tmp_path / "maps"))
    with session_scope(db) as session:
        shown = {
            h.id: (MapRef.of(h), h.raw_max, uri)
            for h, uri in session.execute(
                select(Heatmap, Item.source_uri).join(Item, Item.id == Heatmap.item_id)
                .where(Item.group_id == "case000000")
            ).all()
        }  # fmt: skip
    for src in sources:
        image = client.get(src.replace("&amp;", "&"))
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(image.content)) as jpeg:
            got = np.asarray(jpeg.convert("RGB"), dtype=np.float64)
        stored, own_max, uri = shown[int(src.split("/")[2])]
        raw = read_map_raw(storage, stored).astype(np.float32)
        with Image.open(uri) as source:
            base = source.convert("RGB")
            base.thumbnail((512, 512), Image.Resampling.BILINEAR)
        shared = overlay_rgb(base, np.clip(raw / vmax, 0, 1)).astype(np.float64)
        own = overlay_rgb(base, np.clip(raw / own_max, 0, 1)).astype(np.float64)
        assert np.abs(got - shared).mean() < 6.0  # JPEG noise on a noisy image only
        if own_max < vmax * 0.95:  # the weaker view: not stretched to its own peak
            assert np.abs(got - own).mean() > np.abs(got - shared).mean() + 2.0
    item = client.get(f"/items/{min(peaks)}")
    assert 'id="case"' in item.text and f"/runs/{run_id}/groups/case000000" in item.text
    missing = client.get(f"/runs/{run_id}/groups/case00000")
    assert missing.status_code == 404 and "did you mean" in missing.text and "case000000" in missing.text
    heatmap = sources[0].split("/")[2]
    for vmax_text in ("0", "-1", "nan", "inf"):
        assert client.get(f"/heatmaps/{heatmap}/shared.jpg?vmax={vmax_text}").status_code == 400
    assert client.get("/heatmaps/999999/shared.jpg?vmax=1").status_code == 404
