"""The gradient norm: exploding, vanishing, and clipping that fires on every step.

HF Trainer logs the *pre-clip* global norm (``grad_norm``), so a norm above ``max_grad_norm`` means the
clip fired on that step. Early logs (warmup) carry high norms by nature and are left out of baselines.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy.detectors._context import clip_threshold, warmup_end_step
from autopsy.detectors._evidence import minutes_between
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import reduce_points, runs_of_true, settle_index
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["clip_saturation", "exploding_gradients", "vanishing_gradients"]


def _post_warmup(
    frame: pd.DataFrame, info: RunInfo | None, metric: str, *, how: str = "median", elevated: float = 2.0
) -> pd.Series:
    """The series after warmup and the run's first logs.

    Warmup (from the config or the LR curve) is always left out. The first logs are left out only while they sit
    above `elevated` (2x) the median of the rest: the high norms of a run's first steps are what the skip is for, and
    an excerpt that starts mid-run (a log pasted from step 35496) or a run whose first norms are already settled keeps
    every point, which matters when it has only 6-10 of them.
    """
    s = reduce_points(series(frame, metric, finite=True), max_points=50_000, how=how)
    steps = s.index.to_numpy()
    wu = warmup_end_step(frame, info)
    i_wu = settle_index(steps, wu, early_share=0.0, min_skip=0) if wu else 0
    i_early = settle_index(steps, None, early_share=0.05)
    i0 = i_wu
    if i_early > i_wu and s.size > i_early:
        v = s.to_numpy(dtype=np.float64)
        ref = float(np.median(v[i_early:]))
        j = i_wu
        while j < i_early and v[j] > elevated * ref:
            j += 1
        i0 = j
    return s.iloc[i0:]


@detector(requires=("train/grad_norm",), signatures=("exploding_gradients",), tags=("gradients",))
def exploding_gradients(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    factor: float = 10.0,
    baseline_share: float = 0.25,
    min_points: int = 6,
) -> list[Finding]:
    """The grad norm jumps or climbs far above its post-warmup baseline.

    Signature: after warmup, the grad norm exceeds `factor` (10x) the median of the first `baseline_share` of
    post-warmup logs. Healthy fine-tuning runs see the norm drift up a few times as the loss falls; 10x is outside
    that. Sustained to the end of the run: error; an isolated burst the run recovered from: warning. Before a NaN,
    this is folded into the NaN finding as its precursor.
    Likely causes: learning rate too high, a bad batch, low precision overflow, clipping off.
    What to check next: max_grad_norm (is clipping on?), the LR at the first step, the batch at that step.
    """
    g = _post_warmup(frame, info, "train/grad_norm", how="max")
    v = g.to_numpy(dtype=np.float64)
    steps = g.index.to_numpy()
    if v.size < min_points:
        return []
    nb = max(3, int(baseline_share * v.size))
    base = float(np.median(v[:nb]))
    if not base > 0:
        return []
    high = v > factor * base
    if not high.any():
        return []
    starts, ends = runs_of_true(high)
    first = int(starts[0])
    sustained = bool(ends[-1] == v.size and (ends[-1] - starts[-1]) >= max(2, int(0.05 * v.size)))
    peak = int(np.argmax(v))
    evidence = {
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
    # when the climb began: the first point of the stretch above 3x baseline leading into the first high point
    above3 = v[: first + 1] > 3.0 * base
    s3, _ = runs_of_true(above3)
    if s3.size:
        climb = int(s3[-1])
        evidence["climb_start_step"] = int(steps[climb])
        minutes = minutes_between(frame, "train/grad_norm", int(steps[climb]), int(steps[first]))
        if minutes is not None:
            evidence["climb_minutes"] = minutes
    max_norm, _ = clip_threshold(frame, info)
    evidence["max_grad_norm"] = max_norm
    return [
        Finding(
            signature="exploding_gradients",
            severity=Severity.ERROR if sustained else Severity.WARNING,
            step=int(steps[first]),
            end_step=int(steps[int(ends[-1]) - 1]),
            metric="train/grad_norm",
            summary=(
                f"grad norm rose to {evidence['max_value']} ({evidence['max_ratio']}x its post-warmup median of "
                f"{evidence['baseline_median']}) from step {steps[first]}" + (" and stayed high" if sustained else "")
            ),
            evidence=evidence,
            cause="learning rate too high, a bad batch, or an overflow; clipping keeps the update bounded but not the cause",
            fix="lower the LR, keep max_grad_norm=1.0, inspect the batch at the first high step",
        )
    ]


@detector(requires=("train/grad_norm", "train/loss"), signatures=("vanishing_gradients",), tags=("gradients",))
def vanishing_gradients(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    abs_floor: float = 1e-5,
    collapse: float = 1e-3,
    min_points: int = 8,
) -> list[Finding]:
    """The grad norm sits near zero while the loss has not converged.

    Signature: over the last half of the run the median grad norm is below `abs_floor` (1e-5: a trainable model's
    global norm is orders above it, even for LoRA) or below `collapse` (1/1000) of its early median, while the loss
    stays above a third of its starting level (not converged to ~0).
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
    late = float(np.median(v[v.size // 2 :]))
    early = float(np.median(v[: max(2, v.size // 10)]))
    loss_start = float(np.median(lv[: max(2, lv.size // 10)]))
    loss_end = float(np.median(lv[-max(2, lv.size // 10) :]))
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
    }
    return [
        Finding(
            signature="vanishing_gradients",
            severity=Severity.ERROR,
            step=first,
            end_step=int(g.index[-1]),
            metric="train/grad_norm",
            summary=f"grad norm ~{evidence['median_grad_norm_late']} (near zero) from step {first} while the loss stays at {evidence['loss_end']}",
            evidence=evidence,
            cause="no gradient reaches the weights: frozen/detached parameters, an adapter not attached, or labels all masked",
            fix="print the trainable parameter count; check requires_grad, the PEFT wrapping and the labels",
        )
    ]


# the share of clipped updates some frameworks print themselves (fairseq: "clip=100%", a percentage)
_CLIP_SHARE_METRICS = ("clip", "train/clip")


def _logged_clip_share(frame: pd.DataFrame, start_step: int) -> tuple[float, str, int] | None:
    """(share of updates clipped, metric, points) from a logged clip percentage, after ``start_step``."""
    for name in _CLIP_SHARE_METRICS:
        c = series(frame, name, finite=True)
        if len(c):
            c = c[c.index >= start_step]
            if len(c):
                share = float(np.clip(np.median(c.to_numpy(dtype=np.float64)) / 100.0, 0.0, 1.0))
                return share, name, int(len(c))
    return None


@detector(requires=("train/grad_norm",), signatures=("clip_saturation",), tags=("gradients",))
def clip_saturation(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    max_grad_norm: float | None = None,
    share: float = 0.5,
    severe_ratio: float = 10.0,
    min_points: int = 5,
) -> list[Finding]:
    """Clipping fires on most steps after warmup.

    Signature: the pre-clip grad norm is above max_grad_norm on more than `share` (half) of post-warmup logs.
    max_grad_norm comes from the parameter, else the run's config, else HF Trainer's default 1.0 (said in the
    evidence), assumed only when the run looks like an HF Trainer run (its source, config names or log keys): a
    fairseq, mmengine, Keras or custom loop has no such default. Where the log prints the share of clipped updates
    itself (fairseq's `clip=100%`), that share is the evidence and no threshold is needed.
    Severity follows harm: a median norm `severe_ratio` (10x) the threshold or more, or a rising loss, is an error
    (the run is wasting compute); a few times the threshold with a loss that is not rising is info (an assumed
    threshold is less evidence, not more: confirm it); a logged clip share with a loss that is not falling, warning.
    Likely causes: the learning rate is too high for the model/data; a threshold far below the natural norm.
    What to check next: lower the LR 2-10x; confirm max_grad_norm in the run config.
    """
    assumed = False
    if max_grad_norm is None:
        max_grad_norm, assumed = clip_threshold(frame, info)
        if max_grad_norm is None and info is not None and "max_grad_norm" in info.config:
            return []  # clipping is off: config_audit says so
    elif not max_grad_norm > 0:
        return []
    g = _post_warmup(frame, info, "train/grad_norm")
    v = g.to_numpy(dtype=np.float64)
    if v.size < min_points:
        return []
    logged = None
    if max_grad_norm is None:
        # no threshold known: only a clip share the log prints itself can tell
        logged = _logged_clip_share(frame, int(g.index[0]))
        if logged is None or logged[0] <= share:
            return []
        over = np.ones(v.size, dtype=bool)
        frac = logged[0]
    else:
        over = v > max_grad_norm
        frac = float(over.mean())
        if frac <= share:
            return []
    med = float(np.median(v))
    ratio = med / max_grad_norm if max_grad_norm else None
    loss = series(frame, "train/loss", finite=True)
    loss = loss[loss.index >= g.index[0]]
    falling = rising = None
    if len(loss) >= min_points:
        lv = loss.to_numpy()
        q = max(2, lv.size // 5)
        falling = bool(np.median(lv[-q:]) < 0.97 * np.median(lv[:q]))
        rising = bool(np.median(lv[-q:]) > 1.03 * np.median(lv[:q]))
    if (ratio is not None and ratio >= severe_ratio) or rising:
        severity = Severity.ERROR
    elif logged is not None and not falling:
        severity = Severity.WARNING  # the log itself says every update is clipped and the loss is not improving
    else:
        severity = Severity.INFO
    evidence = {
        "share_clipped": evidence_value(frac),
        "median_grad_norm": evidence_value(med),
        "max_grad_norm": max_grad_norm,
        "max_grad_norm_assumed": assumed,
        "median_over_threshold": evidence_value(ratio) if ratio is not None else None,
        "points": int(v.size),
        "loss_falling": falling,
        "loss_rising": rising,
    }
    if logged is not None:
        evidence.update(
            share_source=f"the log's own '{logged[1]}' (percent of updates clipped)", share_points=logged[2]
        )
        summary = (
            f"the log says clipping fired on {frac:.0%} of updates ('{logged[1]}'); median pre-clip grad norm "
            f"{evidence['median_grad_norm']}, max_grad_norm not printed"
        )
    else:
        note = " (max_grad_norm assumed: HF default 1.0)" if assumed else ""
        summary = (
            f"clipping fired on {frac:.0%} of post-warmup logs: median pre-clip grad norm {evidence['median_grad_norm']} "
            f"= {ratio:.1f}x max_grad_norm {max_grad_norm}{note}"
        )
    return [
        Finding(
            signature="clip_saturation",
            severity=severity,
            step=int(g.index[int(np.argmax(over))]),
            end_step=int(g.index[-1]),
            metric="train/grad_norm",
            summary=summary,
            evidence=evidence,
            cause="the learning rate is too high: every update is cut to max_grad_norm, so the step size is set by the clip",
            fix="lower the learning rate 2-10x; confirm max_grad_norm in the run's config",
        )
    ]
