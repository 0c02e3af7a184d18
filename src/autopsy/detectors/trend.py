"""The shape of the loss curve: divergence and oscillation.

Every rule here looks at a smoothed curve after warmup and the first logs, with thresholds relative to the loss' own
level and noise, so huge-but-stable losses (CTC sums) and tiny converged losses are judged alike. RL/preference
objectives (losses near 0 or negative by design) are left out. A log that prints only its validation loss is judged on
that (:func:`autopsy.detectors._context.primary_loss`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.checkpoints import restart_point
from autopsy.detectors._advice import clip_advice
from autopsy.detectors._context import primary_loss, rl_objective, warmup_end_step
from autopsy.detectors._evidence import grad_climb, minutes_between
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import noise_scale, reduce_points, settle_index
from autopsy.detectors.epochs import epoch_length
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["divergence", "oscillation"]

_CAUSE = "learning rate too high for this model and batch size, or a broken LR schedule"


def _fix(info: RunInfo | None) -> str:
    changes = ", ".join(x for x in ("a 2-10x lower LR", clip_advice(info), "warmup") if x)
    return f"restart from the last checkpoint before the turn with {changes}"


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(v).rolling(window, min_periods=1, center=True).median().to_numpy()


def _turn(v: np.ndarray, steps: np.ndarray, wu: int | None, rise: float, tail_share: float) -> dict[str, Any] | None:
    """Where the loss rose for good: its best smoothed level, the end level, and the turn between them."""
    n = v.size
    smooth = _smooth(v, max(3, n // 20))
    tail = max(3, int(tail_share * n))
    end_level = float(np.median(v[-tail:]))
    body = smooth[: n - tail]
    if body.size == 0:
        return None
    start_i = settle_index(steps[: n - tail], wu, early_share=0.0, min_skip=0)
    start_i = 0 if start_i >= body.size else start_i
    best_i = start_i + int(np.argmin(body[start_i:]))
    best = float(body[best_i])
    first_level = float(np.median(v[: max(3, n // 20)]))
    climb = end_level - best
    if not (climb > rise * abs(best) and climb > 0.25 * max(first_level - best, 0.0) and climb > 6.0 * noise_scale(v)):
        return None
    past = np.flatnonzero(smooth[best_i:] > best + 0.5 * climb)  # the first step past half of the climb
    turn_i = best_i + int(past[0]) if past.size else best_i
    return {
        "best_step": int(steps[best_i]),
        "best_level": evidence_value(best),
        "end_level": evidence_value(end_level),
        "rise_ratio": evidence_value(end_level / best if best > 0 else float("inf")),
        "turn_step": int(steps[turn_i]),
        "last_step": int(steps[-1]),
        "first_level": evidence_value(first_level),
    }


def _end_jump(v: np.ndarray, steps: np.ndarray, jump: float) -> dict[str, Any] | None:
    """A short log whose last logs leapt `jump` x above the median of the (at least 3) logs before them."""
    k = 1 if v.size >= 4 and v[-1] >= jump * np.median(v[:-1]) > 0 else 0
    while k and k + 1 < v.size - 2 and v[-(k + 1)] >= jump * np.median(v[: -(k + 1)]):
        k += 1
    if not k:
        return None
    level = float(np.median(v[:-k]))
    return {
        "best_step": int(steps[-k - 1]),
        "best_level": evidence_value(level),
        "end_level": evidence_value(float(v[-1])),
        "rise_ratio": evidence_value(float(v[-1]) / level),
        "turn_step": int(steps[-k]),
        "last_step": int(steps[-1]),
        "points_high": k,
    }


def _divergence_evidence(
    frame: pd.DataFrame, info: RunInfo | None, ev: dict[str, Any], metric: str, wu: int | None
) -> None:
    turn = int(ev["turn_step"])
    if wu:
        ev["warmup_end_step"] = int(wu)
        ev["turn_at_warmup_end"] = bool(abs(turn - wu) <= max(2, 0.25 * wu))
    lr = series(frame, "train/learning_rate", finite=True)
    at = lr[lr.index <= turn]
    if len(at):
        ev["learning_rate_at_turn"] = evidence_value(float(at.iloc[-1]))
    ev.update(grad_climb(frame, turn))
    minutes = minutes_between(frame, metric, int(ev["best_step"]), turn)
    if minutes is not None:
        ev["minutes_best_to_turn"] = minutes
    ev.update(restart_point(info, turn))


@detector(requires_any=("train/loss", "eval/loss"), signatures=("divergence",), tags=("loss",))
def divergence(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    rise: float = 0.5,
    tail_share: float = 0.1,
    min_points: int = 6,
    jump: float = 3.0,
) -> list[Finding]:
    """The loss rises and does not come back (no NaN needed).

    Signature: after warmup, the median of the last `tail_share` of logs sits more than `rise` (50%) above the best
    smoothed level reached before, and the rise is more than a quarter of the progress made from the start to the
    best level and well above the noise (a converged loss wobbling at 0.002 is not divergence). The loss is the train
    loss, else the only loss the log prints (its validation loss). In a log too short for a shape (under
    `min_points` logs): the last logs leap `jump` (3x) above the median of the logs before them and the log ends
    there (a warning on one such log, critical on two or more).
    Likely causes: learning rate too high for the model/batch size, a broken LR schedule, no clipping.
    What to check next: the grad norm's climb before the turn (evidence), the LR at the turn; restart from the
    last checkpoint before the turn with a 2-10x lower LR.
    """
    if rl_objective(frame, info):
        return []
    metric, loss = primary_loss(frame)
    v, steps = loss.to_numpy(dtype=np.float64), loss.index.to_numpy()
    keep = v != 0.0  # exact 0.0 losses are the NaN filter's doing (loss_zero_collapse), not a level
    v, steps = v[keep], steps[keep]
    wu = warmup_end_step(frame, info)
    ev = _turn(v, steps, wu, rise, tail_share) if v.size >= min_points else _end_jump(v, steps, jump)
    if ev is None:
        return []
    _divergence_evidence(frame, info, ev, metric, wu)
    name = metric.split("/")[0] if metric != "train/loss" else "train"
    short = "points_high" in ev
    severity = Severity.WARNING if short and ev["points_high"] == 1 else Severity.CRITICAL
    summary = (
        f"{name} loss diverged: from its best {num(ev['best_level'])} at step {num(ev['best_step'])} it climbed to "
        f"{num(ev['end_level'])} by the end (turn at step {num(ev['turn_step'])}) and did not come back"
    )
    if short:
        summary = (
            f"{name} loss leapt from ~{num(ev['best_level'])} to {num(ev['end_level'])} ({num(ev['rise_ratio'])}x) at step "
            f"{num(ev['turn_step'])} and the log ends there"
        )
    return [
        Finding(
            signature="divergence",
            severity=severity,
            step=int(ev["turn_step"]),
            end_step=int(steps[-1]),
            metric=metric,
            summary=summary,
            evidence=ev,
            cause=_CAUSE,
            fix=_fix(info),
        )
    ]


def _acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Autocorrelation for lags 0..max_lag (FFT)."""
    x = x - x.mean()
    n = x.size
    f = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(f * np.conj(f))[: max_lag + 1]
    return ac / ac[0] if ac[0] > 0 else np.zeros(max_lag + 1)


