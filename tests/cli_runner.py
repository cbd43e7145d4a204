"""Run ``camaudit`` commands for tests: in this process by default, or as a real process.

Each ``python -m scheduler.cli`` process spends seconds of CPU importing torch, torchvision and
the rest before it does anything, and the suite runs about fifty commands: in the test's own
process, where those modules are loaded already, the same ``main()`` runs with the same
arguments, environment and exit status, and its output is captured from ``sys.stdout`` and
``sys.stderr`` (which the CLI's consoles and log handler resolve at each write). What a process
of its own would add (the import of the entry point, signals, a fresh interpreter's state) is
tested by the commands that pass ``process=True`` and by the README's commands in CI. A
command that may talk to a Celery broker always gets a process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, process: bool = False
) -> subprocess.CompletedProcess[str]:
    """``camaudit *args``: its exit status and what it printed, as :func:`subprocess.run` gives them."""
    if process or _uses_broker(args, os.environ if env is None else env):
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    return _in_process(list(args), env)


def _uses_broker(args: tuple[str, ...], env: Mapping[str, str]) -> bool:
    """Celery's app keeps its broker connections for the life of its process, so a command that
    may talk to a broker gets a process of its own."""
    return bool(env.get("CAMAUDIT_BROKER_URL")) or any(a.split("=", 1)[0] == "--broker-url" for a in args)


def _in_process(args: list[str], env: Mapping[str, str] | None) -> subprocess.CompletedProcess[str]:
    from scheduler.cli import main  # the CLI's own imports, once per test process
    from schema.settings import get_settings

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with (
        _environment(env),
        _logging_restored(),
        _argv(["camaudit", *args]),
        _cwd(REPO),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        get_settings.cache_clear()  # settings come from this call's environment, as in a new process
        try:
            main()
        except SystemExit as exit_:
            code = _exit_status(exit_.code, err)
        except Exception:  # what the interpreter does with an uncaught error: traceback, status 1
            traceback.print_exc(file=err)
            code = 1
        finally:
            get_settings.cache_clear()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _exit_status(code: object, err: io.StringIO) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    err.write(f"{code}\n")  # sys.exit("message") prints the message and exits with 1
    return 1


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    """``env`` as the whole environment for the call (as a process would get it), then the old one.

    ``os.environ`` is changed in place: the CLI's consoles keep a reference to it.
    """
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """The CLI configures the root logger for its command; the test's own handlers come back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)
