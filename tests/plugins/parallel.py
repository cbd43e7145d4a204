"""How the suite is split between pytest-xdist workers (`make test` runs ``-n 2 --dist loadgroup``).

A module fixture that builds a dataset and runs the pipeline must run once, not once per
worker, so every test that uses a module-scoped fixture goes to the same worker as the rest
of its module, and every reader of a shared session run (``demo_run``) goes to one worker
together. Tests with only function-scoped fixtures are handed out one by one.

The order of the queue decides how long the last worker runs alone: the modules with the most
``slow`` tests are queued first, so the long runs (faults, end-to-end, parity) start at once
and the many quick tests fill the gaps at the end. Modules stay contiguous, so a worker never
tears a module fixture down and builds it again. Without xdist nothing here changes.

Why a scheduler of our own: xdist's ``loadgroup`` reads the group from a suffix it writes into
``item._nodeid``, which pytest 9.2 no longer reads, so its groups silently fall apart. Here the
workers write each test's group to a file and the controller's scheduler reads it from there,
through xdist's public hooks only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

# Session fixtures that run a whole audit: their readers share one worker, so it runs once.
SHARED_RUNS = ("demo_run",)
GROUPED_SCOPES = ("module", "package", "class")
GROUPS_FILE = "camaudit_xdist_groups"
_groups_key = pytest.StashKey[Path]()


def group_of(item: pytest.Item) -> str | None:
    """The group an item must share a worker with, or None when it can run anywhere."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in SHARED_RUNS:
        if name in info.name2fixturedefs:
            return name
    for name, defs in info.name2fixturedefs.items():
        if name in item.fixturenames and defs and defs[-1].scope in GROUPED_SCOPES:
            return str(item.path)
    return None


def _grouping(config: pytest.Config) -> bool:
    return config.getoption("dist", "no") == "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    """On the controller: where the workers will write the groups."""
    if hasattr(config, "workerinput") or not _grouping(config):
        return
    handle, name = tempfile.mkstemp(prefix="camaudit-xdist-groups-", suffix=".json")
    os.close(handle)
    config.stash[_groups_key] = Path(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_groups_key, None)
    if path is not None:
        path.unlink(missing_ok=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """On the controller, for each worker: tell it the file."""
    path = node.config.stash.get(_groups_key, None)
    if path is not None:
        node.workerinput[GROUPS_FILE] = str(path)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if not _grouping(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """Whole groups to one worker, everything else test by test, in the collection's order."""

        def __init__(self, config: pytest.Config, log: Any) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # the collection order is the queue's order
            self._groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # written by the workers before they report their collection
                self._groups = json.loads(config.stash[_groups_key].read_text())
            return self._groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the ids the controller will see
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or GROUPS_FILE not in workerinput:
        return
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen = {path: index for index, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))
    groups = {item.nodeid: f"group:{group}" for item in items if (group := group_of(item)) is not None}
    target = Path(workerinput[GROUPS_FILE])
    scratch = target.with_name(f"{target.name}.{workerinput.get('workerid', os.getpid())}")
    scratch.write_text(json.dumps(groups))
    scratch.replace(target)  # every worker collects the same tests: any complete copy will do
