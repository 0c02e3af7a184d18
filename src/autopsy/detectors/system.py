"""The machine side of a run: GPU memory headroom, ranks that diverge, a starved GPU, and model FLOPs utilisation.

They read the ``system/`` metrics W&B samples (per GPU: memory %, utilisation %), logged throughput and memory,
the run's card (``gpu_name``/``gpu_count``/``gpu_memory_gib`` in the config) and an OOM's allocator numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.detectors._machine import (
    bad_end,
    card,
    describe_card,
    first_train_step,
    per_rank,
    run_mfu,
    settled,
    tokens_per_second,
    used_ranks,
)
from autopsy.detectors._registry import detector
from autopsy.detectors._stats import runs_of_true
from autopsy.findings import Finding, Severity, evidence_value, num
from autopsy.memory_estimate import estimate_from_config
from autopsy.runinfo import OOM_SIZES, RunInfo, trains_from_scratch
from autopsy.series import last_step, metric_names, series

__all__ = ["input_bound", "low_mfu", "memory_headroom", "rank_imbalance"]

_KNOBS = (
    "lower per_device_train_batch_size and raise gradient_accumulation_steps to keep the effective batch; "
    "shorten the sequence length; gradient_checkpointing=True; a 4-bit base (QLoRA) or an 8-bit optimizer"
)


def _memory_pct(frame: pd.DataFrame, info: RunInfo | None, size: float | None) -> dict[str, pd.Series]:
    """Per-GPU memory in % of the card: W&B's samples, else a logged memory in GiB over the card's ``size``."""
    out = {
        f"system/gpu.{r}.memory_allocated_pct": settled(s, frame, early_share=0.0)  # not while the model loads
        for r, s in per_rank(frame, "memory_allocated_pct").items()
    }
    if out:
        return out
    logged = series(frame, "train/memory_gib", finite=True)
    if size and len(logged):
        out["train/memory_gib"] = logged / size * 100.0
    return out


def _oom(info: RunInfo | None) -> dict[str, float]:
    if info is None or info.crash is None or info.crash.kind != "oom":
        return {}
    return {k: v for k, v in info.crash.sizes.items() if k in OOM_SIZES}


def _knob_fix(info: RunInfo | None, total_gib: float | None) -> tuple[str, dict[str, Any]]:
    """The fix naming the knob that buys the most headroom (the memory estimate), and the estimate's numbers."""
    est = estimate_from_config(info.config, gpu_total_gib=total_gib) if info is not None else None
    if not est or not est.get("best_knob"):
        return _KNOBS, {}
    best = est["best_knob"]
    saved = est["savings_gib"][best]
    fix = f"most headroom: {best} (saves ~{saved} GiB of ~{est['total_gib']} GiB estimated); then: {_KNOBS}"
    return fix, {"best_knob": best, "best_knob_saves_gib": saved, "estimated_total_gib": est["total_gib"]}


@detector(signatures=("memory_headroom",), tags=("machine",))
def memory_headroom(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    limit_pct: float = 90.0,
    critical_pct: float = 97.0,
) -> list[Finding]:
    """GPU memory ran within a tenth of the card, or out of it.

    Signature: the busiest GPU's memory above `limit_pct` (90%: the checklist's "below 90% of VRAM") of the card at
    some step (W&B's per-GPU samples, or a logged memory in GiB with the card's size known), or a CUDA OOM whose
    allocator numbers the log kept. An error when the run then died with memory above `critical_pct` (97%), or on
    an OOM; a note when the run finished anyway (PyTorch's caching allocator holds what it once needed).
    Likely causes: batch size x sequence length too large for the card, long outlier sequences, no gradient
    checkpointing, a full-precision optimizer on a full fine-tune.
    What to check next: the knob the memory estimate says buys the most headroom; the longest sequences.
    """
    oom = _oom(info)
    size = card(info)[2] or oom.get("total_capacity_gib")  # the card's size, else the one the allocator printed
    mem = _memory_pct(frame, info, size)
    peaks = {m: (float(s.max()), int(s.idxmax())) for m, s in mem.items() if len(s)}
    crossed = {
        m: int(s.index[int(np.argmax(s.to_numpy() >= limit_pct))]) for m, s in mem.items() if peaks[m][0] >= limit_pct
    }
    if not crossed and not oom:
        return []
    total = oom.get("total_capacity_gib") or size
    fix, est = _knob_fix(info, total)
    evidence: dict[str, Any] = {"limit_pct": limit_pct, **describe_card(info), **oom, **est}
    died = bad_end(info)
    metric: str | None = None
    step: int | None = None
    if peaks:
        metric, (peak, at) = max(peaks.items(), key=lambda kv: kv[1][0])
        evidence.update(peak_pct=evidence_value(peak), peak_metric=metric, peak_step=at)
        if size:
            evidence["headroom_gib"] = evidence_value(size * (100.0 - peak) / 100.0)
    if crossed:
        metric, step = min(crossed.items(), key=lambda kv: kv[1])
        evidence["crossed_step"] = step
        where = f"{metric} crossed {limit_pct:g}% at step {step} (peak {num(evidence['peak_pct'])}%)"
    else:
        metric, step = None, (info.crash.last_step if info and info.crash else None) or last_step(frame)
        where = "the card ran out of memory"
    if oom:
        severity = Severity.ERROR
        short = oom.get("tried_to_allocate_gib", 0.0) - oom.get("free_gib", 0.0)
        if "tried_to_allocate_gib" in oom and "free_gib" in oom:
            evidence["short_gib"] = evidence_value(short)
        sizes = ", ".join(f"{k.removesuffix('_gib').replace('_', ' ')} {v:g} GiB" for k, v in oom.items())
        where += f"; CUDA OOM ({sizes})"
    elif died:
        severity = Severity.ERROR if evidence.get("peak_pct", 0) >= critical_pct else Severity.WARNING
        where += ", then the run died"
    else:
        severity = Severity.INFO if died is False else Severity.WARNING
    return [
        Finding(
            signature="memory_headroom",
            severity=severity,
            step=step,
            metric=metric,
            summary=where,
            evidence=evidence,
            cause="the step's memory (weights, gradients, optimizer states, activations of batch x sequence length) "
            "fills the card: the next longer batch or a fragmented cache is an OOM",
            fix=fix,
        )
    ]


