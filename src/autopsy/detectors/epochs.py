"""The staircase of memorisation: the train loss steps down at each epoch start."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.detectors._stats import noise_scale, reduce_points
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.metrics import eval_loss_metrics
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["epoch_boundary_drop", "epoch_length"]


def epoch_length(frame: pd.DataFrame, info: RunInfo | None) -> float | None:
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


def _boundary_drops(v: np.ndarray, steps: np.ndarray, epoch: float) -> dict[str, Any] | None:
    """Per epoch boundary: the drop of the loss across it, the decline over the same span just before it, and the
    standard error of the difference of two medians of k noisy logs."""
    n_epochs = int(math.floor((steps[-1] - 1) / epoch + 1e-9))
    if n_epochs < 1:
        return None
    bounds = np.arange(1, n_epochs + 1) * epoch
    per_epoch = np.searchsorted(steps, bounds[0])
    k = max(3, min(50, int(per_epoch) // 10))  # a tenth of an epoch on each side, 3..50 logs
    pos = np.searchsorted(steps, bounds, side="right")  # first log after each boundary
    ok = (pos >= k) & (pos + k <= v.size)
    pos, bounds = pos[ok], bounds[ok]
    if pos.size == 0:
        return None
    windows = np.arange(k)
    before = np.median(v[pos[:, None] - k + windows], axis=1)
    after = np.median(v[pos[:, None] + windows], axis=1)
    prev = np.full(pos.size, np.nan)  # the background: the decline over the same number of logs just before
    ok2 = pos >= 2 * k
    if ok2.any():
        earlier = np.median(v[pos[ok2][:, None] - 2 * k + windows], axis=1)
        prev[ok2] = (earlier - before[ok2]) / np.abs(earlier)
    # a median of k logs of per-log noise sigma moves by about 1.25 sigma / sqrt(k); a difference of two, sqrt(2) that
    se = 1.25 * noise_scale(v) * math.sqrt(2.0 / k) / np.maximum(np.abs(before), 1e-12)
    return {
        "pos": pos,
        "bounds": bounds,
        "k": k,
        "drop": (before - after) / np.abs(before),
        "background": np.nan_to_num(prev, nan=0.0),
        "se": se,
    }


def _eval_still_improving(frame: pd.DataFrame, tol: float) -> bool | None:
    """True when an eval loss is logged and still within `tol` of its best at the end of the run."""
    evals = eval_loss_metrics(metric_names(frame))
    if not evals:
        return None
    e = series(frame, evals[0], finite=True).to_numpy()
    if e.size < 2:
        return None
    return bool(e[-1] <= e.min() + tol * abs(e.min()))


@detector(requires=("train/loss",), signatures=("epoch_boundary_drop",), tags=("loss", "generalization"))
def epoch_boundary_drop(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_drop: float = 0.05,
    ratio: float = 2.0,
    sigmas: float = 3.0,
    eval_tol: float = 0.01,
) -> list[Finding]:
    """The train loss steps down at each epoch start: the model memorised the samples it has seen.

    Signature: at half or more of the epoch boundaries (at least 2 of them, or the only one), the median loss of the logs just after
    the boundary is more than `min_drop` (5%) below the median just before, more than `ratio` (2x) the decline over
    the same number of logs just before it, and more than `sigmas` (3) standard errors of that difference (a median
    of k per-batch losses moves by about 1.25 sigma/sqrt(k): with a handful of noisy logs per side, a boundary
    "drop" is noise). Reported instead of a spike, since the jump is a step down. A warning when nothing shows that
    generalisation held; an info note when an eval loss is logged and is still at its best at the end of the run
    (within `eval_tol`, 1%): the staircase has not cost anything yet.
    Likely causes: too many epochs over a small dataset.
    What to check next: the eval loss (overfitting?), fewer epochs, more data, regularization.
    """
    loss = reduce_points(series(frame, "train/loss", finite=True), max_points=20_000)
    epoch = epoch_length(frame, info)
    v, steps = loss.to_numpy(dtype=np.float64), loss.index.to_numpy()
    if epoch is None or epoch <= 0 or v.size < 12 or np.all(v == 0.0):
        return []
    d = _boundary_drops(v, steps, epoch)
    if d is None:
        return []
    drop, bg_each, pos = d["drop"], d["background"], d["pos"]
    hit = (drop > min_drop) & (drop > ratio * np.maximum(bg_each, 0.0)) & (drop > sigmas * d["se"])
    need = 1 if pos.size == 1 else max(2, int(math.ceil(0.5 * pos.size)))
    if hit.sum() < need:
        return []
    first = int(np.flatnonzero(hit)[0])
    bg = float(np.median(bg_each))
    improving = _eval_still_improving(frame, eval_tol)
    evidence = {
        "steps_per_epoch": evidence_value(epoch),
        "boundaries": [int(b) for b in np.round(d["bounds"])[:20]],
        "drops": [evidence_value(float(x)) for x in drop[:20]],
        "boundaries_with_drop": int(hit.sum()),
        "within_epoch_drop_same_span": evidence_value(bg),
        "logs_compared_each_side": int(d["k"]),
        "eval_loss_still_at_best": improving,
    }
    summary = (
        f"train loss steps down at {int(hit.sum())} of {pos.size} epoch boundaries "
        f"(median drop {np.median(drop[hit]):.0%} vs {max(bg, 0.0):.1%} inside epochs): memorization"
    )
    if improving:
        summary += "; the eval loss is still at its best, so it has not hurt generalisation yet"
    return [
        Finding(
            signature="epoch_boundary_drop",
            severity=Severity.INFO if improving else Severity.WARNING,
            step=int(steps[pos[first]]),
            end_step=int(steps[pos[hit][-1]]),
            metric="train/loss",
            summary=summary,
            evidence=evidence,
            cause="the model memorises the training samples it has already seen: too many epochs over a small dataset",
            fix="fewer epochs, more (or deduplicated) data, regularization; watch the eval loss for overfitting",
        )
    ]
