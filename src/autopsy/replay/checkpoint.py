"""Load a checkpoint for replay: a full model or a PEFT adapter on its local base, with nothing downloaded.

Finding checkpoints and scanning their weights needs no torch: :mod:`autopsy.checkpoints`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autopsy.checkpoints import is_adapter
from autopsy.errors import InputError, UnreadableError
from autopsy.replay.device import pick_device, pick_dtype

__all__ = ["base_model_dir", "load_model", "model_config"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UnreadableError(f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UnreadableError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UnreadableError(f"{path}: expected a JSON object")
    return data


def base_model_dir(adapter_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path:
    """The local base model of a PEFT adapter: ``base`` when given, else the one its config names."""
    cfg = _read_json(Path(adapter_dir) / "adapter_config.json")
    name = str(base) if base is not None else cfg.get("base_model_name_or_path")
    if not name:
        raise InputError(f"{adapter_dir}: the adapter names no base model; pass --base DIR")
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise InputError(
            f"base model {name!r} of the adapter is not a local model directory (nothing is downloaded); "
            "pass --base DIR with a local copy"
        )
    return p


def model_config(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (the base model's for an adapter)."""
    p = Path(path)
    if is_adapter(p):
        p = base_model_dir(p, base)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise InputError(f"{path}: no config.json: not a model checkpoint directory")
    return _read_json(cfg)


def load_model(
    path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None, device: Any = None, dtype: Any = None
) -> Any:
    """Load a checkpoint (full model, or PEFT adapter on its local base) for replay, trainable, on ``device``.

    Nothing is downloaded (``local_files_only``). The class comes from ``config.architectures``
    (``AutoModelForCausalLM`` when it names none).
    """
    from autopsy._optional import require

    require("torch", purpose="replay a checkpoint")
    transformers = require("transformers", purpose="load a checkpoint")
    transformers.utils.logging.disable_progress_bar()
    p = Path(path)
    adapter = is_adapter(p)
    model_dir = base_model_dir(p, base) if adapter else p
    cfg = model_config(model_dir)
    device = pick_device(device)
    dtype = dtype if dtype is not None else pick_dtype(model_dir)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableError(f"cannot load the model from {model_dir}: {type(exc).__name__}: {first}") from None
    if adapter:
        peft = require("peft", purpose="load a LoRA/PEFT adapter")
        try:
            model = peft.PeftModel.from_pretrained(model, str(p), is_trainable=True, local_files_only=True)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnreadableError(f"cannot load the adapter {p}: {type(exc).__name__}: {first}") from None
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.to(device)
