"""Device and dtype for replay: chosen from the machine and the checkpoint, never hard-coded.

The device is CUDA when it is available (else the CPU), unless asked. The dtype is the one the checkpoint
was saved in (its ``config.json``'s ``dtype``/``torch_dtype``, else the dtype of most of its weights), so an
overflow that happened in float16 or bfloat16 is replayed in that precision.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from autopsy.checkpoints import safetensors_header
from autopsy.errors import UsageError

__all__ = ["check_device", "checkpoint_dtype", "pick_device", "pick_dtype"]

_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "float64": "float64",
    "half": "float16",
    "float": "float32",
}


def check_device(requested: str | None) -> str | None:
    """Check a ``--device`` value without importing torch (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if requested is None:
        return None
    text = str(requested).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise UsageError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N")
    return text


def pick_device(requested: Any = None) -> Any:
    """``requested`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device) or CUDA when available, else the CPU."""
    import torch

    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {requested!r}: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked but no CUDA device is available here; use --device cpu")
    return dev


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype the checkpoint was saved in: its config's ``dtype``/``torch_dtype``, else most of its weights'."""
    cfg = model_dir / "config.json"
    if cfg.is_file():
        import json

        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        for key in ("dtype", "torch_dtype"):
            name = _DTYPES.get(str(data.get(key)).replace("torch.", ""))
            if name:
                return name
    counts: Counter[str] = Counter()
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            header, _ = safetensors_header(f)
        except Exception:
            continue
        for k, v in header.items():
            if k != "__metadata__" and v.get("dtype") in ("F16", "BF16", "F32", "F64"):
                counts[v["dtype"]] += 1
    return _DTYPES[counts.most_common(1)[0][0]] if counts else None


def pick_dtype(model_dir: str | os.PathLike[str]) -> Any:
    """The torch dtype the checkpoint was saved in (float32 when it says nothing).

    bfloat16 is kept on every device; so is float16 (CPU kernels for it exist and it must overflow where
    training did).
    """
    import torch

    name = checkpoint_dtype(Path(model_dir)) or "float32"
    return getattr(torch, name)
