"""Metric names: the canonical names detectors ask for, and the one table of the names sources write.

A source writes ``loss``, ``train_loss``, ``gnorm`` or ``val_loss``; the frame carries the canonical
``train/loss``, ``train/grad_norm``, ``eval/loss`` (and ``eval/<set>/loss`` for each named eval set). The raw
name stays in the frame's ``raw_metric`` column. Names not in the table keep their own (stripped) name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

__all__ = ["METRIC_ALIASES", "canonical_metric", "eval_loss_metrics", "is_canonical", "loss_metrics"]

# One table: lower-cased alias -> canonical name.
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
    "lm_loss": "train/loss",  # Megatron "lm loss"
    "loss_train": "train/loss",  # LitGPT "loss train: X"
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
    "learning_rate_step": "train/learning_rate",  # Lightning progress bar
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
    # accuracy
    "accuracy": "train/accuracy",
    "eval_accuracy": "eval/accuracy",
    "val_acc": "eval/accuracy",
    "val_accuracy": "eval/accuracy",
}

_EVAL_SET_LOSS = re.compile(r"^eval/(?P<set>.+?)[_/]loss$")
_NAMESPACES = ("train/", "eval/", "test/", "system/")


@functools.lru_cache(maxsize=65536)
def canonical_metric(raw: str, *, hf_flat: bool = False) -> str:
    """Map a source's metric name to the canonical name.

    ``hf_flat=True`` first applies HF Trainer's own rewrite (``eval_x`` -> ``eval/x``, every other
    key -> ``train/key``), as its TensorBoard and W&B callbacks do, so that trainer_state.json and
    the loggers agree on names such as ``train/rewards/chosen``. Every named eval set's loss
    (``eval_<set>_loss``, ``eval/<set>/loss``) becomes ``eval/<set>/loss``.
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
        return f"eval/{name[5 : 5 + len(m.group('set'))]}/loss"
    return name


def is_canonical(name: str) -> bool:
    """True for a name a frame can carry as it is: namespaced and not an alias of another name.

    A detector that ``requires=("loss",)`` would be skipped on every run (frames carry ``train/loss``):
    the registry refuses such a name when the detector is registered.
    """
    return name.startswith(_NAMESPACES) and canonical_metric(name) == name


def eval_loss_metrics(names: Iterable[str]) -> list[str]:
    """The eval losses among ``names``: ``eval/loss`` first, then every ``eval/<set>/loss``, sorted."""
    names = set(names)
    out = ["eval/loss"] if "eval/loss" in names else []
    return out + sorted(m for m in names if m.startswith("eval/") and m.endswith("/loss") and m != "eval/loss")


def loss_metrics(names: Iterable[str]) -> list[str]:
    """The loss metrics among ``names``: ``train/loss``, then the eval losses."""
    names = set(names)
    return (["train/loss"] if "train/loss" in names else []) + eval_loss_metrics(names)