def _aligned(frame: pd.DataFrame, field: str, ranks: list[int]) -> pd.DataFrame:
    """The settled samples of ``field`` of ``ranks``, one column per rank, on the steps all of them have."""
    cols = {r: settled(s, frame) for r, s in per_rank(frame, field).items() if r in ranks}
    return pd.concat(cols, axis=1, join="inner") if cols else pd.DataFrame()


def _drifting(wide: pd.DataFrame, gap: float, *, min_share: float, min_points: int) -> dict[str, Any] | None:
    """The rank whose distance to the other ranks' median stays above ``gap`` longest (None: none)."""
    best: dict[str, Any] | None = None
    n = len(wide)
    for rank in wide.columns:
        others = wide.drop(columns=rank).median(axis=1)
        dev = (wide[rank] - others).rolling(3, center=True, min_periods=1).median().to_numpy()
        starts, ends = runs_of_true(np.abs(dev) > gap)
        if starts.size == 0:
            continue
        k = int(np.argmax(ends - starts))
        a, b = int(starts[k]), int(ends[k])
        if b - a < max(min_points, min_share * n):
            continue
        level, rest = float(wide[rank].iloc[a:b].median()), float(others.iloc[a:b].median())
        cand = {
            "rank": int(rank),
            "start": int(wide.index[a]),
            "end": int(wide.index[b - 1]),
            "points": b - a,
            "rank_median": level,
            "others_median": rest,
            "gap": abs(level - rest),
        }
        # of two ranks apart, the one that moved away from where it began
        cand["moved"] = abs(level - float(wide[rank].iloc[: max(1, a)].median()))
        if best is None or (cand["points"], cand["moved"]) > (best["points"], best["moved"]):
            best = cand
    return best


