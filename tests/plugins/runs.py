"""A finished audit shared by every test module that only reads one.

Building a dataset and running the pipeline costs seconds, so the quality and report tests
read the same run instead of each making their own. A test that changes a row of it for a
moment puts the row back in a ``finally`` block; a test that needs a run to change (drift
finalisation, re-runs, faults) makes its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.synth import make_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
# Shown as text by every page and report that prints run names; never run as markup.
HOSTILE_NAME = '<script>alert("x")</script> & co'


@dataclass(frozen=True)
class DemoRun:
    db: str
    run_id: str
    n_items: int
    storage: Path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """16 synthetic images explained with gradcam and cam by ``camaudit run`` on SQLite and a folder."""
    root = tmp_path_factory.mktemp("shared-run")
    n_items = 16
    manifest = make_dataset(root / "data", n_items, seed=41)
    db = f"sqlite:///{root / 'runs.db'}"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "scheduler.cli", "run", "--source", str(manifest)),
            *("--methods", "gradcam,cam", "--name", HOSTILE_NAME, "--json"),
            *("--database-url", db, "--storage-url", str(root / "heatmaps")),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished" and status["done"] == n_items, status
    return DemoRun(db, str(status["run_id"]), n_items, root / "heatmaps")
