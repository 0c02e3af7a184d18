"""The report in a notebook: it shows itself (_repr_html_), draws its figures (plot), saves itself (save), and
autopsy.wide keeps every run of a multi-run frame."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import autopsy
from autopsy.errors import UsageError
from helpers.paths import RUNS


@pytest.fixture(scope="module")
def report():
    return autopsy.analyze(RUNS / "nan-at-31")


def test_repr_html_is_the_report_body(report):
    body = report._repr_html_()
    assert not re.search(r"<(html|head|body)[\s>]", body, re.I)  # a cell's output, not a page
    lead = report.runs[0].sorted_findings()[0]
    assert lead.signature in body and "<style" in body


def test_plot_returns_annotated_figures(report):
    from matplotlib.figure import Figure

    figures = report.plot()
    assert figures and all(isinstance(f, Figure) for f in figures)
    nan_step = next(f.step for f in report.findings if f.signature == "nan_grad_norm")
    drawn = [line.get_xdata() for fig in figures for ax in fig.axes for line in ax.get_lines()]
    assert any(np.size(x) == 2 and float(np.asarray(x)[0]) == nan_step for x in drawn)  # the finding's line


def test_plot_names_a_run_when_there_are_several(report, tmp_path):
    two = autopsy.analyze(RUNS)
    with pytest.raises(UsageError):
        two.plot()
    assert two.plot(run=two.runs[0].run)


@pytest.mark.parametrize("ext", [".html", ".md", ".json", ".txt"])
def test_save_picks_the_format_from_the_extension(report, tmp_path, ext):
    path = report.save(tmp_path / f"report{ext}")
    text = path.read_text(encoding="utf-8")
    lead = report.runs[0].sorted_findings()[0].signature
    assert lead in text
    if ext == ".json":
        assert json.loads(text)["runs"][0]["status"] == "failed"
    if ext == ".html":
        assert text.lstrip().lower().startswith("<!doctype html")
    if ext == ".md":
        assert (tmp_path / "report_plots").is_dir()


def test_save_refuses_an_unknown_extension(report, tmp_path):
    with pytest.raises(UsageError, match="pdf"):
        report.save(tmp_path / "report.pdf")


def test_wide_keeps_every_run():
    frame = autopsy.load(RUNS)
    runs = sorted(frame["run"].astype(str).unique())
    assert len(runs) > 1
    w = autopsy.wide(frame)
    assert w.index.names == ["run", "step"]
    for run in runs:  # each run's values, none overwritten by another's
        mine = frame[(frame["run"] == run) & (frame["metric"] == "train/loss") & ~frame["superseded"]]
        got = w.loc[run]["train/loss"].dropna()
        expect = mine.drop_duplicates("step", keep="last").set_index("step")["value"].dropna()
        pd.testing.assert_series_equal(got.sort_index(), expect.sort_index(), check_names=False, check_index_type=False)
    one = autopsy.wide(frame, run=runs[0])
    assert one.index.name == "step"
    with pytest.raises(UsageError):
        autopsy.wide(frame, run="no-such-run")


def test_to_frame_keeps_steps_as_integers(report):
    two = autopsy.analyze(RUNS)
    findings = two.to_frame()
    assert str(findings["step"].dtype) == "Int64" and str(findings["end_step"].dtype) == "Int64"


def test_wall_time_is_a_timezone_aware_datetime():
    frame = autopsy.load(RUNS / "nan-at-31")
    assert isinstance(frame["wall_time"].dtype, pd.DatetimeTZDtype) and str(frame["wall_time"].dt.tz) == "UTC"
