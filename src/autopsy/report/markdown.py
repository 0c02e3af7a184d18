"""Report -> Markdown for a PR comment or an issue."""

from __future__ import annotations

from autopsy.findings import Report
from autopsy.report._common import config_summary, format_evidence, format_value, restart_advice

__all__ = ["render_markdown"]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    lines = [f"# autopsy report", "", f"autopsy {report.version}", ""]
    for run in report.runs:
        lines += [f"## {run.run}", "", f"**Verdict:** {run.verdict()}", ""]
        advice = restart_advice(run)
        if advice:
            lines += [f"**Restart:** {advice}", ""]
        lines += [f"Sources: {', '.join(run.sources) or 'none'} — `{run.path}`", ""]
        findings = run.sorted_findings()
        if findings:
            lines += ["| severity | signature | step | summary |", "|---|---|---:|---|"]
            for f in findings:
                step = "" if f.step is None else str(f.step)
                lines.append(f"| {f.severity} | `{f.signature}` | {step} | {_cell(f.summary)} |")
            lines.append("")
            for f in findings:
                lines += [f"### `{f.signature}` ({f.severity})" + (f" at step {f.step}" if f.step is not None else ""), "",
                          f.summary, ""]
                if f.evidence:
                    lines += [f"- **Evidence:** {_cell(format_evidence(f, limit=30))}"]
                if f.cause:
                    lines += [f"- **Cause:** {_cell(f.cause)}"]
                if f.fix:
                    lines += [f"- **Fix:** {_cell(f.fix)}"]
                lines.append("")
        cfg = config_summary(run)
        if cfg:
            lines += ["### Config", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(format_value(v))} |" for k, v in cfg.items()]
            lines.append("")
        if run.skipped:
            lines += ["<details><summary>Skipped detectors</summary>", ""]
            lines += [f"- {s['detector']}: {s['reason']}" for s in run.skipped]
            lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"
