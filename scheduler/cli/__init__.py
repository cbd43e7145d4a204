"""The ``camaudit`` command line: one module per command group, all on the Typer in ``root``.

The modules are imported in the order their commands are listed by ``camaudit --help``.
"""

from __future__ import annotations

import sys

from sqlalchemy.exc import DBAPIError

# isort: off
from scheduler.cli import runs, results, exports, workers, demo, audits, serve, analysis, db  # noqa: F401

# isort: on
from scheduler.cli.options import err
from scheduler.cli.root import app
from scheduler.cli.runs import start_run

__all__ = ["app", "main", "start_run"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except DBAPIError as exc:
        reason = _schema_missing(exc)
        if reason is None:
            raise
        err.print(
            f"[bold red]error:[/] the database has {reason}; create or migrate its tables with "
            "`camaudit db upgrade` (same --database-url / CAMAUDIT_DATABASE_URL)"
        )
        sys.exit(2)


def _schema_missing(exc: DBAPIError) -> str | None:
    """What is missing when a command meets a database without camaudit's tables (or an older
    schema), in words without the statement or its parameters; None for any other error."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    text = str(exc.orig).lower()
    if code == "42P01" or "no such table" in text:
        return "no camaudit tables (or not all of them)"
    if code == "42703" or "no such column" in text:
        return "an older camaudit schema (a column is missing)"
    return None
