"""How values read in every format: numbers to 4 significant digits, steps and spans, wall times, evidence."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import pandas as pd

from autopsy.findings import Finding, num

__all__ = [
    "format_evidence",
    "format_number",
    "format_value",
    "format_wall",
    "html_text",
    "html_value",
    "replay_evidence",
    "step_range",
]


format_number = num  # one rule for a number a person reads (autopsy.findings.num)


def html_text(x: Any) -> str:
    """``x`` as HTML text (attribute-safe)."""
    return html.escape(str(x), quote=True)


def html_value(v: Any) -> str:
    """A value of the evidence or the config (:func:`format_value`) as HTML text."""
    return html_text(format_value(v))


def format_value(v: Any, *, limit: int = 8) -> str:
    """A value of the evidence or the config as one short line."""
    if isinstance(v, (float, int)) and not isinstance(v, bool):
        return format_number(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={format_value(x, limit=limit)}" for k, x in list(v.items())[:limit]) + (
            f" (+{len(v) - limit} more)" if len(v) > limit else ""
        )
    if isinstance(v, (list, tuple)):
        return ", ".join(
            f"[{format_value(x, limit=limit)}]" if isinstance(x, dict) else format_value(x, limit=limit)
            for x in v[:limit]
        ) + (f" (+{len(v) - limit} more)" if len(v) > limit else "")
    return str(v)


def format_evidence(evidence: dict[str, Any], limit: int = 12) -> str:
    """The evidence as one line, ``key=value; ...``: its first ``limit`` items, each value shortened."""
    return "; ".join(f"{k}={format_value(v)}" for k, v in list(evidence.items())[:limit])


def format_wall(step: int | None, walls: pd.Series) -> str:
    """``2024-05-01 12:00:03 UTC (+1h02m)`` for a step, from the nearest logged step at or before it; '' when unknown."""
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


# the evidence keys docs/SIGNATURES.md names for each replay signature, shown first
REPLAY_KEYS = (
    "module",
    "phase",
    "dtype",
    "finite_in_float32",
    "max_abs_input",
    "tensors",
    "count",
    "rows",
    "problem",
    "loss",
    "grad_norm",
    "checkpoint",
    "batch",
)


def replay_evidence(f: Finding) -> dict[str, Any]:
    """The evidence of a replay finding, its contract keys first."""
    ev = f.evidence
    out = {k: ev[k] for k in REPLAY_KEYS if k in ev}
    out.update({k: v for k, v in ev.items() if k not in out})
    return out
