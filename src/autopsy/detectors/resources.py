"""Throughput and memory, when the run logs them (tokens/s, samples/s, allocated memory)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.detectors._stats import reduce_points, runs_of_true
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["memory_growth", "throughput_drop"]

_THROUGHPUT = ("train/tokens_per_second", "train/samples_per_second", "train/steps_per_second")
_MEMORY = ("train/memory_allocated",)


def _first_present(frame: pd.DataFrame, names: tuple[str, ...]) -> tuple[str, pd.Series] | None:
    for name in names:
        s = series(frame, name, finite=True)
        if len(s):
            return name, s
    return None


@detector(requires_any=_THROUGHPUT, signatures=("throughput_drop",), tags=("resources",))
def throughput_drop(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    drop: float = 0.5,
    min_share: float = 0.1,
    min_points: int = 10,
) -> list[Finding]:
    """Throughput (tokens/s, samples/s) falls to half of its early level and stays there.

    Signature: a smoothed throughput below `drop` (50%) of the median of the first quarter (after the first 5% of
    logs: compilation and cache warm-up) for more than `min_share` (10%) of the run, in one stretch.
    Likely causes: a data loader stall, a leak forcing allocator churn, thermal throttling, another job on the node.
    What to check next: data loader workers, CPU/IO utilisation at that step, GPU clocks.
    """
    got = _first_present(frame, _THROUGHPUT)
    if got is None:
        return []
    metric, s = got
    s = reduce_points(s, max_points=20_000)
    v = s.to_numpy(dtype=np.float64)
    if v.size < min_points:
        return []
    i0 = max(1, v.size // 20)
    base = float(np.median(v[i0 : i0 + max(3, v.size // 4)]))
    if not base > 0:
        return []
    smooth = pd.Series(v).rolling(max(3, v.size // 20), min_periods=1, center=True).median().to_numpy()
    low = smooth < drop * base
    low[:i0] = False
    starts, ends = runs_of_true(low)
    if starts.size == 0:
        return []
    longest = int(np.argmax(ends - starts))
    a, b = int(starts[longest]), int(ends[longest])
    if (b - a) < max(2, min_share * v.size):
        return []
    during = float(np.median(v[a:b]))
    return [
        Finding(
            signature="throughput_drop",
            severity=Severity.WARNING,
            step=int(s.index[a]),
            end_step=int(s.index[b - 1]),
            metric=metric,
            summary=f"{metric} fell from ~{base:.4g} to ~{during:.4g} ({during / base:.0%}) from step {s.index[a]}",
            evidence={
                "baseline": evidence_value(base),
                "during": evidence_value(during),
                "ratio": evidence_value(during / base),
                "low_points": int(b - a),
                "points": int(v.size),
            },
            cause="the input pipeline or the host slowed down (data loader stall, IO, throttling, a shared node)",
            fix="check data loader workers and IO at that step; profile one slow step",
        )
    ]


@detector(requires_any=_MEMORY, signatures=("memory_growth",), tags=("resources",))
def memory_growth(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_growth: float = 0.2,
    monotone_share: float = 0.8,
    min_points: int = 10,
) -> list[Finding]:
    """Memory climbs step over step (a leak), when memory is logged.

    Signature: after the first 10% of logs (allocator warm-up), memory ends more than `min_growth` (20%) above where
    it started, and from where it began to grow, at least `monotone_share` (80%) of the changes between 10 consecutive blocks
    are increases.
    Likely causes: tensors kept across steps (a loss appended without .item(), a growing cache), a leak in a callback.
    What to check next: anything that accumulates per step; torch.cuda.memory_summary at two steps.
    """
    got = _first_present(frame, _MEMORY)
    if got is None:
        return []
    metric, s = got
    v = reduce_points(s, max_points=20_000).to_numpy(dtype=np.float64)
    idx = reduce_points(s, max_points=20_000).index.to_numpy()
    if v.size < min_points:
        return []
    i0 = max(1, v.size // 10)
    w, iw = v[i0:], idx[i0:]
    nb = 10
    m = w.size // nb
    if m < 1:
        return []
    blocks = np.median(w[: m * nb].reshape(nb, m), axis=1)
    start, end = float(blocks[0]), float(blocks[-1])
    if not start > 0:
        return []
    growth = end / start - 1.0
    # rising from where the growth began: the first block clearly above the start (a quarter of min_growth)
    began = np.flatnonzero(blocks > start * (1 + min_growth / 4))
    k = max(1, int(began[0])) if began.size else 1
    rising = np.diff(blocks[k - 1 :])
    ups = float((rising > 0).mean()) if rising.size >= 2 else 0.0
    if growth < min_growth or ups < monotone_share:
        return []
    return [
        Finding(
            signature="memory_growth",
            severity=Severity.WARNING,
            step=int(iw[0]),
            end_step=int(idx[-1]),
            metric=metric,
            summary=f"{metric} grew {growth:.0%} ({start:.4g} -> {end:.4g}), rising in {ups:.0%} of the run's tenths",
            evidence={
                "start": evidence_value(start),
                "end": evidence_value(end),
                "growth": evidence_value(growth),
                "rising_share": evidence_value(ups),
            },
            cause="something accumulates across steps: a tensor kept with its graph, a growing cache, a callback's list",
            fix="look for per-step accumulation (loss history without .item(), caches); compare memory summaries at two steps",
        )
    ]
