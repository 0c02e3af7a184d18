"""Seeded synthetic runs with a known failure and its ground truth (ruptures' ``pw_constant`` shape).

``make_run(failure="divergence", at=0.6, seed=3) -> (frame, truth)``: the frame is canonical (one run,
source ``synth``) with a :class:`~autopsy.runinfo.RunInfo` config like HF TrainingArguments; ``truth`` says
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

from autopsy.frame import make_frame
from autopsy.runinfo import RunInfo, attach_runs

__all__ = ["FAILURES", "SHAPES", "Truth", "make_run"]

SHAPES = ("exp", "power", "fast", "slow", "epochs", "classifier", "dpo", "grpo", "ctc")
FAILURES = (
    None,
    "loss_spike",
    "divergence",
    "exploding_gradients",
    "vanishing_gradients",
    "clip_saturation",
    "overfitting",
    "eval_flat",
    "plateau",
    "oscillation",
    "epoch_boundary_drop",
    "throughput_drop",
    "memory_growth",
    "nan",
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
        return np.zeros_like(t)  # GRPO: the loss is noise around 0 (added with the per-step noise)
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


@dataclass
class _Sim:
    """One simulated run while it is made: per-step arrays (index = step - 1) and what is planted in them."""

    rng: np.random.Generator
    n: int
    a: int
    warmup: int
    logging_steps: int
    eval_steps: int
    noise: float
    shape: str
    epochs: int
    step_ix: np.ndarray
    base: np.ndarray
    level: np.ndarray
    lr: np.ndarray
    epoch: np.ndarray
    ep_idx: np.ndarray
    eps: np.ndarray
    gnorm: np.ndarray
    throughput: np.ndarray
    memory: np.ndarray
    config: dict[str, Any]
    truth: Truth
    eval_level: np.ndarray | None = None
    trainer: str | None = None  # DPOTrainer, GRPOTrainer for the RL shapes

    @property
    def spe(self) -> float:
        return self.n / self.epochs  # steps per epoch

    def first_log_at(self, step: int) -> int:
        return int(math.ceil(step / self.logging_steps) * self.logging_steps)

    def past_warmup(self) -> int:
        return max(self.a, self.warmup + 5 * self.logging_steps)

    def ramp(self) -> np.ndarray:
        """0 before the onset, rising to 1 at the end of the run."""
        return np.clip((self.step_ix - self.a) / max(1, self.n - self.a), 0, None)


def _plant_spike(s: _Sim) -> None:
    s.a = s.past_warmup()
    width = s.logging_steps * int(s.rng.integers(1, 3))
    s.level[s.a - 1 : s.a - 1 + width] *= s.rng.uniform(2.0, 5.0)
    s.gnorm[s.a - 1 : s.a - 1 + width] *= s.rng.uniform(3.0, 8.0)
    s.truth.expected["loss_spike"] = s.first_log_at(s.a)
    s.truth.allowed |= {"exploding_gradients"}


def _plant_divergence(s: _Sim) -> None:
    grow = s.ramp()
    s.level = s.level * (1 + s.rng.uniform(2.0, 6.0) * grow ** s.rng.uniform(0.5, 1.5))
    s.gnorm = s.gnorm * (1 + 30 * grow)
    s.truth.expected["divergence"] = s.a
    s.truth.allowed |= {"exploding_gradients", "clip_saturation", "loss_spike", "overfitting", "oscillation"}


def _plant_exploding(s: _Sim) -> None:
    s.a = s.past_warmup()
    s.gnorm[s.a - 1 :] *= s.rng.uniform(20, 100)
    s.truth.expected["exploding_gradients"] = s.first_log_at(s.a)
    s.truth.allowed |= {"clip_saturation"}


def _plant_vanishing(s: _Sim) -> None:
    s.a = max(s.past_warmup(), int(0.2 * s.n))
    s.gnorm[s.a - 1 :] = s.rng.uniform(1e-8, 1e-7) * np.exp(s.rng.normal(0, 0.1, s.n - s.a + 1))
    s.level[s.a - 1 :] = s.level[s.a - 1]  # the loss freezes where it was
    s.truth.expected["vanishing_gradients"] = s.first_log_at(s.a)
    s.truth.allowed |= {"plateau", "eval_flat"}


def _plant_clip(s: _Sim) -> None:
    s.gnorm *= s.rng.uniform(3.0, 40.0) / np.median(s.gnorm)
    s.truth.expected["clip_saturation"] = 0


def _plant_overfitting(s: _Sim) -> None:
    s.eval_level = s.base.copy()
    best = int(s.a)
    rise = s.rng.uniform(0.15, 0.5) * ((s.step_ix[best:] - best) / max(1, s.n - best)) ** 0.8
    s.eval_level[best:] = s.eval_level[best] * (1 + rise)
    s.truth.expected["overfitting"] = best
    s.truth.allowed |= {"epoch_boundary_drop"}


def _plant_eval_flat(s: _Sim) -> None:
    s.eval_level = np.full(s.n, s.base[0] * 1.02)
    s.truth.expected["eval_flat"] = 0


def _plant_plateau(s: _Sim) -> None:
    chance = math.log(int(s.rng.choice([4, 10, 32000])))
    s.level = np.full(s.n, chance)
    s.config["model"] = {"vocab_size": 32000} if chance > 5 else {"num_labels": int(round(math.exp(chance)))}
    s.truth.expected["plateau"] = 0
    s.truth.allowed |= {"eval_flat"}


def _plant_oscillation(s: _Sim) -> None:
    s.a = min(s.past_warmup(), int(0.4 * s.n))
    period = s.rng.uniform(8, 25) * s.logging_steps
    amp = s.rng.uniform(0.15, 0.3)
    s.level = s.level * (1 + np.where(s.step_ix >= s.a, amp * np.sin(2 * np.pi * (s.step_ix - s.a) / period), 0.0))
    s.truth.expected["oscillation"] = s.a
    s.truth.allowed |= {"loss_spike"}


def _plant_epoch_drop(s: _Sim) -> None:
    s.level = s.base * (1 - s.rng.uniform(0.12, 0.3)) ** s.ep_idx
    s.truth.expected["epoch_boundary_drop"] = int(s.spe)
    s.truth.allowed |= {"overfitting", "sparse_eval"}


def _plant_throughput(s: _Sim) -> None:
    s.throughput[s.a - 1 :] *= s.rng.uniform(0.2, 0.4)
    s.truth.expected["throughput_drop"] = s.first_log_at(s.a)


def _plant_memory(s: _Sim) -> None:
    s.memory = s.memory * (1 + s.rng.uniform(0.3, 1.5) * s.ramp())
    s.truth.expected["memory_growth"] = s.a


def _plant_nan(s: _Sim) -> None:
    s.a = s.past_warmup()
    s.truth.expected["nan_grad_norm"] = s.first_log_at(s.a)
    s.truth.expected["loss_zero_collapse"] = s.first_log_at(s.a)
    s.truth.allowed |= {"nan_loss", "exploding_gradients", "divergence", "config_risk"}


_PLANT = {
    "loss_spike": _plant_spike,
    "divergence": _plant_divergence,
    "exploding_gradients": _plant_exploding,
    "vanishing_gradients": _plant_vanishing,
    "clip_saturation": _plant_clip,
    "overfitting": _plant_overfitting,
    "eval_flat": _plant_eval_flat,
    "plateau": _plant_plateau,
    "oscillation": _plant_oscillation,
    "epoch_boundary_drop": _plant_epoch_drop,
    "throughput_drop": _plant_throughput,
    "memory_growth": _plant_memory,
    "nan": _plant_nan,
}


def _simulate(
    *,
    failure: str | None,
    at: float,
    seed: int,
    noise: float,
    shape: str,
    steps: int,
    logging_steps: int,
    eval_steps: int | None,
    warmup_ratio: float,
    epochs: int | None,
) -> _Sim:
    """The healthy run of ``shape`` (loss curve, LR schedule, grad norm, throughput, memory), before any failure."""
    rng = np.random.default_rng(seed)
    n = int(steps)
    t = np.arange(1, n + 1) / n
    step_ix = np.arange(1, n + 1)
    warmup = int(warmup_ratio * n)
    if epochs is None:
        epochs = 3 if shape == "epochs" or failure == "epoch_boundary_drop" else 1
    eval_steps = eval_steps or max(logging_steps, n // 20)
    base = _curve("exp" if shape == "epochs" else shape, t, rng)
    peak_lr = 2e-4  # learning rate: linear warmup, cosine decay
    lr = np.where(
        step_ix <= warmup,
        peak_lr * step_ix / max(1, warmup),
        peak_lr * 0.5 * (1 + np.cos(np.pi * (step_ix - warmup) / max(1, n - warmup))),
    )
    ep_idx = np.floor((step_ix - 1) / (n / epochs))
    level = base.copy()
    if shape == "epochs":
        level *= (1 - 0.015) ** ep_idx  # mild memorisation: a small step per epoch, below the 5% threshold
    # per-step noise: Gaussian plus rare heavy-tailed batches (student-t, 3 dof)
    eps = rng.normal(0, noise, n) + 0.3 * noise * rng.standard_t(3, n)
    gnorm = (
        rng.uniform(0.3, 0.8) * (1 + 2 * np.exp(-step_ix / max(1.0, warmup / 2 + 1))) * np.exp(rng.normal(0, 0.15, n))
    )
    throughput = rng.uniform(2000, 8000) * np.exp(rng.normal(0, 0.05, n))
    memory = rng.uniform(10, 40) * 1e9 * (1 + 0.002 * rng.normal(size=n))
    config: dict[str, Any] = {
        "learning_rate": peak_lr,
        "warmup_steps": warmup,
        "max_steps": n,
        "logging_steps": logging_steps,
        "eval_steps": eval_steps,
        "max_grad_norm": 1.0,
        "num_train_epochs": epochs,
        "bf16": True,
        "eval_strategy": "steps",
        "save_strategy": "steps",
        "save_steps": max(1, n // 10),
        "lora_r": 16,
    }
    truth = Truth(
        params=dict(failure=failure, at=at, seed=seed, noise=noise, shape=shape, steps=n, logging_steps=logging_steps)
    )
    return _Sim(
        rng=rng,
        n=n,
        a=int(round(at * n)),
        warmup=warmup,
        logging_steps=logging_steps,
        eval_steps=eval_steps,
        noise=noise,
        shape=shape,
        epochs=epochs,
        step_ix=step_ix,
        base=base,
        level=level,
        lr=lr,
        epoch=step_ix / (n / epochs),
        ep_idx=ep_idx,
        eps=eps,
        gnorm=gnorm,
        throughput=throughput,
        memory=memory,
        config=config,
        truth=truth,
    )


def _logged_train(s: _Sim, failure: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logged steps, loss, grad norm) as HF logs them: the loss is the mean of each logging_steps window (NaN
    windows logged as 0.0 by the NaN filter), the grad norm the window's last step's."""
    loss_step = 0.03 * s.rng.normal(size=s.n) + 0.002 if s.shape == "grpo" else s.level * np.exp(s.eps)
    gn = s.gnorm.copy()
    if failure == "nan":
        loss_step[s.a - 1 :] = np.nan
        gn[s.a - 1 :] = np.nan
        gn[s.a - 1 - 3 * s.logging_steps : s.a - 1] *= np.linspace(3, 30, 3 * s.logging_steps)  # the climb before it
    m = s.n // s.logging_steps
    steps = (np.arange(1, m + 1) * s.logging_steps).astype(np.int64)
    win = loss_step[: m * s.logging_steps].reshape(m, s.logging_steps)
    loss = win.mean(axis=1)
    if failure == "nan":
        counts = np.maximum((~np.isnan(win)).sum(axis=1), 1)
        loss = np.where(np.isnan(win).all(axis=1), 0.0, np.nansum(win, axis=1) / counts)
    return steps, loss, gn[steps - 1]


