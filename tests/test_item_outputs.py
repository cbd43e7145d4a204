"""What one image can do to its shard: nothing. A non-finite model output, a source too wide for
a JPEG overlay, or a source smaller than the patch grid each stay with their own item.

Whole runs through the task code a worker runs, on SQLite (which refuses NaN in its NOT NULL
columns, so a NaN that reached the commit would fail the shard).
"""

from __future__ import annotations

import io
import json
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select
from torch import nn

from scheduler.plan import plan_run
from scheduler.runner import run_embedded
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run, Shard
from schema.payloads import RunSpec
from schema.settings import get_settings
from tests.plugins.services import wait_until
from workers.models import load_model
from workers.synth import make_dataset


def nan_on_flat_images() -> nn.Module:
    """The demo network, with NaN logits for a flat white image and infinite ones for a flat black one.

    Loaded as ``python:tests.test_item_outputs:nan_on_flat_images``.
    """
    model = load_model("demo").model

    def poison(_: nn.Module, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor) -> torch.Tensor:
        images = inputs[0]
        flat = images.flatten(2).std(dim=2).amax(dim=1) == 0
        level = images.mean(dim=(1, 2, 3))
        nan = torch.where(flat & (level > 1.5), float("nan"), 0.0)
        inf = torch.where(flat & (level < -1.5), float("inf"), 0.0)
        return logits + (nan + inf)[:, None]

    model.register_forward_hook(poison)
    return model.eval()


def _run(spec: RunSpec, **env: str) -> str:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        try:
            settings = get_settings()
            planned = plan_run(spec, settings)
            run_embedded(planned.run_id, planned.shard_ids, settings)
        finally:
            get_settings.cache_clear()
    return planned.run_id


def _items(db: str, run_id: str) -> dict[str, tuple[str, str | None]]:
    with session_scope(db) as session:
        rows = session.execute(
            select(Item.source_uri, Item.status, Item.error).where(Item.run_id == run_id)
        ).all()
    return {os.path.basename(uri): (status, error) for uri, status, error in rows}


def _add(manifest: Path, **images: Image.Image) -> None:
    with manifest.open("a") as fh:
        for name, image in images.items():
            image.save(manifest.parent / f"{name}.png")
            fh.write(json.dumps({"uri": f"{name}.png"}) + "\n")


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("outputs")
    manifest = make_dataset(root / "data", 6, seed=4)
    strip = np.tile(np.linspace(0, 255, 100_000, dtype=np.uint8)[None, :, None], (1, 1, 3))
    _add(
        manifest,
        white=Image.new("RGB", (40, 40), (255, 255, 255)),
        black=Image.new("RGB", (40, 40), (0, 0, 0)),
        dot=Image.new("RGB", (1, 1), (128, 128, 128)),
        strip=Image.fromarray(strip),
    )
    large = Image.effect_noise((4000, 3000), 60).convert("RGB")  # 12 megapixels
    large.save(manifest.parent / "large.jpg", quality=80)
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "large.jpg"}) + "\n")
    db = f"sqlite:///{root / 'runs.db'}"
    run_id = _run(
        RunSpec(
            source=str(manifest),
            model="python:tests.test_item_outputs:nan_on_flat_images",
            methods=["gradcam", "cam"],
            layers=["features"],
            shard_size=20,
            batch_size=4,
        ),
        CAMAUDIT_DATABASE_URL=db,
        CAMAUDIT_STORAGE_URL=str(root / "out"),
    )
    return {"db": db, "run_id": run_id, "items": _items(db, run_id)}


def test_a_non_finite_model_output_fails_its_item_not_the_shard(poisoned_run: dict[str, Any]) -> None:
    items = poisoned_run["items"]
    for name in ("white", "black"):
        status, error = items[f"{name}.png"]
        assert status == "failed" and "not finite: NaN or infinity in its class scores" in (error or ""), (
            error
        )
    assert sum(status == "done" for status, _ in items.values()) == 6 + 3
    with session_scope(poisoned_run["db"]) as session:
        run = session.get(Run, poisoned_run["run_id"])
        assert run is not None and (run.status, run.n_done, run.n_failed) == ("finished", 9, 2)
        scores = session.execute(select(Heatmap.target_score).where(Heatmap.run_id == run.id)).scalars().all()
    assert len(scores) == 9 * 2 and all(np.isfinite(scores))


