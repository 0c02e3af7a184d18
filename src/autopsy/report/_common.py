"""Shared pieces of the renderers: the config summary and evidence formatting."""

from __future__ import annotations

from typing import Any

import pandas as pd

from autopsy.findings import Finding, RunReport

__all__ = ["KEY_CONFIG", "REPLAY_SIGNATURES", "comparison_rows", "config_summary", "first_bad_step", "format_evidence",
           "format_value", "format_wall", "last_step", "replay_evidence", "replay_findings", "restart_advice", "status_word",
           "step_range", "step_wall_times"]

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


def restart_advice(run: RunReport, *, first_bad: int | None = None) -> str | None:
    """Which checkpoint to restart from, when a finding names one; with ``first_bad`` and none known, say so."""
    for f in run.sorted_findings():
        ck = f.evidence.get("restart_checkpoint")
        if ck:
            redo = f.evidence.get("steps_to_redo")
            return f"restart from {ck} (step {f.evidence.get('restart_step')}), {redo} step{'' if redo == 1 else 's'} to redo"
    if first_bad is not None:
        return f"no checkpoint known before step {first_bad}: restart from scratch"
    return None


REPLAY_SIGNATURES = ("weights_nonfinite", "nonfinite_origin", "bad_batch", "replay_not_reproduced")
# the evidence keys SIGNATURES.md names for each replay signature, shown first
REPLAY_KEYS = ("module", "phase", "dtype", "finite_in_float32", "max_abs_input", "tensors", "count", "rows", "problem",
               "loss", "grad_norm", "checkpoint", "batch")


def status_word(run: RunReport) -> str:
    """FAILED / unhealthy / worth a look / healthy, from the worst finding."""
    from autopsy.findings import Severity

    worst = run.worst
    if worst is None or worst < Severity.WARNING:
        return "healthy"
    return {Severity.CRITICAL: "FAILED", Severity.ERROR: "unhealthy", Severity.WARNING: "worth a look"}[worst]


def first_bad_step(run: RunReport) -> int | None:
    """The first step of any finding at error or above (None when there is none)."""
    from autopsy.findings import Severity

    steps = [int(f.step) for f in run.findings if f.severity >= Severity.ERROR and f.step is not None]
    return min(steps) if steps else None


def last_step(run: RunReport) -> int | None:
    """The last step logged by the run (live rows), else what RunInfo knows."""
    frame = run.frame
    if frame is not None and not frame.empty:
        return int(frame.loc[~frame["superseded"], "step"].max()) if (~frame["superseded"]).any() else None
    info = run.info
    return getattr(info, "global_step", None) if info is not None else None


def step_wall_times(run: RunReport) -> pd.Series:
    """First known wall time (s since the epoch) of each step of the run: a float Series indexed by sorted step."""
    import numpy as np

    frame = run.frame
    if frame is None or frame.empty:
        return pd.Series([], dtype=np.float64)
    rows = frame[np.isfinite(frame["wall_time"].to_numpy(dtype=float))]
    return rows.groupby("step", sort=True)["wall_time"].min()


def format_wall(step: int | None, walls: pd.Series) -> str:
    """``2024-05-01 12:00:03 UTC (+1h02m)`` for a step, from the nearest logged step at or before it; '' when unknown."""
    import datetime as dt

    if step is None or walls.empty:
        return ""
    i = int(walls.index.searchsorted(int(step), side="right")) - 1
    if i < 0:
        return ""
    t = float(walls.iloc[i])
    start = float(walls.iloc[0])
    stamp = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    secs = int(round(t - start))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    elapsed = f"+{h}h{m:02d}m" if h else f"+{m}m{s:02d}s"
    return f"{stamp} ({elapsed})"


def step_range(f: Finding) -> str:
    if f.step is None:
        return ""
    return str(f.step) if f.end_step in (None, f.step) else f"{f.step}–{f.end_step}"


def replay_findings(run: RunReport) -> list[Finding]:
    return [f for r in [run] for f in r.sorted_findings() if f.signature in REPLAY_SIGNATURES]


def replay_evidence(f: Finding) -> dict[str, Any]:
    """The module/phase evidence of a replay finding, contract keys first."""
    ev = f.evidence
    out = {k: ev[k] for k in REPLAY_KEYS if k in ev}
    out.update({k: v for k, v in ev.items() if k not in out})
    return out


def comparison_rows(runs: list[RunReport]) -> list[dict[str, str]]:
    """One row per run for the comparison table of a multi-run report."""
    import math

    import numpy as np

    rows = []
    for run in runs:
        top = run.sorted_findings()[0] if run.findings else None
        final_loss = best_eval = ""
        if run.frame is not None and not run.frame.empty:
            from autopsy.frame import series

            tl = series(run.frame, "train/loss").to_numpy()
            tl = tl[np.isfinite(tl)]
            if len(tl):
                final_loss = format_value(float(tl[-1]))
            ev = series(run.frame, "eval/loss").to_numpy()
            ev = ev[np.isfinite(ev)]
            if len(ev):
                best_eval = format_value(float(ev.min()))
        bad = first_bad_step(run)
        ck = next((f.evidence.get("restart_checkpoint") for f in run.sorted_findings() if f.evidence.get("restart_checkpoint")), "")
        last = last_step(run)
        rows.append({
            "run": run.run,
            "status": status_word(run),
            "top finding": top.signature if top is not None and top.severity >= 1 else "",
            "first bad step": "" if bad is None else str(bad),
            "last step": "" if last is None or (isinstance(last, float) and math.isnan(last)) else str(last),
            "findings": str(len(run.findings)),
            "final train loss": final_loss,
            "best eval loss": best_eval,
            "restart from": str(ck or ""),
        })
    return rows
