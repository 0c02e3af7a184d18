"""Per-signature tests on seeded synthetic runs (autopsy.synth), presets, postprocess rules, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from autopsy import analyze
from autopsy.findings import Severity
from autopsy.frame import make_frame
from autopsy.runinfo import RunInfo, attach_runs, run_info
from autopsy.synth import make_run
from helpers.detect import detect

MINE = {"loss_spike", "divergence", "plateau", "oscillation", "epoch_boundary_drop", "exploding_gradients",
        "vanishing_gradients", "clip_saturation", "overfitting", "eval_flat", "sparse_eval", "throughput_drop",
        "memory_growth", "config_risk", "insufficient_data"}

CASES = [
    ("loss_spike", "exp"), ("divergence", "power"), ("exploding_gradients", "exp"), ("vanishing_gradients", "slow"),
    ("clip_saturation", "power"), ("overfitting", "exp"), ("eval_flat", "slow"), ("plateau", "exp"),
    ("oscillation", "power"), ("epoch_boundary_drop", "exp"), ("throughput_drop", "exp"), ("memory_growth", "power"),
]


@pytest.mark.parametrize("failure,shape", CASES)
@pytest.mark.parametrize("seed,logging_steps", [(11, 1), (12, 10)])
def test_finds_the_planted_failure_and_nothing_unexpected(failure, shape, seed, logging_steps):
    frame, truth = make_run(failure=failure, shape=shape, seed=seed, noise=0.04, logging_steps=logging_steps, steps=1000)
    # the planted signature at any severity (clip saturation with a falling loss is info by design), others at warning+
    found = {f.signature: f for f in analyze(frame).runs[0].findings if f.severity >= Severity.WARNING or f.signature == failure}
    assert failure in found, f"missed {failure}: {[f.summary for f in found.values()]}"
    extra = set(found) - set(truth.expected) - truth.allowed
    assert not extra, [found[s].summary for s in extra]
    step = found[failure].step
    if failure in ("loss_spike", "exploding_gradients", "throughput_drop"):
        # the first step at which the signature is visible: within a few logs of the plant
        assert abs(step - truth.expected[failure]) <= 3 * logging_steps, (step, truth.expected[failure])


@pytest.mark.parametrize("shape", ["exp", "power", "fast", "slow", "epochs", "classifier", "dpo", "grpo", "ctc"])
def test_healthy_shapes_are_quiet(shape):
    frame, _ = make_run(failure=None, shape=shape, seed=21, noise=0.05, logging_steps=1, steps=1000)
    loud = [f for f in analyze(frame).runs[0].findings if f.severity >= Severity.WARNING]
    assert loud == [], [f.summary for f in loud]


def test_synth_is_seeded():
    a, ta = make_run(failure="loss_spike", seed=5)
    b, tb = make_run(failure="loss_spike", seed=5)
    c, _ = make_run(failure="loss_spike", seed=6)
    assert a.equals(b) and ta.expected == tb.expected
    assert not a["value"].equals(c["value"])


def _spiky(values):
    steps = np.arange(1, len(values) + 1)
    f = make_frame(run="r", source="t", metric="train/loss", step=steps, value=values)
    attach_runs(f, {"r": RunInfo(name="r")})
    return f


def test_spike_presets_follow_their_published_rules():
    rng = np.random.default_rng(0)
    base = 2.0 + 0.02 * rng.normal(size=400)
    v = base.copy()
    v[250:256] = 5.0  # 2.5x the rolling mean for 6 logs: llm-foundry fires; 10x the first 100 max: no
    f = _spiky(v)
    assert [x.step for x in detect("loss_spike", f, method="llm_foundry")] == [251]
    assert detect("loss_spike", f, method="megatron") == []
    assert [x.step for x in detect("loss_spike", f, method="olmo")] == [251]
    assert [x.step for x in detect("loss_spike", f)] == [251]
    v2 = base.copy()
    v2[300] = 25.0  # > 10x the first-100 max: Megatron's check
    assert [x.step for x in detect("loss_spike", _spiky(v2), method="megatron")] == [301]


def test_epoch_drop_is_not_a_spike():
    frame, _ = make_run(failure="epoch_boundary_drop", seed=3, logging_steps=1)
    sigs = {f.signature for f in analyze(frame).runs[0].findings}
    assert "epoch_boundary_drop" in sigs and "loss_spike" not in sigs


def test_divergence_has_a_timeline_and_restart_point():
    frame, truth = make_run(failure="divergence", seed=2, at=0.5)
    f = [x for x in analyze(frame).runs[0].findings if x.signature == "divergence"][0]
    assert f.severity == Severity.CRITICAL
    ev = f.evidence
    assert ev["best_step"] < ev["turn_step"] <= ev["last_step"]
    assert ev["best_step"] >= truth.expected["divergence"] * 0.8
    assert ev["restart_step"] is not None and ev["restart_step"] <= ev["turn_step"]
    assert "grad_norm_climb_start" in ev and ev["grad_norm_climb_start"] <= ev["turn_step"]


def test_nan_absorbs_its_exploding_precursor():
    frame, truth = make_run(failure="nan", seed=4, at=0.5)
    fs = analyze(frame).runs[0].findings
    sigs = [f.signature for f in fs]
    assert "exploding_gradients" not in sigs and "divergence" not in sigs
    nan = [f for f in fs if f.signature == "nan_grad_norm"][0]
    assert nan.step == truth.expected["nan_grad_norm"]
    assert nan.evidence["precursors"][0]["signature"] == "exploding_gradients"
    assert nan.evidence["precursors"][0]["steps_before"] > 0


def test_config_risk_becomes_the_cause_it_explains():
    frame, _ = make_run(failure="plateau", seed=1)
    info = run_info(frame, "synth")
    info.config["learning_rate"] = 1e-9
    fs = analyze(frame).runs[0].findings
    plateau = [f for f in fs if f.signature == "plateau"][0]
    assert "learning_rate=1e-09" in plateau.cause
    assert plateau.evidence["config_risk"][0]["setting"] == "learning_rate"
    assert not [f for f in fs if f.signature == "config_risk" and f.evidence["setting"] == "learning_rate"]


def test_clip_saturation_says_when_the_threshold_was_assumed():
    frame, _ = make_run(failure="clip_saturation", seed=1)
    del run_info(frame, "synth").config["max_grad_norm"]
    f = [x for x in analyze(frame).runs[0].findings if x.signature == "clip_saturation"][0]
    assert f.evidence["max_grad_norm"] == 1.0 and f.evidence["max_grad_norm_assumed"] is True
    assert "assumed" in f.summary


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "autopsy", *map(str, args)], capture_output=True, text=True)


def test_cli_lists_detectors_with_params_and_docs():
    r = _cli("detectors")
    assert r.returncode == 0, r.stderr
    for name in ("loss_spike", "divergence", "plateau", "clip_saturation", "overfitting", "config_risk"):
        assert name in r.stdout
    assert "method: one of 'robust', 'megatron', 'llm_foundry', 'olmo' = 'robust'" in r.stdout
    assert "max_grad_norm: float or None = None" in r.stdout
    one = _cli("detectors", "loss_spike")
    assert "Signature:" in one.stdout and "megatron" in one.stdout


def test_cli_param_override_select_and_ignore(healthy_run):
    # the committed healthy run's grad norm sits at ~0.85: with max_grad_norm=0.5 clipping fires on every step
    r = _cli("analyze", healthy_run, "--format", "json", "--select", "clip_saturation", "--param", "clip_saturation.max_grad_norm=0.5")
    assert r.returncode == 0, r.stderr
    fs = json.loads(r.stdout)["runs"][0]["findings"]
    assert [f["signature"] for f in fs] == ["clip_saturation"] and fs[0]["evidence"]["max_grad_norm"] == 0.5
    r = _cli("analyze", healthy_run, "--format", "json", "--ignore", "clip_saturation", "--param", "clip_saturation.max_grad_norm=0.5")
    assert "clip_saturation" not in r.stdout
    bad = _cli("analyze", healthy_run, "--param", "clip_saturation.nope=1")
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_committed_runs(healthy_run, nan_run):
    assert [f for f in analyze(healthy_run).runs[0].findings if f.severity >= Severity.WARNING] == []
    fs = analyze(nan_run).runs[0].findings
    loud = {f.signature for f in fs if f.severity >= Severity.WARNING}
    assert {"loss_zero_collapse", "nan_grad_norm", "nan_loss"} <= loud
    # no crying wolf from the curve detectors: no divergence on the 0.0 loss, no spike, no plateau
    assert not loud & MINE, loud & MINE
