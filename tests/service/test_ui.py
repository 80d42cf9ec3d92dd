"""The web page ``/ui`` in a real headless Chromium against a real server process.

Debian's ``chromium`` (``apt-get install chromium``; .ci/run installs it) driven by Playwright
for Python, launched from ``/usr/bin/chromium`` (Playwright's own browser download is never
used). The page is loaded from the session's ``anomaly serve`` process on 127.0.0.1, a
handwritten digit is uploaded, and the numbers it shows must equal the API's for the same
file; a drawing on the canvas likewise. A screenshot is saved to ``tests/_artifacts/ui.png``
(or ``$ANOMALY_TEST_ARTIFACTS/ui.png``) and its path printed.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import REPO

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("ANOMALY_TEST_ARTIFACTS", REPO / "tests" / "_artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_ui_route_without_a_browser(client):
    """The page is served, needs no external resource, and ``/`` leads to it."""
    res = client.get("/ui")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    page = res.text
    assert "<canvas" in page and "/v1/models" in page and "/metrics" in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    res = client.get("/", follow_redirects=False)
    assert res.status_code == 307 and res.headers["location"] == "/ui"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run "
                    "installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    problems: list[str] = []
    requests: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
          if msg.type == "error" else None)
    pg.on("request", lambda req: requests.append(req.url))
    pg.goto(server.url + "/ui")
    pg.wait_for_function("document.querySelector('#model').value === 'blobs'")
    yield pg
    context.close()
    assert not problems, problems
    # Only the public API of the same server (plus the page's own data: and blob: URLs).
    foreign = [u for u in requests if not u.startswith((server.url + "/", "data:", "blob:"))]
    assert not foreign, foreign


def digit_png(tmp_path: Path) -> Path:
    """A real handwritten digit (scikit-learn's 8x8 digits, a '3'), as a 56x56 PNG."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    img = digits.images[list(digits.target).index(3)] / 16.0
    u8 = np.rint(img * 255).astype(np.uint8)
    path = tmp_path / "digit-3.png"
    Image.fromarray(u8, mode="L").resize((56, 56), Image.Resampling.BICUBIC).save(path)
    return path


def shown(page) -> dict:
    def attr(sel):
        return page.get_attribute(sel, "data-value")

    return {"score_text": page.inner_text("#score"), "score": float(attr("#score")),
            "normalized": float(attr("#normalized")), "threshold": float(attr("#threshold")),
            "is_anomaly": attr("#decision") == "true", "decision": page.inner_text("#decision"),
            "operating_point": page.inner_text("#op-used")}


def assert_matches_api(ui: dict, api: dict) -> None:
    r = api["results"][0]
    assert ui["score"] == r["score"]  # the very number the API returned
    assert float(ui["score_text"]) == pytest.approx(r["score"], rel=1e-5)  # 6 digits shown
    assert ui["normalized"] == r["normalized_score"]
    assert ui["threshold"] == api["threshold"]
    assert ui["operating_point"] == api["operating_point"]
    assert ui["is_anomaly"] == r["is_anomaly"]
    assert ui["decision"] == ("anomaly" if r["is_anomaly"] else "normal")


IMAGES_LOADED = """() => ['#img-input', '#img-recon', '#img-error'].every(
    (s) => document.querySelector(s).complete && document.querySelector(s).naturalWidth > 0)"""


def test_upload_a_digit_shows_the_api_score(page, server, tmp_path):
    path = digit_png(tmp_path)
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.body.dataset.scored === '1'")
    ui = shown(page)
    api = httpx.post(f"{server.url}/v1/models/blobs/score",
                     files=[("images", (path.name, path.read_bytes(), "image/png"))],
                     timeout=30).json()
    assert_matches_api(ui, api)
    page.wait_for_function(IMAGES_LOADED)
    assert page.evaluate("document.querySelector('#img-recon').naturalWidth") == 28
    assert page.evaluate("document.querySelector('#img-error').naturalWidth") == 28
    # The live view polls /metrics every 3 s and lists the model's traffic.
    page.wait_for_function("document.querySelector('#live tbody').textContent"
                           ".includes('blobs / v1')", timeout=15000)
    # A second operating point, chosen in the page, is the one the API applies.
    page.select_option("#op", "fpr@10%")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.body.dataset.scored === '2'")
    ui = shown(page)
    api = httpx.post(f"{server.url}/v1/models/blobs/score?operating_point=fpr%4010%25",
                     files=[("images", (path.name, path.read_bytes(), "image/png"))],
                     timeout=30).json()
    assert api["operating_point"] == "fpr@10%"
    assert_matches_api(ui, api)
    shot = artifacts_dir() / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and img.size[1] >= 600
    print(f"\nUI screenshot: {shot}")


def test_draw_a_digit_on_the_canvas(page, server):
    box = page.locator("#pad").bounding_box()
    x0, y0 = box["x"], box["y"]
    # A '7': a bar across the top and a diagonal stroke down (drawn large, like a finger would).
    page.mouse.move(x0 + 70, y0 + 60)
    page.mouse.down()
    for x in range(70, 211, 10):
        page.mouse.move(x0 + x, y0 + 60)
    for t in range(1, 16):
        page.mouse.move(x0 + 210 - 6 * t, y0 + 60 + 13 * t)
    page.mouse.up()  # lifting the pen scores the drawing
    page.wait_for_function("document.body.dataset.scored === '1'")
    pixels = np.array(page.evaluate("state.lastInput"))
    assert pixels.shape == (28, 28) and pixels.dtype.kind == "i"
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.max() > 200
    # MNIST-like: the ink fits 20x20 and its centre of mass is at the centre.
    rows, cols = np.nonzero(pixels)
    assert rows.max() - rows.min() < 21 and cols.max() - cols.min() < 21
    yy, xx = np.mgrid[0:28, 0:28]
    com = (np.sum(yy * pixels) / pixels.sum(), np.sum(xx * pixels) / pixels.sum())
    assert abs(com[0] - 13.5) < 1.5 and abs(com[1] - 13.5) < 1.5
    api = httpx.post(f"{server.url}/v1/models/blobs/score",
                     json={"images": [pixels.tolist()]}, timeout=30).json()
    assert_matches_api(shown(page), api)
    page.wait_for_function(IMAGES_LOADED)
    buf = page.screenshot(full_page=False)
    Image.open(io.BytesIO(buf)).verify()
