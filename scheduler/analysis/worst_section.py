"""The report's "worst 20" per class: the maps that miss their labelled box the most.

A report that shows only the best regions flatters the model; this section lists, per method
and class, the maps with the least energy inside the labelled box (``camaudit top --worst``),
with where the rest of their mass went.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from sqlalchemy import func, select

from scheduler.worst import WorstMap, worst_maps
from schema.db import session_scope
from schema.models import Heatmap, Run

__all__ = ["WORST_PER_CLASS", "worst_section"]

WORST_PER_CLASS = 20


def _boxed_classes(database_url: str, run: Run, method: str, layer: str) -> list[int]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Heatmap.target_class)
            .where(
                Heatmap.run_id == run.id,
                Heatmap.method == method,
                Heatmap.layer == layer,
                Heatmap.box_energy.is_not(None),
            )
            .group_by(Heatmap.target_class)
            .order_by(func.count().desc(), Heatmap.target_class)
        ).scalars()
        return [int(c) for c in rows]


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _row(n: int, m: WorstMap) -> str:
    source = m.source_uri if m.source_uri.startswith("s3://") else Path(m.source_uri).name
    hit = "–" if m.box_hit is None else ("yes" if m.box_hit else "no")
    cells = [str(n), str(m.item_id), source, m.label or "–", _num(m.box_energy), hit]
    cells += [_num(m.outside_mass), _num(m.border_share)]
    return "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"


def worst_section(database_url: str, run: Run, *, max_classes: int, per_class: int = WORST_PER_CLASS) -> str:
    """One table per method and class of the first layer; empty classes and layers say so."""
    head = "".join(
        f"<th>{escape(h)}</th>"
        for h in ("#", "item", "source", "label", "energy in box", "hit", "mass outside", "border share")
    )
    parts = [
        '<p class="note">Per class, the maps with the least energy inside the labelled box first: '
        "where the model looked instead of the object. Only items with a labelled box count.</p>"
    ]
    layer = str(run.layers[0]) if run.layers else None
    names = list(run.class_names or [])
    for method in run.methods if layer else []:
        classes = _boxed_classes(database_url, run, str(method), layer or "")
        parts.append(f"<h3>{escape(str(method))} · {escape(layer or '')}</h3>")
        if not classes:
            parts.append('<p class="note">no map of this method has a labelled box to measure against</p>')
            continue
        for target in classes[:max_classes]:
            maps = worst_maps(database_url, run.id, target, str(method), layer=layer, limit=per_class)
            label = f"{names[target]} ({target})" if 0 <= target < len(names) else str(target)
            rows = "".join(_row(n, m) for n, m in enumerate(maps, start=1))
            parts.append(
                f"<h4>{escape(label)} · worst {len(maps)}</h4>"
                f'<table class="worst"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            )
    return f'<section id="worst"><h2>Worst {per_class} per class</h2>{"".join(parts)}</section>'
