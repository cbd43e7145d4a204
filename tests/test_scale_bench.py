"""bench/scale.py's core, small: two worker processes commit through the worker's own code path.

The bench's figures mean something only if every row and object it counts was written; this
runs its round against the real PostgreSQL and the moto S3 server and checks both ends.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import boto3
from sqlalchemy import create_engine, func, select

from bench.scale import BUCKET, Shape, run_round
from schema.models import Heatmap, Item, ItemStatus, PatchScore, Run, RunStatus, Shard, ShardStatus
from workers.heatmap_io import decode_npy, decode_png_gray
from workers.packing import sample_key

SHAPE = Shape(images=6, top_patches=3, map_side=32, distinct_maps=4)


def test_two_workers_commit_every_row_and_object_they_count(postgres_url: str, s3_endpoint_url: str) -> None:
    result = run_round(
        postgres_url, f"s3://{BUCKET}/small", s3_endpoint_url, processes=2, shards_per_process=2, shape=SHAPE
    )
    n_shards, n_items = 4, 4 * SHAPE.images
    n_maps = n_items * len(SHAPE.methods)
    assert result.shards == n_shards and len(result.timings) == n_shards
    assert result.run_status == RunStatus.FINISHED
    assert sum(t.objects for t in result.timings) == n_shards * len(SHAPE.methods)
    assert sum(t.rows for t in result.timings) == n_items + n_maps + n_maps * SHAPE.top_patches

    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        run = conn.execute(select(Run.n_done, Run.shards_done).where(Run.id == result.run_id)).one()
        assert tuple(run) == (n_items, n_shards)
        shards = conn.execute(select(Shard.status, Shard.n_done).where(Shard.run_id == result.run_id)).all()
        assert sorted(shards) == [(ShardStatus.DONE, SHAPE.images)] * n_shards
        done = conn.execute(
            select(func.count()).where(Item.run_id == result.run_id, Item.status == ItemStatus.DONE)
        ).scalar_one()
        assert done == n_items
        maps = conn.execute(
            select(
                Heatmap.object_key,
                Heatmap.item_id,
                Heatmap.target_class,
                Heatmap.object_offset,
                Heatmap.object_length,
                Heatmap.raw_offset,
                Heatmap.raw_length,
            ).where(Heatmap.run_id == result.run_id)
        ).all()
        patches = conn.execute(select(func.count()).where(PatchScore.run_id == result.run_id)).scalar_one()
    engine.dispose()
    assert len(maps) == n_maps and patches == n_maps * SHAPE.top_patches

    client = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1")
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"small/runs/{result.run_id}/")
    keys = {item["Key"].removeprefix("small/") for item in listed.get("Contents", [])}
    per_object = Counter(row[0] for row in maps)
    assert keys == set(per_object) and len(keys) == n_shards * len(SHAPE.methods)
    for key in keys:
        body = client.get_object(Bucket=BUCKET, Key=f"small/{key}")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        expected = {
            f"{sample_key(row[1], row[2])}.{ext}" for row in maps if row[0] == key for ext in ("png", "npy")
        }
        assert set(members) == expected
        for _, item, target, png_at, png_len, npy_at, npy_len in (row for row in maps if row[0] == key):
            # each row's byte ranges are exactly its members' bytes
            assert body[png_at : png_at + png_len] == members[f"{sample_key(item, target)}.png"]
            assert body[npy_at : npy_at + npy_len] == members[f"{sample_key(item, target)}.npy"]
        png = next(data for name, data in members.items() if name.endswith(".png"))
        npy = next(data for name, data in members.items() if name.endswith(".npy"))
        assert decode_png_gray(png).shape == (SHAPE.map_side, SHAPE.map_side)
        assert decode_npy(npy).shape == (SHAPE.raw_side, SHAPE.raw_side)
