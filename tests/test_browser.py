"""report.html as a person sees it: opened in headless Chromium, driven over the DevTools protocol.

Checks: the summary table's numbers equal summary.json's; every image (the PNG and each inline SVG, drawn
onto a canvas) decodes and is not blank; no console errors; an answer holding `<script>` and
`<img src=x onerror=...>` is shown as text and runs nothing (the payload would set document.title and a
global). The browser's own rendering is saved as a screenshot: to $ALIGNPIPE_SCREENSHOT when set
(docs/report-screenshot.png for the README; of the real run when $ALIGNPIPE_REPORT_RUN is set too).

Chromium is the Debian package `chromium` (.ci/install-chromium installs it); where it is absent the tests
are skipped, saying so. $ALIGNPIPE_REPORT_RUN=RUN also checks the report of a real run folder (e.g. runs/demo).
The client speaks CDP over --remote-debugging-pipe (fds 3 and 4), so no port is opened.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import ok
from report_fixtures import make_run

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars"]


def chromium() -> str | None:
    for name in (os.environ.get("ALIGNPIPE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Headless Chromium and a minimal CDP client: commands by id, events collected per session."""

    def __init__(self, exe: str, profile: Path):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child, from_child)]
        for fd in (to_child, from_child):
            os.close(fd)

        def child_fds():  # the pipe's ends become the child's fds 3 and 4 (inheritable: dup2's default)
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=child_fds, close_fds=False,  # noqa: PLW1509
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in high:
            os.close(fd)
        self.next_id, self.replies, self.events = 0, {}, []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                with self.cond:
                    self.cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self.cond:
                    (self.replies.__setitem__(msg["id"], msg) if "id" in msg else self.events.append(msg))
                    self.cond.notify_all()

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.replies or self.proc.poll() is not None, timeout):
                raise TimeoutError(method)
        reply = self.replies.pop(mid, None)
        if reply is None or "error" in reply:
            raise RuntimeError(f"{method}: {reply}")
        return reply["result"]

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict:
        def found():
            return next((e for e in self.events if e["method"] == method and e.get("sessionId") == session), None)

        with self.cond:
            if not self.cond.wait_for(found, timeout):
                raise TimeoutError(method)
            return found()

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)


class Page:
    """One tab showing `url`, loaded; `js(expr)` evaluates in it (awaiting promises) and returns the value."""

    def __init__(self, browser: Browser, url: str, width: int = 1280, height: int = 1800):
        self.b = browser
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        self.s = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", self.s)
        browser.send("Emulation.setDeviceMetricsOverride", self.s, width=width, height=height,
                     deviceScaleFactor=1, mobile=False)
        browser.send("Page.navigate", self.s, url=url)
        browser.wait_event("Page.loadEventFired", self.s)

    def js(self, expression: str):
        r = self.b.send("Runtime.evaluate", self.s, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def errors(self) -> list[dict]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations among them)."""
        out = []
        for e in self.b.events:
            if e.get("sessionId") != self.s:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown" or (
                    e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert")) or (
                    e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error"):
                out.append(e)
        return out

    def screenshot(self) -> bytes:
        return base64.b64decode(self.b.send("Page.captureScreenshot", self.s, format="png")["data"])


PIXELS = """(async () => {
  const stats = (draw, w, h) => { const c = document.createElement('canvas'); c.width = w; c.height = h;
    const x = c.getContext('2d'); x.fillStyle = '#fff'; x.fillRect(0, 0, w, h); draw(x);
    const d = x.getImageData(0, 0, w, h).data; let s = 0, s2 = 0, n = 0;
    for (let i = 0; i < d.length; i += 4) { const v = (d[i] + d[i + 1] + d[i + 2]) / 3; s += v; s2 += v * v; n++; }
    return s2 / n - (s / n) ** 2; };
  const load = src => new Promise((ok, bad) => { const i = new Image(); i.onload = () => ok(i);
    i.onerror = () => bad(new Error('undecodable ' + src.slice(0, 40))); i.src = src; });
  const out = [];
  for (const img of document.images) {
    await img.decode().catch(() => null);
    out.push({what: 'img', w: img.naturalWidth, h: img.naturalHeight,
              variance: img.naturalWidth ? stats(x => x.drawImage(img, 0, 0), img.naturalWidth, img.naturalHeight) : 0});
  }
  for (const svg of document.querySelectorAll('svg')) {
    const src = 'data:image/svg+xml;base64,' + btoa(unescape(encodeURIComponent(new XMLSerializer().serializeToString(svg))));
    const img = await load(src);
    out.push({what: 'svg ' + (svg.querySelector('title') || {}).textContent, w: img.naturalWidth, h: img.naturalHeight,
              variance: stats(x => x.drawImage(img, 0, 0), img.naturalWidth, img.naturalHeight)});
  }
  return out;
})()"""

TABLE = """[...document.querySelectorAll('#summary tbody tr')].map(tr => Object.fromEntries(
  [...tr.cells].map(td => [td.dataset.key, {value: JSON.parse(td.dataset.value), text: td.textContent}])))"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium, or run .ci/install-chromium); "
                    "the HTML report cannot be checked in a browser here")
    b = Browser(exe, tmp_path_factory.mktemp("chromium-profile"))
    try:
        b.send("Browser.getVersion", timeout=120)
    except (RuntimeError, TimeoutError, OSError) as e:
        b.close()
        pytest.skip(f"Chromium at {exe} does not start headless here: {e}")
    yield b
    b.close()


