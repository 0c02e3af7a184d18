"""The run's settings, from the files beside its logs: ``training_args.bin``, ``config.json``, ``adapter_config.json``.

They carry no series, so they never make a run of their own: they join the run at or above them (an HF output dir,
a checkpoint). ``training_args.bin`` is read without torch and without executing its pickle
(:mod:`autopsy.importers.training_args`); from the model's ``config.json`` and the adapter's config only the keys
the detectors and the memory estimate use are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autopsy.frame import empty_frame
from autopsy.importers._base import Imported, ReadOptions
from autopsy.runinfo import RunInfo

__all__ = ["ADAPTER_KEYS", "ATTACH", "KIND", "MODEL_KEYS", "PRIORITY", "claims", "model_summary", "read"]

KIND = "run_config"
PRIORITY = 90  # no series: never competes with a metric source
ATTACH = "nearest_only"
MODEL_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
    "tie_word_embeddings",
    "num_labels",
    "id2label",
    "_name_or_path",
)
ADAPTER_KEYS = (
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "base_model_name_or_path",
    "task_type",
)
_NAMES = ("training_args.bin", "config.json", "adapter_config.json")
_MAX_JSON = 4 << 20


def claims(path: Path) -> int:
    return 2 if path.name in _NAMES or path.name == "generation_config.json" else 0


def _read_json_small(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > _MAX_JSON:
            return None
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def model_summary(data: dict[str, Any]) -> dict[str, Any]:
    """The model config keys worth carrying (the chance levels, the memory estimate and replay use them)."""
    return {k: data[k] for k in MODEL_KEYS if k in data}


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """training_args.bin (the last one: the root's, else the latest checkpoint's), config.json, adapter_config.json."""
    from autopsy.importers.training_args import read_training_args

    info = RunInfo(name=run)
    args = [p for p in paths if p.name == "training_args.bin"]
    for path in args[-1:]:
        config, note = read_training_args(path)
        if note:
            info.notes.append(note)
        trainer = config.pop("_trainer_args_class", None)
        if trainer:
            info.trainer_class = str(trainer)
        for key, value in config.items():
            info.config.setdefault(key, value)
        info.files.append(str(path))
    for path in paths:
        if path.name not in ("config.json", "adapter_config.json"):
            continue
        data = _read_json_small(path)
        if data is None:
            continue
        if path.name == "config.json" and ("model_type" in data or "architectures" in data):
            info.config.setdefault("model", model_summary(data))
        elif path.name == "adapter_config.json":
            info.config.setdefault("adapter", {k: data[k] for k in ADAPTER_KEYS if k in data})
    return Imported.one(empty_frame(), info)
