"""Explanation quality of a real demo run: localisation, faithfulness, and the randomisation check."""

from __future__ import annotations

import io
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select, update
from torch import nn

from scheduler.analysis.quality import (
    Faithfulness,
    QualityError,
    _faithfulness,
    _Sample,
    _sanity,
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
from tests import by_hand
from tests.plugins.runs import DemoRun
from tests.test_e2e_embedded import run_cli
from workers.map_reads import MapRef
from workers.models import LoadedModel, load_model
from workers.preprocess import Preprocess
from workers.storage import LocalStorage

SAMPLE = 6
STEPS = 10


@pytest.fixture(scope="module")
def curves(demo_run: DemoRun) -> dict[str, Faithfulness]:
    found = faithfulness(demo_run.db, demo_run.run_id, sample=SAMPLE, steps=STEPS, device="cpu")
    return {f.method: f for f in found}


# --------------------------------------------------------------------------- localisation


def test_maps_point_into_the_object_box(demo_run: DemoRun) -> None:
    report = localisation(demo_run.db, demo_run.run_id)
    assert report.boxed_items == demo_run.n_items
    gradcam = report.get("gradcam")
    assert gradcam.n == demo_run.n_items - report.unexplained >= demo_run.n_items - 2
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
    mask = box_mask([40, 20, 100, 50], Preprocess((10, 10), (0.0,) * 3, (1.0,) * 3).transform(200, 100))
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


def test_box_mask_follows_a_centre_crop_and_boxes_outside_it_are_clipped() -> None:
    # 200 x 100 source, shorter side to 20 -> 40 x 20, centre 10 x 10 crop at (15, 5): 5 source px a pixel
    pre = Preprocess((10, 10), (0.0,) * 3, (1.0,) * 3, resize="center-crop", resize_to=(20, 20))
    transform = pre.transform(200, 100)
    assert transform.offset == (-15, -5) and transform.visible_source() == (75.0, 25.0, 125.0, 75.0)
    mask = box_mask([100, 40, 120, 60], transform)
    # centres at 5 * (x + 15.5) in [100, 120] -> x in 5..8; at 5 * (y + 5.5) in [40, 60] -> y in 3..6
    assert np.flatnonzero(mask.any(axis=0)).tolist() == [5, 6, 7, 8]
    assert np.flatnonzero(mask.any(axis=1)).tolist() == [3, 4, 5, 6]
    assert not transform.clips([100, 40, 120, 60])
    assert transform.clips([60, 40, 120, 60]) and transform.clips([100, 10, 120, 60])


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


@pytest.mark.slow
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


@pytest.mark.slow
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
        found = faithfulness(demo_run.db, demo_run.run_id, sample=demo_run.n_items, steps=2, device="cpu")
    finally:
        with session_scope(demo_run.db) as s:
            s.execute(update(Item).where(Item.id == first.id).values(source_uri=first.source_uri))
    assert {f.n for f in found} == {demo_run.n_items - 1}


def test_localisation_matches_a_hand_computation_from_the_stored_maps(demo_run: DemoRun) -> None:
    """The stored PNGs and item boxes, read with sqlite3 and PIL and scored with numpy."""
    methods, classes = by_hand.localisation(demo_run.db, demo_run.run_id)
    report = localisation(demo_run.db, demo_run.run_id)
    assert {r.method for r in report.methods} == set(methods) == {"gradcam", "cam"}
    for row in report.methods:
        expected = methods[row.method]
        assert row.n == expected.n
        assert row.pointing_game == pytest.approx(expected.pointing_game)
        assert row.energy_in_box == pytest.approx(expected.energy_in_box)
        assert row.box_fraction == pytest.approx(expected.box_fraction)
    assert {(r.method, r.target_class) for r in report.classes} == set(classes)
    for row in report.classes:
        expected = classes[row.method, row.target_class]
        assert (row.n, row.pointing_game) == (expected.n, pytest.approx(expected.pointing_game))
        assert row.energy_in_box == pytest.approx(expected.energy_in_box)


# --------------------------------------------------------------------------- known answers


class LinearProbability(nn.Module):
    """Class 0's softmax probability is ``0.05 + 0.9 * sum(weights * channel 0)``, exactly."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = 0.05 + 0.9 * (x[:, 0] * self.weights).sum(dim=(1, 2))
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def _png(levels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(levels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_deletion_and_insertion_of_a_linear_model_follow_the_closed_form(tmp_path: Path) -> None:
    """A 10 x 10 image with four lit pixels, a model whose probability is linear in them, and a map
    that ranks them by weight: removing one pixel a step, the curves are known sums of weights."""
    spots, weights = [(2, 2), (2, 7), (7, 2), (7, 7)], [0.4, 0.3, 0.2, 0.1]
    w = torch.zeros(10, 10)
    image = torch.zeros(3, 10, 10)
    saliency = np.zeros((10, 10))
    for (y, x), weight, level in zip(spots, weights, (250, 200, 150, 100), strict=True):
        w[y, x], image[0, y, x], saliency[y, x] = weight, 1.0, level
    storage = LocalStorage(tmp_path)
    storage.put("map.png", _png(saliency))
    sample = _Sample(
        item_ids=[1],
        images=image[None],
        targets=torch.tensor([0]),
        maps={("linear", "pixels"): {0: MapRef("map.png", "map.npy")}},
    )
    loaded = cast(LoadedModel, SimpleNamespace(model=LinearProbability(w)))
    steps = 100  # one pixel a step
    found = {f.method: f for f in _faithfulness(loaded, sample, storage, steps, seed=0, batch_size=64)}
    assert set(found) == {"linear", "random"} and found["linear"].n == found["random"].n == 1
    # A lit pixel blurred (sigma 0.5, a 5-tap kernel; its neighbours within 2 are dark) keeps the
    # centre tap of the normalised 2-D Gaussian.
    g0 = (1 / sum(math.exp(-2 * m * m) for m in range(-2, 3))) ** 2
    deletion = [0.05 + 0.9 * sum(weights[k:]) for k in range(steps + 1)]
    insertion = [0.05 + 0.9 * (sum(weights[:k]) + g0 * sum(weights[k:])) for k in range(steps + 1)]
    linear = found["linear"]
    assert linear.deletion_curve == pytest.approx(deletion, abs=1e-6)
    assert linear.insertion_curve == pytest.approx(insertion, abs=1e-6)
    # trapezoids of width 1 / steps: the inner points once, the two ends half
    for curve, auc in ((deletion, linear.deletion_auc), (insertion, linear.insertion_auc)):
        assert auc == pytest.approx((sum(curve) - (curve[0] + curve[-1]) / 2) / steps, abs=1e-6)
    # any order starts and ends on the same images
    random = found["random"]
    assert random.deletion_curve[0] == pytest.approx(0.95) and random.deletion_curve[-1] == pytest.approx(
        0.05
    )
    assert random.insertion_curve[0] == pytest.approx(0.05 + 0.9 * g0)
    assert random.insertion_curve[-1] == pytest.approx(0.95)


class KnownReset(nn.Linear):
    """A head whose re-initialisation is known: it swaps which channel each class reads."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            if self.bias is not None:
                self.bias.zero_()


def test_the_randomisation_check_correlates_the_trained_and_the_randomised_maps(tmp_path: Path) -> None:
    """Features are the image's two channels; the trained head gives class 0 channel 0, the
    re-initialised one channel 1, so each map is one channel and the correlation is the channels':
    -1 for a channel and its complement, 0 for a horizontal and a vertical ramp."""
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, 2, 1, bias=False),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=KnownReset(2, 2),
        )
    )
    with torch.no_grad():
        model.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        model.fc.weight.copy_(torch.eye(2))
    ramp = torch.linspace(0.1, 1.0, 8)
    across, down = ramp[None, :].expand(8, 8), ramp[:, None].expand(8, 8)
    images = torch.stack([torch.stack([across, 1.1 - across]), torch.stack([across, down])])
    expected = [
        float(np.corrcoef(images[i, 0].numpy().ravel(), images[i, 1].numpy().ravel())[0, 1]) for i in range(2)
    ]
    assert expected == pytest.approx([-1.0, 0.0], abs=1e-6)
    sample = _Sample(item_ids=[1, 2], images=images, targets=torch.tensor([0, 0]), maps={})
    run = cast(Run, SimpleNamespace(methods=["gradcam", "cam"], layers=["conv"]))
    loaded = cast(LoadedModel, SimpleNamespace(model=model.eval(), reshape=None))
    checks = {c.method: c for c in _sanity(run, loaded, sample, randomise=1, seed=0, batch=2)}
    assert set(checks) == {"gradcam", "cam"}
    for check in checks.values():
        assert check.randomised == ["fc"] and check.n == 2
        assert check.mean_correlation == pytest.approx(sum(expected) / 2, abs=1e-4)
