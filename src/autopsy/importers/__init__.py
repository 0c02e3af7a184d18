"""Importers: from the files a run left behind to one canonical frame.

:func:`load` sniffs a path (:mod:`autopsy.importers.discover`), reads each run's files with the
importer of their kind, merges the sources of each run, and attaches the run metadata.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from autopsy.errors import AutopsyError, InputError
from autopsy.frame import Damage, RunInfo, concat_frames, empty_frame, merge_sources
from autopsy.importers.discover import RunFiles, find_runs

__all__ = ["IMPORTERS", "load", "load_run"]

# kind -> "module:function"; modules are imported only when a file of that kind is found, so that
# reading a trainer_state.json never imports tensorboard or wandb.
IMPORTERS: dict[str, str] = {
    "trainer_state": "autopsy.importers.trainer_state:read_trainer_state",
    "tensorboard": "autopsy.importers.tensorboard:read_tensorboard",
    "wandb": "autopsy.importers.wandb:read_wandb",
    "wandb_export": "autopsy.importers.wandb:read_wandb_export",
    "console": "autopsy.importers.console:read_console",
    "autopsy_log": "autopsy.importers.autopsy_log:read_autopsy_log",
}

# model config keys worth carrying (the OOM estimate and replay use them)
_MODEL_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "torch_dtype", "dtype",
               "tie_word_embeddings")
_ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path", "task_type")


def _importer(kind: str) -> Callable[..., pd.DataFrame] | None:
    target = IMPORTERS.get(kind)
    if target is None:
        return None
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("autopsy"):
            return None  # that importer is not part of this build
        raise


def _read_json_small(path: Path, limit: int = 4 << 20) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > limit:
            return None
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _read_configs(files: RunFiles, info: RunInfo) -> None:
    """training_args.bin (safely), config.json and adapter_config.json into the run's config."""
    for path in files.files.get("training_args", [])[-1:]:
        from autopsy.importers.training_args import read_training_args

        config, note = read_training_args(path)
        if note:
            info.notes.append(note)
        for key, value in config.items():
            info.config.setdefault(key, value)
    for path in files.files.get("model_config", []):
        data = _read_json_small(path)
        if data is None:
            continue
        if path.name == "config.json" and ("model_type" in data or "architectures" in data):
            info.config.setdefault("model", {k: data[k] for k in _MODEL_KEYS if k in data})
        elif path.name == "adapter_config.json":
            info.config.setdefault("adapter", {k: data[k] for k in _ADAPTER_KEYS if k in data})


def _apply_config(info: RunInfo) -> None:
    """Fill the run's schedule fields from its config where the logs did not say."""
    cfg = info.config
    for key in ("max_steps", "logging_steps", "eval_steps", "save_steps"):
        if getattr(info, key) is None:
            v = cfg.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                setattr(info, key, int(v))
    if info.num_train_epochs is None:
        v = cfg.get("num_train_epochs")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            info.num_train_epochs = float(v)


def load_run(files: RunFiles, *, engine: str = "auto") -> pd.DataFrame:
    """Read every file of one run and merge the sources into one canonical frame."""
    frames: list[pd.DataFrame] = []
    info = RunInfo(name=files.name, path=str(files.root))
    for kind in ("trainer_state", "tensorboard", "wandb", "wandb_export", "console", "autopsy_log"):
        paths = files.files.get(kind)
        if not paths:
            continue
        reader = _importer(kind)
        if reader is None:
            info.notes.append(f"{len(paths)} {kind} file(s) skipped: no {kind} importer in this build")
            continue
        kwargs: dict[str, Any] = {"run": files.name}
        if kind == "tensorboard":
            kwargs["engine"] = engine
        try:
            frame = reader(sorted(paths), **kwargs)
        except AutopsyError as exc:
            # one unreadable source does not stop the others: it is reported
            info.damage.append(Damage(file=str(paths[0]), offset=None, problem=str(exc), salvaged="nothing"))
            continue
        frames.append(frame)
    merged = concat_frames(frames)
    for name, other in merged.attrs.get("runs", {}).items():
        if name == files.name:
            info.merge(other)
    for step, path in files.checkpoints.items():
        info.checkpoints.setdefault(step, str(path))
    _read_configs(files, info)
    _apply_config(info)
    merged = merge_sources(merged)
    merged.attrs["runs"] = {files.name: info}
    return merged


def load(path: str | os.PathLike[str], *, engine: str = "auto") -> pd.DataFrame:
    """Load every run under ``path`` into one canonical frame (see :mod:`autopsy.frame`).

    ``path`` may be a run directory, a checkpoint directory, a single file, or a directory of runs.
    ``engine`` picks the TensorBoard reader (``"auto"``, ``"fast"``, ``"tbparse"``).
    Run metadata is in ``frame.attrs["runs"]`` (use :func:`autopsy.frame.run_info`).
    """
    spec = str(path)
    if spec.startswith("wandb:/"):  # a CLI Path collapses wandb:// to wandb:/
        from autopsy.importers.wandb import load_wandb_url

        return load_wandb_url(spec)
    runs = find_runs(path)
    frames = [load_run(r, engine=engine) for r in runs]
    out = concat_frames(frames)
    if out.empty and not any(i.damage or i.notes for i in out.attrs.get("runs", {}).values()):
        raise InputError(f"no metrics found under {path}")
    return out


__all__ += ["empty_frame"]
