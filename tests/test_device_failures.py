"""Out-of-memory and CUDA errors are told apart from a model that cannot take an input.

No GPU here: the failures are raised by stub models and engines with the exception types and
messages torch uses.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.shard_support import comparable, cpu_settings, objects, shard_work
from workers import shard
from workers.cam import CamEngine
from workers.cam.device_errors import is_device_error, is_out_of_memory
from workers.cam.memory_format import ChannelsLast
from workers.cam.perturb import MaskedForward

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.8 GiB"
STICKY = "CUDA error: an illegal memory access was encountered"


class FailsOnChannelsLast(nn.Module):
    """A small CNN whose forward raises ``error`` whenever its input is channels-last."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            raise self.error
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_failures_are_classified() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError(OOM))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_device_error(torch.OutOfMemoryError(OOM))
    assert is_device_error(RuntimeError(STICKY))
    assert not is_out_of_memory(RuntimeError("Tensors must have same number of dimensions"))
    assert not is_device_error(RuntimeError("Tensors must have same number of dimensions"))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(OOM), RuntimeError(STICKY)])
def test_device_failures_reach_the_caller_and_keep_channels_last(error: BaseException) -> None:
    engine = CamEngine(FailsOnChannelsLast(error), layers=["features"], methods=["gradcam"], amp=False)
    with pytest.raises(type(error), match="CUDA"):
        engine(torch.randn(2, 3, 8, 8))
    assert engine._memory.enabled
    memory = ChannelsLast(True)
    with pytest.raises(type(error), match="CUDA"):
        MaskedForward(FailsOnChannelsLast(error), torch.device("cpu"), None, memory)(torch.randn(2, 3, 8, 8))
    assert memory.enabled


def test_a_model_refusing_channels_last_still_falls_back() -> None:
    engine = CamEngine(
        FailsOnChannelsLast(RuntimeError("view size is not compatible")), layers=["features"], amp=False
    )
    assert engine(torch.randn(2, 3, 8, 8)).maps["gradcam"].shape == (2, 1, 8, 8)
    assert not engine._memory.enabled


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_out_of_memory_splits_the_batch_and_gives_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, overlap: bool
) -> None:
    settings = cpu_settings()
    # Convolutions may round differently at another batch size, so the reference runs one
    # image at a time, as the stub below ends up doing.
    work = shard_work(tmp_path, 7, batch_size=1)
    expected = comparable(shard.compute_shard(work, settings))
    expected_objects = objects(tmp_path / "out")

    real_engine_for = shard.engine_for
    sizes: list[int] = []

    def engine_for(*args, **kwargs):
        engine = real_engine_for(*args, **kwargs)

        def limited(images: torch.Tensor, targets=None):
            sizes.append(images.shape[0])
            if images.shape[0] > 1:
                raise torch.OutOfMemoryError(OOM)
            return engine(images, targets=targets)

        return limited

    monkeypatch.setattr(shard, "engine_for", engine_for)
    split = shard_work(tmp_path, 7, batch_size=4, out="split")
    with caplog.at_level(logging.WARNING, logger="camaudit.worker"):
        rows = comparable(shard.compute_shard(split, settings, overlap=overlap))
    assert sizes == [4, 2, 1, 1, 2, 1, 1, 3, 1, 2, 1, 1]
    assert rows == expected
    assert objects(tmp_path / "split") == expected_objects
    assert "out of device memory on a batch of 4; retrying as 2 + 2" in caplog.text


def test_out_of_memory_on_one_image_fails_the_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def engine_for(*args, **kwargs):
        def always(images: torch.Tensor, targets=None):
            raise torch.OutOfMemoryError(OOM)

        return always

    monkeypatch.setattr(shard, "engine_for", engine_for)
    with pytest.raises(torch.OutOfMemoryError):
        shard.compute_shard(shard_work(tmp_path, 2, batch_size=2), cpu_settings())


def test_a_cuda_error_ends_the_worker_process() -> None:
    """A worker child running the shard task exits (Celery starts a fresh one); the shard is not failed."""
    script = f"""
import workers.tasks as tasks
def explain_shard(*args, **kwargs):
    raise RuntimeError({STICKY!r})
def fail_shard(*args, **kwargs):
    raise AssertionError("the shard must stay unacknowledged, not failed")
tasks.explain_shard = explain_shard
tasks.fail_shard = fail_shard
tasks.explain_shard_task("run-1", 7)
raise AssertionError("still running")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 70, done.stderr[-2000:]
    assert "device error" in done.stderr and "illegal memory access" in done.stderr


def test_a_cuda_error_in_embedded_mode_takes_the_retry_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import tasks

    def explain_shard(*args, **kwargs):
        raise RuntimeError(STICKY)

    failed: list[str] = []
    monkeypatch.setattr(tasks, "explain_shard", explain_shard)
    monkeypatch.setattr(tasks, "retry_delay", lambda retries: 0)
    monkeypatch.setattr(
        tasks,
        "fail_shard",
        lambda url, run_id, shard_id, error: failed.append(error) or shard.ShardOutcome(run_id, 0, "failed"),
    )
    result = tasks.explain_shard_task.apply(("run-1", 7))
    assert result.result["status"] == "failed"
    assert failed and "illegal memory access" in failed[0]
