"""What a person reads first, built once per run and shared by every format: the status, the headline finding and
its step, the restart advice, the timeline, the key settings; and the summary of many runs.

Every renderer (console, Markdown, HTML, JSON) reads a :class:`RunSummary`, so the headline's step, the "first bad
step" and the restart advice are the same sentence in every format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autopsy.checkpoints import restart_point
from autopsy.findings import Finding, Report, RunReport, Severity, finding_order
from autopsy.frame import wall_seconds
from autopsy.series import series
from autopsy.signatures import NONFINITE, SIGNATURES

__all__ = ["KEY_CONFIG", "STATUSES", "FleetSummary", "RunSummary", "display_path", "summarize", "summarize_fleet"]

# status id -> the word a person reads
STATUSES = {
    "failed": "FAILED",
    "unhealthy": "unhealthy",
    "worth_a_look": "worth a look",
    "healthy": "healthy",
    "no_data": "no data",
}
_BY_SEVERITY = {Severity.CRITICAL: "failed", Severity.ERROR: "unhealthy", Severity.WARNING: "worth_a_look"}

KEY_CONFIG = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "fp16",
    "bf16",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "logging_nan_inf_filter",
    "optim",
    "weight_decay",
)


@dataclass
class RunSummary:
    """One run as a person reads it."""

    run: RunReport
    status: str  # a key of STATUSES
    lead: Finding | None  # the headline finding (warning or above), or None
    restart: str | None  # which checkpoint to restart from (or keep), one sentence
    last_step: int | None
    max_steps: int | None
    walls: pd.Series  # the first wall time of each step, sorted by step
    findings: list[Finding] = field(default_factory=list)  # most severe first
    config: dict[str, Any] = field(default_factory=dict)  # the settings an engineer reads first
    final_train_loss: float | None = None
    best_eval_loss: float | None = None
    advice: dict[int, tuple[str, str]] = field(default_factory=dict)  # id(finding) -> (cause, fix) still to say

    @property
    def word(self) -> str:
        return STATUSES[self.status]

    @property
    def first_bad_step(self) -> int | None:
        """The step of the headline finding: the same number the verdict line names."""
        return self.lead.step if self.lead is not None else None

    @property
    def verdict(self) -> str:
        """One line: did the run fail, and how."""
        live = self.run.info is not None and self.run.info.in_progress
        if self.lead is None:
            if self.status == "no_data":
                return "no training metrics: cannot judge" + (" yet (the run is still being written)" if live else "")
            return "healthy so far: the run is still being written" if live else "healthy: nothing at warning or above"
        where = f" at step {self.lead.step}" if self.lead.step is not None else ""
        return f"{self.word}{' (in progress)' if live else ''}: {self.lead.signature}{where}: {self.lead.summary}"

    @property
    def location(self) -> str:
        """Where the run was read from, as a person wants it: its one file, else its directory."""
        files = self.run.info.files if self.run.info is not None else []
        return display_path(files[0] if len(files) == 1 else self.run.path)

    def advice_of(self, f: Finding) -> tuple[str, str]:
        """The cause and fix to print beside ``f`` ('' for each already said): the lead's are in the verdict, a
        finding of the lead's own event (the NaN it made, the weights it poisoned) shares them, and a clause said
        once by a more severe finding is not said again."""
        return self.advice.get(id(f), ("", ""))

    @property
    def timeline(self) -> list[Finding]:
        """The findings in the order they happened."""
        return sorted(self.findings, key=lambda f: (f.step if f.step is not None else 1 << 62, finding_order(f)))

    @property
    def replay(self) -> list[Finding]:
        return [
            f
            for f in self.findings
            if SIGNATURES.get(f.signature) is not None and SIGNATURES[f.signature].kind == "replay"
        ]


def _has_data(run: RunReport) -> bool:
    if run.frame is not None and len(run.frame):
        return True
    return any(f.signature in SIGNATURES and SIGNATURES[f.signature].kind == "replay" for f in run.findings) or (
        run.info is not None and run.info.crash is not None
    )


def _restart(run: RunReport, lead: Finding | None) -> str | None:
    """The restart advice, from the run's checkpoints (damaged and poisoned ones left out) and its best checkpoint."""
    if lead is None or lead.step is None:
        return None
    info = run.info
    if lead.signature == "overfitting":
        best = (info.best_checkpoint if info is not None else None) or lead.evidence.get("best_checkpoint")
        where = f"keep {best}" if best else f"keep the weights of step {lead.step}"
        return f"{where}: the eval loss was best at step {lead.step}"
    if lead.severity < Severity.ERROR:
        return None
    point = restart_point(info, int(lead.step))
    if point["restart_checkpoint"]:
        redo = point["steps_to_redo"]
        return f"restart from {point['restart_checkpoint']} (step {point['restart_step']}), {redo} step{'' if redo == 1 else 's'} to redo"
    if lead.evidence.get("restart_from"):  # replay names the last finite checkpoint it found
        return f"restart from {lead.evidence['restart_from']}"
    if info is not None and info.checkpoints:
        return f"no usable checkpoint before step {lead.step}: restart from scratch"
    return None


