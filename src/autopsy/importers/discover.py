"""Sniff a path: which runs are in it, and which files of each run each importer reads.

``autopsy analyze PATH`` accepts a run directory (an HF ``output_dir``), a checkpoint directory, a
single file, or a directory holding several runs. The walk never follows a symlink that leads
outside the given path, never loops, and stops at a bounded depth.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from autopsy.errors import InputError

__all__ = ["RunFiles", "classify", "find_runs"]

MAX_DEPTH = 8  # HF output dirs put event files 2 deep (runs/<date_host>/); W&B 3 deep (wandb/run-*/files)
MAX_FILES = 200_000

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_HPARAMS_DIR = re.compile(r"^\d{9,11}\.\d+$")  # HF's old add_hparams: <run dir>/<time.time()>/events...
_CONSOLE_SUFFIXES = (".log", ".out", ".txt", ".err", ".stdout", ".stderr")
_CONSOLE_NAMES = re.compile(r"(nohup|slurm|train|output|stdout|stderr|console|log)", re.I)


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


def classify(path: Path) -> str | None:
    """The kind of a file by its name: ``trainer_state``, ``tensorboard``, ``wandb``, ``console``, ..."""
    name = path.name
    if name == "trainer_state.json":
        return "trainer_state"
    if name == "losses.jsonl" and path.parent.name == "autopsy":
        return "autopsy_log"  # the true per-step losses recorded by autopsy.callbacks.AutopsyCallback
    wandb_kind = _classify_wandb(path)
    if wandb_kind is not None:
        return wandb_kind or None
    if "tfevents" in name:
        return "tensorboard"
    if name.endswith(".wandb"):
        return "wandb"
    if name == "training_args.bin":
        return "training_args"
    if name in ("config.json", "adapter_config.json", "generation_config.json"):
        return "model_config"
    if name == "wandb-history.parquet" or (name.endswith(".parquet") and "history" in name.lower()):
        return "wandb_export"
    if name.endswith(".csv"):
        return "wandb_export"
    if name.endswith(_CONSOLE_SUFFIXES) and name not in ("requirements.txt", "SOURCES.md", "LICENSE.txt", "merges.txt", "vocab.txt"):
        if name.endswith(".txt") and not _CONSOLE_NAMES.search(name):
            return "console_maybe"
        return "console"
    return None


_WANDB_RUN_DIR = re.compile(r"^(offline-)?run-\d{8}_\d{6}-\w+$")


def _classify_wandb(path: Path) -> str | None:
    """W&B's own files: ``""`` for files to ignore (its debug logs), ``"wandb"`` for a synced run's
    ``files/config.yaml`` and ``files/wandb-summary.json`` (read by the W&B importer with the run's
    ``.wandb``), ``None`` when the file is not W&B's."""
    name = path.name
    parent = path.parent
    if name in ("debug.log", "debug-internal.log", "debug-core.log", "debug-cli.log") and (
        parent.name == "wandb" or (parent.name == "logs" and _WANDB_RUN_DIR.match(parent.parent.name))
    ):
        return ""  # W&B's internal logs, not the training's console
    if name in ("config.yaml", "wandb-summary.json") and parent.name == "files" and _WANDB_RUN_DIR.match(parent.parent.name):
        return "wandb"
    return None


def _walk(root: Path) -> list[Path]:
    """Files under ``root``: symlinks resolved only inside root, no loops, bounded depth and count."""
    real_root = root.resolve()
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            p = Path(entry.path)
            try:
                if entry.is_symlink():
                    target = p.resolve()
                    if not target.is_relative_to(real_root):
                        continue  # never leave the given directory through a link
                    if entry.name == "latest-run":
                        continue  # wandb's pointer to a run dir we list anyway
                if entry.is_dir():
                    if depth + 1 <= MAX_DEPTH and entry.name not in ("__pycache__", ".git", "node_modules", ".venv"):
                        stack.append((p, depth + 1))
                elif entry.is_file():
                    out.append(p)
                    if len(out) >= MAX_FILES:
                        return out
            except (OSError, RuntimeError):  # RuntimeError: a symlink loop (a -> b -> a) on Python < 3.13
                continue
    return sorted(out)


