"""A run's life: failing shards end it `failed`/`partial` instead of hanging; resume finishes it;
audits remember their baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from schema.db import session_scope
from schema.models import Shard
from tests.checks import assert_run_complete
from tests.test_e2e_embedded import run_cli
from workers.storage import open_storage
from workers.synth import make_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("d"), 10, seed=21)


def test_failing_shards_end_the_run_and_resume_finishes_it(manifest: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs").write_text("a file where the heatmap folder must go")  # every upload fails
    env = {**os.environ, "CAMAUDIT_DATABASE_URL": db, "CAMAUDIT_STORAGE_URL": str(out)}
    proc = run_cli("run", "--source", str(manifest), "--shard-size", "5", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["status"], status["shards_failed"], status["done"]) == ("failed", 2, 0)
    with session_scope(db) as s:
        shards = s.execute(select(Shard).where(Shard.run_id == status["run_id"])).scalars().all()
    assert all(sh.status == "failed" and sh.attempts == 4 and "runs" in (sh.error or "") for sh in shards)

    (out / "runs").unlink()
    resumed = run_cli("resume", status["run_id"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    shown = run_cli("status", status["run_id"], "--watch", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "finished"
    assert_run_complete(db, status["run_id"], open_storage(str(out)))


def test_audit_runs_record_the_previous_good_run_as_baseline(manifest: Path, tmp_path: Path) -> None:
    audits = tmp_path / "audits.yaml"
    audits.write_text(
        "audits:\n"
        f"  - {{name: nightly, schedule: '0 2 * * *', source: '{manifest}', model: demo,"
        f" methods: [gradcam], output: '{tmp_path / 'out'}'}}\n"
    )
    env = {**os.environ, "CAMAUDIT_DATABASE_URL": f"sqlite:///{tmp_path / 'runs.db'}"}
    first = run_cli("audit", "run", "nightly", "--audits", str(audits), env=env)
    assert first.returncode == 0, first.stderr
    first_info = json.loads(first.stdout)
    assert first_info["status"] == "finished" and first_info["baseline_run_id"] is None
    second = run_cli("audit", "run", "nightly", "--audits", str(audits), env=env)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["baseline_run_id"] == first_info["run_id"]
    wrong = run_cli("audit", "run", "nighty", "--audits", str(audits), env=env)
    assert wrong.returncode == 2 and "nightly" in wrong.stderr
