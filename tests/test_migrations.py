"""The migrations and the models describe the same schema, upgrading and downgrading cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from schema.db import downgrade, normalise_url, upgrade
from schema.models import Base

TABLES = {"runs", "shards", "items", "heatmaps", "patch_scores", "alerts"}


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
