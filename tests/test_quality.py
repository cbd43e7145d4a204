"""Explanation quality of a real demo run: localisation, faithfulness, and the randomisation check."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, update

from scheduler.analysis.quality import (
    Faithfulness,
    QualityError,
    box_mask,
    faithfulness,
    localisation,
    parameterised_modules,
    point_and_energy,
    randomised_copy,
    sanity_check,
)
from schema.db import session_scope
from schema.models import Item, Run
from tests.test_drift import cli_run
from tests.test_e2e_embedded import run_cli
from workers.models import load_model
from workers.synth import make_dataset

N_IMAGES = 16
SAMPLE = 6
STEPS = 10


@dataclass(frozen=True)
class DemoRun:
    db: str
    run_id: str


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("quality")
    manifest = make_dataset(root / "data", N_IMAGES, seed=41)
    db = f"sqlite:///{root / 'runs.db'}"
    return DemoRun(db, cli_run(manifest, db, root / "heatmaps"))


@pytest.fixture(scope="module")
def curves(demo_run: DemoRun) -> dict[str, Faithfulness]:
    found = faithfulness(demo_run.db, demo_run.run_id, sample=SAMPLE, steps=STEPS, device="cpu")
    return {f.method: f for f in found}


# --------------------------------------------------------------------------- localisation


def test_maps_point_into_the_object_box(demo_run: DemoRun) -> None:
    report = localisation(demo_run.db, demo_run.run_id)
    assert report.boxed_items == N_IMAGES
    gradcam = report.get("gradcam")
    assert gradcam.n == N_IMAGES - report.unexplained >= N_IMAGES - 2
    assert gradcam.pointing_game >= 0.9
    # the maps put far more of their mass in the box than an even spread would
    assert gradcam.energy_in_box > 2 * gradcam.box_fraction
    per_class = [r for r in report.classes if r.method == "gradcam"]
    assert sum(r.n for r in per_class) == gradcam.n
    assert {r.class_name for r in per_class} <= {"circle", "square", "triangle", "cross", "ring"}
    hits = sum(round(r.pointing_game * r.n) for r in per_class)
    assert hits == round(gradcam.pointing_game * gradcam.n)


def test_localisation_can_read_a_spread_sample(demo_run: DemoRun) -> None:
    report = localisation(demo_run.db, demo_run.run_id, max_items=5)
    assert report.boxed_items == 5
    assert all(r.n <= 5 for r in report.methods)


def test_box_maps_from_source_to_input_pixels() -> None:
    # source 200 x 100 (W x H) stretched to a 10 x 10 input: one input pixel is 20 x 10 source pixels
    mask = box_mask([40, 20, 100, 50], (200, 100), (10, 10))
    xs = np.flatnonzero(mask.any(axis=0))
    ys = np.flatnonzero(mask.any(axis=1))
    # centres at 20 * (x + 0.5) in [40, 100] -> x in 2..4; at 10 * (y + 0.5) in [20, 50] -> y in 2..4
    assert xs.tolist() == [2, 3, 4] and ys.tolist() == [2, 3, 4]
    levels = np.zeros((10, 10), dtype=np.uint8)
    levels[3, 3] = 200  # inside
    levels[8, 8] = 100  # outside
    hit, energy = point_and_energy(levels, mask)
    assert hit and energy == pytest.approx(200 / 300)
    levels[8, 8] = 255
    hit, _ = point_and_energy(levels, mask)
    assert not hit


# --------------------------------------------------------------------------- faithfulness


def test_stored_maps_beat_a_random_pixel_order(curves: dict[str, Faithfulness]) -> None:
    random = curves["random"]
    for method in ("gradcam", "cam"):
        found = curves[method]
        assert found.n == SAMPLE
        assert found.deletion_auc < random.deletion_auc - 0.05, (found, random)
        assert found.insertion_auc > random.insertion_auc + 0.05, (found, random)


def test_curves_start_and_end_on_the_same_images(curves: dict[str, Faithfulness]) -> None:
    """Deletion starts, and insertion ends, on the untouched image; all methods share both ends."""
    reference = curves["random"]
    for found in curves.values():
        assert len(found.deletion_curve) == len(found.insertion_curve) == STEPS + 1
        assert found.deletion_curve[0] == pytest.approx(found.insertion_curve[-1], abs=1e-6)
        assert found.deletion_curve[0] == pytest.approx(reference.deletion_curve[0], abs=1e-6)
        assert found.deletion_curve[-1] == pytest.approx(reference.deletion_curve[-1], abs=1e-6)
        assert found.insertion_curve[0] == pytest.approx(reference.insertion_curve[0], abs=1e-6)
        assert np.trapezoid(found.deletion_curve, dx=1 / STEPS) == pytest.approx(found.deletion_auc)
    # the demo model recognises its own images
    assert reference.deletion_curve[0] > 0.8


def test_a_changed_checkpoint_is_refused(demo_run: DemoRun) -> None:
    with session_scope(demo_run.db) as s:
        real = s.execute(select(Run.checkpoint_sha256).where(Run.id == demo_run.run_id)).scalar_one()
        s.execute(update(Run).where(Run.id == demo_run.run_id).values(checkpoint_sha256="0" * 64))
    try:
        with pytest.raises(QualityError, match="changed since the run"):
            faithfulness(demo_run.db, demo_run.run_id, sample=1, device="cpu")
    finally:
        with session_scope(demo_run.db) as s:
            s.execute(update(Run).where(Run.id == demo_run.run_id).values(checkpoint_sha256=real))


# --------------------------------------------------------------------------- sanity check


def test_maps_of_a_randomised_model_differ(demo_run: DemoRun) -> None:
    checks = {c.method: c for c in sanity_check(demo_run.db, demo_run.run_id, sample=SAMPLE, device="cpu")}
    assert set(checks) == {"gradcam", "cam"}
    for check in checks.values():
        assert check.n == SAMPLE
        assert check.randomised == ["features.5.0", "features.5.1", "fc"]
        assert check.mean_correlation < 0.5, check


def test_randomised_copy_changes_only_the_last_modules() -> None:
    model = load_model("demo").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = parameterised_modules(model)
    assert names[-1] == "fc" and len(names) == 13  # six conv + batch-norm blocks and the head
    clone, picked = randomised_copy(model, 2, seed=3)
    assert picked == names[-2:]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    changed = {k.rsplit(".", 1)[0] for k, v in clone.state_dict().items() if not torch.equal(before[k], v)}
    assert changed <= set(picked) and "fc" in changed
    again, _ = randomised_copy(model, 2, seed=3)
    pairs = zip(clone.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(QualityError, match=r"within 1\.\.13"):
        randomised_copy(model, 14)


# --------------------------------------------------------------------------- errors and the CLI


def test_unknown_run_and_bad_sample_are_refused(demo_run: DemoRun) -> None:
    with pytest.raises(QualityError, match=f"did you mean {demo_run.run_id}"):
        localisation(demo_run.db, demo_run.run_id[:-1])
    with pytest.raises(QualityError, match="sample"):
        faithfulness(demo_run.db, demo_run.run_id, sample=0, device="cpu")


def test_cli_quality_json(demo_run: DemoRun) -> None:
    proc = run_cli(
        "quality",
        demo_run.run_id,
        "--sample",
        "3",
        "--device",
        "cpu",
        "--json",
        "--database-url",
        demo_run.db,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    local = localisation(demo_run.db, demo_run.run_id)
    by_method = {r["method"]: r for r in report["localisation"]["methods"]}
    assert by_method["gradcam"]["pointing_game"] == pytest.approx(local.get("gradcam").pointing_game)
    assert {f["method"] for f in report["faithfulness"]} == {"gradcam", "cam", "random"}
    assert all(f["n"] == 3 for f in report["faithfulness"])
    assert {s["method"] for s in report["sanity"]} == {"gradcam", "cam"}

    wide = {**os.environ, "COLUMNS": "200"}
    table = run_cli("quality", demo_run.run_id, "--no-faithfulness", "--database-url", demo_run.db, env=wide)
    assert table.returncode == 0, table.stderr
    assert "pointing game" in table.stdout and "faithfulness" not in table.stdout
    gradcam = local.get("gradcam")
    assert f"{gradcam.pointing_game:.3f}" in table.stdout and f"{gradcam.energy_in_box:.3f}" in table.stdout
    with session_scope(demo_run.db) as s:
        boxed = s.execute(select(func.count()).where(Item.run_id == demo_run.run_id)).scalar_one()
    assert f"{boxed} items with a label and a box" in table.stdout


def test_quality_uses_the_sources_the_run_read(demo_run: DemoRun, tmp_path: Path) -> None:
    """Items whose source image is gone are replaced by others in the sample."""
    with session_scope(demo_run.db) as s:
        first = s.execute(
            select(Item.id, Item.source_uri)
            .where(Item.run_id == demo_run.run_id)
            .order_by(Item.ordinal)
            .limit(1)
        ).one()
        s.execute(update(Item).where(Item.id == first.id).values(source_uri=str(tmp_path / "gone.png")))
    try:
        found = faithfulness(demo_run.db, demo_run.run_id, sample=N_IMAGES, steps=2, device="cpu")
    finally:
        with session_scope(demo_run.db) as s:
            s.execute(update(Item).where(Item.id == first.id).values(source_uri=first.source_uri))
    assert {f.n for f in found} == {N_IMAGES - 1}
