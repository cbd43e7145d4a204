from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.patches import distinct_ranks, patch_boxes, patch_grid, top_patches
from workers.preprocess import RESIZE_MODES, ImageTransform, Preprocess


def test_patch_scores_add_up_to_the_spatial_mean_of_the_upsampled_map() -> None:
    torch.manual_seed(0)
    raw = torch.rand(3, 7, 7)
    grid = patch_grid(raw, (100, 90), 32)  # not a multiple of 32: edge patches are partial
    assert grid.shape == (3, 4, 3)
    up = F.interpolate(raw.unsqueeze(1), size=(100, 90), mode="bilinear", align_corners=False).squeeze(1)
    torch.testing.assert_close(grid.sum(dim=(1, 2)), up.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grid[0, 0, 0], up[0, :32, :32].sum() / (100 * 90), rtol=1e-5, atol=1e-7)


def test_scores_compare_across_images_unlike_normalised_maps() -> None:
    faint = torch.zeros(1, 4, 4)
    faint[0, 1, 1] = 0.1
    strong = faint * 50
    top = top_patches(torch.cat([faint, strong]), (64, 64), 32, 2)
    assert top.scores[1, 0] > 10 * top.scores[0, 0]
    assert (top.rows[:, 0].tolist(), top.cols[:, 0].tolist()) == ([0, 0], [0, 0])
    assert torch.all(top.scores[:, 0] >= top.scores[:, 1])


def test_top_patch_finds_the_hot_spot() -> None:
    raw = torch.zeros(1, 8, 8)
    raw[0, 6, 2] = 5.0  # input pixels y 96-112, x 32-48 at 128 px
    top = top_patches(raw, (128, 128), 32, 3)
    assert (int(top.rows[0, 0]), int(top.cols[0, 0])) == (3, 1)


def stretch(input_size: tuple[int, int], source_size: tuple[int, int]) -> ImageTransform:
    return Preprocess(input_size, (0.0,) * 3, (1.0,) * 3).transform(*source_size)


def patch_box(
    row: int, col: int, patch: int, input_size: tuple[int, int], geometry: ImageTransform
) -> tuple[int, int, int, int]:
    """One patch's box written out in plain Python: the oracle for the vectorised version."""
    height, width = input_size
    src_w, src_h = geometry.source
    (ox, oy), (rw, rh) = geometry.offset, geometry.resized
    x0, y0 = col * patch, row * patch
    x1, y1 = min(x0 + patch, width), min(y0 + patch, height)
    left = min(max(round((x0 - ox) * (src_w / rw)), 0), src_w - 1)
    top = min(max(round((y0 - oy) * (src_h / rh)), 0), src_h - 1)
    right = max(min(round((x1 - ox) * (src_w / rw)), src_w), left + 1)
    bottom = max(min(round((y1 - oy) * (src_h / rh)), src_h), top + 1)
    return left, top, right, bottom


def one_box(
    row: int, col: int, patch: int, input_size: tuple[int, int], source_size: tuple[int, int]
) -> tuple[int, ...]:
    geometry = stretch(input_size, source_size)
    boxes = patch_boxes(np.array([[row]]), np.array([[col]]), patch, input_size, [geometry])
    return tuple(boxes[0, 0].tolist())


def test_boxes_map_back_to_source_pixels() -> None:
    # 128x128 input from a 256 (wide) x 192 (high) source
    assert one_box(0, 0, 32, (128, 128), (256, 192)) == (0, 0, 64, 48)
    assert one_box(3, 3, 32, (128, 128), (256, 192)) == (192, 144, 256, 192)
    # partial edge patch stays inside the image
    assert one_box(3, 2, 32, (100, 90), (90, 100)) == (64, 96, 90, 100)


def test_boxes_of_a_centre_crop_and_a_letterbox_name_the_pixels_the_model_saw() -> None:
    pre = Preprocess((224, 224), (0.0,) * 3, (1.0,) * 3)
    crop = pre.with_overrides(resize="center-crop").transform(448, 224)  # 512x256, crop at (144, 16)
    box = patch_boxes(np.array([[0]]), np.array([[0]]), 32, (224, 224), [crop])[0, 0].tolist()
    assert box == [126, 14, 154, 42]  # (0 + 144) * 448 / 512 = 126, (32 + 16) * 224 / 256 = 42
    letter = pre.with_overrides(resize="letterbox").transform(448, 224)  # 224x112 at y 56
    boxes = patch_boxes(np.array([[0, 2, 6]]), np.array([[0, 0, 6]]), 32, (224, 224), [letter])[0].tolist()
    assert boxes[0] == [0, 0, 64, 1]  # all padding: clipped to the source's top row
    assert boxes[1] == [0, 16, 64, 80]  # y 64..96 in the input is 8..40 of the resized image
    assert boxes[2] == [384, 223, 448, 224]  # all padding below: the bottom row


