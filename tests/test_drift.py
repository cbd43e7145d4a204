"""Run-to-run drift: the same run agrees with itself; a model that learned otherwise drifts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import delete, func, select, update
from torch import nn

from scheduler.analysis.drift import (
    _TOLERANCE,
    Box,
    ClassShift,
    DriftError,
    RunDiff,
    area_iou,
    cell_iou,
    centre_of_mass,
    common_frame,
    diff_runs,
    mass_shift,
    pearson,
)
from scheduler.finalize import finalize_run, store_class_drift
from schema.db import session_scope, upgrade
from schema.models import ClassDrift, Heatmap, Item, Run, RunQuality, Shard
from tests.test_e2e_embedded import run_cli
from workers.models import load_model
from workers.preprocess import Preprocess
from workers.synth import make_dataset

N_IMAGES = 12
N_CLASSES = 5
METHODS = ("gradcam", "cam")


def scrambled_demo() -> nn.Module:
    """The demo network with its last conv block and its head re-initialised: it attends elsewhere.

    Loaded by the CLI as ``python:tests.test_drift:scrambled_demo`` (input 224 x 224, so its
    maps and patch grid also differ in size from the demo run's).
    """
    model = load_model("demo").model
    torch.manual_seed(7)
    for module in [*model.features[-1].modules(), model.fc]:
        if isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
            module.reset_parameters()
    return model.eval()


@dataclass(frozen=True)
class Runs:
    db: str
    demo: str
    scrambled: str


def cli_run(manifest: Path, db: str, out: Path, *extra: str) -> str:
    proc = run_cli(
        "run",
        "--source",
        str(manifest),
        "--methods",
        ",".join(METHODS),
        "--database-url",
        db,
        "--storage-url",
        str(out),
        "--json",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished", status
    return str(status["run_id"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("drift")
    manifest = make_dataset(root / "data", N_IMAGES, seed=31)
    db = f"sqlite:///{root / 'runs.db'}"
    demo = cli_run(manifest, db, root / "heatmaps")
    # A different model, another storage folder, and every class explained.
    scrambled = cli_run(
        manifest,
        db,
        root / "heatmaps-2",
        "--model",
        "python:tests.test_drift:scrambled_demo",
        "--targets",
        "all",
    )
    return Runs(db, demo, scrambled)


def heatmap_count(db: str, run_id: str) -> int:
    with session_scope(db) as s:
        return int(s.execute(select(func.count()).where(Heatmap.run_id == run_id)).scalar_one())


# --------------------------------------------------------------------------- whole runs


def test_a_run_against_itself_has_not_moved(runs: Runs) -> None:
    diff = diff_runs(runs.db, runs.demo, runs.demo)
    assert diff.pairs == heatmap_count(runs.db, runs.demo) == N_IMAGES * len(METHODS)
    assert diff.common_items == N_IMAGES and diff.prediction_changed == 0
    assert diff.unmatched_a == diff.unmatched_b == 0
    assert diff.classes and not diff.drifted
    for c in diff.classes:
        assert c.mean_correlation == pytest.approx(1.0, abs=1e-9)
        assert c.mean_iou == 1.0
        assert c.centre_shift_px == 0.0 and c.l1_shift == 0.0
    assert sum(c.n for c in diff.classes) == diff.pairs
    assert all(m.correlation == pytest.approx(1.0, abs=1e-9) for m in diff.movers)


def test_a_model_that_learned_otherwise_has_drifted(runs: Runs) -> None:
    diff = diff_runs(runs.db, runs.demo, runs.scrambled, limit=5)
    # Every demo map has a partner: the scrambled run explained every class of every image.
    assert diff.pairs == N_IMAGES * len(METHODS)
    assert diff.unmatched_a == 0
    assert diff.unmatched_b == N_IMAGES * len(METHODS) * (N_CLASSES - 1)
    assert diff.mean_correlation is not None and diff.mean_correlation < 0.5
    assert diff.mean_iou is not None and diff.mean_iou < 0.5
    assert diff.drifted, [(c.label, c.mean_correlation) for c in diff.classes]
    # drifted means exactly: mean correlation below 1 - threshold
    assert all(c.drifted == (c.mean_correlation < 0.5) for c in diff.classes)
    # classes come least similar first, movers too, and there are as many movers as asked
    correlations = [c.mean_correlation for c in diff.classes]
    assert correlations == sorted(correlations)
    assert len(diff.movers) == 5
    assert [m.correlation for m in diff.movers] == sorted(m.correlation for m in diff.movers)
    # the movers are the least similar pairs of all: none of the others is lower
    everything = diff_runs(runs.db, runs.demo, runs.scrambled, limit=1000).movers
    assert len(everything) == diff.pairs
    assert [m.correlation for m in diff.movers] == sorted(m.correlation for m in everything)[:5]
    # a lenient threshold forgives the same maps
    assert not diff_runs(runs.db, runs.demo, runs.scrambled, threshold=1.0, limit=0).drifted


def test_diff_reports_names_and_is_json_ready(runs: Runs) -> None:
    report = diff_runs(runs.db, runs.demo, runs.scrambled, limit=3).as_dict()
    text = json.loads(json.dumps(report))
    assert text["run_a"] == runs.demo and text["run_b"] == runs.scrambled
    assert "1 - threshold" in text["rule"]
    assert {c["class_name"] for c in text["classes"]} <= {"circle", "square", "triangle", "cross", "ring"}
    assert len(text["movers"]) == 3 and all(Path(m["source_uri"]).is_file() for m in text["movers"])
    assert text["drifted"] == [
        f"{c['method']}/{c['layer']}/{c['class_name']}" for c in text["classes"] if c["drifted"]
    ]


def test_cli_diff_prints_tables_json_and_saves(runs: Runs) -> None:
    proc = run_cli("diff", runs.demo, runs.scrambled, "--json", "--save", "--database-url", runs.db)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["drifted"] and report["pairs"] == N_IMAGES * len(METHODS)
    with session_scope(runs.db) as s:
        stored = (
            s.execute(
                select(ClassDrift).where(
                    ClassDrift.run_id == runs.scrambled, ClassDrift.baseline_run_id == runs.demo
                )
            )
            .scalars()
            .all()
        )
    assert len(stored) == len(report["classes"])
    assert sum(r.drifted for r in stored) == len(report["drifted"])

    table = run_cli("diff", runs.demo, runs.demo, "--database-url", runs.db)
    assert table.returncode == 0, table.stderr
    own = diff_runs(runs.db, runs.demo, runs.demo)
    assert f"0 of {len(own.classes)}" in table.stdout and "heatmaps that changed most" in table.stdout


def test_unknown_runs_and_bad_options_are_refused(runs: Runs) -> None:
    with pytest.raises(DriftError, match=f"did you mean {runs.demo}"):
        diff_runs(runs.db, runs.demo[:-2], runs.scrambled)
    with pytest.raises(DriftError, match=r"threshold must be within \[0, 1\]"):
        diff_runs(runs.db, runs.demo, runs.scrambled, threshold=1.5)
    with pytest.raises(DriftError, match="limit"):
        diff_runs(runs.db, runs.demo, runs.scrambled, limit=-1)


def test_runs_that_name_classes_differently_are_not_compared(runs: Runs) -> None:
    reordered = ["square", "circle", "triangle", "cross", "ring"]
    with session_scope(runs.db) as s:
        s.execute(update(Run).where(Run.id == runs.scrambled).values(class_names=reordered))
    try:
        with pytest.raises(DriftError, match=r"name class 0 differently \('circle' vs 'square'\)"):
            diff_runs(runs.db, runs.demo, runs.scrambled)
    finally:
        with session_scope(runs.db) as s:
            s.execute(update(Run).where(Run.id == runs.scrambled).values(class_names=None))


# --------------------------------------------------------------------------- finalize


def drift_rows(db: str, run_id: str) -> list[tuple]:
    with session_scope(db) as s:
        rows = s.execute(
            select(ClassDrift).where(ClassDrift.run_id == run_id).order_by(ClassDrift.id)
        ).scalars()
        return [
            (r.id, r.baseline_run_id, r.method, r.layer, r.target_class, r.n, r.mean_correlation, r.drifted)
            for r in rows
        ]


def test_finalize_stores_drift_against_the_baseline_once(runs: Runs) -> None:
    with session_scope(runs.db) as s:
        s.execute(update(Run).where(Run.id == runs.scrambled).values(baseline_run_id=runs.demo))
    try:
        with session_scope(runs.db) as s:
            s.execute(ClassDrift.__table__.delete().where(ClassDrift.run_id == runs.scrambled))
        # a row the comparison no longer has (a class that vanished) must not survive finalisation
        with session_scope(runs.db) as s:
            s.add(
                ClassDrift(
                    run_id=runs.scrambled,
                    baseline_run_id=runs.demo,
                    method="gradcam",
                    layer="features",
                    target_class=99,
                    n=1,
                    mean_correlation=0.0,
                    mean_iou=0.0,
                    centre_shift_px=0.0,
                    l1_shift=0.0,
                    drifted=True,
                    threshold=0.5,
                )
            )
        finalize_run(runs.db, runs.scrambled)
        first = drift_rows(runs.db, runs.scrambled)
        finalize_run(runs.db, runs.scrambled)
        second = drift_rows(runs.db, runs.scrambled)
    finally:
        with session_scope(runs.db) as s:
            s.execute(update(Run).where(Run.id == runs.scrambled).values(baseline_run_id=None))
    assert first == second  # same ids, same values: upserted, not added
    expected = diff_runs(runs.db, runs.demo, runs.scrambled)
    assert sorted(r[2:5] for r in first) == sorted(
        (c.method, c.layer, c.target_class) for c in expected.classes
    )
    assert all(r[1] == runs.demo for r in first)
    by_key = {(c.method, c.layer, c.target_class): c for c in expected.classes}
    for row in first:
        shift = by_key[row[2:5]]
        assert row[5] == shift.n and row[7] == shift.drifted
        assert row[6] == pytest.approx(shift.mean_correlation)
    assert any(r[7] for r in first)
    with session_scope(runs.db) as s:
        quality = s.execute(select(RunQuality).where(RunQuality.run_id == runs.scrambled)).scalars().all()
    # this model names no classes, so the items' labels cannot say which map to score
    assert quality == []


def test_finalize_without_a_baseline_stores_quality_only(runs: Runs) -> None:
    finalize_run(runs.db, runs.demo)
    finalize_run(runs.db, runs.demo)
    with session_scope(runs.db) as s:
        assert s.execute(select(func.count()).where(ClassDrift.run_id == runs.demo)).scalar_one() == 0
        quality = s.execute(select(RunQuality).where(RunQuality.run_id == runs.demo)).scalars().all()
        boxed = s.execute(
            select(func.count()).where(Item.run_id == runs.demo, Item.box.is_not(None))
        ).scalar_one()
    assert sorted(q.method for q in quality) == sorted(METHODS)
    assert all(0 < q.n <= boxed and 0.0 <= q.pointing_game <= 1.0 for q in quality)


def test_finalize_refuses_a_run_in_progress(runs: Runs) -> None:
    with session_scope(runs.db) as s:
        s.execute(update(Run).where(Run.id == runs.demo).values(status="running"))
    try:
        with pytest.raises(ValueError, match="is running; finalise it once every shard"):
            finalize_run(runs.db, runs.demo)
    finally:
        with session_scope(runs.db) as s:
            s.execute(update(Run).where(Run.id == runs.demo).values(status="finished"))


def test_class_drift_upsert_on_postgresql(postgres_url: str) -> None:
    """The upsert and the removal of stale rows use row-value SQL, which PostgreSQL must accept too."""
    upgrade(postgres_url)
    common = {
        "model_ref": "demo",
        "methods": ["gradcam"],
        "layers": ["features"],
        "target_spec": "top1",
        "source_uri": "x",
        "output_uri": "y",
        "preprocess": {"size": [8, 8]},
        "patch_size": 4,
        "top_patches": 1,
        "config": {},
        "versions": {},
    }
    with session_scope(postgres_url) as s:
        s.add_all([Run(id="a", **common), Run(id="b", **common)])

    def shift(target: int, correlation: float) -> ClassShift:
        return ClassShift(
            "gradcam", "features", target, None, 3, correlation, 0.5, 1.0, 0.2, correlation < 0.5
        )

    def diff(*classes: ClassShift) -> RunDiff:
        return RunDiff("a", "b", 0.5, 3, 3, 3, 0, 3, 0, 0, 0.5, 0.5, list(classes))

    assert store_class_drift(postgres_url, diff(shift(0, 0.9), shift(1, 0.1))) == 2
    assert store_class_drift(postgres_url, diff(shift(0, 0.8))) == 1
    assert store_class_drift(postgres_url, diff(shift(0, 0.8))) == 1
    with session_scope(postgres_url) as s:
        rows = s.execute(
            select(ClassDrift.target_class, ClassDrift.mean_correlation, ClassDrift.drifted)
        ).all()
    assert rows == [(0, 0.8, False)]


# --------------------------------------------------------------------------- the measures


def test_pearson_is_scale_free_and_handles_flat_maps() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((7, 9))
    assert pearson(a, 3.0 * a + 2.0) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert pearson(np.zeros((4, 4)), a[:4, :4]) == 0.0
    assert pearson(a[:4, :4], np.full((4, 4), 2.0)) == 0.0
    b = rng.random((7, 9))
    assert pearson(a, b) == pytest.approx(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    # Rounding puts this map's correlation with itself at 1 + 2e-16 before the clamp: a
    # correlation is never outside [-1, 1].
    edge = np.random.default_rng(0).random((3, 4))
    assert pearson(edge, edge) == 1.0 and pearson(edge, -edge) == -1.0


def test_area_iou_matches_cell_iou_on_one_grid_and_handles_other_grids() -> None:
    def box(row: int, col: int, size: int = 10) -> tuple[int, int, int, int]:
        return col * size, row * size, (col + 1) * size, (row + 1) * size

    a = {(0, 0), (0, 1), (2, 2)}
    b = {(0, 1), (2, 2), (3, 3), (1, 1)}
    assert cell_iou(a, b) == pytest.approx(2 / 5)
    assert area_iou([box(*c) for c in a], [box(*c) for c in b]) == pytest.approx(2 / 5)
    # one 20 x 20 patch against the four 10 x 10 patches that tile it: the same area
    assert area_iou([(0, 0, 20, 20)], [box(r, c) for r in (0, 1) for c in (0, 1)]) == pytest.approx(1.0)
    assert area_iou([(0, 0, 20, 20)], [box(0, 0)]) == pytest.approx(100 / 400)
    assert area_iou([], []) == 1.0 and cell_iou(set(), set()) == 1.0


def test_mass_shift_and_centre_of_mass() -> None:
    left = np.zeros((4, 8))
    left[:, :4] = 1.0
    right = left[:, ::-1].copy()
    assert mass_shift(left, left * 5) == pytest.approx(0.0)
    assert mass_shift(left, right) == pytest.approx(1.0)
    half = left.copy()
    half[:, 4:6] = 1.0
    assert mass_shift(left, half) == pytest.approx(1 / 3)  # a third of the mass of `half` is new
    x, y = centre_of_mass(left)
    assert (x, y) == pytest.approx((0.25, 0.5))
    assert centre_of_mass(np.zeros((3, 3))) == (0.5, 0.5)
    # a map of little mass (here 0.32 in all) still has its centre where its mass is
    assert centre_of_mass(left * 0.01) == pytest.approx((0.25, 0.5))
    assert centre_of_mass(right * 0.01) == pytest.approx((0.75, 0.5))
    assert mass_shift(left * 0.01, right * 0.01) == pytest.approx(1.0)
    # a map without mass counts as spread evenly: half of `left`'s cells hold none of it
    assert mass_shift(np.zeros((4, 8)), left) == pytest.approx(0.5)
    assert mass_shift(right, np.zeros((4, 8))) == pytest.approx(0.5)
    assert mass_shift(np.zeros((4, 8)), np.zeros((4, 8))) == 0.0


# --------------------------------------------------------------------------- provenance


def test_shards_keep_their_provenance_and_drift_warns_on_precision_or_device(runs: Runs) -> None:
    with session_scope(runs.db) as s:
        shards = s.execute(select(Shard).where(Shard.run_id == runs.demo)).scalars().all()
        assert shards and {(sh.device_type, sh.autocast_dtype) for sh in shards} == {("cpu", "float32")}
        assert {sh.torch_version for sh in shards} == {torch.__version__}
        assert {(sh.tf32_matmul, sh.tf32_cudnn, sh.cudnn_version) for sh in shards} == {(None, None, None)}
    assert diff_runs(runs.db, runs.demo, runs.scrambled).warnings == []

    def set_precision(device: str | None, dtype: str | None, *, first_only: bool = False) -> None:
        with session_scope(runs.db) as s:
            ids = s.execute(
                select(Shard.id).where(Shard.run_id == runs.scrambled).order_by(Shard.index)
            ).scalars()
            ids = list(ids)[:1] if first_only else list(ids)
            s.execute(update(Shard).where(Shard.id.in_(ids)).values(device_type=device, autocast_dtype=dtype))

    try:
        set_precision("cuda", "bfloat16")
        warnings = diff_runs(runs.db, runs.demo, runs.scrambled).warnings
        assert len(warnings) == 1
        assert "differ in device and precision" in warnings[0]
        assert "cpu/float32" in warnings[0] and "cuda/bfloat16" in warnings[0]

        set_precision("cpu", "float32")
        with session_scope(runs.db) as s:  # one more shard, done in bf16
            s.add(
                Shard(
                    run_id=runs.scrambled,
                    index=999,
                    status="done",
                    device_type="cpu",
                    autocast_dtype="bfloat16",
                )
            )
        diff = diff_runs(runs.db, runs.demo, runs.scrambled)
        assert any(
            f"run {runs.scrambled} mixes shards computed as cpu/bfloat16 + cpu/float32" in w
            for w in diff.warnings
        )
        assert any("differ in precision" in w for w in diff.warnings)
        assert diff.as_dict()["warnings"] == diff.warnings
        with session_scope(runs.db) as s:
            s.execute(delete(Shard).where(Shard.run_id == runs.scrambled, Shard.index == 999))

        set_precision(None, None)  # shards stored before provenance was kept: nothing to compare
        assert diff_runs(runs.db, runs.demo, runs.scrambled).warnings == []
    finally:
        with session_scope(runs.db) as s:
            s.execute(delete(Shard).where(Shard.run_id == runs.scrambled, Shard.index == 999))
        set_precision("cpu", "float32")


def _raw_map_of_a_source_blob(pre: Preprocess, source: tuple[int, int], cells: int) -> np.ndarray:
    """A raw map whose cell values are a Gaussian around source pixel (300, 120), seen through ``pre``."""
    transform = pre.transform(*source)
    (in_w, in_h), (sx, sy), (ox, oy) = transform.input, transform.scale, transform.offset
    us = (np.arange(cells) + 0.5) * in_w / cells
    vs = (np.arange(cells) + 0.5) * in_h / cells
    xs, ys = (us - ox) / sx, (vs - oy) / sy
    return np.exp(-(((xs[None, :] - 300) / 70) ** 2) - (((ys[:, None] - 120) / 70) ** 2)).astype(np.float32)


def test_maps_of_differently_prepared_runs_are_compared_on_the_source_pixels_both_saw() -> None:
    source = (640, 320)
    plain = Preprocess((224, 224), (0.0,) * 3, (1.0,) * 3)
    crop = plain.with_overrides(resize="center-crop")
    letterbox = plain.with_overrides(resize="letterbox", size=(160, 160))
    stretched = _raw_map_of_a_source_blob(plain, source, 28)
    for other in (crop, letterbox):
        raw = _raw_map_of_a_source_blob(other, source, 20)
        a, b, frame = common_frame(stretched, plain.transform(*source), raw, other.transform(*source))
        assert pearson(a, b) > 0.97
        # Cell by cell, as if both runs had stretched, the same attention looks different.
        naive = pearson(
            stretched,
            np.asarray(
                F.interpolate(torch.from_numpy(raw)[None, None], size=(28, 28), mode="bilinear")[0, 0]
            ),
        )
        assert naive < 0.9
        ca, cb = centre_of_mass(a), centre_of_mass(b)
        assert math.hypot((ca[0] - cb[0]) * frame[1], (ca[1] - cb[1]) * frame[0]) < 3.0


# --------------------------------------------------------------------------- known answers
#
# Two runs written directly (rows as the shard writes them, maps as float16 .npy), so every
# map is known and the answers can be worked out by hand.


def store_runs(
    root: Path,
    maps_a: list[np.ndarray],
    maps_b: list[np.ndarray],
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    boxes: tuple[list[Box], list[Box]] = ([], []),
    *,
    resize: tuple[str, str] = ("stretch", "stretch"),
    source: tuple[int, int] | None = None,
    boxes_by_map: tuple[list[list[Box]], list[list[Box]]] | None = None,
    layers: list[str] | None = None,
) -> tuple[str, str, str]:
    """Runs A and B over the same images, one gradcam map of class 0 per image; (db, a, b).

    ``boxes`` are the top patches' boxes of every map of A and of B (``boxes_by_map``: of each
    map, in order), on the 8-pixel grid both runs record; ``resize`` how each run fitted its
    images to its input; ``source`` the images' (width, height), unrecorded if None;
    ``layers`` the layer of each image's map (``l`` for all if None).
    """
    from tests.test_results_pg import seed_run
    from workers import results
    from workers.heatmap_io import encode_npy
    from workers.storage import open_storage

    db = f"sqlite:///{root / 'runs.db'}"
    upgrade(db)
    ids = []
    for side, (name, maps, size) in enumerate((("a", maps_a, size_a), ("b", maps_b, size_b))):
        map_boxes = boxes_by_map[side] if boxes_by_map is not None else [boxes[side]] * len(maps)
        out = root / f"maps-{name}"
        seeded = seed_run(db, name, output_uri=str(out), n_items=len(maps), shard_size=len(maps))
        storage = open_storage(str(out))
        rows = []
        for item_id, raw, layer in zip(seeded.item_ids, maps, layers or ["l"] * len(maps), strict=True):
            key = f"runs/{name}/gradcam/{layer}/{item_id}/0"
            storage.put(key + ".npy", encode_npy(raw), "application/octet-stream")
            rows.append(
                {
                    "item_id": item_id,
                    "run_id": name,
                    "method": "gradcam",
                    "layer": layer,
                    "target_class": 0,
                    "target_score": 1.0,
                    "object_key": key + ".png",
                    "raw_key": key + ".npy",
                    "sha256": "",
                    "raw_max": float(raw.max()),
                    "raw_mean": float(raw.mean()),
                    "map_mean": 0.0,
                    "top_patch_fraction": 0.0,
                    "box_energy": None,
                    "box_hit": None,
                    "outside_mass": None,
                    "border_share": 0.0,
                }
            )
        with session_scope(db) as s:
            s.execute(
                update(Run)
                .where(Run.id == name)
                .values(preprocess={"size": list(size), "resize": resize[side]})
            )
            if source is not None:
                s.execute(update(Item).where(Item.run_id == name).values(width=source[0], height=source[1]))
            results.update_items(s, [{"id": i, "status": "done", "pred_class": 0} for i in seeded.item_ids])
            heatmap_ids = results.upsert_heatmaps(s, rows)
            results.upsert_patch_scores(
                s,
                [
                    {
                        "heatmap_id": heatmap_id,
                        "run_id": name,
                        "item_id": item_id,
                        "method": "gradcam",
                        "layer": layer,
                        "target_class": 0,
                        "rank": rank,
                        "row": y0 // 8,
                        "col": x0 // 8,
                        "x0": x0,
                        "y0": y0,
                        "x1": x1,
                        "y1": y1,
                        "score": 1.0 - rank / 10,
                    }
                    for (item_id, _, layer, _), heatmap_id in heatmap_ids.items()
                    for rank, (x0, y0, x1, y1) in enumerate(map_boxes[seeded.item_ids.index(item_id)])
                ],
            )
        ids.append(name)
    return db, ids[0], ids[1]


def blob(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    """A compact peak (weights 1-2-4) centred on one cell, zero elsewhere: its centre of mass is that cell."""
    out = np.zeros(shape, dtype=np.float32)
    out[row - 1 : row + 2, col - 1 : col + 2] = np.outer([1, 2, 1], [1, 2, 1])
    return out


def upsampled(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The same map seen on a finer grid (bilinear, half-pixel centres: how maps reach the input)."""
    tensor = torch.from_numpy(arr.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def test_one_blob_stored_at_7x7_and_at_14x14_has_not_moved(tmp_path: Path) -> None:
    """Maps of another resolution are compared on the finer grid, where the same blob is the same map."""
    coarse = [blob((7, 7), 2, 3), blob((7, 7), 4, 4), blob((7, 7), 3, 2)]
    fine = [upsampled(m, (14, 14)) for m in coarse]
    # other grids: the IoU is that of the covered areas, here one box against it and its twin
    boxes: tuple[list[Box], list[Box]] = ([(0, 0, 10, 10)], [(0, 0, 10, 10), (10, 0, 20, 10)])
    db, a, b = store_runs(tmp_path, coarse, fine, (112, 112), (224, 224), boxes)
    for first, second in ((a, b), (b, a)):
        diff = diff_runs(db, first, second, threshold=0.01)
        assert diff.pairs == 3
        for mover in diff.movers:
            assert mover.correlation == pytest.approx(1.0, abs=1e-4)
            assert mover.centre_shift_px == pytest.approx(0.0, abs=0.5)
            assert mover.iou == pytest.approx(0.5)
            assert (mover.method, mover.layer, mover.target_class, mover.class_name) == (
                "gradcam",
                "l",
                0,
                "circle",
            )
        assert sorted(m.source_uri for m in diff.movers) == [f"data/{n}.png" for n in range(3)]
        with session_scope(db) as s:
            items = dict(s.execute(select(Item.source_uri, Item.id).where(Item.run_id == second)).all())
        assert all(m.item_b == items[m.source_uri] for m in diff.movers)
        (shift,) = diff.classes
        assert (shift.method, shift.layer, shift.target_class, shift.class_name, shift.n) == (
            "gradcam",
            "l",
            0,
            "circle",
            3,
        )
        assert shift.mean_iou == pytest.approx(0.5) and diff.mean_iou == pytest.approx(0.5)
        assert shift.mean_correlation == pytest.approx(1.0, abs=1e-4) and not shift.drifted
        assert shift.l1_shift == pytest.approx(0.0, abs=1e-3)
        assert shift.centre_shift_px == pytest.approx(0.0, abs=0.5)


def test_a_blob_moved_by_a_known_offset_moves_the_centre_by_it(tmp_path: Path) -> None:
    """Three cells right and two up on a 10 x 14 map of a 224 wide, 112 high input.

    The maps sit on a constant floor, which min-max normalisation takes away.
    """
    before = [blob((10, 14), 4, 4) + 0.25, blob((10, 14), 6, 5) + 0.25]
    after = [blob((10, 14), 2, 7) + 0.25, blob((10, 14), 4, 8) + 0.25]
    db, a, b = store_runs(tmp_path, before, after, (112, 224), (112, 224))
    diff = diff_runs(db, a, b)
    expected_px = float(np.hypot(3 * 224 / 14, 2 * 112 / 10))
    assert diff.pairs == 2 and len(diff.movers) == 2
    for mover, (x, y) in zip(
        sorted(diff.movers, key=lambda m: m.item_a), zip(before, after, strict=True), strict=True
    ):
        assert mover.centre_shift_px == pytest.approx(expected_px, abs=1e-3)
        assert mover.correlation == pytest.approx(float(np.corrcoef(x.ravel(), y.ravel())[0, 1]), abs=1e-6)
    (shift,) = diff.classes
    assert shift.centre_shift_px == pytest.approx(expected_px, abs=1e-3)
    assert shift.l1_shift == pytest.approx(1.0), "the moved blobs do not overlap their old places"
    assert shift.drifted and diff.drifted == [shift]


def test_a_blob_moved_on_a_coarser_grid_is_measured_in_run_b_pixels(tmp_path: Path) -> None:
    """A at 7 x 7, B at 14 x 14 one coarse cell right and down: 1/7 of B's 224 x 112 input each way."""
    before = [blob((7, 7), 3, 3)]
    after = [upsampled(blob((7, 7), 4, 4), (14, 14))]
    db, a, b = store_runs(tmp_path, before, after, (64, 64), (112, 224))
    diff = diff_runs(db, a, b)
    expected_px = float(np.hypot(224 / 7, 112 / 7))
    (mover,) = diff.movers
    assert mover.centre_shift_px == pytest.approx(expected_px, abs=0.05)
    (shift,) = diff.classes
    assert shift.centre_shift_px == pytest.approx(expected_px, abs=0.05)


def test_movers_are_the_least_similar_pairs_most_changed_first(tmp_path: Path) -> None:
    """One pair unchanged, one moved a little, one moved far: the movers list the moved ones."""
    before = [blob((14, 14), 6, 6), blob((14, 14), 6, 6), blob((14, 14), 6, 6)]
    after = [blob((14, 14), 6, 6), blob((14, 14), 6, 7), blob((14, 14), 6, 10)]
    db, a, b = store_runs(tmp_path, before, after, (112, 112), (112, 112))
    expected = [float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) for x, y in zip(before, after, strict=True)]
    assert expected[0] > expected[1] > expected[2]
    diff = diff_runs(db, a, b, limit=2)
    with session_scope(db) as s:
        order = {
            item_id: n
            for n, item_id in enumerate(
                s.execute(select(Item.id).where(Item.run_id == a).order_by(Item.ordinal)).scalars()
            )
        }
    assert [order[m.item_a] for m in diff.movers] == [2, 1]
    assert [m.correlation for m in diff.movers] == pytest.approx([expected[2], expected[1]], abs=1e-6)
    assert [m.centre_shift_px for m in diff.movers] == pytest.approx([32.0, 8.0], abs=1e-3)
    assert diff.mean_correlation == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert (diff.pairs, diff.unmatched_a, diff.unmatched_b) == (3, 0, 0)
    assert diff_runs(db, a, b, limit=0).movers == []
    assert [order[m.item_a] for m in diff_runs(db, a, b, limit=1).movers] == [2]
    (shift,) = diff.classes
    assert shift.n == 3 and shift.mean_correlation == pytest.approx(sum(expected) / 3, abs=1e-6)
    # The class compares its mean maps: B's three blobs (columns 6, 7 and 10) average to a
    # centre at column 23/3, 5/3 of a cell (8 px) right of A's. Every blob has the same row
    # profile, so the mass that moved is that of the column profiles [1, 2, 1] / 4: A's
    # columns 5-7 hold 12, 24, 12 of 48 parts where B's hold 4, 12, 12, so 20/48 moved.
    assert shift.centre_shift_px == pytest.approx(5 / 3 * 8, abs=1e-3)
    assert shift.l1_shift == pytest.approx(20 / 48, abs=1e-6)
    # a class is drifted exactly when its mean correlation is below 1 - threshold
    assert not diff_runs(db, a, b, threshold=1 - shift.mean_correlation + 1e-3).classes[0].drifted
    assert diff_runs(db, a, b, threshold=1 - shift.mean_correlation - 1e-3).classes[0].drifted


