"""The commands that reach the database, the broker and the storage take those options alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from schema.settings import get_settings

SERVICE_OPTIONS = ("--database-url", "--broker-url", "--storage-url", "--s3-endpoint-url")


@pytest.mark.parametrize("command", ["run", "resume", "worker"])
def test_each_command_offers_the_service_options(command: str) -> None:
    shown = " ".join(CliRunner().invoke(app, [command, "--help"], terminal_width=200).output.split())
    assert all(option in shown for option in SERVICE_OPTIONS), shown


def test_worker_options_become_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given on the command line, they win over the environment; without a broker it refuses to start."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CAMAUDIT_")}
    monkeypatch.setattr(os, "environ", environ)
    db, out = f"sqlite:///{tmp_path / 'runs.db'}", str(tmp_path / "maps")
    try:
        result = CliRunner().invoke(
            app,
            ["worker", "--database-url", db, "--storage-url", out, "--s3-endpoint-url", "http://127.0.0.1:9"],
        )
        settings = get_settings()
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "a worker needs a broker" in " ".join(result.output.split())
    assert (settings.database_url, settings.storage_url, settings.s3_endpoint_url) == (
        db,
        out,
        "http://127.0.0.1:9",
    )
    assert settings.embedded


def test_a_worker_sizes_its_pools_to_its_share_of_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes per worker times its GPUs share the machine's cores; a count set beforehand wins."""
    from workers.pools import pool_sizes

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    for preset, expected in ((None, 6), ("2", 2)):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CAMAUDIT_")}
        if preset:
            environ["CAMAUDIT_WORKER_PROCESSES"] = preset
        monkeypatch.setattr(os, "environ", environ)
        try:
            result = CliRunner().invoke(
                app, ["worker", "--concurrency", "3", "--gpus", "0,1", "--database-url", db]
            )
            settings = get_settings()
        finally:
            get_settings.cache_clear()
        assert result.exit_code == 2 and "a worker needs a broker" in " ".join(result.output.split())
        assert environ["CAMAUDIT_WORKER_PROCESSES"] == str(expected)
        assert settings.worker_processes == expected
        assert pool_sizes(settings, remote_storage=False, cpus=24).decode == 24 // expected
    refused = CliRunner().invoke(app, ["worker", "--concurrency", "0", "--database-url", db])
    assert refused.exit_code == 2 and "--concurrency must be at least 1" in refused.output
