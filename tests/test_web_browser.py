"""``camaudit serve`` as people use it: a real server process driven by headless Chromium.

Chromium comes from the system (Debian's ``chromium`` package), never from a download at
test time. A missing browser fails the test with the install command: a skipped browser
test would pass with the UI broken.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from schema.db import session_scope
from schema.models import Heatmap, Item
from tests.plugins.services import wait_until
from tests.test_e2e_embedded import REPO, run_cli
from workers.synth import make_dataset

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CAMAUDIT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "browser-test-token-0123"
N_IMAGES = 16


@dataclass(frozen=True)
class Server:
    url: str
    db: str
    run_id: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("browser")
    manifest = make_dataset(root / "data", N_IMAGES, seed=21)
    db = f"sqlite:///{root / 'runs.db'}"
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
        "browser-check",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    port = free_port()
    env = {**os.environ, "CAMAUDIT_WEB_TOKEN": TOKEN}
    log = (root / "serve.log").open("w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "serve", "--port", str(port), "--database-url", db],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: serving.poll() is None and answers(f"{url}/healthz"),
            timeout=60,
            what=f"camaudit serve on {url} (log: {root / 'serve.log'})",
        )
        yield Server(url=url, db=db, run_id=run_id)
    finally:
        serving.terminate()
        try:
            serving.wait(timeout=10)
        except subprocess.TimeoutExpired:
            serving.kill()
            serving.wait()
        log.close()
    assert "token=***" in (root / "serve.log").read_text(), "the access log must hide the token"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the Python package 'playwright' is missing: pip install playwright (no browser download)"
        )
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
            "or point CAMAUDIT_TEST_CHROMIUM at a Chromium binary"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


ALL_IMAGES_LOADED = """() => {
  const images = Array.from(document.images);
  return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);
}"""


def load_every_image(page: Any) -> list[dict[str, Any]]:
    """Scroll each (lazy) image into view, wait until all have decoded, and return their sizes."""
    for image in page.locator("img").all():
        image.scroll_into_view_if_needed()
    page.wait_for_function(ALL_IMAGES_LOADED, timeout=30_000)
    return page.evaluate(
        "() => Array.from(document.images).map(i => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight}))"
    )


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_browse_runs_filter_by_class_and_open_an_item(server: Server, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    failed_requests: list[str] = []
    # Navigating away aborts the previous page's pending lazy images; anything else is a failure.
    page.on(
        "requestfailed",
        lambda r: r.failure != "net::ERR_ABORTED" and failed_requests.append(f"{r.failure} {r.url}"),
    )
    page.on("response", lambda r: r.status >= 400 and failed_requests.append(f"{r.status} {r.url}"))

    # Without the token the server refuses; ?token= once signs the browser in and leaves the URL.
    refused = page.goto(f"{server.url}/")
    assert refused is not None and refused.status == 401
    failed_requests.clear()
    page.goto(f"{server.url}/?token={TOKEN}")
    assert page.url == f"{server.url}/", "the token is removed from the address bar"
    row = page.locator(f'tr[data-run="{server.run_id}"]')
    assert row.count() == 1
    assert "finished" in row.inner_text()
    assert f"{N_IMAGES} done · 0 failed of {N_IMAGES}" in row.inner_text()
    assert "browser-check" in row.inner_text()
    screenshot(page, "web-runs.png")

    # Open the run: the gallery shows regions of the first class by default.
    row.locator(f'a[href="/runs/{server.run_id}"]').click()
    page.wait_for_url(f"**/runs/{server.run_id}")
    assert server.run_id in page.locator("h1").inner_text()
    assert page.locator(".card").count() > 0

    # Filter by class through the form, as a person would.
    page.select_option("#f-class", "square")
    page.click("#f-apply")
    page.wait_for_url("**class=square**")
    gallery = page.locator("#gallery .card")
    n_cards = gallery.count()
    assert n_cards > 0
    assert set(gallery.evaluate_all("cards => cards.map(c => c.dataset.class)")) == {"square"}
    scores = [float(s) for s in gallery.evaluate_all("cards => cards.map(c => c.dataset.score)")]
    assert scores == sorted(scores, reverse=True)
    assert "of class square by gradcam" in page.locator("#summary").inner_text()
    images = load_every_image(page)
    assert len(images) == 2 * n_cards, "each region shows its crop and its overlay"
    assert all(i["w"] > 0 and i["h"] > 0 for i in images)
    assert all(i["w"] <= 320 and i["h"] <= 320 for i in images if "overlay.jpg" in i["src"])
    screenshot(page, "web-run-square.png")

    # Open the best region's item: every map of the item, side by side, and its predictions.
    first_item = int(gallery.first.get_attribute("data-item") or 0)
    gallery.first.locator("a").first.click()
    page.wait_for_url(f"**/items/{first_item}")
    assert page.locator("h1").inner_text().startswith(f"Item {first_item}")
    with session_scope(server.db) as session:
        n_maps = session.execute(select(func.count()).where(Heatmap.item_id == first_item)).scalar_one()
        item = session.get(Item, first_item)
        assert item is not None
        width, height, n_predictions = item.width, item.height, len(item.predictions or [])
    assert page.locator(".card.map").count() == n_maps == 2
    assert page.locator("#predictions tbody tr").count() == n_predictions == 5
    images = load_every_image(page)
    overlays = [i for i in images if "overlay.jpg" in i["src"]]
    assert len(overlays) == n_maps
    assert (images[0]["w"], images[0]["h"]) == (width, height), "the source image at its own size"
    assert all(abs(i["w"] / i["h"] - width / height) < 0.02 for i in overlays), "overlays keep the aspect"
    screenshot(page, "web-item.png")

    assert failed_requests == [], failed_requests
    context.close()
