"""The checkpoints themselves: NaN/Inf weights saved by a run.

The loader scans the checkpoints that matter (:func:`autopsy.checkpoints.check_run_checkpoints`: around the first
non-finite step of the logs, else the latest one) into ``RunInfo.weight_scans``; this detector reads that record,
so it stays a pure function of the run.
"""

from __future__ import annotations

import os

import pandas as pd

from autopsy.checkpoints import weights_finding
from autopsy.detectors._registry import detector
from autopsy.findings import Finding
from autopsy.runinfo import RunInfo
from autopsy.series import first_nonfinite_step

__all__ = ["weights_nonfinite"]


@detector(signatures=("weights_nonfinite",), tags=("numerics", "checkpoint"))
def weights_nonfinite(frame: pd.DataFrame, *, info: RunInfo | None = None) -> list[Finding]:
    """A saved checkpoint holds NaN/Inf weights.

    Signature: a ``checkpoint-N/`` safetensors tensor with a NaN or Inf value (scanned one tensor at a time).
    Likely causes: a non-finite update (LR too high, fp16 overflow, a bad batch) poisoned the weights before the save.
    What to check next: restart from ``last_finite_checkpoint``; run ``autopsy replay`` on it with the batch of the
    first bad step to see which module made the NaN.
    """
    if info is None or not info.weight_scans:
        return []
    poisoned = sorted(s for s, w in info.weight_scans.items() if w.nonfinite)
    if not poisoned:
        return []
    step = poisoned[0]
    scan = info.weight_scans[step]
    f = weights_finding(scan.path, scan.nonfinite, tensors=scan.tensors, step=step)
    if f is None:
        return []
    finite = [s for s, w in info.weight_scans.items() if s < step and w.tensors and not w.nonfinite and not w.damaged]
    last_finite = info.weight_scans[max(finite)].path if finite else None
    f.evidence["first_bad_step"] = first_nonfinite_step(frame)
    f.evidence["last_finite_checkpoint"] = last_finite
    if last_finite is not None:
        f.fix = f"restart from {os.path.basename(last_finite)} (all weights finite); `autopsy replay` it with the batch of the failing step"
    return [f]
