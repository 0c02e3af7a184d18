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

__all__ = ["cli_inprocess", "cli_subprocess", "has_module", "make_damaged", "run_measured", "snapshot"]


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


# What a measuring script starts with: reset_peak() after its warm-up, peak_growth_mib() after the work it measures.
_PEAK_PRELUDE = """
import resource, sys
def _kb(field):  # VmRSS / VmHWM of this process, in KiB
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
def reset_peak():
    # reset the high-water mark, so a warm-up peak (lazy imports) cannot hide the one measured
    global _base, _peak
    try:
        open("/proc/self/clear_refs", "w").write("5")
        _base, _peak = _kb("VmRSS:"), lambda: _kb("VmHWM:")
    except OSError:
        _base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def peak_growth_mib():
    return (_peak() - _base) // 1024
"""


def run_measured(script: str, *args: object, timeout: float = 120) -> str:
    """Run ``script`` (which calls ``reset_peak()`` and ``peak_growth_mib()``) in a fresh Python process with
    ``args`` as ``sys.argv[1:]``; its stdout, after checking it exited 0."""
    r = subprocess.run([sys.executable, "-c", _PEAK_PRELUDE + script, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
