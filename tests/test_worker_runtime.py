"""Per-process tuning of a worker: allocator, garbage collector, thread pool sizes."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from schema.settings import Settings
from workers.models import load_model_cached
from workers.pools import pool_sizes
from workers.runtime import engine_for

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
    assert (small.decode, small.encode, small.upload) == (2, 2, 2)
    big = pool_sizes(auto, remote_storage=False, cpus=32)
    assert (big.decode, big.encode, big.upload) == (4, 2, 4)
    assert pool_sizes(auto, remote_storage=True, cpus=2).upload == 16  # round trips, not cores
    chosen = Settings(decode_workers=6, encode_workers=3, upload_workers=40)
    sizes = pool_sizes(chosen, remote_storage=False, cpus=2)
    assert (sizes.decode, sizes.encode, sizes.upload) == (6, 3, 40)


@pytest.mark.parametrize("name", ["decode_workers", "encode_workers", "upload_workers"])
def test_thread_counts_below_one_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="at least 1 thread"):
        Settings(**{name: 0})
