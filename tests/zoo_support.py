"""What the zoo tests share: weights planted where each library's cache looks, and a run of them.

Nothing is downloaded: huggingface_hub and timm read a planted hub cache (``HF_HUB_CACHE``),
torchvision its checkpoint folder (``TORCH_HOME``), and every run is offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file
from sqlalchemy import select

from schema.db import session_scope
from schema.models import Run
from tests.test_e2e_embedded import run_cli

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_snapshot(cache: Path, repo: str, revision: str = REVISION) -> Path:
    """The snapshot folder of ``repo`` laid out as huggingface_hub caches it (refs/main names it)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def plant_hf_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """A ``model.safetensors`` of ``state`` in ``repo``'s cached snapshot; its path."""
    path = hf_snapshot(cache, repo) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def plant_torchvision(
    torch_home: Path, name: str, weights: object, seed: int = 0
) -> tuple[Path, torch.nn.Module]:
    """Random weights of the right shapes where torchvision's loader looks for ``weights``."""
    torch.manual_seed(seed)
    classes = len(weights.meta["categories"])  # type: ignore[attr-defined]
    model = torchvision.models.get_model(name, weights=None, num_classes=classes).eval()
    path = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path, model


def run_zoo_model(
    tmp_path: Path, manifest: Path, model: str, *options: str, env: dict[str, str], done: int
) -> tuple[str, Run]:
    """``camaudit run`` of a zoo model over ``manifest`` in a fresh database: the database URL and
    the run's row, once the run finished with ``done`` items explained."""
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = run_cli(
        "run", "--source", str(manifest), "--model", model, *options,
        "--database-url", db, "--storage-url", str(tmp_path / "maps"), "--json", env=env,
        process=True,  # the hubs read their cache locations from the environment once, at import
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished" and status["done"] == done, status
    with session_scope(db) as s:
        run = s.execute(select(Run).where(Run.id == status["run_id"])).scalar_one()
        s.expunge(run)
    return db, run
