"""Robust statistics shared by the detector families: vectorised, NaN-aware, cheap on a million points."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["causal_median", "noise_scale", "reduce_points", "robust_scale", "runs_of_true", "settle_index"]


def reduce_points(s: pd.Series, *, max_points: int = 20_000, how: str = "median") -> pd.Series:
    """Block-aggregate a long series to at most ``max_points`` (median/mean/max per block), keyed by each block's first step.

    Trend detectors do not need 1M points: a block of b consecutive logs is summarised by one number,
    like a coarser ``logging_steps``.
    """
    n = len(s)
    if n <= max_points:
        return s
    b = int(math.ceil(n / max_points))
    m = n // b
    v = s.to_numpy(dtype=np.float64)[: m * b].reshape(m, b)
    reducer: Any = {"median": np.median, "mean": np.mean, "max": np.max, "min": np.min}[how]
    agg = reducer(v, axis=1)
    return pd.Series(agg, index=s.index[: m * b : b])


def robust_scale(v: np.ndarray) -> float:
    """1.4826 * median absolute deviation from the median (the Gaussian sigma for normal noise)."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def noise_scale(v: np.ndarray) -> float:
    """Point-to-point noise of a series, robust to trends and steps: MAD of second differences / sqrt(6).

    For white noise of sigma s the second difference has sigma sqrt(6) s; a smooth trend cancels out.
    """
    v = v[np.isfinite(v)]
    if v.size < 4:
        return 0.0
    return robust_scale(np.diff(v, n=2)) / math.sqrt(6.0)


def causal_median(v: np.ndarray, window: int, *, min_periods: int = 3) -> np.ndarray:
    """Median of the ``window`` points strictly before each point (NaN where fewer than ``min_periods``).

    Long series (over 100k points) use medians of blocks of window/4 points, then a median over
    the previous 4 blocks: the same level, 10x faster than an exact rolling median.
    """
    n = v.size
    if n == 0:
        return np.empty(0)
    if n <= 100_000 or window < 8:
        med = pd.Series(v).rolling(window, min_periods=min_periods).median().to_numpy()
        return np.concatenate(([np.nan], med[:-1]))
    b = max(2, window // 4)
    m = int(math.ceil(n / b))
    pad = np.full(m * b, np.nan)
    pad[:n] = v
    with warnings.catch_warnings():  # a block of only NaN (a gap) gives NaN, which is what we want
        warnings.simplefilter("ignore", RuntimeWarning)
        blocks = np.nanmedian(pad.reshape(m, b), axis=1)
    lvl = pd.Series(blocks).rolling(4, min_periods=1).median().to_numpy()
    lvl = np.concatenate(([np.nan], lvl[:-1]))  # previous blocks only
    return np.repeat(lvl, b)[:n]


def runs_of_true(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of each stretch of True in ``mask``."""
    if mask.size == 0:
        return np.empty(0, dtype=int), np.empty(0, dtype=int)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return edges[::2], edges[1::2]


def settle_index(steps: np.ndarray, warmup_end: int | None, *, early_share: float = 0.05, min_skip: int = 2) -> int:
    """Index of the first point past warmup and the first logs (first logged values are not failures)."""
    n = steps.size
    if n == 0:
        return 0
    skip = max(min_skip, int(early_share * n))
    if warmup_end:
        skip = max(skip, int(np.searchsorted(steps, warmup_end, side="left")))
    return min(skip, n)
