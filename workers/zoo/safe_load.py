"""Zoo loaders that call ``torch.load(weights_only=False)`` themselves, made tensors-only.

torch.hub and timm read cached weight files with ``weights_only=False``, which unpickles
arbitrary objects (running code). torch honours ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` over
every call site's argument; it is switched on only while a zoo builds a model, under a lock so
no two loads race on the variable.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SAFE_LOAD_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_LOCK = threading.Lock()


@contextmanager
def tensors_only_loads() -> Iterator[None]:
    with _LOCK:
        before = os.environ.get(SAFE_LOAD_ENV)
        os.environ[SAFE_LOAD_ENV] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(SAFE_LOAD_ENV, None)
            else:
                os.environ[SAFE_LOAD_ENV] = before
