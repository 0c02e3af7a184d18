"""A fleet's outputs besides the four report formats: the table a notebook wants (Parquet, CSV) and the fleet
findings as console lines (first in the console report).

The table has one row per finding (a run with no finding: one row with an empty signature), each with the run, its
path, its status and lead signature, and the run's settings as the fleet compares them
(:func:`autopsy.fleet.separate.run_settings`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from autopsy._optional import require
from autopsy.errors import UsageError
from autopsy.findings import Report
from autopsy.fleet.separate import SETTINGS, run_settings
from autopsy.report.summary import summarize

__all__ = ["TABLE_FORMATS", "findings_table", "fleet_text", "progress_bar", "write_table"]

TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv"}
_FINDING_COLUMNS = ["signature", "severity", "step", "end_step", "metric", "summary"]


def findings_table(report: Report) -> pd.DataFrame:
    """One row per finding, with the run's status, lead signature and settings; runs in report order."""
    verdicts = list(getattr(report, "verdicts", None) or ())
    if len(verdicts) != len(report.runs):
        verdicts = [(sm.status, sm.lead.signature if sm.lead else None) for sm in map(summarize, report.runs)]
    rows = []
    for run, (status, lead) in zip(report.runs, verdicts):
        base = {"run": run.run, "path": run.path, "status": status, "lead": lead, **run_settings(run.config)}
        found = run.sorted_findings()
        for f in found:
            rows.append(
                {
                    **base,
                    "signature": f.signature,
                    "severity": str(f.severity),
                    "step": f.step,
                    "end_step": f.end_step,
                    "metric": f.metric,
                    "summary": f.summary,
                }
            )
        if not found:
            rows.append({**base, **dict.fromkeys(_FINDING_COLUMNS)})
    columns = ["run", "path", "status", "lead", *_FINDING_COLUMNS, *SETTINGS]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("step", "end_step"):
        table[col] = table[col].astype("Int64")
    return table


def write_table(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write :func:`findings_table` to ``path`` (``.parquet`` or ``.csv``, from the extension)."""
    out = Path(path)
    kind = TABLE_FORMATS.get(out.suffix.lower())
    if kind is None:
        raise UsageError(f"--out {out}: a table is written as .parquet or .csv")
    table = findings_table(report)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "parquet":
            require("pyarrow", purpose="write Parquet")
            table.to_parquet(out, index=False)
        else:
            table.to_csv(out, index=False)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def fleet_text(report: Report) -> str:
    """The fleet findings as console lines ('' when there are none): what separates the failed runs."""
    found = list(getattr(report, "fleet_findings", None) or ())
    if not found:
        return ""
    lines = ["What separates the failed runs:"]
    for f in found:
        lines.append(f"  {f.summary}")
        lines.append(f"    p = {f.evidence.get('p_adjusted')} ({f.evidence.get('test')})")
    return "\n".join(lines) + "\n\n"


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[int, int, str], None] | None]:
    """A progress bar on stderr while the runs are analysed (only on a terminal: logs and pipes stay clean); yields
    the callback :func:`autopsy.fleet.analyze_many` takes, or None."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("analysing"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("runs", total=None)

        def update(done: int, total: int, run: str) -> None:
            bar.update(task, completed=done, total=total)

        yield update
