"""One trainer_state.json's ``log_history`` as long rows, batch by batch (what :mod:`autopsy.importers._trainer_json`
hands over): each column read as numbers in one vectorised pass, each entry's step, and where the summary entry and
the last train log are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.importers._trainer_json import NAN
from autopsy.runinfo import Damage

__all__ = ["MAX_STEP", "SUMMARY_KEYS", "StateFile"]

# keys of the final summary entry (Trainer.train's last log): run totals, not series
SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
_NON_METRIC_KEYS = {"step", "epoch_float"}
MAX_STEP = 2**53  # steps are counted in int64 but compared as floats: larger ones are not exact
_NAN_TEXT = {"nan", "+nan", "-nan"}  # NaN spelled as a string; "inf", "-Infinity", "4.5" parse as numbers


def _numbers(data: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """One log_history column as float64, and which entries hold a number (vectorised).

    Numbers, HF's bare ``NaN`` (the parser's sentinel) and numbers written as strings (``"4.5"``, ``"NaN"``,
    ``"nan"``, ``"-inf"``, ``"Infinity"``) count; booleans, lists, dicts, other text and missing keys do not.
    """
    if data.dtype == bool:
        return np.zeros(len(data)), np.zeros(len(data), dtype=bool)
    if pd.api.types.is_numeric_dtype(data.dtype):
        num = data.to_numpy(dtype=np.float64)
        return num, ~np.isnan(num)
    is_bool = data.map(type).isin((bool,)).to_numpy()
    num = pd.to_numeric(data.where(~is_bool), errors="coerce").to_numpy(dtype=np.float64)
    keep = ~np.isnan(num)
    # strings that parsed to NaN: the sentinel of a bare NaN, or NaN spelled out (the only unread ones looked at)
    cand = np.flatnonzero(~keep & ~is_bool & data.notna().to_numpy())
    if len(cand):
        vals = data.to_numpy(dtype=object)[cand]
        nan = np.fromiter(
            (isinstance(v, str) and (v == NAN or v.strip().lower() in _NAN_TEXT) for v in vals), bool, len(vals)
        )
        keep[cand[nan]] = True
    return num, keep


def _present(wide: pd.DataFrame, key: str) -> np.ndarray:
    return wide[key].notna().to_numpy() if key in wide.columns else np.zeros(len(wide), dtype=bool)


@dataclass
class StateFile:
    """One trainer_state.json read: its top-level fields and its log_history as long rows.

    Rows: ``entry`` (position among the dict entries), ``code`` (into ``names``), ``value``; ``steps`` holds each
    entry's step as written (NaN: none or not a number).
    """

    path: Path
    state: dict[str, Any] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    steps: list[np.ndarray] = field(default_factory=list)
    entry: list[np.ndarray] = field(default_factory=list)
    code: list[np.ndarray] = field(default_factory=list)
    value: list[np.ndarray] = field(default_factory=list)
    entries: int = 0  # dict entries
    non_dict: int = 0  # entries that are not a JSON object
    summary: dict[str, Any] | None = None  # the last summary-shaped entry
    summary_at: int = -1  # its position
    last_train: int = -1  # position of the last entry that logs a train loss
    history: str | None = None
    damage: Damage | None = None

    def add(self, batch: list[Any]) -> None:
        """Take a batch of log_history entries (in file order): long rows, steps, the summary entry."""
        dicts = [e for e in batch if isinstance(e, dict)]
        self.non_dict += len(batch) - len(dicts)
        if not dicts:
            return
        wide = pd.DataFrame.from_records(dicts)
        if len(wide) != len(dicts):  # every dict empty: pandas makes no rows of them
            wide = pd.DataFrame(index=pd.RangeIndex(len(dicts)))
        base = self.entries
        self.entries += len(wide)
        step = pd.to_numeric(wide["step"], errors="coerce") if "step" in wide.columns else None
        sv = np.full(len(wide), np.nan) if step is None else step.to_numpy(dtype=np.float64)
        self.steps.append(np.where(np.isfinite(sv), sv, np.nan))
        trains = _present(wide, "loss")
        # the final summary entry: train_loss / total_flos, or train_runtime in an entry that is no train log
        final = (
            _present(wide, "train_loss") | _present(wide, "total_flos") | (_present(wide, "train_runtime") & ~trains)
        )
        if final.any():
            k = int(np.flatnonzero(final)[-1])
            self.summary_at, self.summary = base + k, dicts[k]
        if trains.any():
            self.last_train = base + int(np.flatnonzero(trains)[-1])
        entry, code, value = [], [], []
        for col in wide.columns:
            if col in _NON_METRIC_KEYS or col in SUMMARY_KEYS:
                continue
            num, keep = _numbers(wide[col])
            if not keep.any():
                continue
            idx = np.flatnonzero(keep)
            entry.append(idx.astype(np.int32) + np.int32(base))
            code.append(np.full(len(idx), self.names.setdefault(str(col), len(self.names)), dtype=np.int32))
            value.append(num[idx])
        if entry:  # entries in file order, the keys of one entry in the order the file first names them
            e, c = np.concatenate(entry), np.concatenate(code)
            order = np.lexsort((c, e))  # codes count first appearances: the same order whatever the batches
            self.entry.append(e[order])
            self.code.append(c[order])
            self.value.append(np.concatenate(value)[order])

    def step_of_entries(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Each entry's step (missing ones take the previous entry's), which entries are valid, and the counts of
        entries without a step and of entries dropped for an invalid step (negative, fractional, >= 2**53)."""
        sv = np.concatenate(self.steps) if self.steps else np.empty(0)
        with np.errstate(invalid="ignore"):
            bad = ~np.isnan(sv) & ((sv < 0) | (sv >= MAX_STEP) | (sv != np.floor(sv)))
        valid = ~bad
        missing = int((np.isnan(sv) & valid).sum())
        filled = pd.Series(np.where(valid, sv, np.nan))[valid].ffill().fillna(0)
        out = np.zeros(len(sv), dtype=np.int64)
        out[valid] = filled.to_numpy(dtype=np.float64).astype(np.int64)
        return out, valid, missing, int(bad.sum())

    def last_step(self) -> int | None:
        steps, valid, _, _ = self.step_of_entries()
        sv = np.concatenate(self.steps)[valid] if self.steps else np.empty(0)
        sv = sv[~np.isnan(sv)]
        return int(sv.max()) if len(sv) else None