def _wandb_run_dir(path: Path) -> Path | None:
    """``.../wandb/run-<date>-<id>`` or ``offline-run-...`` holding ``path``."""
    for parent in [path.parent, *path.parents]:
        if re.match(r"^(offline-)?run-\d{8}_\d{6}-\w+$", parent.name):
            return parent
    return None


def _run_root(path: Path, kind: str, base: Path) -> Path:
    """The directory that stands for the run a file belongs to."""
    if kind in ("wandb", "wandb_meta"):
        wd = _wandb_run_dir(path)
        if wd is not None:
            return wd
    parent = path.parent
    if kind == "autopsy_log":
        return parent.parent  # <output_dir>/autopsy/losses.jsonl
    # files inside checkpoint-N/ belong to the output dir above it
    if _CHECKPOINT_DIR.match(parent.name):
        return parent.parent if parent != base else parent
    if kind == "tensorboard":
        # HF layout: <output_dir>/runs/<date_host>/events...; the run is <output_dir> when it looks like one
        if parent.parent.name == "runs" and parent.parent.parent.is_relative_to(base):
            out_dir = parent.parent.parent
            return out_dir
        return parent
    wd = _wandb_run_dir(path)
    if wd is not None:
        return wd
    return parent


def _tensorboard_roots(files: list[Path], base: Path) -> dict[Path, Path]:
    """The run each event file belongs to (TensorBoard layouts).

    - ``<run dir>/<unix time>/events...`` (HF's old hparams subdir) belongs to ``<run dir>``;
    - HF's ``<output_dir>/runs/<date_host>/``: the run is ``<output_dir>`` when ``runs/`` holds one
      such dir, else each ``runs/<x>`` dir is a run of its own (several launches, or custom
      ``logging_dir`` names such as ``runs/run0..4``); the files of one dir are one run, read in
      write order (a resumed or restarted writer);
    - any other dir (a flat ``logs/`` shared by several launches): one file, one run, unless the
      dir holds a single event file.
    """
    events = [f for f in files if classify(f) == "tensorboard"]

    def own_dir(f: Path) -> Path:
        d = f.parent
        return d.parent if _HPARAMS_DIR.match(d.name) and d != base else d

    by_dir: dict[Path, list[Path]] = {}
    for f in events:
        by_dir.setdefault(own_dir(f), []).append(f)
    per_runs_dir: dict[Path, int] = {}
    for d in by_dir:
        if d.parent.name == "runs" and d.parent != base and d.parent.parent.is_relative_to(base):
            per_runs_dir[d.parent] = per_runs_dir.get(d.parent, 0) + 1
    out: dict[Path, Path] = {}
    for d, group in by_dir.items():
        if _CHECKPOINT_DIR.match(d.name):
            root = d.parent if d != base else d
            out.update({f: root for f in group})
        elif d.parent in per_runs_dir:
            root = d.parent.parent if per_runs_dir[d.parent] == 1 else d
            out.update({f: root for f in group})
        elif len([f for f in group if f.parent == d]) > 1:
            for f in group:
                out[f] = f if f.parent == d else own_dir(f)
        else:
            out.update({f: d for f in group})
    # an hparams subdir file whose dir was split per file joins the first file of that dir
    for f, root in list(out.items()):
        if root == own_dir(f) and f.parent != root and root not in out.values():
            siblings = sorted(g for g in by_dir[root] if g.parent == root)
            if siblings:
                out[f] = out[siblings[0]]
    return out