def test_patch_boxes_lie_inside_tiny_and_strip_sources_without_repeats(poisoned_run: dict[str, Any]) -> None:
    with session_scope(poisoned_run["db"]) as session:
        rows = session.execute(
            select(Item.source_uri, Item.width, Item.height, PatchScore)
            .join(PatchScore, PatchScore.item_id == Item.id)
            .where(Item.run_id == poisoned_run["run_id"])
        ).all()
        boxes: dict[tuple[str, str, int], list[tuple[int, int, int, int, int]]] = {}
        sizes = {}
        for uri, width, height, patch in rows:
            name = os.path.basename(uri)
            sizes[name] = (width, height)
            boxes.setdefault((name, patch.method, patch.heatmap_id), []).append(
                (patch.rank, patch.x0, patch.y0, patch.x1, patch.y1)
            )
    assert sizes["dot.png"] == (1, 1) and sizes["strip.png"] == (100_000, 1)
    for (name, _, _), ranked in boxes.items():
        width, height = sizes[name]
        ranked.sort()
        assert [rank for rank, *_ in ranked] == list(range(len(ranked))), "ranks stay contiguous"
        corners = [tuple(box) for _, *box in ranked]
        assert len(set(corners)) == len(corners), (name, corners)
        for x0, y0, x1, y1 in corners:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (name, corners)
    dot = [ranked for (name, _, _), ranked in boxes.items() if name == "dot.png"]
    assert dot and all([box for _, *box in ranked] == [[0, 0, 1, 1]] for ranked in dot)


