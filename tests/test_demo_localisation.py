"""The shipped demo CNN classifies fresh synthetic images and its CAM points inside the object.

The CAM is computed here with plain torch (features times the head's weights for the predicted
class, ReLU, bilinear upsampling with align_corners=False), independently of the CAM engine, so
a failure points at the checkpoint or the data rather than at engine code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from workers.demo.train import build_part_bank, composite_batch, main
from workers.models import load_model
from workers.synth import CLASS_NAMES, make_dataset

N_IMAGES = 200
SEED = 90210  # never used for training


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    loaded = load_model("demo")
    model, pre, names = loaded.model, loaded.preprocess, loaded.class_names
    assert names is not None
    manifest = make_dataset(tmp_path_factory.mktemp("localisation"), N_IMAGES, seed=SEED)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    height, width = pre.size
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    batch, sources = [], []
    for row in rows:
        with Image.open(manifest.parent / row["uri"]) as image:
            sources.append(image.size)
            resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        batch.append(np.asarray(resized))
    x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255 - mean) / std

    with torch.no_grad():
        features = model.features(x)
        logits = model.fc(features.mean(dim=(2, 3)))
        predicted = logits.argmax(1)
        cams = F.relu(torch.einsum("bchw,bc->bhw", features, model.fc.weight[predicted]))
        cams = F.interpolate(cams[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]

    correct = hits = centre_hits = 0
    for i, row in enumerate(rows):
        if names[int(predicted[i])] != row["label"]:
            continue
        correct += 1
        peak = divmod(int(cams[i].argmax()), width)
        hits += _in_box(peak, row["box"], sources[i], (height, width))
        centre_hits += _in_box((height // 2, width // 2), row["box"], sources[i], (height, width))
    return {
        "accuracy": correct / len(rows),
        "pointing": hits / max(correct, 1),
        "centre_baseline": centre_hits / max(correct, 1),
    }


def _in_box(
    peak: tuple[int, int], box: list[int], source_wh: tuple[int, int], input_hw: tuple[int, int]
) -> bool:
    """Whether the centre of input pixel (row, col), mapped to source pixels, lies in the box."""
    (row, col), (src_w, src_h), (height, width) = peak, source_wh, input_hw
    px, py = (col + 0.5) * src_w / width, (row + 0.5) * src_h / height
    return box[0] <= px <= box[2] and box[1] <= py <= box[3]


def test_demo_model_classifies_fresh_images(evaluation: dict[str, float]) -> None:
    assert evaluation["accuracy"] > 0.95, evaluation


def test_cam_maximum_lies_inside_the_object_box(evaluation: dict[str, float]) -> None:
    assert evaluation["pointing"] >= 0.95, evaluation
    # Guessing the image centre must do far worse, or the test would prove nothing.
    assert evaluation["centre_baseline"] < 0.6, evaluation


def test_training_script_writes_a_checkpoint_the_loader_accepts(tmp_path: Path) -> None:
    out = tmp_path / "tiny_demo.pt"
    main(["--out", str(out), "--steps", "4", "--n-parts", "16", "--n-eval", "8", "--batch-size", "8"])
    loaded = load_model("demo", out)
    assert loaded.checkpoint_sha256 is not None
    assert loaded.class_names == list(CLASS_NAMES)
    assert loaded.preprocess.size == (128, 128)
    with torch.no_grad():
        assert loaded.model(torch.zeros(1, 3, 128, 128)).shape == (1, len(CLASS_NAMES))


def test_composited_training_batches_keep_objects_whole() -> None:
    bank = build_part_bank(0, 12, np.random.default_rng(0))
    generator = torch.Generator().manual_seed(0)
    images, labels, alpha = composite_batch(bank, 12, generator)
    assert images.shape == (12, 3, 128, 128) and alpha.shape == (12, 1, 128, 128)
    assert float(images.min()) >= 0 and float(images.max()) <= 255
    # Moving and turning an object never cuts it: each coverage total matches one bank object.
    totals = (bank.alphas.float() / 255).sum(dim=(1, 2, 3))
    for coverage, label in zip(alpha.sum(dim=(1, 2, 3)), labels, strict=True):
        match = torch.isclose(totals, coverage, atol=1e-2) & (bank.labels == label)
        assert bool(match.any())
