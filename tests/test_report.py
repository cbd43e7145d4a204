"""The HTML report: one self-contained file with the run's summary, regions, drift and quality."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update

from scheduler.analysis.drift import diff_runs
from scheduler.analysis.quality import localisation
from scheduler.analysis.report import CROP_SIDE, ReportError, ReportOptions, build_report, crop_region
from scheduler.query import top_regions
from schema.db import session_scope
from schema.models import Run
from tests.test_drift import cli_run
from tests.test_e2e_embedded import run_cli
from workers.synth import make_dataset

N_IMAGES = 10
REGIONS = 2
HOSTILE_NAME = '<script>alert("x")</script> & co'


@dataclass(frozen=True)
class DemoRun:
    db: str
    run_id: str


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
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("report")
    manifest = make_dataset(root / "data", N_IMAGES, seed=53)
    db = f"sqlite:///{root / 'runs.db'}"
    run_id = cli_run(manifest, db, root / "heatmaps")
    with session_scope(db) as s:
        s.execute(update(Run).where(Run.id == run_id).values(name=HOSTILE_NAME))
    return DemoRun(db, run_id)


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


def test_report_has_every_section_with_the_runs_numbers(demo_run: DemoRun, full_report: str) -> None:
    page = parse(full_report)
    assert {"summary", "regions", "drift", "quality"} <= set(page.ids)
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
    assert f"items done {N_IMAGES}" in text and "methods gradcam, cam" in text
    # one crop per region the query side lists, for every class of every method
    expected = 0
    for method in ("gradcam", "cam"):
        for name in ("circle", "square", "triangle", "cross", "ring"):
            expected += len(top_regions(demo_run.db, demo_run.run_id, name, method, limit=REGIONS))
    assert len(page.images) == expected
    # the numbers are those of the modules that compute them
    diff = diff_runs(demo_run.db, demo_run.run_id, demo_run.run_id)
    assert f"mean correlation {diff.mean_correlation:.3f}" in text
    assert f"heatmap pairs compared {diff.pairs}" in text
    local = localisation(demo_run.db, demo_run.run_id).get("gradcam")
    assert f"gradcam features {local.n} {local.pointing_game:.3f} {local.energy_in_box:.3f}" in text
    assert "svg" in page.tags and "polyline" in page.tags


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
