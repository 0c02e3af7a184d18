"""The run's settings, read the way an experienced engineer reads a failed run's config.

Each risk names the setting, its value, why it matters, the advice, and the signatures it can explain
(``evidence["can_explain"]``). :mod:`autopsy.postprocess` attaches a risk as the *cause* of a finding it explains
(and drops it as a separate finding); the others stay as ``config_risk`` at info or warning. Each check is one small
function of the config; learning-rate ranges are quoted only to a run known to be a fine-tune.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity
from autopsy.runinfo import RunInfo, is_lora, trains_from_scratch
from autopsy.series import series

__all__ = ["config_risk"]

_NAN = ("nan_loss", "nan_grad_norm", "loss_zero_collapse", "loss_scale_collapse")
_HIGH_LR = ("divergence", "loss_spike", "exploding_gradients", "clip_saturation", "oscillation", *_NAN)
_LOW_LR = ("plateau", "vanishing_gradients", "eval_flat")
_LOSS_ON_FAILURE = ("crash", "abrupt_end", "divergence", *_NAN)


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _risk(
    setting: str,
    value: Any,
    summary: str,
    why: str,
    fix: str,
    *,
    explains: tuple[str, ...],
    severity: Severity = Severity.INFO,
    standalone: bool = True,
    **extra: Any,
) -> Finding:
    evidence = {"setting": setting, "value": value, "can_explain": list(explains), "standalone": standalone, **extra}
    return Finding(signature="config_risk", severity=severity, summary=summary, evidence=evidence, cause=why, fix=fix)


def _fp16(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    if cfg.get("fp16") is True and cfg.get("bf16") is not True:
        return _risk(
            "fp16",
            True,
            "fp16 mixed precision",
            "fp16's range (max 65504) overflows where bf16's would not",
            "bf16=True on hardware that supports it (Ampere or newer)",
            explains=_NAN,
        )
    return None


def _warmup(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    ws, wr = _num(cfg.get("warmup_steps")), _num(cfg.get("warmup_ratio"))
    if ws is None and wr is None:
        return None
    max_steps = p["max_steps"]
    w = max(ws or 0.0, (wr or 0.0) * (max_steps or 0))
    if w == 0:
        return _risk(
            "warmup_steps",
            0,
            "no learning-rate warmup",
            "the first updates run at the full learning rate",
            "warmup_ratio=0.03-0.1 (or warmup_steps a few % of the run)",
            explains=("loss_spike", "divergence", "exploding_gradients", *_NAN),
            standalone=False,
            early_until=int(0.1 * max_steps) if max_steps else None,
        )
    if max_steps and w >= max_steps:
        return _risk(
            "warmup_steps",
            int(w),
            f"warmup ({int(w)} steps) as long as the run ({max_steps})",
            "the learning rate never reaches its peak",
            "warmup a few % of max_steps",
            explains=_LOW_LR,
            severity=Severity.WARNING,
        )
    return None


def _clipping(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    if "max_grad_norm" not in cfg:
        return None
    mg = _num(cfg.get("max_grad_norm"))
    if mg is not None and 0 < mg < 100:
        return None
    off = not mg or mg <= 0
    return _risk(
        "max_grad_norm",
        cfg.get("max_grad_norm"),
        "gradient clipping is off" if off else f"max_grad_norm={mg:g}",
        "one bad batch can throw the weights anywhere" if off else "so large that clipping never fires",
        "max_grad_norm=1.0",
        explains=("exploding_gradients", "divergence", "loss_spike", *_NAN),
    )


def _nan_filter(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    if cfg.get("logging_nan_inf_filter") is not True:
        return None
    return _risk(
        "logging_nan_inf_filter",
        True,
        "logging_nan_inf_filter=True",
        "NaN/Inf losses are logged as 0.0 (or skipped), hiding the failure",
        "logging_nan_inf_filter=False while debugging",
        explains=("loss_zero_collapse", "nan_grad_norm"),
        standalone=False,
    )


def _no_eval(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    es = str(cfg.get("eval_strategy", cfg.get("evaluation_strategy", "")) or "").lower()
    if es not in ("no", "intervalstrategy.no") or cfg.get("do_eval") is True:
        return None
    return _risk(
        "eval_strategy",
        "no",
        "no evaluation during training",
        "overfitting cannot be seen",
        "eval_strategy='steps' with eval_steps every 5-10% of training",
        explains=("sparse_eval",),
    )


def _learning_rate(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    lr = _num(cfg.get("learning_rate"))
    if lr is None or lr <= 0 or trains_from_scratch(info) is not False:
        return None  # ranges are a fine-tune's: a run from scratch (or one that does not say) has its own
    lora = is_lora(info)
    lo, hi = p["lora_lr_range"] if lora else p["full_lr_range"]
    kind = "LoRA" if lora else "full fine-tuning"
    far = p["far_factor"]
    if lr > hi * far:
        return _risk(
            "learning_rate",
            lr,
            f"learning_rate={lr:g}",
            f"more than {far:g}x above the usual {kind} range {lo:g}..{hi:g}",
            f"try {hi:g} (the top of the usual {kind} range)",
            explains=_HIGH_LR,
            direction="high",
        )
    if lr < lo / far:
        return _risk(
            "learning_rate",
            lr,
            f"learning_rate={lr:g}",
            f"more than {far:g}x below the usual {kind} range {lo:g}..{hi:g}",
            f"try {lo:g} (the bottom of the usual {kind} range)",
            explains=_LOW_LR,
            direction="low",
        )
    return None


def _saving(cfg: dict[str, Any], info: RunInfo, p: dict[str, Any]) -> Finding | None:
    max_steps = p["max_steps"]
    ss = str(cfg.get("save_strategy", "") or "").lower()
    save = _num(cfg.get("save_steps"))
    if not max_steps:
        return None
    if ss in ("no", "savestrategy.no"):
        return _risk(
            "save_strategy",
            "no",
            "no checkpoints are saved",
            "a failure loses the whole run",
            "save_strategy='steps' with save_steps every 5-10% of training",
            explains=_LOSS_ON_FAILURE,
        )
    if ss in ("steps", "savestrategy.steps") and save and save >= 1 and save > p["save_loss_share"] * max_steps:
        return _risk(
            "save_steps",
            int(save),
            f"save_steps={int(save)} is {save / max_steps:.0%} of the run",
            "a failure loses up to that many steps",
            f"save_steps about {max(1, max_steps // 10)}",
            explains=_LOSS_ON_FAILURE,
        )
    return None  # save_steps < 1 is a share of the run (HF accepts it): fine


_CHECKS: tuple[Callable[[dict[str, Any], RunInfo, dict[str, Any]], Finding | None], ...] = (
    _fp16,
    _warmup,
    _clipping,
    _nan_filter,
    _no_eval,
    _learning_rate,
    _saving,
)


@detector(signatures=("config_risk",), tags=("config",))
def config_risk(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    lora_lr_range: tuple[float, float] = (1e-4, 3e-4),
    full_lr_range: tuple[float, float] = (1e-5, 5e-5),
    far_factor: float = 10.0,
    save_loss_share: float = 0.25,
) -> list[Finding]:
    """A setting that makes a failure likely or hides one.

    Signature: from the run's config (TrainingArguments, W&B config): fp16 instead of bf16; no warmup; clipping off
    or huge (max_grad_norm unset/0 or >= 100); logging_nan_inf_filter on (NaN losses log as 0.0); no eval; for a run
    known to be a fine-tune (a pretrained model or an adapter; a run from scratch has its own ranges), an LR more than
    `far_factor` (10x) outside the usual range (LoRA `lora_lr_range` 1e-4..3e-4, full fine-tuning `full_lr_range`
    1e-5..5e-5); warmup longer than the run; a save cadence that loses more than `save_loss_share` (25%) of the run on
    a failure. A risk that explains a finding becomes that finding's cause; the rest are info (warning for warmup
    longer than the run).
    Likely causes: defaults carried over from another setup.
    What to check next: the setting named in the evidence, with the advice in `fix`.
    """
    if info is None or not info.config:
        return []
    max_steps = info.max_steps or _num(info.config.get("max_steps"))
    params = {
        "lora_lr_range": lora_lr_range,
        "full_lr_range": full_lr_range,
        "far_factor": far_factor,
        "save_loss_share": save_loss_share,
        "max_steps": int(max_steps) if max_steps and max_steps > 0 else None,
    }
    out = [f for check in _CHECKS if (f := check(info.config, info, params)) is not None]
    loss = series(frame, "train/loss") if len(frame) else pd.Series(dtype=float)
    if len(loss) and not np.isfinite(loss.to_numpy()).all():
        for f in out:
            f.evidence["run_has_nonfinite_loss"] = True
    return out
