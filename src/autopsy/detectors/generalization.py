"""Train against eval: overfitting, an eval loss that does not move, and eval too sparse to tell.

Each eval loss (``eval/loss`` and every ``eval/<set>/loss``) is judged on its own. Eval points are few
(one per ``eval_steps``), so rules count points, not steps.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._context import rl_objective
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import noise_scale, robust_scale
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.metrics import loss_metrics
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series

__all__ = ["eval_flat", "overfitting", "sparse_eval"]


def _eval_metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in loss_metrics(metric_names(frame)) if m.startswith("eval/")]


def _train_around(train: pd.Series, step: int, width: int) -> float | None:
    """Median train loss over the ``width`` logs up to ``step`` (the first logs after it when none came before)."""
    part = train[train.index <= step]
    if part.empty:
        part = train[train.index > step].iloc[:width]
        return float(np.median(part.to_numpy())) if len(part) else None
    return float(np.median(part.to_numpy()[-width:]))


def _eval_noise(v: np.ndarray) -> float:
    """The eval loss' point-to-point noise: the spread of its deviations from a running median of 3 (a smooth curve,
    falling or rising, deviates by next to nothing; evals that bounce around a level by their noise)."""
    if v.size < 4:
        return 0.0
    smooth = pd.Series(v).rolling(3, center=True, min_periods=1).median().to_numpy()
    return robust_scale(v - smooth)


def _sustained_rise(
    after: np.ndarray, best: float, *, rise_two: float, rise_three: float, rise_trend: float, trend_points: int
) -> bool:
    """Every eval after the best is above it, and the rise is clear for the number of evals that show it."""
    if after.size < 2 or not np.all(after > best):
        return False
    rise = (after[-1] - best) / abs(best) if best != 0 else np.inf
    if rise >= rise_two or (after.size >= 3 and rise >= rise_three):
        return True
    steady = float((np.diff(np.concatenate(([best], after))) > 0).mean())
    return after.size >= trend_points and rise >= rise_trend and steady >= 0.8


def _overfit_evidence(
    info: RunInfo | None, steps: np.ndarray, v: np.ndarray, b: int, train: pd.Series, last_step: int
) -> dict[str, Any]:
    best, last = float(v[b]), float(v[-1])
    past = last_step - int(steps[b])
    evidence: dict[str, Any] = {
        "best_step": int(steps[b]),
        "best_eval_loss": evidence_value(best),
        "last_eval_loss": evidence_value(last),
        "rise_from_best": evidence_value((last - best) / abs(best) if best else np.inf),
        "steps_past_best": int(past),
        "share_of_run_past_best": evidence_value(past / last_step if last_step > 0 else 0.0),
        "eval_points": int(v.size),
        "eval_points_after_best": int(v.size - b - 1),
    }
    if info is not None:
        if info.checkpoints:
            at = [s for s in info.checkpoints if s <= steps[b]]
            if at:
                evidence["best_checkpoint"] = info.checkpoints[max(at)]
        lb = info.config_value("load_best_model_at_end")
        if lb is not None:
            evidence["load_best_model_at_end"] = lb
    return evidence


@detector(
    requires=("train/loss",),
    requires_any=("eval/loss", "eval/*/loss"),
    signatures=("overfitting",),
    tags=("generalization",),
)
def overfitting(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    rise_two: float = 0.05,
    rise_three: float = 0.03,
    rise_trend: float = 0.01,
    trend_points: int = 5,
    train_relapse: float = 0.10,
    far_rise: float = 0.10,
    far_share: float = 0.3,
    min_points: int = 3,
) -> list[Finding]:
    """The eval loss rises from its minimum while the train loss keeps falling.

    Signature: at least `min_points` (3) eval points; every eval after the best one is above it, and the rise is
    clear for the evidence behind it: two evals ending `rise_two` (5%) above the best, three or more ending
    `rise_three` (3%) above it, or `trend_points` (5) or more climbing steadily (4 of 5 steps up) to `rise_trend` (1%)
    above it; the rise is more than 3x the eval noise (its deviations from a running median of 3 evals: a smooth
    curve has none, evals that bounce around a level show theirs); and the train loss kept improving: at the end
    below its value at the best eval, and back above its own best by less than `train_relapse` (10%) of the range it
    covered or 3x its per-log noise, whichever is larger (a train loss that climbed back is instability, not
    memorisation). Each eval set (``eval/<set>/loss``) is judged on its own.
    Error when the eval loss ended `far_rise` (10%) above its best and the run went on for more than `far_share` (30%)
    of its length past the best step (wasted compute); warning otherwise.
    Likely causes: too many epochs over a small dataset, no regularization, LR too high late in training.
    What to check next: the best checkpoint (evidence: best_step, best_checkpoint); load_best_model_at_end; fewer
    epochs, more data, dropout/weight decay.
    """
    train = series(frame, "train/loss", finite=True)
    if len(train) < 2:
        return []
    out = []
    for metric in _eval_metrics(frame):
        e = series(frame, metric, finite=True)
        v, steps = e.to_numpy(dtype=np.float64), e.index.to_numpy()
        if v.size < min_points:
            continue
        b = int(np.argmin(v))
        rise: dict[str, Any] = dict(
            rise_two=rise_two, rise_three=rise_three, rise_trend=rise_trend, trend_points=trend_points
        )
        if not _sustained_rise(v[b + 1 :], float(v[b]), **rise) or float(v[-1] - v[b]) <= 3.0 * _eval_noise(v):
            continue
        fell = _train_kept_falling(train, steps, b, v.size, relapse_share=train_relapse)
        if fell is None:
            continue  # train not improving (divergence, instability), or climbed back from its best
        last_step = int(max(steps[-1], train.index[-1]))
        evidence = _overfit_evidence(info, steps, v, b, train, last_step)
        evidence.update(train_loss_at_best=evidence_value(fell[0]), train_loss_at_end=evidence_value(fell[1]))
        far = float(evidence["rise_from_best"]) >= far_rise and float(evidence["share_of_run_past_best"]) >= far_share
        out.append(_overfit_finding(metric, steps, b, evidence, info, far=far))
    return out


def _overfit_fix(info: RunInfo | None) -> str:
    """Stop at the best step: the settings that do it, those the run lacks (a run that has them keeps the best)."""
    has_best = info is not None and info.config_value("load_best_model_at_end") is True
    stop = (
        "stop at the best step (load_best_model_at_end=True with metric_for_best_model=eval_loss, or "
        "EarlyStoppingCallback)"
    )
    if has_best:
        stop = "the run kept its best checkpoint (load_best_model_at_end); add EarlyStoppingCallback to stop there"
    return f"{stop}; fewer epochs, more data, weight decay or dropout"


# eval metrics that measure the model (a frozen one means the evaluation does not see the trained weights); not the
# bookkeeping (runtime, samples per second, epoch)
_QUALITY = re.compile(r"loss|acc|f1|bleu|rouge|wer|cer|precision|recall|ppl|perplexity|auc|map|exact|score|iou")
_BOOKKEEPING = re.compile(r"runtime|per_second|epoch|step|gen_len|samples|num_|memory|flos|thresh|total|count")


def _moves(train: pd.Series, sigmas: float = 3.0) -> tuple[bool, float, float]:
    """(moves, first third median, last third median): the train loss changed beyond its per-log noise."""
    v = train.to_numpy(dtype=np.float64)
    third = max(1, v.size // 3)
    m1, m3 = float(np.median(v[:third])), float(np.median(v[-third:]))
    se = 1.25 * noise_scale(v) * np.sqrt(2.0 / third)
    return abs(m3 - m1) > max(sigmas * se, 1e-3 * abs(m1)), m1, m3


def _frozen(frame: pd.DataFrame, train: pd.Series, min_points: int) -> list[Finding]:
    """Eval metrics printing the same number at every evaluation while the train loss moves; metrics frozen at the
    same value over the same evaluations (F1, precision and recall all 0) are one finding."""
    groups: dict[tuple[float, int, int, int], list[str]] = {}
    moved: dict[tuple[float, int, int, int], tuple[float, float]] = {}
    for metric in sorted(m for m in metric_names(frame) if m.startswith("eval/")):
        if not _QUALITY.search(metric) or _BOOKKEEPING.search(metric):
            continue
        e = series(frame, metric, finite=True)
        v = e.to_numpy(dtype=np.float64)
        if v.size < min_points or not np.all(v == v[0]):
            continue
        span = train[(train.index >= e.index[0]) & (train.index <= e.index[-1])]
        if len(span) < min_points:
            continue
        moves, m1, m3 = _moves(span)
        if moves:
            key = (float(v[0]), int(e.index[0]), int(e.index[-1]), int(v.size))
            groups.setdefault(key, []).append(metric)
            moved[key] = (m1, m3)
    return [_frozen_finding(metrics, *key, *moved[key]) for key, metrics in groups.items()]


def _frozen_finding(
    metrics: list[str], value: float, first: int, last: int, points: int, m1: float, m3: float
) -> Finding:
    names = metrics[0] if len(metrics) == 1 else ", ".join(metrics[:-1]) + f" and {metrics[-1]}"
    verb = "is" if len(metrics) == 1 else "are"
    return Finding(
        signature="eval_flat",
        severity=Severity.WARNING,
        step=first,
        end_step=last,
        metric=metrics[0],
        summary=(
            f"{names} {verb} exactly {num(value)} at all {points} evaluations while the train loss went "
            f"{m1:.4g} -> {m3:.4g}: the evaluation does not see the weights being trained"
        ),
        evidence={
            "frozen_value": evidence_value(value),
            "metrics": list(metrics),
            "eval_points": points,
            "train_loss_start": evidence_value(m1),
            "train_loss_end": evidence_value(m3),
        },
        cause=(
            "the evaluation runs on a stale or different model (weights never copied to the eval model, eval "
            "in a graph that does not share them), or the model predicts one constant class"
        ),
        fix="check which weights the evaluation uses and whether its predictions vary; evaluate the model object the "
        "optimizer updates",
    )


def _flat_loss(
    frame: pd.DataFrame, train: pd.Series, metric: str, *, flat_tol: float, min_train_drop: float, min_points: int
) -> Finding | None:
    e = series(frame, metric, finite=True)
    v = e.to_numpy(dtype=np.float64)
    if v.size < min_points or len(train) < 4:
        return None
    med = float(np.median(v))
    if not abs(med) > 0 or np.all(v == v[0]):
        return None  # bit-identical evals are _frozen's
    third = max(1, v.size // 3)
    change = abs(float(np.median(v[-third:]) - np.median(v[:third]))) / abs(med)
    spread = float((np.percentile(v, 90) - np.percentile(v, 10)) / abs(med))
    span = train[(train.index >= e.index[0]) & (train.index <= e.index[-1])]
    if change > flat_tol or spread > 3 * flat_tol or len(span) < 4:
        return None
    q = max(2, len(span) // 10)
    t0, t1 = float(np.median(span.to_numpy()[:q])), float(np.median(span.to_numpy()[-q:]))
    drop = (t0 - t1) / abs(t0) if t0 else 0.0
    if drop < min_train_drop:
        return None
    return Finding(
        signature="eval_flat",
        severity=Severity.WARNING,
        step=int(e.index[0]),
        end_step=int(e.index[-1]),
        metric=metric,
        summary=(
            f"{metric} stays near {med:.4g} (first vs last third {change:.1%}, spread {spread:.1%}) over {v.size} "
            f"evals while the train loss fell {drop:.0%}"
        ),
        evidence={
            "eval_median": evidence_value(med),
            "eval_spread": evidence_value(spread),
            "eval_points": int(v.size),
            "train_loss_start": evidence_value(t0),
            "train_loss_end": evidence_value(t1),
            "train_drop": evidence_value(drop),
        },
        cause=(
            "the eval set is prepared differently from the training set (template, collator, label masking), or the "
            "model only memorises"
        ),
        fix="compare a train and an eval batch side by side: template, collator, which tokens are labelled",
    )


@detector(requires=("train/loss",), requires_any=("eval/*",), signatures=("eval_flat",), tags=("generalization",))
def eval_flat(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    flat_tol: float = 0.02,
    min_train_drop: float = 0.15,
    min_points: int = 4,
) -> list[Finding]:
    """The train loss falls while the eval loss does not move, or an eval metric is frozen.

    Signature: at least `min_points` eval points whose first and last thirds differ by less than `flat_tol` (2%) of
    their median (10-90% spread under 3x that), while over the same steps the train loss falls by more than
    `min_train_drop` (15%). Or: an eval metric of the model's quality (loss, accuracy, F1, BLEU, WER, ...) prints
    exactly the same number at `min_points` or more evaluations while the train loss moves beyond its per-log noise
    over the same steps: no two evaluations of a model being trained agree to the last digit. A value re-printed
    between evaluations while the train loss only wanders (LitGPT's ``val:`` on every iteration line) is not this.
    Likely causes: the eval data is formatted, templated or masked differently from train; eval on the wrong split;
    a model that only memorises; frozen: the evaluation does not use the trained weights, or predicts a constant.
    What to check next: compare a train and an eval batch (collator, template, label masking); which weights the
    evaluation uses.
    """
    if rl_objective(frame, info):
        return []
    train = series(frame, "train/loss", finite=True)
    out = _frozen(frame, train, min_points)
    frozen = {m for f in out for m in f.evidence["metrics"]}
    for metric in _eval_metrics(frame):
        if metric not in frozen:
            found = _flat_loss(
                frame, train, metric, flat_tol=flat_tol, min_train_drop=min_train_drop, min_points=min_points
            )
            if found is not None:
                out.append(found)
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

    Signature: the run has eval losses but fewer than `min_points` of them, or its eval cadence (the median gap
    between the evals it logged; the config's eval_steps only where it logged fewer than two, since HF ignores
    eval_steps under eval_strategy="epoch") is more than `max_gap_share` (25%) of the run. Warning when the run trained for 2
    or more epochs (where overfitting is likely) and its last eval is not its best (the best model may lie between
    two evals); info otherwise: an eval loss still at its best at the last eval has missed nothing yet. A run with
    no eval at all is config_risk's.
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
    if len(e) >= 2:
        gap = float(np.median(np.diff(e.index.to_numpy())))
    else:
        gap = float(info.eval_steps) if info is not None and info.eval_steps else float(total)
    few = len(e) < min_points
    wide_gap = total > 0 and gap > max_gap_share * total
    if not (few or wide_gap):
        return []
    fin = e[np.isfinite(e.to_numpy(dtype=np.float64))]
    still_best = bool(len(fin) and fin.iloc[-1] <= fin.min())
    ep = series(frame, "train/epoch", finite=True)
    epochs = (
        float(ep.iloc[-1])
        if len(ep)
        else (float(info.num_train_epochs) if info is not None and info.num_train_epochs else 0.0)
    )
    return [
        Finding(
            signature="sparse_eval",
            severity=Severity.WARNING if epochs >= 2 and not still_best else Severity.INFO,
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


def _train_kept_falling(
    train: pd.Series, steps: np.ndarray, b: int, n_evals: int, *, relapse_share: float
) -> tuple[float, float] | None:
    """(train loss around the best eval, train loss at the end) when the train loss fell from the one to the other
    and did not climb back from its own best (by over ``relapse_share`` of its range or 3 noise scales); else None."""
    width = max(1, len(train) // max(1, n_evals) // 2)
    t_best = _train_around(train, int(steps[b]), width)
    w_end = max(width, min(3, len(train) // 3))
    t_end = _train_around(train, int(steps[-1]), w_end)
    tv = train.to_numpy()
    t_min = float(pd.Series(tv).rolling(w_end).median().min())  # its best, measured as the end is
    relapse = max(relapse_share * float(tv.max() - tv.min()), 3.0 * noise_scale(tv))
    if t_best is None or t_end is None or not t_end < t_best or t_end > t_min + relapse:
        return None
    return t_best, t_end


def _overfit_finding(
    metric: str, steps: np.ndarray, b: int, evidence: dict[str, Any], info: RunInfo | None, *, far: bool
) -> Finding:
    """The overfitting finding of one eval metric: an error when the rise is large and long, else a warning."""
    return Finding(
        signature="overfitting",
        severity=Severity.ERROR if far else Severity.WARNING,
        step=int(steps[b]),
        end_step=int(steps[-1]),
        metric=metric,
        summary=(
            f"{metric} was best at step {steps[b]} ({num(evidence['best_eval_loss'])}) and rose "
            f"{float(evidence['rise_from_best']):.0%} to {num(evidence['last_eval_loss'])} over the next "
            f"{num(evidence['steps_past_best'])} steps while the train loss kept falling"
        ),
        evidence=evidence,
        cause="the model memorises the training set: too many epochs for this much data, or too little regularization",
        fix=_overfit_fix(info),
    )
