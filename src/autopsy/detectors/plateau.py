"""A loss that does not move: barely below its start, flat to the last digits, or pinned at a chance level."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._context import primary_loss, rl_objective
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import noise_scale
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.metrics import eval_loss_metrics
from autopsy.runinfo import RunInfo, chance_levels
from autopsy.series import metric_names, series

__all__ = ["plateau"]

# the vocabularies of common language models: ln(V) is the loss of a model that predicts uniformly over them
# (BERT 30522, Llama/Mistral 32000/32768, GPT-2 50257, ChatGLM 65024, GPT-4o-style 100277, Llama-3 128256,
# Qwen 151936, BLOOM 250880, Gemma 256000)
LM_VOCABS = (30522, 32000, 32768, 50257, 65024, 100277, 128256, 151936, 250880, 256000)
_CAUSE = "the weights are not learning: learning rate far too low, labels masked, or frozen parameters"
_FIX = "try a 10x higher learning rate; check that labels are not all -100 and that parameters are trainable"
_UNIFORM_CAUSE = (
    "the model outputs a uniform distribution: saturated or dead logits (outputs scaled up, a collapsed "
    "layer), labels masked, or the weights not updating"
)
_UNIFORM_FIX = (
    "check the logits' scale and the labels of a batch; lower the LR if the loss was unstable before; "
    "10x it if it never moved"
)


def _levels(info: RunInfo | None, classes: tuple[int, ...]) -> dict[str, float]:
    levels = dict(chance_levels(info))
    for k in (*range(2, 11), *classes):  # ln(2)..ln(10): the losses of a small classifier that learned nothing
        levels.setdefault(f"ln({k})", math.log(k))
    return levels


def _near_chance(
    level: float, info: RunInfo | None, tol: float, classes: tuple[int, ...] = (), *, generic: bool = True
) -> tuple[str, float] | None:
    """The chance level nearest to ``level`` within ``tol``: the config's (ln(num_labels), ln(vocab_size)), and with
    ``generic`` ln(2)..ln(10) and ``classes`` (only for a loss pinned to the last digits: those lie too close together
    for a loose tolerance to mean anything without the config)."""
    levels = _levels(info, classes) if generic else dict(chance_levels(info))
    if not levels:
        return None
    best = min(levels.items(), key=lambda kv: abs(kv[1] - level))
    return best if abs(best[1] - level) <= tol * best[1] else None


def _pinned(
    v: np.ndarray, info: RunInfo | None, *, tol: float, classes: tuple[int, ...], min_points: int, min_share: float
) -> tuple[str, float, int] | None:
    """(level name, value, points) when the loss ends pinned at a chance level: the trailing run of logs within
    ``tol`` of ln(k) covers at least ``min_points`` logs and ``min_share`` of the run."""
    if v.size < min_points:
        return None
    chance = _near_chance(float(v[-1]), info, tol, classes)
    if chance is None:
        return None
    off = np.abs(v - chance[1]) > tol * chance[1]
    tail = int(v.size - (np.flatnonzero(off)[-1] + 1)) if off.any() else int(v.size)
    if tail < min_points or tail < min_share * v.size:
        return None
    return chance[0], chance[1], tail


def _finding(
    metric: str,
    steps: np.ndarray,
    first: int,
    summary: str,
    evidence: dict[str, Any],
    *,
    severity: Severity,
    uniform: bool,
) -> Finding:
    evidence.update(points=int(steps.size), first_step=int(steps[0]), last_step=int(steps[-1]))
    return Finding(
        signature="plateau",
        severity=severity,
        step=int(steps[first]),
        end_step=int(steps[-1]),
        metric=metric,
        summary=summary,
        evidence=evidence,
        cause=_UNIFORM_CAUSE if uniform else _CAUSE,
        fix=_UNIFORM_FIX if uniform else _FIX,
    )


def _from_start(frame: pd.DataFrame, info: RunInfo | None, first_step: int) -> bool:
    """True when the log starts at the start of training (its first epoch under 5%, or its first step under 5% of
    the planned steps): only then is a loss that did not move a run that did not learn, not a converged excerpt."""
    ep = series(frame, "train/epoch", finite=True)
    if len(ep):
        return bool(ep.iloc[0] <= 0.05)
    return bool(info is not None and info.max_steps and first_step <= 0.05 * info.max_steps)


def _moved(
    v: np.ndarray, *, min_drop: float, small_drop: float, sigmas: float, from_start: bool
) -> tuple[bool, dict[str, Any]]:
    """Whether the loss fell from its start: by `min_drop` or more and, for a log that covers training from its
    start, by `small_drop` or more or beyond the noise (the difference of the head and tail medians against its
    standard error)."""
    n = v.size
    skip = min(max(1, n // 20), 3)
    head, tail = v[skip : skip + max(3, n // 10)], v[-max(3, n // 5) :]
    start, end = float(np.median(head)), float(np.median(tail))
    noise = noise_scale(v)
    drop = (start - end) / abs(start) if abs(start) > 1e-8 else 0.0
    se = 1.25 * noise * math.sqrt(1.0 / head.size + 1.0 / tail.size) / max(abs(start), 1e-12)
    beyond_noise = drop >= small_drop or drop > sigmas * se or not from_start
    moved = (drop >= min_drop and beyond_noise) or drop < -0.05  # a rising loss is divergence's
    return moved, {
        "start_level": evidence_value(start),
        "end_level": evidence_value(end),
        "relative_drop": evidence_value(drop),
        "noise": evidence_value(noise),
        "drop_in_standard_errors": evidence_value(drop / se) if se > 0 else None,
    }


def _flat(v: np.ndarray, *, spread: float, points: int) -> float | None:
    """The spread of every log after the first (the first is often the untrained model's), when within `spread`."""
    rest = v[1:]
    if rest.size < points:
        return None
    med = float(np.median(rest))
    width = float(rest.max() - rest.min()) / abs(med) if med else np.inf
    return width if width <= spread else None


def _eval_at_chance(
    frame: pd.DataFrame, info: RunInfo | None, *, tol: float, vocab_tol: float, classes: tuple[int, ...]
) -> Finding | None:
    """The eval loss ends within tolerance of a chance level for its last 3 evals and moved under 5% overall."""
    for metric in eval_loss_metrics(metric_names(frame)):
        e = series(frame, metric, finite=True)
        v = e.to_numpy(dtype=np.float64)
        if v.size < 3 or abs(v[-1] - v[0]) > 0.05 * abs(v[0]):
            continue
        # the levels a loss can be said to sit at from a few evals: the config's, and the LM vocabularies'; ln(2)..ln(10)
        # lie too close together for a 3% tolerance to mean anything without the config
        levels = {**chance_levels(info), **{f"ln({k})": math.log(k) for k in LM_VOCABS}}
        name, value = min(levels.items(), key=lambda kv: abs(kv[1] - v[-1]))
        t = tol if name in chance_levels(info) else vocab_tol
        if np.all(np.abs(v[-3:] - value) <= t * value):
            ev = {
                "chance_level": name,
                "chance_value": evidence_value(value),
                "end_level": evidence_value(float(v[-1])),
                "start_level": evidence_value(float(v[0])),
            }
            summary = (
                f"{metric} stays at {num(ev['end_level'])} ~ {name} = {num(ev['chance_value'])} (chance) over {v.size} "
                "evals: the model predicts uniformly"
            )
            return _finding(metric, e.index.to_numpy(), 0, summary, ev, severity=Severity.ERROR, uniform=True)
    return None


def _accuracy_at_chance(
    frame: pd.DataFrame, info: RunInfo | None, *, tol: float, acc_tol: float, classes: tuple[int, ...], points: int = 3
) -> Finding | None:
    """A loss within ``tol`` of ln(k) at its last ``points`` logs, moved under 5% since its first, while an accuracy
    sits within ``acc_tol`` of 1/k (a fraction or a percentage) at its last ``points`` logs."""
    names = metric_names(frame)
    accuracies = sorted(m for m in names if "acc" in m.rsplit("/", 1)[-1])
    if not accuracies:
        return None
    for metric in ("train/loss", *eval_loss_metrics(names)):
        s = series(frame, metric, finite=True)
        v = s.to_numpy(dtype=np.float64)
        if v.size < points or abs(v[-1] - v[0]) > 0.05 * abs(v[0]):
            continue
        name, value = min(_levels(info, classes).items(), key=lambda kv: abs(kv[1] - v[-1]))
        if not np.all(np.abs(v[-points:] - value) <= tol * value):
            continue
        k = round(math.exp(value))
        for acc in accuracies:
            a = series(frame, acc, finite=True).to_numpy(dtype=np.float64)[-points:]
            chance = next(
                (c for c in (1.0 / k, 100.0 / k) if a.size == points and np.all(np.abs(a - c) <= acc_tol * c)), None
            )
            if chance is None:
                continue
            ev = {
                "chance_level": name,
                "chance_value": evidence_value(value),
                "end_level": evidence_value(float(v[-1])),
                "start_level": evidence_value(float(v[0])),
                "accuracy_metric": acc,
                "accuracy_at_end": evidence_value(float(a[-1])),
                "chance_accuracy": evidence_value(chance),
            }
            summary = (
                f"{metric} stays at {num(ev['end_level'])} ~ {name} and {acc} at {num(ev['accuracy_at_end'])} ~ "
                f"1/{k} (chance for {k} classes): the model predicts uniformly"
            )
            return _finding(metric, s.index.to_numpy(), 0, summary, ev, severity=Severity.ERROR, uniform=True)
    return None


def _barely_moved(
    frame: pd.DataFrame,
    info: RunInfo | None,
    metric: str,
    v: np.ndarray,
    steps: np.ndarray,
    *,
    min_drop: float,
    small_drop: float,
    sigmas: float,
    chance_tol: float,
) -> Finding | None:
    """The loss ends barely below its start (or stuck at a chance level the whole run); None when it moved."""
    name = metric.split("/")[0]
    moved, ev = _moved(
        v, min_drop=min_drop, small_drop=small_drop, sigmas=sigmas, from_start=_from_start(frame, info, int(steps[0]))
    )
    if moved:
        return None
    chance = _near_chance(float(ev["end_level"]), info, chance_tol, generic=False)
    if info is not None and info.config_value("learning_rate") is not None:
        ev["learning_rate"] = info.config_value("learning_rate")
    if chance:
        ev.update(chance_level=chance[0], chance_value=evidence_value(chance[1]))
        summary = (
            f"{name} loss stuck at {num(ev['end_level'])} ~ {chance[0]} = {num(ev['chance_value'])} (chance) for "
            "the whole run"
        )
    else:
        drop = float(ev["relative_drop"])
        summary = (
            f"{name} loss barely moved: {num(ev['start_level'])} -> {num(ev['end_level'])} ({drop:.1%}) over "
            f"{v.size} logs" + (", within the noise of its logs" if drop >= min_drop else "")
        )
    return _finding(
        metric, steps, 0, summary, ev, severity=Severity.ERROR if chance else Severity.WARNING, uniform=bool(chance)
    )


@detector(requires_any=("train/loss", "eval/loss"), signatures=("plateau",), tags=("loss",))
def plateau(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    min_drop: float = 0.02,
    small_drop: float = 0.05,
    sigmas: float = 3.0,
    chance_tol: float = 0.03,
    vocab_tol: float = 0.01,
    min_points: int = 8,
    flat_spread: float = 0.01,
    flat_points: int = 4,
    pin_tol: float = 0.002,
    pin_points: int = 4,
    pin_share: float = 0.3,
    chance_classes: tuple[int, ...] = (100, 1000),
    chance_accuracy_tol: float = 0.02,
) -> list[Finding]:
    """The loss barely moves from its start (or sits at a chance level).

    Signature: the loss (the train loss, else the only loss the log prints) ends less than `min_drop` (2%) below its
    start (the median of the last 20% of logs against the first 10% after the first logs); or, for a log that covers
    training from its start (first epoch or step under 5% of the run), less than `small_drop` (5%) and within
    `sigmas` (3) standard errors of the noise: a difference the per-log noise explains is no progress (an excerpt
    from mid-run that stays flat is a converged phase, not this).
    Or: the logs after the first span (max - min) no more than `flat_spread` (1%) of their median, over `flat_points`
    (4) logs or more. At a chance level from the config (ln(num_labels) or ln(vocab_size), within `chance_tol`) the
    run learned nothing: error (the generic ln(2)..ln(10) count only for the pinned rule below: with a 3% tolerance
    they cover most losses between 0.67 and 2.4, where converged runs sit too). Whatever came before, a loss that ends pinned at a chance level (also `chance_classes`
    such as 100 and 1000 for CIFAR-100 and ImageNet) within `pin_tol` (0.2%: a trained model's loss never sits that
    exactly on ln(k)) for the last `pin_points` (4) logs and at least `pin_share` (30%) of the run: error. And an eval
    loss whose last 3 evals sit within `vocab_tol` (1%) of ln(V) for a common language-model vocabulary V (30k-256k),
    having moved under 5% since its first eval: the model predicts uniformly over its vocabulary (error). And, however
    few the logs, a loss (train or eval) whose last 3 logs sit within `chance_tol` of ln(k) (k from the config,
    2..10, or `chance_classes`), having moved under 5% since its first, while an accuracy sits within
    `chance_accuracy_tol` (2%) of 1/k (or 100/k %) at its last 3 logs: two metrics agree that a k-class model
    guesses (error). A loss that was flat for a phase and then fell is not reported.
    Likely causes: learning rate far too low, labels all masked, frozen weights, the optimizer not stepping; pinned
    at chance after a noisy start: saturated logits (outputs scaled up), a dead network.
    What to check next: 10x the learning rate; the labels of a batch; the trainable parameter count; the logits.
    """
    if rl_objective(frame, info):
        return []
    metric, loss = primary_loss(frame)
    loss = loss[loss.to_numpy() != 0.0]  # exact 0.0 losses are loss_zero_collapse's (HF's NaN filter), not a level
    v, steps = loss.to_numpy(dtype=np.float64), loss.index.to_numpy()
    pinned = (
        _pinned(v, info, tol=pin_tol, classes=tuple(chance_classes), min_points=pin_points, min_share=pin_share)
        if v.size
        else None
    )
    if pinned is not None:
        return [_pinned_finding(metric, v, steps, pinned)]
    if v.size and not np.all(v == 0.0):
        width = _flat(v, spread=flat_spread, points=flat_points)
        if width is not None:
            return [
                _flat_finding(
                    metric, v, steps, width, _near_chance(float(np.median(v[1:])), info, chance_tol, generic=False)
                )
            ]
    if v.size >= min_points and not np.all(v == 0.0):
        stuck = _barely_moved(
            frame,
            info,
            metric,
            v,
            steps,
            min_drop=min_drop,
            small_drop=small_drop,
            sigmas=sigmas,
            chance_tol=chance_tol,
        )
        if stuck is not None:
            return [stuck]
    classes = tuple(chance_classes)
    found = _eval_at_chance(frame, info, tol=chance_tol, vocab_tol=vocab_tol, classes=classes)
    found = found or _accuracy_at_chance(frame, info, tol=chance_tol, acc_tol=chance_accuracy_tol, classes=classes)
    return [found] if found is not None else []


def _pinned_finding(metric: str, v: np.ndarray, steps: np.ndarray, pinned: tuple[str, float, int]) -> Finding:
    """The finding of a loss that ends pinned at a chance level (an error: the model predicts uniformly)."""
    first = v.size - pinned[2]
    ev = {
        "chance_level": pinned[0],
        "chance_value": evidence_value(pinned[1]),
        "pinned_points": int(pinned[2]),
        "pinned_from_step": int(steps[first]),
        "end_level": evidence_value(float(v[-1])),
        "max_deviation": evidence_value(float(np.max(np.abs(v[first:] - pinned[1])))),
    }
    summary = (
        f"{metric.split('/')[0]} loss pinned at {num(ev['end_level'])} ~ {pinned[0]} = {num(ev['chance_value'])} "
        f"(chance) for the last {pinned[2]} logs, from step {steps[first]}: the model predicts uniformly"
    )
    return _finding(metric, steps, first, summary, ev, severity=Severity.ERROR, uniform=True)


def _flat_finding(
    metric: str, v: np.ndarray, steps: np.ndarray, width: float, chance: tuple[str, float] | None
) -> Finding:
    """The finding of a loss whose logs after the first span ``width`` of their median: an error at a chance level,
    else a warning."""
    ev = {
        "spread_after_first_log": evidence_value(width),
        "end_level": evidence_value(float(v[-1])),
        "first_level": evidence_value(float(v[0])),
    }
    if chance:
        ev.update(chance_level=chance[0], chance_value=evidence_value(chance[1]))
    summary = f"{metric.split('/')[0]} loss flat at {num(ev['end_level'])} (the logs after the first span {width:.2%} of their level)"
    summary += f" ~ {chance[0]} (chance)" if chance else ""
    severity = Severity.ERROR if chance else Severity.WARNING
    return _finding(metric, steps, 1, summary, ev, severity=severity, uniform=bool(chance))
