"""How a run ended: a crash at the end of its log, a stop short of its planned steps, an fp16 loss scale that
collapsed, and a log autopsy could not read.

The console importer puts what the end of the log says into ``RunInfo.crash`` (kind, exception, message, OOM
sizes, the last lines); these detectors read it from ``info``, so a log with no metrics at all is still diagnosed
(they require no series).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.runinfo import RunInfo
from autopsy.series import last_step, series

__all__ = ["abrupt_end", "crash", "loss_scale_collapse", "unreadable_log"]

_CAUSE_FIX: dict[str, tuple[str, str]] = {
    "oom": (
        "the GPU ran out of memory: activations (batch size x sequence length), weights and optimizer states "
        "did not fit",
        "lower per_device_train_batch_size and raise gradient_accumulation_steps to keep the effective batch; "
        "shorten the sequence length; gradient_checkpointing=True; bf16; LoRA/8-bit optimizer",
    ),
    "device_assert": (
        "a CUDA kernel assertion: almost always an index out of range, such as a label id >= "
        "num_classes / vocab size (or < 0 other than -100), or a token id outside the embedding",
        "rerun with CUDA_LAUNCH_BLOCKING=1 (or on the CPU) to get the real stack; check label and "
        "token id ranges against num_labels / vocab_size after adding tokens (resize_token_embeddings)",
    ),
    "nccl_timeout": (
        "a collective (all-reduce) waited past the NCCL timeout: one rank hung or died (OOM, data "
        "loader stall, uneven batches, a rank doing extra work such as eval/saving alone)",
        "find the rank that stopped first in its own log; set TORCH_NCCL_ASYNC_ERROR_HANDLING=1 and "
        "NCCL_DEBUG=INFO; raise ddp_timeout only if a long step is expected (saving, eval)",
    ),
    "killed": (
        "the process was killed with SIGKILL (exit 137): most often the host's OOM killer (CPU RAM: data "
        "loading, replay buffers, a dataset held in memory), or the scheduler's time/memory limit",
        "check `dmesg`/the scheduler for an oom-kill; lower dataloader workers, stream the dataset, raise "
        "the job's memory limit; resume from the last checkpoint",
    ),
    "disk_full": (
        "the disk filled up while writing (checkpoints, logs, cache)",
        "free space or point output_dir/HF_HOME elsewhere; save_total_limit=2; save_only_model=True",
    ),
    "interrupted": (
        "the run was stopped by hand (KeyboardInterrupt / SIGINT)",
        "nothing failed; resume from the last checkpoint if the run should go on",
    ),
    "other": (
        "the training process raised an exception and exited",
        "read the exception and the last frames of "
        "the traceback in the evidence; fix and resume from the last checkpoint",
    ),
}


def _crash_info(info: RunInfo | None) -> dict[str, Any] | None:
    """The crash as flat evidence (its OOM sizes beside the other keys); a W&B exit code 137 is a kill."""
    if info is None:
        return None
    if info.crash is not None:
        return info.crash.to_dict() | {"kind": info.crash.kind}
    if info.exit_code in (137, -9):
        return {"kind": "killed", "message": f"process exit code {info.exit_code}"}
    return None


def _last_step(frame: pd.DataFrame) -> int | None:
    return last_step(frame, "train/")


@detector(signatures=("crash",), tags=("runtime",))
def crash(frame: pd.DataFrame, *, info: RunInfo | None = None) -> list[Finding]:
    """The log ends in a traceback or a kill.

    Signature: after the last metric line the log shows a CUDA OOM, a device-side assert, an NCCL watchdog
    timeout, a SIGKILL (exit 137), a full disk, a KeyboardInterrupt or another exception (evidence.kind).
    Likely causes: per kind: batch/sequence length too large, a label or token id out of range, a hung rank,
    host memory exhausted, disk full.
    What to check next: the exception and last lines in the evidence; for an OOM the memory estimate and the
    knob that buys the most headroom.
    """
    c = _crash_info(info)
    if c is None:
        return []
    kind = str(c.get("kind", "other"))
    cause, fix = _CAUSE_FIX.get(kind, _CAUSE_FIX["other"])
    evidence: dict[str, Any] = {k: v for k, v in c.items() if v is not None}
    last = c.get("last_step")
    if last is None:
        last = _last_step(frame)
    evidence["last_step"] = last
    if info is not None and info.max_steps:
        evidence["max_steps"] = int(info.max_steps)
    what = {
        "oom": "CUDA out of memory",
        "device_assert": "a device-side assert",
        "nccl_timeout": "an NCCL timeout",
        "killed": "a SIGKILL (host OOM killer?)",
        "disk_full": "a full disk",
        "interrupted": "a KeyboardInterrupt",
    }
    desc = what.get(kind) or (c.get("exception") or "an exception")
    if kind == "oom":
        sizes = [
            f"{k.replace('_gib', '').replace('_', ' ')} {c[k]} GiB"
            for k in ("tried_to_allocate_gib", "total_capacity_gib", "already_allocated_gib", "free_gib")
            if k in c
        ]
        if sizes:
            desc += " (" + ", ".join(sizes) + ")"
        if info is not None:
            from autopsy.memory_estimate import estimate_from_config

            est = estimate_from_config(info.config, gpu_total_gib=c.get("total_capacity_gib"))
            if est is not None:
                evidence["memory_estimate"] = est
                if est.get("best_knob"):
                    fix = (
                        f"most headroom: {est['best_knob']} (saves ~{est['savings_gib'][est['best_knob']]} GiB); " + fix
                    )
    if kind == "other" and c.get("exception"):
        cause = f"the training process raised {c['exception']}: {str(c.get('message', ''))[:160]}"
    where = f" after step {last}" if last is not None else ""
    severity = Severity.WARNING if kind == "interrupted" else Severity.CRITICAL
    if c.get("message_cut"):
        severity = Severity.ERROR
        evidence["confidence"] = "low: the crash message is cut off"
    return [
        Finding(
            signature="crash",
            severity=severity,
            step=last,
            metric=None,
            summary=f"the run died{where}: {desc}",
            evidence=evidence,
            cause=cause,
            fix=fix,
        )
    ]


def _nonfinite_at_end(frame: pd.DataFrame) -> bool:
    for metric in ("train/loss", "train/grad_norm", "eval/loss"):
        s = series(frame, metric)
        if len(s) and not np.isfinite(s.to_numpy()[-1]):
            return True
    return False


def _planned_from_epochs(frame: pd.DataFrame, info: RunInfo) -> int | None:
    """Planned steps when only epochs were set (max_steps=-1): num_train_epochs x the logged steps per epoch."""
    epochs = info.num_train_epochs
    ep = series(frame, "train/epoch")
    if not epochs or epochs <= 0 or len(ep) < 2:
        return None
    last_epoch = float(ep.to_numpy()[-1])
    if not np.isfinite(last_epoch) or last_epoch <= 0:
        return None
    return int(round(epochs * int(ep.index[-1]) / last_epoch))


@detector(signatures=("abrupt_end",), tags=("runtime",))
def abrupt_end(frame: pd.DataFrame, *, info: RunInfo | None = None) -> list[Finding]:
    """The run stops short of its planned steps with no final record.

    Signature: the log ends in a crash, or the source knows the run's plan (a printed max_steps / Total
    optimization steps, a W&B exit) and the last step is short of it with no final summary; no NaN at the end
    (the NaN detectors explain those). A checkpoint's trainer_state.json saved mid-run is not an end.
    Likely causes: OOM, preemption, a kill by the scheduler or the host's OOM killer.
    What to check next: the crash evidence or the scheduler's log; resume from the last checkpoint.
    """
    if info is None or info.finished is True or info.summary.get("train_runtime") is not None:
        return []
    last = _last_step(frame)
    c = _crash_info(info)
    if (last is None and c is None) or _nonfinite_at_end(frame):
        return []
    planned = info.max_steps or _planned_from_epochs(frame, info)
    if c is not None and c.get("kind") == "interrupted":
        return []
    short = planned is not None and last is not None and last < planned
    # without a crash, only a source that saw the run's start (or its exit) can say it stopped early
    if c is None and not (short and info.finished is False):
        return []
    evidence: dict[str, Any] = {"last_step": last, "max_steps": planned}
    if planned is not None and not info.max_steps:
        evidence["max_steps_from"] = "num_train_epochs x logged steps per epoch"
    if short:
        evidence["share_done"] = evidence_value(last / planned)  # type: ignore[operator]
    if c is not None:
        evidence["crash_kind"] = c.get("kind")
    if info.checkpoints and last is not None:
        saved = [s for s in info.checkpoints if s <= last]
        evidence["last_checkpoint_step"] = max(saved) if saved else None
    of = f" of {planned}" if planned else ""
    why = f" ({c.get('kind')})" if c is not None else " with no final record"
    return [
        Finding(
            signature="abrupt_end",
            severity=Severity.ERROR,
            step=last,
            end_step=None,
            metric=None,
            summary=(
                f"the run stopped at step {last}{of}{why}"
                if last is not None
                else f"the run stopped before logging a step{why}"
            ),
            evidence=evidence,
            cause="the process ended before its planned steps: "
            + ("see the crash finding" if c is not None else "OOM, preemption or a kill that printed nothing"),
            fix="resume from the last checkpoint after fixing the cause; with no message, check the "
            "scheduler's log and `dmesg` for an oom-kill",
        )
    ]


@detector(requires=("train/loss_scale",), signatures=("loss_scale_collapse",), tags=("numerics", "precision"))
def loss_scale_collapse(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    max_final_scale: float = 8.0,
    min_halvings: int = 3,
    min_overflow_streak: int = 3,
) -> list[Finding]:
    """The fp16 loss scale keeps halving: every step overflows and is skipped.

    Signature: the dynamic loss scale ends at or below `max_final_scale` after falling by at least
    `min_halvings` halvings, or sits pinned there while overflow messages repeat (`min_overflow_streak`).
    Scalers start at 2**16 (apex, torch GradScaler, DeepSpeed; some at 2**32), so a scale of 8 is 13+ halvings
    down; a high scale that halves a few times at the start is the normal search, and a low but constant scale
    with no overflows is stable (bf16 runs print 1.0).
    Likely causes: fp16 on a model whose activations or gradients exceed fp16's range (max 65504).
    What to check next: train in bf16; if fp16 is a must, lower the LR, clip, and find the overflowing layer.
    """
    s = series(frame, "train/loss_scale")
    v = s.to_numpy(dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < 2:
        return []
    final, peak = float(v[-1]), float(v.max())
    if final > max_final_scale:
        return []
    halvings = math.log2(peak / final) if final > 0 else float("inf")
    ov = series(frame, "train/overflow")
    streak = 0
    if len(ov):
        steps_ov = set(ov.index[ov.to_numpy() > 0].tolist())
        tail_steps = s.index.to_numpy()[::-1]
        for st in tail_steps:
            if int(st) in steps_ov:
                streak += 1
            else:
                break
    if halvings < min_halvings and streak < min_overflow_streak:
        return []
    steps = s.index.to_numpy()
    drop = np.flatnonzero(np.diff(s.to_numpy()) < 0)
    first = int(steps[drop[0] + 1]) if drop.size else int(steps[0])
    evidence = {
        "final_scale": evidence_value(final),
        "peak_scale": evidence_value(peak),
        "halvings": evidence_value(halvings),
        "overflow_streak_at_end": streak,
        "points": int(v.size),
    }
    if info is not None and info.loss_scale_at_minimum:
        evidence["scaler_at_minimum"] = True
    loss = series(frame, "train/loss")
    nan_loss = bool(len(loss) and not np.isfinite(loss.to_numpy()[-1]))
    severity = Severity.CRITICAL if final <= 1.0 or nan_loss or streak >= min_overflow_streak else Severity.ERROR
    return [
        Finding(
            signature="loss_scale_collapse",
            severity=severity,
            step=first,
            end_step=int(steps[-1]),
            metric="train/loss_scale",
            summary=f"fp16 loss scale fell to {evidence_value(final)} ({halvings:.0f} halvings from "
            f"{evidence_value(peak)}); steps overflow and are skipped",
            evidence=evidence,
            cause="fp16 overflow on (nearly) every step: gradients or activations exceed fp16's range, so "
            "the dynamic scaler keeps halving and the optimizer skips the updates",
            fix="train in bf16 (bf16=True) instead of fp16; otherwise lower the LR, clip gradients, and "
            "find the overflowing layer (autopsy replay)",
        )
    ]


@detector(signatures=("insufficient_data",), tags=("runtime",))
def unreadable_log(frame: pd.DataFrame, *, info: RunInfo | None = None) -> list[Finding]:
    """A console log with no line in a format autopsy reads.

    Signature: the console importer found no metric line, no loss-scale message and no crash in a log.
    Likely causes: a logger format autopsy does not know, or a log of something other than training.
    What to check next: the note names the file; point autopsy at the run's trainer_state.json, TensorBoard
    or W&B files, or report the format.
    """
    if info is None or not info.unread_logs or len(frame):
        return []
    u = info.unread_logs[0]
    return [
        Finding(
            signature="insufficient_data",
            severity=Severity.INFO,
            summary=f"no metric line autopsy reads in {u.file} ({u.lines} lines)",
            evidence={"file": u.file, "lines": u.lines},
            cause="an unknown log format, or not a training log",
            fix="analyze the run's trainer_state.json / TensorBoard / W&B files, or report the format",
        )
    ]
