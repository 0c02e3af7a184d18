"""What ``autopsy replay PATH`` replays: the failing step, its batch, and the weights from before it (torch-free).

The failing step is the first non-finite loss or gradient norm the run recorded, asked of its sources in the order
of trust: the callback's log (``autopsy/losses.jsonl``: every optimizer step, the pre-clip norm), then
``trainer_state.json`` (every ``logging_steps``), then TensorBoard. Its batch is the recorded file that holds that
step (the callback's non-finite dump first); the other recorded files (loss-spike dumps) are listed as candidates, not
replayed. The weights are the ones the callback saved before that step's update, else the last checkpoint before it
whose weights are all finite.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.checkpoints import find_checkpoints, is_adapter, safetensors_header, scan_weights
from autopsy.errors import AutopsyError, InputError
from autopsy.recording import LOSSES, RECORD_DIR, read_run_meta, record_dir, recorded_batches, weights_before

__all__ = ["Target", "batch_metadata", "first_nonfinite", "resolve", "run_dir_of"]


@dataclass
class Target:
    """The checkpoint, batch file and step one replay runs on, and how they were chosen."""

    checkpoint: Path
    batch: Path
    step: int | None
    run_dir: Path | None = None
    first_bad: dict[str, Any] = field(default_factory=dict)  # {"step": N, "source": ..., "by_source": {...}}
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the other recorded batch files
    restart_from: str | None = None
    notes: list[str] = field(default_factory=list)


def run_dir_of(path: Path) -> Path | None:
    """The training output dir a path belongs to (itself, a checkpoint's parent, or above ``autopsy/``)."""
    model = (path / "config.json").is_file() or is_adapter(path)  # a checkpoint: its run is above it
    for cand in (None if model else path, path.parent, path.parent.parent if path.parent.name == RECORD_DIR else None):
        if (
            cand is not None
            and cand.is_dir()
            and (record_dir(cand).is_dir() or (cand / "trainer_state.json").is_file() or find_checkpoints(cand))
        ):
            return cand
    return None


def batch_metadata(path: Path) -> dict[str, Any]:
    """A recorded batch file's metadata (reason, first_bad_step, trigger_step, steps), read from its header."""
    try:
        header, _ = safetensors_header(path)
    except Exception:
        return {}
    meta = header.get("__metadata__") or {}
    out: dict[str, Any] = {"file": str(path), "reason": meta.get("reason") or "recorded"}
    for key in ("first_bad_step", "trigger_step"):
        v = str(meta.get(key) or "")
        out[key] = int(v) if v.isdigit() else None
    try:
        steps = json.loads(meta.get("steps") or "[]")
        out["steps"] = [int(s) for s in steps if isinstance(s, int)]
    except (ValueError, TypeError):
        out["steps"] = []
    return out


def _first_in(kind: str, files: list[Path], metrics: tuple[str, ...]) -> int | None:
    from autopsy.importers import read_files
    from autopsy.series import first_nonfinite_step

    if not files:
        return None
    try:
        frame = read_files(kind, [str(f) for f in files], run="run")
    except (AutopsyError, ImportError, OSError, ValueError):
        return None
    return first_nonfinite_step(frame, metrics) if len(frame) else None


def _first_in_log(path: Path, pre_clip: bool) -> int | None:
    """The callback's log: the first step whose loss, or (recorded before clipping) grad norm, is non-finite; a step
    the fp16 loss scaler skipped (``"skipped": true``) is no failure."""
    try:
        if path.stat().st_size > (1 << 30):
            return None
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            rec = json.loads(line)
            step, loss = int(rec["step"]), float(rec.get("loss", 0.0))
            norm = float(rec.get("grad_norm", 0.0)) if pre_clip and not rec.get("skipped") else 0.0
        except (ValueError, KeyError, TypeError):
            continue
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return step
    return None


def first_nonfinite(run_dir: Path) -> dict[str, Any]:
    """The first non-finite step of the run, from the most trusted source that shows one:
    ``{"step": N, "source": ..., "by_source": {source: step or None}}`` (empty when no source shows one)."""
    both = ("train/loss", "train/grad_norm")
    pre_clip = read_run_meta(run_dir).get("grad_norm") == "pre_clip"  # older callbacks logged the clipped norm
    states = [run_dir / "trainer_state.json"] if (run_dir / "trainer_state.json").is_file() else []
    if not states:
        cks = find_checkpoints(run_dir)
        states = [
            cks[s] / "trainer_state.json"
            for s in sorted(cks, reverse=True)[:1]
            if (cks[s] / "trainer_state.json").is_file()
        ]
    events = sorted(
        f
        for pat in ("events.out.tfevents.*", "runs/*/events.out.tfevents.*", "logs/events.out.tfevents.*")
        for f in run_dir.glob(pat)
        if f.is_file()
    )
    losses = record_dir(run_dir) / LOSSES
    by: dict[str, int | None] = {}
    if losses.is_file():
        by["autopsy"] = _first_in_log(losses, pre_clip)
    for name, files in (("trainer_state", states), ("tensorboard", events)):
        if files:
            by[name] = _first_in(name, files, both)
    chosen = next(((n, s) for n, s in by.items() if s is not None), None)
    return {"step": chosen[1], "source": chosen[0], "by_source": by} if chosen else {}


def _pick_batch(run_dir: Path, bad: int | None) -> tuple[Path, int | None, list[dict[str, Any]], list[str]]:
    """The recorded file holding step ``bad`` (the non-finite dump first), the step, the other files, notes."""
    metas = [batch_metadata(f) for f in recorded_batches(run_dir).values()]
    metas = [m for m in metas if m]
    if not metas:
        raise InputError(
            f"{run_dir}: no batch to replay: pass --batch FILE (or train with autopsy.callbacks.AutopsyCallback)"
        )
    notes: list[str] = []
    if bad is not None:
        holding = [m for m in metas if bad in m["steps"]]
        holding.sort(key=lambda m: (m["first_bad_step"] != bad, m["reason"] != "nonfinite", m["trigger_step"] != bad))
        if not holding:
            have = ", ".join(
                f"{Path(m['file']).name} ({m['reason']}, steps {m['steps'][:1]}..{m['steps'][-1:]})" for m in metas
            )
            raise InputError(
                f"the first non-finite step is {bad}, but no recorded batch holds it (recorded: {have}); "
                "pass --batch FILE --step N to replay one of them"
            )
        chosen = holding[0]
    else:
        metas.sort(key=lambda m: (m["reason"] != "nonfinite", m["trigger_step"] or 0))
        chosen = metas[0]
        bad = chosen["first_bad_step"] or chosen["trigger_step"]
        notes.append(f"no non-finite step was recorded: replaying the {chosen['reason']} batch of step {bad}")
    others = [m for m in metas if m is not chosen]
    return Path(chosen["file"]), bad, others, notes


def _weights_for(run_dir: Path, bad: int | None, target: Target) -> None:
    cks = find_checkpoints(run_dir)
    if bad is not None:
        cks = {s: c for s, c in cks.items() if s < bad}
    finite = next(((s, cks[s]) for s in sorted(cks, reverse=True) if scan_weights(cks[s]).finite), None)
    if finite:
        target.restart_from = str(finite[1])
    before = weights_before(run_dir)
    if bad is not None and bad in before:
        target.checkpoint = before[bad]
    elif finite:
        target.checkpoint = finite[1]
        if bad is not None and finite[0] < bad - 1:
            gap = bad - 1 - finite[0]
            target.notes.append(
                f"{finite[1].name} is {gap} step{'s' if gap != 1 else ''} before the failing step {bad}: the batch is "
                "replayed on older weights (AutopsyCallback(stop_on='nonfinite') saves the weights from just before it)"
            )
    else:
        raise InputError(f"{run_dir}: no checkpoint with finite weights before step {bad}; pass a checkpoint directory")


def resolve(
    path: str | os.PathLike[str], *, batch: str | os.PathLike[str] | None = None, step: int | None = None
) -> Target:
    """The checkpoint, batch file and step to replay from ``path`` (a checkpoint, or a run's output dir)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    if batch is not None and not Path(batch).is_file():
        raise InputError(f"no such batch file: {batch}")
    is_model = (p / "config.json").is_file() or is_adapter(p)
    run = run_dir_of(p)
    if not is_model and run is None:
        raise InputError(f"{p}: neither a checkpoint (config.json, adapter_config.json) nor a training output dir")
    first = first_nonfinite(run) if run is not None and step is None and batch is None else {}
    bad = step if step is not None else first.get("step")
    candidates: list[dict[str, Any]] = []
    notes: list[str] = []
    if batch is not None:
        chosen = Path(batch)
    elif run is not None and recorded_batches(run):
        chosen, bad, candidates, notes = _pick_batch(run, bad)
    else:
        raise InputError(
            f"{p}: no batch to replay: pass --batch FILE (or train with autopsy.callbacks.AutopsyCallback)"
        )
    target = Target(
        checkpoint=p, batch=chosen, step=bad, run_dir=run, first_bad=first, candidates=candidates, notes=notes
    )
    if not is_model:
        _weights_for(p, bad, target)
    return target
