"""``camaudit export masks``: maps at source size thresholded into masks and COCO instances."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.exports.masks import instances, rle_encode
from schema.db import session_scope
from schema.models import Heatmap, Item, Run
from tests.test_drift import cli_run
from workers.heatmap_io import encode_png_gray
from workers.map_reads import read_map_png
from workers.preprocess import Preprocess
from workers.storage import open_storage
from workers.synth import CLASS_NAMES, make_dataset, render_sample, sample_rng

N_IMAGES = 16
SEED = 43
CROP_IMAGES = 8
CROP_SEED = 7
runner = CliRunner()


@dataclass(frozen=True)
class MaskRun:
    db: str
    run_id: str
    heatmaps: Path


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory: pytest.TempPathFactory) -> MaskRun:
    root = tmp_path_factory.mktemp("masks")
    manifest = make_dataset(root / "data", N_IMAGES, seed=SEED)
    db = f"sqlite:///{root / 'runs.db'}"
    # one object per map: a test below removes one map's object
    return MaskRun(db, cli_run(manifest, db, root / "heatmaps", "--layout", "files"), root / "heatmaps")


def export(run: MaskRun, *args: str) -> Any:
    return runner.invoke(app, ["export", "masks", run.run_id, "--database-url", run.db, "--json", *args])


def truth(item_ordinal: int) -> np.ndarray:
    return render_sample(sample_rng(SEED, item_ordinal)).mask


def stored_maps(run: MaskRun) -> dict[int, tuple[int, np.ndarray, tuple[int, int]]]:
    """item id -> (ordinal, stored gradcam PNG levels, source size)."""
    storage = open_storage(str(run.heatmaps))
    with session_scope(run.db) as session:
        found = session.query(Item, Heatmap).join(Heatmap, Heatmap.item_id == Item.id)
        return {
            item.id: (item.ordinal, read_map_png(storage, h), (item.width, item.height))
            for item, h in found.filter(Heatmap.run_id == run.run_id, Heatmap.method == "gradcam")
        }


def test_png_masks_are_the_map_at_source_size_above_the_threshold(mask_run: MaskRun, tmp_path: Path) -> None:
    out = tmp_path / "png"
    result = export(mask_run, "--out", str(out), "--threshold", "0.5", "--min-area", "40")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    maps = stored_maps(mask_run)
    assert len(rows) == len(maps) == N_IMAGES
    for row in rows:
        _, levels, (width, height) = maps[row["item"]]
        with Image.open(out / row["mask"]) as png:
            assert png.mode == "1" and png.size == (width, height)
            mask = np.asarray(png, dtype=bool)
        # the map stretched to the source with PIL's bilinear filter, an independent resampler
        stretched = np.asarray(Image.fromarray(levels).resize((width, height), Image.Resampling.BILINEAR))
        hot, cold = stretched >= 0.5 * 255 + 3, stretched < 0.5 * 255 - 3
        assert mask[cold].sum() == 0 and mask.sum() > 0
        assert mask[hot].mean() > 0.95  # only specks under --min-area are dropped
        for inst in row["instances"]:
            x0, y0, x1, y1 = inst["box"]
            assert inst["area"] >= 40 and mask[y0:y1, x0:x1].sum() >= inst["area"]
            assert (
                mask[y0:y1, x0:x1].any(axis=0)[[0, -1]].all()
                and mask[y0:y1, x0:x1].any(axis=1)[[0, -1]].all()
            )
        assert sum(inst["area"] for inst in row["instances"]) == mask.sum()
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = json.loads(export(mask_run, "--out", str(out), "--threshold", "0.5", "--min-area", "40").stdout)
    assert again["written"] == 0 and again["kept"] == N_IMAGES and not again["manifest_written"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp


def test_components_rle_and_min_area() -> None:
    prob = np.zeros((6, 8), dtype=np.float32)
    prob[1:3, 1:3] = 0.9  # 4 pixels
    prob[4, 6] = 0.8  # 1 pixel
    prob[3, 3] = 0.7  # touches the first one diagonally: 8-connected
    found = instances(prob, 0.5, 2)
    assert [(i.box, i.area) for i in found] == [([1, 1, 4, 4], 5)]
    assert found[0].peak == pytest.approx(0.9)
    for mask in (found[0].mask, np.ones((3, 4), bool), np.zeros((2, 2), bool), prob > 0.75):
        rle = mask_utils.frPyObjects(rle_encode(mask), *mask.shape)
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)


def coco_truth(run: MaskRun, path: Path) -> COCO:
    """The synthetic objects' own masks as a COCO ground truth."""
    maps = stored_maps(run)
    images, annotations = [], []
    for item_id, (ordinal, _, (width, height)) in maps.items():
        sample = render_sample(sample_rng(SEED, ordinal))
        rle = mask_utils.encode(np.asfortranarray(sample.mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        x0, y0, x1, y1 = sample.box
        images.append({"id": item_id, "width": width, "height": height})
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": item_id,
                "category_id": CLASS_NAMES.index(sample.label),
                "segmentation": rle,
                "area": int(sample.mask.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            }
        )
    categories = [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return COCO(str(path))


def mean_iou(pseudo: COCO, gt: COCO) -> tuple[float, float]:
    """Mean IoU of each image's pseudo-mask (union of its instances) with its object, and of a full mask."""
    ious, full = [], []
    for image_id in gt.getImgIds():
        target = gt.annToMask(gt.loadAnns(gt.getAnnIds(imgIds=image_id))[0]).astype(bool)
        union = np.zeros_like(target)
        for ann in pseudo.loadAnns(pseudo.getAnnIds(imgIds=image_id)):
            union |= pseudo.annToMask(ann).astype(bool)
        ious.append((union & target).sum() / max((union | target).sum(), 1))
        full.append(target.sum() / target.size)
    return float(np.mean(ious)), float(np.mean(full))


def test_coco_pseudo_masks_load_evaluate_and_overlap_the_objects(mask_run: MaskRun, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    result = export(mask_run, "--out", str(out), "--format", "coco", "--threshold", "0.3")
    assert result.exit_code == 0, result.output
    pseudo = COCO(str(out / "coco.json"))
    assert len(pseudo.getImgIds()) == N_IMAGES and pseudo.getAnnIds()
    assert {c["name"] for c in pseudo.loadCats(pseudo.getCatIds())} <= set(CLASS_NAMES)
    gt = coco_truth(mask_run, tmp_path / "truth.json")
    detections = gt.loadRes(pseudo.loadAnns(pseudo.getAnnIds()))
    evaluation = COCOeval(gt, detections, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[1] > 0.0  # AP at IoU 0.5: some pseudo-masks match their object
    iou, full = mean_iou(pseudo, gt)
    assert iou > full + 0.15, (iou, full)
    again = json.loads(export(mask_run, "--out", str(out), "--format", "coco", "--threshold", "0.3").stdout)
    assert again["written"] == 0 and not again["manifest_written"]


def test_coco_export_to_s3(mask_run: MaskRun, s3_storage_url: str, s3_endpoint_url: str) -> None:
    args = ("--out", s3_storage_url, "--format", "coco", "--s3-endpoint-url", s3_endpoint_url)
    assert export(mask_run, *args).exit_code == 0
    storage = open_storage(s3_storage_url, endpoint_url=s3_endpoint_url)
    coco = json.loads(storage.get("coco.json"))
    assert len(coco["images"]) == N_IMAGES
    assert json.loads(export(mask_run, *args).stdout)["written"] == 0


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--threshold", "0"), "within (0, 1)"),
        (("--threshold", "1"), "within (0, 1)"),
        (("--threshold", "-0.2"), "within (0, 1)"),
        (("--threshold", "nan"), "within (0, 1)"),
        (("--min-area", "-1"), "0 or more"),
        (("--format", "voc"), "use one of png, coco"),
        (("--method", "gradcampp"), "did you mean gradcam"),
    ],
)
def test_bad_options_fail_before_anything_is_written(
    mask_run: MaskRun, tmp_path: Path, args: tuple[str, ...], reason: str
) -> None:
    out = tmp_path / "never"
    result = export(mask_run, "--out", str(out), *args)
    assert result.exit_code == 2 and reason in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_a_missing_map_leaves_out_that_item_only(mask_run: MaskRun, tmp_path: Path) -> None:
    storage = open_storage(str(mask_run.heatmaps))
    with session_scope(mask_run.db) as session:
        victim = session.query(Heatmap).filter(Heatmap.method == "cam").order_by(Heatmap.id).first()
        assert victim is not None
        key, item_id = victim.object_key, victim.item_id
    kept = storage.get(key)
    (mask_run.heatmaps / key).unlink()
    try:
        result = export(mask_run, "--out", str(tmp_path / "o"), "--method", "cam")
    finally:
        storage.put(key, kept, "image/png")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert list(report["failed"]) == [str(item_id)] and "missing" in report["failed"][str(item_id)]
    assert report["rows"] == N_IMAGES - 1


def test_a_run_entirely_on_s3_exports_to_s3(
    tmp_path: Path, s3_endpoint_url: str, s3_bucket: str, s3_client: Any
) -> None:
    """Sources, heatmaps and exports all in a bucket: the source crops and maps are read from S3."""
    from scheduler.sources import read_manifest

    manifest = make_dataset(tmp_path / "data", 4, seed=SEED)
    for path in (tmp_path / "data").rglob("*.*"):
        key = f"data/{path.relative_to(tmp_path / 'data').as_posix()}"
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    assert manifest.exists()
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    endpoint = ["--s3-endpoint-url", s3_endpoint_url]
    source = f"s3://{s3_bucket}/data/manifest.jsonl"
    run = runner.invoke(
        app,
        ["run", "--source", source, "--methods", "gradcam", "--database-url", db,
         "--storage-url", f"s3://{s3_bucket}/maps", "--json", *endpoint],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    run_id = json.loads(run.stdout)["run_id"]
    common = [run_id, "--database-url", db, "--json", *endpoint]
    masks = runner.invoke(app, ["export", "masks", *common, "--out", f"s3://{s3_bucket}/masks"])
    assert masks.exit_code == 0, masks.output
    assert json.loads(masks.stdout)["rows"] == 4
    rois = runner.invoke(app, ["export", "rois", *common, "--top", "2", "--out", f"s3://{s3_bucket}/rois"])
    assert rois.exit_code == 0, rois.output
    items = read_manifest(f"s3://{s3_bucket}/rois/rois.jsonl", endpoint_url=s3_endpoint_url)
    assert len(items) == 8 and all(i.uri.startswith(f"s3://{s3_bucket}/rois/crops/") for i in items)
    storage = open_storage(f"s3://{s3_bucket}/masks", endpoint_url=s3_endpoint_url)
    first = json.loads(storage.get("masks.jsonl").decode().splitlines()[0])
    assert first["uri"].startswith(f"s3://{s3_bucket}/data/images/")
    with Image.open(io.BytesIO(storage.get(first["mask"]))) as png:
        assert png.mode == "1" and png.size[0] >= 160


@dataclass(frozen=True)
class CroppedRun:
    db: str
    run_id: str
    heatmaps: Path
    pre: Preprocess


@pytest.fixture(scope="module")
def cropped_run(tmp_path_factory: pytest.TempPathFactory) -> CroppedRun:
    """A centre-crop run on wide and tall sources, so a crop cuts a different side of each."""
    root = tmp_path_factory.mktemp("masks-crop")
    manifest = make_dataset(root / "data", CROP_IMAGES, seed=CROP_SEED, min_size=120, max_size=260)
    db = f"sqlite:///{root / 'runs.db'}"
    result = runner.invoke(
        app,
        [
            "run",
            "--source",
            str(manifest),
            "--methods",
            "gradcam",
            "--targets",
            "label",
            "--preprocess",
            "center-crop:0.75",
            "--input-size",
            "96",
            "--database-url",
            db,
            "--storage-url",
            str(root / "heatmaps"),
            "--layout",
            "files",
            "--json",
        ],
    )  # fmt: skip  (one object per map, so a test can plant maps of its own)
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout)["run_id"]
    with session_scope(db) as session:
        run = session.get(Run, run_id)
        assert run is not None
        pre = Preprocess.from_dict(run.preprocess, geometry_only=True)
    assert pre.resize == "center-crop" and pre.crop_pct == 0.75
    return CroppedRun(db, run_id, root / "heatmaps", pre)


def export_cropped(run: CroppedRun, *args: str) -> Any:
    return runner.invoke(app, ["export", "masks", run.run_id, "--database-url", run.db, "--json", *args])


def _union(row: dict[str, Any], out: Path) -> np.ndarray:
    with Image.open(out / row["mask"]) as png:
        return np.asarray(png, dtype=bool)


def test_centre_crop_masks_lie_where_the_map_points_in_the_source(
    cropped_run: CroppedRun, tmp_path: Path
) -> None:
    """Maps planted on each object's known box come back as masks on that box, cut by the crop."""
    storage = open_storage(str(cropped_run.heatmaps))
    truths: dict[int, tuple[tuple[int, int, int, int], tuple[float, float, float, float]]] = {}
    kept: dict[str, bytes] = {}
    with session_scope(cropped_run.db) as session:
        for item, heatmap in session.query(Item, Heatmap).join(Heatmap, Heatmap.item_id == Item.id):
            kept[heatmap.object_key] = storage.get(heatmap.object_key)
            box = render_sample(sample_rng(CROP_SEED, item.ordinal), min_size=120, max_size=260).box
            transform = cropped_run.pre.transform(item.width, item.height)
            # the input pixels whose centres fall in the box, mapped forward through the transform
            x0, y0, x1, y1 = transform.to_input(box).tolist()
            cols, rows = np.arange(transform.input[0]) + 0.5, np.arange(transform.input[1]) + 0.5
            inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
            storage.put(heatmap.object_key, encode_png_gray(inside.astype(np.uint8) * 255), "image/png")
            truths[item.id] = (box, transform.visible_source())
    cut = 0
    out = tmp_path / "png"
    try:
        result = export_cropped(cropped_run, "--out", str(out), "--threshold", "0.5", "--min-area", "0")
    finally:
        for key, data in kept.items():
            storage.put(key, data, "image/png")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    assert len(rows) == CROP_IMAGES
    for row in rows:
        (bx0, by0, bx1, by1), (vx0, vy0, vx1, vy1) = truths[row["item"]]
        mask = _union(row, out)
        # the object's box as far as the model saw it
        seen = (max(bx0, vx0), max(by0, vy0), min(bx1, vx1), min(by1, vy1))
        expected = np.zeros_like(mask)
        expected[round(seen[1]) : round(seen[3]), round(seen[0]) : round(seen[2])] = True
        iou = (mask & expected).sum() / (mask | expected).sum()
        assert iou > 0.85, (row["item"], iou, row["instances"], seen)
        # nothing the crop cut off is ever in a mask
        assert not mask[:, : math.floor(vx0)].any() and not mask[:, math.ceil(vx1) :].any()
        assert not mask[: math.floor(vy0), :].any() and not mask[math.ceil(vy1) :, :].any()
        cut += (bx0, by0, bx1, by1) != seen
    assert cut > 0  # some object reached past the crop: the cut was exercised


def test_centre_crop_masks_of_the_model_cover_the_objects(cropped_run: CroppedRun, tmp_path: Path) -> None:
    """The demo model's own maps: its masks overlap the known objects more than stretched maps do."""
    out = tmp_path / "png"
    result = export_cropped(cropped_run, "--out", str(out), "--threshold", "0.3")
    assert result.exit_code == 0, result.output
    storage = open_storage(str(cropped_run.heatmaps))
    with session_scope(cropped_run.db) as session:
        found = session.query(Item, Heatmap).join(Heatmap, Heatmap.item_id == Item.id)
        levels = {item.id: (item.ordinal, read_map_png(storage, h)) for item, h in found}
    ours, stretched = [], []
    for line in (out / "masks.jsonl").read_text().splitlines():
        row = json.loads(line)
        ordinal, level = levels[row["item"]]
        target = render_sample(sample_rng(CROP_SEED, ordinal), min_size=120, max_size=260).mask
        mask = _union(row, out)
        naive = np.asarray(Image.fromarray(level).resize(mask.shape[::-1], Image.Resampling.BILINEAR))
        naive = naive >= 0.3 * 255
        ours.append((mask & target).sum() / max((mask | target).sum(), 1))
        stretched.append((naive & target).sum() / max((naive | target).sum(), 1))
    assert np.mean(ours) > np.mean(stretched) + 0.1, (ours, stretched)
