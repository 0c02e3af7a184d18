"""Importers: from the files a run left behind to one canonical frame.

Every public module of this package that declares ``KIND`` is an importer, found at run time; adding a log format
is one new module (and its tests). An importer module declares:

``KIND``
    the kind of file it reads (``"trainer_state"``, ``"tensorboard"``, ...).
``PRIORITY``
    its rank when two sources log the same metric at the same step (lower wins: a logger that sees every step
    before one that sees every ``logging_steps``); also the order in which files are offered to importers.
``claims(path) -> int``
    2: the file is of this kind; 1: it may be (a run of its own only where nothing else is); 0: not this kind;
    -1: a file this importer knows is no log (W&B's own debug logs), which no importer reads.
``read(paths, *, run, options) -> Imported``
    the frame of the run's files of this kind and what they say about the run (:class:`~autopsy.runinfo.RunInfo`).

and optionally ``run_roots(files, base)`` (the directory that stands for each file's run, for layouts where it is
not the file's own directory), ``ATTACH = "nearest"`` (its files join the run at or above them, and make one of
their own only when there is none) or ``"nearest_only"`` (never a run of their own), and ``finalize(runs)`` (a
last look at the runs found, to fold one into another).

:func:`load` asks :mod:`autopsy.importers.discover` which runs a path holds, reads each run's files with the
importer of their kind, merges the sources of each run, scans the checkpoints that matter, and returns the frame
with its runs attached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from autopsy.checkpoints import check_run_checkpoints
from autopsy.errors import AutopsyError, InputError, UsageError
from autopsy.frame import concat_frames, empty_frame, merge_sources
from autopsy.importers._base import ENGINES, Imported, ReadOptions
from autopsy.importers._registry import importer, importers, priorities
from autopsy.importers._runs import concat_runs, mark_in_progress
from autopsy.runinfo import Damage, RunInfo, attach_runs, catalog
from autopsy.series import first_nonfinite_step

__all__ = [
    "ENGINES",
    "Imported",
    "ReadOptions",
    "importer",
    "importers",
    "load",
    "load_run",
    "priorities",
    "read_files",
]


def load_run(files: Any, *, options: ReadOptions | None = None) -> Imported:
    """Read every file of one run (:class:`~autopsy.importers.discover.RunFiles`) and merge its sources."""
    options = options or ReadOptions()
    info = RunInfo(name=files.name, path=str(files.root))
    frames: list[pd.DataFrame] = []
    for module in importers():
        paths = files.files.get(module.KIND)
        if not paths:
            continue
        try:
            got = module.read(sorted(paths), run=files.name, options=options)
        except AutopsyError as exc:
            # one unreadable source does not stop the others: it is reported
            info.damage.append(Damage(file=str(paths[0]), offset=None, problem=str(exc), salvaged="nothing"))
            continue
        frames.append(got.frame)
        for other in got.runs.values():
            info.merge(other)
    for step, path in files.checkpoints.items():
        info.checkpoints.setdefault(step, str(path))
    info.fill_from_config()
    frame = merge_sources(concat_frames(frames), priorities())
    frame.attrs.clear()
    check_run_checkpoints(info, first_nonfinite_step(frame))
    mark_in_progress(info, frame)
    return Imported.one(frame, info)


def load(path: str | os.PathLike[str], *, engine: str = "auto") -> pd.DataFrame:
    """Load every run under ``path`` into one canonical frame (see :mod:`autopsy.frame`).

    ``path`` may be a run directory, a checkpoint directory, a single file, a directory of runs, or a W&B run
    address (``wandb://entity/project/run_id``). ``engine`` picks the TensorBoard reader (``"auto"``, ``"fast"``,
    ``"tbparse"``). The runs' metadata: :func:`autopsy.run_info`.
    """
    from autopsy.importers.discover import find_runs

    options = ReadOptions(engine=engine)
    spec = str(path)
    if spec.startswith("wandb:/"):  # a CLI Path collapses wandb:// to wandb:/
        from autopsy.importers.wandb_api import load_wandb_url

        return load_wandb_url(spec)
    try:
        out = concat_runs([load_run(r, options=options) for r in find_runs(path)])
    except MemoryError:
        raise InputError(f"out of memory loading {path}: read fewer runs at a time") from None
    if out.empty and not any(i.damage or i.notes or i.crash for i in catalog(out).values()):
        raise InputError(f"no metrics found under {path}")
    return out


def read_files(
    kind: str, paths: list[str | os.PathLike[str]], *, run: str = "run", engine: str = "auto"
) -> pd.DataFrame:
    """Read files of one kind with its importer alone (no discovery, no merging): the frame with its runs attached.

    For a notebook or a test that wants one source as it is: ``read_files("tensorboard", [path], run="r")``.
    """
    try:
        module = importer(kind)
    except KeyError:
        raise UsageError(f"unknown kind {kind!r}: use one of {', '.join(m.KIND for m in importers())}") from None
    got = module.read([Path(p) for p in paths], run=run, options=ReadOptions(engine=engine))
    return attach_runs(got.frame if len(got.frame) else empty_frame(), got.runs)
