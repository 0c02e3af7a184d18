"""Real TensorBoard event files for the importer tests, written at test time by the real writers."""

from __future__ import annotations

import json
import math
from pathlib import Path

HF_ARGS = {"learning_rate": 5e-4, "max_steps": 40, "logging_steps": 1, "eval_steps": 10, "save_steps": 20,
           "num_train_epochs": 3.0, "max_grad_norm": 1.0}
HF_MODEL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 124, "hidden_size": 32,
            "rope_theta": 10000.0}


def loss_at(step: int) -> float:
    """The loss curve written by :func:`write_hf_run`: NaN at step 17, +inf at 23, exact zeros after 35."""
    if step == 17:
        return float("nan")
    if step == 23:
        return float("inf")
    if step > 35:
        return 0.0
    return 3.0 * math.exp(-step / 15) + 0.1


def write_hf_run(log_dir: Path, *, steps: range = range(0, 41), texts: bool = True, tensors: bool = False) -> Path:
    """An HF-shaped run with torch's SummaryWriter (what HF's TensorBoardCallback uses)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    w = SummaryWriter(log_dir=str(log_dir))
    if texts:
        w.add_text("args", json.dumps(HF_ARGS, indent=2))
        w.add_text("model_config", json.dumps(HF_MODEL, indent=2))
    for step in steps:
        w.add_scalar("train/loss", loss_at(step), step)
        w.add_scalar("train/grad_norm", float("-inf") if step == 29 else 1.0 + step / 100, step)
        w.add_scalar("train/learning_rate", 5e-4 * (1 - step / 41), step)
        if tensors:
            w.add_scalar("train/tensor_style", step * 0.5, step, new_style=True)
        if step and step % 10 == 0:
            w.add_scalar("eval/loss", loss_at(step) + 0.2, step)
    w.add_scalar("train/big_step", 1.5, 2**40)
    w.close()
    return next(log_dir.glob("events.out.tfevents.*"))


def write_tensor_scalars(log_dir: Path) -> tuple[Path, dict[str, float]]:
    """Scalar tensors of several dtypes and encodings, written with tensorboard's own EventFileWriter."""
    import numpy as np
    from tensorboard.compat.proto import (
        event_pb2,
        summary_pb2,
        tensor_pb2,
        tensor_shape_pb2,
        types_pb2,
    )
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    scalar_shape = tensor_shape_pb2.TensorShapeProto()
    half_bits = int(np.array([1.5], dtype=np.float16).view(np.uint16)[0])
    tensors = {
        "t/float_content": (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=scalar_shape,
                                                   tensor_content=np.array([2.25], "<f4").tobytes()), 2.25),
        "t/double_val": (tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_shape=scalar_shape,
                                                double_val=[0.1]), 0.1),
        "t/half_val": (tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF, tensor_shape=scalar_shape,
                                              half_val=[half_bits]), 1.5),
        "t/int64_val": (tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_shape=scalar_shape,
                                               int64_val=[7]), 7.0),
        "t/nan_float": (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=scalar_shape,
                                               float_val=[float("nan")]), float("nan")),
    }
    w = EventFileWriter(str(log_dir))
    for step in (1, 2):
        values = [summary_pb2.Summary.Value(tag=tag, tensor=t) for tag, (t, _) in tensors.items()]
        # several values in one event: not the fast path's shape
        w.add_event(event_pb2.Event(wall_time=1.7e9 + step, step=step, summary=summary_pb2.Summary(value=values)))
    w.close()
    return next(log_dir.glob("events.out.tfevents.*")), {tag: v for tag, (_, v) in tensors.items()}


KERAS_HPARAMS = {"learning_rate": 0.001, "optimizer": "adam", "dropout": 0.2, "amsgrad": False, "units": 64}


def keras_curves(epochs: int) -> dict[str, dict[str, list[float]]]:
    """The per-epoch values :func:`write_keras_run` writes: train loss falls, validation loss turns up at epoch 4."""
    train = {"epoch_loss": [1.0 / (e + 1) for e in range(epochs)], "epoch_accuracy": [0.5 + 0.05 * e for e in range(epochs)]}
    val = {"epoch_loss": [1.2 - 0.1 * e if e < 4 else 0.8 + 0.15 * (e - 4) for e in range(epochs)],
           "epoch_accuracy": [0.45 + 0.04 * min(e, 4) for e in range(epochs)]}
    return {"train": train, "validation": val}


def write_keras_run(log_dir: Path, *, epochs: int = 8, hparams: bool = True) -> Path:
    """The layout of Keras' ``TensorBoard`` callback: ``train/`` and ``validation/`` dirs of ``.v2`` event files
    holding TF2 scalar summaries (a float scalar tensor, plugin ``scalars``), ``epoch_loss``/``epoch_accuracy`` at
    step = epoch, an empty profiler file in ``train/``, and TF2's ``hp.hparams`` summary. Written with
    tensorboard's own writer and summary functions (``scalar_pb``, ``hparams_pb``: what TF2's ops serialize)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    curves = keras_curves(epochs)
    for side in ("train", "validation"):
        w = EventFileWriter(str(log_dir / side), filename_suffix=".v2")
        if side == "train" and hparams:
            w.add_event(event_pb2.Event(wall_time=1.7e9, step=0, summary=hp.hparams_pb(KERAS_HPARAMS)))
        for epoch in range(epochs):
            for tag, values in curves[side].items():
                w.add_event(event_pb2.Event(wall_time=1.7e9 + 60 * epoch, step=epoch, summary=scalar_pb(tag, values[epoch])))
        w.close()
    profile = EventFileWriter(str(log_dir / "train"), filename_suffix=".profile-empty")  # the profiler's marker
    profile.close()
    (log_dir / "train" / "plugins" / "profile" / "2024_01_01_00_00_00").mkdir(parents=True)
    (log_dir / "train" / "plugins" / "profile" / "2024_01_01_00_00_00" / "host.xplane.pb").write_bytes(b"")
    return log_dir