def test_runs_that_fit_a_narrow_image_differently_compare_the_rows_both_saw(tmp_path: Path) -> None:
    """A 1 x 64 source: run A stretches it to 8 x 8, run B centre-crops its middle row.

    A's map is row + column, B's is column. B sees only source rows 31.5-32.5, where A's
    eight rows span 3.4375 + (r + 0.5) / 64, so on the common grid A is the column plus a
    ramp of variance 1/4096 of the column's: correlation 1 / sqrt(1 + 1/4096). Compared
    cell by cell (as if both had stretched) it would be 1 / sqrt(2).
    """
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float32)
    db, a, b = store_runs(
        tmp_path, [rows + cols], [cols], (8, 8), (8, 8), resize=("stretch", "center-crop"), source=(1, 64)
    )
    (mover,) = diff_runs(db, a, b).movers
    assert mover.correlation == pytest.approx(1 / math.sqrt(1 + 1 / 4096), abs=1e-6)


def test_movers_that_tie_on_correlation_are_ranked_by_iou_then_kept_in_run_order(tmp_path: Path) -> None:
    """Four unchanged maps (correlation 1) whose top patches overlap 1, 1/2, 0 and 1/2."""
    same = [blob((14, 14), 6, 6)] * 4
    cell, right, low = (0, 0, 8, 8), (8, 0, 16, 8), (8, 8, 16, 16)
    boxes_a: list[list[Box]] = [[cell], [cell, right], [cell], [cell, right]]
    boxes_b: list[list[Box]] = [[cell], [cell], [low], [cell]]
    db, a, b = store_runs(tmp_path, same, same, (112, 112), (112, 112), boxes_by_map=(boxes_a, boxes_b))
    with session_scope(db) as s:
        order = {
            item_id: n
            for n, item_id in enumerate(
                s.execute(select(Item.id).where(Item.run_id == a).order_by(Item.ordinal)).scalars()
            )
        }
    movers = diff_runs(db, a, b, limit=3).movers
    assert [m.iou for m in movers] == [0.0, 0.5, 0.5]
    assert [order[m.item_a] for m in movers] == [2, 1, 3]
    assert [order[m.item_a] for m in diff_runs(db, a, b, limit=2).movers] == [2, 1]


