"""W&B system metrics (``stats`` records) on the run's step axis, and the machine the run ran on.

W&B samples the machine every few seconds and writes ``stats`` records beside the history: ``gpu.N.memoryAllocated``
(% of the card), ``gpu.N.memoryAllocatedBytes``, ``gpu.N.gpu`` (utilisation %), ``gpu.N.temp``, ``gpu.N.powerWatts``,
``proc.memory.rssMB``, ``memory_percent``, ... They become ordinary metric rows under ``system/``
(:func:`system_metric`: ``system/gpu.0.memory_allocated_pct``, ``system/gpu.0.util_pct``, ``system/proc.rss_mb``).
Per-core CPU keys (one per core, 256 on a big node) are left out.

**Steps from wall time** (:func:`steps_at`): a sample's step is read off the history rows' (wall time, global step)
pairs by linear interpolation. Outside them it is extrapolated at the nearest logging interval's pace, for at most
one logging interval: before the first log the process was loading, after the last one it died before the next
log would have come. A run that finished cleanly ended training at its last history row, so later samples (saving,
uploading) are left out; samples before the run started, or in a run with fewer than two timed history rows, have
no step and are left out too (noted).

**The machine**: the GPU's name, count and memory from W&B's ``environment`` record (newer clients), the synced
``files/wandb-metadata.json``, ``nvidia-smi`` output in the captured console, or else from the samples themselves:
the card's size is allocated bytes over allocated percent, the count the GPU indices sampled, and the name is
inferred (:func:`autopsy.gpus.infer_gpu`) when one card of the table has that size and power limit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.frame import empty_frame, make_frame, wall_seconds
from autopsy.gpus import gpu_spec, infer_gpu, parse_nvidia_smi
from autopsy.importers._wandb_history import parse_values
from autopsy.runinfo import RunInfo

__all__ = ["SystemCollector", "machine_from_metadata", "steps_at", "system_metric"]

_GPU_KEY = re.compile(r"^gpu\.(?P<proc>process\.)?(?P<i>\d+)\.(?P<field>\w+)$")
_GPU_FIELDS = {
    "memoryAllocated": "memory_allocated_pct",
    "memoryAllocatedBytes": "memory_allocated_bytes",
    "gpu": "util_pct",
    "memory": "memory_util_pct",  # the share of time the memory controller was busy
    "temp": "temp_c",
    "powerWatts": "power_w",
    "powerPercent": "power_pct",
    "enforcedPowerLimitWatts": "power_limit_w",
    "smClock": "sm_clock_mhz",
}
_HOST = {
    "proc.memory.rssMB": "proc.rss_mb",
    "proc.memory.percent": "proc.memory_pct",
    "proc.memory.availableMB": "proc.available_mb",
    "memory_percent": "memory_pct",
    "cpu": "cpu_pct",
    "proc.cpu.threads": "proc.cpu_threads",
    "disk.in": "disk.read_mb",
    "disk.out": "disk.write_mb",
}
# a StatsItem with key "cpu" in protobuf's wire format: field 1 (key, 3 bytes), field 16 (value_json, one length byte)
_CPU_TOTAL = re.compile(rb"\x0a\x03cpu\x82\x01[\x01-\x7f]([\x21-\x7e]+)")
_SMI_MARKERS = ("NVIDIA-SMI", "(UUID: GPU-")
_SMI_KEEP = 80  # console records kept after an nvidia-smi banner: its table is ~20 lines per card


def system_metric(key: str) -> str | None:
    """The frame's name of a W&B system key (None: not kept)."""
    m = _GPU_KEY.match(key)
    if m is not None:
        field = _GPU_FIELDS.get(m.group("field"))
        if field is None:
            return None
        return f"system/gpu.{'process.' if m.group('proc') else ''}{m.group('i')}.{field}"
    name = _HOST.get(key)
    return f"system/{name}" if name else None


