"""Report -> Markdown for a PR comment or an issue: the HTML report's content, plots as PNG files beside it.

With ``plots_dir`` the annotated plots are written there (``<run>-<plot>.png``) and linked relative to the
Markdown file (``plots_link``, default: the directory's name, as the CLI puts it beside ``--out``). Without it
no file is written and the text is a pure function of the report.
"""

from __future__ import annotations

import re
from pathlib import Path

from autopsy.findings import Report, RunReport
from autopsy.report._format import format_value, format_wall, replay_evidence, step_range
from autopsy.report.summary import RunSummary, summarize_fleet

__all__ = ["render_markdown"]


def _cell(text: object) -> str:
    """Text from the data, safe in a table cell or a line: no raw HTML, no broken table, one line."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def _code(text: object) -> str:
    """A code span when the text cannot break out of one, else escaped plain text."""
    t = str(text)
    return f"`{t}`" if t and not any(c in t for c in "`<>|\n") else _cell(t)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _plots(run: RunReport, idx: int, plots_dir: Path, plots_link: str) -> list[str]:
    from autopsy.errors import UsageError
    from autopsy.report.plots import run_plots

    plots = run_plots(run, fmt="png")
    if not plots:
        return []
    try:
        plots_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write plots to {plots_dir}: {exc.strerror or exc}") from None
    lines = ["### Plots", ""]
    for p in plots:
        name = f"{idx}-{_safe_name(run.run)}-{p.name}.png"
        (plots_dir / name).write_bytes(p.data)
        lines += [f"![{p.title}]({plots_link}/{name})", ""]
        if p.notes:
            lines += [f"*{_cell('; '.join(p.notes))}*", ""]
    return lines


def _verdict(sm: RunSummary) -> list[str]:
    lines = [f"**Verdict:** {_cell(sm.verdict)}", ""]
    top = sm.lead
    if top is not None:
        wall = format_wall(top.step, sm.walls)
        if top.step is not None:
            lines.append(f"- **Where:** step {top.step}" + (f" ({wall})" if wall else ""))
        lines.append(f"- **Why:** {_cell(top.cause or top.summary)}")
        if top.fix:
            lines.append(f"- **What to do:** {_cell(top.fix)}")
        if sm.restart:
            lines.append(f"- **Restart:** {_cell(sm.restart)}")
        lines.append("")
    return lines


def _findings(sm: RunSummary) -> list[str]:
    """The timeline (the lead's row points at the verdict) and each finding's evidence, with the advice not yet said."""
    if not sm.findings:
        return []
    lines = [
        "### Timeline",
        "",
        "| step | wall time | severity | signature | metric | summary |",
        "|---:|---|---|---|---|---|",
    ]
    lines += [
        f"| {step_range(f)} | {format_wall(f.step, sm.walls)} | {f.severity} | `{f.signature}` | "
        f"{_code(f.metric) if f.metric else ''} | {'*the verdict*' if f is sm.lead else _cell(f.summary)} |"
        for f in sm.timeline
    ]
    lines += ["", "### Evidence", ""]
    for f in sm.findings:
        cause, fix = sm.advice_of(f)
        lines += [
            f"#### `{f.signature}` ({f.severity})" + (f" at step {step_range(f)}" if f.step is not None else ""),
            "",
        ]
        evidence = replay_evidence(f) if f in sm.replay else f.evidence  # a replay's contract keys first
        lines += (
            [f"- {_cell('; '.join(f'{k}={format_value(v)}' for k, v in list(evidence.items())[:30]))}"]
            if evidence
            else []
        )
        lines += [f"- **Cause:** {_cell(cause)}"] if cause else []
        lines += [f"- **Fix:** {_cell(fix)}"] if fix else []
        lines.append("")
    return lines


def _config(sm: RunSummary) -> list[str]:
    if not sm.config:
        return []
    lines = ["### Config", "", "| setting | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(format_value(v))} |" for k, v in sm.config.items()]
    return [*lines, ""]


def _reading(run: RunReport) -> list[str]:
    """What reading the run's files met (damage, notes), the detectors skipped and any detector error."""
    info = run.info
    damage = list(info.damage) if info is not None else []
    notes = list(info.notes) if info is not None else []
    lines: list[str] = []
    if damage or notes:
        lines += ["### Sources read", ""]
        lines += [
            f"- **damaged:** {_code(d.file)}"
            + (f" at offset {d.offset}" if d.offset is not None else "")
            + f": {_cell(d.problem)}"
            + (f" (salvaged: {_cell(d.salvaged)})" if d.salvaged else "")
            for d in damage
        ]
        lines += [f"- note: {_cell(n)}" for n in notes]
        lines.append("")
    if run.skipped:
        lines += ["<details><summary>Skipped detectors</summary>", ""]
        lines += [f"- {_cell(s.get('detector', ''))}: {_cell(s.get('reason', ''))}" for s in run.skipped]
        lines += ["", "</details>", ""]
    if run.errors:
        lines += [
            f"- **detector error:** {_cell(e.get('detector', ''))}: {_cell(e.get('error', ''))}" for e in run.errors
        ]
        lines.append("")
    return lines


def _run(sm: RunSummary, idx: int, plots_dir: Path | None, plots_link: str) -> list[str]:
    run = sm.run
    lines = [f"## {_cell(run.run)}", "", *_verdict(sm)]
    lines += [f"Sources: {_cell(', '.join(run.sources) or 'none')} — {_code(sm.location)}", ""]
    if plots_dir is not None:
        lines += _plots(run, idx, plots_dir, plots_link)
    return lines + _findings(sm) + _config(sm) + _reading(run)


def render_markdown(report: Report, *, plots_dir: str | Path | None = None, plots_link: str | None = None) -> str:
    """The report as Markdown; with ``plots_dir``, PNG plots are written there and linked."""
    pdir = Path(plots_dir) if plots_dir is not None else None
    link = plots_link if plots_link is not None else (pdir.name if pdir is not None else "")
    lines = ["# autopsy report", "", f"autopsy {report.version}", ""]
    fleet = summarize_fleet(report)
    if len(report.runs) > 1:
        rows = fleet.rows()
        cols = list(rows[0])
        lines += ["## Summary", "", fleet.count_line, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
        lines.append("")
    for i, sm in enumerate(fleet.runs):
        lines += _run(sm, i, pdir, link)
    return "\n".join(lines).rstrip() + "\n"
