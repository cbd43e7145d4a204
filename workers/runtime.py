"""Per-process state of a worker: the device, the loaded model, the engine and the storage.

A worker process loads each model once and reuses it for every shard; everything here is
keyed so that two runs with different models or outputs never share the wrong object.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from schema.settings import Settings
from workers.cam import CamEngine
from workers.models import LoadedModel, load_model_cached
from workers.storage import Storage, open_storage

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


def amp_argument(setting: str) -> str | bool | None:
    """Settings spell autocast as auto/bf16/fp16/off; the engine takes None/'bf16'/'fp16'/False."""
    return {"auto": None, "bf16": "bf16", "fp16": "fp16", "off": False}[setting]


def model_for(ref: str, checkpoint: str | None, settings: Settings) -> LoadedModel:
    return load_model_cached(ref, checkpoint, device=pick_device(settings.device))


def engine_for(loaded: LoadedModel, methods: list[str], layers: list[str], settings: Settings) -> CamEngine:
    key = (id(loaded.model), tuple(methods), tuple(layers), settings.amp)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = CamEngine(loaded.model, layers=layers, methods=methods, amp=amp_argument(settings.amp))
            _engines[key] = engine
        return engine


def storage_for(url: str, settings: Settings) -> Storage:
    key = (url, settings.s3_endpoint_url, settings.s3_region)
    with _lock:
        storage = _storages.get(key)
        if storage is None:
            storage = open_storage(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
            _storages[key] = storage
        return storage
