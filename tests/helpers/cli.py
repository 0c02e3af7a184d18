"""The CLI in-process (autopsy.cli.main with the streams captured): exit code, stdout, stderr, as a user sees them.
A few smoke tests still run ``python -m autopsy`` in a subprocess; everything else calls this."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: Any, columns: int | None = None, cwd: str | Path | None = None) -> CliResult:
    """Run ``autopsy ARGS...`` in this process; ``columns`` sets COLUMNS as a terminal would."""
    from autopsy.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cols, old_cwd = os.environ.get("COLUMNS"), os.getcwd()
    if columns is not None:
        os.environ["COLUMNS"] = str(columns)
    else:
        os.environ.pop("COLUMNS", None)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(old_cwd)
        if old_cols is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_cols
    return CliResult(rc, out.getvalue(), err.getvalue())
