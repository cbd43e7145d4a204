"""The distributed path: Redis broker, a real `camaudit worker` process, PostgreSQL, S3 over HTTP."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from schema.db import session_scope
from schema.models import Run
from tests.checks import assert_run_complete
from tests.plugins.services import wait_until
from tests.test_e2e_embedded import run_cli
from workers.storage import open_storage
from workers.synth import make_dataset

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    manifest = make_dataset(tmp_path / "data", 18, seed=5)
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image at all")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "broken.png", "label": "ring"}) + "\n")
    return manifest


def test_celery_run_on_postgres_and_s3(
    dataset: Path,
    postgres_url: str,
    redis_url: str,
    s3_endpoint_url: str,
    s3_storage_url: str,
    start_worker: Callable[..., object],
) -> None:
    env = {
        "CAMAUDIT_DATABASE_URL": postgres_url,
        "CAMAUDIT_BROKER_URL": redis_url,
        "CAMAUDIT_STORAGE_URL": s3_storage_url,
        "CAMAUDIT_S3_ENDPOINT_URL": s3_endpoint_url,
    }
    start_worker(env, name="w1")
    proc = run_cli(
        "run",
        "--source",
        str(dataset),
        "--methods",
        "gradcam,cam",
        "--shard-size",
        "5",
        "--json",
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["shards"] == 4 and status["status"] in ("pending", "running", "finished")
    run_id = status["run_id"]

    def finished() -> bool:
        with session_scope(postgres_url) as s:
            run = s.get(Run, run_id)
            assert run is not None
            assert run.status not in ("failed", "partial"), run.status
            return run.status == "finished"

    wait_until(finished, timeout=240, what=f"run {run_id} to finish", interval=0.5)
    storage = open_storage(s3_storage_url, endpoint_url=s3_endpoint_url)
    assert_run_complete(postgres_url, run_id, storage, failed=1)
    assert storage.locate(f"runs/{run_id}/cam").startswith("s3://")

    shown = run_cli("status", run_id, "--json", env={**os.environ, **env})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["done"] == 18
