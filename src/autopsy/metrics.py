"""Metric names: the canonical names detectors ask for, and the one table of the names sources write.

A source writes ``loss``, ``train_loss``, ``gnorm`` or ``val_loss``; the frame carries the canonical
``train/loss``, ``train/grad_norm``, ``eval/loss`` (and ``eval/<set>/loss`` for each named eval set). The raw
name stays in the frame's ``raw_metric`` column. Names not in the table keep their own (stripped) name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

__all__ = ["METRIC_ALIASES", "canonical_metric", "eval_loss_metrics", "is_canonical", "loss_metrics", "media_leaves"]

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
    "average_loss": "train/loss",
    "avg_loss": "train/loss",
    "mean_loss": "train/loss",
    "epoch_loss": "train/loss",  # Keras' TensorBoard callback (per epoch)
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
    "test_loss": "eval/loss",  # a custom loop's held-out set, printed during training
    # mixed precision
    "loss_scale": "train/loss_scale",
    "train/loss_scale": "train/loss_scale",
    "scaler/scale": "train/loss_scale",
    "loss-scale": "train/loss_scale",
    "grad_scale": "train/loss_scale",
    # steps whose update was skipped (fp16 overflow, a non-finite batch): a running count
    "skipped": "train/skipped_steps",
    "skipped_steps": "train/skipped_steps",
    "skipped_iterations": "train/skipped_steps",
    "number_of_skipped_iterations": "train/skipped_steps",  # Megatron
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
    "tokens_per_sec": "train/tokens_per_second",
    "tokens/sec": "train/tokens_per_second",
    "tok/s": "train/tokens_per_second",
    "train_tokens_per_second": "train/tokens_per_second",  # HF, every log with include_num_input_tokens_seen
    "train/train_tokens_per_second": "train/tokens_per_second",
    "tokens_per_second_per_gpu": "train/tokens_per_second_per_gpu",  # torchtune
    "samples_per_second": "train/samples_per_second",
    "num_input_tokens_seen": "train/num_tokens",  # HF include_num_input_tokens_seen (all ranks)
    "train/num_input_tokens_seen": "train/num_tokens",
    "mfu": "train/mfu",  # nanoGPT prints it in percent
    "memory(gib)": "train/memory_gib",  # ms-swift
    "peak_memory_alloc": "train/memory_gib",  # torchtune (GiB)
    "time": "train/iter_time",  # mmengine/detectron2: seconds per iteration
    "train_speed(s/it)": "train/iter_time",  # ms-swift
    "data_time": "train/data_time",  # mmengine: seconds of each iteration spent waiting for data
    # accuracy
    "accuracy": "train/accuracy",
    "epoch_accuracy": "train/accuracy",
    "eval_accuracy": "eval/accuracy",
    "eval_acc": "eval/accuracy",
    "val_acc": "eval/accuracy",
    "val_accuracy": "eval/accuracy",
    "valid_acc": "eval/accuracy",
    "valid_accuracy": "eval/accuracy",
    "validation_accuracy": "eval/accuracy",
    "test_acc": "eval/accuracy",
    "test_accuracy": "eval/accuracy",
    "valloss": "eval/loss",  # "ValLoss"
    "val_loss_valid": "eval/loss",
    "acc": "train/accuracy",
    "train_acc": "train/accuracy",
    "train_accuracy": "train/accuracy",
    "training_accuracy": "train/accuracy",
    "reduced_train_loss": "train/loss",  # NeMo
}

_EVAL_SET_LOSS = re.compile(r"^eval/(?P<set>.+?)[_/]loss$")
# W&B flattens nested dicts with dots: {"train": {"loss": x}} is logged as "train.loss"
_DOTTED = re.compile(r"^(?P<ns>train|training|eval|val|valid|validation|test)\.(?P<rest>.+)$", re.IGNORECASE)
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
    dotted = _DOTTED.match(name)
    if dotted:
        return canonical_metric(f"{dotted.group('ns')}/{dotted.group('rest')}", hf_flat=hf_flat)
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


# the fields W&B flattens out of a logged media object or table (wandb.Image, wandb.Table: "examples.width",
# "samples.nrows"): they describe a file, they are not measurements of the run
_MEDIA_FIELDS = frozenset(
    {
        "_type",
        "width",
        "height",
        "size",
        "sha256",
        "path",
        "format",
        "ncols",
        "nrows",
        "count",
        "filenames",
        "captions",
        "artifact_path",
        "_latest_artifact_path",
        "log_mode",
    }
)
_MEDIA_ONLY = frozenset(
    {"_type", "width", "height", "sha256", "ncols", "nrows", "artifact_path", "_latest_artifact_path"}
)


def media_leaves(names: Iterable[str]) -> set[str]:
    """The names among ``names`` that are fields of a logged media object or table, not metrics: every field under
    a prefix that has a ``<prefix>._type`` (how W&B marks media), and any ``<prefix>.<field>`` whose field only media
    have (``.width``, ``.sha256``, ``.nrows``...)."""
    names = {str(n) for n in names}
    typed = {n[: -len("._type")] for n in names if n.endswith("._type")}
    out = set()
    for n in names:
        prefix, dot, leaf = n.rpartition(".")
        if not dot:
            continue
        typed_field = prefix in typed and leaf in _MEDIA_FIELDS
        beside_media = leaf in _MEDIA_FIELDS and any(f"{prefix}.{m}" in names for m in _MEDIA_ONLY)
        if typed_field or leaf in _MEDIA_ONLY or beside_media:
            out.add(n)
    return out
