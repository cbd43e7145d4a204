"""C library calls Python does not wrap (``syncfs``, ``mallopt``), looked up once per process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def libc_function(name: str, *argtypes: Any, restype: Any = ctypes.c_int) -> Any:
    """The C library's ``name`` taking ``argtypes`` and returning ``restype``; None where there is none."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = restype
    return function
