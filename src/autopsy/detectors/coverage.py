"""Is there enough in the logs to judge the run at all?"""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["insufficient_data"]


@detector(signatures=("insufficient_data",), tags=("coverage",))
def insufficient_data(frame: pd.DataFrame, *, info: RunInfo | None = None, min_points: int = 8) -> list[Finding]:
    """Too few points to judge the run (info).

    Signature: the run logged no metric at all, or fewer than `min_points` finite train-loss points (the trend
    detectors need about that many; the NaN detectors still run on fewer).
    Likely causes: the run died before its first logs, logging_steps larger than the run, the wrong directory.
    What to check next: the console log of the run; logging_steps; that this is the run's output directory.
    """
    if frame.empty:
        return [
            Finding(
                signature="insufficient_data",
                severity=Severity.INFO,
                summary="no metric was logged for this run",
                evidence={"rows": 0},
                cause="the run stopped before its first log, or nothing was recorded",
                fix="check the run's console log and logging_steps",
            )
        ]
    loss = series(frame, "train/loss")
    finite = int(np.isfinite(loss.to_numpy()).sum())
    if finite >= min_points:
        return []
    metrics = sorted(metric_names(frame))[:50]
    return [
        Finding(
            signature="insufficient_data",
            severity=Severity.INFO,
            metric="train/loss",
            step=int(loss.index[-1]) if len(loss) else None,
            summary=f"only {finite} finite train-loss point(s): too few to judge the curve's shape",
            evidence={"train_loss_points": finite, "min_points": min_points, "metrics": metrics},
            cause="the run was short, stopped early, or logged rarely (logging_steps)",
            fix="log more often (logging_steps) or check that the run got past its first steps",
        )
    ]
