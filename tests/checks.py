"""Assertions shared by the end-to-end tests: a run is complete only if every row and object is."""

from __future__ import annotations

from sqlalchemy import func, select

from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run
from workers.heatmap_io import decode_npy, decode_png_gray
from workers.map_reads import map_bytes, raw_bytes
from workers.storage import Storage


def assert_run_complete(database_url: str, run_id: str, storage: Storage, *, failed: int = 0) -> Run:
    with session_scope(database_url) as s:
        run = s.get(Run, run_id)
        assert run is not None
        items = s.execute(select(Item).where(Item.run_id == run_id)).scalars().all()
        heatmaps = s.execute(select(Heatmap).where(Heatmap.run_id == run_id)).scalars().all()
        n_patches = s.execute(select(func.count()).where(PatchScore.run_id == run_id)).scalar_one()
        patch_boxes = s.execute(
            select(PatchScore.item_id, PatchScore.x0, PatchScore.y0, PatchScore.x1, PatchScore.y1).where(
                PatchScore.run_id == run_id
            )
        ).all()
    assert run.status == "finished", run.status
    done = [i for i in items if i.status == "done"]
    bad = [i for i in items if i.status == "failed"]
    assert len(bad) == failed, [(i.source_uri, i.error) for i in bad]
    assert all(i.error for i in bad)
    assert len(done) + len(bad) == run.n_items == len(items)
    assert (run.n_done, run.n_failed) == (len(done), len(bad))
    assert all(i.predictions and i.width and i.height for i in done)

    height, width = run.preprocess["size"]
    per_item = len(run.methods) * len(run.layers)
    assert len(heatmaps) == per_item * len(done)
    assert {(h.item_id, h.method) for h in heatmaps} == {(i.id, m) for i in done for m in run.methods}
    assert n_patches == run.top_patches * len(heatmaps)
    sizes = {i.id: (i.width, i.height) for i in done}
    for item_id, x0, y0, x1, y1 in patch_boxes:
        w, h = sizes[item_id]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    for h in heatmaps:
        png = map_bytes(storage, h)
        img = decode_png_gray(png)
        assert img.shape == (height, width) and img.dtype.name == "uint8"
        assert img.max() == 255  # a normalised map reaches 1.0 somewhere
        raw = decode_npy(raw_bytes(storage, h))
        assert raw.dtype.name == "float16" and raw.ndim == 2
        assert abs(float(raw.max()) - h.raw_max) <= 1e-2 * max(1.0, h.raw_max)
    return run