def _period(r: np.ndarray, *, min_acf: float, min_cycles: int) -> tuple[int, float, float] | None:
    """(period, autocorrelation at it, at half of it) of a sawtooth beyond what white noise shows for this many
    points (an autocorrelation of white noise has a standard error of about 1/sqrt(n): 3/sqrt(n) is its bound)."""
    n = r.size
    bound = max(min_acf, 3.0 / math.sqrt(n))
    ac = _acf(r, n // min_cycles)
    if ac.size < 4:
        return None
    peaks = np.flatnonzero((ac[1:-1] > ac[:-2]) & (ac[1:-1] >= ac[2:])) + 1
    peaks = peaks[(peaks >= 3) & (ac[peaks] > bound)]
    if peaks.size == 0:
        return None
    period = int(peaks[0])
    trough = float(ac[max(1, period // 2 - 1) : period // 2 + 2].min())
    return (period, float(ac[period]), trough) if trough <= -bound else None


@detector(requires=("train/loss",), signatures=("oscillation",), tags=("loss",))
def oscillation(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_acf: float = 0.3,
    min_amplitude: float = 0.05,
    min_cycles: int = 3,
) -> list[Finding]:
    """A sustained sawtooth in the train loss after warmup, well above the noise.

    Signature: after detrending, the autocorrelation has a trough below -`min_acf` at half a period and a peak above
    `min_acf` at the period, both beyond 3/sqrt(n) (what white per-batch noise gives for n points), at least
    `min_cycles` periods fit after warmup, and the swing is more than `min_amplitude` (5%) of the loss level. A period
    equal to the epoch length is the staircase of memorization (`epoch_boundary_drop`), not an oscillation.
    Likely causes: a learning rate too high for the schedule (the optimizer bounces across a valley), a cyclic LR.
    What to check next: lower the LR 2-5x or lengthen warmup; check lr_scheduler_type.
    """
    if rl_objective(frame, info):
        return []
    loss = reduce_points(series(frame, "train/loss", finite=True), max_points=4096, how="mean")
    i0 = settle_index(loss.index.to_numpy(), warmup_end_step(frame, info), early_share=0.1)
    v, steps = loss.to_numpy(dtype=np.float64)[i0:], loss.index.to_numpy()[i0:]
    n = v.size
    if n < 4 * min_cycles:
        return []
    r = v - _smooth(v, max(5, n // 4))
    found = _period(r, min_acf=min_acf, min_cycles=min_cycles)
    level = float(np.median(np.abs(v)))
    amp = float(np.percentile(r, 95) - np.percentile(r, 5)) / 2.0
    if found is None or level <= 0 or amp < min_amplitude * level:
        return []
    period, at_period, trough = found
    period_steps = period * (float(np.median(np.diff(steps))) if n > 1 else 1.0)
    epoch = epoch_length(frame, info)
    if epoch and min(abs(period_steps - epoch * k) for k in (1, 2)) <= 0.15 * epoch:
        return []
    evidence = {
        "period_steps": evidence_value(period_steps),
        "amplitude": evidence_value(amp),
        "relative_amplitude": evidence_value(amp / level),
        "autocorrelation_at_period": evidence_value(at_period),
        "autocorrelation_at_half_period": evidence_value(trough),
        "from_step": int(steps[0]),
    }
    return [
        Finding(
            signature="oscillation",
            severity=Severity.WARNING,
            step=int(steps[0]),
            end_step=int(steps[-1]),
            metric="train/loss",
            summary=(
                f"train loss oscillates with a period of ~{period_steps:.0f} steps and a swing of "
                f"{amp / level:.0%} of its level"
            ),
            evidence=evidence,
            cause="the learning rate is too high for the schedule, or the LR schedule itself cycles",
            fix="lower the learning rate 2-5x or lengthen warmup; check lr_scheduler_type",
        )
    ]
