"""Non-finite numbers in the logs: NaN/Inf losses and gradient norms, and the 0.0 that hides them.

HF Trainer writes bare ``NaN`` into trainer_state.json, but with its default
``logging_nan_inf_filter=True`` a window whose losses were all NaN is logged as ``loss: 0.0``; the
pre-clip ``grad_norm`` is logged unfiltered, so it is often the only trace of the NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.checkpoints import restart_point
from autopsy.detectors._advice import nan_cause, nan_fix, used_fp16
from autopsy.detectors._context import rl_objective
from autopsy.detectors._evidence import grad_climb
from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.metrics import loss_metrics
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["loss_zero_collapse", "nan_grad_norm", "nan_loss"]


def _kind(x: float) -> str:
    return "NaN" if np.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _nonfinite_run(values: pd.Series) -> dict | None:
    """First non-finite point of a series and how it continued (None when all finite)."""
    v = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(v)
    if not bad.any():
        return None
    steps = values.index.to_numpy()
    i = int(np.argmax(bad))
    finite_before = np.flatnonzero(~bad[:i])
    finite_after = np.flatnonzero(~bad[i:])
    last_finite = int(steps[finite_before[-1]]) if finite_before.size else None
    first_val = float(v[i])
    return {
        "first_step": int(steps[i]),
        "first_value": first_val,
        "last_finite_step": last_finite,
        "last_finite_value": float(v[finite_before[-1]]) if finite_before.size else None,
        "nonfinite_points": int(bad.sum()),
        "points": int(v.size),
        "last_step": int(steps[-1]),
        # the series never came back: every point from the first bad one to the end is non-finite
        "persistent": bool(finite_after.size == 0),
        "recovered_points": int(finite_after.size),
        "first_kind": _kind(first_val),
        "kinds": sorted({_kind(x) for x in np.unique(v[bad])}),
    }


@detector(requires_any=("train/loss", "eval/loss"), signatures=("nan_loss",), tags=("numerics",))
def nan_loss(frame: pd.DataFrame, *, info: RunInfo | None = None) -> list[Finding]:
    """A loss is NaN or infinite at some step.

    Signature: a logged train or eval loss is NaN/+inf/-inf.
    Likely causes: learning rate too high, fp16 overflow, a bad batch.
    What to check next: the grad norm before the first bad step; lower the LR, use bf16, clip; replay the batch.
    """
    out = []
    for metric in loss_metrics(metric_names(frame)):
        run = _nonfinite_run(series(frame, metric))
        if run is None:
            continue
        first = run["first_step"]
        evidence = {k: evidence_value(v) for k, v in run.items() if k not in ("first_step", "kinds", "first_kind")}
        evidence["kinds"] = run["kinds"]
        evidence.update(restart_point(info, first))
        evidence.update(grad_climb(frame, first))
        severity = Severity.CRITICAL if run["persistent"] or metric.startswith("eval/") else Severity.WARNING
        where = "train" if metric.startswith("train/") else "eval"
        summary = f"{where} loss is {num(run['first_kind'])} from step {first}"
        if not run["persistent"]:
            summary = f"{where} loss was non-finite at {num(run['nonfinite_points'])} of {num(run['points'])} points from step {first}, then finite again"
        out.append(
            Finding(
                signature="nan_loss",
                severity=severity,
                step=first,
                end_step=run["last_step"] if run["persistent"] else None,
                metric=metric,
                summary=summary,
                evidence=evidence,
                cause=nan_cause(info, frame),
                fix=nan_fix(info, frame),
            )
        )
    return out


@detector(requires=("train/grad_norm",), signatures=("nan_grad_norm",), tags=("numerics",))
def nan_grad_norm(frame: pd.DataFrame, *, info: RunInfo | None = None) -> list[Finding]:
    """The gradient norm is NaN or infinite: the update poisoned the weights.

    Signature: the logged (pre-clip) grad norm is NaN/Inf, even where the logged loss looks finite.
    Likely causes: as nan_loss; HF Trainer's default logging_nan_inf_filter=True hides NaN losses (they log as 0.0),
    so the grad norm is often the only trace. An isolated non-finite norm that the run recovered from is the fp16
    loss scaler skipping a step (warning, not critical).
    What to check next: the last finite checkpoint before the first bad step; the grad norm's climb before it.
    """
    run = _nonfinite_run(series(frame, "train/grad_norm"))
    if run is None:
        return []
    first = run["first_step"]
    evidence = {k: evidence_value(v) for k, v in run.items() if k not in ("first_step", "kinds", "first_kind")}
    evidence["kinds"] = run["kinds"]
    evidence["first_value"] = run["first_kind"]
    evidence.update(restart_point(info, first))
    evidence.update(grad_climb(frame, first))
    loss = series(frame, "train/loss")
    after = loss[loss.index >= first]
    if len(after):
        evidence["loss_after_first_bad"] = evidence_value(float(after.iloc[0]))
        evidence["loss_zero_after"] = bool((after.to_numpy() == 0.0).all())
    evidence["steps_after_failure"] = int(run["last_step"] - first + 1)
    # the weights are gone when the norm never came back, or when the loss is NaN/0.0 afterwards
    dead = run["persistent"] or (
        len(after) > 0 and (~np.isfinite(after.to_numpy()) | (after.to_numpy() == 0.0)).mean() > 0.5
    )
    if dead:
        severity = Severity.CRITICAL
        summary = f"grad norm is {num(run['first_kind'])} from step {first} to the end of the run ({num(run['nonfinite_points'])} logged points)"
    else:
        severity = Severity.WARNING
        summary = (
            f"grad norm was non-finite at {num(run['nonfinite_points'])} of {num(run['points'])} points from step {first}, "
            "and the run recovered (skipped steps)"
        )
    cause = nan_cause(info, frame)
    if evidence.get("loss_zero_after"):
        cause += "; the loss reads 0.0 because logging_nan_inf_filter=True replaced the NaN losses"
    return [
        Finding(
            signature="nan_grad_norm",
            severity=severity,
            step=first,
            end_step=run["last_step"] if run["persistent"] else None,
            metric="train/grad_norm",
            summary=summary,
            evidence=evidence,
            cause=cause,
            fix=nan_fix(info, frame)
            if dead
            else (
                "fp16's loss scaler skipped those steps: if skips are frequent, switch to bf16"
                if used_fp16(info, frame)
                else "a step the run skipped or survived: inspect its batch if it repeats"
            ),
        )
    ]


def _zero_stretch(v: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest stretch of exact 0.0 losses."""
    zero = v == 0.0
    if not zero.any():
        return None
    idx = np.flatnonzero(np.diff(np.concatenate(([0], zero.astype(np.int8), [0]))))
    starts, ends = idx[::2], idx[1::2]
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k]) - 1