def _check(page: Page, summary: list[dict]) -> None:
    table = page.js(TABLE)
    assert len(table) == len(summary)
    for shown, want in zip(table, summary):
        for key, value in want.items():
            assert shown[key]["value"] == value, (key, shown[key], value)
            if isinstance(value, float):  # the visible text is the number, to 4 significant digits
                assert float(shown[key]["text"]) == pytest.approx(value, rel=1e-3, abs=1e-12), (key, shown[key])
            elif value is not None:
                assert shown[key]["text"] == str(value)
            else:
                assert shown[key]["text"] == ""
    images = page.js(PIXELS)
    assert any(i["what"] == "img" for i in images) and sum(i["what"].startswith("svg") for i in images) >= 3
    for i in images:
        assert i["w"] > 0 and i["h"] > 0 and i["variance"] > 0, i
    assert page.errors() == [], page.errors()


def _save(png: bytes, tmp_path: Path, publish: bool = True) -> None:
    from io import BytesIO

    from PIL import Image, ImageStat

    img = Image.open(BytesIO(png)).convert("L")
    assert img.size[0] >= 1000 and ImageStat.Stat(img).var[0] > 0  # a rendered page, not a blank one
    (tmp_path / "screenshot.png").write_bytes(png)
    if publish and os.environ.get("ALIGNPIPE_SCREENSHOT"):
        Path(os.environ["ALIGNPIPE_SCREENSHOT"]).write_bytes(png)


def test_report_in_browser_numbers_images_console_and_escaping(browser, tmp_path):
    run = make_run(tmp_path / "run", iters=2, prompts=6, payload=True, accuracy=True)
    ok("report", run)
    html = run / "report" / "report.html"
    page = Page(browser, html.as_uri())
    summary = json.loads((run / "report" / "summary.json").read_text())
    _check(page, summary)
    assert "accuracy_vs_0" in page.js(TABLE)[1]  # an extra metric column of an evaluation stage
    # the payload: shown as text in each policy's column, and nothing of it ran
    assert page.js("document.title") == "alignpipe report: run"
    assert page.js("typeof window.__pwned") == "undefined"
    assert page.js("document.querySelectorAll('script').length") == 0
    assert page.js("[...document.images].filter(i => i.getAttribute('src') === 'x').length") == 0
    shown = page.js("[...document.querySelectorAll('.answers .answer')].map(d => d.textContent)")
    assert sum('<script>document.title="pwned"' in t and "<img src=x onerror=" in t for t in shown) == 3
    assert page.js("document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]').content").startswith(
        "default-src 'none'")
    time.sleep(0.3)  # a late error (an image failing, a blocked script) would show up now
    assert page.errors() == []
    _save(page.screenshot(), tmp_path, publish=not os.environ.get("ALIGNPIPE_REPORT_RUN"))


def test_report_of_a_real_run_in_browser(browser, tmp_path):
    """$ALIGNPIPE_REPORT_RUN=runs/demo (after `make demo`): the same checks on a real run's report."""
    run = os.environ.get("ALIGNPIPE_REPORT_RUN")
    if not run:
        pytest.skip("set ALIGNPIPE_REPORT_RUN=RUN to check the report of a real run (e.g. runs/demo)")
    out = tmp_path / "report"
    ok("report", run, "--out", out)
    page = Page(browser, (out / "report.html").as_uri())
    _check(page, json.loads((out / "summary.json").read_text()))
    _save(page.screenshot(), tmp_path)
