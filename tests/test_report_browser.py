"""The HTML report in a real browser: headless Chromium over the DevTools protocol.

Checks what a person would see: no console errors, the verdict on the first screen, every finding rendered, the
charts drawn (the loss chart annotated in a screenshot), a layout that holds from 800 to 1400 px (nothing scrolls
sideways, the timeline's summary keeps its width, long run names wrap at their parts), a run's charts stacked on
one plot area, hover values, drag to zoom every chart of the run, double-click to reset, and the report's body
working inside a host page twice (a notebook). Set ``AUTOPSY_SCREENSHOT_DIR`` to keep screenshots. Skips where
Chromium is absent (CI installs it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from autopsy.findings import Report
from autopsy.report import render
from autopsy.report.html import render_html, render_html_body
from autopsy.report.plots import run_specs
from helpers.browser import CHROMIUM, FLAGS, _Cdp, _errors, _WebSocket, open_page
from helpers.procs import stop
from helpers.report import synthetic_report, synthetic_run

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

KEEP = os.environ.get("AUTOPSY_SCREENSHOT_DIR")
LONG_NAMES = ("Dec07_12-38-05_autodl-container-257040b67c-0bc917ee", "sweep/lr-3e-4_bs-512_warmup-0.1/seed-1234",
              "run_with_a_very_long_name_that_has_no_dashes_at_all_but_underscores_everywhere")


class Browser:
    """One headless Chromium for a module: load pages at a width, evaluate, move the mouse, take screenshots."""

    def __enter__(self) -> Browser:
        self.profile = tempfile.TemporaryDirectory(prefix="autopsy-chromium-", ignore_cleanup_errors=True)
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile.name}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, end = Path(self.profile.name) / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                    page = next(t for t in json.load(r) if t.get("type") == "page")
                self.ws = _WebSocket(page["webSocketDebuggerUrl"])
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        self.cdp = _Cdp(self.ws)
        for domain in ("Runtime", "Log", "Page"):
            self.cdp.call(f"{domain}.enable")
        return self

    def __exit__(self, *exc: object) -> None:
        self.ws.close()
        stop(self.proc)
        self.profile.cleanup()

    def load(self, path: Path, width: int, height: int = 900) -> list[str]:
        """Open ``path`` at ``width`` x ``height`` CSS px; the console errors of the load."""
        self.cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        self.cdp.events.clear()
        self.cdp.call("Page.navigate", url=path.resolve().as_uri())
        self.cdp.wait_event("Page.loadEventFired")
        self.js("0")
        return _errors(self.cdp.events)

    def js(self, expr: str, *, wait: bool = False):
        out = self.cdp.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=wait)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def mouse(self, kind: str, x: float, y: float, **kw) -> None:
        self.cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **kw)

    def screenshot(self, *, full: bool = False) -> bytes:
        kw = {}
        if full:
            size = self.cdp.call("Page.getLayoutMetrics")["cssContentSize"]
            kw = {"captureBeyondViewport": True,
                  "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}
        return base64.b64decode(self.cdp.call("Page.captureScreenshot", format="png", **kw)["data"])

    def charts(self) -> list[dict]:
        """Every chart: its run group, plot area (page coordinates) and x domain."""
        return self.js("""[...document.querySelectorAll('figure.ac-fig')].map(f => {
            const r = f.querySelector('rect.ac-plot').getBoundingClientRect();
            return {name: f.dataset.plot, group: f.dataset.group, x: r.left, w: r.width, top: r.top + scrollY,
                    h: r.height, x0: +f.dataset.x0, x1: +f.dataset.x1, static: !!f.querySelector('.ac-static')}; })""")

    def at(self, chart: dict, step: float) -> tuple[float, float]:
        """Viewport coordinates of ``step`` at mid-height of ``chart`` (scrolled into view)."""
        self.js(f"window.scrollTo(0, {max(chart['top'] - 150, 0)})")
        top = chart["top"] - self.js("scrollY")
        return chart["x"] + (step - chart["x0"]) / (chart["x1"] - chart["x0"]) * chart["w"], top + chart["h"] / 2


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def _keep(name: str, data: bytes) -> None:
    if KEEP:
        Path(KEEP).mkdir(parents=True, exist_ok=True)
        (Path(KEEP) / name).write_bytes(data)


@pytest.fixture(scope="module")
def nan_page(nan_run, tmp_path_factory):
    from autopsy.analysis import analyze

    report = analyze(nan_run)
    path = tmp_path_factory.mktemp("html") / "nan-at-31.html"
    path.write_text(render(report, "html"), encoding="utf-8")
    seen = open_page(path)
    _keep("nan-at-31.png", seen["screenshot"])
    if KEEP:
        shutil.copy(path, Path(KEEP) / "nan-at-31.html")
    return report, seen, path


@pytest.fixture(scope="module")
def pages(nan_page, tmp_path_factory):
    """The one-run page, and a page of three runs with long names (a comparison table)."""
    out = tmp_path_factory.mktemp("pages")
    many = out / "many.html"
    report = Report(runs=[synthetic_run(n, failed=i != 1) for i, n in enumerate(LONG_NAMES)], version="t")
    many.write_text(render_html(report), encoding="utf-8")
    return {"one": nan_page[2], "many": many}


def test_no_console_errors_and_nothing_fetched(nan_page):
    _, seen, _ = nan_page
    assert seen["errors"] == []
    assert all(link.startswith(("data:", "#")) for link in seen["probe"]["links"])


def test_verdict_on_the_first_screen(nan_page):
    _, seen, _ = nan_page
    verdict = seen["probe"]["verdicts"][0]
    assert verdict["visible"] and verdict["top"] < 400  # a laptop's first screen shows it whole
    assert verdict["top"] + verdict["h"] < 800
    text = verdict["text"]
    assert "FAILED" in text and "nan_grad_norm" in text and "step 31" in text and "checkpoint-30" in text


def test_every_finding_visible(nan_page):
    report, seen, _ = nan_page
    shown = seen["probe"]["findings"]
    assert sorted(f["signature"] for f in shown) == sorted(f.signature for f in report.runs[0].findings)
    assert all(f["visible"] and f["h"] > 20 for f in shown)


def test_charts_are_drawn_and_the_loss_chart_is_annotated_in_the_screenshot(nan_page, browser):
    image = pytest.importorskip("PIL.Image")
    report, _, path = nan_page
    assert browser.load(path, 1280, 2000) == []
    charts = {c["name"]: c for c in browser.charts()}
    assert list(charts) == [s.name for s in run_specs(report.runs[0]) if s.drawable] and "loss" in charts
    for c in charts.values():
        assert c["w"] > 400 and c["h"] > 100 and not c["static"]  # drawn by the script, the static SVG gone
    loss = charts["loss"]
    browser.js("window.scrollTo(0, 0)")
    shot = image.open(io.BytesIO(browser.screenshot())).convert("RGB")
    _keep("nan-at-31-charts.png", browser.screenshot(full=True))
    assert shot.size == (1280, 2000) and loss["top"] + loss["h"] < 2000
    # the loss plot area holds the crimson annotations (NaN markers, the first-bad-step line, 0.0 points)
    box = shot.crop((int(loss["x"]), int(loss["top"]), int(loss["x"] + loss["w"]), int(loss["top"] + loss["h"])))
    px = np.asarray(box, dtype=np.int16)
    crimson = int(((px[..., 0] > 150) & (px[..., 1] < 60) & (px[..., 2] < 70)).sum())
    assert crimson > 300, crimson


@pytest.mark.parametrize("width", [800, 1400])
@pytest.mark.parametrize("page", ["one", "many"])
def test_the_layout_holds_from_800_to_1400_px(pages, browser, page, width):
    assert browser.load(pages[page], width) == []
    _keep(f"{page}-{width}.png", browser.screenshot(full=True))
    doc = browser.js("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert doc[0] <= doc[1], f"the page scrolls sideways: {doc}"
    cells = browser.js("[...document.querySelectorAll('table.timeline td.summary')].map(td => td.getBoundingClientRect().width)")
    assert cells and min(cells) >= 180, cells  # the summary keeps a readable column
    names = browser.js("""[...document.querySelectorAll('table.compare td.name a')].map(a => ({
        h: a.getBoundingClientRect().height, line: parseFloat(getComputedStyle(a).lineHeight), w: a.getBoundingClientRect().width}))""")
    if page == "many":
        assert len(names) == len(LONG_NAMES)
        for n in names:
            assert n["h"] <= 3.2 * n["line"] and n["w"] >= 120, n  # wraps at its parts, not a letter per line
    groups: dict[str, list[dict]] = {}
    for c in browser.charts():
        groups.setdefault(c["group"], []).append(c)
    assert groups and all(len(g) >= 2 for g in groups.values())
    for charts in groups.values():  # stacked charts of a run share their plot area and their x domain
        assert max(c["x"] for c in charts) - min(c["x"] for c in charts) < 0.5
        assert max(c["w"] for c in charts) - min(c["w"] for c in charts) < 0.5
        assert len({(c["x0"], c["x1"]) for c in charts}) == 1
        assert all(c["x"] + c["w"] <= doc[1] for c in charts)


def test_charts_follow_a_resize(pages, browser):
    assert browser.load(pages["one"], 1400) == []
    wide = browser.charts()
    browser.cdp.call("Emulation.setDeviceMetricsOverride", width=800, height=900, deviceScaleFactor=1, mobile=False)
    browser.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))", wait=True)
    narrow = browser.charts()
    assert [c["name"] for c in narrow] == [c["name"] for c in wide]
    assert all(n["w"] < w["w"] - 300 for n, w in zip(narrow, wide))
    assert len({(round(c["x"], 1), round(c["w"], 1)) for c in narrow}) == 1
    assert browser.js("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert _errors(browser.cdp.events) == []


def test_hover_shows_the_step_and_each_value(nan_page, browser):
    report, _, path = nan_page
    assert browser.load(path, 1000) == []
    loss = next(c for c in browser.charts() if c["name"] == "loss")
    from autopsy.series import series

    train = series(report.runs[0].frame, "train/loss", finite=True)
    step = int(train.index[len(train) // 2])
    browser.mouse("mouseMoved", *browser.at(loss, step))
    tip = browser.js("""(() => { const t = document.querySelector('#plot-0-loss .ac-tip');
        return {shown: getComputedStyle(t).display !== 'none', text: t.innerText}; })()""")
    assert tip["shown"] and f"step {step}" in tip["text"], tip
    value = float(re.search(r"train/loss\s+([-\d.e]+)", tip["text"]).group(1))
    assert value == pytest.approx(float(train.loc[step]), rel=1e-4)
    crosses = browser.js("[...document.querySelectorAll('#run-0 .ac-cross')].map(l => l.getAttribute('visibility'))")
    assert crosses and set(crosses) == {"visible"}  # every chart of the run marks the step
    browser.mouse("mouseMoved", 2, 2)
    assert browser.js("getComputedStyle(document.querySelector('#plot-0-loss .ac-tip')).display") == "none"


def test_drag_zooms_every_chart_of_the_run_and_double_click_resets(nan_page, browser):
    _, _, path = nan_page
    assert browser.load(path, 1000) == []
    before = browser.charts()
    grad = next(c for c in before if c["name"] == "grad_norm")
    lo, hi = grad["x0"] + 0.25 * (grad["x1"] - grad["x0"]), grad["x0"] + 0.6 * (grad["x1"] - grad["x0"])
    (xa, y), (xb, _) = browser.at(grad, lo), browser.at(grad, hi)
    browser.mouse("mousePressed", xa, y, button="left", buttons=1, clickCount=1)
    browser.mouse("mouseMoved", (xa + xb) / 2, y, button="left", buttons=1)
    browser.mouse("mouseMoved", xb, y, button="left", buttons=1)
    browser.mouse("mouseReleased", xb, y, button="left", buttons=0, clickCount=1)
    after = browser.charts()
    assert len({(c["x0"], c["x1"]) for c in after}) == 1  # every chart of the run follows
    assert after[0]["x0"] == pytest.approx(lo, abs=0.2) and after[0]["x1"] == pytest.approx(hi, abs=0.2)
    assert browser.js("[...document.querySelectorAll('.ac-reset')].every(b => !b.hidden)")
    browser.mouse("mousePressed", xa, y, button="left", buttons=1, clickCount=2)
    browser.mouse("mouseReleased", xa, y, button="left", buttons=0, clickCount=2)
    assert [(c["x0"], c["x1"]) for c in browser.charts()] == [(c["x0"], c["x1"]) for c in before]


def test_the_body_works_twice_inside_a_host_page(browser, tmp_path):
    """A notebook: two output cells with the report's body, the host's own style untouched."""
    body = render_html_body(synthetic_report())
    host = tmp_path / "notebook.html"
    host.write_text("<!DOCTYPE html><html><head><style>h2{font-size:40px}</style></head><body>"
                    f"<h2 id='host'>cell 1</h2>{body}<h2>cell 2</h2>{body}</body></html>", encoding="utf-8")
    assert browser.load(host, 1100) == []
    charts = browser.charts()
    assert len(charts) == 6 and not any(c["static"] for c in charts)
    assert browser.js("getComputedStyle(document.getElementById('host')).fontSize") == "40px"
    assert browser.js("[...document.querySelectorAll('.autopsy')].length") == 2


def test_synthetic_report_with_hostile_names_renders_clean(tmp_path):
    path = tmp_path / "r.html"
    path.write_text(render(synthetic_report(runs=2), "html"), encoding="utf-8")
    seen = open_page(path)
    assert seen["errors"] == []
    probe = seen["probe"]
    assert probe["title"].startswith("autopsy: FAILED")
    assert len(probe["verdicts"]) == 2 and all(v["visible"] for v in probe["verdicts"])
    assert len(probe["findings"]) == 4 and all(f["visible"] for f in probe["findings"])


def test_the_harness_sees_errors(tmp_path):
    """Control: a broken page makes the checks above fail (a script error and a blocked external image)."""
    path = tmp_path / "bad.html"
    path.write_text("<!DOCTYPE html><html><body><img src='http://127.0.0.1:9/x.png'>"
                    "<script>throw new Error('boom')</script></body></html>")
    seen = open_page(path)
    assert any("boom" in e for e in seen["errors"]), seen["errors"]
    assert any("Failed to load resource" in e for e in seen["errors"]), seen["errors"]
    assert any(link.startswith("http") for link in seen["probe"]["links"])
