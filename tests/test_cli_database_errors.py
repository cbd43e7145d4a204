"""A command pointed at a database without camaudit's tables says so in one line and how to fix
it, on SQLite and PostgreSQL, instead of a traceback that shows the SQL it sent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from schema.db import normalise_url, upgrade

REPO = Path(__file__).resolve().parents[1]


def camaudit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_a_database_without_tables_is_named_with_the_fix(empty_database: str) -> None:
    done = camaudit("status", "somerun", "--database-url", empty_database)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no camaudit tables" in done.stderr and "camaudit db upgrade" in done.stderr
    assert "Traceback" not in done.stderr and "SELECT" not in done.stderr


def test_an_older_schema_is_named_with_the_fix(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(database_url)
    engine = create_engine(normalise_url(database_url))
    with engine.begin() as conn:  # as if a migration that adds a column had not run
        conn.execute(text("ALTER TABLE runs DROP COLUMN n_failed"))
    engine.dispose()
    done = camaudit("status", "somerun", "--database-url", database_url)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "older camaudit schema" in done.stderr and "camaudit db upgrade" in done.stderr
    assert "Traceback" not in done.stderr
