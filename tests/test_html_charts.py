"""The HTML report's charts without a browser: the spec each chart carries, the page's size on a long run, flat
curves, the chance level, one shared x range, no empty plots, the notebook body. Every expectation comes from the
data the test makes."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from autopsy.findings import Finding, Report, RunReport, Severity
from autopsy.frame import make_frame
from autopsy.report.html import render_html, render_html_body
from autopsy.report.plots import MIN_REL_SPAN, run_figures, run_plots, run_specs
from helpers.paths import REPO
from helpers.report import synthetic_report


def _frame(run: str, series: dict[str, tuple[np.ndarray, np.ndarray]]):
    metric = np.concatenate([np.full(len(s), name, dtype=object) for name, (s, _) in series.items()])
    step = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in series.values()])
    value = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in series.values()])
    return make_frame(run=run, source="trainer_state", metric=metric, step=step, value=value)


def _charts(page: str) -> dict[str, dict]:
    """name -> the JSON spec of each chart in the page."""
    out = {}
    for name, data in re.findall(r'data-plot="(\w+)" data-group="[^"]*"><div class="ac-static">.*?'
                                 r'<script type="application/json" class="ac-data">(.*?)</script>', page, re.S):
        out[name] = json.loads(data)
    return out


def _plateau_run() -> RunReport:
    """A 4-class classifier stuck at chance: train loss between 1.390 and 1.399 for 1200 steps."""
    rng = np.random.default_rng(3)
    s = np.arange(100, 1201, 100)
    loss = 1.390 + 0.009 * rng.random(s.size)
    loss[0], loss[1] = 1.390, 1.399
    grad = 2.0 + rng.random(s.size)
    frame = _frame("plateau", {"train/loss": (s, loss), "train/grad_norm": (s, grad)})
    found = Finding("plateau", Severity.ERROR, "train loss flat at 1.395 ~ ln(4)", 200, 1200, "train/loss",
                    {"chance_level": "ln(4)", "chance_value": math.log(4), "end_level": 1.395}, run="plateau")
    return RunReport(run="plateau", findings=[found], frame=frame)


def test_a_400k_step_run_makes_a_page_under_2_mb_that_keeps_its_spike():
    n = 400_000
    s = np.arange(1, n + 1)
    rng = np.random.default_rng(0)
    loss = 3.0 * np.exp(-s / 1e5) + 0.5 + rng.normal(0, 0.02, n)
    spike = int(rng.integers(1000, n - 1000))
    loss[spike] = 40.0
    loss[-500:] = np.nan
    grad = np.abs(rng.normal(1.0, 0.3, n))
    lr = np.full(n, 3e-4)
    es = np.arange(1000, n + 1, 1000)
    frame = _frame("long", {"train/loss": (s, loss), "train/grad_norm": (s, grad), "train/learning_rate": (s, lr),
                            "eval/loss": (es, 3.0 * np.exp(-es / 1e5) + 0.6)})
    found = Finding("nan_loss", Severity.CRITICAL, "loss is NaN", n - 499, n, "train/loss", run="long")
    page = render_html(Report(runs=[RunReport(run="long", findings=[found], frame=frame)], version="t"))
    assert len(page.encode()) < 2_000_000, len(page.encode())
    charts = _charts(page)
    assert set(charts) >= {"loss", "grad_norm", "learning_rate"}
    train = next(x for x in charts["loss"]["s"] if x["l"] == "train/loss")
    assert len(train["x"]) <= 2000 and max(train["y"]) == 40.0 and train["x"][train["y"].index(40.0)] == spike + 1
    nan = next(k for k in charts["loss"]["k"] if "NaN" in k["l"])
    assert nan["x"][0] == n - 499 and nan["y"] is None and nan["e"] == "top"


def test_a_flat_curve_keeps_a_flat_range_and_the_chance_level_is_drawn():
    run = _plateau_run()
    loss = next(s for s in run_specs(run) if s.name == "loss")
    lo, hi = loss.y_range
    values = loss.lines[0].y
    level = float(np.abs(values).max())
    assert hi - lo >= MIN_REL_SPAN * level  # not the 0.009 spread blown up to the full height
    assert (values.max() - values.min()) / (hi - lo) < 0.2
    chance = [h for h in loss.hlines if "ln(4)" in h.text]
    assert len(chance) == 1 and chance[0].y == pytest.approx(math.log(4)) and lo < math.log(4) < hi
    assert any("ln(4)" in note for note in loss.notes)
    page = render_html(Report(runs=[run], version="t"))
    data = _charts(page)["loss"]
    assert any("ln(4)" in h["t"] and h["y"] == pytest.approx(math.log(4)) for h in data["h"])


def test_normal_curves_fill_their_range():
    run = synthetic_report().runs[0]
    grad = next(s for s in run_specs(run) if s.name == "grad_norm")
    finite = grad.lines[0].y
    lo, hi = grad.y_range
    assert (finite.max() - finite.min()) / (hi - lo) > 0.6  # a varied series is not squashed


def test_the_plots_of_a_run_share_one_x_range():
    s = np.arange(0, 500)
    frame = _frame("x", {"train/loss": (s[50:], np.linspace(3, 1, 450)), "train/grad_norm": (s[:300], np.ones(300)),
                         "train/learning_rate": (s, np.linspace(1e-3, 0, 500)),
                         "eval/loss": (np.arange(100, 401, 100), np.array([2.5, 2.0, 1.8, 1.7]))})
    specs = run_specs(RunReport(run="x", frame=frame))
    assert [p.name for p in specs] == ["loss", "grad_norm", "learning_rate"]
    ranges = {p.x_range for p in specs}
    assert len(ranges) == 1
    lo, hi = ranges.pop()
    assert lo <= 0 and hi >= 499 and hi - lo < 499 * 1.1
    assert {f.axes[0].get_xlim() for f in run_figures(RunReport(run="x", frame=frame))} == {(lo, hi)}


def test_a_one_point_run_draws_no_plot_and_says_so():
    frame = _frame("one", {"train/loss": (np.array([20]), np.array([0.74])),
                           "eval/loss": (np.array([20]), np.array([1.25])),
                           "train/grad_norm": (np.array([20]), np.array([0.9]))})
    run = RunReport(run="one", frame=frame)
    assert run_plots(run) == [] and run_figures(run) == []
    page = render_html(Report(runs=[run], version="t"))
    assert 'class="ac-fig"' not in page and "<script>" not in page  # no chart, no script
    assert "loss (train / eval): not drawn, 2 finite points (train/loss 0.74, eval/loss 1.25 at step 20)" in page
    assert "gradient norm (pre-clip): not drawn, 1 finite point" in page


def test_the_body_has_no_page_chrome_and_its_style_is_scoped():
    report = synthetic_report(runs=2)
    body = render_html_body(report)
    assert body.startswith('<div class="autopsy">') and body.rstrip().endswith("</div>")
    for tag in ("!doctype", "html", "head", "body", "meta", "title"):
        assert not re.search(rf"<{tag}[\s>]", body, re.I), tag
    style = re.search(r"<style>(.*?)</style>", body, re.S).group(1)
    selectors = [sel.strip() for rule in re.findall(r"([^{}]+)\{", style) for sel in rule.split(",")]
    assert selectors and all(sel.startswith(".autopsy") for sel in selectors), [s for s in selectors if not s.startswith(".autopsy")][:5]
    assert body.count("<script>") == 1 and body.count('class="ac-fig"') == 6  # 3 charts x 2 runs
    page = render_html(report)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp and "unsafe-eval" not in csp
    assert "script-src 'unsafe-inline'" not in csp
    assert re.search(r"<main>(.*)</main>", body, re.S).group(1) == re.search(r"<main>(.*)</main>", page, re.S).group(1)


def test_without_static_plots_the_page_is_smaller_and_still_has_every_chart():
    report = synthetic_report()
    full, lean = render_html_body(report), render_html_body(report, static_plots=False)
    assert '<img class="plot"' in full and '<img class="plot"' not in lean
    assert len(lean) < len(full) and _charts(lean).keys() == _charts(full).keys() == {"loss", "grad_norm", "learning_rate"}


def test_strings_in_the_chart_data_cannot_close_its_script():
    hostile = "x</script><script>alert(1)</script>"
    run = synthetic_report().runs[0]
    run.findings[0].signature = hostile
    page = render_html(Report(runs=[run], version="t"))
    assert "<script>alert(1)" not in page
    data = _charts(page)
    assert any(hostile in v["t"] for v in data["loss"]["v"])  # the text survives, as data
    assert page.count("</script>") == page.count("<script")


def test_run_figures_are_figures_made_without_pyplot():
    code = (
        "import sys\nfrom helpers.report import synthetic_report\nfrom autopsy.report.plots import run_figures\n"
        "figs = run_figures(synthetic_report().runs[0])\n"
        "from matplotlib.figure import Figure\n"
        "print(len(figs), all(type(f) is Figure for f in figs), 'matplotlib.pyplot' in sys.modules,"
        " [f.axes[0].get_title(loc='left') for f in figs])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": "tests", "MPLBACKEND": "Agg"}, cwd=REPO)
    assert out.stdout.strip() == "3 True False ['loss (train / eval)', 'gradient norm (pre-clip)', 'learning rate']"
