"""The web UI over real runs (``camaudit run`` on synthetic images): pages, filters, paging, images, tokens.

Expected answers come from the database rows themselves, sorted and filtered in Python, so the
pages are checked against what the workers wrote rather than against the SQL the pages run.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, text

from scheduler.query import get_run
from scheduler.web import WebConfigError, check_database, check_exposure, create_app
from scheduler.web.app import _redactor
from scheduler.web.auth import COOKIE, RedactToken
from scheduler.web.compare import layout
from scheduler.web.data import Cursor, GalleryQuery, gallery_statement
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore
from tests.test_e2e_embedded import run_cli
from workers.synth import CLASS_NAMES, make_dataset

N_IMAGES = 20
TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Site:
    db: str
    first: str  # older run
    second: str  # newer run, baseline = none
    data: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("web")
    manifest = make_dataset(root / "data", N_IMAGES, seed=5)
    (root / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"uri": "corrupt.png", "label": "circle"}) + "\n")
    db = f"sqlite:///{root / 'runs.db'}"
    ids = []
    for name in ("first", "second"):
        proc = run_cli(
            "run",
            "--source",
            str(manifest),
            "--database-url",
            db,
            "--storage-url",
            str(root / "heatmaps"),
            "--methods",
            "gradcam,cam",
            "--name",
            name,
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        ids.append(json.loads(proc.stdout)["run_id"])
    return Site(db=db, first=ids[0], second=ids[1], data=root / "data")


@pytest.fixture(scope="module")
def client(site: Site) -> TestClient:
    return TestClient(create_app(site.db, page_size=7, runs_page_size=25))


def cards(html: str) -> list[tuple[int, float]]:
    return [(int(i), float(s)) for i, s in re.findall(r'data-item="(\d+)" data-score="([^"]+)"', html)]


def next_link(html: str) -> str | None:
    found = re.search(r'rel="next" id="next" href="([^"]+)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def error_text(html: str) -> str:
    found = re.search(r'id="error">([^<]*)<', html)
    assert found, "the page shows no error message"
    return found.group(1).replace("&#39;", "'")


def expected_regions(
    db: str, run_id: str, target: int, method: str, **item_where: Any
) -> list[tuple[int, float]]:
    """Every patch of the class and method, item filters applied in Python, best first."""
    with session_scope(db) as s:
        rows = s.execute(
            select(PatchScore.id, PatchScore.item_id, PatchScore.score, Item.label, Item.correct)
            .join(Item, Item.id == PatchScore.item_id)
            .where(
                PatchScore.run_id == run_id, PatchScore.method == method, PatchScore.target_class == target
            )
        ).all()
    kept = [r for r in rows if all(getattr(r, k) == v for k, v in item_where.items())]
    kept.sort(key=lambda r: (-r.score, r.id))
    return [(r.item_id, r.score) for r in kept]


def walk(client: TestClient, url: str) -> list[tuple[int, float]]:
    """Follow the 'next page' links from ``url`` to the end, collecting the cards of every page."""
    seen: list[tuple[int, float]] = []
    pages = 0
    while url:
        page = client.get(url)
        assert page.status_code == 200, page.text
        seen.extend(cards(page.text))
        pages += 1
        assert pages < 100, "paging does not end"
        url = next_link(page.text) or ""
    return seen


# --------------------------------------------------------------------------- runs list


def test_runs_list_shows_each_run_with_status_and_progress(client: TestClient, site: Site) -> None:
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert html.index(site.second) < html.index(site.first), "newest run first"
    for run_id in (site.first, site.second):
        run = get_run(site.db, run_id)
        assert (run.n_done, run.n_failed, run.n_items) == (N_IMAGES, 1, N_IMAGES + 1)
        row = html[html.index(f'data-run="{run_id}"') :]
        row = row[: row.index("</tr>")]
        assert f"{N_IMAGES} done · 1 failed of {N_IMAGES + 1}" in row
        assert ">finished<" in row and "gradcam, cam" in row


def test_runs_list_pages(site: Site) -> None:
    small = TestClient(create_app(site.db, runs_page_size=1))
    first, second = small.get("/"), small.get("/?page=2")
    assert site.second in first.text and site.first not in first.text
    assert site.first in second.text and site.second not in second.text
    assert 'rel="next" href="/?page=2"' in first.text and "page 1 of 2" in first.text
    assert 'rel="prev" href="/?page=1"' in second.text
    assert small.get("/?page=0").status_code == 400


# --------------------------------------------------------------------------- run page


@pytest.mark.parametrize("method", ["gradcam", "cam"])
def test_gallery_pages_walk_every_region_of_the_class_in_score_order(
    client: TestClient, site: Site, method: str
) -> None:
    target = CLASS_NAMES.index("square")
    want = expected_regions(site.db, site.first, target, method)
    assert len(want) > 7, "the class must span several pages for this test to mean anything"
    got = walk(client, f"/runs/{site.first}?class=square&method={method}")
    assert got == want


def test_first_gallery_page_defaults_to_the_first_class_and_method(client: TestClient, site: Site) -> None:
    page = client.get(f"/runs/{site.first}")
    assert page.status_code == 200
    assert cards(page.text) == expected_regions(site.db, site.first, 0, "gradcam")[:7]
    assert '<option value="circle" selected>' in page.text


def test_filters_by_label_and_correctness(client: TestClient, site: Site) -> None:
    target = CLASS_NAMES.index("triangle")
    for label in ("triangle", "circle"):
        want = expected_regions(site.db, site.first, target, "gradcam", label=label)
        assert walk(client, f"/runs/{site.first}?class=triangle&label={label}") == want
    for verdict, flag in (("correct", True), ("incorrect", False)):
        want = expected_regions(site.db, site.first, target, "gradcam", correct=flag)
        assert walk(client, f"/runs/{site.first}?class=triangle&correct={verdict}") == want
    everything = expected_regions(site.db, site.first, target, "gradcam")
    right = expected_regions(site.db, site.first, target, "gradcam", correct=True)
    wrong = expected_regions(site.db, site.first, target, "gradcam", correct=False)
    assert right and len(right) + len(wrong) == len(everything)


def test_filtered_pages_read_a_bounded_window_and_still_miss_nothing(site: Site) -> None:
    """With a window barely above the page size, pages come back part-full but the walk is complete."""
    narrow = TestClient(create_app(site.db, page_size=3, scan_window=4))
    target = CLASS_NAMES.index("cross")
    for params, where in (("label=cross", {"label": "cross"}), ("correct=incorrect", {"correct": False})):
        want = expected_regions(site.db, site.first, target, "cam", **where)
        assert walk(narrow, f"/runs/{site.first}?class=cross&method=cam&{params}") == want
    sparse = narrow.get(f"/runs/{site.first}?class=cross&method=cam&label=hexagon")
    assert cards(sparse.text) == [] and "of the next 4 regions" in sparse.text and next_link(sparse.text)


def test_layer_filter_and_an_empty_result(client: TestClient, site: Site) -> None:
    run = get_run(site.db, site.first)
    layer = run.layers[0]
    want = expected_regions(site.db, site.first, 1, "cam")
    assert walk(client, f"/runs/{site.first}?class=1&method=cam&layer={layer}") == want
    empty = client.get(f"/runs/{site.first}?class=square&label=hexagon")
    assert empty.status_code == 200 and cards(empty.text) == []
    assert "No regions match" in empty.text and "the model's classes are circle" in empty.text


@pytest.mark.parametrize(
    ("query", "hint"),
    [
        ("method=gradcm", "did you mean gradcam"),
        ("class=squre", "did you mean square"),
        ("layer=featurs", "did you mean features"),
        ("correct=maybe", "'correct', 'incorrect' or empty"),
        ("after=not-a-cursor", "expected SCORE_ID"),
    ],
)
def test_bad_filters_explain_what_would_be_right(
    client: TestClient, site: Site, query: str, hint: str
) -> None:
    page = client.get(f"/runs/{site.first}?{query}")
    assert page.status_code == 400
    assert hint in error_text(page.text)
    assert 'id="f-class"' in page.text, "the filter form stays so the visitor can fix the value"


def test_gallery_query_walks_the_top_index(site: Site) -> None:
    run = get_run(site.db, site.first)
    query = GalleryQuery.from_params(
        run, class_="ring", method="gradcam", layer=None, label="ring", correct=""
    )
    unfiltered = GalleryQuery.from_params(
        run, class_="ring", method="cam", layer=None, label=None, correct=None
    )
    for after, asked in ((None, query), (Cursor(0.01, 5), query), (Cursor(0.01, 5), unfiltered)):
        stmt = gallery_statement(run, asked, after=after, size=24)
        with session_scope(site.db) as s:
            sql = str(stmt.compile(dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True}))
            plan = " / ".join(r[-1] for r in s.execute(text("EXPLAIN QUERY PLAN " + sql)))
        assert re.search(r"SEARCH patch_scores USING (COVERING )?INDEX ix_patch_scores_top", plan), plan
        assert "SCAN patch_scores" not in plan and "SCAN items" not in plan, plan


# --------------------------------------------------------------------------- item page


def item_ids(db: str, run_id: str) -> dict[str, list[int]]:
    with session_scope(db) as s:
        rows = s.execute(
            select(Item.id, Item.status).where(Item.run_id == run_id).order_by(Item.ordinal)
        ).all()
    found: dict[str, list[int]] = {}
    for item_id, status in rows:
        found.setdefault(status, []).append(item_id)
    return found


def test_item_page_shows_every_map_and_the_predictions(client: TestClient, site: Site) -> None:
    item_id = item_ids(site.db, site.first)["done"][3]
    with session_scope(site.db) as s:
        maps = s.execute(select(Heatmap.method, Heatmap.layer).where(Heatmap.item_id == item_id)).all()
        item = s.get(Item, item_id)
        assert item is not None
        predictions, label = item.predictions, item.label
    page = client.get(f"/items/{item_id}")
    assert page.status_code == 200
    html = page.text
    assert len(re.findall(r'class="card map"', html)) == len(maps) == 2
    for method, layer in maps:
        assert f"method={method}&amp;class=" in html and f"layer={layer}" in html
    rows = re.findall(r"<tr>\s*<td class=\"num\">\d+</td>", html[html.index('id="predictions"') :])
    assert len(rows) == len(predictions) == 5
    assert f"<b>Label</b>{label}" in html
    assert 'rel="next"' in html and 'rel="prev"' in html


def test_failed_item_page_shows_its_error(client: TestClient, site: Site) -> None:
    (failed,) = item_ids(site.db, site.first)["failed"]
    page = client.get(f"/items/{failed}")
    assert page.status_code == 200
    assert 'id="item-error"' in page.text and "corrupt.png" in page.text
    assert 'class="card map"' not in page.text


# --------------------------------------------------------------------------- images


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


def test_overlay_is_a_jpeg_of_the_source_size_with_cache_headers(client: TestClient, site: Site) -> None:
    item_id = item_ids(site.db, site.first)["done"][0]
    with session_scope(site.db) as s:
        item = s.get(Item, item_id)
        assert item is not None
        uri, target = item.source_uri, item.pred_class
    with Image.open(uri) as source:
        source_size = source.size
    url = f"/items/{item_id}/overlay.jpg?method=gradcam&class={CLASS_NAMES[target]}"
    answer = client.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/jpeg"
    assert jpeg_size(answer.content) == source_size
    assert "max-age" in answer.headers["cache-control"]
    etag = answer.headers["etag"]
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    by_index = client.get(f"/items/{item_id}/overlay.jpg?method=gradcam&class={target}")
    assert by_index.headers["etag"] == etag and by_index.content == answer.content
    thumb = client.get(url + "&max_side=64")
    assert max(jpeg_size(thumb.content)) == 64 and thumb.headers["etag"] != etag
    crop = client.get(url + "&box=10,20,42,52")
    assert jpeg_size(crop.content) == (32, 32)


def test_source_crop_has_the_box_size_and_context_grows_it(client: TestClient, site: Site) -> None:
    item_id = item_ids(site.db, site.first)["done"][1]
    whole = client.get(f"/items/{item_id}/source.jpg")
    assert whole.status_code == 200
    width, height = jpeg_size(whole.content)
    with session_scope(site.db) as s:
        item = s.get(Item, item_id)
        assert item is not None
        assert (width, height) == (item.width, item.height)
    assert jpeg_size(client.get(f"/items/{item_id}/source.jpg?box=20,20,52,60").content) == (32, 40)
    assert jpeg_size(client.get(f"/items/{item_id}/source.jpg?box=20,20,52,60&pad=0.25").content) == (48, 60)
    clamped = client.get(f"/items/{item_id}/source.jpg?box=4,4,36,44&pad=0.25").content
    assert jpeg_size(clamped) == (44, 54), "the context stops at the image's edges"


@pytest.mark.parametrize(
    ("url", "status", "hint"),
    [
        ("/items/999999/overlay.jpg?method=gradcam&class=0", 404, "no item 999999"),
        ("/items/999999/source.jpg", 404, "no item 999999"),
        ("/items/{item}/overlay.jpg?method=gradcm&class=0", 404, "did you mean gradcam"),
        ("/items/{item}/overlay.jpg?method=gradcam&class=sqare", 400, "did you mean square"),
        ("/items/{item}/source.jpg?box=5,5,1,1", 400, "x1 > x0"),
        ("/items/{item}/source.jpg?box=a,b", 400, "x0,y0,x1,y1"),
        ("/items/{item}/source.jpg?max_side=5", 400, "max_side must be within"),
    ],
)
def test_image_errors_say_what_is_wrong(
    client: TestClient, site: Site, url: str, status: int, hint: str
) -> None:
    item = item_ids(site.db, site.first)["done"][0]
    answer = client.get(url.format(item=item))
    assert answer.status_code == status
    assert hint in answer.text


# --------------------------------------------------------------------------- not found, read-only


def test_unknown_run_item_and_page_are_404_with_a_way_forward(client: TestClient, site: Site) -> None:
    run = client.get(f"/runs/{site.first[:-2]}")
    assert run.status_code == 404 and f"did you mean {site.first}" in error_text(run.text)
    item = client.get("/items/999999")
    assert item.status_code == 404 and "item ids run from 1 to" in error_text(item.text)
    page = client.get("/nowhere")
    assert page.status_code == 404 and "/runs/RUN_ID" in error_text(page.text)


def test_only_reads_are_allowed(client: TestClient, site: Site) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = client.request(method, f"/runs/{site.first}")
        assert answer.status_code == 405 and "read-only" in answer.text
        assert answer.headers["allow"] == "GET, HEAD"
    assert client.head("/").status_code == 200


def test_drift_page(client: TestClient, site: Site) -> None:
    assert client.get("/drift").status_code == 200
    lonely = client.get(f"/drift?b={site.second}")
    assert "has no baseline run" in error_text(lonely.text)
    page = client.get(f"/drift?a={site.first}&b={site.second}")
    if importlib.util.find_spec("scheduler.analysis.drift") is None:
        assert page.status_code == 501 and "scheduler.analysis.drift is missing" in error_text(page.text)
        return
    assert page.status_code == 200, page.text
    assert 'class="grid drift-table"' in page.text
    unknown = client.get(f"/drift?a={site.first}&b=nosuchrun")
    assert unknown.status_code == 400 and "nosuchrun" in error_text(unknown.text)


# --------------------------------------------------------------------------- access token


def test_token_is_required_and_accepted_as_bearer_query_or_cookie(site: Site) -> None:
    guarded = TestClient(create_app(site.db, token=TOKEN))
    bare = guarded.get("/")
    assert bare.status_code == 401 and "?token=" in bare.text and "Bearer" in bare.text
    assert guarded.get("/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert guarded.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get(f"/runs/{site.first}?token=wrong").status_code == 401

    signed_in = guarded.get(f"/runs/{site.first}?class=ring&token={TOKEN}", follow_redirects=False)
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == f"/runs/{site.first}?class=ring", "the token leaves the URL"
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    followed = guarded.get(signed_in.headers["location"])  # the client now holds the cookie
    assert followed.status_code == 200 and site.first in followed.text
    item = item_ids(site.db, site.first)["done"][0]
    assert guarded.get(f"/items/{item}/source.jpg").status_code == 200

    stranger = TestClient(create_app(site.db, token=TOKEN))
    stranger.cookies.set(COOKIE, "forged")
    assert stranger.get("/").status_code == 401


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_needs_no_token(host: str) -> None:
    check_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "camaudit.example.org"])
def test_other_hosts_need_a_token(host: str) -> None:
    with pytest.raises(WebConfigError, match="--token TOKEN or set CAMAUDIT_WEB_TOKEN"):
        check_exposure(host, None)
    check_exposure(host, TOKEN)
    with pytest.raises(WebConfigError, match="at least 8"):
        check_exposure(host, "short")


def test_serve_refuses_to_expose_runs_without_a_token(site: Site) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CAMAUDIT_WEB_TOKEN"}
    proc = run_cli("serve", "--host", "0.0.0.0", "--port", "1", "--database-url", site.db, env=env)
    assert proc.returncode == 2
    assert "token is required" in " ".join(proc.stderr.split())


def test_serve_refuses_a_database_without_runs(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.db"
    with pytest.raises(WebConfigError, match="no database file"):
        check_database(f"sqlite:///{missing}")
    assert not missing.exists(), "a read-only server must not create the file"
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(WebConfigError, match="camaudit db upgrade"):
        check_database(f"sqlite:///{tmp_path / 'empty.db'}")


def test_messages_never_show_the_database_password() -> None:
    redact = _redactor("postgresql://auditor:hunter2@db.internal/camaudit")
    shown = redact("no run 'x' in postgresql+psycopg://auditor:hunter2@db.internal/camaudit; did you mean y?")
    assert "hunter2" not in shown and "auditor:***@db.internal/camaudit" in shown


def test_drift_report_layout_turns_records_into_tables() -> None:
    report = {
        "run_a": "a1",
        "threshold": 0.5,
        "classes": [
            {"class": "circle", "shift": 0.25, "items": 10},
            {"class": "ring", "shift": 0.5, "moved": 3},
        ],
        "movers": [],
        "by_method": {"gradcam": {"mean": 0.1}, "cam": {"mean": 0.2}},
        "summary": {"moved": 7, "layers": ["l3", "l4"]},
    }
    view = layout(report)
    assert view.figures == [
        ("Run a", "a1"),
        ("Threshold", 0.5),
        ("Summary · Moved", 7),
        ("Summary · Layers", "l3, l4"),
    ]
    tables = {t.title: t for t in view.tables}
    assert tables["Classes"].columns == ["class", "shift", "items", "moved"]
    assert tables["Classes"].rows[1] == {"class": "ring", "shift": 0.5, "items": None, "moved": 3}
    assert tables["Movers"].rows == []
    assert [r["key"] for r in tables["By method"].rows] == ["gradcam", "cam"]


def test_access_log_hides_the_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s"',
        ("1.2.3.4", "GET", f"/?a=1&token={TOKEN}&b=2"),
        None,
    )
    assert RedactToken().filter(record)
    assert record.getMessage() == '1.2.3.4 - "GET /?a=1&token=***&b=2"'
