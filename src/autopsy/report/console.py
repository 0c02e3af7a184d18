"""Report -> the console (rich): verdict first, then findings by severity with their evidence."""

from __future__ import annotations

import io

from autopsy.findings import Report, Severity
from autopsy.report._format import format_evidence, format_value, format_wall
from autopsy.report.summary import summarize

__all__ = ["render_console"]

_STYLE = {
    Severity.CRITICAL: "bold white on red",
    Severity.ERROR: "bold red",
    Severity.WARNING: "yellow",
    Severity.INFO: "cyan",
}


def render_console(
    report: Report, *, width: int | None = None, color: bool | None = None, verbose: bool = False
) -> str:
    """Render to a string (with ANSI colours when ``color``)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = Console(
        file=buf,
        width=width or 110,
        force_terminal=bool(color),
        color_system="standard" if color else None,
        highlight=False,
        soft_wrap=False,
    )
    for run in report.runs:
        summary = summarize(run)
        worst = run.worst
        style = _STYLE.get(worst, "green") if worst is not None and worst >= Severity.WARNING else "bold green"
        head = Text()
        head.append(f"{run.run}", style="bold")
        head.append(f"  ({', '.join(run.sources) or 'no source'})  {run.path}\n", style="dim")
        head.append(summary.verdict, style=style)
        bad = summary.first_bad_step
        if bad is not None:
            wall = format_wall(bad, summary.walls)
            head.append(f"\nfirst bad step: {bad}" + (f" ({wall})" if wall else ""))
        if summary.restart:
            head.append(f"\n{summary.restart}", style="bold")
        console.print(
            Panel(head, title="autopsy", title_align="left", border_style=style.split()[-1] if worst else "green")
        )
        shown = [f for f in summary.findings if verbose or f.severity >= Severity.INFO]
        if shown:
            table = Table(show_header=True, header_style="bold", expand=True, show_lines=True)
            table.add_column("severity", no_wrap=True)
            table.add_column("signature", no_wrap=True)
            table.add_column("step", justify="right", no_wrap=True)
            table.add_column("what, why, fix", ratio=1)
            for f in shown:
                step = (
                    ""
                    if f.step is None
                    else (str(f.step) if f.end_step in (None, f.step) else f"{f.step}-{f.end_step}")
                )
                body = Text(f.summary)
                ev = format_evidence(f)
                if ev:
                    body.append(f"\nevidence: {ev}", style="dim")
                if f.cause:
                    body.append(f"\ncause: {f.cause}")
                if f.fix:
                    body.append(f"\nfix: {f.fix}", style="green")
                table.add_row(Text(str(f.severity), style=_STYLE[f.severity]), f.signature, step, body)
            console.print(table)
        cfg = summary.config
        if cfg:
            console.print(
                "config: " + "; ".join(f"{k}={format_value(v)}" for k, v in cfg.items()), style="dim", markup=False
            )
        info = run.info
        for d in (getattr(info, "damage", None) or []) if info is not None else []:
            console.print(
                f"damaged: {d.file} at offset {d.offset}: {d.problem}"
                + (f" (salvaged: {d.salvaged})" if d.salvaged else ""),
                style="yellow",
                markup=False,
            )
        for note in (getattr(info, "notes", None) or []) if info is not None else []:
            console.print(f"note: {note}", style="dim", markup=False)
        if run.skipped and verbose:
            console.print(
                "skipped: " + "; ".join(f"{s['detector']} ({s['reason']})" for s in run.skipped),
                style="dim",
                markup=False,
            )
        for e in run.errors:
            console.print(f"detector error: {e['detector']}: {e['error']}", style="red", markup=False)
        console.print()
    return buf.getvalue()
