"""Small helpers shared by detectors: restart points, timelines, evidence formatting."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.frame import RunInfo, finite_or_str, wall_times

__all__ = [
    "assumed_max_grad_norm",
    "causal_median",
    "chance_levels",
    "grad_climb",
    "hf_trainer_like",
    "last_step",
    "metric_names",
    "is_lora",
    "metric_series",
    "noise_scale",
    "reduce_points",
    "robust_scale",
    "runs_of_true",
    "settle_index",
    "evidence_value",
    "loss_metrics",
    "minutes_between",
    "restart_point",
    "rl_objective",
    "warmup_end_step",
]

# metrics that only preference / RL trainers (TRL's DPO, GRPO, PPO, KTO, ORPO) log
_RL_MARKERS = ("rewards/", "logps/", "logits/", "/kl", "kl", "reward", "completion_length", "completions/", "objective/")


def evidence_value(x: Any) -> Any:
    """Round floats for readability while keeping non-finite values as strings."""
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if math.isfinite(v):
            return float(f"{v:.6g}")
        return finite_or_str(v)
    if isinstance(x, np.integer):
        return int(x)
    return x


def loss_metrics(frame: pd.DataFrame) -> list[str]:
    """Loss metrics present: train/loss, eval/loss, then eval/<set>/loss, sorted."""
    metrics = metric_names(frame)
    out = [m for m in ("train/loss", "eval/loss") if m in metrics]
    out += sorted(m for m in metrics if m.startswith("eval/") and m.endswith("/loss") and m != "eval/loss")
    return out


def rl_objective(frame: pd.DataFrame, info: RunInfo | None = None) -> bool:
    """True when the run optimises an RL / preference objective (its loss is not a LM loss)."""
    metrics = metric_names(frame)
    for m in metrics:
        low = str(m).lower()
        if any(marker in low for marker in _RL_MARKERS):
            return True
    if info is not None:
        name = str(info.config.get("trainer_class", "") or info.config.get("_trainer", "")).lower()
        if any(k in name for k in ("dpo", "grpo", "ppo", "kto", "orpo", "rloo")):
            return True
    return False


def restart_point(info: RunInfo | None, first_bad_step: int) -> dict[str, Any]:
    """The last checkpoint saved before ``first_bad_step`` and how many steps must be redone.

    Checkpoints whose weights are known to be non-finite (replay's scan) are skipped.
    """
    out: dict[str, Any] = {"restart_checkpoint": None, "restart_step": None, "steps_to_redo": int(first_bad_step)}
    if info is None or not info.checkpoints:
        return out
    bad = set(info.config.get("_nonfinite_checkpoints", []))
    good = [s for s in sorted(info.checkpoints) if s < first_bad_step and info.checkpoints[s] not in bad]
    if good:
        step = good[-1]
        out.update(restart_checkpoint=info.checkpoints[step], restart_step=int(step), steps_to_redo=int(first_bad_step - step))
    return out


def minutes_between(frame: pd.DataFrame, metric: str, start: int, end: int) -> float | None:
    """Wall-clock minutes between two logged steps of ``metric`` (None when unknown)."""
    wt = wall_times(frame, metric)
    if wt.empty or start not in wt.index or end not in wt.index:
        return None
    a, b = float(wt.loc[start]), float(wt.loc[end])
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return round((b - a) / 60.0, 2)


def warmup_end_step(frame: pd.DataFrame, info: RunInfo | None = None) -> int | None:
    """The step where warmup ends: from the config, else inferred from the LR curve's peak."""
    if info is not None:
        ws = info.config_value("warmup_steps")
        try:
            if ws is not None and int(ws) > 0:
                return int(ws)
        except (TypeError, ValueError):
            pass
        ratio = info.config_value("warmup_ratio")
        max_steps = info.max_steps
        try:
            if ratio is not None and float(ratio) > 0 and max_steps:
                return int(math.ceil(float(ratio) * int(max_steps)))
        except (TypeError, ValueError):
            pass
    lr = metric_series(frame, "train/learning_rate")
    if len(lr) >= 3:
        v = lr.to_numpy(dtype=float)
        if np.isfinite(v).all() and v.max() > 0:
            peak = int(np.argmax(v))
            # a warmup is a rise from well below the peak; a constant or decaying LR has none
            if peak > 0 and v[0] < 0.5 * v[peak]:
                return int(lr.index[peak])
            return 0
    return None


# --- fast series access and robust statistics (shared by the detector families) -----------------

import warnings  # noqa: E402
import weakref  # noqa: E402


_SERIES_CACHE: dict[int, tuple[Any, dict[str, pd.Series]]] = {}
_NAMES = "__names__"


def _empty_series(metric: str) -> pd.Series:
    return pd.Series([], index=pd.Index([], dtype=np.int64, name="step"), dtype=np.float64, name=metric)


def _build_series(frame: pd.DataFrame) -> dict[str, Any]:
    """Every metric's live series in one pass: factorize the metric column once, group rows by code, and keep the
    last value written at each step (sorted by step) - what :func:`autopsy.frame.series` gives for one metric."""
    cache: dict[str, Any] = {}
    if len(frame) == 0:
        cache[_NAMES] = frozenset()
        return cache
    codes, uniq = pd.factorize(frame["metric"])  # on the column itself: 7x faster than on an object array
    codes = np.asarray(codes)
    steps = frame["step"].to_numpy()
    values = frame["value"].to_numpy(dtype=np.float64)
    live = ~frame["superseded"].to_numpy(dtype=bool) if "superseded" in frame.columns else np.ones(len(frame), bool)
    cache[_NAMES] = frozenset(str(u) for u in uniq)
    if not live.all():
        codes, steps, values = codes[live], steps[live], values[live]
    if codes.size and np.all(codes[1:] >= codes[:-1]):
        order = None  # rows already grouped by metric (one writer per metric): no sort
        sorted_codes = codes
    else:
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
    bounds = np.searchsorted(sorted_codes, np.arange(len(uniq) + 1))
    for k, name in enumerate(uniq):
        a, b = int(bounds[k]), int(bounds[k + 1])
        if order is None:
            st, va = steps[a:b], values[a:b]
        else:
            pos = order[a:b]
            st, va = steps[pos], values[pos]
        if st.size > 1 and not np.all(st[1:] > st[:-1]):
            # one value per step, the last written; sorted by step
            rev = st[::-1]
            _, first_rev = np.unique(rev, return_index=True)
            keep = st.size - 1 - first_rev
            st, va = st[keep], va[keep]
        cache[str(name)] = pd.Series(va, index=pd.Index(st, name="step"), name=str(name))
    return cache


def _series_cache(frame: pd.DataFrame) -> dict[str, Any]:
    key = id(frame)
    hit = _SERIES_CACHE.get(key)
    if hit is not None and hit[0]() is frame:
        return hit[1]
    cache = _build_series(frame)
    try:
        ref = weakref.ref(frame, lambda _r, k=key: _SERIES_CACHE.pop(k, None))
    except TypeError:  # pragma: no cover - a frame that cannot be weak-referenced: no cache kept
        return cache
    if len(_SERIES_CACHE) > 64:
        _SERIES_CACHE.clear()
    _SERIES_CACHE[key] = (ref, cache)
    return cache


def metric_series(frame: pd.DataFrame, metric: str, *, finite: bool = False) -> pd.Series:
    """The live values of ``metric`` (as :func:`autopsy.frame.series`), computed once per frame.

    The frame is grouped by metric once (one pass over its rows) and every series is kept for the
    frame's lifetime, so twenty detectors on a 10M-row frame do not each scan it. ``finite=True`` drops
    NaN/Inf points (the non-finite detectors report those). A frame is treated as immutable once analysed.
    """
    cache = _series_cache(frame)
    s = cache.get(metric)
    if s is None:
        s = _empty_series(metric)
        cache[metric] = s
    return _finite(s) if finite else s


def metric_names(frame: pd.DataFrame) -> frozenset[str]:
    """The metric names of the frame (from the same one-pass cache)."""
    return _series_cache(frame)[_NAMES]


def last_step(frame: pd.DataFrame, prefix: str = "train/") -> int | None:
    """The last live step of any metric whose name starts with ``prefix`` (None when there is none)."""
    cache = _series_cache(frame)
    ends = [int(cache[m].index.max()) for m in cache[_NAMES] if m.startswith(prefix) and len(cache[m])]
    return max(ends) if ends else None


def _finite(s: pd.Series) -> pd.Series:
    v = s.to_numpy(dtype=np.float64)
    ok = np.isfinite(v)
    return s if ok.all() else s[ok]


def reduce_points(s: pd.Series, *, max_points: int = 20_000, how: str = "median") -> pd.Series:
    """Block-aggregate a long series to at most ``max_points`` (median/mean/max per block), keyed by each block's first step.

    Trend detectors do not need 1M points: a block of b consecutive logs is summarised by one number,
    like a coarser ``logging_steps``.
    """
    n = len(s)
    if n <= max_points:
        return s
    b = int(math.ceil(n / max_points))
    m = n // b
    v = s.to_numpy(dtype=np.float64)[: m * b].reshape(m, b)
    agg = {"median": np.median, "mean": np.mean, "max": np.max, "min": np.min}[how](v, axis=1)
    return pd.Series(agg, index=s.index[: m * b: b])


def robust_scale(v: np.ndarray) -> float:
    """1.4826 * median absolute deviation from the median (the Gaussian sigma for normal noise)."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def noise_scale(v: np.ndarray) -> float:
    """Point-to-point noise of a series, robust to trends and steps: MAD of second differences / sqrt(6).

    For white noise of sigma s the second difference has sigma sqrt(6) s; a smooth trend cancels out.
    """
    v = v[np.isfinite(v)]
    if v.size < 4:
        return 0.0
    return robust_scale(np.diff(v, n=2)) / math.sqrt(6.0)


def causal_median(v: np.ndarray, window: int, *, min_periods: int = 3) -> np.ndarray:
    """Median of the ``window`` points strictly before each point (NaN where fewer than ``min_periods``).

    Long series (over 100k points) use medians of blocks of window/4 points, then a median over
    the previous 4 blocks: the same level, 10x faster than an exact rolling median.
    """
    n = v.size
    if n == 0:
        return np.empty(0)
    if n <= 100_000 or window < 8:
        med = pd.Series(v).rolling(window, min_periods=min_periods).median().to_numpy()
        return np.concatenate(([np.nan], med[:-1]))
    b = max(2, window // 4)
    m = int(math.ceil(n / b))
    pad = np.full(m * b, np.nan)
    pad[:n] = v
    with warnings.catch_warnings():  # a block of only NaN (a gap) gives NaN, which is what we want
        warnings.simplefilter("ignore", RuntimeWarning)
        blocks = np.nanmedian(pad.reshape(m, b), axis=1)
    lvl = pd.Series(blocks).rolling(4, min_periods=1).median().to_numpy()
    lvl = np.concatenate(([np.nan], lvl[:-1]))  # previous blocks only
    return np.repeat(lvl, b)[:n]


def runs_of_true(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of each stretch of True in ``mask``."""
    if mask.size == 0:
        return np.empty(0, dtype=int), np.empty(0, dtype=int)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return edges[::2], edges[1::2]


def settle_index(steps: np.ndarray, warmup_end: int | None, *, early_share: float = 0.05, min_skip: int = 2) -> int:
    """Index of the first point past warmup and the first logs (first logged values are not failures)."""
    n = steps.size
    if n == 0:
        return 0
    skip = max(min_skip, int(early_share * n))
    if warmup_end:
        skip = max(skip, int(np.searchsorted(steps, warmup_end, side="left")))
    return min(skip, n)


# settings only HF TrainingArguments (and the trainers built on it: TRL, axolotl, LLaMA-Factory, ms-swift) carry
_HF_CONFIG_KEYS = frozenset({
    "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "logging_nan_inf_filter",
    "warmup_ratio", "lr_scheduler_type", "eval_strategy", "evaluation_strategy", "save_strategy", "output_dir",
    "_trainer", "trainer_class", "max_grad_norm",
})
# sources written by HF Trainer itself
_HF_SOURCES = frozenset({"trainer_state", "training_args"})


def hf_trainer_like(frame: pd.DataFrame, info: RunInfo | None) -> bool:
    """True when the run looks like an HF Trainer run, so that HF's defaults (max_grad_norm=1.0) apply.

    Evidence, cheapest first: a source HF Trainer writes (trainer_state.json), TrainingArguments names in the config,
    or the log's own key names: HF logs ``grad_norm`` and ``learning_rate`` (fairseq ``gnorm``/``lr``, mmengine and
    custom loops ``lr``).
    """
    if info is not None:
        if _HF_SOURCES & {str(s) for s in info.sources}:
            return True
        if _HF_CONFIG_KEYS & {str(k) for k in info.config}:
            return True
    if "raw_metric" not in frame.columns or len(frame) == 0:
        return False
    names = {}
    for metric in ("train/grad_norm", "train/learning_rate"):
        hit = np.flatnonzero(frame["metric"].to_numpy() == metric)
        if hit.size == 0:
            return False
        names[metric] = str(frame["raw_metric"].iat[int(hit[0])]).rsplit("/", 1)[-1]
    return names["train/grad_norm"] == "grad_norm" and names["train/learning_rate"] == "learning_rate"


def assumed_max_grad_norm(info: RunInfo | None, frame: pd.DataFrame | None = None) -> tuple[float | None, bool]:
    """``(max_grad_norm, assumed)``: from the config, else HF Trainer's default 1.0 (assumed=True).

    ``None`` when the config says clipping is off (0, None explicitly, or negative), and, when ``frame`` is given,
    when the run does not look like an HF Trainer run: fairseq, mmengine, Keras or a custom loop has no default
    threshold to assume (:func:`hf_trainer_like`).
    """
    if info is not None and "max_grad_norm" in info.config:
        raw = info.config.get("max_grad_norm")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None, False
        return (value, False) if value > 0 and math.isfinite(value) else (None, False)
    if frame is not None and not hf_trainer_like(frame, info):
        return None, False
    return 1.0, True


def grad_climb(frame: pd.DataFrame, first_bad: int, *, factor: float = 3.0) -> dict[str, Any]:
    """When the grad norm started climbing before ``first_bad`` (a precursor), in steps and minutes.

    A climb is the last unbroken stretch of finite grad norms above ``factor`` x their earlier median (3x
    is well outside the +-30% per-step jitter of a healthy run's norm).
    """
    g = metric_series(frame, "train/grad_norm", finite=True)
    g = g[g.index < first_bad]
    if len(g) < 6:
        return {}
    v = g.to_numpy()
    base = float(np.median(v[: max(3, len(v) // 2)]))
    if not base > 0:
        return {}
    out: dict[str, Any] = {"grad_norm_median_before": evidence_value(base), "grad_norm_before_failure": evidence_value(float(v[-1]))}
    high = v > factor * base
    if not high[-1]:
        return out
    starts, _ = runs_of_true(high)
    j = int(starts[-1])
    start = int(g.index[j])
    out.update(grad_norm_climb_start=start, climb_steps_before_failure=int(first_bad - start))
    minutes = minutes_between(frame, "train/grad_norm", start, int(g.index[-1]))
    if minutes is not None:
        out["climb_minutes_before_failure"] = minutes
    return out


def chance_levels(info: RunInfo | None) -> dict[str, float]:
    """Losses of a model that learned nothing: ln(num_labels) for a classifier, ln(vocab_size) for an LM."""
    out: dict[str, float] = {}
    if info is None:
        return out
    cfg = info.config
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    labels = cfg.get("num_labels") or model.get("num_labels")
    id2label = cfg.get("id2label") or model.get("id2label")
    if not labels and isinstance(id2label, dict) and len(id2label) > 1:
        labels = len(id2label)
    vocab = cfg.get("vocab_size") or model.get("vocab_size")
    try:
        if labels and int(labels) > 1:
            out["ln(num_labels)"] = math.log(int(labels))
        if vocab and int(vocab) > 1 and not labels:
            out["ln(vocab_size)"] = math.log(int(vocab))
    except (TypeError, ValueError):
        pass
    return out


def is_lora(info: RunInfo | None) -> bool:
    """True when the config describes an adapter (PEFT/LoRA) fine-tune."""
    if info is None:
        return False
    keys = {str(k).lower() for k in info.config}
    return bool(keys & {"adapter", "peft_config", "lora_r", "lora_alpha", "lora_config", "use_peft", "lora_rank"}) or any(
        k.startswith(("lora_", "peft")) for k in keys
    )
