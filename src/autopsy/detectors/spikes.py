"""Loss spikes: short excursions far above the recent level that recover.

The default rule is robust (median/MAD over the previous points, so the first logs, a falling trend
and per-batch noise do not trigger it); the rules production trainers use ship as named presets:

* ``megatron``: a loss >= 10x the max of the first 100 values (Megatron-LM's loss-spike check).
* ``llm_foundry``: >= 2x the rolling mean of the previous 100 values for 5 logs in a row
  (llm-foundry's ``LossSpikeIntervention`` defaults).
* ``olmo``: > mean + 6 sigma of the previous 128 values (OLMo's spike definition).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from autopsy.detectors._advice import clip_clause
from autopsy.detectors._context import rl_objective, warmup_end_step
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import causal_median, runs_of_true, settle_index
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["loss_spike"]

PRESETS = ("robust", "megatron", "llm_foundry", "olmo")


def _robust(v: np.ndarray, *, window: int, k: float, min_rise: float) -> tuple[np.ndarray, np.ndarray]:
    level = causal_median(v, window)
    resid = np.abs(v - level)
    # the scale is the median deviation of the past points; floored at 1% of the level so that a
    # near-constant loss (a converged run, a CTC sum) does not make every wiggle a "6 sigma" event
    scale = 1.4826 * causal_median(np.where(np.isfinite(resid), resid, np.nan), window)
    # on a falling curve the deviation from a lagging median is mostly trend, not noise: the point-to-point noise
    # (median |second difference| / sqrt(6), which a smooth trend cancels) caps the scale
    d2 = np.abs(np.concatenate(([np.nan, np.nan], np.diff(v, n=2)))) if v.size > 2 else np.full(v.size, np.nan)
    noise = 1.4826 * causal_median(np.where(np.isfinite(d2), d2, np.nan), window) / np.sqrt(6.0)
    scale = np.fmin(scale, noise)
    scale = np.fmax(scale, 0.01 * np.abs(level))
    high = (v > level + k * scale) & (v > level + min_rise * np.abs(level))
    return np.nan_to_num(high, nan=False).astype(bool), level


def _preset(v: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    s = pd.Series(v)
    if method == "megatron":
        ref = float(np.max(v[:100])) if v.size else np.nan
        level = np.full(v.size, ref)
        high = v >= 10.0 * ref
        high[:100] = False
    elif method == "llm_foundry":
        level = s.rolling(100, min_periods=10).mean().shift(1).to_numpy()
        over = np.nan_to_num(v >= 2.0 * level, nan=False).astype(bool)
        # 5 in a row: a point is high when it ends a run of 5 over-threshold logs
        run5 = pd.Series(over.astype(np.int8)).rolling(5, min_periods=5).sum().to_numpy() == 5
        high = np.zeros(v.size, dtype=bool)
        for lag in range(5):  # mark the whole 5-log stretch (5 shifted copies, not a per-step loop)
            high[: v.size - lag] |= run5[lag:]
    elif method == "olmo":
        mean = s.rolling(128, min_periods=16).mean().shift(1).to_numpy()
        std = s.rolling(128, min_periods=16).std().shift(1).to_numpy()
        level = mean
        high = np.nan_to_num(v > mean + 6.0 * std, nan=False).astype(bool)
    else:
        from autopsy.errors import UsageError

        raise UsageError(f"loss_spike: unknown method {method!r}; use one of {', '.join(PRESETS)}")
    return high, level


_WARMUP_CAUSE = (
    "the learning rate reached its peak at the end of warmup: the peak LR is too high, or the warmup too short"
)


def _spike_fix(info: RunInfo | None) -> str:
    """Look at the batch; clip (as the run's config allows); lower the peak LR when spikes repeat."""
    steps = (
        "inspect the batch at the spike",
        clip_clause(info),
        "lower the peak LR or lengthen warmup if spikes repeat",
    )
    return "; ".join(x for x in steps if x)


def _finding(
    v: np.ndarray,
    steps: np.ndarray,
    level: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    *,
    info: RunInfo | None,
    method: str,
    warmup_end: int | None,
) -> Finding:
    """The finding of the recovered spikes ``starts``..``ends`` (indices into ``v``): the first, up to 10 in detail."""
    peaks = np.array([s + int(np.argmax(v[s:e])) for s, e in zip(starts, ends)])  # one per spike (few)
    ratio = v[peaks] / np.where(np.abs(level[peaks]) > 0, np.abs(level[peaks]), np.nan)
    logging = info.logging_steps if info is not None and info.logging_steps else None
    spikes = [
        {
            "step": int(steps[s]),
            "peak_step": int(steps[p]),
            "value": evidence_value(float(v[p])),
            "level_before": evidence_value(float(level[p])),
            "ratio": evidence_value(float(r)),
            "logs_until_recovered": int(e - s),
        }
        for s, p, e, r in zip(starts[:10], peaks[:10], ends[:10], ratio[:10])
    ]
    first = spikes[0]
    evidence: dict = {
        "method": method,
        "spikes": len(starts),
        "first_spike_step": first["step"],
        "first_spike_value": first["value"],
        "level_before": first["level_before"],
        "ratio_to_level": first["ratio"],
        "max_ratio": evidence_value(float(np.nanmax(ratio))),
        "details": spikes,
        "logging_steps": logging,
    }
    if warmup_end:
        wu = warmup_end
        evidence["warmup_end_step"] = int(wu)
        # at the end of warmup: within a quarter of the warmup length (or 2 logs) after the LR peak
        tol = max(2 * (logging or 1), int(0.25 * wu))
        evidence["at_warmup_end"] = bool(wu - tol <= first["step"] <= wu + tol)
    many = len(starts) >= 5
    summary = (
        f"{len(starts)} loss spike(s); the first at step {num(first['step'])}: {num(first['value'])} vs a level of "
        f"{num(first['level_before'])} ({num(first['ratio'])}x), recovered after {num(first['logs_until_recovered'])} log(s)"
    )
    cause = _WARMUP_CAUSE if evidence.get("at_warmup_end") else "a bad batch, or the learning rate at its peak"
    return Finding(
        signature="loss_spike",
        severity=Severity.ERROR if many else Severity.WARNING,
        step=first["step"],
        end_step=spikes[-1]["step"] if len(spikes) > 1 else None,
        metric="train/loss",
        summary=summary,
        evidence=evidence,
        cause=cause,
        fix=_spike_fix(info),
    )


@detector(requires=("train/loss",), signatures=("loss_spike",), tags=("loss",))
def loss_spike(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    method: Literal["robust", "megatron", "llm_foundry", "olmo"] = "robust",
    window: int = 50,
    k: float = 8.0,
    min_rise: float = 0.4,
    recover_within: int = 20,
    single_batch_ratio: float = 2.5,
) -> list[Finding]:
    """A short excursion of the train loss far above its recent level, which recovers.

    Signature: (robust default) a logged loss above the median of the previous `window` logs by more than `k`
    robust sigmas (1.4826 x MAD; 8 keeps per-batch noise with heavy tails quiet) and by more than `min_rise`
    (40%: a single batch at logging_steps=1 swings 30%) of that level, back under the threshold within `recover_within` logs. A rise that never comes back is
    `divergence`. At logging_steps=1 a one-log excursion must also reach `single_batch_ratio` (2.5x) the level: one
    batch of heavy-tailed data reaches 2x now and then (a long or off-domain sample) in a healthy run.
    `method` picks a production rule instead: `megatron` (>= 10x the max of the first 100
    values), `llm_foundry` (>= 2x the mean of the previous 100 for 5 logs in a row), `olmo` (> mean + 6 sigma of
    the previous 128). A logged loss is a mean over `logging_steps`: a one-batch spike is diluted by that factor.
    Likely causes: a bad batch (corrupt or very long sample), the LR peak at the end of warmup, fp16 overflow.
    What to check next: the batch at that step; whether the spike sits at the end of warmup (longer warmup);
    clipping (`max_grad_norm`) and a lower peak LR.
    """
    if rl_objective(frame, info):
        return []  # RL/preference losses swing by design (GRPO/PPO near 0, sign changes)
    loss = series(frame, "train/loss", finite=True)
    v = loss.to_numpy(dtype=np.float64)
    steps = loss.index.to_numpy()
    if v.size < 12:
        return []
    if method == "robust":
        high, level = _robust(v, window=window, k=k, min_rise=min_rise)
    else:
        high, level = _preset(v, method)
    wu = warmup_end_step(frame, info)
    start = settle_index(steps, None, early_share=0.02, min_skip=3)
    high[:start] = False
    if not high.any():
        return []
    starts, ends = runs_of_true(high)
    # the spike must come back: a stretch that is still high at the end (or lasts too long) is not a spike
    recovered = (ends < v.size) & ((ends - starts) <= recover_within)
    if info is not None and info.logging_steps == 1 and method == "robust":
        # per-batch logs: one batch alone swings far; a single-log excursion must reach `single_batch_ratio` x the level
        single = (ends - starts) == 1
        big = v[starts] >= single_batch_ratio * np.abs(np.nan_to_num(level[starts], nan=np.inf))
        recovered &= ~single | big
    starts, ends = starts[recovered], ends[recovered]
    if starts.size == 0:
        return []
    return [_finding(v, steps, level, starts, ends, info=info, method=method, warmup_end=wu)]
