"""The one way to read a metric out of a frame: live values by step, computed once per frame.

The first call groups the frame's rows by metric in one pass (superseded rows left out, the last value written at
each step kept, sorted by step) and keeps every series on the frame object itself, so twenty detectors and four
renderers on a 10M-row frame do not each scan it. A frame is treated as immutable once read: a cache whose row
count no longer matches is rebuilt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.frame import wall_seconds

__all__ = ["first_nonfinite_step", "last_step", "metric_names", "series", "wall_times", "wide"]

_ATTR = "_autopsy_series"  # an instance attribute, not a column and not attrs (pandas copies attrs on every slice)


class _Index:
    """Every metric's live series of one frame (values, and wall times where the frame knows any), by name."""

    __slots__ = ("names", "rows", "values", "walls")

    def __init__(self, frame: pd.DataFrame) -> None:
        self.rows = len(frame)
        self.values: dict[str, pd.Series] = {}
        self.walls: dict[str, pd.Series] = {}
        if self.rows == 0:
            self.names: frozenset[str] = frozenset()
            return
        codes, uniq = _metric_codes(frame["metric"])
        steps = frame["step"].to_numpy()
        values = frame["value"].to_numpy(dtype=np.float64)
        walls = _wall_seconds_or_none(frame)
        if "superseded" in frame.columns:
            live = ~frame["superseded"].to_numpy(dtype=bool)
            if not live.all():
                codes, steps, values = codes[live], steps[live], values[live]
                walls = walls[live] if walls is not None else None
        self.names = frozenset(str(u) for u in uniq)
        for name, pos in _rows_by_metric(codes, uniq):
            st, va = steps[pos], values[pos]
            wa = walls[pos] if walls is not None else None
            if st.size > 1 and not np.all(st[1:] > st[:-1]):
                # one value per step, the last written; sorted by step
                _, first_rev = np.unique(st[::-1], return_index=True)
                keep = st.size - 1 - first_rev
                st, va = st[keep], va[keep]
                wa = wa[keep] if wa is not None else None
            index = pd.Index(st, name="step")
            self.values[str(name)] = pd.Series(va, index=index, name=str(name))
            if wa is not None:  # a frame that knows no wall time keeps none (wall_times makes NaNs on demand)
                self.walls[str(name)] = pd.Series(wa, index=index, name=str(name))


def _metric_codes(column: pd.Series) -> tuple[np.ndarray, list[Any]]:
    """Each row's metric as a small integer code, and the names of the codes that occur."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()  # int8 for a few metrics: no row-sized int64 array
        used = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(column.cat.categories)))
        names = [column.cat.categories[k] for k in used.tolist()]
        if len(used) == len(column.cat.categories):
            return codes, names
        remap = np.full(len(column.cat.categories) + 1, -1, dtype=np.int32)  # the last: a missing name (-1)
        remap[used] = np.arange(len(used))
        return remap[codes], names
    codes, uniq = pd.factorize(column)
    return np.asarray(codes), list(uniq)


def _wall_seconds_or_none(frame: pd.DataFrame) -> np.ndarray | None:
    """Every row's wall time in seconds, or None when the frame knows none (trainer_state, console)."""
    if "wall_time" not in frame.columns:
        return None
    col = frame["wall_time"]
    if isinstance(col.dtype, pd.DatetimeTZDtype) and bool((col.array.asi8 == np.iinfo(np.int64).min).all()):
        return None
    return wall_seconds(frame)


def _rows_by_metric(codes: np.ndarray, names: list[Any]) -> Any:
    """(name, row positions) of each metric, rows in frame order: one pass of masks for a few metrics, else one
    stable sort (memory: a mask at a time, against a row-sized index)."""
    if len(names) <= 64:
        for k, name in enumerate(names):
            yield name, np.flatnonzero(codes == k)
        return
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    for k, name in enumerate(names):
        yield name, order[int(bounds[k]) : int(bounds[k + 1])]


