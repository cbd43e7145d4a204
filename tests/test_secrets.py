"""No password reaches a terminal, a log line, a stored error, a Celery result or a page.

A PostgreSQL role with a password is created for the test, and every command runs against the
URL that carries it: what each prints, logs, stores and serves is searched for the password.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from schema.db import dispose_engines, session_scope
from schema.models import Item, Shard
from schema.redact import hide_password, redact
from schema.settings import get_settings
from tests.cli_runner import run_cli
from tests.plugins.s3 import free_port
from tests.plugins.services import REPO_ROOT, wait_until
from workers.synth import make_dataset


@pytest.fixture
def secret_url(postgres_admin_url: str) -> Iterator[tuple[str, str]]:
    """(URL with a password, the password) of a fresh database owned by a fresh role."""
    suffix = uuid.uuid4().hex[:10]
    role, password = f"camaudit_t_role_{suffix}", f"Pw-{uuid.uuid4().hex}-x"
    database = f"camaudit_t_{suffix}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"))
        conn.execute(text(f'CREATE DATABASE "{database}" OWNER "{role}"'))
    host = postgres_admin_url.split("@", 1)[1].rsplit("/", 1)[0]
    yield f"postgresql://{role}:{password}@{host}/{database}", password
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    admin.dispose()


def _cli(*args: str, env: dict[str, str]) -> str:
    # a process of its own: what it logs is configured as a real command's is
    done = run_cli(*args, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, process=True)
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def test_hide_password_and_redact() -> None:
    assert hide_password("postgresql://u:p%40ss@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert hide_password("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert hide_password("sqlite:///camaudit.db") == "sqlite:///camaudit.db"
    assert redact("failed on amqp://guest:guest@mq//, host=db password=x1 user=u") == (
        "failed on amqp://guest:***@mq//, host=db password=*** user=u"
    )


def test_no_command_log_stored_error_result_or_page_shows_the_password(
    secret_url: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, password = secret_url
    env = {"CAMAUDIT_DATABASE_URL": url, "CAMAUDIT_STORAGE_URL": str(tmp_path / "out")}
    manifest = make_dataset(tmp_path / "data", 3, seed=2)
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + password.encode())
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "broken.png"}) + "\n")
    seen: dict[str, str] = {}
    seen["db upgrade"] = _cli("db", "upgrade", env=env)
    assert seen["db upgrade"].startswith("exit 0") and ":***@" in seen["db upgrade"]
    seen["run"] = _cli("run", "--source", str(manifest), "--methods", "gradcam", "--json", env=env)
    assert seen["run"].startswith("exit 0"), seen["run"]
    run_id = json.loads(seen["run"].split("\n", 1)[1].split("\n\n")[0])["run_id"]
    seen["status of a missing run"] = _cli("status", "nosuchrun", env=env)
    assert ":***@" in seen["status of a missing run"]

    # A shard attempt whose error names the database: retried, logged, reported to Celery.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        try:
            from workers.celery_app import configure
            from workers.tasks import explain_shard_task

            configure(get_settings())
            with caplog.at_level(logging.DEBUG):
                result = explain_shard_task.apply((run_id, 2**40), throw=False)
        finally:
            get_settings.cache_clear()
    seen["worker log"] = caplog.text
    assert "does not exist in postgresql://" in caplog.text and ":***@" in caplog.text
    seen["task result"] = f"{result.result!r}\n{result.traceback or ''}\n{result.info!r}"

    with session_scope(url) as session:
        shard_errors = session.execute(select(Shard.error).where(Shard.error.is_not(None))).scalars().all()
        item_errors = session.execute(select(Item.error).where(Item.error.is_not(None))).scalars().all()
    assert item_errors, "the broken file is a failed item"
    seen["stored errors"] = "\n".join([*shard_errors, *item_errors])

    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "camaudit web UI on" in log_path.read_text(), 120, "camaudit serve to start")
        for path in ("/", f"/runs/{run_id}", "/runs/nosuchrun", f"/drift?a=nosuchrun&b={run_id}"):
            wait_until(lambda path=path: _page_answers(port, path), 60, f"page {path}")
            seen[f"page {path}"] = _page(port, path)
        assert "nosuchrun" in seen["page /runs/nosuchrun"] and ":***@" in seen["page /runs/nosuchrun"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    seen["serve output"] = log_path.read_text()
    assert ":***@" in seen["serve output"]
    seen["db downgrade"] = _cli("db", "downgrade", env=env)
    assert seen["db downgrade"].startswith("exit 0") and ":***@" in seen["db downgrade"]

    leaked = [where for where, shown in seen.items() if password in shown]
    assert leaked == [], {where: seen[where][-1500:] for where in leaked}


def _page(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as error:
        return str(error.read().decode())


def _page_answers(port: int, path: str) -> bool:
    return bool(_page(port, path))
