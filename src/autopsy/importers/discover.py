"""Sniff a path: which runs are in it, and which files of each run each importer reads.

``autopsy analyze PATH`` accepts a run directory (an HF ``output_dir``), a checkpoint directory, a single file, or a
directory holding several runs. Each file is offered to the importers in their claim order
(:func:`autopsy.importers.importers`); the first that claims it reads it. The walk never follows a symlink that
leads outside the given path, never loops, and stops at a bounded depth and file count.

Which run a file belongs to: the importer's own ``run_roots`` where it has a layout of its own (TensorBoard's
``runs/<date_host>/``, W&B's run dirs), else the file's directory, where a ``checkpoint-N/`` directory stands for
the output dir above it. Files of an ``ATTACH = "nearest"`` importer (console logs) join the run at or above them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from autopsy.checkpoints import checkpoint_step
from autopsy.errors import InputError
from autopsy.importers._registry import importer, importers

__all__ = ["RunFiles", "find_runs", "kind_of"]

MAX_DEPTH = 8  # HF output dirs put event files 2 deep (runs/<date_host>/); W&B 3 deep (wandb/run-*/files)
MAX_FILES = 200_000
_SKIP_DIRS = frozenset({"__pycache__", ".git", "node_modules", ".venv"})


@dataclass
class RunFiles:
    """The files of one run, by the kind of importer that reads them."""

    name: str
    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    checkpoints: dict[int, Path] = field(default_factory=dict)

    def add(self, kind: str, path: Path) -> None:
        bucket = self.files.setdefault(kind, [])
        if path not in bucket:
            bucket.append(path)


def kind_of(path: Path) -> tuple[ModuleType, int] | None:
    """The importer that claims ``path`` and how strongly (2: sure, 1: maybe; -1: a file it knows is no log, which
    nobody reads), or None."""
    for module in importers():
        strength = int(module.claims(path))
        if strength:
            return module, strength
    return None


def _walk(root: Path) -> list[Path]:
    """Files under ``root``, each once, by its real path: no symlink is followed (one that leads outside would leave
    the given directory; one that stays inside names a file or directory the walk lists anyway, as W&B's
    ``latest-run`` does), no loops, bounded depth and count."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            p = Path(entry.path)
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir():
                    if depth + 1 <= MAX_DEPTH and entry.name not in _SKIP_DIRS:
                        stack.append((p, depth + 1))
                elif entry.is_file():
                    out.append(p)
                    if len(out) >= MAX_FILES:
                        return sorted(out)
            except (OSError, RuntimeError):  # RuntimeError: a symlink loop (a -> b -> a) on Python < 3.13
                continue
    return sorted(out)


def default_root(path: Path, base: Path) -> Path:
    """The directory that stands for the run of a file: its own, or the output dir above a ``checkpoint-N/``."""
    parent = path.parent
    if checkpoint_step(parent.name) is not None and parent != base:
        return parent.parent
    return parent


def _single_file(p: Path) -> list[RunFiles]:
    found = kind_of(p)
    module = found[0] if found else importer("console")
    run = RunFiles(name=_name_for_file(p, module.KIND), root=p.parent)
    run.add(module.KIND, p)
    step = checkpoint_step(p.parent.name)
    if module.KIND == "trainer_state" and step is not None:
        run.checkpoints[step] = p.parent
    return [run]


def find_runs(path: str | os.PathLike[str]) -> list[RunFiles]:
    """The runs under ``path`` with their files. Raises :class:`InputError` when there is nothing to read."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    if p.is_file():
        return _single_file(p)
    base = p
    files = _walk(p)
    claimed: dict[str, list[tuple[Path, int]]] = {}
    for f in files:
        found = kind_of(f)
        if found is not None and found[1] > 0:
            claimed.setdefault(found[0].KIND, []).append((f, found[1]))
    runs: dict[Path, RunFiles] = {}
    attaching: list[tuple[ModuleType, Path, int]] = []
    for module in importers():
        mine = claimed.get(module.KIND, [])
        if getattr(module, "ATTACH", "own") != "own":
            attaching += [(module, f, strength) for f, strength in mine]
            continue
        roots = module.run_roots([f for f, _ in mine], base) if hasattr(module, "run_roots") else {}
        for f, _ in mine:
            root = roots.get(f) or default_root(f, base)
            runs.setdefault(root, RunFiles(name="", root=root)).add(module.KIND, f)
    structured = bool(runs)
    for module, f, strength in attaching:
        owner = next((runs[a] for a in [f.parent, *f.parent.parents] if a in runs), None)
        if owner is not None:
            owner.add(module.KIND, f)
        elif module.ATTACH == "nearest" and (strength >= 2 or not structured):
            # alone, a log is a run of its own (its importer's root: the file), never merged with its neighbours
            roots = module.run_roots([f], base) if hasattr(module, "run_roots") else {}
            root = roots.get(f) or f.parent
            runs.setdefault(root, RunFiles(name="", root=root)).add(module.KIND, f)
    for f in files:  # checkpoint dirs count as restart points, weights only or not
        step = checkpoint_step(f.parent.name)
        if step is not None and f.parent.parent in runs:
            runs[f.parent.parent].checkpoints.setdefault(step, f.parent)
    for module in importers():
        if hasattr(module, "finalize"):
            module.finalize(runs)
    if not runs:
        raise InputError(
            f"nothing autopsy can read under {p}: no trainer_state.json, TensorBoard event file, W&B run or log"
        )
    out = sorted(runs.values(), key=lambda r: str(r.root))
    _name_runs(out, base)
    return out


def _name_for_file(p: Path, kind: str) -> str:
    if kind == "trainer_state":
        return p.parent.name if checkpoint_step(p.parent.name) is None else (p.parent.parent.name or p.parent.name)
    if kind == "tensorboard" and p.parent.name not in ("", "."):
        return f"{p.parent.name}/{p.name}"
    return p.stem


_TEXT_SUFFIXES = {".log", ".out", ".err", ".txt", ".json"}  # a file run is named without these


def _name_runs(runs: list[RunFiles], base: Path) -> None:
    """Short unique names: the directory name, else the path relative to the analysed one."""
    for r in runs:
        r.name = (r.root.stem if r.root.suffix.lower() in _TEXT_SUFFIXES else r.root.name) or base.resolve().name
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            try:
                rel = r.root.relative_to(base)
                r.name = str(rel) if str(rel) != "." else base.resolve().name
            except ValueError:
                r.name = str(r.root)
