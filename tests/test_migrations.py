"""The migrations and the models describe the same schema, upgrading and downgrading cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from schema.db import downgrade, normalise_url, upgrade
from schema.models import Base
from tests.plugins.services import REPO_ROOT, wait_until

TABLES = {"runs", "shards", "items", "heatmaps", "patch_scores", "alerts"}
LEASE_COLUMNS = {"lease_expires_at", "heartbeat_at", "lost_leases", "lost_worker", "lost_at"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_upgrade_from_empty_matches_models_and_downgrade_to_empty(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine(normalise_url(database_url))
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == []
        downgrade(database_url)
        assert set(inspect(engine).get_table_names()) - {"alembic_version"} == set()
    finally:
        engine.dispose()


RACE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from schema.db import upgrade
    url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    upgrade(url)
    """
)


def test_concurrent_upgrades_of_a_fresh_database_take_turns(database_url: str, tmp_path: Path) -> None:
    """Two `camaudit run` at once on a new database both migrate it: neither may fail."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, database_url, str(tmp_path / f"ready{n}"), str(go)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    try:
        wait_until(
            lambda: all((tmp_path / f"ready{n}").exists() for n in range(4)), 120, "the migrating processes"
        )
        go.touch()
        outcomes = [(proc.wait(timeout=120), proc.stderr.read() if proc.stderr else "") for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [code for code, _ in outcomes] == [0] * 4, "\n".join(err[-2000:] for _, err in outcomes)
    engine = create_engine(normalise_url(database_url))
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        assert len(versions) == 1
    finally:
        engine.dispose()


def test_shard_leases_migrate_up_and_down_and_keep_the_shards(database_url: str) -> None:
    upgrade(database_url, "0003")
    engine = create_engine(normalise_url(database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO runs (id, status, model_ref, methods, layers, target_spec, source_uri, "
                    "output_uri, preprocess, patch_size, top_patches, config, versions, n_items, n_shards, "
                    "n_done, n_failed, shards_done, shards_failed, created_at) VALUES ('r1', 'running', "
                    "'demo', '[]', '[]', 'top1', 'data', 'out', '{}', 32, 5, '{}', '{}', 1, 1, 0, 0, 0, 0, "
                    "CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    'INSERT INTO shards (run_id, "index", status, n_items, n_done, n_failed, attempts) '
                    "VALUES ('r1', 0, 'running', 1, 0, 0, 1)"
                )
            )
        upgrade(database_url, "0004_shard_leases")
        columns = {c["name"] for c in inspect(engine).get_columns("shards")}
        assert columns >= LEASE_COLUMNS
        with engine.connect() as conn:
            assert conn.execute(text("SELECT lost_leases, lease_expires_at FROM shards")).one() == (0, None)
        downgrade(database_url, "0003")
        assert not LEASE_COLUMNS & {c["name"] for c in inspect(engine).get_columns("shards")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT run_id, attempts FROM shards")).one() == ("r1", 1)
    finally:
        engine.dispose()
