"""Throughput and memory: logged (tokens/s, samples/s, allocated memory) or sampled by W&B (each GPU's memory
and utilisation, the host process' memory: ``system/`` metrics)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._machine import THROUGHPUT, per_rank, settled, throughput, used_ranks
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import reduce_points, runs_of_true
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["memory_growth", "throughput_drop"]

_THROUGHPUT = (*THROUGHPUT, "train/num_tokens", "train/iter_time", "system/gpu.0.util_pct")
_MEMORY = ("train/memory_allocated", "train/memory_gib", "system/gpu.0.memory_allocated_pct", "system/proc.rss_mb")


_LABEL = {
    "train/num_tokens": "tokens/s (train/num_tokens over wall time)",
    "train/iter_time": "iterations/s (1 / train/iter_time)",
    "system/gpu.0.util_pct": "the busy GPUs' mean utilisation",
}


def _throughput_series(frame: pd.DataFrame) -> tuple[str, pd.Series] | None:
    """The run's throughput (:func:`~autopsy.detectors._machine.throughput`), else the busy GPUs' mean utilisation
    from the first logged step on (a GPU that computes half as often does half the work)."""
    got = throughput(frame)
    if got is not None:
        return got
    used, _ = used_ranks(frame)
    util = [settled(s, frame, early_share=0.0) for r, s in per_rank(frame, "util_pct").items() if r in used]
    if not util:
        return None
    return "system/gpu.0.util_pct", pd.concat(util, axis=1, join="inner").mean(axis=1)


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
    logs: compilation and cache warm-up) for more than `min_share` (10%) of the run, in one stretch. Throughput is
    a logged rate, tokens/s from a cumulative token count (HF's num_input_tokens_seen) over wall time, iterations/s
    from a console's time per iteration, or else the busy GPUs' mean utilisation (W&B system metrics).
    Likely causes: a data loader stall, a leak forcing allocator churn, thermal throttling, another job on the node.
    What to check next: data loader workers, CPU/IO utilisation at that step, GPU clocks.
    """
    got = _throughput_series(frame)
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
            summary=f"{_LABEL.get(metric, metric)} fell from ~{base:.4g} to ~{during:.4g} ({during / base:.0%}) "
            f"from step {s.index[a]}",
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


