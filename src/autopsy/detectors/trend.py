"""The shape of the loss curve: divergence, plateau, oscillation, and the staircase of memorization.

Every rule here looks at a smoothed curve after warmup and the first logs, with thresholds relative to
the loss' own level and noise, so huge-but-stable losses (CTC sums) and tiny converged losses are judged
alike. RL/preference objectives (losses near 0 or negative by design) are left out.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from autopsy.checkpoints import restart_point
from autopsy.detectors._context import rl_objective, warmup_end_step
from autopsy.detectors._evidence import grad_climb, minutes_between
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import noise_scale, reduce_points, settle_index
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.runinfo import RunInfo, chance_levels
from autopsy.series import series

__all__ = ["divergence", "epoch_boundary_drop", "oscillation", "plateau"]


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(v).rolling(window, min_periods=1, center=True).median().to_numpy()


def _train_loss(frame: pd.DataFrame) -> pd.Series:
    loss = series(frame, "train/loss", finite=True)
    return reduce_points(loss, max_points=20_000)


@detector(requires=("train/loss",), signatures=("divergence",), tags=("loss",))
def divergence(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    rise: float = 0.5,
    tail_share: float = 0.1,
    min_points: int = 6,
) -> list[Finding]:
    """The train loss rises and does not come back (no NaN needed).

    Signature: after warmup, the median of the last `tail_share` of logs sits more than `rise` (50%) above the
    best smoothed level reached before, and the rise is more than a quarter of the progress made from the start
    to the best level and well above the noise (a converged loss wobbling at 0.002 is not divergence).
    Likely causes: learning rate too high for the model/batch size, a broken LR schedule, no clipping.
    What to check next: the grad norm's climb before the turn (evidence), the LR at the turn; restart from the
    last checkpoint before the turn with a 2-10x lower LR.
    """
    if rl_objective(frame, info):
        return []
    loss = _train_loss(frame)
    v = loss.to_numpy(dtype=np.float64)
    steps = loss.index.to_numpy()
    # exact 0.0 losses are the NaN filter's doing (loss_zero_collapse), not a level
    keep = v != 0.0
    v, steps = v[keep], steps[keep]
    n = v.size
    if n < min_points:
        return []
    wu = warmup_end_step(frame, info)
    smooth = _smooth(v, max(3, n // 20))
    tail = max(3, int(tail_share * n))
    end_level = float(np.median(v[-tail:]))
    body = smooth[: n - tail]
    start_i = settle_index(steps[: n - tail], wu, early_share=0.0, min_skip=0) if n - tail > 0 else 0
    if start_i >= body.size:
        start_i = 0
    if body.size == 0:
        return []
    best_i = start_i + int(np.argmin(body[start_i:]))
    best = float(body[best_i])
    first_level = float(np.median(v[: max(3, n // 20)]))
    climb = end_level - best
    noise = noise_scale(v)
    if not (climb > rise * abs(best) and climb > 0.25 * max(first_level - best, 0.0) and climb > 6.0 * noise):
        return []
    # the turn: the first step after the best where the smoothed loss is past half of the climb
    past = np.flatnonzero(smooth[best_i:] > best + 0.5 * climb)
    turn_i = best_i + int(past[0]) if past.size else best_i
    turn = int(steps[turn_i])
    evidence = {
        "best_step": int(steps[best_i]),
        "best_level": evidence_value(best),
        "end_level": evidence_value(end_level),
        "rise_ratio": evidence_value(end_level / best if best > 0 else float("inf")),
        "turn_step": turn,
        "last_step": int(steps[-1]),
        "first_level": evidence_value(first_level),
    }
    if wu:
        evidence["warmup_end_step"] = int(wu)
        evidence["turn_at_warmup_end"] = bool(abs(turn - wu) <= max(2, 0.25 * wu))
    lr = series(frame, "train/learning_rate", finite=True)
    if len(lr):
        at = lr[lr.index <= turn]
        if len(at):
            evidence["learning_rate_at_turn"] = evidence_value(float(at.iloc[-1]))
    evidence.update(grad_climb(frame, turn))
    minutes = minutes_between(frame, "train/loss", int(steps[best_i]), turn)
    if minutes is not None:
        evidence["minutes_best_to_turn"] = minutes
    evidence.update(restart_point(info, turn))
    return [
        Finding(
            signature="divergence",
            severity=Severity.CRITICAL,
            step=turn,
            end_step=int(steps[-1]),
            metric="train/loss",
            summary=(
                f"train loss diverged: from its best {evidence['best_level']} at step {evidence['best_step']} it climbed "
                f"to {evidence['end_level']} by the end (turn at step {turn}) and did not come back"
            ),
            evidence=evidence,
            cause="learning rate too high for this model and batch size, or a broken LR schedule",
            fix="restart from the last checkpoint before the turn with a 2-10x lower LR, max_grad_norm=1.0 and warmup",
        )
    ]


def _near_chance(
    level: float, info: RunInfo | None, tol: float, classes: tuple[int, ...] = ()
) -> tuple[str, float] | None:
    levels = dict(chance_levels(info))
    for k in (*range(2, 11), *classes):  # ln(2)..ln(10): the losses of a small classifier that learned nothing
        levels.setdefault(f"ln({k})", math.log(k))
    best = min(levels.items(), key=lambda kv: abs(kv[1] - level))
    return best if abs(best[1] - level) <= tol * best[1] else None


def _pinned_at_chance(
    v: np.ndarray, info: RunInfo | None, *, tol: float, classes: tuple[int, ...], min_points: int, min_share: float
) -> tuple[str, float, int] | None:
    """(level name, value, points) when the loss ends pinned at a chance level: the trailing run of logs within
    ``tol`` of ln(k) covers at least ``min_points`` logs and ``min_share`` of the run."""
    if v.size < min_points:
        return None
    chance = _near_chance(float(v[-1]), info, tol, classes)
    if chance is None:
        return None
    off = np.abs(v - chance[1]) > tol * chance[1]
    tail = int(v.size - (np.flatnonzero(off)[-1] + 1)) if off.any() else int(v.size)
    if tail < min_points or tail < min_share * v.size:
        return None
    return chance[0], chance[1], tail


@detector(requires=("train/loss",), signatures=("plateau",), tags=("loss",))
def plateau(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_drop: float = 0.02,
    chance_tol: float = 0.03,
    min_points: int = 8,
    pin_tol: float = 0.002,
    pin_points: int = 4,
    pin_share: float = 0.3,
    chance_classes: tuple[int, ...] = (100, 1000),
) -> list[Finding]:
    """The train loss barely moves from its start (or sits at a chance level).

    Signature: the median of the last 20% of logs is less than `min_drop` (2%) below the median of the first 10%
    after the first logs, and the difference is within the noise. At a chance level (ln(num_labels) or
    ln(vocab_size) from the config, or ln(2)..ln(10), within `chance_tol`) the run learned nothing: error.
    Also, whatever came before: a loss that ends pinned at a chance level (ln(k) for k = 2..10, `chance_classes`
    such as 100 and 1000 for CIFAR-100 and ImageNet, or the config's) within `pin_tol` (0.2%: a trained model's loss
    never sits that exactly on ln(k)) for the last `pin_points` (4) logs or more and at least `pin_share` (30%) of
    the run: error, even over a handful of logs. A loss that was flat for a phase and then fell is not reported.
    Likely causes: learning rate far too low, labels all masked, frozen weights, the optimizer not stepping; pinned
    at chance after a noisy start: saturated logits (outputs scaled up), a dead network.
    What to check next: 10x the learning rate; the labels of a batch; the trainable parameter count; the logits.
    """
    if rl_objective(frame, info):
        return []
    loss = _train_loss(frame)
    v = loss.to_numpy(dtype=np.float64)
    steps = loss.index.to_numpy()
    n = v.size
    pinned = (
        _pinned_at_chance(
            v, info, tol=pin_tol, classes=tuple(chance_classes), min_points=pin_points, min_share=pin_share
        )
        if n
        else None
    )
    if pinned is not None:
        first = n - pinned[2]
        evidence = {
            "chance_level": pinned[0],
            "chance_value": evidence_value(pinned[1]),
            "pinned_points": int(pinned[2]),
            "pinned_from_step": int(steps[first]),
            "end_level": evidence_value(float(v[-1])),
            "max_deviation": evidence_value(float(np.max(np.abs(v[first:] - pinned[1])))),
            "points": int(n),
            "first_step": int(steps[0]),
            "last_step": int(steps[-1]),
        }
        before = v[:first]
        if before.size:
            evidence["level_before"] = evidence_value(float(np.median(before)))
        return [
            Finding(
                signature="plateau",
                severity=Severity.ERROR,
                step=int(steps[first]),
                end_step=int(steps[-1]),
                metric="train/loss",
                summary=(
                    f"train loss pinned at {evidence['end_level']} ~ {pinned[0]} = {evidence['chance_value']} (chance) "
                    f"for the last {pinned[2]} logs, from step {steps[first]}: the model predicts uniformly"
                ),
                evidence=evidence,
                cause=(
                    "the model outputs a uniform distribution: saturated or dead logits (outputs scaled up, a "
                    "collapsed layer), labels masked, or the weights not updating"
                ),
                fix="check the logits' scale and the labels of a batch; lower the LR if the loss was unstable before; 10x it if it never moved",
            )
        ]
    if n < min_points or np.all(v == 0.0):
        return []
    skip = min(max(1, n // 20), 3)
    head = v[skip : skip + max(3, n // 10)]
    tail = v[-max(3, n // 5) :]
    start, end = float(np.median(head)), float(np.median(tail))
    if not abs(start) > 1e-8:
        return []
    drop = (start - end) / abs(start)
    noise = noise_scale(v)
    if drop >= min_drop:
        return []
    if drop < -0.05:
        return []  # a rising loss is divergence's business
    chance = _near_chance(end, info, chance_tol)
    evidence = {
        "start_level": evidence_value(start),
        "end_level": evidence_value(end),
        "relative_drop": evidence_value(drop),
        "noise": evidence_value(noise),
        "points": int(n),
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
    }
    lr = info.config_value("learning_rate") if info is not None else None
    if lr is not None:
        evidence["learning_rate"] = lr
    if chance:
        evidence["chance_level"] = chance[0]
        evidence["chance_value"] = evidence_value(chance[1])
        summary = f"train loss stuck at {evidence['end_level']} ~ {chance[0]} = {evidence['chance_value']} (chance) for the whole run"
        severity = Severity.ERROR
    else:
        summary = (
            f"train loss barely moved: {evidence['start_level']} -> {evidence['end_level']} ({drop:.1%}) over {n} logs"
        )
        severity = Severity.WARNING
    return [
        Finding(
            signature="plateau",
            severity=severity,
            step=int(steps[0]),
            end_step=int(steps[-1]),
            metric="train/loss",
            summary=summary,
            evidence=evidence,
            cause="the weights are not learning: learning rate far too low, labels masked, or frozen parameters",
            fix="try a 10x higher learning rate; check that labels are not all -100 and that parameters are trainable",
        )
    ]


def _acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Autocorrelation for lags 0..max_lag (FFT)."""
    x = x - x.mean()
    n = x.size
    f = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(f * np.conj(f))[: max_lag + 1]
    return ac / ac[0] if ac[0] > 0 else np.zeros(max_lag + 1)