@detector(
    requires_any=("system/gpu.1.memory_allocated_pct", "system/gpu.1.util_pct"),
    signatures=("rank_imbalance",),
    tags=("machine",),
)
def rank_imbalance(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    memory_gap_pct: float = 15.0,
    util_gap_pct: float = 25.0,
    min_share: float = 0.1,
    min_points: int = 5,
) -> list[Finding]:
    """One GPU's memory or utilisation diverges from the other ranks'.

    Signature: after the first logged step, one rank's memory sits more than `memory_gap_pct` (15 points of the
    card: rank 0's extra logging and eval buffers stay well under it) or its utilisation more than `util_gap_pct`
    (25 points) away from the median of the other ranks, for more than `min_share` (10%) of the samples in one
    stretch; cards idle all run long (no rank ran there) are left out and noted.
    Likely causes: uneven batches (no length grouping, a last uneven batch), a rank doing extra work (eval,
    saving, logging on rank 0), unbalanced model or pipeline parallelism, a leak on one rank.
    What to check next: per-rank batch shapes and sequence lengths; what that rank does that the others do not.
    """
    used, idle = used_ranks(frame)
    out = []
    for field, gap, what in (
        ("memory_allocated_pct", memory_gap_pct, "memory"),
        ("util_pct", util_gap_pct, "utilisation"),
    ):
        wide = _aligned(frame, field, used)
        if wide.shape[1] < 2:
            continue
        got = _drifting(wide, gap, min_share=min_share, min_points=min_points)
        if got is None:
            continue
        side = "above" if got["rank_median"] > got["others_median"] else "below"
        out.append(
            Finding(
                signature="rank_imbalance",
                severity=Severity.WARNING,
                step=got["start"],
                end_step=got["end"],
                metric=f"system/gpu.{num(got['rank'])}.{field}",
                summary=f"GPU {num(got['rank'])}'s {what} sits {got['gap']:.0f} points {side} the other ranks' "
                f"({got['rank_median']:.0f}% vs {got['others_median']:.0f}%) from step {num(got['start'])}",
                evidence={
                    **{k: evidence_value(v) for k, v in got.items() if k != "moved"},
                    "gap_limit": gap,
                    "ranks": [int(c) for c in wide.columns],
                    "idle_ranks": idle,
                },
                cause="the ranks do not do the same work: uneven batches or sequence lengths, extra work on one "
                "rank (eval, saving, logging), unbalanced model/pipeline parallelism, or a leak on that rank",
                fix="group batches by length (group_by_length=True) or pack sequences; check what that rank does "
                "alone; balance the pipeline stages; compare torch.cuda.memory_summary on two ranks",
            )
        )
    if idle and used:
        out.append(_idle_note(frame, used, idle))
    return out


def _idle_note(frame: pd.DataFrame, used: list[int], idle: list[int]) -> Finding:
    cards = ", ".join(map(str, idle))
    return Finding(
        signature="rank_imbalance",
        severity=Severity.INFO,
        step=first_train_step(frame),
        metric=f"system/gpu.{idle[0]}.util_pct",
        summary=f"GPU(s) {cards} sat idle all run: the job ran on {len(used)} of the {len(used) + len(idle)} cards "
        "the machine has",
        evidence={"used_ranks": used, "idle_ranks": idle},
        cause="the job was launched on fewer cards than the machine has (python instead of torchrun/accelerate "
        "launch, CUDA_VISIBLE_DEVICES), or the other cards belong to other jobs",
        fix="nothing, if the other cards are someone else's; else launch with torchrun --nproc_per_node or "
        "accelerate launch",
    )


def _starved(util: pd.Series, max_util: float, *, min_share: float, min_points: int) -> tuple[int, int] | None:
    """(start, end) positions of the longest stretch below ``max_util`` (smoothed), when long enough."""
    smooth = util.rolling(5, center=True, min_periods=1).median().to_numpy()
    starts, ends = runs_of_true(smooth < max_util)
    if starts.size == 0:
        return None
    k = int(np.argmax(ends - starts))
    a, b = int(starts[k]), int(ends[k])
    return (a, b) if b - a >= max(min_points, min_share * len(util)) else None


@detector(requires_any=("system/gpu.0.util_pct", "train/data_time"), signatures=("input_bound",), tags=("machine",))
def input_bound(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    max_util_pct: float = 60.0,
    data_share: float = 0.3,
    min_share: float = 0.3,
    min_points: int = 5,
) -> list[Finding]:
    """The GPUs wait for data: low utilisation, or most of each iteration spent in the data loader.

    Signature: after the first logged step, the busy GPUs' mean utilisation stays under `max_util_pct` (60%: a
    GPU that computes 40% of the time or less is waiting on something) for more than `min_share` (30%) of the
    samples in one stretch, unless the run's MFU is in the usual range (then the cards do the work); or the
    logged data time is over `data_share` (30%) of the iteration time for as long.
    Likely causes: too few dataloader workers, tokenising or augmenting on the fly, slow storage, no pinned
    memory, a CPU-bound collate; a model so small that Python overhead dominates.
    What to check next: dataloader_num_workers, CPU utilisation (system/cpu_pct), time per batch of the loader alone.
    """
    used, _ = used_ranks(frame)
    util = _aligned(frame, "util_pct", used)
    mean_util = util.mean(axis=1) if util.shape[1] else pd.Series(dtype=float)
    data, it = series(frame, "train/data_time", finite=True), series(frame, "train/iter_time", finite=True)
    share = settled((data / it).dropna(), frame) if len(data) and len(it) else pd.Series(dtype=float)
    for signal, values, limit, below in (("util", mean_util, max_util_pct, True), ("data", share, data_share, False)):
        got = _starved(
            values if below else -values, limit if below else -limit, min_share=min_share, min_points=min_points
        )
        if got is None:
            continue
        a, b = got
        level = float(values.iloc[a:b].median())
        evidence: dict[str, Any] = {"start": int(values.index[a]), "end": int(values.index[b - 1]), "points": b - a}
        rate = run_mfu(frame, info)
        if rate is not None:
            evidence["mfu"] = evidence_value(rate.mfu)
            if signal == "util" and rate.mfu >= 0.15:  # MFU in the fine-tuning range: the cards do the work
                continue
        if signal == "util":
            evidence.update(util_median=evidence_value(level), limit_pct=limit, ranks=used)
            summary = f"mean GPU utilisation {level:.0f}% (under {limit:g}%) from step {num(evidence['start'])}"
        else:
            evidence.update(data_share=evidence_value(level), limit=limit)
            summary = f"the data loader takes {level:.0%} of each iteration from step {num(evidence['start'])}"
        return [
            Finding(
                signature="input_bound",
                severity=Severity.WARNING,
                step=evidence["start"],
                end_step=evidence["end"],
                metric="system/gpu.0.util_pct" if signal == "util" else "train/data_time",
                summary=summary,
                evidence=evidence,
                cause="the input pipeline cannot feed the GPUs: too few workers, tokenisation or augmentation on "
                "the fly, slow storage or a CPU-bound collate",
                fix="dataloader_num_workers=4-8 per GPU, dataloader_pin_memory=True, persistent workers; "
                "pre-tokenise the dataset once (datasets.map + save_to_disk); check system/cpu_pct",
            )
        ]
    return []


