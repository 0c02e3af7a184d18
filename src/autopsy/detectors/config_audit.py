"""The run's settings, read the way an experienced engineer reads a failed run's config.

Each risk names the setting, its value, the advice, and the signatures it can explain
(``evidence["can_explain"]``). :mod:`autopsy.postprocess` attaches a risk as the *cause* of a finding it
explains (and drops it as a separate finding); the others stay as ``config_risk`` at info or warning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity
from autopsy.runinfo import RunInfo, is_lora
from autopsy.series import series

__all__ = ["config_risk"]

_NAN = ("nan_loss", "nan_grad_norm", "loss_zero_collapse", "loss_scale_collapse")
_HIGH_LR = ("divergence", "loss_spike", "exploding_gradients", "clip_saturation", "oscillation") + _NAN
_LOW_LR = ("plateau", "vanishing_gradients", "eval_flat")


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
    fix: str,
    *,
    explains: tuple[str, ...],
    severity: Severity,
    standalone: bool = True,
    **extra: Any,
) -> Finding:
    evidence = {"setting": setting, "value": value, "can_explain": list(explains), "standalone": standalone}
    evidence.update(extra)
    return Finding(
        signature="config_risk", severity=severity, summary=summary, evidence=evidence, cause=summary, fix=fix
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
    or huge (max_grad_norm unset/0 or >= 100); logging_nan_inf_filter on (NaN losses log as 0.0); no eval; an LR more
    than `far_factor` (10x) outside the usual range (LoRA `lora_lr_range` 1e-4..3e-4, full fine-tuning
    `full_lr_range` 1e-5..5e-5; LoRA when the config has adapter/peft keys); warmup longer than the run; a save
    cadence that loses more than `save_loss_share` (25%) of the run on a failure. A risk that explains a finding
    becomes that finding's cause; the rest are info (warning for warmup longer than the run).
    Likely causes: defaults carried over from another setup.
    What to check next: the setting named in the evidence, with the advice in `fix`.
    """
    if info is None or not info.config:
        return []
    cfg = info.config
    out: list[Finding] = []
    max_steps = info.max_steps or _num(cfg.get("max_steps"))
    max_steps = int(max_steps) if max_steps and max_steps > 0 else None
    if cfg.get("fp16") is True and cfg.get("bf16") is not True:
        out.append(
            _risk(
                "fp16",
                True,
                "fp16 mixed precision: its range (max 65504) overflows where bf16 would not",
                "use bf16=True on hardware that supports it (Ampere or newer)",
                explains=_NAN,
                severity=Severity.INFO,
            )
        )
    ws, wr = _num(cfg.get("warmup_steps")), _num(cfg.get("warmup_ratio"))
    if ws is not None or wr is not None:
        w = max(ws or 0.0, (wr or 0.0) * (max_steps or 0))
        if w == 0:
            early = int(0.1 * max_steps) if max_steps else None
            out.append(
                _risk(
                    "warmup_steps",
                    0,
                    "no learning-rate warmup: the first updates run at the full LR",
                    "warmup_ratio=0.03-0.1 (or warmup_steps a few % of the run)",
                    explains=("loss_spike", "divergence", "exploding_gradients") + _NAN,
                    severity=Severity.INFO,
                    standalone=False,
                    early_until=early,
                )
            )
        elif max_steps and w >= max_steps:
            out.append(
                _risk(
                    "warmup_steps",
                    int(w),
                    f"warmup ({int(w)} steps) is as long as the run ({max_steps}): the LR never reaches its peak",
                    "warmup a few % of max_steps",
                    explains=_LOW_LR,
                    severity=Severity.WARNING,
                )
            )
    if "max_grad_norm" in cfg:
        mg = _num(cfg.get("max_grad_norm"))
        if mg is None or mg <= 0 or mg >= 100:
            out.append(
                _risk(
                    "max_grad_norm",
                    cfg.get("max_grad_norm"),
                    "gradient clipping is off"
                    if not mg or mg <= 0
                    else f"max_grad_norm={mg} is so large that clipping never fires",
                    "max_grad_norm=1.0",
                    explains=("exploding_gradients", "divergence", "loss_spike") + _NAN,
                    severity=Severity.INFO,
                )
            )
    if cfg.get("logging_nan_inf_filter") is True:
        out.append(
            _risk(
                "logging_nan_inf_filter",
                True,
                "logging_nan_inf_filter=True: NaN/Inf losses are logged as 0.0 (or skipped), hiding the failure",
                "logging_nan_inf_filter=False while debugging",
                explains=("loss_zero_collapse", "nan_grad_norm"),
                severity=Severity.INFO,
                standalone=False,
            )
        )
    es = str(cfg.get("eval_strategy", cfg.get("evaluation_strategy", "")) or "").lower()
    if es in ("no", "intervalstrategy.no") and cfg.get("do_eval") is not True:
        out.append(
            _risk(
                "eval_strategy",
                "no",
                "no evaluation during training: overfitting cannot be seen",
                "eval_strategy='steps' with eval_steps every 5-10% of training",
                explains=("sparse_eval",),
                severity=Severity.INFO,
            )
        )
    lr = _num(cfg.get("learning_rate"))
    if lr is not None and lr > 0:
        lora = is_lora(info)
        lo, hi = lora_lr_range if lora else full_lr_range
        kind = "LoRA" if lora else "full fine-tuning"
        if lr > hi * far_factor:
            out.append(
                _risk(
                    "learning_rate",
                    lr,
                    f"learning_rate={lr:g} is more than {far_factor:g}x above the usual {kind} range {lo:g}..{hi:g}",
                    f"try {hi:g} (the top of the usual {kind} range)",
                    explains=_HIGH_LR,
                    severity=Severity.INFO,
                    direction="high",
                )
            )
        elif lr < lo / far_factor:
            out.append(
                _risk(
                    "learning_rate",
                    lr,
                    f"learning_rate={lr:g} is more than {far_factor:g}x below the usual {kind} range {lo:g}..{hi:g}",
                    f"try {lo:g} (the bottom of the usual {kind} range)",
                    explains=_LOW_LR,
                    severity=Severity.INFO,
                    direction="low",
                )
            )
    ss = str(cfg.get("save_strategy", "") or "").lower()
    save = _num(cfg.get("save_steps"))
    if max_steps and ss in ("no", "savestrategy.no"):
        out.append(
            _risk(
                "save_strategy",
                "no",
                "no checkpoints are saved: a failure loses the whole run",
                "save_strategy='steps' with save_steps every 5-10% of training",
                explains=("crash", "abrupt_end", "divergence") + _NAN,
                severity=Severity.INFO,
            )
        )
    elif max_steps and ss in ("steps", "savestrategy.steps") and save and 0 < save < 1:
        pass  # a ratio (HF accepts save_steps < 1 as a share of the run): fine
    elif max_steps and ss in ("steps", "savestrategy.steps") and save and save > save_loss_share * max_steps:
        out.append(
            _risk(
                "save_steps",
                int(save),
                f"save_steps={int(save)} is {save / max_steps:.0%} of the run: a failure loses up to that many steps",
                f"save_steps about {max(1, max_steps // 10)}",
                explains=("crash", "abrupt_end", "divergence") + _NAN,
                severity=Severity.INFO,
            )
        )
    # a risk that explains nothing here is still context; those marked standalone=False only matter as causes
    loss = series(frame, "train/loss") if len(frame) else pd.Series(dtype=float)
    if len(loss) and not np.isfinite(loss.to_numpy()).all():
        for f in out:
            f.evidence["run_has_nonfinite_loss"] = True
    return out
