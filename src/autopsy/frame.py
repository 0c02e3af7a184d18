"""The canonical run frame: one long, tidy table per load.

Columns (in this order):

===============  ========  ==============================================================
``run``          str       the run's name (its directory name, or the W&B run id)
``source``       str       ``trainer_state``, ``tensorboard``, ``wandb``, ``console``, ...
``metric``       str       canonical name: ``train/loss``, ``train/grad_norm``, ``eval/loss``
``step``         int64     the run's own global step
``value``        float64   NaN and +/-inf are kept: they are the evidence
``wall_time``    float64   seconds since the epoch, NaN when the source has none
``raw_metric``   str       the name as the source wrote it
``superseded``   bool      True where a later row of the same run/source/metric rewrote this
                           step (a resumed run logs steps again): kept, flagged, not dropped
===============  ========  ==============================================================

Metadata about each run (config, max_steps, logging/eval/save steps, checkpoints, damage found while
reading) travels in ``frame.attrs["runs"]`` as :class:`RunInfo` objects keyed by run name.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autopsy.errors import AutopsyError

__all__ = [
    "COLUMNS",
    "Damage",
    "FrameError",
    "RunInfo",
    "canonical_metric",
    "concat_frames",
    "empty_frame",
    "make_frame",
    "merge_sources",
    "run_info",
    "runs_of",
    "series",
    "validate_frame",
    "wide",
]

COLUMNS = ["run", "source", "metric", "step", "value", "wall_time", "raw_metric", "superseded"]


class FrameError(AutopsyError):
    """A frame handed to autopsy does not have the canonical shape."""


@dataclass
class Damage:
    """What a reader could not read: the file, where the damage starts, and what was kept."""

    file: str
    offset: int | None
    problem: str
    salvaged: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunInfo:
    """What is known about a run besides its series."""

    name: str
    path: str = ""
    sources: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None
    logging_steps: int | None = None
    eval_steps: int | None = None
    save_steps: int | None = None
    num_train_epochs: float | None = None
    global_step: int | None = None
    best_checkpoint: str | None = None
    best_metric: float | None = None
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> directory
    summary: dict[str, Any] = field(default_factory=dict)  # final summary entries (train_runtime, ...)
    damage: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things skipped while reading, one line each
    exit_code: int | None = None  # when the source records the process' exit (W&B)
    finished: bool | None = None  # True when the source has a final record

    def merge(self, other: RunInfo) -> None:
        """Fold what ``other`` knows into this one (first known value wins, lists are joined)."""
        for name in ("max_steps", "logging_steps", "eval_steps", "save_steps", "num_train_epochs",
                     "best_checkpoint", "best_metric", "exit_code", "finished"):
            if getattr(self, name) is None and getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        if other.global_step is not None:
            self.global_step = max(self.global_step or 0, other.global_step)
        for src in other.sources:
            if src not in self.sources:
                self.sources.append(src)
        self.files.extend(f for f in other.files if f not in self.files)
        for key, value in other.config.items():
            self.config.setdefault(key, value)
        self.checkpoints.update(other.checkpoints)
        for key, value in other.summary.items():
            self.summary.setdefault(key, value)
        self.damage.extend(other.damage)
        self.notes.extend(other.notes)
        if not self.path:
            self.path = other.path

    def config_value(self, *names: str, default: Any = None) -> Any:
        """The first of ``names`` present in the config (``None`` values count as absent)."""
        for name in names:
            value = self.config.get(name)
            if value is not None:
                return value
        return default

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoints"] = {str(k): v for k, v in sorted(self.checkpoints.items())}
        return out


# --- metric names -----------------------------------------------------------------------------

# One table: lower-cased alias -> canonical name. Names not listed keep their own (normalised) name.
METRIC_ALIASES: dict[str, str] = {
    # training loss
    "loss": "train/loss",
    "train/loss": "train/loss",
    "train_loss": "train/loss",
    "training_loss": "train/loss",
    "train/loss_step": "train/loss",
    "train_loss_step": "train/loss",
    "loss_step": "train/loss",
    "training/loss": "train/loss",
    "train/train_loss": "train/loss",
    "losses/train": "train/loss",
    "loss/train": "train/loss",
    # gradient norm (HF logs the pre-clip norm)
    "grad_norm": "train/grad_norm",
    "train/grad_norm": "train/grad_norm",
    "gradient_norm": "train/grad_norm",
    "train/gradient_norm": "train/grad_norm",
    "global_grad_norm": "train/grad_norm",
    "grad_norm_total": "train/grad_norm",
    "total_norm": "train/grad_norm",
    "grad-norm": "train/grad_norm",
    "gradnorm": "train/grad_norm",
    "train/global_grad_norm": "train/grad_norm",
    "gnorm": "train/grad_norm",  # fairseq
    "train/gnorm": "train/grad_norm",
    "lm_loss": "train/loss",  # Megatron "lm loss"
    "loss_train": "train/loss",  # LitGPT "loss train: X"
    "learning_rate_step": "train/learning_rate",  # Lightning progress bar
    # learning rate
    "learning_rate": "train/learning_rate",
    "train/learning_rate": "train/learning_rate",
    "lr": "train/learning_rate",
    "train/lr": "train/learning_rate",
    "learning-rate": "train/learning_rate",
    "lr-adamw": "train/learning_rate",
    "lr-adam": "train/learning_rate",
    "lr-sgd": "train/learning_rate",
    "base_lr": "train/learning_rate",
    # epoch
    "epoch": "train/epoch",
    "train/epoch": "train/epoch",
    # evaluation loss
    "eval_loss": "eval/loss",
    "eval/loss": "eval/loss",
    "val_loss": "eval/loss",
    "val/loss": "eval/loss",
    "valid_loss": "eval/loss",
    "valid/loss": "eval/loss",
    "validation_loss": "eval/loss",
    "validation/loss": "eval/loss",
    "loss/val": "eval/loss",
    "loss/eval": "eval/loss",
    "val_loss_epoch": "eval/loss",
    # mixed precision
    "loss_scale": "train/loss_scale",
    "train/loss_scale": "train/loss_scale",
    "scaler/scale": "train/loss_scale",
    "loss-scale": "train/loss_scale",
    "grad_scale": "train/loss_scale",
    # throughput and memory
    "tokens_per_second": "train/tokens_per_second",
    "train/tokens_per_second": "train/tokens_per_second",
    "tokens/s": "train/tokens_per_second",
    "train/num_tokens": "train/num_tokens",
    "num_tokens": "train/num_tokens",
    "memory_allocated": "train/memory_allocated",
    "train/memory_allocated": "train/memory_allocated",
    "max_memory_allocated": "train/memory_allocated",
    "gpu_mem": "train/memory_allocated",
    "memory": "train/memory_allocated",
    "accuracy": "train/accuracy",
    "eval_accuracy": "eval/accuracy",
    "val_acc": "eval/accuracy",
    "val_accuracy": "eval/accuracy",
}

_EVAL_SET_LOSS = re.compile(r"^eval/(?P<set>.+?)[_/]loss$")


@functools.lru_cache(maxsize=65536)
def canonical_metric(raw: str, *, hf_flat: bool = False) -> str:
    """Map a source's metric name to the canonical name.

    ``hf_flat=True`` first applies HF Trainer's own rewrite (``eval_x`` -> ``eval/x``, every other
    key -> ``train/key``), as its TensorBoard and W&B callbacks do, so that trainer_state.json and
    the loggers agree on names such as ``train/rewards/chosen``.
    """
    name = str(raw).strip()
    low = name.lower()
    if low in METRIC_ALIASES:
        return METRIC_ALIASES[low]
    if hf_flat:
        if low.startswith("eval_"):
            name = "eval/" + name[5:]
        elif low.startswith("test_"):
            name = "test/" + name[5:]
        elif not low.startswith(("train/", "eval/", "test/")):
            name = "train/" + name
        low = name.lower()
        if low in METRIC_ALIASES:
            return METRIC_ALIASES[low]
    m = _EVAL_SET_LOSS.match(low)
    if m and m.group("set") not in ("", "loss"):
        return f"eval/{name[5:5 + len(m.group('set'))]}/loss"
    return name


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
) -> pd.DataFrame:
    """Build a canonical frame from columns (scalars broadcast). Flags superseded rows."""
    n = len(step)
    step_arr = np.asarray(step, dtype=np.int64) if n else np.empty(0, dtype=np.int64)
    value_arr = np.asarray(value, dtype=np.float64) if n else np.empty(0, dtype=np.float64)
    if wall_time is None:
        wall_arr = np.full(n, np.nan)
    else:
        wall_arr = np.asarray(wall_time, dtype=np.float64) if n else np.empty(0, dtype=np.float64)

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
        }
    )
    frame["superseded"] = _superseded(frame)
    return frame


TEXT_COLUMNS = ("run", "source", "metric", "raw_metric")


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
    Vectorised: one stable sort by series, then a reversed per-series running minimum.
    """
    n = len(frame)
    if n == 0:
        return np.zeros(0, dtype=bool)
    code = np.zeros(n, dtype=np.int64)
    for col in ("run", "source", "metric"):
        data = frame[col]
        if isinstance(data.dtype, pd.CategoricalDtype):
            c, k = data.cat.codes.to_numpy(dtype=np.int64), len(data.cat.categories)
        else:
            c, uniq = pd.factorize(data, use_na_sentinel=False)
            k = len(uniq)
        code = code * max(k, 1) + c
    step = frame["step"].to_numpy(dtype=np.int64)
    groups = int(code.max()) + 1
    if groups <= 64:
        # the common case: every series logged in increasing step order, nothing superseded
        if all(bool((np.diff(step[code == g]) > 0).all()) for g in np.unique(code)):
            return np.zeros(n, dtype=bool)
    if groups < 2**15:
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


