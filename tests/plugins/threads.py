"""One share of the cores per pytest-xdist worker, for torch and everything the tests start.

PyTorch's intra-op pool defaults to one thread per core. Two xdist workers on two cores then
run four compute threads, and OpenMP's spinning threads take cores from each other: the
parity tests, which are most of the suite's CPU, took twice the time and three times the CPU
that way. Each worker (and every process it starts: workers, CLI commands, through
``OMP_NUM_THREADS``) gets ``cores // workers`` threads instead. Without xdist nothing changes.
"""

from __future__ import annotations

import os

import pytest

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def threads_per_worker(cores: int, workers: int) -> int:
    return max(1, cores // max(1, workers))


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    threads = threads_per_worker(os.cpu_count() or 1, int(workerinput.get("workercount", 1)))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    import torch  # after the variables, so a first import also reads them

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