def _eval_losses(s: _Sim, failure: str | None) -> tuple[np.ndarray, np.ndarray]:
    ev_steps = np.arange(s.eval_steps, s.n + 1, s.eval_steps, dtype=np.int64)
    jitter = np.exp(s.rng.normal(0, s.noise / 10, ev_steps.size))
    if s.eval_level is not None:
        return ev_steps, s.eval_level[ev_steps - 1] * jitter
    ev_base = s.base if s.shape != "epochs" else s.level
    ev = ev_base[ev_steps - 1] * 1.05 * jitter  # eval sits 5% above train
    if failure == "divergence":
        ev = s.level[ev_steps - 1] * 1.05
    if failure == "vanishing_gradients":
        ev = s.level[ev_steps - 1] * 1.05 * np.exp(s.rng.normal(0, s.noise / 10, ev_steps.size))
    return ev_steps, ev


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
    s = _simulate(
        failure=failure,
        at=at,
        seed=seed,
        noise=noise,
        shape=shape,
        steps=steps,
        logging_steps=logging_steps,
        eval_steps=eval_steps,
        warmup_ratio=warmup_ratio,
        epochs=epochs,
    )
    rl = shape in ("dpo", "grpo")
    if rl:
        s.trainer = "DPOTrainer" if shape == "dpo" else "GRPOTrainer"
    if failure is not None:
        _PLANT[failure](s)
    steps_l, loss, gn = _logged_train(s, failure)
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "train/loss": (steps_l, loss),
        "train/grad_norm": (steps_l, gn),
        "train/learning_rate": (steps_l, s.lr[steps_l - 1]),
        "train/epoch": (steps_l, s.epoch[steps_l - 1]),
    }
    if shape in ("exp", "power") or failure in ("throughput_drop", "memory_growth"):
        columns["train/tokens_per_second"] = (steps_l, s.throughput[steps_l - 1])
        columns["train/memory_allocated"] = (steps_l, s.memory[steps_l - 1])
    if rl:
        columns["train/rewards/chosen"] = (
            steps_l,
            np.linspace(0, 1, steps_l.size) + s.rng.normal(0, 0.1, steps_l.size),
        )
    if failure != "nan" and not rl:
        columns["eval/loss"] = _eval_losses(s, failure)
    lengths = [len(st) for st, _ in columns.values()]
    stepcol = np.concatenate([st for st, _ in columns.values()])
    frame = make_frame(
        run=run,
        source="synth",
        metric=np.repeat(np.array(list(columns), dtype=object), lengths),
        step=stepcol,
        value=np.concatenate([v for _, v in columns.values()]),
        wall_time=1.7e9 + 0.5 * stepcol,
    )
    save = s.config["save_steps"]
    info = RunInfo(
        name=run,
        sources=["synth"],
        config=s.config,
        max_steps=s.n,
        logging_steps=logging_steps,
        eval_steps=s.eval_steps,
        save_steps=save,
        num_train_epochs=float(s.epochs),
        checkpoints={int(k): f"checkpoint-{int(k)}" for k in range(save, s.n + 1, save)},
        finished=True,
        trainer_class=s.trainer,
    )
    return attach_runs(frame, {run: info}), s.truth
