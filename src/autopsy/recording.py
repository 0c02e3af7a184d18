"""The record :class:`autopsy.callbacks.AutopsyCallback` writes under ``<output_dir>/autopsy/``: one home for its layout.

```
<output_dir>/autopsy/
  losses.jsonl                      every optimizer step's true loss and pre-clip grad norm, one JSON object a line
  run.json                          how the run computed: attention implementation, dtypes, precision flags
  batches-step-<N>.safetensors      the recorded batches around step N (a non-finite step or a spike)
  weights-before-step-<N>/          the weights as they were before the update of step N (safetensors)
```

The callback writes it; the importers (``losses.jsonl`` is a source of its own), discovery and replay read it
through the functions here, never by spelling the names again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "LOSSES",
    "RECORD_DIR",
    "RUN_META",
    "batch_file",
    "is_losses_log",
    "read_run_meta",
    "record_dir",
    "recorded_batches",
    "weights_before",
    "weights_dir",
    "write_run_meta",
]

RECORD_DIR = "autopsy"
LOSSES = "losses.jsonl"
RUN_META = "run.json"
_BATCH = re.compile(r"^batches-step-(\d+)\.safetensors$")
_BEFORE = re.compile(r"^weights-before-step-(\d+)$")


def record_dir(output_dir: str | os.PathLike[str]) -> Path:
    """``<output_dir>/autopsy``."""
    return Path(output_dir) / RECORD_DIR


def batch_file(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the batches recorded for step ``step`` go."""
    return record_dir(output_dir) / f"batches-step-{int(step)}.safetensors"


def weights_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the weights from before the update of step ``step`` go."""
    return record_dir(output_dir) / f"weights-before-step-{int(step)}"


def _numbered(output_dir: str | os.PathLike[str], pattern: re.Pattern[str], *, dirs: bool) -> dict[int, Path]:
    rec = record_dir(output_dir)
    if not rec.is_dir():
        return {}
    found = ((pattern.match(p.name), p) for p in rec.iterdir() if p.is_dir() == dirs)
    return dict(sorted((int(m.group(1)), p) for m, p in found if m))


def recorded_batches(output_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The recorded batch files of a run, by step."""
    return _numbered(output_dir, _BATCH, dirs=False)


def weights_before(output_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The saved pre-update weights of a run, by the step whose update they precede."""
    return _numbered(output_dir, _BEFORE, dirs=True)


def is_losses_log(path: Path) -> bool:
    """True for ``<output_dir>/autopsy/losses.jsonl``."""
    return path.name == LOSSES and path.parent.name == RECORD_DIR


def read_run_meta(output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``run.json`` (empty when absent or unreadable: an older record, or none)."""
    path = record_dir(output_dir) / RUN_META
    try:
        data = (
            json.loads(path.read_text(encoding="utf-8")) if path.is_file() and path.stat().st_size < (1 << 20) else {}
        )
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_run_meta(output_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write ``run.json`` (the callback, at train begin)."""
    path = record_dir(output_dir) / RUN_META
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path
