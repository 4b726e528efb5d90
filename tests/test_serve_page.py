"""The page of `edgetl serve` in a real browser: Playwright drives Debian's chromium against a real
`python -m edgetl serve` subprocess on a tiny bundle (tests/bundle_factory.py).

Skipped when playwright or /usr/bin/chromium is missing, unless EDGETL_REQUIRE_BROWSER=1 (CI sets it),
where a missing browser fails instead. The bundle's colour head calls its third class by an HTML
string: the page must show it as text (labels are user data)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import edgetl
from edgetl.core.bundle import read_manifest, write_manifest
from tests.bundle_factory import build_bundle, write_colour_images

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
TOKEN = "page-test-token-0123456789abcdef"
# The blue class's label: markup that would run script if the page ever parsed labels as HTML.
HTML_LABEL = '<img src=x onerror="window.__xss=1">'
LATENCY_KEYS = ("decode", "preprocess", "queue", "inference", "total", "round trip")


def _require_browser():
    """The sync Playwright API, or skip (fail when EDGETL_REQUIRE_BROWSER=1) with the reason."""
    reason = None
    try:
        from playwright import sync_api
    except ImportError:
        sync_api, reason = None, "playwright is not installed (pip install 'playwright>=1.45')"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("EDGETL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"EDGETL_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = TOKEN) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _require_serve_extra() -> None:
    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"the serve extra is not installed ({', '.join(missing)}): pip install 'edgetl[serve]'"
        if os.environ.get("EDGETL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"EDGETL_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `edgetl serve` on a free loopback port: yields (origin, {colour: image path})."""
    _require_browser()
    _require_serve_extra()
    tmp = tmp_path_factory.mktemp("serve_page")
    bundle = build_bundle(tmp / "bundle", heads=("colour", "brightness"), precisions=("fp32",))
    manifest = read_manifest(bundle)
    manifest["heads"]["colour"]["labels"] = ["red", "green", HTML_LABEL]
    write_manifest(bundle, manifest)
    images = {colour: path for path, colour in write_colour_images(tmp / "images").items()}
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "edgetl", "serve", str(bundle), "--port", str(port), "--token-file", str(token_file)]
    log = (tmp / "server.log").open("w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"edgetl serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if _get(origin + "/v1/health") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"edgetl serve not ready after 30 s:\n{log.read()[-3000:]}")
            time.sleep(0.1)
        yield origin, images
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    # A fake camera (a generated test pattern) granted without a prompt, for the live-mode test.
    with chromium("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream") as browser:
        yield browser


@contextlib.contextmanager
def chromium(*args: str):
    """Debian's chromium, headless, through Playwright (skips or fails as :func:`_require_browser`)."""
    sync_api = _require_browser()
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*sandbox, *args])
        try:
            yield browser
        finally:
            browser.close()


class Watched:
    """A page with its requests, console errors, page errors and CSP violations recorded."""

    def __init__(self, browser, origin: str, init_script: str = "") -> None:
        self.origin = origin
        self.context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone's screen
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.responses: list[tuple[str, int]] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: self.responses.append((r.url, r.status)))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        # Injected by the browser, not by the page, so the page's CSP does not apply to it.
        self.page.add_init_script(
            "window.__csp = [];"
            "document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));" + init_script
        )
        self.page.set_default_timeout(10_000)
        self.page.goto(origin + "/")

    def first_label(self) -> str:
        return self.page.locator("#result li").first.locator(".label").text_content()

    def wait_first_label(self, expected: str) -> None:
        self.page.wait_for_function(
            "want => { const e = document.querySelector('#result li .label'); return e && e.textContent === want; }",
            arg=expected,
        )

    def check_clean(self) -> None:
        """Nothing left for another origin; no CSP violation, script error or unexpected console error."""
        # blob: URLs of this origin (the preview) and data: URLs never touch the network.
        local = (self.origin + "/", f"blob:{self.origin}/", "data:")
        foreign = [u for u in self.requests if not (u == self.origin or u.startswith(local))]
        assert not foreign, f"requests to another origin: {foreign}"
        assert self.page.evaluate("window.__csp") == []
        assert not self.page_errors, self.page_errors
        # The page's own files all load; Chromium logs each non-2xx answer as "Failed to load resource",
        # which the API's expected 401s are.
        assert [(u, st) for u, st in self.responses if "/v1/" not in u and st != 200] == []
        unexpected = [t for t in self.console_errors if "Failed to load resource" not in t]
        assert not unexpected, unexpected
        assert not [t for t in self.console_errors if "Content Security Policy" in t]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser, server):
    origin, _ = server
    w = Watched(browser, origin)
    yield w
    w.close()


