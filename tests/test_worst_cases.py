"""The worst cases: localisation columns at commit time, ``top --worst/--outside-box/--border``,
and a planted shortcut that the outside-box order must catch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.worst import overlaps
from schema.db import session_scope
from schema.models import Heatmap, Item
from tests.shortcut_net import train_on
from tests.test_e2e_embedded import run_cli
from workers.localisation import border_mask
from workers.map_reads import read_map_png
from workers.storage import open_storage

runner = CliRunner()
N_IMAGES = 160
SEED = 52


@dataclass(frozen=True)
class ShortcutRuns:
    db: str
    shortcut_run: str
    demo_run: str
    rows: dict[str, dict[str, Any]]  # source path -> manifest row
    heatmaps: Path


def start(manifest: Path, db: str, out: Path, *args: str) -> str:
    proc = run_cli(
        "run", "--source", str(manifest), "--methods", "gradcam", "--database-url", db,
        "--storage-url", str(out), "--json", *args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["run_id"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ShortcutRuns:
    root = tmp_path_factory.mktemp("shortcut")
    proc = run_cli(
        "synth",
        "--out",
        str(root / "data"),
        "--n",
        str(N_IMAGES),
        "--seed",
        str(SEED),
        "--shortcut",
        "corner",
    )
    assert proc.returncode == 0, proc.stderr
    manifest = root / "data" / "manifest.jsonl"
    checkpoint = train_on(manifest, root / "shortcut.pt")
    db = f"sqlite:///{root / 'runs.db'}"
    shortcut = start(
        manifest, db, root / "maps", "--model", "python:tests.shortcut_net:ShortcutNet",
        "--checkpoint", str(checkpoint), "--layer", "features", "--patch-size", "4",
    )  # fmt: skip
    demo = start(manifest, db, root / "maps", "--patch-size", "8", "--top-patches", "20")
    rows = {
        str(manifest.parent / row["uri"]): row
        for row in (json.loads(line) for line in manifest.read_text().splitlines())
    }
    return ShortcutRuns(db, shortcut, demo, rows, root / "maps")


def top(runs: ShortcutRuns, run_id: str, *args: str) -> list[dict[str, Any]]:
    result = runner.invoke(
        app, ["top", "--run", run_id, "--method", "gradcam", "--database-url", runs.db, "--json", *args]
    )
    assert result.exit_code == 0, result.output
    return list(json.loads(result.stdout))


def on_mark(runs: ShortcutRuns, regions: list[dict[str, Any]]) -> float:
    hits = [
        overlaps(runs.rows[r["source_uri"]].get("mark"), r["x0"], r["y0"], r["x1"], r["y1"]) for r in regions
    ]
    return sum(hits) / len(hits)


def test_the_outside_box_order_catches_a_shortcut(runs: ShortcutRuns) -> None:
    learnt = top(runs, runs.shortcut_run, "--class", "circle", "--outside-box", "--limit", "50")
    assert len(learnt) == 50
    share = on_mark(runs, learnt)
    print(f"shortcut model: {share:.0%} of the top 50 outside-box regions of class circle lie on the mark")
    assert share >= 0.9
    for region in learnt:
        box = runs.rows[region["source_uri"]]["box"]
        assert not overlaps(box, region["x0"], region["y0"], region["x1"], region["y1"])
    scores = [r["score"] for r in learnt]
    assert scores == sorted(scores, reverse=True)
    # the demo model looks at the object: hardly any of its regions leave the box, none for the mark
    honest = top(runs, runs.demo_run, "--class", "circle", "--outside-box", "--limit", "50")
    best = top(runs, runs.demo_run, "--class", "circle", "--limit", "50")
    marked = sum(int(on_mark(runs, [r])) for r in honest)
    print(f"demo model: {len(honest)} outside-box regions, {marked} on the mark; ", end="")
    print(f"{on_mark(runs, best):.0%} of its top 50 regions on the mark")
    assert len(best) == 50 and on_mark(runs, best) < 0.1
    assert not honest or on_mark(runs, honest) < 0.5


def stored(runs: ShortcutRuns, run_id: str) -> list[tuple[Heatmap, Item]]:
    with session_scope(runs.db) as session:
        found = session.query(Heatmap, Item).join(Item, Item.id == Heatmap.item_id)
        result = list(found.filter(Heatmap.run_id == run_id).all())
        session.expunge_all()
        return result


def stretched_box_mask(box: list[float], source: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Map pixels whose centres fall inside a source box, for a run that stretched its sources."""
    (width, height), (rows, cols) = source, shape
    xs = (np.arange(cols) + 0.5) * (width / cols)
    ys = (np.arange(rows) + 0.5) * (height / rows)
    x0, y0, x1, y1 = box
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def test_columns_match_the_stored_maps(runs: ShortcutRuns) -> None:
    storage = open_storage(str(runs.heatmaps))
    for heatmap, item in stored(runs, runs.demo_run)[:40]:
        levels = read_map_png(storage, heatmap).astype(np.float64)
        inside = stretched_box_mask(item.box, (item.width, item.height), levels.shape)
        assert heatmap.box_energy == pytest.approx(levels[inside].sum() / levels.sum())
        peak = np.unravel_index(int(levels.argmax()), levels.shape)
        assert heatmap.box_hit == bool(inside[peak])
        assert heatmap.border_share == pytest.approx(levels[border_mask(levels.shape)].sum() / levels.sum())
        assert heatmap.outside_mass is not None and 0 <= heatmap.outside_mass <= heatmap.raw_max


