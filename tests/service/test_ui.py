"""The web page ``/ui`` in a real headless Chromium against a real server process.

Debian's ``chromium`` (``apt-get install chromium``; .ci/run installs it) driven by Playwright
for Python, launched from ``/usr/bin/chromium`` (Playwright's own browser download is never
used). The page is loaded from the session's ``anomaly serve`` process on 127.0.0.1, a
handwritten digit is uploaded, and the numbers it shows must equal the API's for the same
file; a drawing on the canvas likewise. The layout is measured in the browser at a desktop
and a phone size against a server whose model has a realistically long name and version;
the input shape comes from the model's V2 metadata (other shapes are served by intercepting
that one response). Screenshots are saved to ``tests/_artifacts/`` (or
``$ANOMALY_TEST_ARTIFACTS``) and their paths printed.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import REPO, Server, blobs, save_version

TIMES = "\N{MULTIPLICATION SIGN}"  # the page writes sizes as 28 TIMES 28
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


def png_of(image: np.ndarray, path: Path) -> Path:
    """``image`` (float in [0, 1], ``(H, W)`` or ``(H, W, 3)``) written as a PNG."""
    Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


LIT_FRACTION = """() => {  // the fraction of the drawing pad's pixels that are not black
  const pad = document.querySelector('#pad');
  const d = pad.getContext('2d').getImageData(0, 0, pad.width, pad.height).data;
  let lit = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] > 30) lit++;
  return lit / (pad.width * pad.height);
}"""

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


def test_before_the_first_score_no_image_is_shown_and_the_shape_is_read(page, server):
    """No broken-image icons: the three figures stay hidden until they have an image. The
    input shape is the one the model's V2 metadata gives (28x28 grey here: drawing on)."""
    for sel in ("#img-input", "#img-recon", "#img-error"):
        assert page.locator(sel).is_hidden(), sel
        assert page.evaluate(f"document.querySelector('{sel}').hasAttribute('src')") is False
    page.wait_for_function("document.body.dataset.inputShape === '28x28x1'")
    assert page.locator("#pad").is_visible() and page.inner_text("#draw-note") == ""
    fetched = page.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
    assert f"{server.url}/v2/models/blobs/versions/v1" in fetched, fetched


def test_drawing_after_an_upload_starts_on_a_clean_pad(page, tmp_path):
    page.set_input_files("#file", str(digit_png(tmp_path)))
    page.wait_for_function("document.body.dataset.scored === '1'")
    page.wait_for_function(f"({LIT_FRACTION})() > 0.05")  # the upload, previewed on the pad
    for sel in ("#img-input", "#img-recon", "#img-error"):
        assert page.locator(sel).is_visible(), sel
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 30, box["y"] + 30)
    page.mouse.down()
    page.mouse.move(box["x"] + 40, box["y"] + 30)
    page.mouse.up()
    page.wait_for_function("document.body.dataset.scored === '2'")
    # Only the short stroke is left: a dot of radius 9 and a line 10 px long, 18 px wide.
    assert page.evaluate(f"({LIT_FRACTION})()") < 0.01
    pixels = np.array(page.evaluate("state.lastInput"))
    assert pixels.shape == (28, 28) and np.count_nonzero(pixels) < 28 * 28 // 2


# -- a model with a long name, at desktop and phone sizes ----------------------------------
LONG_NAME, LONG_VERSION = "mnist-0-conv-vae", "20261123T163000Z"


@pytest.fixture(scope="module")
def long_server(detector, tmp_path_factory):
    """A server whose one model has a name and version as long as `anomaly fit` writes."""
    root = tmp_path_factory.mktemp("long") / "models"
    save_version(detector, root, LONG_NAME, LONG_VERSION)
    with Server(root).serving() as srv:
        yield srv


