"""``<output_dir>/autopsy/losses.jsonl``: the true per-step losses recorded by :class:`~autopsy.callbacks.AutopsyCallback`.

HF Trainer's ``logging_nan_inf_filter=True`` logs 0.0 for a window of NaN losses and averages the rest over
``logging_steps``; the callback writes every optimizer step's own loss, NaN included (as the string
``"nan"``), one JSON object a line: ``{"step": 31, "loss": "nan"}``. A line cut off by a crash is reported
and skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from autopsy.frame import make_frame
from autopsy.importers._base import Imported, ReadOptions
from autopsy.recording import is_losses_log
from autopsy.runinfo import Damage, RunInfo

__all__ = ["KIND", "PRIORITY", "claims", "read", "run_roots"]

KIND = "autopsy_log"
SOURCE = "autopsy"
PRIORITY = -1  # every optimizer step's true loss, where HF's NaN filter logged 0.0: it wins every tie


def claims(path: Path) -> int:
    return 2 if is_losses_log(path) else 0


def run_roots(files: list[Path], base: Path) -> dict[Path, Path]:
    """``<output_dir>/autopsy/losses.jsonl`` belongs to ``<output_dir>``."""
    return {f: f.parent.parent for f in files}


MAX_BYTES = 1 << 30


def _number(v: object) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)  # "nan", "inf", "-inf"
        except ValueError:
            return None
    return None


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read the callback's loss log(s) into a canonical frame (metric ``train/loss``)."""
    info = RunInfo(name=run, sources=[SOURCE])
    steps: list[int] = []
    values: list[float] = []
    for path in paths:
        info.files.append(str(path))
        try:
            if path.stat().st_size > MAX_BYTES:
                info.damage.append(Damage(file=str(path), offset=None, problem="larger than 1 GiB", salvaged="nothing"))
                continue
            data = path.read_bytes()
        except OSError as exc:
            info.damage.append(
                Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing")
            )
            continue
        offset = 0
        for line in data.split(b"\n"):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                info.damage.append(
                    Damage(
                        file=str(path),
                        offset=start,
                        problem="a line is not JSON (cut off mid-write?)",
                        salvaged=f"{len(steps)} step(s) before it",
                    )
                )
                continue
            if not isinstance(rec, dict):
                continue
            step, loss = _number(rec.get("step")), _number(rec.get("loss"))
            if step is None or loss is None or not math.isfinite(step) or step < 0:
                continue
            steps.append(int(step))
            values.append(loss)
    frame = make_frame(
        run=run,
        source=SOURCE,
        metric="train/loss",
        step=np.asarray(steps, dtype=np.int64),
        value=np.asarray(values, dtype=np.float64),
        raw_metric="loss",
    )
    return Imported.one(frame, info)
