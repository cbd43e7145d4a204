"""The ``camaudit`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from schema.payloads import RunSpec
from schema.settings import Settings, get_settings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Batch CAM explanations for vision models."
)
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
app.add_typer(db_app, name="db")
audit_app = typer.Typer(no_args_is_help=True, help="Named, scheduled audits from a YAML file.")
app.add_typer(audit_app, name="audit")
console = Console()
err = Console(stderr=True)

DatabaseUrl = Annotated[str | None, typer.Option(help="SQLAlchemy URL [env CAMAUDIT_DATABASE_URL]")]
StorageUrl = Annotated[
    str | None, typer.Option(help="folder or s3://bucket/prefix for heatmaps [env CAMAUDIT_STORAGE_URL]")
]
BrokerUrl = Annotated[
    str | None, typer.Option(help="redis:// broker; unset runs in-process [env CAMAUDIT_BROKER_URL]")
]
S3Endpoint = Annotated[str | None, typer.Option(help="S3 endpoint URL [env CAMAUDIT_S3_ENDPOINT_URL]")]


def _settings(**overrides: str | None) -> Settings:
    """Command-line options win over the environment; both sides of the queue read the same variables."""
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"CAMAUDIT_{key.upper()}"] = value
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        _fail(f"bad setting: {exc.errors()[0]['msg']}")
        raise  # unreachable


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _run_status(database_url: str, run_id: str) -> dict[str, Any]:
    from scheduler.query import QueryError, get_run

    try:
        run = get_run(database_url, run_id)
    except QueryError as exc:
        _fail(str(exc))
        raise
    return {
        "run_id": run.id,
        "name": run.name,
        "status": run.status,
        "items": run.n_items,
        "done": run.n_done,
        "failed": run.n_failed,
        "shards": run.n_shards,
        "shards_done": run.shards_done,
        "shards_failed": run.shards_failed,
        "output": run.output_uri,
        "methods": run.methods,
        "layers": run.layers,
    }


def start_run(
    spec: RunSpec, settings: Settings, *, wait: bool = True, baseline_run_id: str | None = None
) -> str:
    """Plan, then run in-process or enqueue; used by ``run`` and ``demo`` alike."""
    from scheduler.plan import plan_run
    from scheduler.runner import enqueue, run_embedded
    from scheduler.sources import SourceError
    from workers.cam import CamConfigError
    from workers.models import ModelLoadError

    try:
        planned = plan_run(spec, settings, baseline_run_id=baseline_run_id)
    except (SourceError, ModelLoadError, CamConfigError, ValueError) as exc:
        _fail(str(exc))
        raise
    err.print(f"run [bold]{planned.run_id}[/]: {planned.n_items} items in {len(planned.shard_ids)} shards")
    if not settings.embedded:
        enqueue(planned.run_id, planned.shard_ids, settings)
        err.print(
            f"enqueued {len(planned.shard_ids)} shards on {settings.broker_url}; `camaudit worker` runs them"
        )
        if wait:
            _watch(settings.database_url, planned.run_id)
        return planned.run_id
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"run {planned.run_id}", total=planned.n_items)

        def advance(outcome: dict[str, object]) -> None:
            progress.advance(task, int(outcome.get("n_done", 0)) + int(outcome.get("n_failed", 0)))  # type: ignore[call-overload]

        run_embedded(planned.run_id, planned.shard_ids, settings, on_shard_done=advance)
    return planned.run_id


def _watch(database_url: str, run_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Follow a run from the database: any process, anywhere, can watch the same run."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} items/s · {task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        status = _run_status(database_url, run_id)
        first_done, started = status["done"] + status["failed"], time.monotonic()
        task = progress.add_task(f"run {run_id}", total=status["items"], rate=0.0, failed=status["failed"])
        while True:
            status = _run_status(database_url, run_id)
            done = status["done"] + status["failed"]
            elapsed = max(time.monotonic() - started, 1e-6)
            progress.update(task, completed=done, rate=(done - first_done) / elapsed, failed=status["failed"])
            if status["status"] in ("finished", "partial", "failed"):
                return status
            time.sleep(poll_s)


@app.command()
def run(
    source: Annotated[str, typer.Option(help="folder, manifest .jsonl/.csv, or s3://bucket/prefix")],
    model: Annotated[
        str, typer.Option(help="demo, torchvision:NAME, torchscript:PATH or python:mod:fn")
    ] = "demo",
    checkpoint: Annotated[str | None, typer.Option(help="weights file for the model")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated CAM methods")] = "gradcam,cam",
    layer: Annotated[list[str] | None, typer.Option(help="target layer (repeat or comma-separate)")] = None,
    targets: Annotated[str, typer.Option(help="top1, topk:N, all, label or classes:3,7")] = "top1",
    patch_size: Annotated[int, typer.Option(help="patch side in model-input pixels")] = 32,
    top_patches: Annotated[int, typer.Option(help="patches kept per heatmap")] = 5,
    batch_size: int = 16,
    shard_size: int = 256,
    name: str | None = None,
    overlay: Annotated[bool, typer.Option(help="also store a JET overlay JPEG at source size")] = False,
    wait: Annotated[bool, typer.Option(help="with a broker: wait and show progress")] = False,
    database_url: DatabaseUrl = None,
    storage_url: StorageUrl = None,
    broker_url: BrokerUrl = None,
    s3_endpoint_url: S3Endpoint = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    amp: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or off")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the final status as JSON")] = False,
) -> None:
    """Run an audit: explain every image of SOURCE with the given methods."""
    settings = _settings(
        database_url=database_url,
        storage_url=storage_url,
        broker_url=broker_url,
        s3_endpoint_url=s3_endpoint_url,
        device=device,
        amp=amp,
    )
    _setup_logging(settings.log_level)
    try:
        spec = RunSpec(
            source=source,
            model=model,
            checkpoint=checkpoint,
            methods=methods.split(","),
            layers=_split(layer),
            targets=targets,
            patch_size=patch_size,
            top_patches=top_patches,
            batch_size=batch_size,
            shard_size=shard_size,
            name=name,
            overlay=overlay,
        )
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        raise
    run_id = start_run(spec, settings, wait=wait)
    status = _run_status(settings.database_url, run_id)
    if json_out:
        console.print_json(json.dumps(status))
    else:
        _print_status(status)


def _print_status(status: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in (
        "run_id",
        "status",
        "items",
        "done",
        "failed",
        "shards",
        "shards_done",
        "shards_failed",
        "output",
    ):
        table.add_row(key, str(status[key]))
    console.print(table)


@app.command()
def status(
    run_id: str,
    database_url: DatabaseUrl = None,
    watch: Annotated[bool, typer.Option(help="follow progress until the run ends")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a run's progress."""
    settings = _settings(database_url=database_url)
    info = _watch(settings.database_url, run_id) if watch else _run_status(settings.database_url, run_id)
    if json_out:
        console.print_json(json.dumps(info))
    else:
        _print_status(info)


