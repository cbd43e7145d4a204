"""The one error type the engine raises for a configuration it cannot run.

Callers (task code, the CLI) catch a single class and show its message unchanged, so every
message says what was wrong and what would be right.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CamConfigError(ValueError):
    """A layer, method, target or input the engine cannot explain as given."""


def unknown_name(kind: str, name: str, valid: Iterable[str], *, shown: int = 12) -> CamConfigError:
    """Build the error for an unknown name, listing the closest valid ones.

    Falls back to the first few valid names when nothing is close, so the message always
    points at something the caller can type.
    """
    choices = list(valid)
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    if close:
        hint = "closest valid: " + ", ".join(repr(c) for c in close)
    else:
        more = " …" if len(choices) > shown else ""
        hint = "valid: " + ", ".join(repr(c) for c in choices[:shown]) + more
    return CamConfigError(f"unknown {kind} {name!r}; {hint}")
