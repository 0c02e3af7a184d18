"""Advice that reads the run's own config: say nothing about a setting the run already has right.

"bf16 instead of fp16" only to a run that used fp16 (or whose log shows an fp16 loss scaler); "max_grad_norm=1.0"
only to a run that does not clip at 1.0 or below; learning-rate ranges only to a run known to be a fine-tune.
"""

from __future__ import annotations

import pandas as pd

from autopsy.runinfo import RunInfo, configured_max_grad_norm
from autopsy.series import metric_names

__all__ = ["clip_advice", "clip_clause", "nan_cause", "nan_fix", "precision_advice", "used_fp16"]


def used_fp16(info: RunInfo | None, frame: pd.DataFrame | None = None) -> bool | None:
    """True when the run trained in fp16 (its config, or an fp16 loss scaler in its log); None when unknown."""
    if info is not None:
        if info.config_value("fp16") is True and info.config_value("bf16") is not True:
            return True
        if info.config_value("fp16") is False or info.config_value("bf16") is True:
            return False
    if frame is not None and len(frame) and "train/loss_scale" in metric_names(frame):
        return True
    return None


def precision_advice(info: RunInfo | None, frame: pd.DataFrame | None = None) -> str:
    return "bf16 instead of fp16" if used_fp16(info, frame) else ""


def clip_advice(info: RunInfo | None) -> str:
    """Clipping at 1.0, unless the run already clips at 1.0 or below."""
    said, value = configured_max_grad_norm(info)
    if said and value is not None and value <= 1.0:
        return ""
    return "max_grad_norm=1.0" if not said else f"max_grad_norm=1.0 (the run has {value if value else 'no clipping'})"


def clip_clause(info: RunInfo | None) -> str:
    """``clip gradients (max_grad_norm=1.0)`` as a clause of a fix, '' when the run already clips at 1.0 or below."""
    clip = clip_advice(info)
    return f"clip gradients ({clip})" if clip else ""


def nan_cause(info: RunInfo | None, frame: pd.DataFrame | None = None) -> str:
    if used_fp16(info, frame):
        first = "fp16 overflow: the run trained in fp16, whose range (max 65504) activations and gradients exceed"
    else:
        first = "a too-high learning rate or an overflow poisoned the update"
    lr = info.config_value("learning_rate") if info is not None else None
    if lr is not None:
        first += f" (learning_rate={lr:g})" if isinstance(lr, (int, float)) else f" (learning_rate={lr})"
    return first + "; or a bad batch (all labels masked, corrupt ids)"


def nan_fix(info: RunInfo | None, frame: pd.DataFrame | None = None) -> str:
    changes = [x for x in ("a 2-10x lower learning rate", precision_advice(info, frame), clip_advice(info)) if x]
    return (
        f"restart from the last finite checkpoint with {', '.join(changes)}; replay the failing step with "
        "`autopsy replay` to find the layer that overflowed"
    )
