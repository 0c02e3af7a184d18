"""Every registered detector follows the contract: documented, keyword-only, declares its data, quiet on clean
runs, never raises on odd series, deterministic."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopsy.detectors import registered
from autopsy.findings import Finding, Severity
from autopsy.frame import make_frame
from autopsy.runinfo import RunInfo, attach_runs, run_info
from autopsy.synth import make_run

SPECS = sorted(registered().values(), key=lambda s: s.name)
IDS = [s.name for s in SPECS]
# detectors written by other helpers on their own schedule are checked too, once they exist


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_docstring_sections_and_signature(spec):
    doc = spec.doc
    for section in ("Signature:", "Likely causes:", "What to check next:"):
        assert section in doc, f"{spec.name}: docstring lacks {section!r}"
    params = list(inspect.signature(spec.func).parameters.values())
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), spec.name
    assert spec.signatures, spec.name


MINE = {"loss_spike", "divergence", "plateau", "oscillation", "epoch_boundary_drop", "exploding_gradients",
        "vanishing_gradients", "clip_saturation", "overfitting", "eval_flat", "sparse_eval", "throughput_drop",
        "memory_growth", "config_risk", "insufficient_data"}


def test_every_log_signature_of_this_suite_is_registered():
    names = {s for spec in SPECS for s in spec.signatures}
    assert names >= MINE, MINE - names


@pytest.mark.parametrize("spec", [s for s in SPECS if s.requires or s.requires_any or s.name in MINE], ids=lambda s: s.name)
def test_declares_its_data(spec):
    if spec.name in ("config_risk", "insufficient_data"):
        return  # these read the config / count points: they run on any run
    assert spec.requires or spec.requires_any, spec.name


@pytest.fixture(scope="module")
def clean_runs():
    return [make_run(failure=None, shape=shape, seed=seed, noise=0.03, logging_steps=ls)[0]
            for shape, seed, ls in (("exp", 0, 1), ("power", 1, 10), ("epochs", 2, 5), ("dpo", 3, 1), ("ctc", 4, 10))]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_nothing_at_warning_on_clean_synthetic_runs(spec, clean_runs):
    for frame in clean_runs:
        info = run_info(frame, "synth")
        outcome = spec.run(frame, info)
        assert not outcome.errors, outcome.errors
        got = outcome.findings
        loud = [f for f in got if f.severity >= Severity.WARNING]
        assert loud == [], f"{spec.name} on a clean run: {[f.summary for f in loud]}"


# --- properties: never raises, deterministic ------------------------------------------------------

values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -float("inf")]),
)


@st.composite
def odd_frames(draw):
    n = draw(st.integers(0, 60))
    steps = draw(st.lists(st.integers(0, 200), min_size=n, max_size=n))  # unsorted, duplicates allowed
    kind = draw(st.sampled_from(["random", "constant", "allnan", "inf"]))
    if kind == "constant":
        vals = [draw(values)] * n
    elif kind == "allnan":
        vals = [float("nan")] * n
    elif kind == "inf":
        vals = [draw(st.sampled_from([float("inf"), -float("inf")])) for _ in range(n)]
    else:
        vals = draw(st.lists(values, min_size=n, max_size=n))
    metrics = draw(st.lists(st.sampled_from(["train/loss", "train/grad_norm", "eval/loss", "train/learning_rate",
                                             "train/epoch", "train/tokens_per_second", "train/memory_allocated"]),
                            min_size=n, max_size=n))
    frame = make_frame(run="r", source="t", metric=metrics, step=steps, value=vals)
    cfg = draw(st.sampled_from([{}, {"max_grad_norm": 1.0, "warmup_steps": 0, "learning_rate": 10.0, "fp16": True},
                                {"max_grad_norm": None, "warmup_ratio": 2.0, "max_steps": 5, "learning_rate": "x"}]))
    attach_runs(frame, {"r": RunInfo(name="r", config=dict(cfg), max_steps=draw(st.sampled_from([None, 0, 10, 100])))})
    return frame


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frame=odd_frames())
def test_detectors_never_raise_and_are_deterministic(frame):
    info = run_info(frame, "r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in SPECS:
            run_a, run_b = spec.run(frame, info), spec.run(frame.copy(), info)
            assert not run_a.errors, (spec.name, run_a.errors)
            a, b = run_a.findings, run_b.findings
            assert all(isinstance(f, Finding) for f in a)
            assert [(f.signature, f.step, f.summary) for f in a] == [(f.signature, f.step, f.summary) for f in b], spec.name


def test_analyze_on_an_empty_frame_reports_insufficient_data():
    from autopsy import analyze

    frame = make_frame(run="r", source="t", metric=[], step=[], value=[])
    attach_runs(frame, {"r": RunInfo(name="r")})
    rep = analyze(frame)
    assert rep.runs[0].errors == []
    assert [f.signature for f in rep.runs[0].findings] == ["insufficient_data"]


def test_long_series_use_the_same_rules():
    """A 120k-step run takes the block paths (reduce_points, block medians) and still finds its failure."""
    frame, truth = make_run(failure="divergence", steps=120_000, logging_steps=1, seed=1)
    from autopsy import analyze

    sigs = {f.signature for f in analyze(frame).runs[0].findings}
    assert "divergence" in sigs
    assert pd.api.types.is_integer_dtype(frame["step"]) and np.isfinite(frame["value"]).any()


_norms = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1e6, allow_nan=False), st.sampled_from([0.5, 150.0, 2e4])),
    min_size=3,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(_norms)
def test_leap_levels_where_a_leap_can_be_are_the_expanding_median(values):
    """exploding_gradients computes the median of the logs before a log only where a jump-fold leap is possible: at
    every log that leaps by the full expanding median, it has the same level, and it finds no other leap."""
    from autopsy.detectors.gradients import _median_before

    v = np.asarray(values, dtype=np.float64)
    jump = 100.0
    full = pd.Series(v).expanding().median().shift(1).to_numpy(copy=True)
    fast = _median_before(v, jump)
    for before in (full, fast):
        before[:2] = np.nan
        before[before <= 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        leaps_full, leaps_fast = v / full >= jump, v / fast >= jump
    np.testing.assert_array_equal(leaps_fast, leaps_full)
    np.testing.assert_allclose(fast[leaps_full], full[leaps_full], rtol=1e-12)
