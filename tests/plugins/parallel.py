"""How the suite is split between pytest-xdist workers (`make test` runs ``-n 2 --dist loadgroup``).

A module fixture that builds a dataset and runs the pipeline must run once, not once per
worker, so every test that uses a module-scoped fixture goes to the same worker as the rest
of its module, and every reader of a shared session run (``demo_run``) goes to one worker
together. Tests with only function-scoped fixtures are handed out one by one.

The order of the queue decides how long the last worker runs alone: the modules with the most
``slow`` tests are queued first, so the long runs (faults, end-to-end, parity) start at once
and the many quick tests fill the gaps at the end. Modules stay contiguous, so a worker never
tears a module fixture down and builds it again. Without xdist nothing here changes.
"""

from __future__ import annotations

from collections import Counter

import pytest

# Session fixtures that run a whole audit: their readers share one worker, so it runs once.
SHARED_RUNS = ("demo_run",)
GROUPED_SCOPES = ("module", "package", "class")


def _distributed(config: pytest.Config) -> bool:
    """True in an xdist worker whose tests are handed out by group (the controller collects nothing)."""
    return hasattr(config, "workerinput") and bool(getattr(config.option, "loadgroup", False))


def group_of(item: pytest.Item) -> str | None:
    """The xdist group an item must share with others, or None when it can run anywhere."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in SHARED_RUNS:
        if name in info.name2fixturedefs:
            return name
    for name, defs in info.name2fixturedefs.items():
        if name in item.fixturenames and defs and defs[-1].scope in GROUPED_SCOPES:
            return item.module.__name__ if isinstance(item, pytest.Function) else item.nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist turns the xdist_group marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _distributed(config):
        return
    for item in items:
        group = group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen = {path: index for index, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))
