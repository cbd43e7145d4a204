"""The HTML report: one self-contained file with the run's summary, regions, drift and quality."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update

from scheduler.analysis.report import CROP_SIDE, ReportError, ReportOptions, build_report, crop_region
from schema.db import session_scope
from schema.models import Run
from tests import by_hand
from tests.plugins.runs import HOSTILE_NAME, DemoRun
from tests.test_e2e_embedded import run_cli

REGIONS = 2


class Page(HTMLParser):
    """What a browser would load from the page: every tag, image source and link."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for name in ("src", "href", "srcset", "poster", "data", "action"):
            if values.get(name) is not None and tag != "img":
                self.urls.append(str(values[name]))
        if values.get("id"):
            self.ids.append(str(values["id"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def full_report(demo_run: DemoRun) -> str:
    options = ReportOptions(baseline=demo_run.run_id, faithfulness=True, sample=3, regions=REGIONS)
    return build_report(demo_run.db, demo_run.run_id, options)


def test_report_is_self_contained(full_report: str) -> None:
    page = parse(full_report)
    assert full_report.startswith("<!DOCTYPE html>")
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert page.images and all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    for src in page.images:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and max(image.size) <= CROP_SIDE
    # the only links are to the page's own sections
    assert page.urls and all(url.startswith("#") and url[1:] in page.ids for url in page.urls)
    assert "http://" not in full_report.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in full_report


class Sections(HTMLParser):
    """The report as data: per section id, its headings, tables (cell texts), captions and curves."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[str, list[dict]] = {}
        self.section = ""
        self.capture: list[str] | None = None
        self.row: list[str] | None = None

    def _block(self) -> dict:
        return self.blocks[self.section][-1]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self.section = str(values["id"])
            self.blocks[self.section] = [{"heading": "", "rows": [], "captions": [], "curves": []}]
        elif tag in ("h3", "h4"):
            self.blocks[self.section].append({"heading": "", "rows": [], "captions": [], "curves": []})
            self.capture = []
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th", "figcaption") and self.section:
            self.capture = []
        elif tag == "polyline":
            self._block()["curves"].append(str(values["points"]))

    def handle_data(self, data: str) -> None:
        if self.capture is not None:
            self.capture.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self.capture or [])
        if tag in ("h3", "h4"):
            self._block()["heading"] = text
            self.capture = None
        elif tag in ("td", "th") and self.row is not None:
            self.row.append(text)
            self.capture = None
        elif tag == "figcaption":
            self._block()["captions"].append(text)
            self.capture = None
        elif tag == "tr" and self.row is not None:
            self._block()["rows"].append(self.row)
            self.row = None


def sections(text: str) -> dict[str, list[dict]]:
    found = Sections()
    found.feed(text)
    found.close()
    return found.blocks


def facts(block: dict) -> dict[str, str]:
    return {row[0]: row[1] for row in block["rows"] if len(row) == 2}


def by_heading(blocks: list[dict]) -> dict[str, dict]:
    return {b["heading"]: b for b in blocks}


def per_method(
    blocks: list[dict], methods: tuple[str, ...] = ("gradcam", "cam")
) -> dict[tuple[str, str], dict]:
    """Blocks under each method's heading (``METHOD · LAYER``), by (method, their heading)."""
    found, method = {}, ""
    for block in blocks:
        name = block["heading"].split(" · ")[0]
        if name in methods:
            method = name
        found[method, block["heading"]] = block
    return found


def test_report_has_every_section(demo_run: DemoRun, full_report: str) -> None:
    page = parse(full_report)
    assert {"summary", "alerts", "regions", "worst", "drift", "quality"} <= set(page.ids)
    text = page.plain
    for heading in (
        "Summary",
        "Top regions per class",
        f"Drift against the baseline {demo_run.run_id}",
        "Explanation quality",
        "Faithfulness (deletion and insertion)",
        "Sanity check (model randomisation)",
    ):
        assert heading in text
    assert "svg" in page.tags and "polyline" in page.tags


def test_summary_counts_are_the_rows_in_the_database(demo_run: DemoRun, full_report: str) -> None:
    summary = facts(sections(full_report)["summary"][0])
    statuses = dict(
        by_hand.rows(
            demo_run.db,
            "select status, count(*) from items where run_id = ? group by status",
            demo_run.run_id,
        )
    )
    assert summary["items"] == str(sum(statuses.values())) == str(demo_run.n_items)
    assert summary["items done"] == str(statuses.get("done", 0))
    assert summary["items failed"] == str(statuses.get("failed", 0))
    assert summary["methods"] == "gradcam, cam"


def _names(demo_run: DemoRun) -> list[str]:
    (names,) = by_hand.rows(demo_run.db, "select class_names from runs where id = ?", demo_run.run_id)[0]
    return json.loads(names)


def test_top_regions_are_the_highest_patch_scores(demo_run: DemoRun, full_report: str) -> None:
    names = _names(demo_run)
    blocks = per_method(sections(full_report)["regions"])
    shown = 0
    for method in ("gradcam", "cam"):
        counts = by_hand.rows(
            demo_run.db,
            "select target_class, count(*) from heatmaps "
            "where run_id = ? and method = ? and layer = 'features' "
            "group by target_class order by count(*) desc, target_class",
            demo_run.run_id,
            method,
        )
        assert counts and (method, f"{method} · features") in blocks
        headings = [h for m, h in blocks if m == method and h != f"{method} · features"]
        assert headings == [f"{names[t]} ({t}) · {n} maps" for t, n in counts]  # most maps first
        for target, count in counts:
            block = blocks[method, f"{names[target]} ({target}) · {count} maps"]
            best = by_hand.rows(
                demo_run.db,
                "select item_id, source_uri, score from patch_scores p join items i on i.id = p.item_id "
                "where p.run_id = ? and p.method = ? and p.layer = 'features' and p.target_class = ? "
                "order by score desc, p.id limit ?",
                demo_run.run_id,
                method,
                target,
                REGIONS,
            )
            assert block["captions"] == [
                f"item {item} · {Path(uri).name} · score {score:.4g}" for item, uri, score in best
            ]
            shown += len(best)
    assert shown == len(parse(full_report).images)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def test_worst_maps_are_the_least_energy_in_box_in_the_database(demo_run: DemoRun, full_report: str) -> None:
    names = _names(demo_run)
    blocks = per_method(sections(full_report)["worst"])
    checked = 0
    for method in ("gradcam", "cam"):
        classes = by_hand.rows(
            demo_run.db,
            "select target_class, count(*) from heatmaps "
            "where run_id = ? and method = ? and layer = 'features' "
            "and box_energy is not null group by target_class order by count(*) desc, target_class",
            demo_run.run_id,
            method,
        )
        headings = [h for m, h in blocks if m == method and h != f"{method} · features"]
        assert headings == [f"{names[t]} ({t}) · worst {min(n, 20)}" for t, n in classes]
        for target, count in classes:
            worst = by_hand.rows(
                demo_run.db,
                "select h.item_id, i.source_uri, i.label, h.box_energy, h.box_hit, h.outside_mass, "
                "h.border_share "
                "from heatmaps h join items i on i.id = h.item_id where h.run_id = ? and h.method = ? "
                "and h.layer = 'features' and h.target_class = ? and h.box_energy is not null "
                "order by h.box_energy, h.id limit 20",
                demo_run.run_id,
                method,
                target,
            )
            block = blocks[method, f"{names[target]} ({target}) · worst {min(count, 20)}"]
            expected = [
                [
                    *(str(n), str(item), Path(uri).name, label, _num(energy)),
                    *("–" if hit is None else ("yes" if hit else "no"), _num(outside), _num(border)),
                ]
                for n, (item, uri, label, energy, hit, outside, border) in enumerate(worst, start=1)
            ]
            assert block["rows"][1:] == expected, (method, target)
            checked += 1
    assert checked >= 2


def test_drift_against_itself_pairs_every_map_unchanged(demo_run: DemoRun, full_report: str) -> None:
    """Baseline = the run: every stored map pairs with itself (correlation 1, IoU 1, no shift)."""
    names = _names(demo_run)
    blocks = sections(full_report)["drift"]
    figures = facts(blocks[0])
    maps = by_hand.rows(
        demo_run.db,
        "select method, layer, target_class, count(*) from heatmaps where run_id = ? "
        "group by method, layer, target_class",
        demo_run.run_id,
    )
    (done,) = by_hand.rows(
        demo_run.db, "select count(*) from items where run_id = ? and status = 'done'", demo_run.run_id
    )[0]
    assert figures["items in common"] == str(done)
    assert figures["predictions changed"] == "0"
    assert figures["heatmap pairs compared"] == str(sum(n for *_, n in maps))
    assert figures["mean correlation"] == "1.000" and figures["mean top-patch IoU"] == "1.000"
    assert figures["drifted classes"] == "0"
    per_class = by_heading(blocks)["Per class"]["rows"][1:]
    expected = {
        (m, layer, names[c], str(n), "1.000", "1.000", "0.000", "0.000", "no") for m, layer, c, n in maps
    }
    assert len(per_class) == len(expected) and set(map(tuple, per_class)) == expected


def test_localisation_figures_are_the_stored_maps_scored_by_hand(demo_run: DemoRun, full_report: str) -> None:
    methods, classes = by_hand.localisation(demo_run.db, demo_run.run_id)
    names = _names(demo_run)
    blocks = by_heading(sections(full_report)["quality"])
    assert blocks["Localisation per method"]["rows"][1:] == [
        [m, "features", str(t.n), f"{t.pointing_game:.3f}", f"{t.energy_in_box:.3f}", f"{t.box_fraction:.3f}"]
        for m, t in sorted(methods.items())
    ]
    assert blocks["Localisation per class"]["rows"][1:] == [
        [m, "features", names[c], str(t.n), f"{t.pointing_game:.3f}", f"{t.energy_in_box:.3f}"]
        for (m, c), t in sorted(classes.items())
    ]


def _curve(points: str) -> list[float]:
    """Probabilities back from the chart's points (28 px padding, 94 px tall plot, y down)."""
    return [1 - (float(p.split(",")[1]) - 28) / 94 for p in points.split()]


def test_faithfulness_aucs_are_the_areas_under_the_curves_drawn(full_report: str) -> None:
    blocks = by_heading(sections(full_report)["quality"])
    table = blocks["Faithfulness (deletion and insertion)"]
    rows = {row[0]: row for row in table["rows"][1:]}
    assert set(rows) == {"gradcam", "cam", "random"} and all(r[2] == "3" for r in rows.values())
    charts = table["curves"]
    assert len(charts) == 2 * len(rows)
    for n, row in enumerate(table["rows"][1:]):
        for curve, auc in zip(charts[2 * n : 2 * n + 2], row[3:5], strict=True):
            values = _curve(curve)
            area = (sum(values) - (values[0] + values[-1]) / 2) / (len(values) - 1)
            assert float(auc) == pytest.approx(area, abs=0.006), (row, values)
    sanity = blocks["Sanity check (model randomisation)"]["rows"][1:]
    assert {row[0] for row in sanity} == {"gradcam", "cam"}


def test_report_escapes_what_it_did_not_write(full_report: str) -> None:
    page = parse(full_report)
    assert "script" not in page.tags
    assert HOSTILE_NAME in page.plain  # shown as text, not run
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in full_report


def test_report_without_baseline_or_model_checks(demo_run: DemoRun) -> None:
    text = parse(build_report(demo_run.db, demo_run.run_id, ReportOptions(regions=1, max_classes=2))).plain
    assert "this run has no baseline run" in text
    assert "add --faithfulness" in text and "Sanity check" not in text
    assert text.count("more classes are not shown") == 2  # five classes, two shown, per method


def test_report_explains_model_checks_that_cannot_run(demo_run: DemoRun) -> None:
    with session_scope(demo_run.db) as s:
        real = s.execute(select(Run.checkpoint_sha256).where(Run.id == demo_run.run_id)).scalar_one()
        s.execute(update(Run).where(Run.id == demo_run.run_id).values(checkpoint_sha256="f" * 64))
    try:
        options = ReportOptions(faithfulness=True, sample=2, regions=1, max_classes=1)
        text = parse(build_report(demo_run.db, demo_run.run_id, options)).plain
    finally:
        with session_scope(demo_run.db) as s:
            s.execute(update(Run).where(Run.id == demo_run.run_id).values(checkpoint_sha256=real))
    assert "faithfulness and the sanity check could not run" in text and "changed since the run" in text
    assert "Localisation per method" in text  # what the stored maps say is still there


def test_report_refuses_unknown_runs_and_options(demo_run: DemoRun) -> None:
    with pytest.raises(ReportError, match=f"did you mean {demo_run.run_id}"):
        build_report(demo_run.db, demo_run.run_id[:-1])
    with pytest.raises(ReportError, match="regions"):
        build_report(demo_run.db, demo_run.run_id, ReportOptions(regions=0))


def test_crop_outlines_the_region() -> None:
    canvas = Image.new("RGB", (400, 300), (0, 0, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG")
    crop = Image.open(io.BytesIO(crop_region(buffer.getvalue(), (100, 100, 140, 120), side=400)))
    # half the box on each side: 80 x 40 pixels, the outline where the box is
    assert crop.size == (80, 40)
    assert min(crop.getpixel((20, 10))) > 200 and max(crop.getpixel((5, 5))) < 40


def test_cli_report_writes_one_file(demo_run: DemoRun, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "report.html"
    proc = run_cli(
        "report", demo_run.run_id, "--out", str(out), "--regions", "1", "--database-url", demo_run.db
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr.replace("\n", "")
    page = parse(out.read_text(encoding="utf-8"))
    assert page.images and all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    assert "Top regions per class" in page.plain
