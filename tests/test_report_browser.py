"""The HTML report in a real browser: headless Chromium over the DevTools protocol.

Checks what a person would see: no console errors, the verdict on the first screen, every finding rendered, plots
decoded with a non-zero size, and a screenshot where the annotated loss plot is drawn. Set
``AUTOPSY_SCREENSHOT_DIR`` to keep the screenshot. Skips where Chromium is absent (CI installs it).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from autopsy.report import render
from helpers.browser import CHROMIUM, open_page
from helpers.report import synthetic_report

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def nan_page(nan_run, tmp_path_factory):
    from autopsy.analysis import analyze

    report = analyze(nan_run)
    path = tmp_path_factory.mktemp("html") / "nan-at-31.html"
    path.write_text(render(report, "html"), encoding="utf-8")
    seen = open_page(path)
    keep = os.environ.get("AUTOPSY_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "nan-at-31.png").write_bytes(seen["screenshot"])
        shutil.copy(path, Path(keep) / "nan-at-31.html")
    return report, seen


def test_no_console_errors_and_nothing_fetched(nan_page):
    _, seen = nan_page
    assert seen["errors"] == []
    assert all(link.startswith(("data:", "#")) for link in seen["probe"]["links"])


def test_verdict_on_the_first_screen(nan_page):
    _, seen = nan_page
    verdict = seen["probe"]["verdicts"][0]
    assert verdict["visible"] and verdict["top"] < 400  # a laptop's first screen shows it whole
    assert verdict["top"] + verdict["h"] < 800
    text = verdict["text"]
    assert "FAILED" in text and "nan_grad_norm" in text and "step 31" in text and "checkpoint-30" in text


def test_every_finding_visible(nan_page):
    report, seen = nan_page
    shown = seen["probe"]["findings"]
    assert sorted(f["signature"] for f in shown) == sorted(f.signature for f in report.runs[0].findings)
    assert all(f["visible"] and f["h"] > 20 for f in shown)


def test_plots_have_size_and_the_loss_plot_is_annotated_in_the_screenshot(nan_page):
    image = pytest.importorskip("PIL.Image")
    _, seen = nan_page
    plots = {p["name"]: p for p in seen["probe"]["plots"]}
    assert len(plots) >= 2 and "loss" in plots
    for p in plots.values():
        assert p["visible"] and p["w"] > 400 and p["h"] > 100 and p["complete"] and p["naturalWidth"] > 0
    loss = plots["loss"]
    assert loss["top"] + loss["h"] < 2000  # inside the 1280x2000 screenshot
    shot = image.open(io.BytesIO(seen["screenshot"])).convert("RGB")
    assert shot.size == (1280, 2000)
    # the loss plot area holds the crimson annotations (NaN markers, the first-bad-step line, 0.0 points)
    box = shot.crop((0, int(loss["top"]), 1280, int(loss["top"] + loss["h"])))
    import numpy as np

    px = np.asarray(box, dtype=np.int16)
    crimson = int(((px[..., 0] > 150) & (px[..., 1] < 60) & (px[..., 2] < 70)).sum())
    assert crimson > 300, crimson


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
