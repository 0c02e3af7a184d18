"""Clipping that fires on every step: the pre-clip grad norm far above ``max_grad_norm`` after warmup.

HF Trainer logs the *pre-clip* global norm (``grad_norm``), so a norm above ``max_grad_norm`` means the clip fired on
that step; a framework that prints the share of clipped updates itself (fairseq's ``clip=100%``) says so directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._context import clip_threshold, post_warmup
from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.runinfo import RunInfo
from autopsy.series import series

__all__ = ["clip_saturation"]

# the share of clipped updates some frameworks print themselves (fairseq: "clip=100%", a percentage)
_CLIP_SHARE_METRICS = ("clip", "train/clip")


def _logged_clip_share(frame: pd.DataFrame, start_step: int) -> tuple[float, str, int] | None:
    """(share of updates clipped, metric, points) from a logged clip percentage, after ``start_step``."""
    for name in _CLIP_SHARE_METRICS:
        c = series(frame, name, finite=True)
        c = c[c.index >= start_step]
        if len(c):
            share = float(np.clip(np.median(c.to_numpy(dtype=np.float64)) / 100.0, 0.0, 1.0))
            return share, name, int(len(c))
    return None


def _loss_trend(frame: pd.DataFrame, start_step: int, min_points: int) -> tuple[bool | None, bool | None]:
    """(falling, rising): the median of the last fifth of the loss against the first fifth (3% either way)."""
    loss = series(frame, "train/loss", finite=True)
    lv = loss[loss.index >= start_step].to_numpy()
    if lv.size < min_points:
        return None, None
    q = max(2, lv.size // 5)
    head, tail = float(np.median(lv[:q])), float(np.median(lv[-q:]))
    return tail < 0.97 * head, tail > 1.03 * head


def _severity(
    ratio: float | None,
    logged: bool,
    falling: bool | None,
    rising: bool | None,
    *,
    warn_ratio: float,
    severe_ratio: float,
) -> Severity:
    if ratio is not None and ratio >= severe_ratio and not falling:
        return Severity.ERROR
    if (ratio is not None and ratio >= warn_ratio) or rising:
        return Severity.WARNING
    if logged and not falling:
        return Severity.WARNING  # the log itself says every update is clipped and the loss is not improving
    return Severity.INFO


def _summary(frac: float, evidence: dict[str, Any], logged: tuple[float, str, int] | None) -> str:
    """The sentence: the share clipped and the median norm against the threshold (or the log's own share)."""
    median = num(evidence["median_grad_norm"])
    if logged is not None:
        evidence.update(
            share_source=f"the log's own '{logged[1]}' (percent of updates clipped)", share_points=logged[2]
        )
        return (
            f"the log says clipping fired on {frac:.0%} of updates ('{logged[1]}'); median pre-clip grad norm "
            f"{median}, max_grad_norm not printed"
        )
    note = " (max_grad_norm assumed: HF default 1.0)" if evidence["max_grad_norm_assumed"] else ""
    return (
        f"clipping fired on {frac:.0%} of post-warmup logs: median pre-clip grad norm {median} = "
        f"{num(evidence['median_over_threshold'])}x max_grad_norm {num(evidence['max_grad_norm'])}{note}"
    )


@detector(requires=("train/grad_norm",), signatures=("clip_saturation",), tags=("gradients",))
def clip_saturation(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    max_grad_norm: float | None = None,
    share: float = 0.5,
    warn_ratio: float = 5.0,
    severe_ratio: float = 10.0,
    min_points: int = 3,
) -> list[Finding]:
    """Clipping fires on most steps after warmup.

    Signature: the pre-clip grad norm is above max_grad_norm on more than `share` (half) of post-warmup logs.
    max_grad_norm comes from the parameter, else the run's config, else HF Trainer's default 1.0 (said in the
    evidence), assumed only when the run looks like an HF Trainer run (its source, config names or log keys): a
    fairseq, mmengine, Keras or custom loop has no such default. Where the log prints the share of clipped updates
    itself (fairseq's `clip=100%`), that share is the evidence and no threshold is needed.
    Severity follows harm: a post-warmup median norm `warn_ratio` (5x) the threshold or more is a warning (the step
    size is set by the clip, not the learning rate); `severe_ratio` (10x) or more with a loss that is not falling is
    an error (the run is wasting compute); 1-5x with a falling loss is an info note, with a rising loss a warning; a
    logged clip share with a loss that is not falling, a warning. Three post-warmup logs are enough: every one of
    them far above the threshold needs no more.
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
    g = post_warmup(frame, info, "train/grad_norm")
    v = g.to_numpy(dtype=np.float64)
    if v.size < min_points:
        return []
    logged = None
    if max_grad_norm is None:
        logged = _logged_clip_share(frame, int(g.index[0]))  # no threshold known: only a printed share can tell
        if logged is None or logged[0] <= share:
            return []
        over, frac = np.ones(v.size, dtype=bool), logged[0]
    else:
        over = v > max_grad_norm
        frac = float(over.mean())
        if frac <= share:
            return []
    med = float(np.median(v))
    ratio = med / max_grad_norm if max_grad_norm else None
    falling, rising = _loss_trend(frame, int(g.index[0]), min_points)
    severity = _severity(ratio, logged is not None, falling, rising, warn_ratio=warn_ratio, severe_ratio=severe_ratio)
    evidence: dict[str, Any] = {
        "share_clipped": evidence_value(frac),
        "median_grad_norm": evidence_value(med),
        "max_grad_norm": max_grad_norm,
        "max_grad_norm_assumed": assumed,
        "median_over_threshold": evidence_value(ratio) if ratio is not None else None,
        "points": int(v.size),
        "loss_falling": falling,
        "loss_rising": rising,
    }
    summary = _summary(frac, evidence, logged)
    return [
        Finding(
            signature="clip_saturation",
            severity=severity,
            step=int(g.index[int(np.argmax(over))]),
            end_step=int(g.index[-1]),
            metric="train/grad_norm",
            summary=summary,
            evidence=evidence,
            cause="the learning rate is too high: every update is cut to max_grad_norm, so the step size is "
            "set by the clip",
            fix="lower the learning rate 2-10x; confirm max_grad_norm in the run's config",
        )
    ]
