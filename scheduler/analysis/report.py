"""One run as a single self-contained HTML file: summary, top regions, drift and quality.

The file is meant to be mailed, attached to a ticket or archived next to a nightly audit, so
it carries everything inside it: styles inline, images as base64 ``data:`` URIs, charts as
inline SVG, no scripts and no links to fetch. Every value that comes from the database or a
file name is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from sqlalchemy import func, select

from scheduler.analysis.drift import RunDiff, diff_runs, drift_rule
from scheduler.analysis.quality import QualityError, QualityReport, assess_quality
from scheduler.query import DELETING, QueryError, Region, get_run, top_regions
from scheduler.render import RenderError, render_overlay
from schema.db import session_scope
from schema.models import Heatmap, Run

__all__ = ["ReportError", "ReportOptions", "build_report", "crop_region", "write_report"]

CROP_SIDE = 176  # longest side of a region crop in the report, in pixels


class ReportError(ValueError):
    """The report cannot be made (unknown run, bad option)."""


@dataclass(frozen=True)
class ReportOptions:
    """What goes into the report; the model checks (faithfulness, sanity) re-run the model."""

    baseline: str | None = None
    faithfulness: bool = False
    sample: int = 32
    regions: int = 4
    max_classes: int = 20
    threshold: float = 0.5
    device: str = "auto"

    def check(self) -> None:
        if not 1 <= self.regions <= 50:
            raise ReportError(f"regions per class must be within 1..50, got {self.regions}")
        if self.max_classes < 1:
            raise ReportError(f"max_classes must be >= 1, got {self.max_classes}")
        if self.sample < 1:
            raise ReportError(f"sample must be >= 1 item, got {self.sample}")


# --------------------------------------------------------------------------- HTML pieces


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, marks: Sequence[bool] = ()) -> str:
    """A table of escaped cells; rows whose entry in ``marks`` is true are highlighted."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for n, row in enumerate(rows):
        cls = ' class="flag"' if n < len(marks) and marks[n] else ""
        cells = "".join(
            f'<td class="num">{_e(_fmt(v))}</td>'
            if isinstance(v, int | float) and not isinstance(v, bool)
            else f"<td>{_e(_fmt(v))}</td>"
            for v in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(pairs: Sequence[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="facts">{rows}</table>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _svg_curves(curves: Sequence[tuple[str, Sequence[float], str]], title: str) -> str:
    """A small line chart (x: fraction of pixels, y: probability 0..1) as inline SVG."""
    width, height, pad = 260, 150, 28
    inner_w, inner_h = width - 2 * pad, height - 2 * pad
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{pad}" y="16" class="svg-title">{_e(title)}</text>',
        f'<rect x="{pad}" y="{pad}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#bbb"/>',
    ]
    for n, (name, values, colour) in enumerate(curves):
        if len(values) < 2:
            continue
        points = " ".join(
            f"{pad + inner_w * i / (len(values) - 1):.1f},{pad + inner_h * (1 - min(max(v, 0.0), 1.0)):.1f}"
            for i, v in enumerate(values)
        )
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts.append(
            f'<text x="{pad + 4 + 80 * n}" y="{height - 8}" fill="{colour}" class="svg-legend">'
            f"{_e(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;
padding-bottom:4px}h3{font-size:15px;margin:20px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.facts th{color:#555;font-weight:500}tr.flag td{background:#fde8e8}
.note{color:#555;margin:4px 0 10px}.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:184px}figure img{display:block;max-width:184px;border:1px solid #ddd}
figcaption{font-size:12px;color:#444;word-break:break-all}.charts{display:flex;flex-wrap:wrap;gap:12px}
.svg-title{font-size:12px;fill:#333}.svg-legend{font-size:11px}nav a{margin-right:12px}
"""


# --------------------------------------------------------------------------- content


def crop_region(jpeg: bytes, box: tuple[int, int, int, int], *, side: int = CROP_SIDE) -> bytes:
    """The region with a margin of half its size around it, outlined, scaled to fit ``side`` pixels."""
    with Image.open(io.BytesIO(jpeg)) as image:
        overlay = image.convert("RGB")
    x0, y0, x1, y1 = box
    mx, my = max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)
    left, top = max(0, x0 - mx), max(0, y0 - my)
    right, bottom = min(overlay.width, x1 + mx), min(overlay.height, y1 + my)
    crop = overlay.crop((left, top, right, bottom))
    ImageDraw.Draw(crop).rectangle(
        (x0 - left, y0 - top, x1 - left - 1, y1 - top - 1), outline=(255, 255, 255)
    )
    crop.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _classes_by_maps(database_url: str, run: Run, method: str, layer: str) -> list[tuple[int, int]]:
    """(class, number of maps) of a method and layer, most explained classes first."""
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Heatmap.target_class, func.count())
            .where(Heatmap.run_id == run.id, Heatmap.method == method, Heatmap.layer == layer)
            .group_by(Heatmap.target_class)
            .order_by(func.count().desc(), Heatmap.target_class)
        ).all()
    return [(int(c), int(n)) for c, n in rows]


def _class_label(run: Run, target: int) -> str:
    names = list(run.class_names or [])
    return f"{names[target]} ({target})" if 0 <= target < len(names) else str(target)


def _figure(database_url: str, region: Region, endpoint_url: str | None, s3_region: str | None) -> str:
    source = Path(region.source_uri).name if not region.source_uri.startswith("s3://") else region.source_uri
    caption = f"item {region.item_id} · {source} · score {region.score:.4g}"
    try:
        rendered = render_overlay(
            database_url,
            region.item_id,
            region.method,
            region.target_class,
            layer=region.layer,
            endpoint_url=endpoint_url,
            region=s3_region,
        )
        crop = crop_region(rendered.jpeg, (region.x0, region.y0, region.x1, region.y1))
    except RenderError as exc:
        return f"<figure><figcaption>{_e(caption)}: cannot render: {_e(exc)}</figcaption></figure>"
    alt = (
        f"{region.method} region of class {region.class_name or region.target_class} in item {region.item_id}"
    )
    return (
        f'<figure><img src="{_data_uri(crop, "image/jpeg")}" alt="{_e(alt)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _regions_section(
    database_url: str, run: Run, options: ReportOptions, endpoint_url: str | None, s3_region: str | None
) -> str:
    parts = [
        _note(
            "The highest-scoring patches of each class across the run (raw-map scores, comparable "
            "across images), cropped from the source image with the map overlaid; the patch is outlined."
        )
    ]
    layer = str(run.layers[0]) if run.layers else None
    if layer is None:
        return _section("regions", "Top regions per class", _note("this run records no layer"))
    for method in run.methods:
        classes = _classes_by_maps(database_url, run, str(method), layer)
        parts.append(f"<h3>{_e(method)} · {_e(layer)}</h3>")
        if not classes:
            parts.append(_note("no maps were stored for this method"))
            continue
        for target, count in classes[: options.max_classes]:
            regions = top_regions(
                database_url, run.id, target, str(method), layer=layer, limit=options.regions
            )
            figures = "".join(_figure(database_url, r, endpoint_url, s3_region) for r in regions)
            parts.append(
                f'<h4>{_e(_class_label(run, target))} · {count} maps</h4><div class="gallery">{figures}</div>'
            )
        if len(classes) > options.max_classes:
            parts.append(_note(f"{len(classes) - options.max_classes} more classes are not shown"))
    return _section("regions", "Top regions per class", "".join(parts))


def _summary_section(run: Run) -> str:
    facts = [
        ("run", run.id),
        ("name", run.name),
        ("audit", run.audit_name),
        ("status", run.status),
        ("model", run.model_ref),
        ("checkpoint sha256", run.checkpoint_sha256),
        ("methods", list(run.methods)),
        ("layers", list(run.layers)),
        ("targets", run.target_spec),
        ("source", run.source_uri),
        ("heatmaps at", run.output_uri),
        ("items", run.n_items),
        ("items done", run.n_done),
        ("items failed", run.n_failed),
        ("shards", f"{run.shards_done} done, {run.shards_failed} failed of {run.n_shards}"),
        ("patches", f"top {run.top_patches} of {run.patch_size}px per map"),
        ("created", run.created_at),
        ("finished", run.finished_at),
        ("baseline run", run.baseline_run_id),
    ]
    return _section("summary", "Summary", _facts(facts))


def _drift_section(diff: RunDiff | None, baseline: str | None) -> str:
    if diff is None:
        return _section(
            "drift",
            "Drift against the baseline",
            _note("this run has no baseline run; pass --baseline RUN to compare it with one"),
        )
    figures = _facts(
        [
            ("baseline (A)", diff.run_a),
            ("this run (B)", diff.run_b),
            ("items in common", diff.common_items),
            ("predictions changed", diff.prediction_changed),
            ("heatmap pairs compared", diff.pairs),
            ("mean correlation", diff.mean_correlation),
            ("mean top-patch IoU", diff.mean_iou),
            ("drifted classes", len(diff.drifted)),
        ]
    )
    classes = _table(
        ["method", "layer", "class", "n", "correlation", "IoU", "centre shift (px)", "L1 shift", "drifted"],
        [
            (
                c.method,
                c.layer,
                c.class_name or c.target_class,
                c.n,
                c.mean_correlation,
                c.mean_iou,
                c.centre_shift_px,
                c.l1_shift,
                c.drifted,
            )
            for c in diff.classes
        ],
        marks=[c.drifted for c in diff.classes],
    )
    movers = _table(
        ["source", "method", "layer", "class", "correlation", "IoU", "centre shift (px)"],
        [
            (
                m.source_uri,
                m.method,
                m.layer,
                m.class_name or m.target_class,
                m.correlation,
                m.iou,
                m.centre_shift_px,
            )
            for m in diff.movers[:20]
        ],
    )
    body = (
        figures
        + _note(drift_rule(diff.threshold) + "; drifted classes are highlighted.")
        + "<h3>Per class</h3>"
        + classes
        + "<h3>Images whose attention moved most</h3>"
        + movers
    )
    return _section("drift", f"Drift against the baseline {baseline}", body)


def _quality_section(quality: QualityReport, model_error: str | None = None) -> str:
    local = quality.localisation
    parts = [
        _note(
            f"{local.boxed_items} items carry a label and an object box; {local.unexplained} of them "
            "have no map of their labelled class (their top-1 prediction was another class) and are not "
            "scored. Pointing game: the map's maximum lies in the box. Energy-in-box: the map's mass "
            "inside the box; box fraction is its chance level."
        )
    ]
    if local.methods:
        parts.append("<h3>Localisation per method</h3>")
        parts.append(
            _table(
                ["method", "layer", "n", "pointing game", "energy in box", "box fraction"],
                [
                    (r.method, r.layer, r.n, r.pointing_game, r.energy_in_box, r.box_fraction)
                    for r in local.methods
                ],
            )
        )
        parts.append("<h3>Localisation per class</h3>")
        parts.append(
            _table(
                ["method", "layer", "class", "n", "pointing game", "energy in box"],
                [
                    (r.method, r.layer, r.class_name or r.target_class, r.n, r.pointing_game, r.energy_in_box)
                    for r in local.classes
                ],
            )
        )
    if quality.faithfulness is not None:
        parts.append("<h3>Faithfulness (deletion and insertion)</h3>")
        parts.append(
            _note(
                "Most salient pixels removed (deletion, mean fill) or restored over a blurred image "
                "(insertion) in equal steps; area under the target-class probability curve. Lower "
                "deletion and higher insertion AUC are more faithful; 'random' is a random pixel order, "
                "the bar to beat."
            )
        )
        parts.append(
            _table(
                ["method", "layer", "n", "deletion AUC", "insertion AUC"],
                [(f.method, f.layer, f.n, f.deletion_auc, f.insertion_auc) for f in quality.faithfulness],
            )
        )
        charts = "".join(
            _svg_curves(
                [("deletion", f.deletion_curve, "#c0392b"), ("insertion", f.insertion_curve, "#2471a3")],
                f"{f.method} · {f.layer}",
            )
            for f in quality.faithfulness
        )
        parts.append(f'<div class="charts">{charts}</div>')
    if quality.sanity is not None:
        parts.append("<h3>Sanity check (model randomisation)</h3>")
        randomised = quality.sanity[0].randomised if quality.sanity else []
        parts.append(
            _note(
                f"Maps of a copy of the model with its last {len(randomised)} parameterised modules "
                f"re-initialised ({', '.join(randomised)}), correlated with the trained model's. "
                "Low correlation: the maps depend on what the model learned."
            )
        )
        parts.append(
            _table(
                ["method", "layer", "n", "mean correlation"],
                [(s.method, s.layer, s.n, s.mean_correlation) for s in quality.sanity],
            )
        )
    elif model_error is not None:
        parts.append(_note(f"faithfulness and the sanity check could not run: {model_error}"))
    elif quality.faithfulness is None:
        parts.append(_note("faithfulness and the sanity check re-run the model; add --faithfulness for them"))
    return _section("quality", "Explanation quality", "".join(parts))


def _quality(
    database_url: str, run_id: str, options: ReportOptions, endpoint_url: str | None, region: str | None
) -> tuple[QualityReport, str | None]:
    """The model checks depend on the model file and the source images still being there; without
    them the report still shows everything the stored results say, and why the checks are missing."""
    common: dict[str, Any] = {"endpoint_url": endpoint_url, "region": region}
    if options.faithfulness:
        try:
            found = assess_quality(
                database_url,
                run_id,
                sample=options.sample,
                model_checks=True,
                device=options.device,
                **common,
            )
            return found, None
        except QualityError as exc:
            return assess_quality(database_url, run_id, model_checks=False, **common), str(exc)
    return assess_quality(database_url, run_id, model_checks=False, **common), None


def build_report(
    database_url: str,
    run_id: str,
    options: ReportOptions | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> str:
    """The HTML text of the report of ``run_id``."""
    options = options or ReportOptions()
    options.check()
    try:
        run = get_run(database_url, run_id)
    except QueryError as exc:
        raise ReportError(str(exc)) from exc
    if run.status == DELETING:
        raise ReportError(f"run {run_id} is being deleted; report on runs that are kept")
    baseline = options.baseline or run.baseline_run_id
    diff = None
    if baseline is not None:
        diff = diff_runs(
            database_url,
            baseline,
            run_id,
            endpoint_url=endpoint_url,
            region=region,
            threshold=options.threshold,
        )
    quality, model_error = _quality(database_url, run_id, options, endpoint_url, region)
    title = f"camaudit report · run {run.id}" + (f" ({run.name})" if run.name else "")
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("summary", "Summary"),
            ("regions", "Top regions"),
            ("drift", "Drift"),
            ("quality", "Quality"),
        )
    )
    body = "".join(
        [
            _summary_section(run),
            _regions_section(database_url, run, options, endpoint_url, region),
            _drift_section(diff, baseline),
            _quality_section(quality, model_error),
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1>{_note(f'generated {generated}')}<nav>{nav}</nav></header>"
        f"<main>{body}</main></body></html>\n"
    )


def write_report(
    database_url: str,
    run_id: str,
    out: str | Path,
    options: ReportOptions | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Path:
    """Build the report and write it to ``out`` (folders created); returns the path written."""
    text = build_report(database_url, run_id, options, endpoint_url=endpoint_url, region=region)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
