"""The localisation columns' migration keeps existing heatmap rows both ways, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from schema.db import downgrade, normalise_url, upgrade

COLUMNS = {"box_energy", "box_hit", "outside_mass", "border_share"}
ROWS = (
    "INSERT INTO runs (id, status, model_ref, methods, layers, target_spec, source_uri, "
    "output_uri, preprocess, patch_size, top_patches, config, versions, n_items, n_shards, "
    "n_done, n_failed, shards_done, shards_failed, created_at) VALUES ('r', 'finished', "
    "'demo', '[]', '[]', 'top1', 's', 'o', '{}', 32, 5, '{}', '{}', 0, 0, 0, 0, 0, 0, "
    "CURRENT_TIMESTAMP)",
    'INSERT INTO shards (id, run_id, "index", status, n_items, n_done, n_failed, attempts) '
    "VALUES (1, 'r', 0, 'done', 1, 1, 0, 1)",
    "INSERT INTO items (id, run_id, shard_id, ordinal, source_uri, status) "
    "VALUES (1, 'r', 1, 0, 'a.png', 'done')",
    "INSERT INTO heatmaps (id, item_id, run_id, method, layer, target_class, target_score, "
    "object_key, raw_key, sha256, raw_max, raw_mean, map_mean, top_patch_fraction) "
    "VALUES (1, 1, 'r', 'cam', 'l', 0, 1.0, 'k.png', 'k.npy', 'x', 1.0, 0.5, 0.5, 0.2)",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return str(request.getfixturevalue("postgres_url"))


def heatmap_columns(url: str) -> set[str]:
    engine = create_engine(normalise_url(url))
    try:
        return {c["name"] for c in inspect(engine).get_columns("heatmaps")}
    finally:
        engine.dispose()


def test_upgrade_and_downgrade_keep_rows(database_url: str) -> None:
    upgrade(database_url, "0003")
    engine = create_engine(normalise_url(database_url))
    try:
        with engine.begin() as conn:
            for statement in ROWS:
                conn.execute(text(statement))
        assert not COLUMNS & heatmap_columns(database_url)
        upgrade(database_url)
        assert heatmap_columns(database_url) >= COLUMNS
        with engine.begin() as conn:
            row = conn.execute(text("SELECT object_key, box_energy, border_share FROM heatmaps")).one()
            assert tuple(row) == ("k.png", None, None)
            conn.execute(text("UPDATE heatmaps SET box_energy = 0.25, box_hit = true, border_share = 0.1"))
        indexes = {i["name"] for i in inspect(engine).get_indexes("heatmaps")}
        assert {"ix_heatmaps_box_energy", "ix_heatmaps_outside_mass", "ix_heatmaps_border_share"} <= indexes
        downgrade(database_url, "0003")
        assert not COLUMNS & heatmap_columns(database_url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT object_key FROM heatmaps")).scalar_one() == "k.png"
    finally:
        engine.dispose()