@app.command()
def resume(
    run_id: str,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    storage_url: StorageUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Run or enqueue again the shards of RUN_ID that are not done."""
    from scheduler.plan import reopen_run
    from scheduler.runner import enqueue, run_embedded

    settings = _settings(
        database_url=database_url,
        broker_url=broker_url,
        storage_url=storage_url,
        s3_endpoint_url=s3_endpoint_url,
    )
    _setup_logging(settings.log_level)
    _run_status(settings.database_url, run_id)
    shard_ids = reopen_run(settings.database_url, run_id)
    if settings.embedded:
        run_embedded(run_id, shard_ids, settings)
    else:
        enqueue(run_id, shard_ids, settings)
    err.print(
        f"{len(shard_ids)} unfinished shards of run {run_id} {'run' if settings.embedded else 'enqueued'}"
    )


def print_regions(regions: list[Any], as_json: bool = False, as_csv: bool = False) -> None:
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in regions]))
        return
    if as_csv:
        import csv

        from scheduler.query import Region

        writer = csv.DictWriter(sys.stdout, fieldnames=Region.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.as_dict() for r in regions)
        sys.stdout.flush()
        return
    table = Table(title=f"top {len(regions)} regions")
    for col in ("#", "item", "source", "class", "box (x0,y0,x1,y1)", "score"):
        table.add_column(col, justify="right" if col in ("#", "item", "score") else "left")
    for n, r in enumerate(regions, start=1):
        table.add_row(
            str(n),
            str(r.item_id),
            Path(r.source_uri).name if not r.source_uri.startswith("s3://") else r.source_uri,
            r.class_name or str(r.target_class),
            f"{r.x0},{r.y0},{r.x1},{r.y1}",
            f"{r.score:.5f}",
        )
    console.print(table)


@app.command()
def top(
    run_id: Annotated[str, typer.Option("--run", help="run id")],
    class_: Annotated[str, typer.Option("--class", help="class name or index")],
    method: Annotated[str, typer.Option(help="CAM method")] = "gradcam",
    layer: Annotated[str | None, typer.Option(help="only this layer")] = None,
    limit: Annotated[int, typer.Option(help="how many regions")] = 10,
    label: Annotated[str | None, typer.Option(help="only items with this ground-truth label")] = None,
    predicted: Annotated[
        str | None, typer.Option(help="only items whose top-1 prediction is this class (name or index)")
    ] = None,
    correct: Annotated[
        bool | None,
        typer.Option("--correct/--incorrect", help="only items the model got right / wrong"),
    ] = None,
    min_score: Annotated[float | None, typer.Option(help="only patches scoring at least this")] = None,
    max_score: Annotated[float | None, typer.Option(help="only patches scoring at most this")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="print CSV with a header row")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """List the top-activated patches of a class across a run."""
    from scheduler.query import QueryError, top_regions

    if json_out and csv_out:
        _fail("choose one output format: --json or --csv")
    settings = _settings(database_url=database_url)
    try:
        regions = top_regions(
            settings.database_url,
            run_id,
            class_,
            method,
            layer=layer,
            limit=limit,
            label=label,
            predicted=predicted,
            correct=correct,
            min_score=min_score,
            max_score=max_score,
        )
    except QueryError as exc:
        _fail(str(exc))
        raise
    print_regions(regions, as_json=json_out, as_csv=csv_out)


@app.command()
def gc(
    run_id: Annotated[str, typer.Option("--run", help="run id to delete")],
    force: Annotated[bool, typer.Option(help="delete even a run that is still pending or running")] = False,
    batch: Annotated[int, typer.Option(help="rows deleted per transaction")] = 10_000,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Delete a run: its heatmap objects and all its rows. Run it again to finish an interrupted gc."""
    from scheduler.gc import GcError, gc_run
    from workers.storage import StorageError

    settings = _settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)

    def show(step: str, count: int) -> None:
        err.print(f"  {step}: {count} deleted")

    try:
        report = gc_run(
            settings.database_url,
            run_id,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            batch=batch,
            force=force,
            progress=show,
        )
    except (GcError, StorageError) as exc:
        _fail(str(exc))
        raise
    rows = ", ".join(f"{count} {table}" for table, count in report.rows.items())
    resumed = " (resumed)" if report.resumed else ""
    console.print(f"deleted run {run_id}{resumed}: {report.objects} objects; rows: {rows}")


