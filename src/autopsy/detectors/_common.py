"""Small helpers shared by detectors: restart points, timelines, evidence formatting."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.frame import RunInfo, finite_or_str, wall_times

__all__ = [
    "evidence_value",
    "loss_metrics",
    "minutes_between",
    "restart_point",
    "rl_objective",
    "warmup_end_step",
]

# metrics that only preference / RL trainers (TRL's DPO, GRPO, PPO, KTO, ORPO) log
_RL_MARKERS = ("rewards/", "logps/", "logits/", "/kl", "kl", "reward", "completion_length", "completions/", "objective/")


def evidence_value(x: Any) -> Any:
    """Round floats for readability while keeping non-finite values as strings."""
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if math.isfinite(v):
            return float(f"{v:.6g}")
        return finite_or_str(v)
    if isinstance(x, np.integer):
        return int(x)
    return x


def loss_metrics(frame: pd.DataFrame) -> list[str]:
    """Loss metrics present: train/loss, eval/loss, then eval/<set>/loss, sorted."""
    metrics = set(frame["metric"].unique())
    out = [m for m in ("train/loss", "eval/loss") if m in metrics]
    out += sorted(m for m in metrics if m.startswith("eval/") and m.endswith("/loss") and m != "eval/loss")
    return out


def rl_objective(frame: pd.DataFrame, info: RunInfo | None = None) -> bool:
    """True when the run optimises an RL / preference objective (its loss is not a LM loss)."""
    metrics = frame["metric"].unique()
    for m in metrics:
        low = str(m).lower()
        if any(marker in low for marker in _RL_MARKERS):
            return True
    if info is not None:
        name = str(info.config.get("trainer_class", "") or info.config.get("_trainer", "")).lower()
        if any(k in name for k in ("dpo", "grpo", "ppo", "kto", "orpo", "rloo")):
            return True
    return False


def restart_point(info: RunInfo | None, first_bad_step: int) -> dict[str, Any]:
    """The last checkpoint saved before ``first_bad_step`` and how many steps must be redone.

    Checkpoints whose weights are known to be non-finite (replay's scan) are skipped.
    """
    out: dict[str, Any] = {"restart_checkpoint": None, "restart_step": None, "steps_to_redo": int(first_bad_step)}
    if info is None or not info.checkpoints:
        return out
    bad = set(info.config.get("_nonfinite_checkpoints", []))
    good = [s for s in sorted(info.checkpoints) if s < first_bad_step and info.checkpoints[s] not in bad]
    if good:
        step = good[-1]
        out.update(restart_checkpoint=info.checkpoints[step], restart_step=int(step), steps_to_redo=int(first_bad_step - step))
    return out


def minutes_between(frame: pd.DataFrame, metric: str, start: int, end: int) -> float | None:
    """Wall-clock minutes between two logged steps of ``metric`` (None when unknown)."""
    wt = wall_times(frame, metric)
    if wt.empty or start not in wt.index or end not in wt.index:
        return None
    a, b = float(wt.loc[start]), float(wt.loc[end])
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return round((b - a) / 60.0, 2)


def warmup_end_step(frame: pd.DataFrame, info: RunInfo | None = None) -> int | None:
    """The step where warmup ends: from the config, else inferred from the LR curve's peak."""
    if info is not None:
        ws = info.config_value("warmup_steps")
        try:
            if ws is not None and int(ws) > 0:
                return int(ws)
        except (TypeError, ValueError):
            pass
        ratio = info.config_value("warmup_ratio")
        max_steps = info.max_steps
        try:
            if ratio is not None and float(ratio) > 0 and max_steps:
                return int(math.ceil(float(ratio) * int(max_steps)))
        except (TypeError, ValueError):
            pass
    lr = frame[(frame["metric"] == "train/learning_rate") & ~frame["superseded"]]
    if len(lr) >= 3:
        lr = lr.drop_duplicates("step", keep="last").sort_values("step")
        v = lr["value"].to_numpy(dtype=float)
        if np.isfinite(v).all() and v.max() > 0:
            peak = int(np.argmax(v))
            # a warmup is a rise from well below the peak; a constant or decaying LR has none
            if peak > 0 and v[0] < 0.5 * v[peak]:
                return int(lr["step"].to_numpy()[peak])
            return 0
    return None