def test_classes_come_least_similar_first_and_drift_strictly_below_the_bound(tmp_path: Path) -> None:
    """Layer ``a`` kept its two maps, layer ``b`` moved both a cell: ``b`` is listed first, drifted."""
    still, moved = blob((8, 8), 2, 2), blob((8, 8), 2, 3)
    layers = ["a", "a", "b", "b"]
    db, a, b = store_runs(
        tmp_path, [still] * 4, [still, still, moved, moved], (64, 64), (64, 64), layers=layers
    )
    expected = float(np.corrcoef(still.ravel(), moved.ravel())[0, 1])
    diff = diff_runs(db, a, b, threshold=0.0)
    assert [(c.layer, c.n) for c in diff.classes] == [("b", 2), ("a", 2)]
    moved_class, kept_class = diff.classes
    assert moved_class.mean_correlation == pytest.approx(expected, abs=1e-6) and moved_class.drifted
    # unchanged maps are not drifted even at threshold 0: rounding is no drift
    assert kept_class.mean_correlation == pytest.approx(1.0, abs=1e-9) and not kept_class.drifted
    assert diff.drifted == [moved_class]
    # "below 1 - threshold" is strict: a class exactly at the bound (after the rounding
    # allowance) is not drifted, one a hair below it is
    bound = 1.0 - moved_class.mean_correlation - _TOLERANCE
    while 1.0 - bound - _TOLERANCE > moved_class.mean_correlation:
        bound = float(np.nextafter(bound, 2.0))
    while 1.0 - bound - _TOLERANCE < moved_class.mean_correlation:
        bound = float(np.nextafter(bound, -1.0))
    assert 1.0 - bound - _TOLERANCE == moved_class.mean_correlation
    assert not diff_runs(db, a, b, threshold=bound, limit=0).classes[0].drifted
    assert diff_runs(db, a, b, threshold=bound - 1e-12, limit=0).classes[0].drifted