def steps_at(
    times: np.ndarray, walls: np.ndarray, steps: np.ndarray, *, start: float | None, end: float | None
) -> np.ndarray:
    """The step at each sample time (float; NaN where it has none), from the history's (wall, step) pairs; see the
    module doc. ``start``: when the run started; ``end``: when training ended (a clean finish), else None."""
    out = np.full(times.shape, np.nan)
    ok = np.isfinite(walls) & np.isfinite(steps)
    if ok.sum() < 2:
        return out
    order = np.argsort(walls[ok], kind="stable")
    w, s = walls[ok][order], np.maximum.accumulate(steps[ok][order])
    first = np.r_[True, np.diff(w) > 0]  # one anchor per wall time
    w, s = w[first], s[first]
    dw, ds = np.diff(w), np.diff(s)
    moving = (dw > 0) & (ds > 0)
    if w.size < 2 or not moving.any():
        return out
    interval = float(np.median(ds[moving]))  # steps between two logs
    rate_first = float(ds[moving][0] / dw[moving][0])
    rate_last = float(ds[moving][-1] / dw[moving][-1])
    out = np.interp(times, w, s)
    before, after = times < w[0], times > w[-1]
    out[before] = np.maximum(s[0] - np.minimum(rate_first * (w[0] - times[before]), interval), 0.0)
    out[after] = s[-1] + np.minimum(rate_last * (times[after] - w[-1]), interval)
    if start is not None and np.isfinite(start):
        out[times < start] = np.nan
    if end is not None:
        out[times > end] = np.nan
    return out


class SystemCollector:
    """Folds a ``.wandb`` file's ``stats``, ``environment`` and console records while they stream by."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.counts: list[int] = []
        self.keys: list[str] = []
        self.values: list[str] = []
        self.machine: dict[str, Any] = {}
        self._smi: list[str] = []
        self._smi_left = 0

    def add_stats(self, stats: Any, raw: bytes = b"") -> None:
        """One ``stats`` record (``raw``: its bytes). W&B's per-core CPU record (one key per core, 258 on a 256-core
        node: most of a file's items) is not walked item by item: only its ``cpu`` total is taken, from its bytes."""
        if raw.count(b".cpu_percent") > 8 and b"gpu." not in raw:
            m = _CPU_TOTAL.search(raw)
            pairs = [("cpu", m.group(1).decode("ascii"))] if m else []
        else:
            pairs = [(i.key, i.value_json) for i in stats.item]
            pairs = [p for p in pairs if not p[0].startswith("cpu.")]
        ts = stats.timestamp
        self.times.append(ts.seconds + ts.nanos / 1e9)
        self.counts.append(len(pairs))
        self.keys.extend([k for k, _ in pairs])
        self.values.extend([v for _, v in pairs])

    def add_environment(self, env: Any) -> None:
        """W&B's ``environment`` record (clients from 0.19): the GPUs' name, count and memory."""
        cards = list(env.gpu_nvidia)
        name = env.gpu_type or (cards[0].name if cards else "")
        if name:
            self.machine.setdefault("gpu_name", name)
            self.machine.setdefault("gpu_name_from", "W&B metadata")
        count = int(env.gpu_count) or len(cards)
        if count:
            self.machine.setdefault("gpu_count", count)
        totals = [int(c.memory_total) for c in cards if c.memory_total]
        if totals:
            self.machine.setdefault("gpu_memory_gib", round(max(totals) / 2**30, 2))

    def add_console(self, text: str) -> None:
        """Console output the client captured: kept only around an ``nvidia-smi`` banner or ``nvidia-smi -L`` line."""
        if any(marker in text for marker in _SMI_MARKERS):
            self._smi_left = _SMI_KEEP
        if self._smi_left > 0 and len(self._smi) < 4 * _SMI_KEEP:
            self._smi.append(text)
            self._smi_left -= 1

    def frame(
        self,
        history: pd.DataFrame,
        *,
        run: str,
        source: str,
        info: RunInfo,
        start: float | None = None,
        end: float | None = None,
    ) -> pd.DataFrame:
        """The samples as canonical rows on the history's step axis (``start``: the run's start; ``end``: the end of
        training when it finished cleanly); fills the machine into ``info.config``."""
        if self._smi:
            for key, value in parse_nvidia_smi("\n".join(self._smi)).items():
                self.machine.setdefault(key, value)
            self.machine.setdefault("gpu_name_from", "nvidia-smi in the console")
        if not self.keys:
            _fill_config(info, self.machine)
            return empty_frame()
        keys = np.asarray(self.keys, dtype=object)
        codes, uniq = pd.factorize(keys)
        names = np.array([system_metric(str(k)) for k in uniq], dtype=object)
        values, ok = parse_values(np.asarray(self.values, dtype=object))
        record = np.repeat(np.arange(len(self.times)), np.asarray(self.counts, dtype=np.int64))
        times = np.asarray(self.times, dtype=np.float64)
        _machine_from_samples(self.machine, names, codes, values, ok)
        _fill_config(info, self.machine)
        steps = steps_at(times, wall_seconds(history), history["step"].to_numpy(np.float64), start=start, end=end)
        keep = ok & pd.notna(names)[codes] & np.isfinite(steps[record])
        if not keep.any():
            info.notes.append(
                f"{len(self.times)} W&B stats records have no step (no timed history rows around them): left out"
            )
            return empty_frame()
        dropped = int((~np.isfinite(steps)).sum())
        if dropped:
            info.notes.append(f"{dropped} of {len(self.times)} W&B stats records fall outside training: left out")
        rec = record[keep]
        return make_frame(
            run=run,
            source=source,
            metric=names[codes][keep],
            step=np.round(steps[rec]).astype(np.int64),
            value=values[keep],
            wall_time=times[rec],
            raw_metric=keys[keep],
        )