def _logged_mfu(frame: pd.DataFrame) -> tuple[float, int] | None:
    """(median MFU as a fraction, first step) from a logged ``mfu`` (nanoGPT prints it in percent; its first
    iterations print -100%)."""
    s = series(frame, "train/mfu", finite=True)
    s = settled(s[s > 0], frame)
    if len(s) < 3:
        return None
    v = s.to_numpy()
    return float(np.median(v)) / (100.0 if v.max() > 1.0 else 1.0), int(s.index[0])


@detector(signatures=("low_mfu",), tags=("machine",))
def low_mfu(
    frame: pd.DataFrame,
    *,
    info: RunInfo | None = None,
    finetune_low: float = 0.15,
    pretrain_low: float = 0.30,
    far_below: float = 0.5,
) -> list[Finding]:
    """The cards do a small share of the work they could: model FLOPs utilisation far below the usual range.

    Signature: MFU (tokens/s x training FLOPs per token over the cards' bf16 peak, :mod:`autopsy.gpus`; or the MFU
    the run logged) under `far_below` (half) of the low end of the usual range: `finetune_low` (15%: fine-tuning
    runs 15-25%) or, for a run from scratch, `pretrain_low` (30%: pretraining 30-45%); a note when under the low end
    but not by half. Needs the throughput, the model's size (config.json, adapter_config.json or printed counts)
    and the card (W&B metadata, nvidia-smi, or inferred from the system metrics); one card when the count is unknown.
    Likely causes: a starved input pipeline, a small per-device batch, no fused attention kernel (eager
    attention), fp32 or tf32 math, CPU offload, gradient checkpointing (recomputation is not model work).
    What to check next: GPU utilisation, the per-device batch size, attn_implementation, bf16=True.
    """
    scratch = trains_from_scratch(info) is True
    low = pretrain_low if scratch else finetune_low
    logged = _logged_mfu(frame)
    rate = run_mfu(frame, info) if logged is None else None
    if logged is None and rate is None:
        return []
    value = logged[0] if logged is not None else rate.mfu  # type: ignore[union-attr]
    if not 0 < value < low or value > 1:
        return []
    _, _, first, source = tokens_per_second(frame, info) or (0.0, False, None, "")
    step = logged[1] if logged is not None else first
    evidence: dict[str, Any] = {
        "mfu": evidence_value(value),
        "usual_low": low,
        "kind": "pretraining" if scratch else "fine-tuning",
    }
    if rate is not None:
        evidence.update(rate.evidence(), **describe_card(info))
        evidence["tokens_per_second_from"] = source
    else:
        evidence["from"] = "train/mfu as the run logged it"
    severity = Severity.WARNING if value < far_below * low else Severity.INFO
    return [
        Finding(
            signature="low_mfu",
            severity=severity,
            step=step,
            metric="train/mfu" if logged is not None else (source if source in metric_names(frame) else None),
            summary=f"MFU {value:.1%}, {'far ' if severity is Severity.WARNING else ''}below the {low:.0%} a "
            f"{num(evidence['kind'])} run usually reaches",
            evidence=evidence,
            cause="the cards wait or compute inefficiently: a starved input pipeline, a small per-device batch, "
            "unfused attention, fp32 math, CPU offload",
            fix="check GPU utilisation first (input_bound); raise the per-device batch (less accumulation), "
            "attn_implementation='flash_attention_2' or 'sdpa', bf16=True, pack sequences",
        )
    ]
