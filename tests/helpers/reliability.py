"""Helpers shared by the reliability tests: the damaged corpus, tree snapshots, and the CLI in and out of process."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from damaged import make_damaged

__all__ = ["cli_inprocess", "cli_subprocess", "has_module", "make_damaged", "snapshot"]


def has_module(name: str) -> bool:
    """True when an (importer) module exists in this build."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: files by sha256, symlinks by target, directories by name (links not followed)."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                key = str(p.relative_to(root.parent))
                if p.is_symlink():
                    out[key] = "link:" + os.readlink(p)
                elif p.is_dir():
                    out[key] = "dir"
                else:
                    out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli_inprocess(*args: object) -> tuple[int, str, str]:
    """``autopsy.cli.main`` in this process (same code path as the console script; much faster than a subprocess)."""
    from autopsy.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def cli_subprocess(*args: object, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m autopsy ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "autopsy", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