def open_page(browser, url: str, width: int, height: int):
    """A new page at ``width`` x ``height`` on ``url``/ui; (context, page, problems)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
          if msg.type == "error" else None)
    pg.goto(url + "/ui")
    pg.wait_for_function("document.querySelector('#model').value !== ''")
    return context, pg, problems


LAYOUT = """() => {
  const W = window.innerWidth, out = { page: document.documentElement.scrollWidth, W,
                                       outside: [], cells: [] };
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width && r.height && (r.right > W + 0.5 || r.left < -0.5))
      out.outside.push(`${el.tagName}#${el.id}.${el.className}: ${r.left}-${r.right}`);
  }
  for (const el of document.querySelectorAll('th, td'))
    if (el.offsetWidth && el.scrollWidth > el.clientWidth + 1)
      out.cells.push(`${el.textContent}: ${el.scrollWidth} > ${el.clientWidth}`);
  const sel = document.querySelector('#model'), g = document.createElement('canvas').getContext('2d');
  g.font = getComputedStyle(sel).font;
  out.selectText = g.measureText(sel.selectedOptions[0].text).width;
  out.selectBox = sel.clientWidth;
  const bar = document.querySelector('#normalized-bar').getBoundingClientRect();
  const track = document.querySelector('#normalized-bar').parentElement.getBoundingClientRect();
  out.bar = { h: bar.height, w: bar.width, trackW: track.width };
  return out;
}"""


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)], ids=["1280x800", "390x844"])
def test_layout_fits_the_window(browser, long_server, tmp_path, width, height):
    """No horizontal scroll, nothing outside the window, every table cell's content inside
    its cell, the model's name whole in the dropdown, and the normalized-score bar drawn."""
    context, pg, problems = open_page(browser, long_server.url, width, height)
    try:
        normal = png_of(blobs(1, seed=5)[0], tmp_path / f"normal-image-{width}.png")
        pg.set_input_files("#file", str(normal))
        pg.wait_for_function("document.body.dataset.scored === '1'")
        pg.wait_for_function(IMAGES_LOADED)
        pg.wait_for_function(f"document.querySelector('#live tbody').textContent"
                             f".includes('{LONG_VERSION}')", timeout=15000)
        m = pg.evaluate(LAYOUT)
        shot = artifacts_dir() / f"ui-{width}x{height}.png"
        pg.screenshot(path=str(shot), full_page=True)
        print(f"\nUI screenshot: {shot}")
        assert m["page"] <= width, f"horizontal scroll: page {m['page']} px wide in {width}"
        assert not m["outside"], m["outside"]
        assert not m["cells"], m["cells"]
        assert m["selectText"] + 24 <= m["selectBox"], m  # 24 px: padding and the arrow
        normalized = float(pg.get_attribute("#normalized", "data-value"))
        assert normalized > 0.05  # a normal image: the bar has something to show
        assert m["bar"]["h"] >= 8, m["bar"]  # was 0 px: a tile's padding squeezed it
        assert m["bar"]["w"] == pytest.approx(normalized * m["bar"]["trackW"], abs=1.5)
    finally:
        context.close()
    assert not problems, problems


def drift_window(url: str, name: str, version: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "anomaly_score_drift_window_images"
                    and sample.labels.get("model") == name
                    and sample.labels.get("version") == version):
                return sample.value
    return 0.0