def test_worst_and_border_orders(runs: ShortcutRuns) -> None:
    maps = stored(runs, runs.demo_run)
    square = sorted((h.box_energy, h.item_id) for h, _ in maps if h.target_class == 1)
    worst = top(runs, runs.demo_run, "--class", "square", "--worst", "--limit", "5")
    assert [w["item_id"] for w in worst] == [item for _, item in square[:5]]
    assert all(w["box_energy"] is not None for w in worst)
    border = top(runs, runs.demo_run, "--class", "circle", "--border", "--limit", "3")
    expected = sorted(((-h.border_share, h.item_id) for h, _ in maps if h.target_class == 0))[:3]
    assert [b["item_id"] for b in border] == [item for _, item in expected]
    # the shortcut model's circle maps sit on the corner mark, so on the border band
    corner = top(runs, runs.shortcut_run, "--class", "circle", "--border", "--limit", "10")
    assert min(c["border_share"] for c in corner) > max(b["border_share"] for b in border[:1]) * 0.5
    text = runner.invoke(
        app, ["top", "--run", runs.demo_run, "--class", "square", "--worst", "--database-url", runs.db]
    )
    assert "least energy in the box first" in text.output


def test_bad_orders_are_refused(runs: ShortcutRuns) -> None:
    base = ["top", "--run", runs.demo_run, "--class", "circle", "--database-url", runs.db]
    both = runner.invoke(app, [*base, "--worst", "--border"])
    assert both.exit_code == 2 and "choose one order" in both.output
    bad = runner.invoke(app, [*base, "--worst", "--method", "gradcm"])
    assert bad.exit_code == 2 and "did you mean gradcam" in bad.output
    huge = runner.invoke(app, [*base, "--outside-box", "--limit", "100000000"])
    assert huge.exit_code == 2 and "limit must be within" in huge.output


def test_gallery_orders_and_report_section(runs: ShortcutRuns, tmp_path: Path) -> None:
    import re

    from fastapi.testclient import TestClient

    from scheduler.analysis.report import build_report
    from scheduler.web.app import create_app

    client = TestClient(create_app(runs.db, page_size=6), base_url="http://localhost")
    page = client.get(f"/runs/{runs.demo_run}", params={"class": "square", "order": "worst"})
    assert page.status_code == 200 and "least energy in the labelled box first" in page.text
    shown = [int(i) for i in re.findall(r'data-item="(\d+)"', page.text)]
    worst = top(runs, runs.demo_run, "--class", "square", "--worst", "--limit", "6")
    assert shown == [w["item_id"] for w in worst] and "energy in box" in page.text
    off = client.get(f"/runs/{runs.shortcut_run}", params={"class": "circle", "order": "outside-box"})
    shown = [int(i) for i in re.findall(r'data-item="(\d+)"', off.text)]
    expected = top(runs, runs.shortcut_run, "--class", "circle", "--outside-box", "--limit", "6")
    assert shown == [r["item_id"] for r in expected]
    bad = client.get(f"/runs/{runs.demo_run}", params={"order": "<script>"})
    assert bad.status_code == 400 and "unknown order" in bad.text and "<script>" not in bad.text
    html = build_report(runs.db, runs.demo_run)
    section = html[html.index('<section id="worst">') :]
    section = section[: section.index("</section>")]
    assert "Worst 20 per class" in section and section.count("<h4>") >= 3
    first_rows = re.findall(
        r"<h4>square \(1\) · worst (\d+)</h4>.*?<tbody><tr><td>1</td><td>(\d+)</td>", section
    )
    assert first_rows and int(first_rows[0][1]) == worst[0]["item_id"]