def test_page_classifies_an_upload_and_reports_a_wrong_token(watched, server):
    _, images = server
    page = watched.page
    page.fill("#token", TOKEN)
    # The model summary and the head selector come from GET /v1/model once the token is typed.
    page.wait_for_function("() => document.querySelectorAll('#head option').length === 3")
    assert [o.get_attribute("value") for o in page.locator("#head option").all()] == ["colour", "brightness", "all"]
    assert page.input_value("#head") == "colour"
    backbone, variant, runtime, version = page.locator("#model dd").all_text_contents()
    assert (backbone, variant, runtime) == ("tiny_onnx", "onnx-fp32", "onnxruntime")
    assert re.fullmatch(r"[0-9a-f]{12}", version), version
    assert page.evaluate("sessionStorage.getItem('edgetl.serve.token')") == TOKEN
    page.reload()  # the token survives a reload (sessionStorage), and the summary loads with it
    assert page.input_value("#token") == TOKEN
    page.wait_for_function("() => document.querySelectorAll('#model dd').length === 4")

    page.fill("#topk", "2")
    page.set_input_files("#file", images["red"])
    watched.wait_first_label("red")
    assert page.locator("#result li").count() == 2
    assert re.fullmatch(r"\d+\.\d%", page.locator("#result li .score").first.text_content())
    assert page.is_visible("#preview") and page.get_attribute("#preview", "src").startswith("blob:")
    latency = page.text_content("#latency")
    for key in LATENCY_KEYS:
        assert re.search(rf"{key}[^0-9]*\d+(\.\d+)? ms", latency), (key, latency)
    assert page.is_hidden("#error")
    page.fill("#topk", "3")
    page.press("#topk", "Enter")  # a new top-k sends the last image again
    page.wait_for_function("() => document.querySelectorAll('#result li').length === 3")

    page.fill("#token", "wrong-token-wrong-token")
    page.set_input_files("#file", images["green"])
    page.wait_for_function("() => document.querySelector('#token-status').textContent !== ''")
    assert page.text_content("#token-status") == "token required or wrong"
    assert page.is_visible("#error") and page.text_content("#error").startswith("HTTP 401")
    assert watched.first_label() == "red"  # the last good answer stays
    watched.check_clean()


def test_page_shows_an_html_label_as_text(watched, server):
    _, images = server
    page = watched.page
    page.fill("#token", TOKEN)
    page.wait_for_function("() => document.querySelectorAll('#head option').length === 3")
    page.select_option("#head", "all")
    page.set_input_files("#file", images["blue"])
    watched.wait_first_label(HTML_LABEL)
    assert page.locator("#result img, #more-heads img").count() == 0
    assert page.evaluate("window.__xss") is None
    # head=all: one list per head, the second head under its own title.
    assert "head: brightness" in page.text_content("#more-heads")
    assert page.locator("#more-heads li").count() == 2
    watched.check_clean()


# The answers of /v1/predict as a head with stored statistics gives them for an image unlike its
# training images (the flag itself: tests/test_serve.py, tests/test_learn.py).
UNFAMILIAR_FETCH = """
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await realFetch(...args);
  if (!String(args[0]).includes("/v1/predict") || !response.ok) return response;
  const body = await response.json();
  for (const r of body.records || []) { r.unfamiliar = r.head === "colour"; r.unfamiliar_score = 3.5; }
  return new Response(JSON.stringify(body), {status: response.status, headers: response.headers});
};
"""


def test_page_says_when_an_image_is_unfamiliar(browser, server):
    origin, images = server
    w = Watched(browser, origin, UNFAMILIAR_FETCH)
    try:
        page = w.page
        page.fill("#token", TOKEN)
        page.wait_for_function("() => document.querySelectorAll('#head option').length === 3")
        page.select_option("#head", "all")
        page.set_input_files("#file", images["red"])
        w.wait_first_label("red")
        assert page.text_content("#result-head") == "head: colour · unfamiliar: unlike the images this head learned"
        assert page.text_content("#more-heads h3") == "head: brightness"  # a familiar image says nothing
        w.check_clean()
    finally:
        w.close()


