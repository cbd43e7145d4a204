"""Per-process tuning of a worker: allocator, garbage collector, thread pool sizes."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from schema.settings import Settings
from workers.models import load_model_cached
from workers.pools import pool_sizes
from workers.runtime import engine_for, host_threads

FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from workers.runtime import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(12_500_000).fill_(1.0)  # 50 MB, like a large activation
    del buffer
    before = faults()
    for _ in range(10):
        buffer = torch.empty(12_500_000).fill_(1.0)
        del buffer
    print((faults() - before) // 10)
    """
)


def _faults_per_buffer(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    return int(done.stdout.strip())


@pytest.mark.slow
def test_kept_memory_is_not_page_faulted_in_again_for_every_batch() -> None:
    default, kept = _faults_per_buffer("default"), _faults_per_buffer("keep")
    # 50 MB is ~12,200 pages: glibc maps each such buffer afresh; kept, it is reused.
    assert default > 10_000
    assert kept < default / 3


def test_making_an_engine_freezes_what_is_alive_out_of_the_collector() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    loaded = load_model_cached("demo", None, device="cpu")
    try:
        # a combination no other test asks for, so this call makes a new engine
        engine_for(
            loaded, ["hirescam", "layercam", "xgradcam"], ["features"], Settings(device="cpu", amp="off")
        )
        assert gc.get_freeze_count() > 10_000  # torch's modules and the model, at least
    finally:
        gc.unfreeze()


def test_pool_sizes_follow_cores_and_storage_unless_set() -> None:
    auto = Settings()
    small = pool_sizes(auto, remote_storage=False, cpus=2)
    assert (small.fetch, small.decode, small.encode, small.upload) == (2, 2, 2, 2)
    big = pool_sizes(auto, remote_storage=False, cpus=32)
    assert (big.fetch, big.decode, big.encode, big.upload) == (32, 32, 32, 32)
    remote = pool_sizes(auto, remote_storage=True, remote_sources=True, cpus=2)
    assert (remote.fetch, remote.decode, remote.upload) == (32, 2, 32)  # round trips, not cores
    chosen = Settings(fetch_workers=9, decode_workers=6, encode_workers=3, upload_workers=40)
    sizes = pool_sizes(chosen, remote_storage=True, remote_sources=True, cpus=2)
    assert (sizes.fetch, sizes.decode, sizes.encode, sizes.upload) == (9, 6, 3, 40)


def test_sizes_default_by_device_and_runs_and_audits_can_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from scheduler.audits import Audit
    from schema.payloads import RunSpec
    from workers.device_defaults import CPU, CUDA, defaults_for

    assert defaults_for("cpu") == CPU and defaults_for("cuda:1") == CUDA
    assert CUDA.batch_size > CPU.batch_size and CUDA.shard_size > CPU.shard_size
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert defaults_for("auto") == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert defaults_for("auto") == CPU
    spec = RunSpec(source="x")
    assert (spec.batch_size, spec.shard_size, spec.score_batch_size) == (None, None, None)
    audit = Audit(name="a", schedule="0 * * * *", source="x", batch_size=32, score_batch_size=128)
    assert (audit.run_spec().batch_size, audit.run_spec().score_batch_size) == (32, 128)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RunSpec(source="x", score_batch_size=0)


def test_the_engine_takes_the_runs_score_batch_size_or_the_devices() -> None:
    loaded = load_model_cached("demo", None, device="cpu")
    settings = Settings(device="cpu", amp="off")
    try:
        assert engine_for(loaded, ["scorecam"], ["features"], settings).score_batch_size == 64
        assert engine_for(loaded, ["scorecam"], ["features"], settings, 8).score_batch_size == 8
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("name", ["fetch_workers", "decode_workers", "encode_workers", "upload_workers"])
def test_thread_counts_below_one_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="at least 1 thread"):
        Settings(**{name: 0})


def test_host_work_runs_on_one_torch_thread_on_a_cpu_device_only() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    other_ready, main_inside = threading.Event(), threading.Event()

    def other() -> None:
        torch.ones(100_000).sum()  # a thread that already runs torch keeps its own count
        other_ready.set()
        main_inside.wait(timeout=30)
        seen.append(torch.get_num_threads())

    try:
        thread = threading.Thread(target=other)
        thread.start()
        assert other_ready.wait(timeout=30)
        with host_threads(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            main_inside.set()
            thread.join(timeout=30)
        assert torch.get_num_threads() == 2
        assert seen == [2]
        with host_threads(torch.device("cuda")):  # not run on a CPU: the device's work is elsewhere
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_gpu_worker_runs_torch_on_one_cpu_thread_unless_set(tmp_path: Path) -> None:
    """OpenMP teams per host thread would spin beside the decode pool; a CPU worker keeps its cores."""
    from tests.shard_support import cpu_settings, shard_work
    from workers import shard
    from workers.runtime import apply_torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert apply_torch_threads(torch.device("cpu"), Settings()) == 2
        assert apply_torch_threads(torch.device("cuda"), Settings()) == 1  # only the count: CUDA untouched
        assert apply_torch_threads(torch.device("cuda"), Settings(torch_threads=3)) == 3
        torch.set_num_threads(2)
        # a shard applies the setting before its host work
        settings = cpu_settings().model_copy(update={"torch_threads": 1})
        rows = shard.compute_shard(shard_work(tmp_path, 3, batch_size=2), settings)
        assert rows.n_done == 3 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1 thread"):
        Settings(torch_threads=0)
