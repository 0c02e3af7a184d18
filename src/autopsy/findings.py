"""Findings, their severity, and the report that collects them."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autopsy.signatures import lead_rank

if TYPE_CHECKING:
    from autopsy.runinfo import RunInfo

__all__ = [
    "Finding",
    "Report",
    "RunReport",
    "Severity",
    "evidence_value",
    "finding_order",
    "findings_to_frame",
    "json_number",
    "num",
]


def finding_order(f: Finding) -> tuple[int, int, int, str]:
    """The one sort key of findings: most severe first, then earliest step, then root causes before their
    symptoms (the signature table's lead rank), then by id."""
    return (-int(f.severity), f.step if f.step is not None else 1 << 62, lead_rank(f.signature), f.signature)


def json_number(value: Any) -> Any:
    """A JSON-safe number: non-finite floats become "NaN", "Infinity", "-Infinity"; numpy scalars plain Python."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(value, np.integer):
        return int(value)
    return value


def evidence_value(x: Any) -> Any:
    """A number for evidence: floats rounded to 6 significant digits, non-finite ones as strings."""
    if isinstance(x, (float, np.floating)) and math.isfinite(float(x)):
        return float(f"{float(x):.6g}")
    return json_number(x)


def num(x: Any) -> str:
    """A number for prose: 4 significant digits (e-notation when very large or small), integers whole, NaN/inf by
    name; anything else as text. Evidence keeps more digits; a sentence says only what a person reads."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    v = float(x)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


class Severity(enum.IntEnum):
    """How much a finding matters (ordered): info < warning < error < critical."""

    INFO = 0
    WARNING = 1
    ERROR = 2
    CRITICAL = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str | Severity) -> Severity:
        if isinstance(text, Severity):
            return text
        try:
            return cls[str(text).strip().upper()]
        except KeyError:
            from autopsy.errors import UsageError

            raise UsageError(f"unknown severity {text!r}: use one of info, warning, error, critical") from None


@dataclass
class Finding:
    """One diagnosed signature with the evidence behind it.

    ``step`` is the first step at which the signature is visible (the run's own global step),
    ``end_step`` the last one (or ``None``). ``evidence`` holds numbers a reader can re-check.
    """

    signature: str
    severity: Severity
    summary: str
    step: int | None = None
    end_step: int | None = None
    metric: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    cause: str = ""
    fix: str = ""
    detector: str = ""
    run: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "severity": str(self.severity),
            "step": None if self.step is None else int(self.step),
            "end_step": None if self.end_step is None else int(self.end_step),
            "metric": self.metric,
            "summary": self.summary,
            "evidence": self.evidence,
            "cause": self.cause,
            "fix": self.fix,
            "detector": self.detector,
        }


@dataclass
class RunReport:
    """Everything found about one run."""

    run: str
    path: str = ""
    sources: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    frame: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    info: RunInfo | None = field(default=None, repr=False, compare=False)

    @property
    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def sorted_findings(self) -> list[Finding]:
        """Most severe first, then by step."""
        return sorted(self.findings, key=finding_order)

    def verdict(self) -> str:
        """One line: did the run fail, and how."""
        worst = self.worst
        if worst is None or worst < Severity.WARNING:
            return "healthy: nothing at warning or above"
        top = self.sorted_findings()[0]
        where = f" at step {top.step}" if top.step is not None else ""
        word = {Severity.CRITICAL: "FAILED", Severity.ERROR: "unhealthy", Severity.WARNING: "worth a look"}[worst]
        return f"{word}: {top.signature}{where}: {top.summary}"


@dataclass
class Report:
    """The postmortem of one or more runs."""

    runs: list[RunReport] = field(default_factory=list)
    version: str = ""

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.runs for f in r.findings]

    @property
    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def reaches(self, severity: Severity | str) -> bool:
        """True when any finding is at ``severity`` or above (``--fail-on``)."""
        level = Severity.parse(severity)
        return any(f.severity >= level for f in self.findings)

    def to_frame(self) -> pd.DataFrame:
        """One row per finding, most severe first (``step``/``end_step`` as nullable integers)."""
        return findings_to_frame(self.findings)

    # --- in a notebook: the report renders itself through autopsy.report, imported when called --------------

    def _repr_html_(self) -> str:
        """The HTML report's body (no page chrome), so a notebook cell shows the report itself."""
        from autopsy.report.html import render_html_body

        return render_html_body(self)

    def to_html(self) -> str:
        """The HTML report as one self-contained page."""
        from autopsy.report import render

        return render(self, "html")

    def plot(self, run: str | None = None) -> list[Any]:
        """The annotated matplotlib figures of one run (the only run, or ``run=`` naming one), as in the reports:
        loss, grad norm, learning rate and the machine, each marked where a finding sits. Needs the run's frame
        (kept by :func:`autopsy.analyze`)."""
        from autopsy.report.plots import run_figures

        return run_figures(self.run(run))

    def run(self, name: str | None = None) -> RunReport:
        """The report of the run named ``name`` (or the only run)."""
        from autopsy.errors import UsageError

        if name is None:
            if len(self.runs) != 1:
                names = ", ".join(r.run for r in self.runs[:10])
                raise UsageError(f"the report holds {len(self.runs)} runs: name one ({names})")
            return self.runs[0]
        for r in self.runs:
            if r.run == name:
                return r
        raise UsageError(f"no run named {name!r} in the report; its runs: {', '.join(r.run for r in self.runs[:10])}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report, in the format its extension names (.html, .md, .json, .txt); Markdown's plots go to
        ``<stem>_plots/`` beside it. Returns the path written."""
        from autopsy.report import format_for, render

        target = Path(path)
        fmt = format_for(target)
        options: dict[str, Any] = {}
        if fmt == "markdown":
            options["plots_dir"] = target.parent / (target.stem + "_plots")
        text = render(self, fmt, **options)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return target


def findings_to_frame(findings: list[Finding]) -> pd.DataFrame:
    """A frame of findings for notebooks: one row each, most severe first."""
    rows = [
        {
            "run": f.run,
            "signature": f.signature,
            "severity": str(f.severity),
            "step": f.step,
            "end_step": f.end_step,
            "metric": f.metric,
            "summary": f.summary,
            "cause": f.cause,
            "fix": f.fix,
        }
        for f in sorted(findings, key=finding_order)
    ]
    cols = ["run", "signature", "severity", "step", "end_step", "metric", "summary", "cause", "fix"]
    out = pd.DataFrame(rows, columns=cols)
    for col in ("step", "end_step"):
        out[col] = pd.array([None if v is None or v != v else int(v) for v in out[col]], dtype="Int64")
    return out
