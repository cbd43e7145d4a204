"""Start the web UI under uvicorn, after checking it would neither expose data nor serve nothing."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from scheduler.web.auth import RedactToken, WebConfigError, check_exposure
from schema.db import get_engine, normalise_url

__all__ = ["check_database", "serve"]


def check_database(database_url: str) -> None:
    """A read-only server must not create an empty SQLite file, nor serve a database without runs."""
    url = make_url(normalise_url(database_url))
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise WebConfigError("an in-memory SQLite database holds no runs; pass the file the runs went to")
        if not Path(url.database).is_file():
            raise WebConfigError(
                f"no database file at {url.database}; pass the --database-url that `camaudit run` used"
            )
    try:
        has_runs = inspect(get_engine(database_url)).has_table("runs")
    except Exception as exc:
        raise WebConfigError(f"cannot open the database {url.render_as_string()}: {exc}") from exc
    if not has_runs:
        raise WebConfigError(
            f"{url.render_as_string()} has no camaudit tables; run `camaudit db upgrade` or point "
            "--database-url at the database the runs were written to"
        )


def serve(
    database_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    log_level: str = "info",
) -> None:
    """Blocks until interrupted; raises :class:`WebConfigError` before binding when unsafe or useless."""
    import uvicorn

    from scheduler.web.app import create_app

    check_exposure(host, token)
    check_database(database_url)
    app = create_app(database_url, token=token, endpoint_url=endpoint_url, region=region)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False
    )
    # After Config, which sets up uvicorn's loggers, so the filter is not replaced.
    logging.getLogger("uvicorn.access").addFilter(RedactToken())
    uvicorn.Server(config).run()
