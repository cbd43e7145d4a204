"""Turning a finished run's maps into inputs for other tools: ``export rois``, ``export masks``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from scheduler.cli.options import (
    DatabaseUrl,
    JsonOut,
    RunIdArg,
    S3Endpoint,
    console,
    err,
    failing_on,
    make_settings,
)
from scheduler.cli.root import app

export_app = typer.Typer(no_args_is_help=True, help="Export regions and pseudo-label masks of a run.")
app.add_typer(export_app, name="export")

OutOpt = Annotated[str, typer.Option("--out", help="folder or s3://bucket/prefix to write to")]
ExportMethod = Annotated[str, typer.Option(help="CAM method whose maps are exported")]
ExportLayer = Annotated[str | None, typer.Option(help="layer, where the run has several")]
ExportClass = Annotated[
    str | None, typer.Option("--class", help="only maps of this target class (name or index)")
]


def _finish(report: object, json_out: bool, what: str) -> None:
    from scheduler.exports.common import ExportReport

    assert isinstance(report, ExportReport)
    if json_out:
        console.print_json(json.dumps(report.as_dict()))
    else:
        manifest = "written" if report.manifest_written else "unchanged"
        console.print(
            f"{what}: {report.written} written, {report.kept} already there; "
            f"{report.rows} {report.rows_are} ({manifest}) in {report.manifest}"
        )
    for item_id, reason in sorted(report.failed.items())[:20]:
        err.print(f"  item {item_id} left out: {reason}")
    if report.failed:
        err.print(f"[bold red]{len(report.failed)} items left out[/]; the rest is exported")
        raise typer.Exit(1)


@export_app.command("rois")
def export_rois_command(
    run_id: RunIdArg,
    out: OutOpt,
    method: ExportMethod = "gradcam",
    top: Annotated[
        int, typer.Option(help="patches per map, best first (at most the run's --top-patches)")
    ] = 3,
    size: Annotated[int | None, typer.Option(help="resize each crop to SIZE x SIZE pixels")] = None,
    layer: ExportLayer = None,
    class_: ExportClass = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Crop each map's top patches from the source image, at source resolution, with a manifest."""
    from scheduler.exports.common import ExportError, choose_maps, open_destination
    from scheduler.exports.rois import check_options, export_rois
    from workers.storage import StorageError

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    with failing_on(ExportError, StorageError):
        choice = choose_maps(settings.database_url, run_id, method, layer=layer, class_=class_)
        check_options(choice, top, size)
        storage = open_destination(out, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        report = export_rois(
            settings.database_url,
            choice,
            storage,
            top=top,
            size=size,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    _finish(report, json_out, "crops")


@export_app.command("masks")
def export_masks_command(
    run_id: RunIdArg,
    out: OutOpt,
    method: ExportMethod = "gradcam",
    threshold: Annotated[
        float,
        typer.Option(help="share of each map's peak, within (0, 1), above which a pixel is in the mask"),
    ] = 0.3,
    min_area: Annotated[int, typer.Option(help="smallest connected component kept, in source pixels")] = 16,
    fmt: Annotated[str, typer.Option("--format", help="png (one mask per item and class) or coco")] = "png",
    layer: ExportLayer = None,
    class_: ExportClass = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Threshold each map at source size into a mask, with boxes of its connected components."""
    from scheduler.exports.common import ExportError, choose_maps, open_destination
    from scheduler.exports.masks import check_options, export_masks
    from workers.storage import StorageError

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    with failing_on(ExportError, StorageError):
        check_options(threshold, min_area, fmt.strip().lower())
        choice = choose_maps(settings.database_url, run_id, method, layer=layer, class_=class_)
        storage = open_destination(out, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        report = export_masks(
            settings.database_url,
            choice,
            storage,
            threshold=threshold,
            min_area=min_area,
            fmt=fmt.strip().lower(),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    _finish(report, json_out, "masks")