def find_runs(path: str | os.PathLike[str]) -> list[RunFiles]:
    """The runs under ``path`` with their files. Raises :class:`InputError` when there is nothing to read."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    if p.is_file():
        kind = classify(p) or "console"
        if kind == "console_maybe":
            kind = "console"
        if kind == "wandb_export" and p.suffix == ".csv":
            kind = "wandb_export"
        run = RunFiles(name=_name_for_file(p), root=p.parent)
        run.add(kind, p)
        if kind == "trainer_state" and _CHECKPOINT_DIR.match(p.parent.name):
            run.checkpoints[int(_CHECKPOINT_DIR.match(p.parent.name).group(1))] = p.parent
        return [run]
    base = p
    files = _walk(p)
    runs: dict[Path, RunFiles] = {}
    consoles: list[tuple[Path, str]] = []
    tb_roots = _tensorboard_roots(files, base)
    for f in files:
        kind = classify(f)
        if kind is None:
            continue
        if kind in ("console", "console_maybe"):
            consoles.append((f, kind))
            continue
        root = tb_roots.get(f) or _run_root(f, kind, base)
        run = runs.get(root)
        if run is None:
            run = runs[root] = RunFiles(name="", root=root)
        run.add(kind, f)
        m = _CHECKPOINT_DIR.match(f.parent.name)
        if m:
            run.checkpoints[int(m.group(1))] = f.parent
    # checkpoint dirs without trainer_state (weights only) still count as restart points
    for f in files:
        m = _CHECKPOINT_DIR.match(f.parent.name)
        if m and f.parent.parent in runs:
            runs[f.parent.parent].checkpoints.setdefault(int(m.group(1)), f.parent)
    # model/training config files alone do not make a run
    runs = {r: v for r, v in runs.items() if set(v.files) - {"model_config", "training_args"}}
    # console logs belong to the nearest run at or above them; alone, they are a run
    for f, kind in consoles:
        owner = next((runs[a] for a in [f.parent, *f.parent.parents] if a in runs), None)
        if owner is not None:
            owner.add("console", f)
        elif kind == "console" or not runs:
            root = f.parent
            run = runs.get(root) or RunFiles(name="", root=root)
            runs[root] = run
            run.add("console", f)
    # W&B's files/output.log is the run's console output: read it as such
    _fold_wandb_into_output_dir(runs)
    if not runs:
        raise InputError(f"nothing autopsy can read under {p}: no trainer_state.json, TensorBoard event file, W&B run or log")
    out = sorted(runs.values(), key=lambda r: str(r.root))
    _name_runs(out, base)
    return out


def _fold_wandb_into_output_dir(runs: dict[Path, RunFiles]) -> None:
    """A single W&B run dir at ``<output_dir>/wandb/(offline-)run-*/`` belongs to the run at
    ``<output_dir>`` (the same training logged to trainer_state/TensorBoard and W&B): its files join
    that run, so the sources merge into one. With several W&B runs there, which one matches is
    unknown, so they stay separate runs."""
    by_parent: dict[Path, list[Path]] = {}
    for root, run in runs.items():
        if "wandb" in run.files and _WANDB_RUN_DIR.match(root.name) and root.parent.name == "wandb":
            by_parent.setdefault(root.parent.parent, []).append(root)
    for out_dir, roots in by_parent.items():
        owner = runs.get(out_dir)
        if owner is None or len(roots) != 1 or not ({"trainer_state", "tensorboard"} & set(owner.files)):
            continue
        # TensorBoard dirs of several trainings (runs/<a>/, runs/<b>/): which one W&B saw is unknown
        tb_dirs = {p.relative_to(out_dir).parts[:2] for p in owner.files.get("tensorboard", [])}
        if len(tb_dirs) > 1:
            continue
        wb = runs.pop(roots[0])
        for kind, paths in wb.files.items():
            for path in paths:
                owner.add(kind, path)


def _name_for_file(p: Path) -> str:
    if p.name == "trainer_state.json":
        return p.parent.name if not _CHECKPOINT_DIR.match(p.parent.name) else p.parent.parent.name or p.parent.name
    return p.stem if p.parent.name in ("", ".") else f"{p.parent.name}/{p.name}" if "tfevents" in p.name else p.stem


def _name_runs(runs: list[RunFiles], base: Path) -> None:
    """Short unique names: the directory name, else the path relative to the analysed one."""
    for r in runs:
        name = r.root.name
        m = re.match(r"^(?:offline-)?run-\d{8}_\d{6}-(\w+)$", name)
        if m:
            name = name  # keep the whole W&B dir name: it carries the date
        r.name = name or base.resolve().name
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