def test_a_source_too_wide_for_a_jpeg_overlay_fails_alone(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data", 3, seed=6)
    _add(manifest, wide=Image.new("RGB", (70_000, 2), (10, 200, 10)))
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    out = tmp_path / "out"
    run_id = _run(
        RunSpec(source=str(manifest), methods=["gradcam"], shard_size=10, overlay=True, layout="files"),
        CAMAUDIT_DATABASE_URL=db,
        CAMAUDIT_STORAGE_URL=str(out),
    )
    items = _items(db, run_id)
    status, error = items["wide.png"]
    assert status == "failed" and "--overlay: the source is 70000x2 pixels" in (error or "")
    assert "65,500" in (error or "")
    assert sorted(status for status, _ in items.values()) == ["done"] * 3 + ["failed"]
    assert len(list(out.rglob("*.jpg"))) == 3


def test_a_checkpoint_replaced_after_planning_fails_the_shard(tmp_path: Path) -> None:
    from workers.models import DEMO_CHECKPOINT, file_sha256

    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(DEMO_CHECKPOINT.read_bytes())
    manifest = make_dataset(tmp_path / "data", 4, seed=8)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    env = {"CAMAUDIT_DATABASE_URL": db, "CAMAUDIT_STORAGE_URL": str(tmp_path / "out")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        try:
            settings = get_settings()
            planned = plan_run(
                RunSpec(source=str(manifest), checkpoint=str(checkpoint), methods=["gradcam"]), settings
            )
            planned_sha = file_sha256(checkpoint)
            # Other weights under the same name, between planning and the shard.
            other = torch.load(checkpoint, weights_only=True)
            first = next(iter(other["state_dict"]))
            other["state_dict"][first] = other["state_dict"][first] + 1.0
            torch.save(other, checkpoint)
            run_embedded(planned.run_id, planned.shard_ids, settings)
        finally:
            get_settings.cache_clear()
    with session_scope(db) as session:
        run = session.get(Run, planned.run_id)
        assert run is not None and run.status == "failed" and run.n_done == 0
        assert run.checkpoint_sha256 == planned_sha
        (error,) = session.execute(select(Shard.error).where(Shard.run_id == run.id)).scalars().all()
        heatmaps = session.execute(select(Heatmap.id).where(Heatmap.run_id == run.id)).all()
    assert heatmaps == []
    assert "CheckpointChangedError" in error and f"planned with sha256 {planned_sha}" in error
    assert file_sha256(checkpoint) in error


def _map_of(db: str, run_id: str, name: str) -> tuple[int, str, int]:
    with session_scope(db) as session:
        for item_id, uri, method, target in session.execute(
            select(Item.id, Item.source_uri, Heatmap.method, Heatmap.target_class)
            .join(Heatmap, Heatmap.item_id == Item.id)
            .where(Item.run_id == run_id, Heatmap.method == "gradcam")
        ):
            if uri.endswith(name):
                return item_id, method, target
    raise AssertionError(f"no map of {name}")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


def test_gallery_overlays_are_shrunk_before_they_are_blended(poisoned_run: dict[str, Any]) -> None:
    from scheduler.web.images import Crop, ImageService

    db = poisoned_run["db"]
    item_id, method, target = _map_of(db, poisoned_run["run_id"], "large.jpg")
    service = ImageService(db)
    tracemalloc.start()
    try:
        thumb = service.overlay(item_id, method, target, None, Crop(max_side=256))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _jpeg_size(thumb.data) == (256, 192)
    # Blending at source size holds float32 copies of 12 megapixels (144 MB each).
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB of arrays for a 256 px overlay"


def test_a_strip_wider_than_a_jpeg_is_drawn_shrunk_not_a_500(poisoned_run: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from scheduler.web import create_app

    item_id, method, target = _map_of(poisoned_run["db"], poisoned_run["run_id"], "strip.png")
    client = TestClient(create_app(poisoned_run["db"]), base_url="http://localhost")
    whole = client.get(f"/items/{item_id}/overlay.jpg?method={method}&class={target}")
    assert whole.status_code == 200, whole.text
    assert _jpeg_size(whole.content) == (4096, 1)
    thumb = client.get(f"/items/{item_id}/overlay.jpg?method={method}&class={target}&max_side=64")
    assert thumb.status_code == 200 and _jpeg_size(thumb.content) == (64, 1)
    part = client.get(f"/items/{item_id}/overlay.jpg?method={method}&class={target}&box=50000,0,50100,1")
    assert part.status_code == 200 and _jpeg_size(part.content) == (100, 1)
    source = client.get(f"/items/{item_id}/source.jpg")
    assert source.status_code == 200 and _jpeg_size(source.content) == (4096, 1)


def test_concurrent_renders_wait_their_turn(
    poisoned_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scheduler.web.images as web_images

    db = poisoned_run["db"]
    item_id, method, target = _map_of(db, poisoned_run["run_id"], "large.jpg")
    release, lock = threading.Event(), threading.Lock()
    counts = {"asked": 0, "inside": 0, "most": 0}
    real_render, real_ref = web_images.render_overlay, web_images.ImageService._map_ref

    def held(*args: Any, **kwargs: Any) -> Any:
        with lock:
            counts["inside"] += 1
            counts["most"] = max(counts["most"], counts["inside"])
        try:
            release.wait(120)
            return real_render(*args, **kwargs)
        finally:
            with lock:
                counts["inside"] -= 1

    def asked(self: Any, *args: Any) -> Any:
        with lock:
            counts["asked"] += 1
        return real_ref(self, *args)

    monkeypatch.setattr(web_images, "render_overlay", held)
    monkeypatch.setattr(web_images.ImageService, "_map_ref", asked)
    service = web_images.ImageService(db, max_renders=2)
    threads = [
        threading.Thread(
            target=service.overlay, args=(item_id, method, target, None, web_images.Crop(max_side=64 + n))
        )
        for n in range(6)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: counts["asked"] == 6 and counts["inside"] == 2, 60, "six requests, two renders")
    release.set()
    for thread in threads:
        thread.join(timeout=120)
    assert counts["most"] == 2 and counts["inside"] == 0


def test_render_of_a_source_wider_than_a_jpeg_says_so(poisoned_run: dict[str, Any]) -> None:
    from scheduler.render import RenderError, render_overlay

    item_id, method, target = _map_of(poisoned_run["db"], poisoned_run["run_id"], "strip.png")
    with pytest.raises(RenderError, match=r"100000x1 pixels; a JPEG overlay can be at most 65,500"):
        render_overlay(poisoned_run["db"], item_id, method, target)
