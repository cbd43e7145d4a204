"""``camaudit serve``: the read-only web UI."""

from __future__ import annotations

from typing import Annotated

import typer

from scheduler.cli.options import DatabaseUrl, S3Endpoint, err, failing_on, make_settings
from scheduler.cli.root import app


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="address to bind; anything but loopback needs a token")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(envvar="CAMAUDIT_WEB_TOKEN", help="access token every request must carry"),
    ] = None,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve a read-only web UI: runs, region galleries, items' heatmaps, drift between runs."""
    from scheduler.web import WebConfigError
    from scheduler.web import serve as serve_web

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    shown = f"[{host}]" if ":" in host else host
    hint = " (open it once with ?token=TOKEN; a cookie keeps you signed in)" if token else ""
    err.print(f"camaudit web UI on http://{shown}:{port}/ over {settings.database_url}, read-only{hint}")
    with failing_on(WebConfigError):
        serve_web(
            settings.database_url,
            host=host,
            port=port,
            token=token,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            log_level=log_level,
        )