def test_live_histogram_to_scale_and_drift_only_over_enough_scores(browser, long_server):
    """Buckets (at calibration quantiles: uneven) are as wide as their score range and as
    high as their count per unit of score; KS is shown only over >= 200 scores."""
    context, pg, problems = open_page(browser, long_server.url, 1280, 800)
    score = f"{long_server.url}/v1/models/{LONG_NAME}/score"
    try:
        if drift_window(long_server.url, LONG_NAME, LONG_VERSION) < 200:
            httpx.post(score, json={"images": blobs(20, seed=21).tolist()}, timeout=30)
            pg.wait_for_function("document.querySelector('#live-chart-caption').textContent"
                                 ".includes('not shown until 200 scores')", timeout=15000)
            assert "KS 0" not in pg.inner_text("#live-chart-caption")
        r = httpx.post(score, json={"images": blobs(220, seed=22).tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        pg.wait_for_function("/drift KS [0-9.]+ over the last [0-9]+ scores/"
                             ".test(document.querySelector('#live-chart-caption').textContent)",
                             timeout=15000)
        bars = pg.evaluate("state.liveBars")
    finally:
        context.close()
    assert not problems, problems
    bounded = [b for b in bars if not b.get("open")]
    assert len(bounded) >= 3 and sum(b["count"] for b in bars) >= 220
    spans = [b["hi"] - b["lo"] for b in bounded]
    assert max(spans) > 2 * min(spans), spans  # uneven buckets, or the test shows nothing
    px_per_score = [b["w"] / (b["hi"] - b["lo"]) for b in bounded]
    assert max(px_per_score) == pytest.approx(min(px_per_score), rel=1e-6)
    for left, right in itertools.pairwise(bounded):
        assert right["x"] == pytest.approx(left["x"] + left["w"], abs=1e-6)  # no gaps
    density = [b["count"] / (b["hi"] - b["lo"]) for b in bounded]
    tallest = max(density)
    for b, d in zip(bounded, density, strict=True):
        assert b["h"] == pytest.approx(bounded[density.index(tallest)]["h"] * d / tallest,
                                       abs=1e-6)


@pytest.mark.parametrize("shape, seen, drawing", [
    ([-1, 64, 64, 3], "64x64x3", False),
    ([-1, 32, 48], "32x48x1", False),
    ([-1, 784], "28x28x1", True),
    (None, "unknown", False),  # no V2 metadata (404): upload only
], ids=["64x64-colour", "32x48-grey", "784-flat", "no-metadata"])
def test_input_shape_comes_from_the_v2_metadata(browser, server, tmp_path, shape, seen, drawing):
    """The served model is 28x28; other shapes are tried by changing only the V2 metadata
    response the page reads. Drawing is offered for 28x28 grey models only; an upload of
    the model's size is scored whatever it is (the service resizes)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def metadata(route):
        if shape is None:
            route.fulfill(status=404, json={"error": "not found"})
            return
        body = route.fetch().json()
        body["inputs"][0]["shape"] = shape
        route.fulfill(json=body)

    context.route("**/v2/models/blobs/versions/v1", metadata)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        pg.goto(server.url + "/ui")
        pg.wait_for_function("document.querySelector('#model').value === 'blobs'")
        pg.wait_for_function(f"document.body.dataset.inputShape === '{seen}'")
        assert pg.locator("#pad").is_visible() is drawing
        note = pg.inner_text("#draw-note")
        if drawing:
            assert note == ""
        else:
            assert f"28{TIMES}28 grey" in note and "Upload" in note, note
        if shape and len(shape) >= 3:
            h, w = shape[1], shape[2]
            assert f"{w}{TIMES}{h}" in note, note
            rng = np.random.default_rng(3)
            img = rng.uniform(0, 1, (h, w, 3) if shape[-1] == 3 else (h, w))
            pg.set_input_files("#file", str(png_of(img, tmp_path / f"in-{h}x{w}.png")))
            pg.wait_for_function("document.body.dataset.scored === '1'")
            pg.wait_for_function(IMAGES_LOADED)
            assert pg.inner_text("#error") == ""
    finally:
        context.close()
    assert not errors, errors


def test_an_unanswered_metadata_request_is_asked_again(browser, server):
    """A failed metadata request (e.g. before the API key is typed) is not remembered: the
    next model list (typing a key reloads it) asks again and gets the shape."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    calls = []

    def metadata(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(status=401, json={"error": {"message": "unauthorized"}})
        else:
            route.continue_()

    context.route("**/v2/models/blobs/versions/v1", metadata)
    pg = context.new_page()
    try:
        pg.goto(server.url + "/ui")
        pg.wait_for_function("document.body.dataset.inputShape === 'unknown'")
        assert pg.locator("#pad").is_hidden()
        pg.click("summary")  # the API key field is folded away
        pg.fill("#apikey", "any")  # the server wants none: it is ignored
        pg.dispatch_event("#apikey", "change")
        pg.wait_for_function("document.body.dataset.inputShape === '28x28x1'")
        assert pg.locator("#pad").is_visible() and len(calls) == 2
    finally:
        context.close()
