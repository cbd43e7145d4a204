"""The rows a shard writes, checked against the objects it stored, on a non-square model input.

Square inputs hide a whole class of mistakes (a patch's row taken from the column count, a width
used for a height), so the model here reads 160 x 96 pixels (a 20 x 12 raw map, a 5 x 3 patch
grid) from sources of every aspect ratio. Every expected value is recomputed from the stored
raw ``.npy`` and PNG with plain torch/numpy arithmetic written out in this file, never with the
worker's own helpers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sqlalchemy import select

from scheduler.plan import plan_run
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run
from schema.payloads import RunSpec
from schema.settings import Settings
from tests.test_patches import patch_box, stretch
from workers.heatmap_io import decode_npy, decode_png_gray, to_uint8
from workers.localisation import border_mask
from workers.models import DEMO_CHECKPOINT
from workers.shard import WorkItem, explain_shard
from workers.shard_rows import (
    class_probabilities,
    failed_item_row,
    heatmap_rows,
    map_layout,
    map_statistics,
    non_finite_reasons,
    patch_rows,
    prediction_rows,
    prediction_rows_of,
    valid_maps,
)
from workers.storage import Storage, open_storage
from workers.synth import make_dataset

INPUT_SIZE = (96, 160)  # (height, width): not square, and the two sides differ in patch count
PATCH = 32
GRID = (3, 5)  # patch rows, patch columns
N_IMAGES = 6


@dataclass(frozen=True)
class StoredRun:
    db: str
    storage: Storage
    run: Run
    items: dict[int, Item]
    heatmaps: list[Heatmap]
    patches: dict[int, list[PatchScore]]  # by heatmap id, in rank order


def wide_checkpoint(path: Path) -> Path:
    """The demo weights, declaring a 160 x 96 input: the trunk is convolutional, so it reads any size."""
    checkpoint = torch.load(DEMO_CHECKPOINT, weights_only=True)
    checkpoint["input_size"] = list(INPUT_SIZE)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> StoredRun:
    root = tmp_path_factory.mktemp("shard-rows")
    manifest = make_dataset(root / "data", N_IMAGES, seed=23)
    settings = Settings(database_url=f"sqlite:///{root / 'runs.db'}", storage_url=str(root / "out"))
    spec = RunSpec(
        source=str(manifest),
        checkpoint=str(wide_checkpoint(root / "wide.pt")),
        methods=["gradcam", "cam"],
        targets="topk:2",
        patch_size=PATCH,
        top_patches=GRID[0] * GRID[1],  # every patch, so the whole order is checked
        batch_size=4,  # two batches, the second one short
        layout="files",  # the keys of one object per map are checked below
    )
    planned = plan_run(spec, settings)
    for shard_id in planned.shard_ids:
        assert explain_shard(planned.run_id, shard_id, settings).status == "done"
    with session_scope(settings.database_url) as s:
        run = s.get(Run, planned.run_id)
        items = s.execute(select(Item).where(Item.run_id == planned.run_id)).scalars().all()
        heatmaps = s.execute(select(Heatmap).where(Heatmap.run_id == planned.run_id)).scalars().all()
        patch_rows = (
            s.execute(select(PatchScore).where(PatchScore.run_id == planned.run_id).order_by(PatchScore.rank))
            .scalars()
            .all()
        )
        s.expunge_all()
    assert run is not None and run.status == "finished"
    patches: dict[int, list[PatchScore]] = {}
    for row in patch_rows:
        patches.setdefault(row.heatmap_id, []).append(row)
    return StoredRun(
        settings.database_url,
        open_storage(settings.storage_url),
        run,
        {i.id: i for i in items},
        list(heatmaps),
        patches,
    )


def oracle_patch_scores(raw: np.ndarray) -> np.ndarray:
    """[rows, cols] patch sums of the raw map upsampled to the input, over the input's pixel count."""
    height, width = INPUT_SIZE
    up = F.interpolate(
        torch.from_numpy(raw.astype(np.float32))[None, None],
        size=INPUT_SIZE,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    rows, cols = GRID
    scores = np.zeros(GRID, dtype=np.float64)
    for r in range(rows):
        for c in range(cols):
            scores[r, c] = up[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].sum(dtype=np.float64)
    return scores / (height * width)


def test_the_run_reads_a_non_square_input(stored: StoredRun) -> None:
    assert tuple(stored.run.preprocess["size"]) == INPUT_SIZE
    raw = decode_npy(stored.storage.get(stored.heatmaps[0].raw_key))
    assert raw.shape == (12, 20)
    png = decode_png_gray(stored.storage.get(stored.heatmaps[0].object_key))
    assert png.shape == INPUT_SIZE
    sources = {(i.width, i.height) for i in stored.items.values()}
    assert any(w != h for w, h in sources), "the sources should not all be square either"


def test_patch_ranks_follow_the_stored_raw_map_on_a_non_square_grid(stored: StoredRun) -> None:
    """Rank 0 is the argmax of the raw map's patch scores, and every rank holds its true score."""
    assert len(stored.heatmaps) == N_IMAGES * 2 * 2
    cells = {(r, c) for r in range(GRID[0]) for c in range(GRID[1])}
    for heatmap in stored.heatmaps:
        raw = decode_npy(stored.storage.get(heatmap.raw_key))
        expected = oracle_patch_scores(raw)
        # the raw map is stored as float16: allow its rounding, far below the gaps between patches
        tol = 2e-3 * float(np.abs(expected).max()) + 1e-7
        ranked = stored.patches[heatmap.id]
        assert [p.rank for p in ranked] == list(range(len(cells)))
        assert {(p.row, p.col) for p in ranked} == cells
        for p in ranked:
            assert p.score == pytest.approx(expected[p.row, p.col], abs=tol), (p.rank, p.row, p.col)
        best = np.unravel_index(int(np.argmax(expected)), GRID)
        top = ranked[0]
        assert expected[top.row, top.col] >= expected[best] - tol, (
            f"rank 0 is patch {(top.row, top.col)}, the raw map's strongest is {tuple(map(int, best))}"
        )
        in_rank_order = [expected[p.row, p.col] for p in ranked]
        assert all(a >= b - tol for a, b in itertools.pairwise(in_rank_order))
        assert in_rank_order[0] > in_rank_order[-1], "a map whose patches all tie tests no order"
        assert heatmap.top_patch_fraction == pytest.approx(
            expected.max() / expected.sum(), rel=1e-2, abs=1e-3
        )


def test_patch_boxes_are_the_patch_cells_in_source_pixels(stored: StoredRun) -> None:
    for heatmap in stored.heatmaps:
        item = stored.items[heatmap.item_id]
        for p in stored.patches[heatmap.id]:
            assert (p.item_id, p.method, p.layer, p.target_class) == (
                heatmap.item_id,
                heatmap.method,
                heatmap.layer,
                heatmap.target_class,
            )
            box = patch_box(p.row, p.col, PATCH, INPUT_SIZE, stretch(INPUT_SIZE, (item.width, item.height)))
            assert (p.x0, p.y0, p.x1, p.y1) == box


def test_heatmap_rows_describe_their_stored_maps(stored: StoredRun) -> None:
    for heatmap in stored.heatmaps:
        png_bytes = stored.storage.get(heatmap.object_key)
        raw = decode_npy(stored.storage.get(heatmap.raw_key)).astype(np.float64)
        png = decode_png_gray(png_bytes).astype(np.float64) / 255.0
        prefix = f"runs/{stored.run.id}/{heatmap.method}/{heatmap.layer}/{heatmap.item_id}/"
        assert heatmap.object_key == f"{prefix}{heatmap.target_class}.png"
        assert heatmap.raw_key == f"{prefix}{heatmap.target_class}.npy"
        assert heatmap.sha256 == hashlib.sha256(png_bytes).hexdigest()
        assert heatmap.raw_max == pytest.approx(raw.max(), rel=2e-3, abs=1e-4)
        assert heatmap.raw_mean == pytest.approx(raw.mean(), rel=2e-3, abs=1e-4)
        assert heatmap.map_mean == pytest.approx(png.mean(), abs=1 / 255)


def test_each_item_row_and_its_targets_agree_with_the_model_output(stored: StoredRun) -> None:
    """Targets are the two most probable classes; their scores differ by their log-probabilities."""
    names = stored.run.class_names
    assert names is not None
    by_item: dict[tuple[int, str], list[Heatmap]] = {}
    for heatmap in stored.heatmaps:
        by_item.setdefault((heatmap.item_id, heatmap.method), []).append(heatmap)
    for item in stored.items.values():
        assert item.status == "done" and item.error is None
        with Image.open(item.source_uri) as source:
            assert (item.width, item.height) == source.size
        probs = [p["prob"] for p in item.predictions]
        classes = [p["class"] for p in item.predictions]
        assert len(classes) == len(names) and sorted(classes) == list(range(len(names)))
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert [p["name"] for p in item.predictions] == [names[c] for c in classes]
        assert item.pred_class == classes[0]
        assert item.correct == (names[classes[0]] == item.label)
        for method in ("gradcam", "cam"):
            maps = sorted(by_item[(item.id, method)], key=lambda h: -h.target_score)
            assert [h.target_class for h in maps] == classes[:2]
            logit_gap = maps[0].target_score - maps[1].target_score
            assert logit_gap == pytest.approx(math.log(probs[0] / probs[1]), rel=1e-3, abs=1e-3)


# --------------------------------------------------------------------------- row building alone
#
# The same rules on hand-made model outputs, without a model or a database: quick enough to
# run for every mutant of workers/shard_rows.py.


def border_share(levels: np.ndarray) -> float:
    """Share of a map's mass in its outer band, computed straight from the stored uint8 levels."""
    levels = levels.astype(np.float64)
    return float(levels[border_mask(levels.shape)].sum() / levels.sum())


def fake_batch(sizes: list[tuple[int, int]], labels: list[str | None]) -> list[tuple[WorkItem, Any]]:
    return [
        (
            WorkItem(id=100 + n, source_uri=f"s{n}.png", label=label),
            SimpleNamespace(width=w, height=h, transform=stretch(INPUT_SIZE, (w, h))),
        )
        for n, ((w, h), label) in enumerate(zip(sizes, labels, strict=True))
    ]


def test_rows_of_a_batch_follow_each_map_index_to_its_item_and_class() -> None:
    batch = fake_batch([(333, 201), (90, 140)], ["b", None])
    targets = torch.tensor([[2, 0], [1, 3]])
    scores = torch.tensor([[5.0, 1.5], [-0.5, -2.0]])
    valid = torch.ones_like(targets, dtype=torch.bool)
    layout = map_layout(batch, SimpleNamespace(targets=targets, scores=scores, valid=valid))
    assert layout.item_ids == [100, 100, 101, 101]
    assert layout.targets == [2, 0, 1, 3]
    assert layout.scores == [5.0, 1.5, -0.5, -2.0]
    assert [t.source for t in layout.transforms] == [(333, 201), (333, 201), (90, 140), (90, 140)]

    generator = torch.Generator().manual_seed(5)
    raw = torch.randn(2, 2, 3, 5, generator=generator)
    raw[1, 1] = 0.0  # a flat map: no patch stands out and its fraction is 0
    maps = torch.rand(2, 2, *INPUT_SIZE, generator=generator)
    stats = map_statistics(maps, raw, INPUT_SIZE, PATCH, 4, layout.transforms)
    flat = raw.reshape(4, 3, 5).numpy()
    np.testing.assert_array_equal(stats.raw16, flat.astype(np.float16))
    np.testing.assert_array_equal(stats.maps_u8, to_uint8(maps).numpy().reshape(4, *INPUT_SIZE))
    assert stats.raw_max == pytest.approx(flat.max(axis=(1, 2)).tolist(), rel=1e-6)
    assert stats.raw_mean == pytest.approx(flat.mean(axis=(1, 2)).tolist(), rel=1e-5, abs=1e-7)
    assert stats.map_mean == pytest.approx(maps.reshape(4, -1).mean(dim=1).tolist(), rel=1e-5)
    for n in range(4):
        expected = oracle_patch_scores(flat[n])
        assert stats.patch_total[n] == pytest.approx(expected.sum(), abs=1e-6)
        order = sorted(np.ndindex(*GRID), key=lambda rc, e=expected: -e[rc])[:4]
        if n != 3:
            assert list(zip(stats.patch_rows[n], stats.patch_cols[n], strict=True)) == order
        assert stats.patch_scores[n] == pytest.approx([expected[rc] for rc in order], abs=1e-6)
        geometry = layout.transforms[n]
        assert stats.patch_boxes[n] == [
            list(patch_box(r, c, PATCH, INPUT_SIZE, geometry))
            for r, c in zip(stats.patch_rows[n], stats.patch_cols[n], strict=True)
        ]

    keys = [(f"k{n}.png", f"k{n}.npy") for n in range(4)]
    heatmaps = heatmap_rows("run", "gradcam", "features", layout, stats, keys)
    assert [(h["item_id"], h["target_class"], h["target_score"]) for h in heatmaps] == [
        (100, 2, 5.0),
        (100, 0, 1.5),
        (101, 1, -0.5),
        (101, 3, -2.0),
    ]
    for n, row in enumerate(heatmaps):
        total = stats.patch_total[n]
        assert row == {
            "item_id": layout.item_ids[n],
            "run_id": "run",
            "method": "gradcam",
            "layer": "features",
            "target_class": layout.targets[n],
            "target_score": layout.scores[n],
            "object_key": f"k{n}.png",
            "raw_key": f"k{n}.npy",
            # whole objects until a packed layout fills in the byte ranges (workers/packing.py)
            "object_offset": None,
            "object_length": None,
            "raw_offset": None,
            "raw_length": None,
            "sha256": "",
            "raw_max": stats.raw_max[n],
            "raw_mean": stats.raw_mean[n],
            "map_mean": stats.map_mean[n],
            "top_patch_fraction": stats.patch_scores[n][0] / total if total > 0 else 0.0,
            # no labelled box: only the border share is known
            "box_energy": None,
            "box_hit": None,
            "outside_mass": None,
            "border_share": pytest.approx(border_share(stats.maps_u8[n])),
        }
    assert heatmaps[3]["top_patch_fraction"] == 0.0

    patches = patch_rows("run", "gradcam", "features", layout, stats)
    assert len(patches) == 4 * 4
    for index, (key, row) in enumerate(patches):
        n, rank = divmod(index, 4)
        assert key == (layout.item_ids[n], "gradcam", "features", layout.targets[n])
        x0, y0, x1, y1 = stats.patch_boxes[n][rank]
        assert row == {
            "run_id": "run",
            "item_id": layout.item_ids[n],
            "method": "gradcam",
            "layer": "features",
            "target_class": layout.targets[n],
            "rank": rank,
            "row": stats.patch_rows[n][rank],
            "col": stats.patch_cols[n][rank],
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "score": stats.patch_scores[n][rank],
        }


def test_rows_of_predictions_name_classes_and_judge_labels() -> None:
    batch = fake_batch([(10, 20), (30, 40), (50, 60), (70, 80)], ["b", "c", None, "a"])
    logits = torch.tensor(
        [[0.0, 3.0, 1.0, -1.0], [2.0, 0.5, 0.0, 1.0], [0.5, 0.2, 4.0, 0.1], [0.0, 0.3, 0.1, 5.0]]
    )
    result = SimpleNamespace(logits=logits)
    work = SimpleNamespace(
        top_k_predictions=3, class_names=["a", "b", "c"], target_spec="top1"
    )  # class 3 has no name
    rows = prediction_rows(work, batch, result)  # type: ignore[arg-type]
    probs = torch.softmax(logits, dim=1)
    for (item, img), row, p in zip(batch, rows, probs, strict=True):
        order = sorted(range(4), key=lambda c, p=p: -float(p[c]))[:3]
        assert row["id"] == item.id and row["status"] == "done" and row["error"] is None
        assert (row["width"], row["height"]) == (img.width, img.height)
        assert [pred["class"] for pred in row["predictions"]] == order
        assert [pred["prob"] for pred in row["predictions"]] == pytest.approx([float(p[c]) for c in order])
        assert [pred["name"] for pred in row["predictions"]] == [
            ["a", "b", "c"][c] if c < 3 else None for c in order
        ]
        assert row["pred_class"] == order[0]
    assert [row["correct"] for row in rows] == [True, False, None, False]
    unnamed = prediction_rows(
        SimpleNamespace(top_k_predictions=9, class_names=None, target_spec="top1"), batch, result
    )  # type: ignore[arg-type]
    assert all(len(row["predictions"]) == 4 and row["correct"] is None for row in unnamed)
    assert all(pred["name"] is None for row in unnamed for pred in row["predictions"])


def test_rows_of_failed_items_carry_only_the_reason() -> None:
    item = WorkItem(id=7, source_uri="broken.png", label="a")
    assert failed_item_row(item, "cannot decode image: truncated") == {
        "id": 7,
        "status": "failed",
        "error": "cannot decode image: truncated",
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_image_with_a_non_finite_value_anywhere_fails_alone(bad: float) -> None:
    maps = torch.rand(4, 1, 9, 11)
    raw = torch.rand(4, 1, 3, 3, dtype=torch.float16)
    maps[1, 0, 8, 10] = bad  # the last value: a reduction's tail
    raw[3, 0, 1, 1] = bad
    result = SimpleNamespace(
        logits=torch.zeros(4, 5),
        scores=torch.ones(4, 1),
        raw={"cam": {"l": raw}},
        layer_maps={"cam": {"l": maps}},
    )
    reasons = non_finite_reasons(result)  # type: ignore[arg-type]
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] is not None and "its normalised cam map of layer l" in reasons[1]
    assert reasons[3] is not None and "its cam map of layer l" in reasons[3]


def test_rows_of_padded_targets_keep_only_the_valid_maps_in_order() -> None:
    """An item with fewer targets than the batch's widest has padded columns: no map, no row."""
    batch = fake_batch([(40, 30), (50, 60), (70, 20)], ["a", "b", None])
    batch[1] = (dataclasses.replace(batch[1][0], box=[1.0, 2.0, 3.0, 4.0]), batch[1][1])
    targets = torch.tensor([[4, 1], [2, 0], [3, 5]])
    scores = torch.tensor([[0.5, 0.25], [2.0, -1.0], [7.0, 8.0]])
    valid = torch.tensor([[True, False], [True, True], [False, True]])
    layout = map_layout(batch, SimpleNamespace(targets=targets, scores=scores, valid=valid))
    assert layout.item_ids == [100, 101, 101, 102]
    assert layout.targets == [4, 2, 0, 5]
    assert layout.scores == [0.5, 2.0, -1.0, 8.0]
    assert [t.source for t in layout.transforms] == [(40, 30), (50, 60), (50, 60), (70, 20)]
    assert layout.boxes == [None, [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], None]

    maps = torch.arange(3 * 2 * 2 * 3, dtype=torch.float32).reshape(3, 2, 2, 3)
    kept = valid_maps(maps, valid)
    assert kept.shape == (4, 1, 2, 3)
    for n, (b, t) in enumerate([(0, 0), (1, 0), (1, 1), (2, 1)]):
        assert torch.equal(kept[n, 0], maps[b, t])
    assert valid_maps(maps, torch.ones(3, 2, dtype=torch.bool)) is maps


def test_a_non_finite_reason_names_the_first_output_that_is_not_finite() -> None:
    def result(logits: torch.Tensor | None, scores: torch.Tensor, raw: torch.Tensor) -> Any:
        return SimpleNamespace(
            logits=logits, scores=scores, raw={"cam": {"l": raw}}, layer_maps={"cam": {"l": raw.clone()}}
        )

    advice = "; check the model (overflow under mixed precision: CAMAUDIT_AMP=off) and the input"
    start = "the model's output for this image is not finite: NaN or infinity in "
    logits = torch.zeros(3, 4)
    logits[0, 3] = float("nan")
    scores = torch.ones(3, 2)
    scores[1, 1] = float("inf")
    raw = torch.rand(3, 1, 2, 2)
    assert non_finite_reasons(result(logits, scores, raw)) == [  # type: ignore[arg-type]
        start + "its class scores (logits)" + advice,
        start + "the scores of its explained classes" + advice,
        None,
    ]
    assert non_finite_reasons(result(None, scores, raw)) == [  # type: ignore[arg-type]
        None,
        start + "the scores of its explained classes" + advice,
        None,
    ]
    assert non_finite_reasons(result(torch.zeros(3, 4), torch.ones(3, 2), raw)) == [None, None, None]  # type: ignore[arg-type]
    # maps without values (an empty grid) have nothing that could be non-finite
    empty = torch.empty(3, 1, 0, 2)
    assert non_finite_reasons(result(None, torch.ones(3, 1), empty)) == [None, None, None]  # type: ignore[arg-type]
    one = torch.rand(3, 1, 1, 1)
    one[2] = float("-inf")
    assert non_finite_reasons(result(None, torch.ones(3, 1), one)) == [  # type: ignore[arg-type]
        None,
        None,
        start + "its cam map of layer l" + advice,
    ]


def test_rows_of_a_single_logit_and_of_a_multi_label_head() -> None:
    batch = fake_batch([(10, 20), (30, 40), (50, 60)], ["dog", "cat", None])
    single = prediction_rows(
        SimpleNamespace(top_k_predictions=5, class_names=["dog"], target_spec="top1"),  # type: ignore[arg-type]
        batch,
        SimpleNamespace(logits=torch.tensor([[2.0], [0.5], [-1.0]])),  # type: ignore[arg-type]
    )
    sigmoid = torch.sigmoid(torch.tensor([2.0, 0.5, -1.0])).tolist()
    assert [row["predictions"] for row in single] == [
        [{"class": 0, "name": "dog", "prob": pytest.approx(p)}] for p in sigmoid
    ]
    # the decision: positive (1) when the sigmoid is above one half; right when it matches the label
    assert [row["pred_class"] for row in single] == [1, 1, 0]
    assert [row["correct"] for row in single] == [True, False, None]

    logits = torch.tensor([[3.0, 2.0, -4.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    multi = prediction_rows(
        SimpleNamespace(top_k_predictions=2, class_names=["dog", "cat", "eel"], target_spec="labels"),  # type: ignore[arg-type]
        batch,
        SimpleNamespace(logits=logits),  # type: ignore[arg-type]
    )
    probs = torch.sigmoid(logits)  # each class scored on its own
    for row, p in zip(multi, probs, strict=True):
        order = sorted(range(3), key=lambda c, p=p: -float(p[c]))[:2]
        assert [pred["class"] for pred in row["predictions"]] == order
        assert [pred["prob"] for pred in row["predictions"]] == pytest.approx([float(p[c]) for c in order])
    above = prediction_rows(
        SimpleNamespace(top_k_predictions=1, class_names=None, target_spec="above:0.5"),  # type: ignore[arg-type]
        batch,
        SimpleNamespace(logits=logits),  # type: ignore[arg-type]
    )
    assert [row["predictions"][0]["prob"] for row in above] == pytest.approx(probs.max(dim=1).values.tolist())


def test_softmax_by_default_and_a_logit_of_zero_is_negative() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(class_probabilities(logits), torch.softmax(logits, dim=1))
    torch.testing.assert_close(class_probabilities(logits, True), torch.sigmoid(logits))
    batch = fake_batch([(10, 20), (30, 40)], ["dog", "dog"])
    work = SimpleNamespace(top_k_predictions=1, class_names=["dog", "cat"], target_spec="top1")
    # host lists of a multi-class head: the first class is the prediction
    rows = prediction_rows_of(work, batch, [[0.4], [0.9]], [[1], [0]])  # type: ignore[arg-type]
    assert [(row["pred_class"], row["correct"]) for row in rows] == [(1, False), (0, True)]
    # a single logit of exactly 0 is a sigmoid of one half: not above it, so negative
    single = prediction_rows(
        SimpleNamespace(top_k_predictions=1, class_names=["dog"], target_spec="top1"),  # type: ignore[arg-type]
        batch,
        SimpleNamespace(logits=torch.tensor([[0.0], [1e-3]])),  # type: ignore[arg-type]
    )
    assert [row["pred_class"] for row in single] == [0, 1]


def test_non_finite_checks_of_flat_and_empty_outputs() -> None:
    maps = torch.rand(3, 1, 2, 2)
    result = SimpleNamespace(
        logits=None,
        scores=torch.tensor([1.0, float("nan"), 2.0]),  # one score per image, flat
        raw={"cam": {"l": maps}},
        layer_maps={"cam": {"l": maps}},
    )
    reasons = non_finite_reasons(result)  # type: ignore[arg-type]
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] is not None and "the scores of its explained classes" in reasons[1]
    result.scores = torch.ones(3, 0)  # no explained class: nothing to check
    assert non_finite_reasons(result) == [None, None, None]  # type: ignore[arg-type]
