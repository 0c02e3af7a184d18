"""The checkpoints themselves: NaN/Inf weights saved by a run, and the last checkpoint to restart from.

Reads the run's ``checkpoint-*/`` safetensors files (found by the importers in ``info.checkpoints``) with
:func:`autopsy.replay.checkpoint.scan_weights`: memory-mapped, one tensor at a time, in bounded chunks, with
neither torch nor safetensors needed. To stay cheap on big runs it scans only the checkpoints that matter:
around the first non-finite step of the logs (the first checkpoint at or after it, and backwards from it to
the last all-finite one), else the latest checkpoint only.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from autopsy.detectors._common import metric_series
from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity
from autopsy.frame import RunInfo

__all__ = ["weights_nonfinite"]


def _first_bad_step(frame: pd.DataFrame) -> int | None:
    firsts = []
    for metric in ("train/loss", "train/grad_norm"):
        s = metric_series(frame, metric)
        bad = ~np.isfinite(s.to_numpy(dtype=np.float64))
        if bad.any():
            firsts.append(int(s.index.to_numpy()[int(np.argmax(bad))]))
    return min(firsts) if firsts else None


@detector(requires=(), signatures=("weights_nonfinite",), tags=("numerics", "checkpoint"))
def weights_nonfinite(frame: pd.DataFrame, *, info: RunInfo | None = None, max_scans: int = 8) -> list[Finding]:
    """A saved checkpoint holds NaN/Inf weights.

    Signature: a ``checkpoint-N/`` safetensors tensor with a NaN or Inf value (scanned one tensor at a time).
    Likely causes: a non-finite update (LR too high, fp16 overflow, a bad batch) poisoned the weights before the save.
    What to check next: restart from ``last_finite_checkpoint``; run ``autopsy replay`` on it with the batch of the
    first bad step to see which module made the NaN.
    """
    from autopsy.replay import weights_finding
    from autopsy.replay.checkpoint import scan_weights

    if info is None or not info.checkpoints:
        return []
    cks = {int(s): d for s, d in info.checkpoints.items() if os.path.isdir(d)}
    if not cks:
        return []
    bad_step = _first_bad_step(frame)
    steps = sorted(cks)
    if bad_step is None:
        order = [steps[-1]]
    else:
        after = [s for s in steps if s >= bad_step][:1]
        order = after + [s for s in reversed(steps) if s < bad_step]
    poisoned: list[tuple[int, object]] = []
    last_finite: int | None = None
    for s in order[:max_scans]:
        scan = scan_weights(cks[s])
        if scan.nonfinite:
            poisoned.append((s, scan))
        elif not scan.damage and scan.tensors and (bad_step is None or s < bad_step):
            last_finite = s
            break
    out = []
    for s, scan in sorted(poisoned, key=lambda p: p[0])[:1]:
        f = weights_finding(scan, step=s)
        if f is None:
            continue
        f.metric = None
        f.evidence["first_bad_step"] = bad_step
        f.evidence["last_finite_checkpoint"] = cks[last_finite] if last_finite is not None else None
        if last_finite is not None:
            f.fix = f"restart from {os.path.basename(cks[last_finite])} (all weights finite); `autopsy replay` it with the batch of step {bad_step}"
        out.append(f)
    return out