def _last_step(run: RunReport) -> int | None:
    frame = run.frame
    if frame is not None and len(frame):
        live = ~frame["superseded"].to_numpy(dtype=bool)
        return int(frame["step"].to_numpy()[live].max()) if live.any() else None
    return run.info.global_step if run.info is not None else None


def _walls(run: RunReport) -> pd.Series:
    frame = run.frame
    if frame is None or frame.empty:
        return pd.Series([], dtype=np.float64)
    walls = wall_seconds(frame)
    timed = np.isfinite(walls)
    return pd.Series(walls[timed], index=frame["step"].to_numpy()[timed]).groupby(level=0, sort=True).min()


def _last_finite(frame: pd.DataFrame | None, metric: str, how: str) -> float | None:
    if frame is None or frame.empty:
        return None
    v = series(frame, metric, finite=True).to_numpy()
    if not len(v):
        return None
    return float(v[-1] if how == "last" else v.min())


def _config(run: RunReport) -> dict[str, Any]:
    cfg = run.config or {}
    out = {k: cfg[k] for k in KEY_CONFIG if k in cfg and cfg[k] is not None}
    model = cfg.get("model")
    if isinstance(model, dict) and model:
        parts = [
            f"{k}={model[k]}" for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if k in model
        ]
        if parts:
            out["model"] = ", ".join(parts)
    return out


# one event seen several ways: a non-finite update in the loss, the norm and the weights; a death in its traceback
# and in the run's early end
_ROOTS = ({*NONFINITE, "weights_nonfinite", "nonfinite_origin"}, {"crash", "abrupt_end"})


def _same_root(f: Finding, lead: Finding | None) -> bool:
    return (
        lead is not None
        and f.step is not None
        and lead.step is not None
        and f.step >= lead.step
        and any(f.signature in group and lead.signature in group for group in _ROOTS)
    )


def _clauses(text: str | None) -> list[str]:
    return [c.strip() for c in (text or "").split("; ") if c.strip()]


def _advice(findings: list[Finding], lead: Finding | None) -> dict[int, tuple[str, str]]:
    """What each finding still has to say after the ones before it (most severe first), clause by clause."""
    said = set(_clauses(lead.cause) + _clauses(lead.fix)) if lead is not None else set()
    out: dict[int, tuple[str, str]] = {}
    for f in findings:
        if f is lead or _same_root(f, lead):
            continue
        fresh = []
        for text in (f.cause, f.fix):
            new = [c for c in _clauses(text) if c not in said]
            said.update(new)
            fresh.append("; ".join(new))
        out[id(f)] = (fresh[0], fresh[1])
    return out


def summarize(run: RunReport) -> RunSummary:
    """The :class:`RunSummary` of one run."""
    findings = run.sorted_findings()
    lead = findings[0] if findings and findings[0].severity >= Severity.WARNING else None
    if lead is not None:
        status = _BY_SEVERITY[lead.severity]
    else:
        status = "healthy" if _has_data(run) else "no_data"
    info = run.info
    return RunSummary(
        run=run,
        status=status,
        lead=lead,
        restart=_restart(run, lead),
        last_step=_last_step(run),
        max_steps=info.max_steps if info is not None else None,
        walls=_walls(run),
        findings=findings,
        config=_config(run),
        final_train_loss=_last_finite(run.frame, "train/loss", "last"),
        best_eval_loss=_last_finite(run.frame, "eval/loss", "min"),
        advice=_advice(findings, lead),
    )


@dataclass
class FleetSummary:
    """Many runs at once: their summaries and the count of each status."""

    runs: list[RunSummary]

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self.runs:
            out[r.status] += 1
        return out

    @property
    def count_line(self) -> str:
        """``29 runs: 3 failed, 2 unhealthy, 1 worth a look, 20 healthy, 3 no data`` (zero counts left out)."""
        parts = [f"{n} {STATUSES[s]}" for s, n in self.counts.items() if n]
        n = len(self.runs)
        return f"{n} run{'' if n == 1 else 's'}: " + ", ".join(parts)

    def rows(self) -> list[dict[str, str]]:
        """One row per run: run, status, lead signature, first bad step, last step, restart."""
        out = []
        for r in self.runs:
            out.append(
                {
                    "run": r.run.run,
                    "status": r.word,
                    "lead": r.lead.signature if r.lead is not None else "",
                    "first bad step": "" if r.first_bad_step is None else str(r.first_bad_step),
                    "last step": "" if r.last_step is None else str(r.last_step),
                    "final train loss": "" if r.final_train_loss is None else f"{r.final_train_loss:.4g}",
                    "best eval loss": "" if r.best_eval_loss is None else f"{r.best_eval_loss:.4g}",
                    "restart": r.restart or "",
                }
            )
        return out


def summarize_fleet(report: Report) -> FleetSummary:
    return FleetSummary(runs=[summarize(r) for r in report.runs])


def display_path(path: str) -> str:
    """A run's path as a person wants it: relative to the current directory when inside it, never just '.'."""
    if not path:
        return ""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    if rel == ".":
        return os.path.abspath(path)
    return rel if not rel.startswith("..") else path
