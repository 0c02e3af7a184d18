"""What :func:`autopsy.importers.load` does once the runs are read: one frame of all runs in time linear in their
number, and whether a run is still being written.

Joining frames with :func:`autopsy.frame.concat_frames` unions each text column's categories frame by frame, so
2,000 runs cost 2,000 x 2,000 category checks; here each column's categories are joined once and every frame's
codes are mapped through one lookup.

A run still being written (a Trainer mid-run) is told from a dead one by its clock: no final record, no crash,
and either its last logged point carries a wall time of the last minutes (TensorBoard, W&B), or, where the logs
carry no time, its files were modified in the last minutes at different times (a copy, ``git clone`` or
download writes every file at once) or a lock file or a checkpoint being saved sits beside them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from autopsy.frame import COLUMNS, TEXT_COLUMNS, concat_frames, empty_frame, wall_column, wall_seconds
from autopsy.importers._base import Imported
from autopsy.runinfo import RunInfo, attach_runs

__all__ = ["LIVE_WINDOW_S", "concat_runs", "mark_in_progress"]

LIVE_WINDOW_S = 15 * 60  # HF logs every logging_steps (seconds to minutes); TensorBoard flushes every 120 s
_COPY_SPREAD_S = 2.0  # files written within 2 s of each other: one copy, not a run writing as it goes


def concat_runs(loaded: Iterable[Imported]) -> pd.DataFrame:
    """One frame of the runs read (their infos attached), in time linear in the number of runs."""
    runs: dict[str, RunInfo] = {}
    frames = []
    for got in loaded:
        for name, info in got.runs.items():
            if name in runs:
                runs[name].merge(info)
            else:
                runs[name] = info
        if len(got.frame):
            frames.append(got.frame)
    if len(frames) <= 1:
        out = frames[0] if frames else empty_frame()
        return attach_runs(out, runs)  # the one frame itself: the series it has cached stay with it
    text = [{c: f[c].array for c in TEXT_COLUMNS} for f in frames]  # one column access each: pandas' cost per call
    if not all(isinstance(t[c], pd.Categorical) for t in text for c in TEXT_COLUMNS):
        return attach_runs(concat_frames(frames), runs)
    cols: dict[str, object] = {}
    for col in TEXT_COLUMNS:
        cats = [t[col].categories for t in text]
        # every frame's categories factorized in one call: each frame's lookup is a slice of the result
        found, union = pd.factorize(cats[0].append(cats[1:]))
        bounds = np.cumsum([0] + [len(c) for c in cats])
        codes = [np.append(found[a:b], -1)[t[col].codes] for t, a, b in zip(text, bounds[:-1], bounds[1:])]
        cols[col] = pd.Categorical.from_codes(np.concatenate(codes), categories=union)
    for col in ("step", "value", "superseded"):
        cols[col] = np.concatenate([f[col].to_numpy() for f in frames])
    cols["wall_time"] = wall_column(np.concatenate([wall_seconds(f) for f in frames]), sum(len(f) for f in frames))
    return attach_runs(pd.DataFrame({c: cols[c] for c in COLUMNS}), runs)


def _mtime(path: str | os.PathLike[str]) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _locks(root: Path) -> list[str]:
    """Lock files and checkpoints being saved (HF's ``tmp-checkpoint-N``) in the run dir and one level down."""
    found: list[str] = []
    for d in (root, *(p for p in _children(root) if p.is_dir())):
        for p in _children(d):
            if p.name.endswith(".lock") or p.name.startswith("tmp-checkpoint-"):
                found.append(str(p))
    return found[:5]


def _children(d: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(d) if not e.is_symlink()][:1000]
    except OSError:
        return []


def mark_in_progress(info: RunInfo, frame: pd.DataFrame, *, now: float | None = None) -> None:
    """Set ``info.in_progress`` (with the evidence in a note) when the run is still being written."""
    if info.finished is True or info.crash is not None or info.exit_code is not None or not info.files:
        return
    now = time.time() if now is None else now
    times = [t for t in (_mtime(f) for f in [*info.files, *info.checkpoints.values()]) if t is not None]
    if not times or now - max(times) > LIVE_WINDOW_S:
        return
    wall = wall_seconds(frame) if len(frame) else np.empty(0)
    wall = wall[np.isfinite(wall)]
    locks = _locks(Path(info.path)) if info.path else []
    if len(wall):
        ago = now - float(wall.max())
        if abs(ago) > LIVE_WINDOW_S:
            return  # its last point was logged long ago: a copy of a finished or dead run
        evidence = f"its last point was logged {max(ago, 0):.0f} s ago"
    elif max(times) - min(times) >= _COPY_SPREAD_S or locks:
        evidence = f"its files were modified {now - max(times):.0f} s ago, over {max(times) - min(times):.0f} s"
    else:
        return
    if locks:
        evidence += f"; {', '.join(os.path.basename(p) for p in locks)} beside it"
    info.in_progress = True
    info.notes.append(f"in progress: {evidence}, and there is no final record yet: the run is still being written")
