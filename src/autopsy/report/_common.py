"""Shared pieces of the renderers: the config summary and evidence formatting."""

from __future__ import annotations

from typing import Any

from autopsy.findings import Finding, RunReport

__all__ = ["KEY_CONFIG", "config_summary", "format_evidence", "format_value", "restart_advice"]

KEY_CONFIG = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_grad_norm", "fp16", "bf16",
              "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
              "logging_steps", "eval_steps", "save_steps", "logging_nan_inf_filter", "optim", "weight_decay")


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={format_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(format_value(x) for x in v[:8]) + (" ..." if len(v) > 8 else "")
    return str(v)


def format_evidence(f: Finding, limit: int = 12) -> str:
    items = list(f.evidence.items())[:limit]
    return "; ".join(f"{k}={format_value(v)}" for k, v in items)


def config_summary(run: RunReport) -> dict[str, Any]:
    """The settings an engineer reads first, where known."""
    cfg = run.config or {}
    out = {k: cfg[k] for k in KEY_CONFIG if k in cfg and cfg[k] is not None}
    model = cfg.get("model")
    if isinstance(model, dict) and model:
        out["model"] = ", ".join(f"{k}={model[k]}" for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if k in model)
    return out


def restart_advice(run: RunReport) -> str | None:
    """Which checkpoint to restart from, when a finding names one."""
    for f in run.sorted_findings():
        ck = f.evidence.get("restart_checkpoint")
        if ck:
            return f"restart from {ck} (step {f.evidence.get('restart_step')}), {f.evidence.get('steps_to_redo')} steps to redo"
    return None