def _epoch_length(frame: pd.DataFrame, info: RunInfo | None) -> float | None:
    """Steps per epoch, from the logged epoch or from num_train_epochs and max_steps."""
    ep = series(frame, "train/epoch", finite=True)
    if len(ep) >= 2:
        e = ep.to_numpy()
        de = e[-1] - e[0]
        if de > 0:
            return float((ep.index[-1] - ep.index[0]) / de)
    if info is not None and info.max_steps and info.num_train_epochs and info.num_train_epochs > 0:
        return float(info.max_steps) / float(info.num_train_epochs)
    return None


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
    `min_acf` at the period (white per-batch noise has neither), at least `min_cycles` periods fit after warmup, and
    the swing is more than `min_amplitude` (5%) of the loss level. A period equal to the epoch length is the
    staircase of memorization (`epoch_boundary_drop`), not an oscillation.
    Likely causes: a learning rate too high for the schedule (the optimizer bounces across a valley), a cyclic LR.
    What to check next: lower the LR 2-5x or lengthen warmup; check lr_scheduler_type.
    """
    if rl_objective(frame, info):
        return []
    loss = series(frame, "train/loss", finite=True)
    loss = reduce_points(loss, max_points=4096, how="mean")
    v = loss.to_numpy(dtype=np.float64)
    steps = loss.index.to_numpy()
    i0 = settle_index(steps, warmup_end_step(frame, info), early_share=0.1)
    v, steps = v[i0:], steps[i0:]
    n = v.size
    if n < 4 * min_cycles:
        return []
    trend = _smooth(v, max(5, n // 4))
    r = v - trend
    max_lag = n // min_cycles
    ac = _acf(r, max_lag)
    if ac.size < 4:
        return []
    peaks = np.flatnonzero((ac[1:-1] > ac[:-2]) & (ac[1:-1] >= ac[2:])) + 1
    peaks = peaks[(peaks >= 3) & (ac[peaks] > min_acf)]
    if peaks.size == 0:
        return []
    period = int(peaks[0])
    trough = float(ac[max(1, period // 2 - 1) : period // 2 + 2].min())
    if trough > -min_acf:
        return []
    level = float(np.median(np.abs(v)))
    amp = float(np.percentile(r, 95) - np.percentile(r, 5)) / 2.0
    if level <= 0 or amp < min_amplitude * level:
        return []
    dstep = float(np.median(np.diff(steps))) if n > 1 else 1.0
    period_steps = period * dstep
    epoch = _epoch_length(frame, info)
    if epoch and min(abs(period_steps - epoch * k) for k in (1, 2)) <= 0.15 * epoch:
        return []
    evidence = {
        "period_steps": evidence_value(period_steps),
        "amplitude": evidence_value(amp),
        "relative_amplitude": evidence_value(amp / level),
        "autocorrelation_at_period": evidence_value(float(ac[period])),
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
            summary=f"train loss oscillates with a period of ~{period_steps:.0f} steps and a swing of {amp / level:.0%} of its level",
            evidence=evidence,
            cause="the learning rate is too high for the schedule, or the LR schedule itself cycles",
            fix="lower the learning rate 2-5x or lengthen warmup; check lr_scheduler_type",
        )
    ]


@detector(requires=("train/loss",), signatures=("epoch_boundary_drop",), tags=("loss", "generalization"))
def epoch_boundary_drop(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_drop: float = 0.05,
    ratio: float = 2.0,
) -> list[Finding]:
    """The train loss steps down at each epoch start: the model memorised the samples it has seen.

    Signature: at most epoch boundaries (at least 2 of them, or the only one), the median loss of the logs just after
    the boundary is more than `min_drop` (5%) below the median just before, and that drop is more than `ratio` (2x)
    the decline over the same number of logs just before it. Reported instead of a spike, since the jump is a step down.
    Likely causes: too many epochs over a small dataset.
    What to check next: the eval loss (overfitting?), fewer epochs, more data, regularization.
    """
    loss = series(frame, "train/loss", finite=True)
    loss = reduce_points(loss, max_points=20_000)
    epoch = _epoch_length(frame, info)
    v = loss.to_numpy(dtype=np.float64)
    steps = loss.index.to_numpy()
    if epoch is None or epoch <= 0 or v.size < 12 or np.all(v == 0.0):
        return []
    n_epochs = int(math.floor((steps[-1] - 1) / epoch + 1e-9))
    if n_epochs < 1:
        return []
    bounds = np.arange(1, n_epochs + 1) * epoch
    per_epoch = np.searchsorted(steps, bounds[0]) if bounds.size else 0
    k = max(3, min(50, int(per_epoch) // 10))  # a tenth of an epoch on each side, 3..50 logs
    pos = np.searchsorted(steps, bounds, side="right")  # first log after each boundary
    ok = (pos >= k) & (pos + k <= v.size)
    pos, bounds = pos[ok], bounds[ok]
    if pos.size == 0:
        return []
    windows = np.arange(k)
    before = np.median(v[pos[:, None] - k + windows], axis=1)
    after = np.median(v[pos[:, None] + windows], axis=1)
    drop = (before - after) / np.abs(before)
    # the background: the decline over the same number of logs just before the boundary (the local slope)
    ok2 = pos >= 2 * k
    prev = np.full(pos.size, np.nan)
    if ok2.any():
        p2 = pos[ok2]
        earlier = np.median(v[p2[:, None] - 2 * k + windows], axis=1)
        prev[ok2] = (earlier - before[ok2]) / np.abs(earlier)
    bg_each = np.nan_to_num(prev, nan=0.0)
    bg = float(np.median(bg_each))
    hit = (drop > min_drop) & (drop > ratio * np.maximum(bg_each, 0.0))
    need = 1 if pos.size == 1 else max(2, int(math.ceil(0.5 * pos.size)))
    if hit.sum() < need:
        return []
    first = int(np.flatnonzero(hit)[0])
    evidence = {
        "steps_per_epoch": evidence_value(epoch),
        "boundaries": [int(b) for b in np.round(bounds)[:20]],
        "drops": [evidence_value(float(d)) for d in drop[:20]],
        "boundaries_with_drop": int(hit.sum()),
        "within_epoch_drop_same_span": evidence_value(float(bg)),
        "logs_compared_each_side": int(k),
    }
    return [
        Finding(
            signature="epoch_boundary_drop",
            severity=Severity.WARNING,
            step=int(steps[pos[first]]),
            end_step=int(steps[pos[hit][-1]]),
            metric="train/loss",
            summary=(
                f"train loss steps down at {int(hit.sum())} of {pos.size} epoch boundaries "
                f"(median drop {np.median(drop[hit]):.0%} vs {max(bg, 0.0):.1%} inside epochs): memorization"
            ),
            evidence=evidence,
            cause="the model memorises the training samples it has already seen: too many epochs over a small dataset",
            fix="fewer epochs, more (or deduplicated) data, regularization; check the eval loss for overfitting",
        )
    ]
