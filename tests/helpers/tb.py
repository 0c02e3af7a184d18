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
