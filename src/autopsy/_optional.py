"""Lazy import of optional, heavy dependencies with an actionable error."""

from __future__ import annotations

import importlib
from types import ModuleType

from autopsy.errors import MissingDependencyError

# module -> the extra that installs it
_EXTRA_OF = {
    "torch": "replay",
    "transformers": "replay",
    "safetensors": "replay",
    "accelerate": "replay",
    "peft": "replay",
    "tensorboard": "tensorboard",
    "tbparse": "tensorboard",
    "google_crc32c": "tensorboard",
    "wandb": "wandb",
    "pyarrow": "wandb",
}


def require(module: str, *, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        root = module.split(".")[0]
        extra = _EXTRA_OF.get(root, "all")
        what = f" to {purpose}" if purpose else ""
        raise MissingDependencyError(f"{root} is needed{what}: pip install 'autopsy[{extra}]' ({exc})") from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it when already known absent)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
