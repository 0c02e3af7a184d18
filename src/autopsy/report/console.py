"""Report -> the terminal, like the CLIs people like (pytest, ruff): the verdict first, one line per finding, details
on demand.

Per run: a panel with what went wrong, where, why, the fix and the checkpoint to restart from; then one line per
finding (severity, signature, steps, summary), with its cause and fix only where they differ from the lead's; then
one line on what was read. ``verbosity=1`` (``-v``) adds each finding's evidence, the damage and the notes;
``verbosity=2`` (``-vv``) everything (skipped detectors, the whole config). Several runs: a summary table (run,
verdict, lead signature, first bad step, restart) and a count line after the sections of the runs that need a look
(every run's with ``details=True``).
The width is the caller's (the terminal's, ``COLUMNS``, 80 when piped); nothing is wider.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from autopsy.findings import Finding, Report, Severity
from autopsy.report._format import format_value, format_wall, step_range
from autopsy.report.summary import FleetSummary, RunSummary, summarize_fleet

__all__ = ["render_console"]

_STYLE = {Severity.CRITICAL: "bold red", Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_STATUS_STYLE = {
    "failed": "bold red",
    "unhealthy": "red",
    "worth_a_look": "yellow",
    "healthy": "green",
    "no_data": "dim",
}


def _evidence(f: Finding, verbosity: int) -> list[tuple[str, str]]:
    """The evidence as (key, value) pairs: lists shortened with a count, a log's tail as a block of its own lines
    (repeats collapsed, the message already shown left out), numbers to 4 significant digits (``-vv``: every
    item)."""
    limit = 8 if verbosity < 2 else 10_000
    out = []
    for key, value in f.evidence.items():
        if key == "tail" and isinstance(value, list):
            said = str(f.evidence.get("message", "")).strip()
            lines = [str(line) for line in value[-limit:] if not (said and (said in str(line) or str(line) in said))]
            block: list[str] = []
            for line in lines:
                if block and block[-1].split(" (x")[0] == line:
                    n = int(block[-1].rsplit("(x", 1)[1].rstrip(")")) + 1 if " (x" in block[-1] else 2
                    block[-1] = f"{line} (x{n})"
                else:
                    block.append(line)
            out.append((key, "\n".join(block)))
            continue
        out.append((key, format_value(value, limit=limit)))
    return out


def _evidence_lines(f: Finding, verbosity: int) -> list[str]:
    return [f"{k}: {v}" if "\n" not in v else f"{k}:\n  " + v.replace("\n", "\n  ") for k, v in _evidence(f, verbosity)]


def _verdict_panel(sm: RunSummary) -> Panel:
    body = Text()
    lead = sm.lead
    style = _STATUS_STYLE[sm.status]
    body.append(sm.word, style=style)
    if lead is not None:
        wall = format_wall(lead.step, sm.walls).split(" (")[0]
        body.append(f"  {lead.signature}" + (f" at step {lead.step}" if lead.step is not None else ""), style="bold")
        if wall:
            body.append(f"  {wall}", style="dim")
        body.append(f"\n{lead.summary}")
        if lead.cause:
            body.append("\nwhy  ", style="bold")
            body.append(lead.cause)
        if lead.fix:
            body.append("\nfix  ", style="bold")
            body.append(lead.fix, style="green")
    else:
        body.append(f"  {sm.verdict.removeprefix(sm.word).lstrip(' :')}")
    if lead is not None and sm.run.info is not None and sm.run.info.in_progress:
        body.append("\nin progress: the run is still being written; this is a snapshot", style="yellow")
    if sm.restart:
        body.append(f"\n{sm.restart}", style="bold")
    return Panel(body, title=sm.run.run, title_align="left", border_style=style.split()[-1], padding=(0, 1))


def _findings_table(sm: RunSummary, verbosity: int) -> Table | None:
    shown = [f for f in sm.findings if f is not sm.lead]
    if not shown:
        return None
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1), expand=False)
    table.add_column("severity", no_wrap=True)
    table.add_column("signature", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("summary", ratio=1, overflow="fold")
    for f in shown:
        body = Text(f.summary)
        cause, fix = sm.advice_of(f)
        extra = [(label, text, style) for label, text, style in (("why: ", cause, ""), ("fix: ", fix, "green")) if text]
        for label, text, style in extra:
            body.append("\n" + label, style="bold")
            body.append(text, style=style)
        if verbosity:
            for line in _evidence_lines(f, verbosity):
                body.append("\n" + line, style="dim")
        table.add_row(Text(str(f.severity), style=_STYLE[f.severity]), f.signature, step_range(f), body)
    return table


def _footer(sm: RunSummary, verbosity: int) -> list[str]:
    run, info = sm.run, sm.run.info
    facts = [sm.location or run.run, ", ".join(run.sources) or "no source"]
    if sm.last_step is not None:
        facts.append(f"{sm.last_step} steps" + (f" of {sm.max_steps}" if sm.max_steps else ""))
    if sm.first_bad_step is not None:
        facts.append(f"first bad step {sm.first_bad_step}")
    lines = [" · ".join(facts)]
    damage = list(info.damage) if info is not None else []
    notes = list(info.notes) if info is not None else []
    if verbosity:
        lines += [
            f"damaged: {d.file}: {d.problem}" + (f" (salvaged: {d.salvaged})" if d.salvaged else "") for d in damage
        ]
        lines += [f"note: {n}" for n in notes]
        if sm.config:
            lines.append("config: " + "; ".join(f"{k}={format_value(v)}" for k, v in sm.config.items()))
    if verbosity >= 2:
        lines += [f"skipped: {s['detector']} ({s['reason']})" for s in run.skipped]
    hidden = (
        []
        if verbosity
        else [f"{len(damage)} damaged file(s)" if damage else "", f"{len(notes)} note(s)" if notes else ""]
    )
    if verbosity < 2 and run.skipped:
        hidden.append(f"{len(run.skipped)} detector(s) skipped")
    hidden = [h for h in hidden if h]
    if hidden:
        lines.append(", ".join(hidden) + (": -v to show" if not verbosity else ": -vv to show"))
    lines += [f"detector error: {e['detector']}: {e['error']}" for e in run.errors]
    return lines


def _run(console: Console, sm: RunSummary, verbosity: int) -> None:
    console.print(_verdict_panel(sm))
    if verbosity and sm.lead is not None and sm.lead.evidence:  # the lead's evidence (its summary is in the panel)
        console.print(f"evidence of {sm.lead.signature}:", style="bold", markup=False, highlight=False)
        lead = Table(box=None, show_header=False, padding=(0, 1, 0, 2))
        lead.add_column("key", no_wrap=True, style="dim")
        lead.add_column("value", overflow="fold", style="dim")
        for key, value in _evidence(sm.lead, verbosity):
            lead.add_row(key, value)
        console.print(lead)
    table = _findings_table(sm, verbosity)
    if table is not None:
        console.print(table)
    for line in _footer(sm, verbosity):
        console.print(line, style="dim", markup=False, highlight=False)


def _fleet(console: Console, fleet: FleetSummary) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    for name, kw in (
        ("run", {"overflow": "fold"}),
        ("verdict", {"no_wrap": True}),
        ("lead", {"overflow": "fold"}),
        ("first bad", {"justify": "right", "no_wrap": True}),
        ("restart from", {"overflow": "fold"}),
    ):
        table.add_column(name, **kw)
    for sm in fleet.runs:
        restart = sm.restart or ""
        restart = (
            restart.removeprefix("restart from ").split(" (step")[0] if restart.startswith("restart from") else restart
        )
        table.add_row(
            sm.run.run,
            Text(sm.word, style=_STATUS_STYLE[sm.status]),
            sm.lead.signature if sm.lead is not None else "",
            "" if sm.first_bad_step is None else str(sm.first_bad_step),
            restart,
        )
    console.print(table)
    console.print(fleet.count_line, style="bold", markup=False, highlight=False)


def render_console(
    report: Report,
    *,
    width: int | None = None,
    color: bool | None = None,
    verbosity: int = 0,
    details: bool | None = None,
    summary_only: bool = False,
    **_: Any,
) -> str:
    """Render to a string (with ANSI colours when ``color``), ``width`` columns wide (80 by default).

    One run: its section. Several: a section for each run that needs a look (every run with ``details=True``),
    then the summary table and the count line; ``summary_only`` prints just the table and the count line.
    """
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=width or 80,
        force_terminal=bool(color),
        color_system="standard" if color else None,
        highlight=False,
        soft_wrap=False,
    )
    fleet = summarize_fleet(report)
    several = len(fleet.runs) > 1
    shown = (
        []
        if summary_only
        else [sm for sm in fleet.runs if not several or details or sm.status not in ("healthy", "no_data")]
    )
    for i, sm in enumerate(shown):
        if i:
            console.print()
        _run(console, sm, verbosity)
    if several or summary_only:
        if shown:
            console.print()
        _fleet(console, fleet)
    if not fleet.runs:
        console.print("no run found")
    text = buf.getvalue()
    return text if color else "".join(line.rstrip() + "\n" for line in text.splitlines())