@app.command()
def render(
    item: Annotated[int, typer.Argument(help="item id (as `camaudit top` lists it)")],
    method: Annotated[str, typer.Option(help="CAM method")],
    class_: Annotated[str, typer.Option("--class", help="class name or index")],
    out: Annotated[Path, typer.Option(help="JPEG file to write")],
    layer: Annotated[str | None, typer.Option(help="layer, where the run has several")] = None,
    alpha: Annotated[float, typer.Option(help="weight of the heatmap in the blend")] = 0.5,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Write the JET overlay of one stored heatmap on its source image, at the source's size."""
    from scheduler.query import QueryError
    from scheduler.render import RenderError, render_overlay
    from workers.storage import StorageError

    settings = _settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    try:
        rendered = render_overlay(
            settings.database_url,
            item,
            method,
            class_,
            layer=layer,
            alpha=alpha,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    except (QueryError, RenderError, StorageError) as exc:
        _fail(str(exc))
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(rendered.jpeg)
    err.print(
        f"wrote {out} ({rendered.width}x{rendered.height}): {rendered.method} / {rendered.layer} "
        f"class {rendered.target_class} of item {item} over {rendered.source_uri}"
    )


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
    settings = _settings(
        database_url=database_url,
        broker_url=broker_url,
        storage_url=storage_url,
        s3_endpoint_url=s3_endpoint_url,
    )
    if settings.embedded:
        _fail(
            "a worker needs a broker: set --broker-url or CAMAUDIT_BROKER_URL (e.g. redis://127.0.0.1:6379/0)"
        )
    if gpus:
        _worker_per_gpu(
            [g.strip() for g in gpus.split(",") if g.strip()],
            ["--queues", queues, "--concurrency", str(concurrency), "--loglevel", loglevel],
        )
    from workers.celery_app import configure

    celery = configure(settings)
    argv = ["worker", "-Q", queues, "--concurrency", str(concurrency), "--loglevel", loglevel, "-E"]
    if hostname:
        argv += ["--hostname", hostname]
    celery.worker_main(argv)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder for the images and manifest.jsonl")],
    n: Annotated[int, typer.Option(help="number of images")] = 64,
    seed: int = 0,
) -> None:
    """Write a synthetic dataset of shapes with known object boxes."""
    from workers.synth import make_dataset

    manifest = make_dataset(out, n, seed)
    err.print(f"wrote {n} images and {manifest}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo's data, database and heatmaps go")] = Path(
        "camaudit-demo"
    ),
    n: Annotated[int, typer.Option(help="synthetic images")] = 48,
) -> None:
    """Generate synthetic data and audit it with the shipped model, all embedded."""
    from scheduler.query import top_regions
    from workers.synth import make_dataset

    workdir = workdir.resolve()
    settings = _settings(
        database_url=f"sqlite:///{workdir / 'camaudit.db'}",
        storage_url=str(workdir / "heatmaps"),
        broker_url="",
    )
    _setup_logging("WARNING")
    manifest = make_dataset(workdir / "data", n, seed=0)
    (workdir / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "corrupt.png", "label": "circle"}) + "\n")
    spec = RunSpec(source=str(manifest), model="demo", methods=["gradcam", "cam"], name="demo", shard_size=16)
    run_id = start_run(spec, settings)
    info = _run_status(settings.database_url, run_id)
    console.print(f"run id:     [bold]{run_id}[/] ({info['status']})")
    console.print(f"items:      {info['done']} done, {info['failed']} failed of {info['items']}")
    console.print(f"heatmaps:   {info['output']}/runs/{run_id}/")
    console.print(f"database:   {settings.database_url}")
    class_name = "circle"
    regions = top_regions(settings.database_url, run_id, class_name, "gradcam", limit=10)
    console.print(f"\ntop-10 gradcam regions of class '{class_name}':")
    print_regions(regions, as_json=False)
    console.print(
        f"\nnext: camaudit top --run {run_id} --class square --database-url {settings.database_url}"
    )


