"""A forked worker child that cannot use CUDA stops at once, and no worker's CUDA check poisons it.

There is no GPU here, so a poisoned child is simulated: ``torch.cuda._is_in_bad_fork`` is what
torch consults, and it is made to answer True.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.fork_safety import PoisonedForkError, check_child_can_use_cuda


def test_a_poisoned_child_is_refused_unless_it_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    check_child_can_use_cuda("auto")  # this process is not a poisoned fork
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(PoisonedForkError, match="forked from a parent that had initialised CUDA"):
        check_child_can_use_cuda("auto")
    with pytest.raises(PoisonedForkError, match="'cuda:1'"):
        check_child_can_use_cuda("cuda:1")
    check_child_can_use_cuda("cpu")


def test_worker_children_check_cuda_through_nvml_and_a_poisoned_one_exits() -> None:
    script = """
import os
assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
import workers.celery_app
print("nvml check:", os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"], flush=True)
import torch
torch.cuda._is_in_bad_fork = lambda: True
from celery.signals import worker_process_init
worker_process_init.send(sender=None)
raise AssertionError("the poisoned child went on")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    env["CAMAUDIT_DEVICE"] = "auto"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
        env=env,
    )
    assert "nvml check: 1" in done.stdout
    assert done.returncode == 71, done.stderr[-2000:]
    assert "cannot start" in done.stderr and "forked from a parent that had initialised CUDA" in done.stderr
