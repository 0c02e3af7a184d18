"""Mixed precision: the fp16 loss scale that keeps halving, and updates skipped on every step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["loss_scale_collapse"]

_SCALE_CAUSE = (
    "fp16 overflow on (nearly) every step: gradients or activations exceed fp16's range, so the dynamic "
    "scaler keeps halving and the optimizer skips the updates"
)
_SCALE_FIX = (
    "train in bf16 (bf16=True) instead of fp16; otherwise lower the LR, clip gradients, and find the "
    "overflowing layer (autopsy replay)"
)


def _skipping_every_step(frame: pd.DataFrame, points: int, share: float) -> dict[str, Any] | None:
    """The running count of skipped updates (DeepSpeed's ``skipped=``, Megatron's "number of skipped iterations")
    climbs with the step: over the last `points` logs, `share` or more of the steps were skipped."""
    sk = series(frame, "train/skipped_steps", finite=True)
    if len(sk) < points:
        return None
    tail = sk.iloc[-points:]
    steps_elapsed = float(tail.index[-1] - tail.index[0])
    skipped = float(tail.iloc[-1] - tail.iloc[0])
    if steps_elapsed <= 0 or skipped < share * steps_elapsed:
        return None
    return {
        "skipped_in_window": evidence_value(skipped),
        "steps_in_window": int(steps_elapsed),
        "from_step": int(tail.index[0]),
        "to_step": int(tail.index[-1]),
    }


@detector(
    requires_any=("train/loss_scale", "train/skipped_steps"),
    signatures=("loss_scale_collapse",),
    tags=("numerics", "precision"),
)
def loss_scale_collapse(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    max_final_scale: float = 8.0,
    min_halvings: int = 3,
    min_overflow_streak: int = 3,
    skip_points: int = 3,
    skip_share: float = 0.9,
) -> list[Finding]:
    """The fp16 loss scale keeps halving: every step overflows and is skipped.

    Signature: the dynamic loss scale ends at or below `max_final_scale` after falling by at least
    `min_halvings` halvings, or sits pinned there while overflow messages repeat (`min_overflow_streak`), or ends
    below 1 at all: scalers start at 2**16 (apex, torch GradScaler, DeepSpeed; some at 2**32), so a scale of 8 is
    13+ halvings down and one below 1 is 16+; a high scale that halves a few times at the start is the normal search,
    and a low but constant scale with no overflows is stable (bf16 runs print 1.0). Or: the running count of
    skipped updates climbs by `skip_share` (90%) of the steps over the last `skip_points` (3) logs: every update is
    skipped.
    Likely causes: fp16 on a model whose activations or gradients exceed fp16's range (max 65504).
    What to check next: train in bf16; if fp16 is a must, lower the LR, clip, and find the overflowing layer.
    """
    skipping = _skipping_every_step(frame, skip_points, skip_share)
    if skipping is not None:
        return [_skipping_finding(skipping)]
    s = series(frame, "train/loss_scale")
    v = s.to_numpy(dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < 2:
        return []
    final, peak = float(v[-1]), float(v.max())
    if final > max_final_scale:
        return []
    halvings = math.log2(peak / final) if final > 0 else float("inf")
    ov = series(frame, "train/overflow")
    flagged = np.isin(s.index.to_numpy()[::-1], ov.index[ov.to_numpy() > 0])
    streak = int(np.argmin(flagged)) if not flagged.all() else int(flagged.size)
    if halvings < min_halvings and streak < min_overflow_streak and final >= 1.0:
        return []
    steps = s.index.to_numpy()
    drop = np.flatnonzero(np.diff(s.to_numpy()) < 0)
    first = int(steps[drop[0] + 1]) if drop.size else int(steps[0])
    evidence = {
        "final_scale": evidence_value(final),
        "peak_scale": evidence_value(peak),
        "halvings": evidence_value(halvings),
        "overflow_streak_at_end": streak,
        "points": int(v.size),
    }
    if info is not None and info.loss_scale_at_minimum:
        evidence["scaler_at_minimum"] = True
    loss = series(frame, "train/loss")
    nan_loss = bool(len(loss) and not np.isfinite(loss.to_numpy()[-1]))
    severity = Severity.CRITICAL if final <= 1.0 or nan_loss or streak >= min_overflow_streak else Severity.ERROR
    return [
        Finding(
            signature="loss_scale_collapse",
            severity=severity,
            step=first,
            end_step=int(steps[-1]),
            metric="train/loss_scale",
            summary=f"fp16 loss scale fell to {num(final)} ({halvings:.0f} halvings from "
            f"{num(peak)}); steps overflow and are skipped",
            evidence=evidence,
            cause=_SCALE_CAUSE,
            fix=_SCALE_FIX,
        )
    ]


def _skipping_finding(skipping: dict[str, Any]) -> Finding:
    """The finding of a run whose every update is skipped (the skipped-steps counter climbs with the steps)."""
    return Finding(
        signature="loss_scale_collapse",
        severity=Severity.CRITICAL,
        step=skipping["from_step"],
        end_step=skipping["to_step"],
        metric="train/skipped_steps",
        summary=(
            f"{skipping['skipped_in_window']:g} of the {num(skipping['steps_in_window'])} updates from "
            f"step {num(skipping['from_step'])} were skipped: every step overflows"
        ),
        evidence=skipping,
        cause=_SCALE_CAUSE,
        fix=_SCALE_FIX,
    )
