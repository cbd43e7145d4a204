"""``camaudit db``: create, migrate and drop the tables."""

from __future__ import annotations

from scheduler.cli.options import DatabaseUrl, err, failing_on, make_settings
from scheduler.cli.root import db_app
from schema.redact import hide_password


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", database_url: DatabaseUrl = None) -> None:
    """Create or migrate the tables."""
    from schema.db import upgrade

    settings = make_settings(database_url=database_url)
    upgrade(settings.database_url, revision)
    err.print(f"database {hide_password(settings.database_url)} at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = "base", database_url: DatabaseUrl = None) -> None:
    """Undo migrations (default: drop every table)."""
    from schema.db import DowngradeRefused, downgrade

    settings = make_settings(database_url=database_url)
    with failing_on(DowngradeRefused):
        downgrade(settings.database_url, revision)
    err.print(f"database {hide_password(settings.database_url)} at {revision}")
