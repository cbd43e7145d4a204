"""Synthetic data and the all-embedded demo: ``synth``, ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from scheduler.cli.options import console, err, make_settings, setup_logging
from scheduler.cli.results import print_regions
from scheduler.cli.root import app
from scheduler.cli.runs import run_status, start_run
from schema.payloads import RunSpec


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
    settings = make_settings(
        database_url=f"sqlite:///{workdir / 'camaudit.db'}",
        storage_url=str(workdir / "heatmaps"),
        broker_url="",
    )
    setup_logging("WARNING")
    manifest = make_dataset(workdir / "data", n, seed=0)
    (workdir / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "corrupt.png", "label": "circle"}) + "\n")
    spec = RunSpec(source=str(manifest), model="demo", methods=["gradcam", "cam"], name="demo", shard_size=16)
    run_id = start_run(spec, settings)
    info = run_status(settings.database_url, run_id)
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
