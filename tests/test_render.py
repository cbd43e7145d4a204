"""``render`` lays the stored map over the source image at the source's size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.render import RenderError, render_overlay
from schema.db import upgrade
from tests.test_results_pg import SeededRun, seed_run, shard_rows, write_shard
from workers.heatmap_io import JET_LUT, encode_png_gray
from workers.storage import open_storage

SOURCE_SIZE = (96, 64)  # width, height: not the map's shape, so the map must be stretched
MAP_SIZE = (32, 32)  # the model-input size the worker stores PNGs at
GRAY = 120


@pytest.fixture
def rendered_run(tmp_path: Path) -> tuple[str, SeededRun]:
    """A run whose maps are hot (255) on the left half of the input and cold (0) on the right."""
    url = f"sqlite:///{tmp_path / 'render.db'}"
    upgrade(url)
    images = tmp_path / "images"
    images.mkdir()
    run = seed_run(
        url,
        "r1",
        output_uri=str(tmp_path / "heatmaps"),
        n_items=2,
        shard_size=2,
        layers=("layer3", "layer4"),
        source_uri=str(images / "{n}.png"),
    )
    for n in range(2):
        Image.new("RGB", SOURCE_SIZE, (GRAY, GRAY, GRAY)).save(images / f"{n}.png")
    levels = np.zeros(MAP_SIZE, dtype=np.uint8)
    levels[:, : MAP_SIZE[1] // 2] = 255
    storage = open_storage(run.output_uri)
    rows = shard_rows(run, run.shard_ids[0])
    write_shard(url, rows)
    for heatmap in rows.heatmaps:
        storage.put(heatmap["object_key"], encode_png_gray(levels), "image/png")
    return url, run


def blend(level: int) -> np.ndarray:
    """What a 0.5 JET blend of ``level`` over the gray source must give, from the colour table."""
    return 0.5 * JET_LUT[level].astype(np.float64) + 0.5 * GRAY


def test_overlay_has_the_source_size_and_the_map_stretched_over_it(
    rendered_run: tuple[str, SeededRun],
) -> None:
    url, run = rendered_run
    item = run.item_ids[0]
    rendered = render_overlay(url, item, "gradcam", "circle", layer="layer4")
    with Image.open(io.BytesIO(rendered.jpeg)) as img:
        assert img.format == "JPEG"
        assert img.size == SOURCE_SIZE
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    width, height = SOURCE_SIZE
    hot = rgb[8 : height - 8, 4 : width // 2 - 8].reshape(-1, 3).mean(axis=0)
    cold = rgb[8 : height - 8, width // 2 + 8 : width - 4].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(hot, blend(255), atol=4)
    np.testing.assert_allclose(cold, blend(0), atol=4)
    assert (rendered.width, rendered.height) == SOURCE_SIZE
    assert rendered.layer == "layer4" and rendered.target_class == 0
    assert rendered.object_key == f"runs/r1/gradcam/layer4/{item}/0.png"


def test_class_index_and_name_render_the_same_map(rendered_run: tuple[str, SeededRun]) -> None:
    url, run = rendered_run
    item = run.item_ids[1]
    by_name = render_overlay(url, item, "cam", "square", layer="layer3")
    by_index = render_overlay(url, item, "cam", 1, layer="layer3")
    assert by_name == by_index


def test_errors_name_what_exists(rendered_run: tuple[str, SeededRun]) -> None:
    url, run = rendered_run
    item = run.item_ids[0]
    unknown_method = r"no 'gradcan' heatmap; did you mean gradcam.*\(methods: cam, gradcam\)"
    with pytest.raises(RenderError, match=unknown_method):
        render_overlay(url, item, "gradcan", "circle", layer="layer4")
    with pytest.raises(RenderError, match=r"several layers \(layer3, layer4\); pick one"):
        render_overlay(url, item, "gradcam", "circle")
    with pytest.raises(RenderError, match="no layer 'layer5'; did you mean layer4"):
        render_overlay(url, item, "gradcam", "circle", layer="layer5")
    with pytest.raises(RenderError, match=r"no gradcam heatmap of class 2 .*class 0 \(circle\)"):
        render_overlay(url, item, "gradcam", "triangle", layer="layer4")
    with pytest.raises(RenderError, match="no item 999"):
        render_overlay(url, 999, "gradcam", "circle")


def test_a_missing_map_or_source_is_reported(rendered_run: tuple[str, SeededRun]) -> None:
    url, run = rendered_run
    item = run.item_ids[0]
    storage = open_storage(run.output_uri)
    Path(storage.locate(f"runs/r1/cam/layer4/{item}/1.png")).unlink()
    with pytest.raises(RenderError, match=r"map of item \d+ is missing"):
        render_overlay(url, item, "cam", "square", layer="layer4")
    source = Path(str(run.database_url).split("///")[1]).parent / "images" / "0.png"
    source.write_bytes(b"not an image")
    with pytest.raises(RenderError, match="cannot decode the source image"):
        render_overlay(url, item, "gradcam", "circle", layer="layer4")


def test_render_command_writes_the_jpeg(rendered_run: tuple[str, SeededRun], tmp_path: Path) -> None:
    url, run = rendered_run
    item = run.item_ids[0]
    out = tmp_path / "out" / "overlay.jpg"
    args = ["render", str(item), "--method", "gradcam", "--class", "circle", "--layer", "layer4"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--database-url", url])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.size == SOURCE_SIZE
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(out), "--database-url", url])
    assert bad.exit_code == 2
    assert "several layers" in bad.output
