"""Seeded synthetic runs with a known failure and its ground truth (ruptures' ``pw_constant`` shape).

``make_run(failure="divergence", at=0.6, seed=3) -> (frame, truth)``: the frame is canonical (one run,
source ``synth``) with a :class:`~autopsy.frame.RunInfo` config like HF TrainingArguments; ``truth`` says
which signatures a detector suite must report (``expected``: signature -> first step) and which it may
(``allowed``: consequences of the failure, e.g. ``plateau`` after vanishing gradients).

Runs look like real ones: per-step losses with multiplicative noise (Gaussian plus rare heavy-tailed
batches) averaged over ``logging_steps`` windows, a linear warmup and a cosine or linear decay, a grad norm
that is high in warmup then settles, eval every ``eval_steps``, epochs, and (some shapes) throughput and
memory. Healthy shapes: ``exp``, ``power``, ``fast`` (converges early), ``slow``, ``epochs`` (multi-epoch
with mild boundary drops), ``classifier`` (starts at ln 4), ``dpo`` (starts at ln 2), ``grpo`` (loss near 0,
both signs), ``ctc`` (huge stable sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autopsy.frame import RunInfo, make_frame

__all__ = ["FAILURES", "SHAPES", "Truth", "make_run"]

SHAPES = ("exp", "power", "fast", "slow", "epochs", "classifier", "dpo", "grpo", "ctc")
FAILURES = (
    None, "loss_spike", "divergence", "exploding_gradients", "vanishing_gradients", "clip_saturation", "overfitting",
    "eval_flat", "plateau", "oscillation", "epoch_boundary_drop", "throughput_drop", "memory_growth", "nan",
)


@dataclass
class Truth:
    """What the run holds: signatures that must be found (first step) and those that may be."""

    expected: dict[str, int] = field(default_factory=dict)
    allowed: set[str] = field(default_factory=set)
    params: dict[str, Any] = field(default_factory=dict)


def _curve(shape: str, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The noiseless per-step loss of a healthy run (t in [0, 1])."""
    if shape == "exp":
        l0, floor, tau = rng.uniform(2.5, 4.0), rng.uniform(0.8, 1.6), rng.uniform(0.1, 0.3)
        return floor + (l0 - floor) * np.exp(-t / tau)
    if shape == "power":
        l0, floor = rng.uniform(3.0, 6.0), rng.uniform(1.5, 2.5)
        return floor + (l0 - floor) * (1 + 50 * t) ** -0.6
    if shape == "fast":
        l0, floor = rng.uniform(2.0, 3.0), rng.uniform(0.2, 0.5)
        return floor + (l0 - floor) * np.exp(-t / 0.05)
    if shape == "slow":
        l0 = rng.uniform(2.0, 3.0)
        return l0 * (1 - 0.25 * t)
    if shape == "classifier":
        return 0.25 + (math.log(4) - 0.25) * np.exp(-t / 0.15)
    if shape == "dpo":
        return 0.25 + (math.log(2) - 0.25) * np.exp(-t / 0.2)
    if shape == "ctc":
        l0 = rng.uniform(2e4, 5e4)
        return l0 * (0.6 + 0.4 * np.exp(-t / 0.3))
    if shape == "grpo":
        return 0.02 * np.sin(6 * t) * 0 + 0.0
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def make_run(
    *,
    failure: str | None = None,
    at: float = 0.5,
    seed: int = 0,
    noise: float = 0.03,
    shape: str = "exp",
    steps: int = 2000,
    logging_steps: int = 10,
    eval_steps: int | None = None,
    warmup_ratio: float = 0.05,
    epochs: int | None = None,
    run: str = "synth",
) -> tuple[pd.DataFrame, Truth]:
    """A synthetic run with ``failure`` starting at fraction ``at`` of the run; returns ``(frame, truth)``."""
    if failure not in FAILURES:
        raise ValueError(f"unknown failure {failure!r}; use one of {', '.join(str(f) for f in FAILURES)}")
    rng = np.random.default_rng(seed)
    n = int(steps)
    t = np.arange(1, n + 1) / n
    step_ix = np.arange(1, n + 1)
    truth = Truth(params=dict(failure=failure, at=at, seed=seed, noise=noise, shape=shape, steps=n, logging_steps=logging_steps))
    a = int(round(at * n))
    warmup = int(warmup_ratio * n)
    if epochs is None:
        epochs = 3 if shape == "epochs" or failure == "epoch_boundary_drop" else 1
    eval_steps = eval_steps or max(logging_steps, n // 20)
    base = _curve("exp" if shape == "epochs" else shape, t, rng)
    rl = shape in ("dpo", "grpo")

    # learning rate: linear warmup, cosine decay
    peak_lr = 2e-4
    lr = np.where(step_ix <= warmup, peak_lr * step_ix / max(1, warmup), peak_lr * 0.5 * (1 + np.cos(np.pi * (step_ix - warmup) / max(1, n - warmup))))
    spe = n / epochs  # steps per epoch
    epoch = step_ix / spe
    ep_idx = np.floor((step_ix - 1) / spe)
    level = base.copy()
    if shape == "epochs":
        level *= (1 - 0.015) ** ep_idx  # mild memorisation: a small step per epoch, below the 5% threshold
    # per-step noise: Gaussian plus rare heavy-tailed batches (student-t, 3 dof)
    scale_abs = 0.03 if shape == "grpo" else None
    eps = rng.normal(0, noise, n) + 0.3 * noise * rng.standard_t(3, n)
    gnorm = rng.uniform(0.3, 0.8) * (1 + 2 * np.exp(-step_ix / max(1.0, warmup / 2 + 1))) * np.exp(rng.normal(0, 0.15, n))

    eval_gap = np.full(n, 0.05)
    eval_level = None
    throughput = rng.uniform(2000, 8000) * np.exp(rng.normal(0, 0.05, n))
    memory = rng.uniform(10, 40) * 1e9 * (1 + 0.002 * rng.normal(size=n))
    with_resources = shape in ("exp", "power") or failure in ("throughput_drop", "memory_growth")
    config: dict[str, Any] = {
        "learning_rate": peak_lr, "warmup_steps": warmup, "max_steps": n, "logging_steps": logging_steps,
        "eval_steps": eval_steps, "max_grad_norm": 1.0, "num_train_epochs": epochs, "bf16": True,
        "eval_strategy": "steps", "save_strategy": "steps", "save_steps": max(1, n // 10), "lora_r": 16,
    }
    if rl:
        config["_trainer"] = "DPOTrainer" if shape == "dpo" else "GRPOTrainer"

    def first_log_at(step: int) -> int:
        return int(math.ceil(step / logging_steps) * logging_steps)

    if failure == "loss_spike":
        a = max(a, warmup + 5 * logging_steps)
        width = logging_steps * int(rng.integers(1, 3))
        level[a - 1: a - 1 + width] *= rng.uniform(2.0, 5.0)
        gnorm[a - 1: a - 1 + width] *= rng.uniform(3.0, 8.0)
        truth.expected["loss_spike"] = first_log_at(a)
        truth.allowed |= {"exploding_gradients"}
    elif failure == "divergence":
        grow = np.clip((step_ix - a) / max(1, n - a), 0, None)
        level = level * (1 + rng.uniform(2.0, 6.0) * grow ** rng.uniform(0.5, 1.5))
        gnorm = gnorm * (1 + 30 * grow)
        truth.expected["divergence"] = a
        truth.allowed |= {"exploding_gradients", "clip_saturation", "loss_spike", "overfitting", "oscillation"}
    elif failure == "exploding_gradients":
        a = max(a, warmup + 5 * logging_steps)
        gnorm[a - 1:] *= rng.uniform(20, 100)
        truth.expected["exploding_gradients"] = first_log_at(a)
        truth.allowed |= {"clip_saturation"}
    elif failure == "vanishing_gradients":
        a = max(a, warmup + 5 * logging_steps, int(0.2 * n))
        gnorm[a - 1:] = rng.uniform(1e-8, 1e-7) * np.exp(rng.normal(0, 0.1, n - a + 1))
        level[a - 1:] = level[a - 1]  # the loss freezes where it was
        truth.expected["vanishing_gradients"] = first_log_at(a)
        truth.allowed |= {"plateau", "eval_flat"}
    elif failure == "clip_saturation":
        gnorm *= rng.uniform(3.0, 40.0) / np.median(gnorm)
        truth.expected["clip_saturation"] = 0
    elif failure == "overfitting":
        eval_level = base.copy()
        best = int(a)
        eval_level[best:] = eval_level[best] * (1 + rng.uniform(0.15, 0.5) * ((step_ix[best:] - best) / max(1, n - best)) ** 0.8)
        truth.expected["overfitting"] = best
        truth.allowed |= {"epoch_boundary_drop"}
    elif failure == "eval_flat":
        eval_level = np.full(n, base[0] * 1.02)
        truth.expected["eval_flat"] = 0
    elif failure == "plateau":
        chance = math.log(int(rng.choice([4, 10, 32000])))
        level = np.full(n, chance)
        config["model"] = {"vocab_size": 32000} if chance > 5 else {"num_labels": int(round(math.exp(chance)))}
        truth.expected["plateau"] = 0
        truth.allowed |= {"eval_flat"}
    elif failure == "oscillation":
        a = max(a, warmup + 5 * logging_steps)
        a = min(a, int(0.4 * n))
        period = rng.uniform(8, 25) * logging_steps
        amp = rng.uniform(0.15, 0.3)
        osc = np.where(step_ix >= a, amp * np.sin(2 * np.pi * (step_ix - a) / period), 0.0)
        level = level * (1 + osc)
        truth.expected["oscillation"] = a
        truth.allowed |= {"loss_spike"}
    elif failure == "epoch_boundary_drop":
        level = base * (1 - rng.uniform(0.12, 0.3)) ** ep_idx
        truth.expected["epoch_boundary_drop"] = int(spe)
        truth.allowed |= {"overfitting", "sparse_eval"}
    elif failure == "throughput_drop":
        throughput[a - 1:] *= rng.uniform(0.2, 0.4)
        truth.expected["throughput_drop"] = first_log_at(a)
    elif failure == "memory_growth":
        memory = memory * (1 + rng.uniform(0.3, 1.5) * np.clip((step_ix - a) / max(1, n - a), 0, None))
        truth.expected["memory_growth"] = a
    elif failure == "nan":
        a = max(a, warmup + 5 * logging_steps)
        truth.expected["nan_grad_norm"] = first_log_at(a)
        truth.expected["loss_zero_collapse"] = first_log_at(a)
        truth.allowed |= {"nan_loss", "exploding_gradients", "divergence", "config_risk"}

    if shape == "grpo":
        loss_step = 0.03 * rng.normal(size=n) + 0.002
    else:
        loss_step = level * np.exp(eps)
    gn = gnorm.copy()
    if failure == "nan":
        # HF: NaN losses are filtered to 0.0 for the logging window, the grad norm is NaN
        loss_step[a - 1:] = np.nan
        gn[a - 1:] = np.nan
        gn[a - 1 - 3 * logging_steps: a - 1] *= np.linspace(3, 30, 3 * logging_steps)  # the climb before it

    # logging_steps window means (HF logs the mean of the window; grad norm and LR at the last step)
    m = n // logging_steps
    logged_steps = (np.arange(1, m + 1) * logging_steps).astype(np.int64)
    win = loss_step[: m * logging_steps].reshape(m, logging_steps)
    logged_loss = win.mean(axis=1)
    if failure == "nan":
        allnan = np.isnan(win).all(axis=1)
        sums = np.nansum(win, axis=1)
        counts = np.maximum((~np.isnan(win)).sum(axis=1), 1)
        logged_loss = np.where(allnan, 0.0, sums / counts)
    logged_g = gn[logged_steps - 1]
    logged_lr = lr[logged_steps - 1]
    logged_epoch = epoch[logged_steps - 1]

    metrics = ["train/loss", "train/grad_norm", "train/learning_rate", "train/epoch"]
    values = [logged_loss, logged_g, logged_lr, logged_epoch]
    stepcols = [logged_steps] * 4
    if with_resources:
        metrics += ["train/tokens_per_second", "train/memory_allocated"]
        values += [throughput[logged_steps - 1], memory[logged_steps - 1]]
        stepcols += [logged_steps] * 2
    if rl:
        metrics.append("train/rewards/chosen")
        values.append(np.linspace(0, 1, m) + rng.normal(0, 0.1, m))
        stepcols.append(logged_steps)
    if failure != "nan" and not rl:
        ev_steps = np.arange(eval_steps, n + 1, eval_steps, dtype=np.int64)
        if failure in ("overfitting", "eval_flat"):
            ev = eval_level[ev_steps - 1] * np.exp(rng.normal(0, noise / 10, ev_steps.size))
        else:
            ev_base = base if shape != "epochs" else level
            ev = ev_base[ev_steps - 1] * (1 + eval_gap[ev_steps - 1]) * np.exp(rng.normal(0, noise / 10, ev_steps.size))
            if failure == "divergence":
                ev = level[ev_steps - 1] * 1.05
            if failure == "vanishing_gradients":
                ev = level[ev_steps - 1] * 1.05 * np.exp(rng.normal(0, noise / 10, ev_steps.size))
        metrics.append("eval/loss")
        values.append(ev)
        stepcols.append(ev_steps)
    lengths = [len(s) for s in stepcols]
    wall0 = 1.7e9
    frame = make_frame(
        run=run, source="synth",
        metric=np.repeat(np.array(metrics, dtype=object), lengths),
        step=np.concatenate(stepcols),
        value=np.concatenate(values),
        wall_time=wall0 + 0.5 * np.concatenate(stepcols),
    )
    info = RunInfo(name=run, sources=["synth"], config=config, max_steps=n, logging_steps=logging_steps,
                   eval_steps=eval_steps, save_steps=config["save_steps"], num_train_epochs=float(epochs),
                   checkpoints={int(s): f"checkpoint-{int(s)}" for s in range(config["save_steps"], n + 1, config["save_steps"])},
                   finished=True)
    frame.attrs["runs"] = {run: info}
    return frame, truth
