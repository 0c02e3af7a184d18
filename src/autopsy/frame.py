"""The canonical run frame: one long, tidy table per load.

Columns (in this order):

===============  ========  ==============================================================
``run``          str       the run's name (its directory name, or the W&B run id)
``source``       str       ``trainer_state``, ``tensorboard``, ``wandb``, ``console``, ...
``metric``       str       canonical name (:mod:`autopsy.metrics`): ``train/loss``, ``eval/loss``
``step``         int64     the run's own global step
``value``        float64   NaN and +/-inf are kept: they are the evidence
``wall_time``    datetime  when the row was logged (``datetime64[ns, UTC]``), NaT when the source has none
``raw_metric``   str       the name as the source wrote it
``superseded``   bool      True where a later row of the same run/source/metric rewrote this
                           step (a resumed run logs steps again): kept, flagged, not dropped
===============  ========  ==============================================================

Text columns are pandas Categoricals. What is known about each run besides its series is a
:class:`~autopsy.runinfo.RunInfo`; a loaded frame carries them (:func:`autopsy.runinfo.run_info`). Reading a
metric out of a frame is :mod:`autopsy.series`'s job; arithmetic on wall times reads :func:`wall_seconds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from autopsy.errors import FrameError
from autopsy.runinfo import RunInfo, attach_runs, catalog

__all__ = [
    "COLUMNS",
    "TEXT_COLUMNS",
    "concat_frames",
    "empty_frame",
    "labelled_codes",
    "make_frame",
    "merge_sources",
    "text_categories",
    "validate_frame",
    "wall_column",
    "wall_seconds",
]

COLUMNS = ["run", "source", "metric", "step", "value", "wall_time", "raw_metric", "superseded"]
TEXT_COLUMNS = ("run", "source", "metric", "raw_metric")


# --- building frames --------------------------------------------------------------------------


def empty_frame() -> pd.DataFrame:
    """A frame with the canonical columns and no rows."""
    return make_frame(run=[], source=[], metric=[], step=[], value=[])


def make_frame(
    *,
    run: Any,
    source: Any,
    metric: Any,
    step: Any,
    value: Any,
    wall_time: Any = None,
    raw_metric: Any = None,
    take: bool = False,
) -> pd.DataFrame:
    """Build a canonical frame from columns (scalars broadcast). Flags superseded rows.

    ``take=True``: the step and value arrays are the caller's to give away (made for this frame, never touched
    again), and the frame holds them as they are instead of a copy, so that a reader of millions of rows does not
    hold them twice at its peak."""
    n = len(step)
    step_arr = np.asarray(step, dtype=np.int64) if n else np.empty(0, dtype=np.int64)
    value_arr = np.asarray(value, dtype=np.float64) if n else np.empty(0, dtype=np.float64)
    wall_arr = wall_column(wall_time, n)

    metric_col = _categorical(metric, n)
    frame = pd.DataFrame(
        {
            "run": _categorical(run, n),
            "source": _categorical(source, n),
            "metric": metric_col,
            "step": step_arr,
            "value": value_arr,
            "wall_time": wall_arr,
            "raw_metric": _categorical(raw_metric, n) if raw_metric is not None else metric_col.copy(),
        },
        copy=not take,
    )
    frame["superseded"] = _superseded(frame)
    return frame


def wall_column(wall: Any, n: int) -> pd.arrays.DatetimeArray:
    """Wall times as the frame keeps them (UTC datetimes, NaT where unknown), from seconds since the epoch (float,
    NaN where unknown), datetimes, or None (all unknown)."""
    if wall is None:
        return _no_wall_times(n)
    if isinstance(wall, (pd.Series, pd.Index)):
        wall = wall.array
    if isinstance(wall, pd.arrays.DatetimeArray):
        out = wall if wall.tz is not None else wall.tz_localize("UTC")
        return out.tz_convert("UTC").as_unit("ns")
    arr = np.asarray(wall)
    if arr.dtype.kind in "fiub" or (arr.dtype.kind == "O" and n and isinstance(arr.flat[0], (int, float))):
        secs = arr.astype(np.float64)
        ns = np.where(np.isfinite(secs), np.round(secs * 1e9), 0).astype(np.int64)
        out = pd.array(ns.view("datetime64[ns]"), dtype="datetime64[ns]")
        out[~np.isfinite(secs)] = pd.NaT
        return out.tz_localize("UTC")
    return pd.DatetimeIndex(pd.to_datetime(arr, utc=True)).array.as_unit("ns")


def _no_wall_times(n: int) -> pd.arrays.DatetimeArray:
    """``n`` unknown wall times (NaT, UTC), in one allocation where pandas allows it (a reader of millions of rows
    without wall times -- trainer_state, console -- would otherwise hold the column twice at its peak)."""
    nat = np.full(n, np.datetime64("NaT", "ns"))
    try:
        return pd.arrays.DatetimeArray._simple_new(nat, dtype=pd.DatetimeTZDtype("ns", "UTC"))
    except (AttributeError, TypeError):  # a pandas without it: localized, which copies
        return pd.array(nat, dtype="datetime64[ns]").tz_localize("UTC")


def wall_seconds(data: pd.DataFrame | pd.Series | Any) -> np.ndarray:
    """The ``wall_time`` column (of a frame, or the column itself) as float seconds since the epoch, NaN where
    unknown: the form arithmetic on wall times wants."""
    col = data["wall_time"] if isinstance(data, pd.DataFrame) else data
    if isinstance(col, pd.Series):
        col = col.array
    if isinstance(col, pd.arrays.DatetimeArray):
        ns = col.tz_convert("UTC").as_unit("ns").asi8 if col.tz is not None else col.as_unit("ns").asi8
        out = ns.astype(np.float64) / 1e9
        out[np.asarray(col.isna())] = np.nan
        return out
    return np.asarray(col, dtype=np.float64)


def text_categories(names: list[Any]) -> pd.Index:
    """The categories of a text column built from codes (``pd.Categorical.from_codes``): each name as a string (the
    sentinel keeps numpy from reading names that look like sequences as a second dimension)."""
    return pd.Index(np.asarray([str(n) for n in names] + [""], dtype=object)[:-1].astype(str))


def labelled_codes(codes: np.ndarray, labels: list[str]) -> pd.Categorical:
    """A text column from integer codes into ``labels`` (codes may share a label): the categories in the order their
    labels first appear, as :func:`pd.factorize` over the strings would give, without hashing a string per row."""
    n, k = len(codes), len(labels)
    first = np.full(k, n, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(n, dtype=np.int64))
    seen = np.flatnonzero(first < n)
    seen = seen[np.argsort(first[seen], kind="stable")]
    label_codes, uniques = pd.factorize(np.asarray([labels[c] for c in seen] + [""], dtype=object)[:-1])
    table = np.zeros(k, dtype=np.int8 if len(uniques) < 127 else np.int32)
    table[seen] = label_codes
    return pd.Categorical.from_codes(table[codes], categories=text_categories(list(uniques)))


def _categorical(v: Any, n: int) -> pd.Categorical:
    """A text column as a pandas Categorical: a scalar broadcasts; few distinct values, cheap to build and group."""
    if isinstance(v, pd.Categorical):
        return v
    if isinstance(v, pd.Series) and isinstance(v.dtype, pd.CategoricalDtype):
        return v.array
    if isinstance(v, str):
        return pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[v])
    arr = np.asarray(v, dtype=object) if n else np.empty(0, dtype=object)
    codes, uniques = pd.factorize(arr)
    return pd.Categorical.from_codes(codes, categories=pd.Index(np.asarray(uniques, dtype=object).astype(str)))


def _superseded(frame: pd.DataFrame) -> np.ndarray:
    """Rows rewritten later in the same run/source/metric (row order = write order).

    A row is superseded when its step is logged again later (a duplicate), or when the run later went
    back to an earlier step and carried on from there (resumed from a checkpoint), abandoning what it
    had logged past that point. A lone backward row — the last of its series, or a glitch after which
    the series carries on past where it was — is not a resume: it supersedes only its own step.
    Vectorised: series in non-decreasing step order are checked one at a time (:func:`_superseded_in_order`);
    otherwise one stable sort by series, then a reversed per-series running minimum.
    """
    n = len(frame)
    if n == 0:
        return np.zeros(0, dtype=bool)
    parts: list[tuple[np.ndarray, int]] = []
    for col in ("run", "source", "metric"):
        data = frame[col]
        if isinstance(data.dtype, pd.CategoricalDtype):
            parts.append((data.cat.codes.to_numpy(), len(data.cat.categories)))
        else:
            c, uniq = pd.factorize(data, use_na_sentinel=False)
            parts.append((c, len(uniq)))
    size = int(np.prod([max(k, 1) for _, k in parts], dtype=np.float64))
    code: np.ndarray = np.zeros(n, dtype=np.int32 if size < 2**31 else np.int64)
    for c, k in parts:
        np.multiply(code, max(k, 1), out=code)
        np.add(code, c, out=code, casting="unsafe")
    step = frame["step"].to_numpy(dtype=np.int64)
    lean = _superseded_in_order(code, step, size)
    if lean is not None:
        return lean
    if size < 2**15:
        code = code.astype(np.int16)  # numpy sorts int16 stably with a radix sort
    order = np.argsort(code, kind="stable")
    g, s = code[order], step[order]
    big = np.iinfo(np.int64).max
    first = np.ones(n, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    last = np.ones(n, dtype=bool)
    last[:-1] = g[1:] != g[:-1]
    prev = np.where(first, np.iinfo(np.int64).min, np.concatenate(([0], s[:-1])))
    nxt = np.where(last, big, np.concatenate((s[1:], [0])))
    lone = (s < prev) & (last | (nxt > prev))
    eff = np.where(lone, big, s)
    rev_g, rev_eff = g[::-1], eff[::-1]
    inclusive = pd.Series(rev_eff).groupby(rev_g, sort=False).cummin().to_numpy()
    rev_first = np.ones(n, dtype=bool)
    rev_first[1:] = rev_g[1:] != rev_g[:-1]
    later_min = np.empty(n, dtype=np.int64)
    later_min[1:] = inclusive[:-1]
    later_min[rev_first] = big
    abandoned = (later_min < s[::-1])[::-1]
    dup = pd.DataFrame({"g": g, "s": s}).duplicated(keep="last").to_numpy()
    out = np.empty(n, dtype=bool)
    out[order] = abandoned | dup
    return out


def _superseded_in_order(code: np.ndarray, step: np.ndarray, size: int) -> np.ndarray | None:
    """The common case, in a fraction of the memory of a sort: every series (at most 64) in non-decreasing step
    order, so only a step logged again right after itself is superseded (an HF log writes "epoch" in its train and
    eval entries). None when a series goes back, or there are many series."""
    present = np.flatnonzero(np.bincount(code, minlength=size)) if size <= 1 << 24 else np.unique(code)
    if len(present) > 64:
        return None
    out = np.zeros(len(code), dtype=bool)
    for g in present.tolist():
        rows = np.flatnonzero(code == g)
        rise = np.diff(step[rows])
        if (rise < 0).any():
            return None
        out[rows[:-1][rise == 0]] = True
    return out


def concat_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate canonical frames; the runs they carry are merged (one :class:`RunInfo` per name)."""
    frames = [f for f in frames if f is not None]
    nonempty = [f for f in frames if len(f)]
    if len(nonempty) > 1:
        nonempty = [f.copy(deep=False) for f in nonempty]
        for col in TEXT_COLUMNS:
            cats = [f[col].array for f in nonempty if isinstance(f[col].dtype, pd.CategoricalDtype)]
            if len(cats) == len(nonempty):
                union = pd.api.types.union_categoricals(cats, ignore_order=True).categories
                for f in nonempty:
                    f[col] = f[col].cat.set_categories(union)
    out = (
        pd.concat(nonempty, ignore_index=True)
        if len(nonempty) > 1
        else (nonempty[0].copy(deep=False) if nonempty else empty_frame())
    )
    runs: dict[str, RunInfo] = {}
    for f in frames:
        for name, info in catalog(f).items():
            if name in runs:
                runs[name].merge(info)
            else:
                runs[name] = info
    return attach_runs(out, runs)


