"""Reading and deleting a run's results: ``top``, ``render``, ``gc``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from scheduler.cli.options import (
    ClassOpt,
    DatabaseUrl,
    JsonOut,
    MethodOpt,
    RunIdOpt,
    S3Endpoint,
    console,
    err,
    fail,
    failing_on,
    make_settings,
)
from scheduler.cli.root import app


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
    run_id: RunIdOpt,
    class_: ClassOpt,
    method: MethodOpt = "gradcam",
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
    json_out: JsonOut = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="print CSV with a header row")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """List the top-activated patches of a class across a run."""
    from scheduler.query import QueryError, top_regions

    if json_out and csv_out:
        fail("choose one output format: --json or --csv")
    settings = make_settings(database_url=database_url)
    with failing_on(QueryError):
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

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)

    def show(step: str, count: int) -> None:
        err.print(f"  {step}: {count} deleted")

    with failing_on(GcError, StorageError):
        report = gc_run(
            settings.database_url,
            run_id,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            batch=batch,
            force=force,
            progress=show,
        )
    rows = ", ".join(f"{count} {table}" for table, count in report.rows.items())
    resumed = " (resumed)" if report.resumed else ""
    console.print(f"deleted run {run_id}{resumed}: {report.objects} objects; rows: {rows}")


@app.command()
def render(
    item: Annotated[int, typer.Argument(help="item id (as `camaudit top` lists it)")],
    method: MethodOpt,
    class_: ClassOpt,
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

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    with failing_on(QueryError, RenderError, StorageError):
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(rendered.jpeg)
    err.print(
        f"wrote {out} ({rendered.width}x{rendered.height}): {rendered.method} / {rendered.layer} "
        f"class {rendered.target_class} of item {item} over {rendered.source_uri}"
    )
