"""Evidence every failure family attaches: how long the run took to get there, the grad norm's climb before it.
Numbers a reader can re-check, computed one way for every detector (where to restart: :mod:`autopsy.checkpoints`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._stats import runs_of_true
from autopsy.findings import evidence_value
from autopsy.series import series, wall_times

__all__ = ["grad_climb", "minutes_between"]


def minutes_between(frame: pd.DataFrame, metric: str, start: int, end: int) -> float | None:
    """Wall-clock minutes between two logged steps of ``metric`` (None when unknown)."""
    wt = wall_times(frame, metric)
    if wt.empty or start not in wt.index or end not in wt.index:
        return None
    a, b = float(wt.loc[start]), float(wt.loc[end])
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return round((b - a) / 60.0, 2)


def grad_climb(frame: pd.DataFrame, first_bad: int, *, factor: float = 3.0) -> dict[str, Any]:
    """When the grad norm started climbing before ``first_bad`` (a precursor), in steps and minutes.

    A climb is the last unbroken stretch of finite grad norms above ``factor`` x their earlier median (3x
    is well outside the +-30% per-step jitter of a healthy run's norm).
    """
    g = series(frame, "train/grad_norm", finite=True)
    g = g[g.index < first_bad]
    if len(g) < 6:
        return {}
    v = g.to_numpy()
    base = float(np.median(v[: max(3, len(v) // 2)]))
    if not base > 0:
        return {}
    out: dict[str, Any] = {
        "grad_norm_median_before": evidence_value(base),
        "grad_norm_before_failure": evidence_value(float(v[-1])),
    }
    high = v > factor * base
    if not high[-1]:
        return out
    starts, _ = runs_of_true(high)
    start = int(g.index[int(starts[-1])])
    out.update(grad_norm_climb_start=start, climb_steps_before_failure=int(first_bad - start))
    minutes = minutes_between(frame, "train/grad_norm", start, int(g.index[-1]))
    if minutes is not None:
        out["climb_minutes_before_failure"] = minutes
    return out
