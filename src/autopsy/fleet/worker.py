"""What runs on a worker: one :class:`~autopsy.fleet.tasks.Task` in, its reports out, the frame dropped.

The same function serves ``--jobs 1`` (in the calling process), a process pool and a Dask cluster, so the three
give the same reports. A run is read with the importers of a local run (a remote run from a worker-local copy of its
objects), analysed with :func:`autopsy.analysis.analyze_run`, and its frame replaced by a *digest*: the handful of
rows the run's summary reads (:func:`autopsy.report.summary.summarize`: whether it has data, its last step, its last
train loss and best eval loss, the wall times at its findings' steps), so status, verdict and tables are those of
the full frame while memory does not grow with the length of the run. A run that cannot be analysed at all is a
report whose one finding says why (``source_damaged``), never an exception that stops the others.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from autopsy.analysis import analyze_run, split_runs
from autopsy.errors import AutopsyError, first_line
from autopsy.findings import RunReport
from autopsy.fleet.remote import mirror, relocate
from autopsy.fleet.tasks import Job, Task
from autopsy.frame import concat_frames, empty_frame, validate_frame, wall_seconds
from autopsy.importers import load_run
from autopsy.importers.discover import RunFiles
from autopsy.metrics import loss_metrics
from autopsy.report.summary import summarize
from autopsy.runinfo import Damage, RunInfo, attach_runs, catalog
from autopsy.series import metric_names, series

__all__ = ["DIGEST", "Curve", "Outcome", "digest", "failed_outcome", "loss_curve", "run_task"]

DIGEST = "autopsy.digest"  # frame.attrs key of a digest frame (renderers draw no plots from it)
CURVE_BINS = 80  # a small multiple is ~160 px wide: 80 bins, each its min and max (spikes survive)


@dataclass
class Curve:
    """A run's loss curve thinned for a small multiple: finite points (the min and max of each bin), and where the
    curve went non-finite."""

    metric: str
    steps: np.ndarray
    values: np.ndarray
    nonfinite_step: int | None = None


@dataclass
class Outcome:
    """What a worker sends back for one task: its runs' reports and curves, in order."""

    index: int
    reports: list[RunReport] = field(default_factory=list)
    curves: list[Curve | None] = field(default_factory=list)
    verdicts: list[tuple[str, str | None]] = field(default_factory=list)  # (status, lead signature) of each run
    empty: bool = False  # nothing read at all: no rows, no damage, no notes (the input's "no metrics" check)


def loss_curve(frame: pd.DataFrame, *, bins: int = CURVE_BINS) -> Curve | None:
    """The first loss metric of a run (``train/loss``, else an eval loss), thinned to ``2 * bins`` points."""
    names = loss_metrics(metric_names(frame))
    if not names:
        return None
    s = series(frame, names[0])
    steps = s.index.to_numpy(dtype=np.int64)
    values = s.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    nonfinite = int(steps[int(np.argmax(bad))]) if bad.any() else None
    steps, values = steps[~bad], values[~bad]
    if len(values) > 2 * bins:
        edges = np.linspace(0, len(values), bins + 1).astype(np.int64)
        keep = []
        for a, b in zip(edges[:-1], edges[1:]):
            if b > a:
                lo, hi = a + int(np.argmin(values[a:b])), a + int(np.argmax(values[a:b]))
                keep += sorted({lo, hi})
        idx = np.asarray(keep, dtype=np.int64)
        steps, values = steps[idx], values[idx]
    return Curve(metric=names[0], steps=steps, values=values.astype(np.float32), nonfinite_step=nonfinite)


def digest(frame: pd.DataFrame, report: RunReport) -> pd.DataFrame:
    """The rows of ``frame`` that the run's summary reads (a few real rows, marked :data:`DIGEST`).

    Kept: a live row at the last live step; the live train-loss rows at the last step whose train loss is finite;
    the eval-loss rows at the step of the best finite eval loss; and the row of the first wall time at the first
    timed step and at the nearest timed step at or before each finding's step (what the renderers print beside a
    step). Real rows only, so every value the summary computes from them is the one the full frame gives.
    """
    if not len(frame):
        out = frame.iloc[np.empty(0, dtype=np.int64)].copy()
        out.attrs = {DIGEST: True}
        return out
    steps = frame["step"].to_numpy()
    live = ~frame["superseded"].to_numpy(dtype=bool)
    keep: list[np.ndarray] = [np.flatnonzero(live)[[int(np.argmax(steps[live]))]]] if live.any() else [np.arange(1)]
    for metric, best in (("train/loss", "last"), ("eval/loss", "min")):
        s = series(frame, metric, finite=True)
        if len(s):
            at = int(s.index[-1] if best == "last" else s.index[int(np.argmin(s.to_numpy()))])
            keep.append(np.flatnonzero(live & (steps == at) & (frame["metric"] == metric).to_numpy(dtype=bool)))
    walls = wall_seconds(frame)
    timed = np.flatnonzero(np.isfinite(walls))
    if len(timed):
        order = timed[np.lexsort((walls[timed], steps[timed]))]  # by step, the first wall time first
        uniq, first = np.unique(steps[order], return_index=True)
        keep.append(order[first[_wall_steps(uniq, report)]])
    out = frame.take(np.unique(np.concatenate(keep))).reset_index(drop=True)
    for col in ("run", "source", "metric", "raw_metric"):  # the run's metric names stay behind with its frame
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].cat.remove_unused_categories()
    out.attrs = {DIGEST: True}
    return out


