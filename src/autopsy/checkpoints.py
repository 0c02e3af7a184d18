"""Checkpoints without torch: find them, read safetensors headers, scan weights for NaN/Inf.

A ``.safetensors`` file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets) and raw
little-endian data, so each tensor is memory-mapped and checked in bounded chunks through its bit pattern (an
all-ones exponent is Inf or NaN, for float16, bfloat16, float32 and float64 alike). Memory stays bounded whatever
the checkpoint's size, and bfloat16, which numpy cannot represent, is checked as well. ``pytorch_model.bin`` files
are never unpickled. Both ``analyze`` (the ``weights_nonfinite`` detector, the restart advice) and replay use this
module; loading a model for replay is :mod:`autopsy.replay.checkpoint`'s.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autopsy.errors import InputError, UnreadableError
from autopsy.findings import Finding, Severity
from autopsy.runinfo import Damage, RunInfo, WeightCheck

__all__ = [
    "CHECKPOINT_DIR",
    "WeightScan",
    "check_headers",
    "check_run_checkpoints",
    "checkpoint_step",
    "find_checkpoints",
    "header_problem",
    "is_adapter",
    "restart_point",
    "safetensors_header",
    "scan_weights",
    "weights_finding",
]

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # HF Trainer's checkpoint directories

# dtype -> (unsigned view, exponent mask): a value whose exponent bits are all ones is Inf or NaN
_EXPONENT = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_CHUNK_BYTES = 64 << 20  # bounded memory per read: 64 MiB of a tensor at a time


@dataclass
class WeightScan:
    """What a scan of one checkpoint found."""

    path: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor name -> count of NaN/Inf values
    damage: list[Damage] = field(default_factory=list)
    unscanned: list[str] = field(default_factory=list)  # weight files we will not read (pickles)

    @property
    def finite(self) -> bool:
        """True when every tensor read is finite and nothing was damaged."""
        return not self.nonfinite and not self.damage


def safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UnreadableError(f"{p}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise UnreadableError(f"{p}: not a safetensors file (header length {n} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise UnreadableError(f"{p}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnreadableError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UnreadableError(f"{p}: not a safetensors file")
    return header, 8 + n


_ITEMSIZE = {  # safetensors dtype -> bytes per element
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3"), 1),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 2),
    **dict.fromkeys(("I32", "U32", "F32"), 4),
    **dict.fromkeys(("I64", "U64", "F64"), 8),
}


def header_problem(path: str | os.PathLike[str]) -> Damage | None:
    """The cheap check of one safetensors file: its header parses, every entry's offsets fit its dtype and shape,
    and the file is as long as the largest data offset says. Reads the header only (a few KB), never the data."""
    p = Path(path)
    try:
        header, start = safetensors_header(p)
        size = p.stat().st_size
    except (UnreadableError, OSError) as exc:
        return Damage(file=str(p), offset=0, problem=str(exc).split(": ", 1)[-1], salvaged="nothing")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        why = _entry_problem(meta)
        if why:
            return Damage(file=str(p), offset=8, problem=f"header entry {name!r}: {why}", salvaged="nothing")
        end = max(end, int(meta["data_offsets"][1]))
    if start + end > size:
        return Damage(
            file=str(p),
            offset=size,
            problem=f"cut off: {size} of {start + end} bytes (the header's largest data offset)",
            salvaged="nothing",
        )
    if start + end < size:
        return Damage(
            file=str(p),
            offset=start + end,
            problem=f"{size - start - end} bytes after the last tensor (a loader refuses the file)",
            salvaged="nothing",
        )
    return None


def _entry_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not an object"
    offsets, shape, dtype = meta.get("data_offsets"), meta.get("shape"), meta.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        return "data_offsets is not a pair of integers"
    if not 0 <= offsets[0] <= offsets[1]:
        return f"data_offsets {offsets} run backwards"
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return "shape is not a list of sizes"
    if dtype not in _ITEMSIZE:
        return f"unknown dtype {dtype!r}"
    count = 1
    for d in shape:
        count *= d
    if count * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        return f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}"
    return None


def check_headers(info: RunInfo) -> None:
    """The cheap check of every checkpoint's safetensors files (:func:`header_problem`), into ``info``: damage in
    ``info.damage``, the step in ``info.bad_checkpoints`` (never a restart point). A few KB read per file."""
    for step, d in sorted(info.checkpoints.items()):
        if step in info.bad_checkpoints or not os.path.isdir(d):
            continue
        for f in _weight_files(Path(d)):
            problem = header_problem(f)
            if problem is not None:
                info.damage.append(problem)
                info.bad_checkpoints[int(step)] = f"{f.name} is damaged: {problem.problem}"
                break


def _scan_file(path: Path, scan: WeightScan) -> None:
    try:
        header, start = safetensors_header(path)
    except UnreadableError as exc:
        scan.damage.append(Damage(file=str(path), offset=0, problem=str(exc).split(": ", 1)[-1], salvaged="nothing"))
        return
    size = path.stat().st_size
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    )
    for name, meta in entries:
        scan.tensors += 1
        begin, end = (start + int(o) for o in meta["data_offsets"])
        if end > size:
            scan.damage.append(
                Damage(
                    file=str(path),
                    offset=begin,
                    problem=f"tensor {name} is cut off (file ends at byte {size})",
                    salvaged=f"{scan.tensors - 1} tensors before it",
                )
            )
            return
        view = _EXPONENT.get(meta.get("dtype", ""))
        if view is None or end == begin:
            continue  # integer/bool tensors cannot be non-finite
        utype, mask = view
        itemsize = np.dtype(utype).itemsize
        count = (end - begin) // itemsize
        mm = np.memmap(path, dtype=utype, mode="r", offset=begin, shape=(count,))
        step = max(1, _CHUNK_BYTES // itemsize)
        bad = 0
        for i in range(0, count, step):  # one bounded chunk at a time (a loop over chunks, not values)
            chunk = mm[i : i + step]
            bad += int(np.count_nonzero((chunk & utype(mask)) == utype(mask)))
        del mm
        if bad:
            scan.nonfinite[name] = bad


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def scan_weights(path: str | os.PathLike[str]) -> WeightScan:
    """Scan every safetensors file of a checkpoint directory (or one file) for NaN/Inf, one tensor at a time."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such checkpoint: {p}")
    scan = WeightScan(path=str(p))
    files = _weight_files(p)
    scan.files = [str(f) for f in files]
    if p.is_dir():
        scan.unscanned = sorted(
            str(f) for f in p.glob("*.bin") if f.name.startswith(("pytorch_model", "adapter_model"))
        )
    for f in files:
        _scan_file(f, scan)
    return scan


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-N`` directory name (None for any other name)."""
    m = CHECKPOINT_DIR.match(name)
    return int(m.group(1)) if m else None


def find_checkpoints(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """``checkpoint-N`` directories of a run, by step."""
    root = Path(run_dir)
    if not root.is_dir():
        return {}
    found = ((checkpoint_step(child.name), child) for child in root.iterdir() if child.is_dir())
    return dict(sorted((s, c) for s, c in found if s is not None))


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True for a PEFT adapter directory (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def weights_finding(path: str, nonfinite: dict[str, int], *, tensors: int, step: int | None = None) -> Finding | None:
    """``weights_nonfinite`` for a checkpoint whose scan found ``nonfinite`` (tensor -> count); None when empty."""
    if not nonfinite:
        return None
    names = sorted(nonfinite)
    count = int(sum(nonfinite.values()))
    shown = names[0] if len(names) == 1 else f"{len(names)} tensors, e.g. {names[0]}"
    return Finding(
        signature="weights_nonfinite",
        severity=Severity.CRITICAL,
        step=step,
        summary=f"{os.path.basename(path.rstrip('/'))} holds {count} NaN/Inf weight values ({shown})",
        evidence={
            "tensors": names,
            "count": count,
            "per_tensor": dict(sorted(nonfinite.items())),
            "checkpoint": path,
            "tensors_scanned": tensors,
        },
        cause="the weights were poisoned by a non-finite update before this checkpoint was saved (or the file is corrupt)",
        fix="restart from the last checkpoint whose weights are all finite; replay the steps after it to find the cause",
        detector="weights_nonfinite",
    )


def check_run_checkpoints(info: RunInfo, first_bad_step: int | None, *, max_scans: int = 8) -> None:
    """Scan the checkpoints of a run that matter, into ``info``: damage, unusable checkpoints, non-finite weights.

    Around the first non-finite step of the logs: the first checkpoint at or after it, then backwards from it to the
    last all-finite one; with no non-finite step, the latest checkpoint only (at most ``max_scans``). A checkpoint
    whose weights are cut off or unreadable, or hold NaN/Inf, goes into ``info.bad_checkpoints`` (never a restart
    point); its damage into ``info.damage``.
    """
    check_headers(info)
    cks = {int(s): d for s, d in info.checkpoints.items() if os.path.isdir(d) and int(s) not in info.bad_checkpoints}
    steps = sorted(cks)
    if not steps:
        return
    if first_bad_step is None:
        order = steps[-1:]
    else:
        order = [s for s in steps if s >= first_bad_step][:1] + [s for s in reversed(steps) if s < first_bad_step]
    for s in order[:max_scans]:
        scan = scan_weights(cks[s])
        info.weight_scans[s] = WeightCheck(
            path=cks[s], tensors=scan.tensors, nonfinite=dict(scan.nonfinite), damaged=bool(scan.damage)
        )
        info.damage.extend(scan.damage)
        if scan.damage:
            info.bad_checkpoints[s] = "its weights file is damaged"
        elif scan.nonfinite:
            info.bad_checkpoints[s] = "its weights hold NaN/Inf"
        elif scan.tensors and (first_bad_step is None or s < first_bad_step):
            break  # the last all-finite checkpoint before the failure: nothing older matters


def restart_point(info: RunInfo | None, first_bad_step: int) -> dict[str, Any]:
    """The last checkpoint saved before ``first_bad_step`` and how many steps must be redone.

    Checkpoints known to be unusable (non-finite weights, a damaged file: ``RunInfo.bad_checkpoints``) are skipped.
    """
    out: dict[str, Any] = {"restart_checkpoint": None, "restart_step": None, "steps_to_redo": int(first_bad_step)}
    known = dict(info.checkpoints) if info is not None else {}
    best = _checkpoint_step(info.best_checkpoint) if info is not None and info.best_checkpoint else None
    if best is not None and best not in known:  # trainer_state's best_model_checkpoint, its directory not here
        known[best] = str(info.best_checkpoint) if info is not None else ""
    bad = info.bad_checkpoints if info is not None else {}
    good = [s for s in sorted(known) if s < first_bad_step and s not in bad]
    if good:
        step = good[-1]
        out.update(restart_checkpoint=known[step], restart_step=int(step), steps_to_redo=int(first_bad_step - step))
    return out


def _checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-N`` directory name (any parent path), None for another name."""
    m = CHECKPOINT_DIR.match(os.path.basename(str(name).rstrip("/\\")))
    return int(m.group(1)) if m else None