# Wraps the page's fetch for /v1/predict: each answer arrives 150 ms late (slower than the 20 frames/s
# asked for, so a page that queued frames would overlap requests), call 3 is answered by a made-up
# 503 (Retry-After: 1) and call 8 by a made-up 422. Records the start times and the most in flight.
LIVE_FETCH = """
window.__predict = {now: 0, max: 0, starts: []};
const realFetch = window.fetch;
window.fetch = async function (url, init) {
  if (!String(url).includes('/v1/predict')) return realFetch(url, init);
  const p = window.__predict;
  p.now += 1; p.max = Math.max(p.max, p.now); p.starts.push(performance.now());
  const n = p.starts.length;
  try {
    const fake = (status, error, headers) => new Response(JSON.stringify({error: error, status: status}),
      {status: status, headers: Object.assign({'Content-Type': 'application/json'}, headers)});
    if (n === 3) return fake(503, 'queue full', {'Retry-After': '1'});
    if (n === 8) return fake(422, 'not an image (made up by the test)', {});
    const resp = await realFetch(url, init);
    await new Promise(r => setTimeout(r, 150));
    return resp;
  } finally {
    p.now -= 1;
  }
};
"""


def test_page_live_camera_one_request_in_flight_backs_off_and_stops(browser, server):
    origin, _ = server
    watched = Watched(browser, origin, init_script=LIVE_FETCH)
    page = watched.page
    try:
        page.fill("#token", TOKEN)
        assert page.text_content("#camera-note").startswith("The camera stays in this browser")
        assert page.is_disabled("#live")
        page.click("#camera-start")  # chromium's fake camera, granted without a prompt
        page.wait_for_function("() => document.querySelector('#camera-start').textContent === 'Stop camera'")
        page.wait_for_function("() => document.querySelector('#video').videoWidth > 0")
        page.click("#camera-frame")  # call 1: a single frame
        page.wait_for_selector("#result li .label")
        page.fill("#live-rate", "20")
        page.check("#live")  # calls 2.. at most 20/s, one at a time
        page.wait_for_function("() => /server busy/.test(document.querySelector('#live-rate-achieved').textContent)")
        achieved = page.wait_for_function(
            "() => (/achieved (\\d+\\.\\d) frames\\/s/.exec(document.querySelector('#live-rate-achieved').textContent)"
            " || [])[1]"
        ).json_value()
        assert 0 < float(achieved) <= 1000 / 150, achieved  # answers take >= 150 ms each
        page.wait_for_function("() => !document.querySelector('#live').checked", timeout=15_000)  # the 422
        assert page.text_content("#error") == "HTTP 422: not an image (made up by the test)"
        page.wait_for_timeout(400)
        p = page.evaluate("window.__predict")
        assert len(p["starts"]) == 8, "live mode kept sending after the error"
        assert p["max"] == 1, p
        gaps = [b - a for a, b in zip(p["starts"][1:-1], p["starts"][2:], strict=True)]
        assert gaps[1] >= 950, f"no back-off after the 503 (Retry-After: 1): {gaps}"
        assert all(g >= 150 for g in gaps), gaps  # the next frame waits for the previous answer
        page.click("#camera-start")
        assert page.text_content("#camera-start") == "Start camera" and page.is_disabled("#live")
        watched.check_clean()
    finally:
        watched.close()


def test_page_says_when_the_camera_is_unavailable(browser, server):
    """Over plain http to another host the browser hides navigator.mediaDevices: the page says why."""
    origin, _ = server
    no_camera = "Object.defineProperty(navigator, 'mediaDevices', {value: undefined});"
    watched = Watched(browser, origin, init_script=no_camera)
    try:
        note = watched.page.text_content("#camera-note")
        assert "unavailable" in note and "https://" in note and "localhost" in note
        assert watched.page.is_disabled("#camera-start")
        watched.check_clean()
    finally:
        watched.close()


def test_page_assets_are_self_contained():
    """No CDN, no inline script or style, no inline handlers: the CSP (script-src/style-src 'self') holds."""
    static = Path(edgetl.__file__).parent / "device" / "serve" / "static"
    html = (static / "index.html").read_text()
    js = (static / "page.js").read_text()
    css = (static / "page.css").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/page.js" defer>']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+\s*=", html)
    assert all(u.startswith("/static/") or u == "data:," for u in re.findall(r'(?:src|href)="([^"]*)"', html))
    assert "@import" not in css and "url(" not in css
    assert all(u.startswith("/v1/") for u in re.findall(r'fetch\(\s*"([^"]*)"', js))
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js
    for element_id in ("token", "file", "head", "topk", "result", "latency", "error", "model", "camera-start", "live"):
        assert f'id="{element_id}"' in html, element_id
