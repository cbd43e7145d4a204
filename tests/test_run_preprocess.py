"""A run with a centre crop: recorded, applied by the worker, and mapped back by every consumer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from scheduler.analysis.quality import localisation
from scheduler.render import render_overlay
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run
from tests.test_e2e_embedded import run_cli
from workers.heatmap_io import OUTSIDE_DIM, decode_png_gray, overlay_rgb
from workers.images import decode_pixels
from workers.preprocess import Preprocess
from workers.storage import open_storage
from workers.synth import make_dataset


@pytest.fixture(scope="module")
def cropped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("crop")
    # Wide and tall sources: a centre crop cuts a different side of each.
    manifest = make_dataset(root / "data", 10, seed=7, min_size=120, max_size=260)
    db = f"sqlite:///{root / 'runs.db'}"
    out = root / "maps"
    proc = run_cli(
        "run",
        "--source",
        str(manifest),
        "--model",
        "demo",
        "--methods",
        "cam",
        "--targets",
        "label",
        "--preprocess",
        "center-crop:0.75",
        "--input-size",
        "96",
        "--patch-size",
        "16",
        "--overlay",
        "--layout",
        "files",
        "--database-url",
        db,
        "--storage-url",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return db, json.loads(proc.stdout)["run_id"], out


def test_the_run_records_and_applies_the_override(cropped_run: tuple[str, str, Path]) -> None:
    db, run_id, out = cropped_run
    with session_scope(db) as s:
        run = s.get(Run, run_id)
        assert run is not None
        recorded = dict(run.preprocess)
        items = list(s.execute(select(Item).where(Item.run_id == run_id)).scalars())
        heatmaps = list(s.execute(select(Heatmap).where(Heatmap.run_id == run_id)).scalars())
        s.expunge_all()
    assert recorded["resize"] == "center-crop" and recorded["size"] == [96, 96]
    assert recorded["resize_to"] == [128, 128] and recorded["crop_pct"] == 0.75
    assert recorded["interpolation"] == "bilinear"
    pre = Preprocess.from_dict(recorded)
    storage = open_storage(str(out))
    for heatmap in heatmaps[:3]:
        assert decode_png_gray(storage.get(heatmap.object_key)).shape == (96, 96)
    # The worker decoded what the recorded transform says.
    item = items[0]
    pixels = decode_pixels(Path(item.source_uri).read_bytes(), pre)
    assert pixels.transform.source == (item.width, item.height)
    assert pixels.transform.resized[0] == 128 or pixels.transform.resized[1] == 128


def test_patch_boxes_lie_in_the_source_region_the_model_saw(cropped_run: tuple[str, str, Path]) -> None:
    db, run_id, _ = cropped_run
    with session_scope(db) as s:
        run = s.get(Run, run_id)
        assert run is not None
        pre = Preprocess.from_dict(run.preprocess)
        rows = s.execute(
            select(PatchScore.x0, PatchScore.y0, PatchScore.x1, PatchScore.y1, Item.width, Item.height)
            .join(Item, Item.id == PatchScore.item_id)
            .where(PatchScore.run_id == run_id)
        ).all()
    assert rows
    cut_off_somewhere = False
    for x0, y0, x1, y1, width, height in rows:
        vx0, vy0, vx1, vy1 = pre.transform(width, height).visible_source()
        assert vx0 - 1 <= x0 < x1 <= vx1 + 1 and vy0 - 1 <= y0 < y1 <= vy1 + 1
        cut_off_somewhere |= vx0 > 1 or vy0 > 1
    assert cut_off_somewhere


def test_overlays_dim_what_the_crop_cut_off(cropped_run: tuple[str, str, Path]) -> None:
    db, run_id, out = cropped_run
    with session_scope(db) as s:
        run = s.get(Run, run_id)
        assert run is not None
        pre = Preprocess.from_dict(run.preprocess)
        heatmap, item = s.execute(
            select(Heatmap, Item).join(Item, Item.id == Heatmap.item_id).where(Heatmap.run_id == run_id)
        ).first()  # type: ignore[misc]
        s.expunge_all()
    source = Image.open(item.source_uri).convert("RGB")
    transform = pre.transform(source.width, source.height)
    vx0, vy0, vx1, vy1 = transform.visible_source()
    storage = open_storage(str(out))
    levels = decode_png_gray(storage.get(heatmap.object_key))
    expected = overlay_rgb(source, levels.astype(np.float32) / 255.0, transform=transform)
    stored = np.asarray(Image.open(io.BytesIO(storage.get(heatmap.object_key.removesuffix(".png") + ".jpg"))))
    rendered = render_overlay(db, item.id, "cam", heatmap.target_class)
    shown = np.asarray(Image.open(io.BytesIO(rendered.jpeg)).convert("RGB"))
    assert stored.shape == shown.shape == (source.height, source.width, 3)
    rgb = np.asarray(source, dtype=np.float32)
    # A source pixel the crop removed: dimmed, uncoloured. One well inside: coloured by the map.
    if vx0 >= 2:
        out_y, out_x = source.height // 2, 0
    else:
        out_y, out_x = 0, source.width // 2
    assert np.allclose(expected[out_y, out_x], np.round(rgb[out_y, out_x] * OUTSIDE_DIM), atol=1)
    for image in (stored, shown):  # JPEG: a few levels of loss
        assert np.abs(image[out_y, out_x].astype(int) - expected[out_y, out_x].astype(int)).max() <= 24
        assert np.abs(image.astype(int) - expected.astype(int)).mean() < 4
    assert int(vx1) - int(vx0) > 0 and int(vy1) - int(vy0) > 0


def test_labelled_boxes_the_crop_cut_are_reported_as_clipped(cropped_run: tuple[str, str, Path]) -> None:
    db, run_id, _ = cropped_run
    with session_scope(db) as s:
        run = s.get(Run, run_id)
        assert run is not None
        pre = Preprocess.from_dict(run.preprocess)
        items = s.execute(select(Item.box, Item.width, Item.height).where(Item.run_id == run_id)).all()
    cut = sum(pre.transform(w, h).clips(box) for box, w, h in items if box and w)
    report = localisation(db, run_id)
    assert 0 < cut < len(items), "the synthetic set must have boxes on both sides of the crop"
    assert report.clipped == cut and report.boxed_items == len(items)
    assert all(row.n <= len(items) - cut for row in report.methods)
