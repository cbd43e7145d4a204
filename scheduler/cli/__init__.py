"""The ``camaudit`` command line: one module per command group, all on the Typer in ``root``.

The modules are imported in the order their commands are listed by ``camaudit --help``.
"""

from __future__ import annotations

import sys

# isort: off
from scheduler.cli import runs, results, workers, demo, audits, serve, analysis, db  # noqa: F401

# isort: on
from scheduler.cli.root import app
from scheduler.cli.runs import start_run

__all__ = ["app", "main", "start_run"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
