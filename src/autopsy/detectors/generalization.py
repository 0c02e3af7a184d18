"""Train against eval: overfitting, an eval loss that does not move, and eval too sparse to tell.

Each eval loss (``eval/loss`` and every ``eval/<set>/loss``) is judged on its own. Eval points are few
(one per ``eval_steps``), so rules count points, not steps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy.detectors._context import rl_objective
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import noise_scale
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.metrics import loss_metrics
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["eval_flat", "overfitting", "sparse_eval"]


def _eval_metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in loss_metrics(metric_names(frame)) if m.startswith("eval/")]


def _train_at(train: pd.Series, step: int, width: int) -> float | None:
    """Median train loss over the ``width`` logs up to ``step``."""
    part = train[train.index <= step]
    if part.empty:
        return None
    return float(np.median(part.to_numpy()[-width:]))


@detector(requires_any=("eval/loss",), signatures=("overfitting",), tags=("generalization",))
def overfitting(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_rise: float = 0.03,
    far_rise: float = 0.10,
    far_share: float = 0.3,
    min_points: int = 4,
) -> list[Finding]:
    """The eval loss rises from its minimum while the train loss keeps falling.

    Signature: at least `min_points` eval points; the last two after the best point are above it, the last by more
    than `min_rise` (3%) and by more than 3x the eval noise; the train loss at the end is below its value at the best
    step. Error when the eval loss ended `far_rise` (10%) above its best and the run went on for more than
    `far_share` (30%) of its length past the best step (wasted compute); warning otherwise.
    Likely causes: too many epochs over a small dataset, no regularization, LR too high late in training.
    What to check next: the best checkpoint (evidence: best_step, best_checkpoint); load_best_model_at_end; fewer
    epochs, more data, dropout/weight decay.
    """
    train = series(frame, "train/loss", finite=True)
    out = []
    for metric in _eval_metrics(frame):
        e = series(frame, metric, finite=True)
        v = e.to_numpy(dtype=np.float64)
        steps = e.index.to_numpy()
        if v.size < min_points:
            continue
        b = int(np.argmin(v))
        after = v[b + 1 :]
        if after.size < 2:
            continue
        best, last = float(v[b]), float(v[-1])
        noise = noise_scale(v[: b + 1]) if b >= 3 else 0.0
        rise = (last - best) / abs(best) if best != 0 else np.inf
        if not (np.all(after[-2:] > best) and rise > min_rise and (last - best) > 3.0 * noise):
            continue
        width = max(1, len(train) // max(1, v.size) // 2) if len(train) else 1
        t_best = _train_at(train, int(steps[b]), width) if len(train) else None
        t_end = _train_at(train, int(steps[-1]), width) if len(train) else None
        if t_best is not None and t_end is not None and not t_end < t_best:
            continue  # both rising: divergence, not overfitting
        last_step = int(max(steps[-1], train.index[-1] if len(train) else steps[-1]))
        past = last_step - int(steps[b])
        share_past = past / last_step if last_step > 0 else 0.0
        evidence = {
            "best_step": int(steps[b]),
            "best_eval_loss": evidence_value(best),
            "last_eval_loss": evidence_value(last),
            "rise_from_best": evidence_value(rise),
            "steps_past_best": int(past),
            "share_of_run_past_best": evidence_value(share_past),
            "eval_points": int(v.size),
            "eval_points_after_best": int(after.size),
        }
        if t_best is not None:
            evidence["train_loss_at_best"] = evidence_value(t_best)
            evidence["train_loss_at_end"] = evidence_value(t_end)
        if info is not None:
            if info.checkpoints:
                at = [s for s in info.checkpoints if s <= steps[b]]
                if at:
                    evidence["best_checkpoint"] = info.checkpoints[max(at)]
            lb = info.config_value("load_best_model_at_end")
            if lb is not None:
                evidence["load_best_model_at_end"] = lb
        far = rise >= far_rise and share_past >= far_share
        out.append(
            Finding(
                signature="overfitting",
                severity=Severity.ERROR if far else Severity.WARNING,
                step=int(steps[b]),
                end_step=int(steps[-1]),
                metric=metric,
                summary=(
                    f"{metric} was best at step {steps[b]} ({evidence['best_eval_loss']}) and rose {rise:.0%} to "
                    f"{evidence['last_eval_loss']} over the next {past} steps while the train loss kept falling"
                ),
                evidence=evidence,
                cause="the model memorises the training set: too many epochs for this much data, or too little regularization",
                fix=(
                    f"keep the checkpoint at step {steps[b]} (load_best_model_at_end=True with metric_for_best_model=eval_loss); "
                    "fewer epochs, more data, weight decay or dropout"
                ),
            )
        )
    return out


@detector(requires=("train/loss",), requires_any=("eval/loss",), signatures=("eval_flat",), tags=("generalization",))
def eval_flat(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    flat_tol: float = 0.02,
    min_train_drop: float = 0.15,
    min_points: int = 4,
) -> list[Finding]:
    """The train loss falls while the eval loss does not move.

    Signature: at least `min_points` eval points whose first and last thirds differ by less than `flat_tol` (2%) of
    their median (10-90% spread under 3x that), while over the same steps the train loss falls by more than
    `min_train_drop` (15%).
    Likely causes: the eval data is formatted, templated or masked differently from train; eval on the wrong split;
    a model that only memorises.
    What to check next: compare a train and an eval batch (collator, template, label masking).
    """
    if rl_objective(frame, info):
        return []
    train = series(frame, "train/loss", finite=True)
    out = []
    for metric in _eval_metrics(frame):
        e = series(frame, metric, finite=True)
        v = e.to_numpy(dtype=np.float64)
        if v.size < min_points or len(train) < 4:
            continue
        med = float(np.median(v))
        if not abs(med) > 0:
            continue
        third = max(1, v.size // 3)
        change = abs(float(np.median(v[-third:]) - np.median(v[:third]))) / abs(med)
        spread = float((np.percentile(v, 90) - np.percentile(v, 10)) / abs(med))
        if change > flat_tol or spread > 3 * flat_tol:
            continue
        span = train[(train.index >= e.index[0]) & (train.index <= e.index[-1])]
        if len(span) < 4:
            continue
        q = max(2, len(span) // 10)
        t0, t1 = float(np.median(span.to_numpy()[:q])), float(np.median(span.to_numpy()[-q:]))
        drop = (t0 - t1) / abs(t0) if t0 else 0.0
        if drop < min_train_drop:
            continue
        out.append(
            Finding(
                signature="eval_flat",
                severity=Severity.WARNING,
                step=int(e.index[0]),
                end_step=int(e.index[-1]),
                metric=metric,
                summary=f"{metric} stays near {med:.4g} (first vs last third {change:.1%}, spread {spread:.1%}) over {v.size} evals while the train loss fell {drop:.0%}",
                evidence={
                    "eval_median": evidence_value(med),
                    "eval_spread": evidence_value(spread),
                    "eval_points": int(v.size),
                    "train_loss_start": evidence_value(t0),
                    "train_loss_end": evidence_value(t1),
                    "train_drop": evidence_value(drop),
                },
                cause="the eval set is prepared differently from the training set (template, collator, label masking), or the model only memorises",
                fix="compare a train and an eval batch side by side: template, collator, which tokens are labelled",
            )
        )
    return out


@detector(requires=("train/loss",), signatures=("sparse_eval",), tags=("generalization", "config"))
def sparse_eval(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_points: int = 4,
    max_gap_share: float = 0.25,
) -> list[Finding]:
    """Too few eval points to see overfitting in time.

    Signature: the run has eval losses but fewer than `min_points` of them, or its eval cadence (eval_steps from the
    config, else the median gap) is more than `max_gap_share` (25%) of the run. Warning when the run trained for 2
    or more epochs (where overfitting is likely), info otherwise. A run with no eval at all is config_risk's.
    Likely causes: eval_steps too large, eval_strategy="epoch" on a 1-3 epoch run.
    What to check next: evaluate every 5-10% of training (eval_steps = max_steps / 10 to / 20).
    """
    evals = _eval_metrics(frame)
    train = series(frame, "train/loss")
    if not evals or len(train) < 2:
        return []
    e = series(frame, evals[0], finite=False)
    last = int(max(train.index[-1], e.index[-1] if len(e) else 0))
    total = int(info.max_steps) if info is not None and info.max_steps and info.max_steps > 0 else last
    gap = float(np.median(np.diff(e.index.to_numpy()))) if len(e) >= 2 else float(total)
    if info is not None and info.eval_steps:
        gap = float(info.eval_steps)
    few = len(e) < min_points
    wide_gap = total > 0 and gap > max_gap_share * total
    if not (few or wide_gap):
        return []
    ep = series(frame, "train/epoch", finite=True)
    epochs = (
        float(ep.iloc[-1])
        if len(ep)
        else (float(info.num_train_epochs) if info is not None and info.num_train_epochs else 0.0)
    )
    return [
        Finding(
            signature="sparse_eval",
            severity=Severity.WARNING if epochs >= 2 else Severity.INFO,
            step=None,
            metric=evals[0],
            summary=f"only {len(e)} eval point(s) over {total} steps (one every ~{gap:.0f} steps): overfitting would be seen late or not at all",
            evidence={
                "eval_points": int(len(e)),
                "eval_every_steps": evidence_value(gap),
                "run_steps": total,
                "epochs": evidence_value(epochs),
            },
            cause="eval cadence too sparse for the run length",
            fix=f"set eval_steps to about {max(1, total // 10)}-{max(1, total // 20)} (every 5-10% of training)",
        )
    ]
