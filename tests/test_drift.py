"""Run-to-run drift: the same run agrees with itself; a model that learned otherwise drifts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, update
from torch import nn

from scheduler.analysis.drift import (
    ClassShift,
    DriftError,
    RunDiff,
    area_iou,
    cell_iou,
    centre_of_mass,
    diff_runs,
    mass_shift,
    pearson,
)
from scheduler.finalize import finalize_run, store_class_drift
from schema.db import session_scope, upgrade
from schema.models import ClassDrift, Heatmap, Item, Run, RunQuality
from tests.test_e2e_embedded import run_cli
from workers.models import load_model
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
    b = rng.random((7, 9))
    assert pearson(a, b) == pytest.approx(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))


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
