"""Detector rules for short logs and non-HF frameworks (console excerpts pasted in issues), and the shared series
cache: each case is a small frame built here, with the reason the rule exists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autopsy import analyze
from autopsy.detectors._context import hf_trainer_like
from autopsy.findings import Severity
from autopsy.frame import make_frame
from autopsy.runinfo import RunInfo, attach_runs, run_info
from autopsy.series import metric_names, series
from autopsy.series import series as metric_series


def _frame(cols: dict[str, list[float]], *, steps=None, raw: dict[str, str] | None = None, config=None, sources=("console",)):
    n = len(next(iter(cols.values())))
    steps = list(steps) if steps is not None else list(range(1, n + 1))
    metric, step, value, raw_metric = [], [], [], []
    for name, vals in cols.items():
        metric += [name] * len(vals)
        step += steps[: len(vals)]
        value += list(vals)
        raw_metric += [(raw or {}).get(name, name.split("/")[-1])] * len(vals)
    f = make_frame(run="r", source="console", metric=metric, step=step, value=value, raw_metric=raw_metric)
    attach_runs(f, {"r": RunInfo(name="r", sources=list(sources), config=dict(config or {}))})
    return f


def _sigs(frame, min_severity=Severity.INFO):
    return {f.signature: f for f in analyze(frame).runs[0].findings if f.severity >= min_severity}


GN = [2.4, 2.0, 1.8, 2.1, 2.2, 2.0, 2.3, 2.1, 2.2, 2.0, 2.4, 2.1]
LOSS = [0.09, 0.1, 0.088, 0.096, 0.083, 0.087, 0.078, 0.079, 0.1, 0.087, 0.094, 0.09]


def test_clip_saturation_assumes_hf_default_only_for_hf_runs():
    lr = [1e-4] * len(GN)
    hf = _frame({"train/grad_norm": GN, "train/loss": LOSS, "train/learning_rate": lr})
    assert hf_trainer_like(hf, run_info(hf, "r"))
    f = _sigs(hf)["clip_saturation"]
    # a few times an assumed threshold with a loss that is not rising: a note, not a warning
    assert f.severity == Severity.INFO and f.evidence["max_grad_norm_assumed"] is True
    custom = _frame({"train/grad_norm": GN, "train/loss": LOSS, "train/learning_rate": lr},
                    raw={"train/grad_norm": "grad_norm", "train/learning_rate": "lr", "train/loss": "closs"})
    assert not hf_trainer_like(custom, run_info(custom, "r"))
    assert "clip_saturation" not in _sigs(custom)  # no HF default to assume for a custom loop
    known = _frame({"train/grad_norm": GN, "train/loss": LOSS, "train/learning_rate": lr},
                   raw={"train/learning_rate": "lr"}, config={"max_grad_norm": 1.0})
    assert _sigs(known)["clip_saturation"].evidence["max_grad_norm_assumed"] is False


def test_clip_saturation_reads_a_logged_clip_share():
    g = [2.6, 2.59, 2.58, 2.64, 2.8, 3.4, 3.3]
    loss = [9.405, 9.399, 9.393, 9.387, 9.382, 9.378, 9.376]
    raw = {"train/grad_norm": "gnorm", "train/learning_rate": "lr"}
    full = _frame({"train/grad_norm": g, "train/loss": loss, "train/learning_rate": [0.2] * 7, "clip": [100.0] * 7}, raw=raw)
    f = _sigs(full)["clip_saturation"]
    assert f.evidence["share_clipped"] == 1.0 and f.evidence["max_grad_norm"] is None and "clip" in f.evidence["share_source"]
    none = _frame({"train/grad_norm": g, "train/loss": loss, "train/learning_rate": [0.2] * 7, "clip": [0.0] * 7}, raw=raw)
    assert "clip_saturation" not in _sigs(none)


def test_short_excerpt_jump_is_exploding_and_divergence():
    # mmdetection3d#3103 in miniature: an excerpt from mid-run, the norm 3 -> 50 and the loss 3 -> 8.5
    steps = [35496, 35546, 35596, 35646, 36446, 36496, 36546, 36596]
    f = _frame({"train/grad_norm": [3.5, 2.8, 3.8, 4.5, 58.9, 28.4, 52.4, 51.1],
                "train/loss": [3.19, 3.14, 3.28, 3.59, 8.52, 8.68, 8.34, 8.23]}, steps=steps,
               raw={"train/grad_norm": "grad_norm"})
    got = _sigs(f, Severity.WARNING)
    assert got["exploding_gradients"].step == 36446 and "divergence" in got


def test_divergence_before_a_grad_norm_inf_stays_reported():
    # fairseq#41: gnorm 2 -> 1e5 -> 1e13 -> inf while the (finite) loss climbs to 1e12
    steps = [1000 * k for k in range(1, 8)]
    f = _frame({"train/grad_norm": [2.05, 1.71, 2.75, 1.0e5, 1.5e12, 3.7e13, math.inf],
                "train/loss": [9.57, 8.61, 7.5, 6.87, 1.04e4, 4.77e9, 7.75e12]}, steps=steps,
               raw={"train/grad_norm": "gnorm"})
    got = _sigs(f, Severity.WARNING)
    assert {"exploding_gradients", "divergence", "nan_grad_norm"} <= set(got)
    assert {p["signature"] for p in got["nan_grad_norm"].evidence["precursors"]} == {"exploding_gradients", "divergence"}


def test_plateau_pinned_at_chance_after_a_noisy_start():
    loss = [0.68, 2.46, 5.34, 1.02, 10.69, 1.99, 3.57, 0.687] + [0.6931] * 20
    f = _frame({"train/loss": loss}, steps=range(28))
    p = _sigs(f)["plateau"]
    assert p.severity == Severity.ERROR and p.evidence["chance_level"] == "ln(2)" and p.step == 8
    caffe = _frame({"train/loss": [6.91161, 6.90776, 6.90776, 6.90776, 6.90776]}, steps=range(0, 100, 20))
    assert _sigs(caffe)["plateau"].evidence["chance_level"] == "ln(1000)"
    # a healthy loss that merely passes through ln(2) is not pinned
    healthy = _frame({"train/loss": list(np.linspace(1.2, 0.5, 30))})
    assert "plateau" not in _sigs(healthy)


def test_zero_loss_from_the_first_log_needs_a_nonfinite_grad_norm():
    nan = _frame({"train/loss": [0.0] * 10, "train/grad_norm": [math.nan] * 10},
                 raw={"train/grad_norm": "grad_norm"})
    z = _sigs(nan)["loss_zero_collapse"]
    assert z.severity == Severity.CRITICAL and z.step == 1 and z.evidence["from_first_log"] is True
    finite = _frame({"train/loss": [0.0] * 10, "train/grad_norm": [0.1] * 10})
    assert "loss_zero_collapse" not in _sigs(finite)


@pytest.mark.parametrize("seed", range(5))
def test_metric_series_matches_frame_series(seed):
    rng = np.random.default_rng(seed)
    n = 300
    metric = rng.choice(["train/loss", "train/grad_norm", "eval/loss"], n)
    step = rng.integers(0, 60, n)  # duplicates and resumes: superseded rows, last write wins
    f = make_frame(run="r", source=rng.choice(["a", "b"], n).astype(object), metric=metric.astype(object), step=step,
                   value=rng.normal(size=n))
    assert metric_names(f) == set(metric)
    for m in ("train/loss", "train/grad_norm", "eval/loss", "absent"):
        a, b = metric_series(f, m), series(f, m)
        assert a.index.tolist() == b.index.tolist() and np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
