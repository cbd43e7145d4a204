"""How ``camaudit top --worst / --outside-box / --border`` prints the maps and regions it finds."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from rich.table import Table

from scheduler.cli.options import console, failing_on


def _fmt(value: float | bool | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4f}"


def show_worst(
    database_url: str,
    order: str,
    run_id: str,
    class_: str,
    method: str,
    *,
    layer: str | None,
    limit: int,
    label: str | None,
    correct: bool | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    from scheduler.cli.results import print_regions
    from scheduler.query import QueryError
    from scheduler.worst import WorstMap, outside_box_regions, worst_maps

    with failing_on(QueryError):
        if order == "outside-box":
            regions = outside_box_regions(
                database_url, run_id, class_, method, layer=layer, limit=limit, label=label, correct=correct
            )
            print_regions(regions, as_json=as_json, as_csv=as_csv)
            return
        maps = worst_maps(
            database_url,
            run_id,
            class_,
            method,
            order=order,
            layer=layer,
            limit=limit,
            label=label,
            correct=correct,
        )
    if as_json:
        console.print_json(json.dumps([m.as_dict() for m in maps]))
        return
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=WorstMap.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(m.as_dict() for m in maps)
        sys.stdout.flush()
        return
    title = "least energy in the box" if order == "worst" else "most mass on the border"
    table = Table(title=f"{len(maps)} maps, {title} first")
    for col in ("#", "item", "source", "label", "energy in box", "hit", "mass outside", "border share"):
        table.add_column(col, justify="left" if col in ("source", "label") else "right")
    for n, m in enumerate(maps, start=1):
        source = m.source_uri if m.source_uri.startswith("s3://") else Path(m.source_uri).name
        table.add_row(
            str(n),
            str(m.item_id),
            source,
            m.label or "-",
            _fmt(m.box_energy),
            _fmt(m.box_hit),
            _fmt(m.outside_mass),
            _fmt(m.border_share),
        )
    console.print(table)


def show_groups(
    database_url: str, run_id: str, class_: str, method: str, *, layer: str | None, limit: int, as_json: bool
) -> None:
    from scheduler.groups import top_groups
    from scheduler.query import QueryError

    with failing_on(QueryError):
        found = top_groups(database_url, run_id, class_, method, layer=layer, limit=limit)
    if as_json:
        console.print_json(json.dumps([g.as_dict() for g in found]))
        return
    table = Table(title=f"top {len(found)} cases")
    for col in ("#", "case", "label", "case prediction", "item", "source", "box (x0,y0,x1,y1)", "score"):
        table.add_column(col, justify="right" if col in ("#", "item", "score") else "left")
    for n, g in enumerate(found, start=1):
        r = g.region
        source = r.source_uri if r.source_uri.startswith("s3://") else Path(r.source_uri).name
        verdict = "-" if g.group_pred is None else f"{g.group_pred} ({_fmt(g.group_score)})"
        table.add_row(
            str(n), g.group_id, g.group_label or "-", verdict, str(r.item_id), source,
            f"{r.x0},{r.y0},{r.x1},{r.y1}", f"{r.score:.5f}",
        )  # fmt: skip
    console.print(table)
