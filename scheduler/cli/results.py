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
    validation_reasons,
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
    worst: Annotated[
        bool, typer.Option("--worst", help="maps with the least energy in the labelled box first")
    ] = False,
    outside_box: Annotated[
        bool, typer.Option("--outside-box", help="top patches that do not overlap the labelled box")
    ] = False,
    border: Annotated[
        bool, typer.Option("--border", help="maps with the most mass on the image border")
    ] = False,
    by: Annotated[
        str | None, typer.Option("--by", help="group: one row per case, its best region across its views")
    ] = None,
    json_out: JsonOut = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="print CSV with a header row")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """List the top-activated patches of a class across a run, or its worst maps."""
    from scheduler.query import QueryError, top_regions

    if json_out and csv_out:
        fail("choose one output format: --json or --csv")
    if worst + outside_box + border > 1:
        fail("choose one order: --worst, --outside-box or --border")
    settings = make_settings(database_url=database_url)
    if by is not None:
        from scheduler.cli.worst import show_groups

        if by != "group":
            fail(f"--by takes 'group', got {by!r}")
        if (
            worst
            or outside_box
            or border
            or label
            or predicted
            or correct is not None
            or min_score
            or max_score
        ):
            fail("--by group lists each case's best region; it takes --layer and --limit only")
        show_groups(settings.database_url, run_id, class_, method, layer=layer, limit=limit, as_json=json_out)
        return
    if worst or outside_box or border:
        from scheduler.cli.worst import show_worst

        if predicted is not None or min_score is not None or max_score is not None:
            fail("--predicted, --min-score and --max-score go with the plain top order only")
        order = "worst" if worst else "border" if border else "outside-box"
        show_worst(
            settings.database_url,
            order,
            run_id,
            class_,
            method,
            layer=layer,
            limit=limit,
            label=label,
            correct=correct,
            as_json=json_out,
            as_csv=csv_out,
        )
        return
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


def _gc_options(
    run_id: str | None, audit: str | None, keep_last: int | None, older_than: str | None, dry_run: bool
) -> Any:
    """Check the option combination and the retention values before anything is deleted."""
    from pydantic import ValidationError

    from schema.retention import Retention

    if (run_id is None) == (audit is None):
        fail("give exactly one of --run RUN (one run) or --audit NAME (retention of an audit's runs)")
    if run_id is not None:
        if keep_last is not None or older_than is not None or dry_run:
            fail(
                "--keep-last, --older-than and --dry-run choose an --audit's runs; with --run, leave them out"
            )
        return None
    try:
        return Retention(keep_last=keep_last, older_than=older_than)
    except ValidationError as exc:
        reasons = validation_reasons(exc, option=lambda field: "--" + field.replace("_", "-"))
        fail(f"retention of audit {audit!r}: {reasons}")


@app.command()
def gc(
    run_id: Annotated[str | None, typer.Option("--run", help="run id to delete")] = None,
    audit: Annotated[
        str | None, typer.Option(help="delete old runs of this audit (with --keep-last / --older-than)")
    ] = None,
    keep_last: Annotated[int | None, typer.Option(help="with --audit: keep the newest N runs")] = None,
    older_than: Annotated[
        str | None, typer.Option(help="with --audit: delete runs older than this (12h, 30d, 2w)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="with --audit: list the runs that would go, delete nothing")
    ] = False,
    force: Annotated[bool, typer.Option(help="delete even a run that is still pending or running")] = False,
    batch: Annotated[
        int, typer.Option(help="rows deleted per transaction (tables not partitioned)")
    ] = 10_000,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Delete a run (--run), or an audit's runs beyond a retention rule (--audit).

    Run it again to finish an interrupted gc.
    """
    from scheduler.gc import GcError, GcReport, gc_run
    from scheduler.retention import apply_retention
    from workers.storage import StorageError

    retention = _gc_options(run_id, audit, keep_last, older_than, dry_run)
    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)

    def show(step: str, count: int) -> None:
        err.print(f"  {step}: {count} deleted")

    def waiting(count: int, workers: list[str]) -> None:
        err.print(f"  waiting for {count} shards in flight on {', '.join(sorted(set(workers)))} to stop")

    def summary(report: GcReport) -> str:
        rows = ", ".join(
            f"{'~' if table in report.estimated else ''}{count} {table}"
            for table, count in report.rows.items()
        )
        resumed = " (resumed)" if report.resumed else ""
        return f"deleted run {report.run_id}{resumed}: {report.objects} objects; rows: {rows}"

    with failing_on(GcError, StorageError):
        if audit is not None:
            kept = apply_retention(
                settings.database_url,
                audit,
                retention,
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                dry_run=dry_run,
                progress=show,
                announce=lambda n, of, rid: err.print(f"run {n}/{of}: {rid}"),
            )
            if dry_run:
                listed = ", ".join(kept.chosen) or "none"
                console.print(f"audit {audit}: {len(kept.chosen)} runs would be deleted: {listed}")
                return
            for report in kept.deleted:
                console.print(summary(report))
            console.print(f"audit {audit}: {len(kept.deleted)} runs deleted")
            return
        assert run_id is not None
        report = gc_run(
            settings.database_url,
            run_id,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            batch=batch,
            force=force,
            progress=show,
            waiting=waiting,
        )
    console.print(summary(report))


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