def _machine_from_samples(
    machine: dict[str, Any], names: np.ndarray, codes: np.ndarray, values: np.ndarray, ok: np.ndarray
) -> None:
    """GPU count, card size (bytes over percent) and power limit from the samples (``names``: the frame name of each
    distinct key, ``codes``: each cell's key); the name inferred from them."""
    index = {str(n): i for i, n in enumerate(names) if isinstance(n, str)}
    ranks = {m.group(1) for n in index if (m := re.match(r"^system/gpu\.(\d+)\.", n))}
    if not ranks:
        return
    machine.setdefault("gpu_count", len(ranks))

    def median(name: str) -> float | None:
        sel = ok & (codes == index[name]) if name in index else None
        return float(np.median(values[sel])) if sel is not None and sel.any() else None

    pct, used = median("system/gpu.0.memory_allocated_pct"), median("system/gpu.0.memory_allocated_bytes")
    if "gpu_memory_gib" not in machine and pct is not None and used is not None and pct > 1:
        machine["gpu_memory_gib"] = round(used / (pct / 100.0) / 2**30, 1)
    power = median("system/gpu.0.power_limit_w")
    if "gpu_name" not in machine:
        spec = infer_gpu(machine.get("gpu_memory_gib"), float(power) if power is not None else None)
        if spec is not None:
            machine["gpu_name"] = spec.name
            limit = f", {power:g} W power limit" if power is not None else ""
            machine["gpu_name_from"] = (
                f"inferred from system metrics: {machine['gpu_memory_gib']:g} GiB per card{limit}"
            )


def _fill_config(info: RunInfo, machine: dict[str, Any]) -> None:
    if "gpu_name" not in machine:
        machine.pop("gpu_name_from", None)
    for key in ("gpu_name", "gpu_count", "gpu_memory_gib", "gpu_name_from"):
        if key in machine:
            info.config.setdefault(key, machine[key])
    spec = gpu_spec(machine.get("gpu_name"))
    if spec is not None and "gpu_memory_gib" not in info.config:
        info.config["gpu_memory_gib"] = spec.memory_gib


def machine_from_metadata(path: Path, info: RunInfo) -> None:
    """A synced run's ``files/wandb-metadata.json``: ``gpu`` (name), ``gpu_count``, the cards' memory."""
    import json

    try:
        data = (
            json.loads(path.read_text(encoding="utf-8", errors="replace")) if path.stat().st_size < (4 << 20) else None
        )
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return
    cards = data.get("gpu_nvidia") or data.get("gpu_devices") or []
    cards = [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else []
    machine: dict[str, Any] = {}
    name = data.get("gpu") or (cards[0].get("name") if cards else None)
    if isinstance(name, str) and name:
        machine.update(gpu_name=name, gpu_name_from="W&B metadata")
    count = data.get("gpu_count") or len(cards)
    if isinstance(count, int) and count > 0:
        machine["gpu_count"] = count
    totals = []
    for card in cards:
        try:
            totals.append(int(card.get("memoryTotal") or card.get("memory_total") or 0))
        except (TypeError, ValueError):
            continue
    if any(totals):
        machine["gpu_memory_gib"] = round(max(totals) / 2**30, 2)
    _fill_config(info, machine)
    info.files.append(str(path))