def _index(frame: pd.DataFrame) -> _Index:
    idx = frame.__dict__.get(_ATTR)
    if idx is None or idx.rows != len(frame):
        idx = _Index(frame)
        object.__setattr__(frame, _ATTR, idx)
    return idx


def _empty(metric: str) -> pd.Series:
    return pd.Series([], index=pd.Index([], dtype=np.int64, name="step"), dtype=np.float64, name=metric)


def _finite(s: pd.Series) -> pd.Series:
    ok = np.isfinite(s.to_numpy(dtype=np.float64))
    return s if ok.all() else s[ok]


def series(frame: pd.DataFrame, metric: str, *, finite: bool = False) -> pd.Series:
    """The live values of ``metric`` as a float Series indexed by step (sorted, one value per step).

    Superseded rows (rewritten by a resumed run) are left out; where several rows remain at one step, the last one
    written wins. ``finite=True`` drops NaN/Inf points (the non-finite detectors report those). For a frame of
    several runs, take one run's rows first (``frame[frame.run == name]``).
    """
    s = _index(frame).values.get(metric)
    if s is None:
        return _empty(metric)
    return _finite(s) if finite else s


def wall_times(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Wall time (seconds since the epoch, NaN where unknown) of a metric's live rows, indexed by step."""
    idx = _index(frame)
    s = idx.walls.get(metric)
    if s is None and metric in idx.values:  # no wall times known: NaN at each of the metric's steps
        values = idx.values[metric]
        return pd.Series(np.full(len(values), np.nan), index=values.index, name=metric)
    return _empty(metric) if s is None else s


def metric_names(frame: pd.DataFrame) -> frozenset[str]:
    """The metric names of the frame."""
    return _index(frame).names


def last_step(frame: pd.DataFrame, prefix: str = "train/") -> int | None:
    """The last live step of any metric whose name starts with ``prefix`` (None when there is none)."""
    idx = _index(frame)
    ends = [int(s.index[-1]) for m, s in idx.values.items() if m.startswith(prefix) and len(s)]
    return max(ends) if ends else None


def first_nonfinite_step(
    frame: pd.DataFrame, metrics: tuple[str, ...] = ("train/loss", "train/grad_norm")
) -> int | None:
    """The first step at which any of ``metrics`` is NaN/Inf (None when all are finite)."""
    firsts = []
    for metric in metrics:
        s = series(frame, metric)
        bad = ~np.isfinite(s.to_numpy(dtype=np.float64))
        if bad.any():
            firsts.append(int(s.index[int(np.argmax(bad))]))
    return min(firsts) if firsts else None


def wide(frame: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """A wide view on demand: one column per metric (live rows only).

    With one run (or ``run=`` naming one) the index is the step; with several runs it is ``(run, step)``, so no run's
    values overwrite another's.
    """
    rows = frame[~frame["superseded"].to_numpy(dtype=bool)] if "superseded" in frame.columns else frame
    if run is not None:
        if len(rows) and run not in set(rows["run"].astype(str).unique()):
            from autopsy.errors import UsageError

            names = ", ".join(sorted(rows["run"].astype(str).unique())[:10])
            raise UsageError(f"no run named {run!r} in the frame; its runs: {names}")
        rows = rows[(rows["run"] == run).to_numpy()]
    several = rows["run"].nunique() > 1 if len(rows) else False
    keys: Any = ["run", "step"] if several else "step"
    by = ["run", "metric", "step"] if several else ["metric", "step"]
    rows = rows.drop_duplicates(by, keep="last")
    rows = pd.DataFrame(
        {
            "run": rows["run"].astype(str).to_numpy(),
            "metric": rows["metric"].astype(str).to_numpy(),
            "step": rows["step"].to_numpy(),
            "value": rows["value"].to_numpy(),
        }
    )
    out = rows.pivot(index=keys, columns="metric", values="value")
    out.columns.name = "metric"
    return out.sort_index()
