"""Option types, settings, output and failure handling every command shares, so a new command
declares the same flag with the same help and fails the same way."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from schema.redact import install_log_redaction
from schema.settings import Settings, get_settings

console = Console()
err = Console(stderr=True)

DatabaseUrl = Annotated[str | None, typer.Option(help="SQLAlchemy URL [env CAMAUDIT_DATABASE_URL]")]
StorageUrl = Annotated[
    str | None, typer.Option(help="folder or s3://bucket/prefix for heatmaps [env CAMAUDIT_STORAGE_URL]")
]
BrokerUrl = Annotated[
    str | None, typer.Option(help="redis:// or amqp:// broker; unset: in-process [env CAMAUDIT_BROKER_URL]")
]
S3Endpoint = Annotated[str | None, typer.Option(help="S3 endpoint URL [env CAMAUDIT_S3_ENDPOINT_URL]")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")]
JsonOut = Annotated[bool, typer.Option("--json", help="print JSON")]
RunIdArg = Annotated[str, typer.Argument(help="run id")]
RunIdOpt = Annotated[str, typer.Option("--run", help="run id")]
ClassOpt = Annotated[str, typer.Option("--class", help="class name or index")]
MethodOpt = Annotated[str, typer.Option(help="CAM method")]
DriftThreshold = Annotated[
    float, typer.Option(help="a class is drifted when its mean correlation is below 1 - threshold")
]


def validation_reasons(exc: ValidationError, *, option: Callable[[str], str] | None = None) -> str:
    """Pydantic's reasons in the user's words: ``field: reason``, without its "Value error, "."""
    reasons = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"]))
        where = option(where) if option is not None and where else where
        reasons.append((f"{where}: " if where else "") + error["msg"].removeprefix("Value error, "))
    return "; ".join(reasons)


def make_settings(**overrides: str | None) -> Settings:
    """Command-line options win over the environment; both sides of the queue read the same variables."""
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"CAMAUDIT_{key.upper()}"] = value
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        fail(f"bad setting: {validation_reasons(exc)}")


def service_settings(
    database_url: str | None,
    broker_url: str | None,
    storage_url: str | None,
    s3_endpoint_url: str | None,
    /,
    **more: str | None,
) -> Settings:
    """The settings of a command that reaches the database, the broker and the heatmap storage
    (``DatabaseUrl``, ``BrokerUrl``, ``StorageUrl``, ``S3Endpoint``), plus its own ``more``."""
    return make_settings(
        database_url=database_url,
        broker_url=broker_url,
        storage_url=storage_url,
        s3_endpoint_url=s3_endpoint_url,
        **more,
    )


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@contextmanager
def failing_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn the expected errors of a command into one red line and exit status 2, not a traceback."""
    try:
        yield
    except errors as exc:
        fail(str(exc))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    install_log_redaction()


def split_values(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values alike, as one list."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]
