"""The gradient norm: exploding, vanishing, and clipping that fires on every step.

HF Trainer logs the *pre-clip* global norm (``grad_norm``), so a norm above ``max_grad_norm`` means the
clip fired on that step. Early logs (warmup) carry high norms by nature and are left out of baselines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._advice import clip_clause
from autopsy.detectors._context import clip_threshold, post_warmup
from autopsy.detectors._evidence import minutes_between
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import reduce_points, runs_of_true
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["exploding_gradients", "vanishing_gradients"]


_FEW_CANDIDATES = 32  # up to this many, each candidate's median is computed alone; beyond, one expanding median


def _median_before(v: np.ndarray, jump: float) -> np.ndarray:
    """The median of the logs before each log, where it can make a `jump`x leap (NaN elsewhere: no leap there).

    A positive median of logs is at least half their smallest positive value (the lower middle value may be 0), so a
    log under `jump` x half the smallest positive log before it cannot be a leap; only the others (none, in a healthy
    run) need the median. That spares the expanding median of a long log (seconds for a million logs)."""
    positive = np.where(v > 0, v, np.inf)
    floor = np.concatenate(([np.inf], np.minimum.accumulate(positive)[:-1]))  # smallest positive log before each
    with np.errstate(invalid="ignore"):
        candidates = np.flatnonzero(v >= jump * floor / 2)
    if candidates.size > _FEW_CANDIDATES:
        return pd.Series(v).expanding().median().shift(1).to_numpy(copy=True)
    before = np.full(v.size, np.nan)
    for i in candidates.tolist():  # a few at most
        before[i] = np.median(v[:i]) if i else np.nan
    return before


def _jumps(frame: pd.DataFrame, jump: float) -> tuple[int, int, float, float] | None:
    """(index of the first jump, its length, the level before it, the peak) when the grad norm leaps `jump` x the
    median of the logs before it on two logs in a row, or `jump` squared on one; None otherwise. Any phase, any length
    of log: a hundredfold leap is no warmup's doing."""
    g = series(frame, "train/grad_norm", finite=True)
    v = g.to_numpy(dtype=np.float64)
    if v.size < 3:
        return None
    before = _median_before(v, jump)
    before[:2] = np.nan  # at least two logs make a level
    before[before <= 0] = np.nan  # a level of 0 (no gradient yet) gives no ratio
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = v / before
    high = np.nan_to_num(ratio, nan=0.0) >= jump
    starts, ends = runs_of_true(high)
    for s, e in zip(starts, ends):
        if e - s >= 2 or ratio[s] >= jump * jump:
            return int(s), int(e - s), float(before[s]), float(v[s:e].max())
    return None


def _exploding_finding(
    frame: pd.DataFrame,
    info: RunInfo | None,
    evidence: dict[str, Any],
    *,
    first: int,
    last: int,
    sustained: bool,
    summary: str,
    isolated: bool = False,
) -> Finding:
    climb = evidence.get("climb_start_step")
    if climb is not None:
        minutes = minutes_between(frame, "train/grad_norm", int(climb), first)
        if minutes is not None:
            evidence["climb_minutes"] = minutes
    evidence["max_grad_norm"] = clip_threshold(frame, info)[0]
    return Finding(
        signature="exploding_gradients",
        severity=Severity.ERROR if sustained else (Severity.INFO if isolated else Severity.WARNING),
        step=first,
        end_step=last,
        metric="train/grad_norm",
        summary=summary + (" and stayed high" if sustained else " on isolated logs, back at once" if isolated else ""),
        evidence=evidence,
        cause="learning rate too high, a bad batch, or an overflow; clipping keeps the update bounded but not the cause",
        fix=", ".join(x for x in ("lower the LR", clip_clause(info), "inspect the batch at the first high step") if x),
    )


