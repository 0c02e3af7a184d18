"""Is there enough in the logs to judge the run at all?"""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity
from autopsy.metrics import eval_loss_metrics
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["insufficient_data"]


def _nothing(info: RunInfo | None) -> Finding:
    unread = info.unread_logs[0] if info is not None and info.unread_logs else None
    if unread is not None:
        return Finding(
            signature="insufficient_data",
            severity=Severity.INFO,
            summary=f"no metric line autopsy reads in {unread.file} ({unread.lines} lines)",
            evidence={"file": unread.file, "lines": unread.lines},
            cause="an unknown log format, or not a training log",
            fix="analyze the run's trainer_state.json / TensorBoard / W&B files, or report the format",
        )
    return Finding(
        signature="insufficient_data",
        severity=Severity.INFO,
        summary="no metric was logged for this run",
        evidence={"rows": 0},
        cause="the run stopped before its first log, or nothing was recorded",
        fix="check the run's console log and logging_steps",
    )


@detector(signatures=("insufficient_data",), tags=("coverage",))
def insufficient_data(frame: pd.DataFrame, *, info: RunInfo | None = None, min_points: int = 8) -> list[Finding]:
    """Too few points to judge the run (info).

    Signature: the run logged no metric at all (or its console log holds no line autopsy reads), or fewer than
    `min_points` finite train-loss points (the shape detectors need about that many; the NaN detectors, the jump
    rules and the crash detector still run on fewer).
    Likely causes: the run died before its first logs, logging_steps larger than the run, the wrong directory, a log
    format autopsy does not know.
    What to check next: the console log of the run; logging_steps; that this is the run's output directory.
    """
    if frame.empty:
        return [_nothing(info)]
    loss = series(frame, "train/loss")
    finite = int(np.isfinite(loss.to_numpy()).sum())
    if finite >= min_points:
        return []
    names = metric_names(frame)
    evals = eval_loss_metrics(names)
    eval_points = int(np.isfinite(series(frame, evals[0]).to_numpy()).sum()) if evals else 0
    if finite == 0:
        what = "no train loss" + (f"; {eval_points} {evals[0]} point(s)" if evals else "")
    else:
        what = f"only {finite} finite train-loss point{'' if finite == 1 else 's'}"
    return [
        Finding(
            signature="insufficient_data",
            severity=Severity.INFO,
            metric="train/loss",
            step=int(loss.index[-1]) if len(loss) else None,
            summary=f"{what}: too few to judge the curve's shape",
            evidence={
                "train_loss_points": finite,
                "eval_loss_points": eval_points,
                "min_points": min_points,
                "metrics": sorted(names)[:50],
            },
            cause="the run was short, stopped early, or logged rarely (logging_steps)",
            fix="log more often (logging_steps) or check that the run got past its first steps",
        )
    ]