def merge_sources(frame: pd.DataFrame, priority: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One run logged by several sources: per metric keep the densest source, never double-count.

    The densest source (most distinct steps) is kept whole; rows of the other sources are kept only at
    steps the densest one lacks (for example trainer_state's entry at a step TB never flushed). Ties go to the
    source with the lower ``priority`` (each importer declares its own). The ``source`` column says where each row
    came from.
    """
    if frame.empty or frame["source"].nunique() <= 1:
        return frame
    # A console log's step axis is inferred (HF dict lines carry no step), so where a structured source
    # (trainer_state, TensorBoard, W&B) logs the same metric, the console's rows are left out entirely.
    is_console = (frame["source"] == "console").to_numpy()
    if is_console.any() and not is_console.all():
        structured = set(frame.loc[~is_console, "metric"].unique())
        drop = is_console & frame["metric"].isin(structured).to_numpy()
        if drop.any():
            frame = frame[~drop].reset_index(drop=True)
    live = frame[~frame["superseded"]]
    density = (
        live.groupby(["run", "metric", "source"], sort=False, observed=True)["step"].nunique().rename("n").reset_index()
    )
    density["pref"] = density["source"].astype(str).map(dict(priority or {})).fillna(99).astype(float)
    density = density.sort_values(["run", "metric", "n", "pref"], ascending=[True, True, False, True])
    rank = density.groupby(["run", "metric"], sort=False, observed=True).cumcount()
    density["rank"] = rank.to_numpy()
    ranked = frame.merge(density[["run", "metric", "source", "rank"]], on=["run", "metric", "source"], how="left")
    ranked["rank"] = ranked["rank"].fillna(99)
    # for each (run, metric, step) keep only the best-ranked source's rows
    best = ranked.groupby(["run", "metric", "step"], sort=False, observed=True)["rank"].transform("min")
    kept = ranked[ranked["rank"] == best].drop(columns="rank")
    return kept.sort_values(["run", "metric", "step"], kind="stable").reset_index(drop=True)


# --- reading frames ---------------------------------------------------------------------------


def validate_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Check (and coerce) a frame to the canonical shape; returns the frame to use.

    A notebook user's own frame needs only ``step``, ``metric`` and ``value``; the other columns get
    defaults (``run="run"``, ``source="user"``). Raises :class:`FrameError` naming what is wrong.
    """
    if not isinstance(frame, pd.DataFrame):
        raise FrameError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("metric", "step", "value") if c not in frame.columns]
    if missing:
        raise FrameError(f"frame lacks the column(s) {', '.join(missing)}: need at least step, metric, value")
    out = frame
    changed = False
    try:
        steps = pd.to_numeric(frame["step"], errors="raise")
        values = pd.to_numeric(frame["value"], errors="raise")
    except (TypeError, ValueError) as exc:
        raise FrameError(f"step and value must be numeric: {exc}") from None
    if steps.isna().any():
        raise FrameError("step has missing values")
    if (
        not all(c in frame.columns for c in COLUMNS)
        or frame["step"].dtype != np.int64
        or frame["value"].dtype != np.float64
        or not all(isinstance(frame[c].dtype, pd.CategoricalDtype) for c in TEXT_COLUMNS)
        or not isinstance(frame["wall_time"].dtype, pd.DatetimeTZDtype)
    ):
        changed = True
    if changed:
        out = make_frame(
            run=frame["run"].astype(str).to_numpy() if "run" in frame else "run",
            source=frame["source"].astype(str).to_numpy() if "source" in frame else "user",
            metric=frame["metric"].astype(str).to_numpy(),
            step=np.asarray(steps, dtype=np.float64).round().astype(np.int64),
            value=values.to_numpy(dtype=np.float64),
            wall_time=frame.get("wall_time"),
            raw_metric=frame["raw_metric"].astype(str).to_numpy() if "raw_metric" in frame else None,
        )
        out.attrs = dict(frame.attrs)
    cat = catalog(out)
    for name in out["run"].unique():
        if str(name) not in cat:
            cat[str(name)] = RunInfo(name=str(name))
    return out
