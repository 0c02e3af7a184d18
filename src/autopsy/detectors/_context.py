"""What the detectors read about a run beyond one series: its kind of objective, its warmup, its clipping
threshold, whether it is an HF Trainer run. Each a guess an experienced engineer makes, stated in words."""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy import runinfo
from autopsy.detectors._stats import reduce_points, settle_index
from autopsy.metrics import eval_loss_metrics
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["clip_threshold", "hf_trainer_like", "post_warmup", "primary_loss", "rl_objective", "warmup_end_step"]

# settings only HF TrainingArguments (and the trainers built on it: TRL, axolotl, LLaMA-Factory, ms-swift) carry
_HF_CONFIG_KEYS = frozenset(
    {
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "logging_nan_inf_filter",
        "warmup_ratio",
        "lr_scheduler_type",
        "eval_strategy",
        "evaluation_strategy",
        "save_strategy",
        "output_dir",
        "trainer_class",
        "max_grad_norm",
    }
)
# sources written by HF Trainer itself
_HF_SOURCES = frozenset({"trainer_state", "training_args"})


def rl_objective(frame: pd.DataFrame, info: RunInfo | None) -> bool:
    """True when the run optimises an RL / preference objective (see :func:`autopsy.runinfo.rl_objective`)."""
    return runinfo.rl_objective(info, metric_names(frame) if len(frame) else ())


def warmup_end_step(frame: pd.DataFrame, info: RunInfo | None) -> int | None:
    """The step where warmup ends, from the config or the logged LR curve (:func:`autopsy.runinfo.warmup_end_step`)."""
    return runinfo.warmup_end_step(info, series(frame, "train/learning_rate"))


def hf_trainer_like(frame: pd.DataFrame, info: RunInfo | None) -> bool:
    """True when the run looks like an HF Trainer run, so that HF's defaults (max_grad_norm=1.0) apply.

    Evidence, cheapest first: a source HF Trainer writes (trainer_state.json), TrainingArguments names in the config,
    or the log's own key names: HF logs ``grad_norm`` and ``learning_rate`` (fairseq ``gnorm``/``lr``, mmengine and
    custom loops ``lr``).
    """
    if info is not None:
        if _HF_SOURCES & {str(s) for s in info.sources} or info.trainer_class:
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


def clip_threshold(frame: pd.DataFrame, info: RunInfo | None) -> tuple[float | None, bool]:
    """``(max_grad_norm, assumed)``: from the config, else HF Trainer's default 1.0 (assumed=True).

    ``None`` when the config says clipping is off (0, None explicitly, or negative), and when the run does not look
    like an HF Trainer run: fairseq, mmengine, Keras or a custom loop has no default threshold to assume.
    """
    said, value = runinfo.configured_max_grad_norm(info)
    if said:
        return value, False
    if not hf_trainer_like(frame, info):
        return None, False
    return 1.0, True


def post_warmup(
    frame: pd.DataFrame, info: RunInfo | None, metric: str, *, how: str = "median", elevated: float = 2.0
) -> pd.Series:
    """The series after warmup and the run's first logs.

    Warmup (from the config or the LR curve) is always left out. The first logs are left out only while they sit
    above `elevated` (2x) the median of the rest: the high norms of a run's first steps are what the skip is for, and
    an excerpt that starts mid-run (a log pasted from step 35496) or a run whose first norms are already settled keeps
    every point, which matters when it has only 6-10 of them.
    """
    s = reduce_points(series(frame, metric, finite=True), max_points=50_000, how=how)
    steps = s.index.to_numpy()
    wu = warmup_end_step(frame, info)
    i_wu = settle_index(steps, wu, early_share=0.0, min_skip=0) if wu else 0
    i_early = settle_index(steps, None, early_share=0.05)
    i0 = i_wu
    if i_early > i_wu and s.size > i_early:
        v = s.to_numpy(dtype=np.float64)
        ref = float(np.median(v[i_early:]))
        j = i_wu
        while j < i_early and v[j] > elevated * ref:
            j += 1
        i0 = j
    return s.iloc[i0:]


def primary_loss(frame: pd.DataFrame, *, min_points: int = 3) -> tuple[str, pd.Series]:
    """The loss whose shape a run is judged on: the train loss, else (a log that prints only validation, a
    Tacotron-style ``Validation loss N: x``) the first eval loss; finite values, long series block-reduced."""
    train = series(frame, "train/loss", finite=True)
    if len(train) >= min_points:
        return "train/loss", reduce_points(train, max_points=20_000)
    for metric in eval_loss_metrics(metric_names(frame)):
        e = series(frame, metric, finite=True)
        if len(e) >= min_points:
            return metric, reduce_points(e, max_points=20_000)
    return "train/loss", train