def concat_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate canonical frames, keeping and merging their run metadata."""
    frames = [f for f in frames if f is not None]
    if not frames:
        return empty_frame()
    nonempty = [f for f in frames if len(f)]
    if len(nonempty) > 1:
        nonempty = [f.copy(deep=False) for f in nonempty]
        for col in TEXT_COLUMNS:
            cats = [f[col].array for f in nonempty if isinstance(f[col].dtype, pd.CategoricalDtype)]
            if len(cats) == len(nonempty):
                union = pd.api.types.union_categoricals(cats, ignore_order=True).categories
                for f in nonempty:
                    f[col] = f[col].cat.set_categories(union)
    out = pd.concat(nonempty, ignore_index=True) if nonempty else empty_frame()
    runs: dict[str, RunInfo] = {}
    for f in frames:
        for name, info in f.attrs.get("runs", {}).items():
            if name in runs:
                runs[name].merge(info)
            else:
                runs[name] = info
    out.attrs["runs"] = runs
    return out


def merge_sources(frame: pd.DataFrame) -> pd.DataFrame:
    """One run logged by several sources: per metric keep the densest source, never double-count.

    The densest source (most distinct steps) is kept whole; rows of the other sources are kept only at
    steps the densest one lacks (for example trainer_state's entry at a step TB never flushed).
    The ``source`` column says where each row came from.
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
            attrs = frame.attrs
            frame = frame[~drop].reset_index(drop=True)
            frame.attrs = attrs
    live = frame[~frame["superseded"]]
    density = live.groupby(["run", "metric", "source"], sort=False, observed=True)["step"].nunique().rename("n").reset_index()
    # tie-break by a fixed source preference: loggers that see every step first
    # (autopsy's own callback log first: it holds the true loss where HF's NaN filter logged 0.0)
    pref = {"autopsy": -1, "tensorboard": 0, "wandb": 1, "trainer_state": 2, "console": 3}
    density["pref"] = density["source"].astype(str).map(pref).fillna(9).astype(float)
    density = density.sort_values(["run", "metric", "n", "pref"], ascending=[True, True, False, True])
    rank = density.groupby(["run", "metric"], sort=False, observed=True).cumcount()
    density["rank"] = rank.to_numpy()
    ranked = frame.merge(density[["run", "metric", "source", "rank"]], on=["run", "metric", "source"], how="left")
    ranked["rank"] = ranked["rank"].fillna(99)
    # for each (run, metric, step) keep only the best-ranked source's rows
    best = ranked.groupby(["run", "metric", "step"], sort=False, observed=True)["rank"].transform("min")
    kept = ranked[ranked["rank"] == best].drop(columns="rank")
    kept = kept.sort_values(["run", "metric", "step"], kind="stable").reset_index(drop=True)
    kept.attrs = frame.attrs
    return kept


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
    if not all(c in frame.columns for c in COLUMNS) or frame["step"].dtype != np.int64 or frame["value"].dtype != np.float64:
        changed = True
    elif not all(isinstance(frame[c].dtype, pd.CategoricalDtype) for c in TEXT_COLUMNS):
        changed = True
    if changed:
        out = make_frame(
            run=frame["run"].astype(str).to_numpy() if "run" in frame else "run",
            source=frame["source"].astype(str).to_numpy() if "source" in frame else "user",
            metric=frame["metric"].astype(str).to_numpy(),
            step=np.asarray(steps, dtype=np.float64).round().astype(np.int64),
            value=values.to_numpy(dtype=np.float64),
            wall_time=frame["wall_time"].to_numpy(dtype=np.float64) if "wall_time" in frame else None,
            raw_metric=frame["raw_metric"].astype(str).to_numpy() if "raw_metric" in frame else None,
        )
        out.attrs = dict(frame.attrs)
    if "runs" not in out.attrs:
        out.attrs["runs"] = {name: RunInfo(name=str(name)) for name in out["run"].unique()}
    return out


def runs_of(frame: pd.DataFrame) -> list[str]:
    """The run names of a frame, in order of appearance (plus runs known only from metadata)."""
    names = list(dict.fromkeys(frame["run"].tolist())) if len(frame) else []
    for name in frame.attrs.get("runs", {}):
        if name not in names:
            names.append(name)
    return names


def run_info(frame: pd.DataFrame, run: str | None = None) -> RunInfo:
    """The :class:`RunInfo` of ``run`` (the only run when ``None``)."""
    runs: dict[str, RunInfo] = frame.attrs.get("runs", {})
    if run is None:
        names = runs_of(frame)
        if len(names) > 1:
            raise FrameError(f"the frame holds {len(names)} runs; name one of: {', '.join(names[:10])}")
        run = names[0] if names else "run"
    info = runs.get(run)
    if info is None:
        info = RunInfo(name=run)
        frame.attrs.setdefault("runs", {})[run] = info
    return info


def series(frame: pd.DataFrame, metric: str) -> pd.Series:
    """The live values of one metric as a float Series indexed by step (sorted, one value per step).

    Superseded rows (rewritten by a resumed run) are left out; where several sources or rows remain
    at one step, the last one written wins.
    """
    rows = frame[(frame["metric"] == metric) & ~frame["superseded"]]
    if rows.empty:
        return pd.Series([], index=pd.Index([], dtype=np.int64, name="step"), dtype=np.float64, name=metric)
    rows = rows.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    out = pd.Series(rows["value"].to_numpy(dtype=np.float64), index=pd.Index(rows["step"].to_numpy(), name="step"), name=metric)
    return out


def wall_times(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Wall time (seconds since the epoch) of a metric's live rows, indexed by step."""
    rows = frame[(frame["metric"] == metric) & ~frame["superseded"]]
    rows = rows.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return pd.Series(rows["wall_time"].to_numpy(dtype=np.float64), index=pd.Index(rows["step"].to_numpy(), name="step"))


def wide(frame: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """A wide view on demand: one row per step, one column per metric (live rows only)."""
    rows = frame[~frame["superseded"]]
    if run is not None:
        rows = rows[rows["run"] == run]
    rows = rows.drop_duplicates(["metric", "step"], keep="last")
    return rows.pivot(index="step", columns="metric", values="value").sort_index()


def finite_or_str(value: Any) -> Any:
    """A JSON-safe number: non-finite floats become "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(value, np.integer):
        return int(value)
    return value
