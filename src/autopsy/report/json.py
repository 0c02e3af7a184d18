"""Report -> strict JSON (the contract of SIGNATURES.md): non-finite numbers as "NaN"/"Infinity"/"-Infinity"."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from autopsy.findings import Report, json_number
from autopsy.report.summary import summarize_fleet

__all__ = ["render_json", "report_to_dict", "strict"]


def strict(obj: Any, _depth: int = 0) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts."""
    if _depth > 50:
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float, np.integer, np.floating)):
        return json_number(obj)
    if isinstance(obj, dict):
        return {str(k): strict(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [strict(v, _depth + 1) for v in obj]
    if isinstance(obj, np.ndarray):
        return [strict(v, _depth + 1) for v in obj.tolist()]
    if hasattr(obj, "to_dict"):
        return strict(obj.to_dict(), _depth + 1)
    return str(obj)


def report_to_dict(report: Report) -> dict[str, Any]:
    runs = []
    fleet = summarize_fleet(report)
    for sm in fleet.runs:
        r = sm.run
        entry: dict[str, Any] = {
            "run": r.run,
            "path": r.path,
            "sources": r.sources,
            "config": r.config,
            "status": sm.status,
            "verdict": sm.verdict,
            "first_bad_step": sm.first_bad_step,
            "restart": sm.restart,
            "findings": [f.to_dict() for f in sm.findings],
            "skipped": r.skipped,
        }
        if r.errors:
            entry["errors"] = r.errors
        info = r.info
        if info is not None:
            entry["run_info"] = {
                "max_steps": info.max_steps,
                "global_step": info.global_step,
                "logging_steps": info.logging_steps,
                "eval_steps": info.eval_steps,
                "save_steps": info.save_steps,
                "checkpoints": {str(k): v for k, v in sorted(info.checkpoints.items())},
                "bad_checkpoints": {str(k): v for k, v in sorted(info.bad_checkpoints.items())},
                "damage": [d.to_dict() for d in info.damage],
                "notes": info.notes,
                "in_progress": info.in_progress,
            }
        runs.append(entry)
    out: dict[str, Any] = {"autopsy_version": report.version, "summary": {"runs": len(runs), **fleet.counts}}
    fleet_findings = getattr(report, "fleet_findings", None)  # a fleet's report (autopsy.fleet): first, before the runs
    if fleet_findings is not None:
        out["fleet_findings"] = [f.to_dict() for f in fleet_findings]
    out["runs"] = runs
    return out


def render_json(report: Report) -> str:
    return json.dumps(strict(report_to_dict(report)), indent=2, allow_nan=False) + "\n"
