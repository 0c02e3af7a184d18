"""What the machine-side detectors read: each GPU's series, the busy ranks, the run's throughput and its cards.

System metrics start while the model is still loading (W&B samples from the first second); the steady state is the
part from the first logged training step on, less its first few percent (the allocator's and compiler's warm-up).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from autopsy.gpus import GpuSpec, Mfu, flops_per_token, gpu_spec, mfu
from autopsy.memory_estimate import param_counts, seq_len_of
from autopsy.runinfo import RunInfo
from autopsy.series import metric_names, series, wall_times

__all__ = [
    "THROUGHPUT",
    "bad_end",
    "card",
    "describe_card",
    "first_train_step",
    "per_rank",
    "run_mfu",
    "settled",
    "throughput",
    "tokens_per_second",
    "used_ranks",
]

# throughput metrics, in order of preference (tokens/s of the whole job first)
THROUGHPUT = (
    "train/tokens_per_second",
    "train/tokens_per_second_per_gpu",
    "train/samples_per_second",
    "train/steps_per_second",
)
# W&B samples every card of the machine: one that computes under 5% of the time all run long, holding under 10% of
# its memory (a CUDA context, a neighbour's small job; a hung rank holds its model), is not part of the job
_IDLE_PCT = 5.0
_IDLE_MEMORY_PCT = 10.0


def first_train_step(frame: pd.DataFrame) -> int | None:
    """The first logged training step (train/loss, else any train/ metric)."""
    s = series(frame, "train/loss")
    if len(s):
        return int(s.index[0])
    firsts = [int(series(frame, m).index[0]) for m in metric_names(frame) if m.startswith("train/")]
    return min(firsts) if firsts else None


def settled(s: pd.Series, frame: pd.DataFrame, *, early_share: float = 0.05) -> pd.Series:
    """``s`` from the first logged training step on, less the first ``early_share`` of those points."""
    start = first_train_step(frame)
    if start is not None:
        s = s[s.index >= start]
    return s.iloc[int(early_share * len(s)) :]


def per_rank(frame: pd.DataFrame, field: str) -> dict[int, pd.Series]:
    """``system/gpu.<rank>.<field>`` of every rank, finite points only, by rank."""
    pat = re.compile(rf"^system/gpu\.(\d+)\.{re.escape(field)}$")
    out = {}
    for name in metric_names(frame):
        m = pat.match(name)
        if m is not None:
            s = series(frame, name, finite=True)
            if len(s):
                out[int(m.group(1))] = s
    return dict(sorted(out.items()))


def used_ranks(frame: pd.DataFrame) -> tuple[list[int], list[int]]:
    """(ranks the job used, idle ranks): W&B samples every card of the machine, also those no rank ran on."""
    mem, util = per_rank(frame, "memory_allocated_pct"), per_rank(frame, "util_pct")
    used: list[int] = []
    idle: list[int] = []
    for rank in sorted(set(mem) | set(util)):
        m = float(np.median(mem[rank].to_numpy())) if rank in mem else None
        u = float(np.median(util[rank].to_numpy())) if rank in util else None
        # no compute, and no more memory than a CUDA context or a neighbour's small job
        quiet = (u is None or u < _IDLE_PCT) and (m is None or m < (_IDLE_MEMORY_PCT if u is not None else _IDLE_PCT))
        (idle if quiet else used).append(rank)
    return used, idle


def _derived_rate(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Tokens per second from a cumulative token count and the wall times of its logs."""
    s = series(frame, metric, finite=True)
    w = wall_times(frame, metric).reindex(s.index)
    ok = np.isfinite(w.to_numpy())
    s, w = s[ok], w[ok]
    if len(s) < 3:
        return s.iloc[:0]
    dv, dt = np.diff(s.to_numpy()), np.diff(w.to_numpy())
    good = (dt > 0) & (dv >= 0)
    return pd.Series(dv[good] / dt[good], index=s.index[1:][good], name="train/tokens_per_second")


def _inverse_time(frame: pd.DataFrame) -> pd.Series:
    """Iterations per second from seconds per iteration; a time that only grows is elapsed time, not per iteration."""
    s = series(frame, "train/iter_time", finite=True)
    s = s[s > 0]
    if len(s) < 3 or bool(np.all(np.diff(s.to_numpy()) > 0)):
        return s.iloc[:0]
    return 1.0 / s


