"""The run's config from ``training_args.bin`` — without ever executing the pickle.

``training_args.bin`` is ``torch.save(TrainingArguments)``: a pickle. It is read only with
``torch.load(weights_only=True)`` and an explicit allowlist of global names, each bound to an
*inert stub* class (it stores its constructor arguments and state, and runs no code). So a crafted
file that names ``os.system`` or ``builtins.eval`` is refused, and even an allowed name never reaches
the real transformers class. transformers itself is never imported here.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any

from autopsy._optional import available

__all__ = ["ALLOWED_PREFIXES", "read_training_args"]

# Global names a TrainingArguments pickle references (transformers, TRL's configs, accelerate's
# state and enums, PEFT configs). Only these module prefixes are allowed, and only as stubs.
ALLOWED_PREFIXES = ("transformers.", "trl.", "accelerate.", "peft.")


class _Inert:
    """Stands in for an allowed class: keeps what the pickle passes, runs nothing."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            self.__dict__.update(state)

    def plain(self) -> Any:
        """Enum-like stubs reduce to their value; objects to a dict of plain values."""
        args = self.__dict__.get("_args", ())
        state = {k: v for k, v in self.__dict__.items() if k != "_args"}
        if not state and len(args) == 1:
            return _plain(args[0])
        return {k: _plain(v) for k, v in state.items()}


def _plain(v: Any, depth: int = 0) -> Any:
    if depth > 8:
        return None
    if isinstance(v, _Inert):
        return v.plain()
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, float) and not math.isfinite(v):
        return v
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x, depth + 1) for k, x in list(v.items())[:200]}
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in list(v)[:200]]
    return str(v)


def read_training_args(path: Path) -> tuple[dict[str, Any], str | None]:
    """Return (config, note). The note explains why nothing was read (torch missing, refused names)."""
    if not available("torch"):
        return {}, f"{path}: skipped (torch not installed; pip install 'autopsy[replay]' to read training_args.bin)"
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        names = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged zip/pickle: report, never crash
        return {}, f"{path}: not a readable torch file ({type(exc).__name__}: {str(exc)[:120]})"
    refused = [n for n in names if not n.startswith(ALLOWED_PREFIXES)]
    if refused:
        return {}, f"{path}: refused to load: it references {', '.join(sorted(refused)[:5])} (not on the allowlist)"
    stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {"_qualname": n}), n) for n in names]
    try:
        with safe_globals(stubs):
            obj = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        return {}, f"{path}: could not be read safely ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    plain = _plain(obj)
    if not isinstance(plain, dict):
        return {}, f"{path}: holds {type(obj).__name__}, not TrainingArguments"
    config = {k: v for k, v in plain.items() if not k.startswith("_")}
    config["_trainer_args_class"] = getattr(type(obj), "_qualname", type(obj).__name__)
    return config, None