def test_patch_boxes_match_the_plain_python_box_for_every_patch() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = (int(v) for v in rng.integers(8, 300, 2))
        patch = int(rng.integers(1, 64))
        rows = rng.integers(0, -(-height // patch), size=(4, 3))
        cols = rng.integers(0, -(-width // patch), size=(4, 3))
        sources = rng.integers(1, 5000, size=(4, 2))
        pre = Preprocess((height, width), (0.0,) * 3, (1.0,) * 3).with_overrides(
            resize=RESIZE_MODES[trial % 3]
        )
        geometries = [pre.transform(int(w), int(h)) for w, h in sources]
        boxes = patch_boxes(rows, cols, patch, (height, width), geometries)
        assert boxes.shape == (4, 3, 4)
        expected = [
            [
                patch_box(int(rows[n, k]), int(cols[n, k]), patch, (height, width), geometries[n])
                for k in range(3)
            ]
            for n in range(4)
        ]
        assert [[tuple(box) for box in per_map] for per_map in boxes.tolist()] == expected


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("source_size", [(1, 1), (100_000, 1), (1, 100_000), (3, 2)])
def test_boxes_stay_inside_sources_smaller_than_the_grid(source_size: tuple[int, int], mode: str) -> None:
    patch, input_size = 32, (224, 224)
    rows, cols = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
    geometry = (
        Preprocess(input_size, (0.0,) * 3, (1.0,) * 3).with_overrides(resize=mode).transform(*source_size)
    )
    boxes = patch_boxes(rows.reshape(1, -1), cols.reshape(1, -1), patch, input_size, [geometry])
    src_w, src_h = source_size
    for x0, y0, x1, y1 in boxes[0].tolist():
        assert 0 <= x0 < x1 <= src_w and 0 <= y0 < y1 <= src_h, (x0, y0, x1, y1)
    kept = distinct_ranks(boxes)[0]
    distinct = {tuple(boxes[0, rank]) for rank in kept}
    assert len(distinct) == len(kept) == len({tuple(box) for box in boxes[0].tolist()})
    assert kept[0] == 0 and kept == sorted(kept)
    if source_size == (1, 1):
        assert kept == [0] and tuple(boxes[0, 0]) == (0, 0, 1, 1)


def test_top_patches_index_rows_and_columns_of_a_wide_and_a_tall_grid() -> None:
    """On a non-square grid a flat index splits by the column count; a square grid hides the mix-up."""
    for input_size, grid in (((64, 160), (2, 5)), ((160, 64), (5, 2))):
        raw = torch.zeros(1, *grid)
        raw[0, grid[0] - 1, 1] = 3.0  # bottom row, second column
        raw[0, 0, grid[1] - 1] = 2.0  # top row, last column
        top = top_patches(raw, input_size, 32, grid[0] * grid[1])
        assert top.grid == grid
        assert (int(top.rows[0, 0]), int(top.cols[0, 0])) == (grid[0] - 1, 1)
        assert (int(top.rows[0, 1]), int(top.cols[0, 1])) == (0, grid[1] - 1)
        expected = patch_grid(raw, input_size, 32)[0]
        for k in range(grid[0] * grid[1]):
            assert float(expected[top.rows[0, k], top.cols[0, k]]) == float(top.scores[0, k])
        torch.testing.assert_close(top.total, expected.sum().reshape(1))


@pytest.mark.parametrize(
    ("input_size", "grid"),
    [((70, 100), (3, 4)), ((64, 100), (2, 4)), ((100, 64), (4, 2)), ((33, 33), (2, 2))],
)
def test_a_partial_edge_patch_is_kept_on_either_side(
    input_size: tuple[int, int], grid: tuple[int, int]
) -> None:
    """Edges that need padding on one side only, or by less than half a patch, still get their patch."""
    raw = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(3))
    scores = patch_grid(raw, input_size, 32)
    assert tuple(scores.shape[1:]) == grid
    height, width = input_size
    up = F.interpolate(raw.unsqueeze(1), size=input_size, mode="bilinear", align_corners=False).squeeze(1)
    last = up[:, (grid[0] - 1) * 32 : height, (grid[1] - 1) * 32 : width].sum(dim=(1, 2)) / (height * width)
    torch.testing.assert_close(scores[:, -1, -1], last, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.sum(dim=(1, 2)), up.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)


def test_boxes_are_integers() -> None:
    boxes = patch_boxes(
        np.array([[0, 1]]), np.array([[2, 0]]), 32, (96, 160), [stretch((96, 160), (333, 201))]
    )
    assert boxes.dtype == np.int64
