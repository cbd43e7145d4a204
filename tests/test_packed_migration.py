"""The packed layout's byte-range columns: added and dropped cleanly on SQLite and PostgreSQL.

Rows written before the migration keep NULL ranges (whole objects); a downgrade that would
strand packed maps (their key then names a whole tar) is refused until those runs are gone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from schema.db import downgrade, normalise_url, upgrade
from tests.test_localisation_migration import ROWS

COLUMNS = {"object_offset", "object_length", "raw_offset", "raw_length"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_byte_ranges_upgrade_keep_rows_and_downgrade_only_without_packed_runs(database_url: str) -> None:
    upgrade(database_url, "0010_groups")
    engine = create_engine(normalise_url(database_url))
    try:
        with engine.begin() as conn:
            for statement in ROWS:
                conn.execute(text(statement))
        assert not COLUMNS & {c["name"] for c in inspect(engine).get_columns("heatmaps")}
        upgrade(database_url, "0011_packed_layout")
        assert {c["name"] for c in inspect(engine).get_columns("heatmaps")} >= COLUMNS
        with engine.begin() as conn:
            row = conn.execute(text("SELECT object_key, object_offset, raw_length FROM heatmaps")).one()
            assert tuple(row) == ("k.png", None, None)
            conn.execute(
                text(
                    "UPDATE heatmaps SET object_offset = 5000000000, object_length = 10, "
                    "raw_offset = 512, raw_length = 128"
                )
            )
            big = conn.execute(text("SELECT object_offset FROM heatmaps")).scalar_one()
            assert big == 5_000_000_000  # tars past 4 GiB: 64-bit offsets
        with pytest.raises(RuntimeError, match=r"runs r store their maps in the packed layout.*camaudit gc"):
            downgrade(database_url, "0010_groups")
        assert {c["name"] for c in inspect(engine).get_columns("heatmaps")} >= COLUMNS
        with engine.begin() as conn:
            conn.execute(text("UPDATE heatmaps SET object_offset = NULL, object_length = NULL"))
            conn.execute(text("UPDATE heatmaps SET raw_offset = NULL, raw_length = NULL"))
        downgrade(database_url, "0010_groups")
        assert not COLUMNS & {c["name"] for c in inspect(engine).get_columns("heatmaps")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT object_key FROM heatmaps")).scalar_one() == "k.png"
    finally:
        engine.dispose()


def test_the_cli_refuses_in_one_line_and_dropping_every_table_is_not_refused(tmp_path: Path) -> None:
    """`camaudit db downgrade` to a revision that keeps the tables says what to do, without a
    traceback; down to base nothing is kept, so packed rows are no reason to refuse."""
    from typer.testing import CliRunner

    from scheduler.cli import app

    database_url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(database_url, "0010_groups")
    engine = create_engine(normalise_url(database_url))
    try:
        with engine.begin() as conn:
            for statement in ROWS:
                conn.execute(text(statement))
        upgrade(database_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE heatmaps SET object_offset = 512, object_length = 10"))
        refused = CliRunner().invoke(
            app, ["db", "downgrade", "--revision", "0010_groups", "--database-url", database_url]
        )
        assert refused.exit_code == 2, refused.output
        assert "store their maps in the packed layout" in refused.output
        assert "Traceback" not in refused.output and isinstance(refused.exception, SystemExit | None)
        dropped = CliRunner().invoke(app, ["db", "downgrade", "--database-url", database_url])
        assert dropped.exit_code == 0, dropped.output
        assert not inspect(engine).get_table_names() or inspect(engine).get_table_names() == [
            "alembic_version"
        ]
    finally:
        engine.dispose()
