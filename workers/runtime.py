"""Per-process state of a worker: the device, the loaded model, the engine and the storage.

A worker process loads each model once and reuses it for every shard; everything here is
keyed so that two runs with different models or outputs never share the wrong object.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

from schema.settings import Settings
from workers.cam import CamEngine
from workers.device_defaults import defaults_for
from workers.libc import libc_function
from workers.models import LoadedModel, load_model_cached
from workers.storage import Storage, open_storage

log = logging.getLogger("camaudit.worker")
_lock = threading.Lock()
_engines: dict[tuple[Any, ...], CamEngine] = {}
_storages: dict[tuple[str, str | None, str | None], Storage] = {}


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {setting!r} was asked for but CUDA is not available here; use cpu or auto"
        )
    return device


def apply_torch_threads(device: torch.device, settings: Settings) -> int:
    """Set torch's CPU threads for this process before a shard's host work; returns the count.

    On a GPU worker the model does not use the CPU, and every thread that runs a parallel torch
    operation on the host (staging a batch, localisation's upsampling) gets an OpenMP team of
    its own, as many threads as cores, that spin-waits after each operation: on a 16-core
    machine, several such teams beside the decode and encode pools, per worker process. There
    it is one thread (threads started later take the count up at their first parallel
    operation), as PyTorch's own data-loading workers do; a CPU worker keeps all of them for
    the model. ``torch_threads`` in the settings wins either way.
    """
    wanted = settings.torch_threads or (1 if device.type == "cuda" else None)
    if wanted is not None and torch.get_num_threads() != wanted:
        log.info("torch CPU threads: %d (were %d), the model on %s", wanted, torch.get_num_threads(), device)
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


@contextlib.contextmanager
def host_threads(device: torch.device) -> Iterator[None]:
    """The calling thread's tensor work around the model runs on one torch thread on a CPU device.

    Staging a batch and reducing its results are many short operations; on two threads each
    wakes torch's OpenMP helper, which then spin-waits for the next one on the core the decode
    and encode threads need (with the null engine, as much CPU as the work itself). With OpenMP
    the thread count is the calling thread's own, so the model, called outside this block, keeps
    every thread, and other threads keep theirs (one whose first parallel operation falls inside
    the block starts with one thread). Elsewhere nothing changes.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def amp_argument(setting: str) -> str | bool | None:
    """Settings spell autocast as auto/bf16/fp16/off; the engine takes None/'bf16'/'fp16'/False."""
    return {"auto": None, "bf16": "bf16", "fp16": "fp16", "off": False}[setting]


class CheckpointChangedError(RuntimeError):
    """The checkpoint file is not the one the run was planned with: its maps would be another model's."""


def model_for(
    ref: str, checkpoint: str | None, settings: Settings, *, expected_sha256: str | None = None
) -> LoadedModel:
    """The process's copy of the model, refused when its checkpoint's sha256 is not the run's."""
    loaded = load_model_cached(ref, checkpoint, device=pick_device(settings.device))
    if expected_sha256 is not None and loaded.checkpoint_sha256 != expected_sha256:
        raise CheckpointChangedError(
            f"checkpoint {checkpoint or ref} has sha256 {loaded.checkpoint_sha256}, but the run was "
            f"planned with sha256 {expected_sha256}: the file changed after planning, so this worker "
            "would explain another model. Put the original file back and `camaudit resume` the run, "
            "or start a new run for the new weights"
        )
    return loaded


def engine_for(
    loaded: LoadedModel,
    methods: list[str],
    layers: list[str],
    settings: Settings,
    score_batch_size: int | None = None,
) -> CamEngine:
    """The engine for a run's methods and layers; ``score_batch_size`` None: by device."""
    device = next(loaded.model.parameters()).device
    score_batch = score_batch_size or defaults_for(device.type).score_batch_size
    key = (id(loaded.model), tuple(methods), tuple(layers), settings.amp, score_batch)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = CamEngine(
                loaded.model,
                layers=layers,
                methods=methods,
                amp=amp_argument(settings.amp),
                score_batch_size=score_batch,
                reshape=loaded.reshape,
            )
            _engines[key] = engine
            keep_freed_memory()
            settle_heap()
        return engine


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
ALLOCATOR_THRESHOLD = 1 << 30


def keep_freed_memory(threshold: int = ALLOCATOR_THRESHOLD) -> bool:
    """Let glibc keep freed buffers up to ``threshold`` bytes instead of returning them to the OS.

    With its defaults every large activation buffer is mapped fresh and page-faulted in again
    on the next batch: a cold resnet50 batch took 0.88 s that way against 0.47 s with the
    buffers kept (docs/ENGINE.md). The same as ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` in the environment, but set from inside the process, so the
    worker, embedded runs and benchmarks all get it. False where the C library has no mallopt.
    """
    mallopt = libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1)


def settle_heap() -> None:
    """Exclude what is alive now (modules, the model, the engine) from cyclic garbage collection.

    A shard allocates tens of thousands of small row objects, so the collector runs often,
    and each full pass walked every object torch and its imports keep alive: 6-8 % of a
    worker's CPU in profiles. Frozen objects are still freed by reference counting.
    """
    gc.collect()
    gc.freeze()


def storage_for(url: str, settings: Settings) -> Storage:
    key = (url, settings.s3_endpoint_url, settings.s3_region)
    with _lock:
        storage = _storages.get(key)
        if storage is None:
            storage = open_storage(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
            _storages[key] = storage
        return storage
