"""``camaudit worker``: a Celery worker, or one per GPU."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from scheduler.cli.options import BrokerUrl, DatabaseUrl, S3Endpoint, StorageUrl, fail, service_settings
from scheduler.cli.root import app


def _worker_per_gpu(gpus: list[str], argv: list[str]) -> None:
    """One worker process per device, each seeing only its GPU; CUDA is never initialised here."""
    import signal
    import subprocess

    procs = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "CAMAUDIT_DEVICE": "cuda:0"}
        cmd = [sys.executable, "-m", "scheduler.cli", "worker", *argv, "--hostname", f"gpu{gpu}@%h"]
        procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [proc.wait() for proc in procs]
    raise typer.Exit(max(codes))


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="queues to consume")] = "gpu,control",
    concurrency: Annotated[int, typer.Option(help="processes per worker")] = 1,
    gpus: Annotated[str | None, typer.Option(help="e.g. 0,1: one worker process per GPU")] = None,
    loglevel: str = "INFO",
    hostname: str | None = None,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    storage_url: StorageUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Start a Celery worker that explains shards."""
    if concurrency < 1:
        fail(f"--concurrency must be at least 1 process, got {concurrency}")
    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    # every process of this machine's workers sizes its thread pools to its share of the cores
    os.environ.setdefault("CAMAUDIT_WORKER_PROCESSES", str(concurrency * max(1, len(devices))))
    settings = service_settings(database_url, broker_url, storage_url, s3_endpoint_url)
    if settings.embedded:
        fail(
            "a worker needs a broker: set --broker-url or CAMAUDIT_BROKER_URL (e.g. redis://127.0.0.1:6379/0)"
        )
    if devices:
        _worker_per_gpu(
            devices,
            ["--queues", queues, "--concurrency", str(concurrency), "--loglevel", loglevel],
        )
    from workers.celery_app import configure

    celery = configure(settings)
    argv = ["worker", "-Q", queues, "--concurrency", str(concurrency), "--loglevel", loglevel, "-E"]
    if hostname:
        argv += ["--hostname", hostname]
    celery.worker_main(argv)
