"""How a run ended: a crash at the end of its log, a stop short of its planned steps, an fp16 loss scale that
collapsed, and a log autopsy could not read.

The console importer puts what the end of the log says into ``RunInfo.crash`` (kind, exception, message, OOM
sizes, the last lines); these detectors read it from ``info``, so a log with no metrics at all is still diagnosed
(they require no series).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._registry import detector
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.runinfo import RunInfo
from autopsy.series import last_step, series

__all__ = ["abrupt_end", "crash"]

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
        message = str(c.get("message", "")).removeprefix(f"{c['exception']}:").strip()  # the log's line names it too
        cause = f"the training process raised {c['exception']}" + (f": {message[:160]}" if message else "")
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


def _stopped_early_with_summary(frame: pd.DataFrame, info: RunInfo, share: float) -> dict[str, Any] | None:
    """The final summary record says train() returned at a step well short of max_steps, and no early stopping
    explains it (an eval loss whose best is followed by evals that did not improve)."""
    last = info.global_step or _last_step(frame)
    if "trainer_state" not in info.sources or not info.max_steps or last is None or last >= share * info.max_steps:
        return None  # only HF's own record states both the plan (max_steps) and the return from train()
    e = series(frame, "eval/loss", finite=True).to_numpy()
    if e.size >= 3 and int(np.argmin(e)) <= e.size - 3:
        return None  # patience ran out: early stopping, not an abrupt end
    return {
        "last_step": int(last),
        "max_steps": int(info.max_steps),
        "share_done": evidence_value(last / info.max_steps),
        "final_summary": True,
    }


def _stopped_short_counter(info: RunInfo) -> dict[str, Any] | None:
    """A console log whose last progress counter stops short of its total, with no crash and no final record."""
    logs = [lg for lg in info.logs if lg.last_counter is not None]
    if not logs or info.crash is not None or info.finished:
        return None
    i, n = logs[-1].last_counter  # type: ignore[misc]
    if not 0 < i < n:
        return None
    return {"last_counter": f"{i}/{n}", "file": logs[-1].file}


def _abrupt(summary: str, evidence: dict[str, Any], step: int | None, severity: Severity, cause: str) -> Finding:
    return Finding(
        signature="abrupt_end",
        severity=severity,
        step=step,
        end_step=None,
        metric=None,
        summary=summary,
        evidence=evidence,
        cause=cause,
        fix="resume from the last checkpoint after fixing the cause; with no message, check the scheduler's "
        "log and `dmesg` for an oom-kill",
    )


@detector(signatures=("abrupt_end",), tags=("runtime",))
def abrupt_end(frame: pd.DataFrame, *, info: RunInfo | None = None, early_share: float = 0.9) -> list[Finding]:
    """The run stops short of its planned steps.

    Signature: the log ends in a crash; or the source knows the run's plan (a printed max_steps / Total optimization
    steps, a W&B exit) and the last step is short of it with no final summary; or HF's trainer_state.json, which
    states both the plan (max_steps) and the return from train() (its final summary record), says train() returned
    before `early_share` (90%) of max_steps with no early stopping to explain it (an eval loss that stopped improving
    for its last evals); or a console log's last progress counter stops short of its total
    (``[83264/97631]``) with no error and no final record: the job was killed silently (a warning: a log can also be
    cut). A run known only from console logs that stops short of a printed plan with no error is a warning for the
    same reason (a pasted or tailed log ends where the copy ended); a crash, or a structured source, makes it an
    error. No NaN at the end (the NaN detectors explain those). A checkpoint's trainer_state.json saved mid-run is
    not an end, and neither is the last log of a run still being written (RunInfo.in_progress).
    Likely causes: OOM, preemption, a kill by the scheduler or the host's OOM killer, a time limit.
    What to check next: the crash evidence or the scheduler's log; resume from the last checkpoint.
    """
    if info is None or _nonfinite_at_end(frame):
        return []
    if info.finished is True or info.summary.get("train_runtime") is not None:
        early = _stopped_early_with_summary(frame, info, early_share)
        if early is None:
            return []
        return [
            _abrupt(
                f"training returned at step {early['last_step']} of {early['max_steps']} "
                f"({float(early['share_done']):.0%}) with no early stopping to explain it",
                early,
                early["last_step"],
                Severity.ERROR,
                "the run was stopped before its plan: a time limit, a callback, or max_steps changed on resume",
            )
        ]
    last = _last_step(frame)
    c = _crash_info(info)
    if c is not None and c.get("kind") == "interrupted":
        return []
    if c is None and info.in_progress:
        return []  # still being written (RunInfo.in_progress): not ended, so not ended early
    planned = info.max_steps or _planned_from_epochs(frame, info)
    short = planned is not None and last is not None and last < planned
    if c is None and not (short and info.finished is False):
        counter = _stopped_short_counter(info)
        if counter is None:
            return []
        return [
            _abrupt(
                f"the log stops at {counter['last_counter']} of a progress counter, with no error and no final record",
                {**counter, "last_step": last},
                last,
                Severity.WARNING,
                "the process ended part-way with no message: a kill (OOM killer, scheduler, preemption), or "
                "the log was cut",
            )
        ]
    if last is None and c is None:
        return []
    return [_stopped_short(info, c, last, planned, short=short)]


def _stopped_short(
    info: RunInfo, c: dict[str, Any] | None, last: int | None, planned: int | None, *, short: bool
) -> Finding:
    """The abrupt_end finding of a run that crashed, or stopped short of its plan with no final record."""
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
    why = f" ({c.get('kind')})" if c is not None else " with no final record"
    summary = (
        f"the run stopped at step {last}{f' of {planned}' if planned else ''}{why}"
        if last is not None
        else f"the run stopped before logging a step{why}"
    )
    console_only = c is None and bool(info.sources) and set(info.sources) <= {"console"}
    return _abrupt(
        summary,
        evidence,
        last,
        Severity.WARNING if console_only else Severity.ERROR,
        "the process ended before its planned steps: "
        + ("see the crash finding" if c is not None else "OOM, preemption or a kill that printed nothing")
        + (", or the log was cut where it was copied" if console_only else ""),
    )
