"""``<output_dir>/autopsy/losses.jsonl``: the true per-step losses recorded by :class:`~autopsy.callbacks.AutopsyCallback`.

HF Trainer's ``logging_nan_inf_filter=True`` logs 0.0 for a window of NaN losses and averages the rest over
``logging_steps``; the callback writes every optimizer step's own loss and pre-clip gradient norm, NaN included (as
the string ``"nan"``), one JSON object a line: ``{"step": 31, "loss": "nan", "grad_norm": "inf"}`` (metrics
``train/loss`` and ``train/grad_norm``). A norm the callback could only read after clipping is written as
``grad_norm_after_clip`` and not read: it is not the norm HF logs. A line cut off by a crash is reported and skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from autopsy.frame import concat_frames, make_frame
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


def _parse(data: bytes, path: Path, info: RunInfo, cols: dict[str, tuple[list[int], list[float]]]) -> None:
    offset = 0
    for line in data.split(b"\n"):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            got = len(cols["loss"][0])
            info.damage.append(
                Damage(
                    file=str(path),
                    offset=start,
                    problem="a line is not JSON (cut off mid-write?)",
                    salvaged=f"{got} step(s) before it",
                )
            )
            continue
        if not isinstance(rec, dict):
            continue
        step = _number(rec.get("step"))
        if step is None or not math.isfinite(step) or step < 0:
            continue
        for key, (steps, values) in cols.items():
            v = _number(rec.get(key))
            if v is not None:
                steps.append(int(step))
                values.append(v)


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read the callback's log(s) into a canonical frame (metrics ``train/loss`` and ``train/grad_norm``)."""
    info = RunInfo(name=run, sources=[SOURCE])
    cols: dict[str, tuple[list[int], list[float]]] = {"loss": ([], []), "grad_norm": ([], [])}
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
        _parse(data, path, info, cols)
    frames = [
        make_frame(
            run=run,
            source=SOURCE,
            metric=f"train/{key}",
            step=np.asarray(steps, dtype=np.int64),
            value=np.asarray(values, dtype=np.float64),
            raw_metric=key,
        )
        for key, (steps, values) in cols.items()
        if steps or key == "loss"
    ]
    return Imported.one(concat_frames(frames) if len(frames) > 1 else frames[0], info)
