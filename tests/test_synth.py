"""The synthetic dataset: format, determinism, and boxes that really enclose the object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.synth import CLASS_NAMES, MAX_ASPECT, make_dataset, render_sample, sample_rng


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth"), 40, seed=11)


def test_manifest_lines_follow_the_documented_format(dataset: Path) -> None:
    rows = _rows(dataset)
    assert len(rows) == 40
    assert dataset.name == "manifest.jsonl"
    for row in rows:
        assert list(row) == ["uri", "label", "box"]
        assert row["label"] in CLASS_NAMES
        image_path = dataset.parent / row["uri"]
        assert not Path(row["uri"]).is_absolute() and image_path.is_file()
        with Image.open(image_path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            width, height = image.size
        x0, y0, x1, y1 = row["box"]
        assert all(isinstance(v, int) for v in row["box"])
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_images_vary_in_size_and_shape_and_cover_every_class(dataset: Path) -> None:
    rows = _rows(dataset)
    sizes = []
    for row in rows:
        with Image.open(dataset.parent / row["uri"]) as image:
            sizes.append(image.size)
    assert all(160 <= w <= 256 and 160 <= h <= 256 for w, h in sizes)
    assert all(max(w, h) / min(w, h) <= MAX_ASPECT + 0.01 for w, h in sizes)
    assert len(set(sizes)) > 30
    assert sum(w != h for w, h in sizes) > 30
    assert {row["label"] for row in rows} == set(CLASS_NAMES)


def test_box_is_the_tight_box_of_a_visible_object(dataset: Path) -> None:
    rows = _rows(dataset)
    for index, row in enumerate(rows[:12]):
        sample = render_sample(sample_rng(11, index))
        pixels = np.asarray(Image.open(dataset.parent / row["uri"]).convert("RGB"))
        # The manifest row and its PNG come from the same drawing.
        assert np.array_equal(pixels, sample.image)
        assert sample.label == row["label"]
        ys, xs = np.nonzero(sample.mask)
        assert row["box"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        # The object differs clearly from the background right around it.
        x0, y0, x1, y1 = row["box"]
        pad = 4
        window = np.zeros_like(sample.mask)
        window[max(y0 - pad, 0) : y1 + pad, max(x0 - pad, 0) : x1 + pad] = True
        around = window & ~sample.mask
        inside = pixels[sample.mask].astype(float).mean(axis=0)
        outside = pixels[around].astype(float).mean(axis=0)
        assert np.linalg.norm(inside - outside) > 40, (index, inside, outside)


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    first = make_dataset(tmp_path / "a", 5, seed=3)
    second = make_dataset(tmp_path / "b", 5, seed=3)
    other = make_dataset(tmp_path / "c", 5, seed=4)
    assert first.read_bytes() == second.read_bytes()
    for row in _rows(first):
        assert (first.parent / row["uri"]).read_bytes() == (second.parent / row["uri"]).read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_growing_n_only_appends(tmp_path: Path) -> None:
    small = make_dataset(tmp_path / "small", 3, seed=8)
    large = make_dataset(tmp_path / "large", 6, seed=8, manifest_name="all.jsonl")
    assert large.name == "all.jsonl"
    assert _rows(large)[:3] == _rows(small)
    for row in _rows(small):
        assert (small.parent / row["uri"]).read_bytes() == (large.parent / row["uri"]).read_bytes()


def test_size_range_is_honoured(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, 6, seed=1, min_size=64, max_size=80)
    for row in _rows(manifest):
        with Image.open(manifest.parent / row["uri"]) as image:
            assert all(64 <= side <= 80 for side in image.size)


def test_forced_label_and_bad_arguments() -> None:
    assert render_sample(sample_rng(0, 0), label="ring").label == "ring"
    with pytest.raises(ValueError, match="circle"):
        render_sample(sample_rng(0, 0), label="hexagon")
    with pytest.raises(ValueError, match="min_size"):
        render_sample(sample_rng(0, 0), min_size=200, max_size=100)
    with pytest.raises(ValueError, match="at least 1"):
        make_dataset(Path("unused"), 0, seed=0)