def throughput(frame: pd.DataFrame) -> tuple[str, pd.Series] | None:
    """(metric, series) of the run's throughput: a logged rate, tokens/s from a cumulative token count and wall
    time, or iterations/s from a per-iteration time; None when the run logged none."""
    for name in THROUGHPUT:
        s = series(frame, name, finite=True)
        if len(s):
            return name, s
    derived = _derived_rate(frame, "train/num_tokens")
    if len(derived):
        return "train/num_tokens", derived
    inverse = _inverse_time(frame)
    if len(inverse):
        return "train/iter_time", inverse
    return None


def card(info: RunInfo | None) -> tuple[GpuSpec | None, int | None, float | None]:
    """(the card's spec, how many, its memory in GiB) from the config; None where the run did not record it."""
    if info is None:
        return None, None, None
    cfg = info.config
    count = cfg.get("gpu_count")
    memory = cfg.get("gpu_memory_gib")
    spec = gpu_spec(cfg.get("gpu_name"))
    count = int(count) if isinstance(count, (int, float)) and not isinstance(count, bool) and count > 0 else None
    if not isinstance(memory, (int, float)) or isinstance(memory, bool) or memory <= 0:
        memory = spec.memory_gib if spec is not None else None
    return spec, count, (float(memory) if memory is not None else None)


def bad_end(info: RunInfo | None) -> bool | None:
    """True when the run died (a crash other than a hand interrupt, a non-zero exit, no final record), False when it
    finished cleanly, None when the sources cannot tell."""
    if info is None:
        return None
    if info.crash is not None:
        return info.crash.kind != "interrupted"
    if info.exit_code not in (None, 0) or info.finished is False:
        return True
    if info.finished is True or info.summary.get("train_runtime") is not None:
        return False
    return None


def describe_card(info: RunInfo | None) -> dict[str, Any]:
    """The card as evidence: its name, memory and where the name came from."""
    if info is None:
        return {}
    return {k: info.config[k] for k in ("gpu_name", "gpu_count", "gpu_memory_gib", "gpu_name_from") if k in info.config}


def tokens_per_second(frame: pd.DataFrame, info: RunInfo | None) -> tuple[float, bool, int | None, str] | None:
    """(tokens/s, per GPU?, first step or None, where from): a logged rate, samples/s x sequence length, or the
    run's summary."""
    got = throughput(frame)
    seq = seq_len_of(info.config) if info is not None else None
    if got is not None:
        metric, s = got
        s = settled(s, frame)
        if len(s) and metric in ("train/tokens_per_second", "train/tokens_per_second_per_gpu", "train/num_tokens"):
            return float(np.median(s.to_numpy())), metric.endswith("per_gpu"), int(s.index[0]), metric
        if len(s) and metric == "train/samples_per_second" and seq:
            return float(np.median(s.to_numpy())) * seq, False, int(s.index[0]), f"{metric} x seq_len {seq}"
    summ = info.summary if info is not None else {}
    if isinstance(summ.get("train_tokens_per_second"), (int, float)):
        return float(summ["train_tokens_per_second"]), False, None, "summary train_tokens_per_second"
    if isinstance(summ.get("train_samples_per_second"), (int, float)) and seq:
        return float(summ["train_samples_per_second"]) * seq, False, None, f"summary samples/s x seq_len {seq}"
    return None


def run_mfu(frame: pd.DataFrame, info: RunInfo | None) -> Mfu | None:
    """The run's MFU from its throughput, its parameter count and its cards; None when one is unknown."""
    spec, count, _ = card(info)
    tps = tokens_per_second(frame, info)
    counts = param_counts(info.config) if info is not None else None
    if spec is None or tps is None or counts is None or info is None or tps[0] <= 0:
        return None
    flops, formula = flops_per_token(
        params=counts["params"],
        trainable=counts["trainable"],
        embedding_params=counts.get("embedding", 0),
        layers=counts.get("layers"),
        hidden=counts.get("hidden"),
        seq_len=seq_len_of(info.config),
    )
    used, _ = used_ranks(frame)  # the cards W&B saw busy, else the count the run recorded
    return mfu(tps[0], flops, spec, gpus=1 if tps[1] else (len(used) or count or 1), formula=formula)
