"""Judging runs: ``diff`` (drift between two runs), ``quality`` and the HTML ``report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from scheduler.cli.options import (
    DatabaseUrl,
    Device,
    DriftThreshold,
    JsonOut,
    RunIdArg,
    S3Endpoint,
    console,
    err,
    failing_on,
    make_settings,
)
from scheduler.cli.root import app


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
    from scheduler.analysis.drift import drift_rule

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
    threshold: DriftThreshold = 0.5,
    limit: Annotated[int, typer.Option(help="how many of the most changed heatmaps to list")] = 20,
    save: Annotated[
        bool, typer.Option(help="store the per-class drift in table class_drift (B against baseline A)")
    ] = False,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Compare where two runs' maps look, image by image and class by class."""
    from scheduler.analysis.drift import DriftError, diff_runs
    from workers.storage import StorageError

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url)
    with failing_on(DriftError, StorageError):
        result = diff_runs(
            settings.database_url,
            run_a,
            run_b,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            threshold=threshold,
            limit=limit,
        )
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
    run_id: RunIdArg,
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
    device: Device = None,
    json_out: JsonOut = False,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Measure a run's explanations: pointing game, energy-in-box, faithfulness, sanity check."""
    from scheduler.analysis.quality import QualityError, assess_quality
    from workers.storage import StorageError

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url, device=device)
    with failing_on(QualityError, StorageError):
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
    if json_out:
        console.print_json(json.dumps(report.as_dict()))
    else:
        _quality_tables(report)


@app.command()
def report(
    run_id: RunIdArg,
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
    threshold: DriftThreshold = 0.5,
    device: Device = None,
    database_url: DatabaseUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Write one self-contained HTML report of a run: summary, top regions, drift, quality."""
    from scheduler.analysis.drift import DriftError
    from scheduler.analysis.quality import QualityError
    from scheduler.analysis.report import ReportError, ReportOptions, write_report
    from scheduler.query import QueryError
    from workers.storage import StorageError

    settings = make_settings(database_url=database_url, s3_endpoint_url=s3_endpoint_url, device=device)
    options = ReportOptions(
        baseline=baseline,
        faithfulness=faithfulness,
        sample=sample,
        regions=regions,
        max_classes=max_classes,
        threshold=threshold,
        device=settings.device,
    )
    with failing_on(ReportError, DriftError, QualityError, QueryError, StorageError):
        path = write_report(
            settings.database_url,
            run_id,
            out,
            options,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    err.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
