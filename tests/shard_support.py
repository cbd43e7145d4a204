"""A shard's computation without a database: work for a few synthetic images, and its output.

``compute_shard`` needs no database (claim and commit do), so the shard's own pipeline can be
run and compared byte for byte: its rows, and every object it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schema.settings import Settings
from workers.models import load_model
from workers.shard import ShardWork, WorkItem
from workers.shard_rows import ShardRows
from workers.synth import make_dataset


def shard_work(tmp_path: Path, n: int, *, batch_size: int, out: str = "out", **overrides: Any) -> ShardWork:
    """Work for ``n`` synthetic PNGs (one of them not an image) on the demo model."""
    data = tmp_path / "data"
    if not (data / "images").exists():
        make_dataset(data, n, seed=3, min_size=48, max_size=96)
        (data / "images" / "broken.png").write_bytes(b"not an image")
    uris = [str(p) for p in sorted((data / "images").glob("0*.png"))][:n]
    uris.insert(n // 2, str(data / "images" / "broken.png"))
    fields: dict[str, Any] = {
        "run_id": "r1",
        "shard_id": 1,
        "shard_index": 0,
        "model_ref": "demo",
        "checkpoint": None,
        "checkpoint_sha256": None,
        "methods": ["gradcam", "eigencam"],
        "layers": ["features"],
        "target_spec": "topk:2",
        "patch_size": 16,
        "top_patches": 3,
        "top_k_predictions": 3,
        "batch_size": batch_size,
        "output_uri": str(tmp_path / out),
        "class_names": None,
        "source_roots": [str(data)],
        "preprocess_record": load_model("demo").preprocess.as_dict(),
        "items": [WorkItem(id=i + 1, source_uri=uri, label=None) for i, uri in enumerate(uris)],
    }
    fields.update(overrides)
    return ShardWork(**fields)


def cpu_settings() -> Settings:
    return Settings(device="cpu", amp="off", decode_workers=2, encode_workers=2, upload_workers=2)


def comparable(rows: ShardRows) -> dict[str, Any]:
    """The rows as committed (encoder futures already resolved into ``sha256``)."""
    return {
        "items": sorted(rows.items, key=lambda row: row["id"]),
        "heatmaps": rows.heatmaps,
        "patches": rows.patches,
    }


def objects(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
