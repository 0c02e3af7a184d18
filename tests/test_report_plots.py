"""Plots: min/max downsampling keeps spikes, NaN points are drawn, the clip threshold is read or assumed."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from autopsy.findings import RunReport
from autopsy.frame import make_frame
from autopsy.report.plots import MIN_REL_SPAN, downsample_minmax, grad_norm_threshold, run_plots, run_specs, y_range
from autopsy.series import series
from helpers.report import synthetic_report


def test_downsample_keeps_a_one_step_spike_in_a_million_points():
    rng = np.random.default_rng(0)
    x = np.arange(1_000_000)
    y = rng.normal(1.0, 0.01, size=x.size)
    at = int(rng.integers(0, x.size))
    y[at] = 50.0
    y[at + 3] = -20.0
    y[10] = np.nan
    xs, ys = downsample_minmax(x, y, columns=800)
    assert len(xs) <= 1600
    assert np.all(np.diff(xs) > 0)  # order kept
    assert ys.max() == 50.0 and xs[np.argmax(ys)] == at
    assert ys.min() == -20.0 and np.isfinite(ys).all()


def test_downsample_leaves_short_series_alone():
    x, y = np.arange(10), np.linspace(0, 1, 10)
    xs, ys = downsample_minmax(x, y)
    assert np.array_equal(xs, x) and np.array_equal(ys, y)


def test_million_step_run_plots_and_keeps_nan_markers():
    n = 1_000_000
    s = np.arange(1, n + 1)
    loss = 2.0 + np.sin(s / 5e4)
    loss[n // 2] = np.nan
    frame = make_frame(run="big", source="tensorboard", metric="train/loss", step=s, value=loss)
    plots = run_plots(RunReport(run="big", frame=frame), fmt="svg")
    assert [p.name for p in plots] == ["loss"]
    assert any(f"first NaN at step {n // 2 + 1}" in note for note in plots[0].notes)
    assert len(plots[0].data) < 400_000  # drawn from ~2000 points, not a million


def test_annotations_and_threshold():
    report = synthetic_report()
    run = report.runs[0]
    plots = {p.name: p for p in run_plots(run)}
    grad = plots["grad_norm"]
    svg = grad.data.decode()
    assert "max_grad_norm = 1" in svg and "assumed" not in svg
    assert any("first NaN at step 31" in n for n in grad.notes)
    assert any("warmup ends at step 10" in n for n in plots["learning_rate"].notes)
    assert any("best eval/loss" in n and "step 30" in n for n in plots["loss"].notes)
    run.config.pop("max_grad_norm")
    run.info.config.pop("max_grad_norm")
    assert grad_norm_threshold(run) == (1.0, True)
    assert "assumed" in {p.name: p for p in run_plots(run)}["grad_norm"].data.decode()
    assert plots["loss"].data_uri().startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(plots["loss"].data_uri().split(",", 1)[1]) == plots["loss"].data


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_plots_are_deterministic(fmt):
    a = [p.data for p in run_plots(synthetic_report().runs[0], fmt=fmt)]
    b = [p.data for p in run_plots(synthetic_report().runs[0], fmt=fmt)]
    assert a == b and len(a) == 3


def test_no_frame_no_plots():
    assert run_plots(RunReport(run="x")) == []


def test_y_range_shows_a_flat_curve_flat_and_fills_a_varied_one():
    flat = np.array([1.390, 1.395, 1.399, 1.392])
    lo, hi = y_range([flat])
    assert hi - lo >= MIN_REL_SPAN * 1.399 and lo < 1.390 and hi > 1.399
    assert (flat.max() - flat.min()) / (hi - lo) < 0.2
    varied = np.linspace(0.0, 10.0, 50)
    lo, hi = y_range([varied])
    assert lo == pytest.approx(-0.5) and hi == pytest.approx(10.5)  # 5% of the span on each side
    lo, hi = y_range([np.zeros(5)])
    assert lo < 0 < hi  # all zeros: a range around 0, not a degenerate one
    lo, hi = y_range([flat], include=(1.0,))
    assert lo < 1.0 and hi > 1.399  # a reference line (a clip threshold) is always in view
    lo, hi = y_range([np.array([1.0, 1000.0])], log=True)
    assert lo < 1.0 and hi > 1000.0 and np.log10(hi / lo) == pytest.approx(3 * 1.1)


def test_specs_describe_what_the_figures_draw():
    run = synthetic_report().runs[0]
    specs = {s.name: s for s in run_specs(run)}
    loss, grad, lr = specs["loss"], specs["grad_norm"], specs["learning_rate"]
    assert [ln.label for ln in loss.lines] == ["train/loss", "eval/loss"] and loss.lines[1].markers
    nan = next(m for m in loss.marks if m.y is None)
    assert nan.edge == "top" and nan.hover == "eval/loss = NaN" and list(nan.x) == [40, 50, 60]
    zero = next(m for m in loss.marks if m.shape == "o")
    assert list(zero.x) == list(range(31, 61)) and not zero.y.any()
    assert [v.text for v in loss.vlines if v.on_plot][-1].endswith("@ 31")
    (threshold,) = grad.hlines
    assert threshold.y == 1.0 and threshold.shade == "above" and grad.y_range[0] < 1.0 < grad.y_range[1]
    assert lr.y_sci and any(v.text == "warmup end @ 10" and not v.on_plot for v in lr.vlines)
    finite = sum(int(np.isfinite(series(run.frame, m).to_numpy()).sum()) for m in ("train/loss", "eval/loss"))
    assert all(s.drawable for s in specs.values()) and loss.finite_points == finite