def _share_during(frame: pd.DataFrame, metric: str, first: int, last: int, test: Any) -> float:
    s = series(frame, metric)
    during = s[(s.index >= first) & (s.index <= last)].to_numpy(dtype=np.float64)
    return float(test(during).mean()) if during.size else 0.0


def _zero_verdict(grad_nonfinite: bool, grad_zero: bool, to_end: bool, fix: str) -> tuple[str, str, Severity]:
    if grad_nonfinite:
        return (
            "the loss was NaN: HF Trainer's logging_nan_inf_filter=True logs 0.0 for a window whose losses were "
            "all NaN, and the grad norm is non-finite at the same steps",
            fix + "; set logging_nan_inf_filter=False to see NaN losses as they happen",
            Severity.CRITICAL,
        )
    if grad_zero:
        return (
            "no gradient flows: every label is -100 (masked) or the loss is detached",
            "check the collator's labels (are all -100?), the prompt masking, and that trainable parameters exist",
            Severity.CRITICAL,
        )
    return (
        "a NaN hidden by logging_nan_inf_filter, or every label masked (-100)",
        "log the grad norm, set logging_nan_inf_filter=False, and check that the labels are not all -100",
        Severity.CRITICAL if to_end else Severity.ERROR,
    )


@detector(requires=("train/loss",), signatures=("loss_zero_collapse",), tags=("numerics",))
def loss_zero_collapse(frame: pd.DataFrame, *, info: RunInfo | None = None, min_points: int = 3) -> list[Finding]:
    """The train loss drops to exactly 0.0 and stays there.

    Signature: at least `min_points` consecutive logged losses of exactly 0.0 after a non-zero loss, to the end of
    the run (or a long stretch). A real LM loss is never exactly 0.0. Zeros from the very first log (a log that
    starts after the onset, or a run that never had a loss) count only with unmistakable company at the same steps:
    a non-finite grad norm (HF's NaN filter), a grad norm of exactly 0.0 (nothing to learn), or a learning rate of
    exactly 0.0 (the optimizer does not step).
    Likely causes: HF Trainer logs 0.0 for a window whose losses were all NaN (logging_nan_inf_filter=True); or every
    label is -100 (nothing to learn). RL/preference losses (GRPO) can be exactly 0 and are not reported.
    What to check next: the grad norm at the same steps (NaN => hidden NaN); the labels of the batch (all -100?).
    """
    loss = series(frame, "train/loss")
    v = loss.to_numpy(dtype=np.float64)
    stretch = _zero_stretch(v) if v.size >= min_points else None
    if stretch is None or stretch[1] - stretch[0] + 1 < min_points:
        return []
    start, end = stretch
    steps = loss.index.to_numpy()
    first, last = int(steps[start]), int(steps[end])
    before = v[:start][np.isfinite(v[:start])]
    grad_nonfinite = _share_during(frame, "train/grad_norm", first, last, lambda x: ~np.isfinite(x)) > 0.5
    grad_zero = _share_during(frame, "train/grad_norm", first, last, lambda x: np.abs(x) < 1e-12) > 0.5
    lr_zero = _share_during(frame, "train/learning_rate", first, last, lambda x: x == 0.0) > 0.5
    from_start = start == 0 or before.size == 0 or np.median(np.abs(before)) == 0
    if from_start and not (grad_nonfinite or grad_zero or lr_zero):
        return []  # zeros alone, with nothing to fall from, prove nothing
    if rl_objective(frame, info) and not grad_nonfinite:
        return []  # GRPO/PPO losses are exactly 0 by construction at times
    to_end = end == v.size - 1
    evidence = {
        "first_zero_step": first,
        "last_zero_step": last,
        "zero_points": end - start + 1,
        "to_end_of_run": bool(to_end),
        "loss_before": evidence_value(float(before[-1])) if before.size else None,
        "median_loss_before": evidence_value(float(np.median(before))) if before.size else None,
        "last_nonzero_step": int(steps[start - 1]) if start > 0 else None,
        "from_first_log": bool(from_start),
        "grad_norm_nonfinite": grad_nonfinite,
        "grad_norm_zero": grad_zero,
        "learning_rate_zero": lr_zero,
    }
    evidence.update(restart_point(info, first))
    cause, fix, severity = _zero_verdict(grad_nonfinite, grad_zero, to_end, nan_fix(info, frame))
    return [
        Finding(
            signature="loss_zero_collapse",
            severity=severity,
            step=first,
            end_step=last,
            metric="train/loss",
            summary=f"train loss is exactly 0.0 from step {first}"
            + (" to the end of the run" if to_end else f" to step {last}"),
            evidence=evidence,
            cause=cause,
            fix=fix,
        )
    ]