def _leap_finding(frame: pd.DataFrame, info: RunInfo | None, jump: float) -> list[Finding]:
    """The grad norm leaps ``jump``x above the logs before it (any phase, any length of log)."""
    leap = _jumps(frame, jump)
    if leap is None:
        return []
    at, length, level, peak_value = leap
    g_all = series(frame, "train/grad_norm", finite=True)
    st = g_all.index.to_numpy()
    sustained = at + length == st.size and length >= 2
    evidence = {
        "level_before": evidence_value(level),
        "first_high_step": int(st[at]),
        "max_value": evidence_value(peak_value),
        "max_ratio": evidence_value(peak_value / level),
        "high_points": length,
        "jump_factor": jump,
        "to_end_of_run": sustained,
    }
    summary = (
        f"grad norm leapt from ~{num(evidence['level_before'])} to {num(evidence['max_value'])} "
        f"({num(evidence['max_ratio'])}x) at step {st[at]}"
    )
    return [
        _exploding_finding(
            frame,
            info,
            evidence,
            first=int(st[at]),
            last=int(st[at + length - 1]),
            sustained=sustained,
            summary=summary,
        )
    ]


@detector(requires=("train/grad_norm",), signatures=("exploding_gradients",), tags=("gradients",))
def exploding_gradients(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    factor: float = 10.0,
    baseline_share: float = 0.25,
    min_points: int = 6,
    jump: float = 100.0,
    isolated_points: int = 2,
) -> list[Finding]:
    """The grad norm jumps or climbs far above its post-warmup baseline.

    Signature: after warmup, the grad norm exceeds `factor` (10x) the median of the first `baseline_share` of
    post-warmup logs. Healthy fine-tuning runs see the norm drift up a few times as the loss falls; 10x is outside
    that. Or, in a log of any length and any phase: the norm leaps `jump` (100x) above the median of the logs before
    it on two logs in a row, or `jump`^2 (10,000x) on one; a single hundredfold log is one bad batch that clipping
    absorbs. Sustained to the end of the run: error; a burst the run recovered from: warning; no more than
    `isolated_points` (2) logs over 10x, each back at the baseline on the next log, are single hard batches (a
    gradient spike that clipping absorbs, common in any long run): an info note. Before a NaN, this is folded into
    the NaN finding as its precursor.
    Likely causes: learning rate too high, a bad batch, low precision overflow, clipping off.
    What to check next: max_grad_norm (is clipping on?), the LR at the first step, the batch at that step.
    """
    g = post_warmup(frame, info, "train/grad_norm", how="max")
    v = g.to_numpy(dtype=np.float64)
    steps = g.index.to_numpy()
    nb = max(3, int(baseline_share * v.size))
    base = float(np.median(v[:nb])) if v.size >= min_points else 0.0
    high = v > factor * base if base > 0 else np.zeros(v.size, dtype=bool)
    if high.any():
        starts, ends = runs_of_true(high)
        first = int(starts[0])
        sustained = bool(ends[-1] == v.size and (ends[-1] - starts[-1]) >= max(2, int(0.05 * v.size)))
        peak = int(np.argmax(v))
        evidence: dict[str, Any] = {
            "baseline_median": evidence_value(base),
            "first_high_step": int(steps[first]),
            "first_high_value": evidence_value(float(v[first])),
            "max_value": evidence_value(float(v[peak])),
            "max_step": int(steps[peak]),
            "max_ratio": evidence_value(float(v[peak] / base)),
            "high_points": int(high.sum()),
            "bursts": int(starts.size),
            "to_end_of_run": sustained,
            "threshold": evidence_value(factor * base),
        }
        s3, _ = runs_of_true(v[: first + 1] > 3.0 * base)  # the climb: the stretch above 3x leading into it
        if s3.size:
            evidence["climb_start_step"] = int(steps[int(s3[-1])])
        summary = (
            f"grad norm rose to {num(evidence['max_value'])} ({num(evidence['max_ratio'])}x its post-warmup median of "
            f"{num(evidence['baseline_median'])}) from step {steps[first]}"
        )
        span: dict[str, Any] = {
            "first": int(steps[first]),
            "last": int(steps[int(ends[-1]) - 1]),
            "sustained": sustained,
            "isolated": not sustained and int(high.sum()) <= isolated_points and bool(np.all(ends - starts == 1)),
        }
        return [_exploding_finding(frame, info, evidence, summary=summary, **span)]
    return _leap_finding(frame, info, jump)