def _wall_steps(steps: np.ndarray, report: RunReport) -> np.ndarray:
    """Indices into the sorted timed ``steps``: the first, and the nearest at or before each finding's steps."""
    wanted = {0}
    for f in report.findings:
        for s in (f.step, f.end_step):
            if s is not None:
                i = int(np.searchsorted(steps, int(s), side="right")) - 1
                if i >= 0:
                    wanted.add(i)
    return np.asarray(sorted(wanted), dtype=np.int64)


def _analyse(frame: pd.DataFrame, job: Job, out: Outcome) -> None:
    frame = validate_frame(frame)
    out.empty = frame.empty and not any(i.damage or i.notes or i.crash for i in catalog(frame).values())
    plan = job.plan()
    for sub, info in split_runs(frame):
        report = analyze_run(sub, info, plan)
        out.curves.append(loss_curve(sub) if len(sub) else None)
        sm = summarize(report)
        out.verdicts.append((sm.status, sm.lead.signature if sm.lead is not None else None))
        report.frame = sub if job.keep_frames else digest(sub, report)
        if report.info is not None and report.info.config == report.config:
            report.info.config = report.config  # one dict, pickled once
        out.reports.append(report)


def _local(
    files: RunFiles, job: Job, damage: list[Damage] | None = None, notes: list[str] | None = None
) -> pd.DataFrame:
    """One run's files -> its frame, as :func:`autopsy.load` reads a run (damage met before reading put first)."""
    got = load_run(files, options=job.options)
    for info in got.runs.values():
        info.damage[:0] = damage or []
        info.notes.extend(notes or [])
    return concat_frames([attach_runs(got.frame, got.runs)])


def _remote(task: Task, job: Job, out: Outcome) -> None:
    remote = task.remote
    assert remote is not None
    with tempfile.TemporaryDirectory(prefix="autopsy-run-") as tmp:
        dest = Path(tmp) / (remote.base.rstrip("/").rsplit("/", 1)[-1] or "bucket")  # the name the URL gives it
        files, damage, notes = mirror(remote, dest, name=task.name, limit=job.mirror_limit)
        _analyse(_local(files, job, damage, notes), job, out)
        relocate(out.reports, str(dest), remote.base)


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # the caller's directory is not on this machine
        return False


def _in_place(task: Task, job: Job, out: Outcome) -> None:
    """A run on a local or shared file system, read in place; a relative path from the caller's directory (a Dask
    worker, or a pool process, may run in another) and said back as the caller named it."""
    files = task.files
    assert files is not None
    if not job.cwd or files.root.is_absolute() or _same_dir(job.cwd, os.getcwd()):
        _analyse(_local(files, job), job, out)
        return
    base = Path(job.cwd)
    moved = RunFiles(name=files.name, root=base / files.root)
    moved.files = {kind: [base / p for p in paths] for kind, paths in files.files.items()}
    moved.checkpoints = {step: base / d for step, d in files.checkpoints.items()}
    _analyse(_local(moved, job), job, out)
    relocate(out.reports, str(base) + os.sep, "", anywhere=False)


def _wandb(task: Task, job: Job, out: Outcome) -> None:
    from autopsy.importers.wandb_api import load_wandb_url

    assert task.wandb is not None
    _analyse(load_wandb_url(task.wandb, api=job.api), job, out)


def failed_outcome(task: Task, job: Job, problem: str) -> Outcome:
    """The report of a run that could not be analysed at all: one ``source_damaged`` finding saying why."""
    info = RunInfo(name=task.name, path=task.where)
    info.damage.append(Damage(file=task.where, offset=None, problem=problem, salvaged="nothing"))
    out = Outcome(index=task.index)
    _analyse(attach_runs(empty_frame(), {task.name: info}), job, out)
    return out


def run_task(task: Task, job: Job) -> Outcome:
    """Analyse one task's run(s); never raises for a problem of the run itself."""
    out = Outcome(index=task.index)
    if job.env:
        os.environ.update(job.env)
    try:
        if task.remote is not None:
            _remote(task, job, out)
        elif task.wandb is not None:
            _wandb(task, job, out)
        else:
            _in_place(task, job, out)
    except AutopsyError as exc:
        return failed_outcome(task, job, str(exc))
    except Exception as exc:  # a bug met on one run's data must not stop the fleet: that run says so, in one line
        return failed_outcome(task, job, f"internal error: {type(exc).__name__}: {first_line(exc)} (please report it)")
    return out
