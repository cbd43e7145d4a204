"""Do the maps point at the object? Measured on fresh synthetic data with known boxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scheduler.sources import read_manifest
from workers.cam import METHODS, CamEngine
from workers.images import decode_image
from workers.models import load_model
from workers.synth import make_dataset

# Every method is held to the bar: on this data each points into the box for at least 96 % of
# the correctly classified images (64 images, seed 2024; written to test-artifacts/pointing_game.json).
POINTING_BAR = 0.9
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pointing_rates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    loaded = load_model("demo")
    manifest = make_dataset(tmp_path_factory.mktemp("pointing"), 64, seed=2024)
    rows = read_manifest(manifest)
    pre = loaded.preprocess
    decoded = [decode_image(Path(r.uri).read_bytes(), pre.size, pre.mean, pre.std) for r in rows]
    images = torch.stack([d.tensor for d in decoded])
    engine = CamEngine(loaded.model, layers=[loaded.default_layer], methods=list(METHODS), amp=False)
    result = engine(images)
    names = loaded.class_names
    assert names is not None
    predicted = result.targets[:, 0]
    correct = [i for i, r in enumerate(rows) if names[int(predicted[i])] == r.label]
    assert len(correct) >= 0.9 * len(rows), "the demo model should classify its own kind of data"
    height, width = pre.size
    rates: dict[str, float] = {}
    for method in METHODS:
        maps = result.maps[method][:, 0]
        hits = 0
        for i in correct:
            flat = int(torch.argmax(maps[i]))
            y, x = divmod(flat, width)
            box = rows[i].box
            assert box is not None
            sx, sy = decoded[i].width / width, decoded[i].height / height
            # the centre of the winning input pixel, in source pixels
            px, py = (x + 0.5) * sx, (y + 0.5) * sy
            hits += box[0] <= px <= box[2] and box[1] <= py <= box[3]
        rates[method] = hits / len(correct)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pointing_game.json").write_text(json.dumps(rates, indent=2))
    return rates


@pytest.mark.parametrize("method", METHODS)
def test_map_maximum_falls_inside_the_object(pointing_rates: dict[str, float], method: str) -> None:
    assert pointing_rates[method] >= POINTING_BAR, pointing_rates


def test_every_method_is_measured(pointing_rates: dict[str, float]) -> None:
    assert set(pointing_rates) == set(METHODS)
    assert all(0.0 <= v <= 1.0 for v in pointing_rates.values())
