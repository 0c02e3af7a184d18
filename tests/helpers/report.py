"""A fixed synthetic Report (findings + a small frame) for the renderers' golden files and content tests.

Fixed on purpose: real runs change as detectors are added, so goldens are made from this report only.
Strings come from "user files" and include markup to prove the renderers escape them.
"""

from __future__ import annotations

import numpy as np

from autopsy.findings import Finding, Report, RunReport, Severity
from autopsy.frame import make_frame
from autopsy.runinfo import Damage, RunInfo, attach_runs

HOSTILE = '<script>alert("x")</script>&run|1'


def synthetic_frame(run: str, *, steps: int = 60, bad_from: int = 31, spike_at: int = 12) -> object:
    s = np.arange(1, steps + 1)
    loss = 4.0 * np.exp(-s / 40.0) + 0.5
    loss[spike_at - 1] *= 3.0
    grad = 0.8 + 0.1 * np.sin(s)
    grad[s >= bad_from] = np.nan
    loss[s >= bad_from] = 0.0
    lr = np.where(s <= 10, 5e-4 * s / 10, 5e-4 * (steps - s) / (steps - 10))
    es = np.arange(10, steps + 1, 10)
    ev = np.where(es < bad_from, 3.0 - es / 100.0, np.nan)
    wall = 1_700_000_000.0 + 2.0 * s
    cols = {"metric": [], "step": [], "value": [], "wall": []}
    for name, st, val, w in (("train/loss", s, loss, wall), ("train/grad_norm", s, grad, wall),
                             ("train/learning_rate", s, lr, wall), ("eval/loss", es, ev, 1_700_000_000.0 + 2.0 * es)):
        cols["metric"] += [name] * len(st)
        cols["step"] += list(st)
        cols["value"] += list(val)
        cols["wall"] += list(w)
    return make_frame(run=run, source="trainer_state", metric=cols["metric"], step=cols["step"], value=cols["value"],
                      wall_time=cols["wall"])


def synthetic_run(name: str = HOSTILE, *, failed: bool = True) -> RunReport:
    frame = synthetic_frame(name) if failed else synthetic_frame(name, bad_from=10_000)
    info = RunInfo(name=name, path=f"runs/{name}", sources=["trainer_state"], files=[f"runs/{name}/trainer_state.json"],
                   config={"learning_rate": 5e-4, "max_grad_norm": 1.0, "warmup_steps": 10, "fp16": True,
                           "logging_nan_inf_filter": True, "<b>odd key</b>": "<i>odd value</i>"},
                   max_steps=60, logging_steps=1, eval_steps=10, save_steps=10,
                   checkpoints={10: f"runs/{name}/checkpoint-10", 20: f"runs/{name}/checkpoint-20",
                                30: f"runs/{name}/checkpoint-30"},
                   damage=[Damage(file="runs/x/events.out.tfevents.1", offset=4096, problem="truncated record <crc>",
                                  salvaged="212 of 230 events")],
                   notes=["1 console log skipped: no timestamps"])
    attach_runs(frame, {name: info})
    findings = []
    if failed:
        restart = {"restart_checkpoint": f"runs/{name}/checkpoint-30", "restart_step": 30, "steps_to_redo": 1}
        findings = [
            Finding("nan_grad_norm", Severity.CRITICAL, "grad norm is NaN from step 31 to the end of the run", 31, 60,
                    "train/grad_norm", {"first_value": "NaN", "last_finite_step": 30, "last_finite_value": 0.81, **restart},
                    cause="a too-high learning rate or fp16 overflow poisoned the update",
                    fix="restart from checkpoint-30 with a 3x lower LR and bf16", detector="nan_grad_norm", run=name),
            Finding("loss_zero_collapse", Severity.CRITICAL, "train loss is exactly 0.0 from step 31", 31, 60, "train/loss",
                    {"first_zero_step": 31, "zero_points": 30, **restart}, cause="NaN hidden by logging_nan_inf_filter",
                    fix="set logging_nan_inf_filter=False", detector="loss_zero_collapse", run=name),
            Finding("loss_spike", Severity.WARNING, "loss jumps 3.0x at step 12 and recovers", 12, 12, "train/loss",
                    {"ratio": 3.0, "baseline": 3.6}, cause="a bad batch", fix="inspect batch 12", detector="loss_spike",
                    run=name),
            Finding("nonfinite_origin", Severity.CRITICAL, "first non-finite output: model.layers.0.mlp (forward)", 31, None,
                    None, {"module": "model.layers.0.mlp", "phase": "forward", "dtype": "float16", "finite_in_float32": True,
                           "max_abs_input": 70000.0}, cause="fp16 overflow", fix="bf16", detector="replay", run=name),
        ]
    return RunReport(run=name, path=f"runs/{name}", sources=["trainer_state"], config=dict(info.config),
                     findings=findings, skipped=[{"detector": "overfitting", "reason": "too few eval points"}],
                     frame=frame, info=info)


def synthetic_report(*, runs: int = 1) -> Report:
    out = [synthetic_run()]
    if runs > 1:
        out.append(synthetic_run("healthy-run", failed=False))
    return Report(runs=out, version="0.0.0-golden")