@detector(requires=("train/grad_norm", "train/loss"), signatures=("vanishing_gradients",), tags=("gradients",))
def vanishing_gradients(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    abs_floor: float = 1e-5,
    collapse: float = 1e-3,
    min_points: int = 8,
    zero_share: float = 0.9,
) -> list[Finding]:
    """The grad norm sits near zero while the loss has not converged.

    Signature: over the last half of the run the median grad norm is below `abs_floor` (1e-5: a trainable model's
    global norm is orders above it, even for LoRA) or below `collapse` (1/1000) of its early median, while the loss
    stays above a third of its starting level (not converged to ~0). Or: the norm is exactly 0.0 on `zero_share` (90%)
    of the logs or more, whatever the loss does (an RL loss included): no gradient reaches the weights at all. Exact
    zeros interleaved with normal norms (below `zero_share`, and not a block of `min_points` or more ending the run)
    are a reporting artefact and are set aside before the medians are taken.
    Likely causes: frozen or detached parameters, an adapter not attached, a loss computed without grad, labels
    all masked.
    What to check next: the count of trainable parameters; that the adapter wraps the model; requires_grad.
    """
    g = series(frame, "train/grad_norm", finite=True)
    loss = series(frame, "train/loss", finite=True)
    if len(g) < min_points or len(loss) < 3:
        return []
    v = reduce_points(g, max_points=20_000).to_numpy(dtype=np.float64)
    lv = reduce_points(loss, max_points=20_000).to_numpy(dtype=np.float64)
    all_zero = float((v == 0.0).mean()) >= zero_share and not (lv == 0.0).all()
    trailing = v.size - (int(np.flatnonzero(v != 0.0)[-1]) + 1 if (v != 0.0).any() else 0)
    judged = v if all_zero or trailing >= min_points else v[v != 0.0]  # interleaved zeros set aside
    late = float(np.median(judged[judged.size // 2 :]))
    early = float(np.median(judged[: max(2, judged.size // 10)]))
    tenth = max(2, lv.size // 10)
    loss_start, loss_end = float(np.median(lv[:tenth])), float(np.median(lv[-tenth:]))
    if not all_zero:
        if loss_end == 0.0 or not abs(loss_start) > 0:
            return []  # a 0.0 loss is loss_zero_collapse's finding
        converged = abs(loss_end) < abs(loss_start) / 3.0
        vanished = late < abs_floor or (early > 0 and late < collapse * early)
        if not vanished or converged:
            return []
    low = g.to_numpy() < max(abs_floor, collapse * early)
    starts, _ = runs_of_true(low)
    first = int(g.index[int(starts[-1])]) if starts.size else int(g.index[v.size // 2])
    evidence = {
        "median_grad_norm_late": evidence_value(late),
        "median_grad_norm_early": evidence_value(early),
        "loss_start": evidence_value(loss_start),
        "loss_end": evidence_value(loss_end),
        "abs_floor": abs_floor,
        "exactly_zero_share": evidence_value(float((v == 0.0).mean())),
    }
    return [_vanishing_finding(g, first, evidence)]


def _vanishing_finding(g: pd.Series, first: int, evidence: dict[str, Any]) -> Finding:
    """The vanishing_gradients finding, from step ``first`` to the last grad-norm log."""
    return Finding(
        signature="vanishing_gradients",
        severity=Severity.ERROR,
        step=first,
        end_step=int(g.index[-1]),
        metric="train/grad_norm",
        summary=f"grad norm ~{num(evidence['median_grad_norm_late'])} (near zero) from step {first} while the loss stays at {num(evidence['loss_end'])}",
        evidence=evidence,
        cause="no gradient reaches the weights: frozen/detached parameters, an adapter not attached, or labels all masked",
        fix="print the trainable parameter count; check requires_grad, the PEFT wrapping and the labels",
    )