AuditFile = Annotated[Path, typer.Option("--audits", help="YAML file with an 'audits:' list")]


@audit_app.command("run")
def audit_run(
    name: str,
    audits: AuditFile = Path("audits.yaml"),
    wait: Annotated[
        bool, typer.Option(help="with a broker: wait for the run and its alerts; the exit code tells")
    ] = False,
    alerts_timeout: Annotated[
        float, typer.Option(help="seconds to wait for the alerts after the run ends (with a broker)")
    ] = 600.0,
    json_out: Annotated[
        bool, typer.Option("--json", help="also print the alerts and exit code as JSON")
    ] = False,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Run one audit now (for cron or Kubernetes CronJobs); its baseline is its last finished run.

    Once the run is over (always without a broker, with --wait otherwise) the exit code says how
    it went: 0 ok, 3 an alert fired, 4 the run failed, 5 its alerts were not judged in time.
    """
    from scheduler.audit_outcome import audit_outcome
    from scheduler.audits import AuditError, audit_settings, load_audits, pick_audit, previous_good_run

    settings = _settings(database_url=database_url, broker_url=broker_url, s3_endpoint_url=s3_endpoint_url)
    _setup_logging(settings.log_level)
    try:
        audit = pick_audit(load_audits(audits), name)
    except AuditError as exc:
        _fail(str(exc))
        raise
    settings = audit_settings(audit, settings)
    baseline = previous_good_run(settings.database_url, audit.name)
    run_id = start_run(audit.run_spec(), settings, wait=wait, baseline_run_id=baseline)
    info = _run_status(settings.database_url, run_id)
    info["baseline_run_id"] = baseline
    if not (settings.embedded or wait):
        console.print_json(json.dumps(info))
        return
    outcome = audit_outcome(
        settings.database_url, run_id, timeout_s=0.0 if settings.embedded else alerts_timeout
    )
    if json_out:
        info.update(outcome.as_dict())
    console.print_json(json.dumps(info))
    from rich.markup import escape

    for alert in outcome.alerts or []:
        colour = {"fired": "bold red", "skipped": "yellow"}.get(alert.state, "green")
        err.print(f"alert [{colour}]{alert.state}[/] {alert.rule}: {escape(alert.message)}", highlight=False)
    if outcome.alerts is None:
        err.print(f"run {run_id}: its alert rules were not judged; `camaudit status {run_id}` shows the run")
    raise typer.Exit(outcome.exit_code)


@app.command()
def beat(audits: AuditFile, loglevel: str = "INFO", broker_url: BrokerUrl = None) -> None:
    """Run Celery beat: start each audit of the file on its cron schedule."""
    from scheduler.audits import AuditError, beat_schedule, load_audits
    from workers.celery_app import configure

    settings = _settings(broker_url=broker_url)
    if settings.embedded:
        _fail("beat needs a broker: set --broker-url or CAMAUDIT_BROKER_URL")
    try:
        schedule = beat_schedule(load_audits(audits), str(audits.resolve()))
    except AuditError as exc:
        _fail(str(exc))
        raise
    celery = configure(settings)
    celery.conf.beat_schedule = schedule
    celery.start(["beat", "--loglevel", loglevel, "--schedule", "/tmp/camaudit-beat-schedule"])


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", database_url: DatabaseUrl = None) -> None:
    """Create or migrate the tables."""
    from schema.db import upgrade

    settings = _settings(database_url=database_url)
    upgrade(settings.database_url, revision)
    err.print(f"database {settings.database_url} at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = "base", database_url: DatabaseUrl = None) -> None:
    """Undo migrations (default: drop every table)."""
    from schema.db import downgrade

    settings = _settings(database_url=database_url)
    downgrade(settings.database_url, revision)
    err.print(f"database {settings.database_url} at {revision}")


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

    settings = _settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    shown = f"[{host}]" if ":" in host else host
    hint = " (open it once with ?token=TOKEN; a cookie keeps you signed in)" if token else ""
    err.print(f"camaudit web UI on http://{shown}:{port}/ over {settings.database_url}, read-only{hint}")
    try:
        serve_web(
            settings.database_url,
            host=host,
            port=port,
            token=token,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            log_level=log_level,
        )
    except WebConfigError as exc:
        _fail(str(exc))


def _drift_tables(diff: Any) -> None:
    facts = Table(show_header=False, box=None)
    for key, value in (
        ("baseline (A)", diff.run_a),
        ("compared (B)", diff.run_b),
        ("items in common", f"{diff.common_items} (A has {diff.items_a}, B has {diff.items_b})"),
        ("predictions changed", diff.prediction_changed),
        ("heatmap pairs", f"{diff.pairs} (unmatched: {diff.unmatched_a} in A, {diff.unmatched_b} in B)"),
        ("mean correlation", "–" if diff.mean_correlation is None else f"{diff.mean_correlation:.3f}"),
        ("mean top-patch IoU", "–" if diff.mean_iou is None else f"{diff.mean_iou:.3f}"),
        ("drifted classes", f"{len(diff.drifted)} of {len(diff.classes)}"),
    ):
        facts.add_row(key, str(value))
    console.print(facts)
    from scheduler.drift import drift_rule

    classes = Table(title=f"per class ({drift_rule(diff.threshold)})")
    for col in ("method", "layer", "class", "n", "corr", "IoU", "shift px", "L1", "drifted"):
        classes.add_column(col, justify="right" if col not in ("method", "layer", "class") else "left")
    for c in diff.classes:
        classes.add_row(
            c.method,
            c.layer,
            c.class_name or str(c.target_class),
            str(c.n),
            f"{c.mean_correlation:.3f}",
            f"{c.mean_iou:.3f}",
            f"{c.centre_shift_px:.1f}",
            f"{c.l1_shift:.3f}",
            "[bold red]yes[/]" if c.drifted else "no",
        )
    console.print(classes)
    if diff.movers:
        movers = Table(title=f"{len(diff.movers)} heatmaps that changed most")
        for col in ("source", "method", "layer", "class", "corr", "IoU", "shift px"):
            movers.add_column(col, justify="right" if col in ("corr", "IoU", "shift px") else "left")
        for m in diff.movers:
            movers.add_row(
                m.source_uri if m.source_uri.startswith("s3://") else Path(m.source_uri).name,
                m.method,
                m.layer,
                m.class_name or str(m.target_class),
                f"{m.correlation:.3f}",
                f"{m.iou:.3f}",
                f"{m.centre_shift_px:.1f}",
            )
        console.print(movers)


@app.command()
def diff(
    run_a: Annotated[str, typer.Argument(help="the baseline run (before)")],
    run_b: Annotated[str, typer.Argument(help="the run compared with it (after)")],
    threshold: Annotated[
        float, typer.Option(help="a class is drifted when its mean correlation is below 1 - threshold")
    ] = 0.5,
    limit: Annotated[int, typer.Option(help="how many of the most changed heatmaps to list")] = 20,
    save: Annotated[
        bool, typer.Option(help="store the per-class drift in table class_drift (B against baseline A)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Compare where two runs' maps look, image by image and class by class."""
    from scheduler.drift import DriftError, diff_runs
    from workers.storage import StorageError

    settings = _settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    try:
        result = diff_runs(
            settings.database_url,
            run_a,
            run_b,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            threshold=threshold,
            limit=limit,
        )
    except (DriftError, StorageError) as exc:
        _fail(str(exc))
        raise
    if save:
        from scheduler.finalize import store_class_drift

        stored = store_class_drift(settings.database_url, result)
        err.print(f"stored {stored} class drift rows of run {run_b} against {run_a}")
    if json_out:
        console.print_json(json.dumps(result.as_dict()))
    else:
        _drift_tables(result)


def _quality_tables(report: Any) -> None:
    local = report.localisation
    console.print(
        f"localisation: {local.boxed_items} items with a label and a box, "
        f"{local.unexplained} without a map of their labelled class"
    )
    table = Table(
        title="localisation (pointing game, energy in box, and its chance level: the box's area share)"
    )
    for col in ("method", "layer", "class", "n", "pointing", "energy", "chance"):
        table.add_column(col, justify="left" if col in ("method", "layer", "class") else "right")
    for row in [*local.methods, *local.classes]:
        name = "all" if row.target_class is None else (row.class_name or str(row.target_class))
        table.add_row(
            row.method,
            row.layer,
            name,
            str(row.n),
            f"{row.pointing_game:.3f}",
            f"{row.energy_in_box:.3f}",
            f"{row.box_fraction:.3f}",
        )
    console.print(table)
    if report.faithfulness is not None:
        table = Table(title="faithfulness (lower deletion / higher insertion AUC = more faithful)")
        for col in ("method", "layer", "n", "deletion AUC", "insertion AUC"):
            table.add_column(col, justify="left" if col in ("method", "layer") else "right")
        for f in report.faithfulness:
            table.add_row(f.method, f.layer, str(f.n), f"{f.deletion_auc:.3f}", f"{f.insertion_auc:.3f}")
        console.print(table)
    if report.sanity is not None:
        randomised = ", ".join(report.sanity[0].randomised) if report.sanity else ""
        table = Table(title=f"sanity: correlation with maps of a model whose {randomised} are re-initialised")
        for col in ("method", "layer", "n", "mean correlation"):
            table.add_column(col, justify="left" if col in ("method", "layer") else "right")
        for s in report.sanity:
            table.add_row(s.method, s.layer, str(s.n), f"{s.mean_correlation:.3f}")
        console.print(table)


@app.command()
def quality(
    run_id: Annotated[str, typer.Argument(help="run id")],
    sample: Annotated[int, typer.Option(help="items re-run through the model for the model checks")] = 32,
    faithfulness: Annotated[
        bool,
        typer.Option(help="re-run the model: deletion/insertion curves and the randomisation sanity check"),
    ] = True,
    steps: Annotated[int, typer.Option(help="deletion/insertion steps")] = 10,
    randomise: Annotated[
        int, typer.Option(help="parameterised modules re-initialised for the sanity check")
    ] = 3,
    max_items: Annotated[
        int | None, typer.Option(help="at most this many boxed items for localisation (default all)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Measure a run's explanations: pointing game, energy-in-box, faithfulness, sanity check."""
    from scheduler.quality import QualityError, assess_quality
    from workers.storage import StorageError

    settings = _settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url, device=device)
    try:
        report = assess_quality(
            settings.database_url,
            run_id,
            sample=sample,
            model_checks=faithfulness,
            steps=steps,
            randomise=randomise,
            device=settings.device,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            max_items=max_items,
        )
    except (QualityError, StorageError) as exc:
        _fail(str(exc))
        raise
    if json_out:
        console.print_json(json.dumps(report.as_dict()))
    else:
        _quality_tables(report)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="run id")],
    out: Annotated[Path, typer.Option(help="HTML file to write")],
    baseline: Annotated[
        str | None, typer.Option(help="run to compare with (default: the run's own baseline)")
    ] = None,
    faithfulness: Annotated[
        bool, typer.Option(help="also re-run the model: deletion/insertion and the sanity check")
    ] = False,
    sample: Annotated[int, typer.Option(help="items re-run through the model with --faithfulness")] = 32,
    regions: Annotated[int, typer.Option(help="top regions shown per class")] = 4,
    max_classes: Annotated[int, typer.Option(help="classes shown per method")] = 20,
    threshold: Annotated[
        float, typer.Option(help="a class is drifted when its mean correlation is below 1 - threshold")
    ] = 0.5,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Write one self-contained HTML report of a run: summary, top regions, drift, quality."""
    from scheduler.drift import DriftError
    from scheduler.quality import QualityError
    from scheduler.query import QueryError
    from scheduler.report import ReportError, ReportOptions, write_report
    from workers.storage import StorageError

    settings = _settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url, device=device)
    options = ReportOptions(
        baseline=baseline,
        faithfulness=faithfulness,
        sample=sample,
        regions=regions,
        max_classes=max_classes,
        threshold=threshold,
        device=settings.device,
    )
    try:
        path = write_report(
            settings.database_url,
            run_id,
            out,
            options,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    except (ReportError, DriftError, QualityError, QueryError, StorageError) as exc:
        _fail(str(exc))
        raise
    err.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
