"""Starting, following and resuming runs: ``run``, ``status``, ``resume``."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from scheduler.cli.options import (
    BrokerUrl,
    DatabaseUrl,
    Device,
    S3Endpoint,
    StorageUrl,
    console,
    err,
    fail,
    failing_on,
    make_settings,
    service_settings,
    setup_logging,
    split_values,
    validation_reasons,
)
from scheduler.cli.root import app
from schema.payloads import RunSpec
from schema.redact import hide_password
from schema.settings import Settings


def run_status(database_url: str, run_id: str, *, leases: bool = False) -> dict[str, Any]:
    from scheduler.groups import group_counts
    from scheduler.query import QueryError, get_run, shard_leases

    with failing_on(QueryError):
        run = get_run(database_url, run_id)
    extra = {"leases": shard_leases(database_url, run_id)} if leases else {}
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
        **extra,
        **group_counts(database_url, run.id),
    }


def _lease_lines(leases: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    lines = []
    for lease in leases["expired"]:
        lines.append(
            (
                "expired lease",
                f"shard {lease['shard']} (attempt {lease['attempt']}) held by {lease['worker']}, "
                f"ran out {lease['expired_s']:g}s ago: that worker is gone; a sweep enqueues it again",
            )
        )
    for lost in leases["lost"]:
        lines.append(
            (
                "lost workers",
                f"shard {lost['shard']} ({lost['status']}): {lost['lost_workers']}, the last "
                f"{lost['last_lost_worker']} at {lost['lost_at']}",
            )
        )
    for lease in leases["running"]:
        lines.append(("running", f"shard {lease['shard']} (attempt {lease['attempt']}) on {lease['worker']}"))
    return lines


def start_run(
    spec: RunSpec, settings: Settings, *, wait: bool = True, baseline_run_id: str | None = None
) -> str:
    """Plan, then run in-process or enqueue; used by ``run`` and ``demo`` alike."""
    from scheduler.plan import plan_run
    from scheduler.runner import enqueue, run_embedded
    from scheduler.sources import SourceError
    from workers.cam import CamConfigError
    from workers.models import ModelLoadError

    with failing_on(SourceError, ModelLoadError, CamConfigError, ValueError):
        planned = plan_run(spec, settings, baseline_run_id=baseline_run_id)
    err.print(f"run [bold]{planned.run_id}[/]: {planned.n_items} items in {len(planned.shard_ids)} shards")
    if not settings.embedded:
        enqueue(planned.run_id, planned.shard_ids, settings)
        broker = hide_password(settings.broker_url)
        err.print(f"enqueued {len(planned.shard_ids)} shards on {broker}; `camaudit worker` runs them")
        if wait:
            watch_run(settings.database_url, planned.run_id)
        return planned.run_id
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"run {planned.run_id}", total=planned.n_items)

        def advance(outcome: dict[str, object]) -> None:
            progress.advance(task, int(outcome.get("n_done", 0)) + int(outcome.get("n_failed", 0)))  # type: ignore[call-overload]

        run_embedded(planned.run_id, planned.shard_ids, settings, on_shard_done=advance)
    return planned.run_id


def watch_run(database_url: str, run_id: str, poll_s: float = 1.0) -> dict[str, Any]:
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
        status = run_status(database_url, run_id)
        first_done, started = status["done"] + status["failed"], time.monotonic()
        task = progress.add_task(f"run {run_id}", total=status["items"], rate=0.0, failed=status["failed"])
        while True:
            status = run_status(database_url, run_id)
            done = status["done"] + status["failed"]
            elapsed = max(time.monotonic() - started, 1e-6)
            progress.update(task, completed=done, rate=(done - first_done) / elapsed, failed=status["failed"])
            if status["status"] in ("finished", "partial", "failed"):
                return status
            time.sleep(poll_s)


def show_status(status: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        console.print_json(json.dumps(status))
        return
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
    for key, line in _lease_lines(status.get("leases") or {"expired": [], "lost": [], "running": []}):
        table.add_row(key, line)
    if status.get("groups"):
        for key in ("groups", "groups_done", "groups_failed"):
            table.add_row(key, str(status[key]))
    console.print(table)


@app.command()
def run(
    source: Annotated[str, typer.Option(help="folder, manifest .jsonl/.csv, or s3://bucket/prefix")],
    model: Annotated[
        str,
        typer.Option(
            help="demo, torchvision:NAME[@WEIGHTS], timm:NAME[.TAG], hf:PATH_OR_NAME, "
            "torchscript:PATH or python:mod:fn"
        ),
    ] = "demo",
    checkpoint: Annotated[str | None, typer.Option(help="weights file for the model")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated CAM methods")] = "gradcam,cam",
    layer: Annotated[list[str] | None, typer.Option(help="target layer (repeat or comma-separate)")] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="top1, topk:N, all, label, labels, classes:3,7, positive, above:T or "
            "python:package.module:fn (default: positive for a single-logit head, else top1)"
        ),
    ] = None,
    max_targets: Annotated[
        int | None, typer.Option(help="with above:T, explain at most this many classes per image")
    ] = None,
    patch_size: Annotated[int, typer.Option(help="patch side in model-input pixels")] = 32,
    top_patches: Annotated[int, typer.Option(help="patches kept per heatmap")] = 5,
    batch_size: Annotated[
        int | None, typer.Option(help="images per batch (default: 16 on CPU, 64 on GPU)")
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option(help="images per shard (default: 256 on CPU, 2048 on GPU)")
    ] = None,
    score_batch_size: Annotated[
        int | None, typer.Option(help="images per Score-/Ablation-CAM forward (default: 64 CPU, 256 GPU)")
    ] = None,
    name: str | None = None,
    overlay: Annotated[bool, typer.Option(help="also store a JET overlay JPEG at source size")] = False,
    layout: Annotated[
        str | None,
        typer.Option(
            help="packed (one tar per shard, method and layer) or files (one object per map); "
            "default: CAMAUDIT_LAYOUT, else packed"
        ),
    ] = None,
    preprocess: Annotated[
        str | None,
        typer.Option(help="override the model's preprocessing: stretch, center-crop[:CROP_PCT] or letterbox"),
    ] = None,
    input_size: Annotated[
        str | None, typer.Option(help="override the model's input size: H,W or one side (e.g. 384)")
    ] = None,
    group_fusion: Annotated[
        str, typer.Option(help="mean or max: how a case's views' class probabilities combine")
    ] = "mean",
    views: Annotated[
        str | None,
        typer.Option(
            help="comma-separated views a multi-view model takes per case, in order, e.g. L-CC,L-MLO"
        ),
    ] = None,
    missing_view: Annotated[
        str, typer.Option(help="fail (the whole case) or zeros (a black image) for a case lacking a view")
    ] = "fail",
    wait: Annotated[bool, typer.Option(help="with a broker: wait and show progress")] = False,
    database_url: DatabaseUrl = None,
    storage_url: StorageUrl = None,
    broker_url: BrokerUrl = None,
    s3_endpoint_url: S3Endpoint = None,
    device: Device = None,
    amp: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or off")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the final status as JSON")] = False,
) -> None:
    """Run an audit: explain every image of SOURCE with the given methods."""
    settings = service_settings(
        database_url, broker_url, storage_url, s3_endpoint_url, device=device, amp=amp
    )
    setup_logging(settings.log_level)
    try:
        spec = RunSpec(
            source=source,
            model=model,
            checkpoint=checkpoint,
            methods=methods.split(","),
            layers=split_values(layer),
            targets=targets,
            max_targets=max_targets,
            patch_size=patch_size,
            top_patches=top_patches,
            batch_size=batch_size,
            shard_size=shard_size,
            score_batch_size=score_batch_size,
            name=name,
            overlay=overlay,
            layout=layout,
            preprocess=preprocess,
            input_size=input_size,
            group_fusion=group_fusion,
            views=views.split(",") if views else None,
            missing_view=missing_view,
        )
    except ValidationError as exc:
        fail(validation_reasons(exc))
    run_id = start_run(spec, settings, wait=wait)
    show_status(run_status(settings.database_url, run_id), as_json=json_out)


@app.command()
def status(
    run_id: str,
    database_url: DatabaseUrl = None,
    watch: Annotated[bool, typer.Option(help="follow progress until the run ends")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a run's progress, and which workers hold, lost or let expire its shards' leases."""
    settings = make_settings(database_url=database_url)
    if watch:
        watch_run(settings.database_url, run_id)
    show_status(run_status(settings.database_url, run_id, leases=True), as_json=json_out)


@app.command()
def resume(
    run_id: str,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    storage_url: StorageUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Run or enqueue again the shards of RUN_ID that are not done."""
    from scheduler.plan import PlanError, reopen_run
    from scheduler.runner import enqueue, run_embedded

    settings = service_settings(database_url, broker_url, storage_url, s3_endpoint_url)
    setup_logging(settings.log_level)
    run_status(settings.database_url, run_id)
    with failing_on(PlanError):
        shard_ids = reopen_run(settings.database_url, run_id)
    if settings.embedded:
        run_embedded(run_id, shard_ids, settings)
    else:
        enqueue(run_id, shard_ids, settings)
    err.print(
        f"{len(shard_ids)} unfinished shards of run {run_id} {'run' if settings.embedded else 'enqueued'}"
    )