def _growth(s: pd.Series, *, min_growth: float, monotone_share: float, min_points: int) -> dict[str, Any] | None:
    """How a memory series grew after its first tenth: ``kind`` "leak" (still climbing block after block) or
    "plateau" (climbed, then flat: the caching allocator keeping what it once needed); None when it did not grow."""
    r = reduce_points(s, max_points=20_000)
    v, idx = r.to_numpy(dtype=np.float64), r.index.to_numpy()
    if v.size < min_points:
        return None
    i0 = max(1, v.size // 10)
    w, iw = v[i0:], idx[i0:]
    nb = 10
    m = w.size // nb
    if m < 1:
        return None
    blocks = np.median(w[: m * nb].reshape(nb, m), axis=1)
    start, end = float(blocks[0]), float(blocks[-1])
    if not start > 0:
        return None
    growth = end / start - 1.0
    if growth < min_growth:
        return None
    # rising from where the growth began: the first block clearly above the start (a quarter of min_growth)
    began = np.flatnonzero(blocks > start * (1 + min_growth / 4))
    k = max(1, int(began[0])) if began.size else 1
    rising = np.diff(blocks[k - 1 :])
    ups = float((rising > 0).mean()) if rising.size >= 2 else 0.0
    onset = int(iw[int(np.argmax(w > start * (1 + min_growth / 4)))])
    # the last three tenths within 2% of each other: it stopped climbing
    flat = float(np.ptp(blocks[-3:])) <= 0.02 * end
    kind = "leak" if ups >= monotone_share and not flat else ("plateau" if flat else None)
    if kind is None:
        return None
    return {
        "start": start,
        "end": end,
        "growth": growth,
        "rising_share": ups,
        "onset": onset,
        "end_step": int(idx[-1]),
        "kind": kind,
    }


def _memory_candidates(frame: pd.DataFrame) -> list[tuple[str, list[tuple[str, pd.Series]]]]:
    """The memory series to judge, in families: logged memory, each GPU's (W&B), the host process' RSS."""
    out = []
    for name in ("train/memory_allocated", "train/memory_gib"):
        s = series(frame, name, finite=True)
        if len(s):
            out.append(("logged", [(name, s)]))
            break
    used, _ = used_ranks(frame)
    gpus = [
        (f"system/gpu.{r}.memory_allocated_pct", settled(s, frame, early_share=0.0))
        for r, s in per_rank(frame, "memory_allocated_pct").items()
        if r in used
    ]
    if gpus:
        out.append(("gpu", gpus))
    rss = series(frame, "system/proc.rss_mb", finite=True)
    if len(rss):
        out.append(("host", [("system/proc.rss_mb", settled(rss, frame, early_share=0.0))]))
    return out


_WHERE = {
    "logged": (
        "something accumulates across steps: a tensor kept with its graph, a growing cache, a callback's list",
        "look for per-step accumulation (loss history without .item(), caches); compare memory summaries at two steps",
    ),
    "gpu": (
        "GPU memory accumulates across steps on these ranks: a tensor kept with its graph, a growing cache, "
        "sequences that keep getting longer",
        "look for per-step accumulation (loss history without .item(), caches); compare "
        "torch.cuda.memory_summary at two steps; sort out length-grouped batches from a leak",
    ),
    "host": (
        "host memory grows: dataloader workers touching a Python-object dataset (copy-on-read), an "
        "in-memory cache or replay buffer, metrics kept in lists",
        "store the dataset as Arrow/NumPy (datasets), fewer workers, cap caches; the host's OOM killer "
        "ends such runs with a SIGKILL",
    ),
}


@detector(requires_any=_MEMORY, signatures=("memory_growth",), tags=("resources",))
def memory_growth(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_growth: float = 0.2,
    monotone_share: float = 0.8,
    min_points: int = 10,
) -> list[Finding]:
    """Memory climbs step over step (a leak): logged memory, each GPU's, or the host process'.

    Signature: after the first 10% of logs (allocator warm-up), memory ends more than `min_growth` (20%) above where
    it started, and from where it began to grow, at least `monotone_share` (80%) of the changes between 10
    consecutive blocks are increases, still rising at the end. Per GPU (W&B system metrics) and for the host
    process' RSS too. A climb whose last three tenths are flat is the caching allocator's plateau: a note, not a leak.
    Likely causes: tensors kept across steps (a loss appended without .item(), a growing cache), a leak in a callback;
    on the host, dataloader workers copying a Python-object dataset.
    What to check next: anything that accumulates per step; torch.cuda.memory_summary at two steps.
    """
    out = []
    for family, candidates in _memory_candidates(frame):
        got = {
            name: g
            for name, s in candidates
            if (g := _growth(s, min_growth=min_growth, monotone_share=monotone_share, min_points=min_points))
        }
        if not got:
            continue
        leaks = {n: g for n, g in got.items() if g["kind"] == "leak"}
        pick = leaks or got
        name = min(pick, key=lambda n: (pick[n]["onset"], n))
        g = pick[name]
        leak = g["kind"] == "leak"
        also = sorted(set(pick) - {name})
        what = f"{name}" + (f" (and {len(also)} more rank(s))" if also else "")
        summary = (
            f"{what} grew {g['growth']:.0%} ({g['start']:.4g} -> {g['end']:.4g}), rising in "
            f"{g['rising_share']:.0%} of the run's tenths"
            if leak
            else f"{what} rose {g['growth']:.0%} ({g['start']:.4g} -> {g['end']:.4g}) and then held flat: the "
            "allocator's plateau, not a leak"
        )
        cause, fix = _WHERE[family]
        out.append(
            Finding(
                signature="memory_growth",
                severity=Severity.WARNING if leak else Severity.INFO,
                step=g["onset"],
                end_step=g["end_step"],
                metric=name,
                summary=summary,
                evidence={
                    **{k: evidence_value(v) for k, v in g.items() if k not in ("onset", "end_step")},
                    "metrics": sorted(pick),
                },
                cause=cause if leak else "PyTorch's caching allocator grew to what the largest batch needed",
                fix=fix if leak else "nothing to fix unless the plateau sits near the card's limit (memory_headroom)",
            )
        )
    return out