def test_resample_returns_float32_maps_on_either_grid() -> None:
    """Stored maps are float16; every measure reads them as float32, resampled or not."""
    from scheduler.analysis.drift import resample

    stored = blob((7, 7), 3, 3).astype(np.float16)
    same = resample(stored, (7, 7))
    finer = resample(stored, (14, 14))
    assert same.dtype == np.float32 and finer.dtype == np.float32
    np.testing.assert_array_equal(same, stored.astype(np.float32))
    np.testing.assert_allclose(finer, upsampled(stored.astype(np.float32), (14, 14)), rtol=0, atol=0)


def test_resample_and_normalise_treat_a_missing_value_as_no_attention() -> None:
    """A NaN cell counts as zero before min-max, so it cannot become the peak of a map."""
    from scheduler.analysis.drift import normalise

    found = normalise(np.array([[np.nan, 1.0], [0.0, 2.0]], dtype=np.float16))
    assert found.dtype == np.float32
    np.testing.assert_array_equal(found, np.array([[0.0, 0.5], [0.0, 1.0]], dtype=np.float32))
    # the minimum goes to 0 and the maximum to 1 whatever the floor
    np.testing.assert_array_equal(
        normalise(np.array([[1.0, 3.0], [2.0, 5.0]])), np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    )
    flat = normalise(np.full((3, 3), 4.0))
    assert flat.shape == (3, 3) and flat.dtype == np.float32
    assert not flat.any(), "a flat map normalises to zeros"
