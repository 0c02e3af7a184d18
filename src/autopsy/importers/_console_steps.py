"""The step of each record of a console log, and a sentence saying where the steps came from.

In order of trust, a record's step is: the step its line prints (``step``/``iter`` keys, a table's step column);
``epoch x iterations-per-epoch + iteration`` from an ``Epoch [e][i/N]`` counter (epochs counted from 0 when any line
prints epoch 0, else from 1); an ``i/N`` counter; for an HF dict, the training progress bar printed within
:data:`BAR_DISTANCE` lines of it (the one before it first, else the one after); the Keras ``Epoch e/E`` header in
force. Records with none of these take the previous record's step; when no record has one, the steps are counted
(:func:`_infer_order`). Vectorised over the records.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from autopsy.importers._console_records import DICT, NO, ConsoleParse
from autopsy.runinfo import RunInfo

__all__ = ["BAR_DISTANCE", "resolve_steps", "training_bars"]

BAR_DISTANCE = 3  # lines between an HF dict and its progress bar (a blank line each side in LLaMA-Factory logs)
_SOURCES = (
    "the step printed on each line",
    "epoch x iterations-per-epoch + iteration (epochs counted from {base})",
    "the iteration counter on each line",
    "the progress bar's step printed beside each HF log dict",
    "the epoch number (Keras 'Epoch e/E' headers): one point per epoch",
)


def training_bars(p: ConsoleParse) -> tuple[np.ndarray, np.ndarray]:
    """The training progress bar's (lines, steps): the bars whose total is the printed max_steps, else the total
    printed most often (other bars -- loading weights, writing shards, evaluation -- have other totals)."""
    none = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    totals = p.array("tq_n")
    if not len(totals):
        return none
    printed = totals[totals > 1]
    want: Any = p.config.get("max_steps")
    if want is not None and not bool((printed == want).any()):
        return none  # a printed plan and no bar with that total: no training bar (disable_tqdm)
    if want is None:
        if not len(printed):
            return none
        values, counts = np.unique(printed, return_counts=True)
        count = dict(zip(values.tolist(), counts.tolist()))
        want = max(set(printed.tolist()), key=count.__getitem__)  # ties: the order a set of the totals gives
    mine = totals == want
    return p.array("tq_line")[mine], p.array("tq_i")[mine]


def resolve_steps(p: ConsoleParse, info: RunInfo) -> tuple[np.ndarray, str]:
    """One step per record, and a sentence saying where the steps came from."""
    n = len(p)
    steps = np.full(n, -1, dtype=np.int64)
    source = np.full(n, -1, dtype=np.int8)
    left = np.ones(n, dtype=bool)  # records no rule has claimed yet

    def claim(mask: np.ndarray, values: np.ndarray, which: int) -> None:
        nonlocal left
        mask = mask & left
        steps[mask] = values[mask]
        source[mask] = which
        left = left & ~mask

    printed, e, i, tot = p.array("step"), p.array("ep_e"), p.array("ep_i"), p.array("ep_n")
    base = 0 if bool((e[e != NO] == 0).any()) else 1
    claim(printed != NO, printed, 0)
    claim(e != NO, (e - base) * tot + i, 1)
    counter = p.array("ct_i")
    claim(counter != NO, counter, 2)
    bar_lines, bar_steps = training_bars(p)
    is_dict = p.array("kind") == DICT
    if len(bar_lines):
        _steps_from_bars(p.array("line"), is_dict & left, bar_lines, bar_steps, steps, source)
        left = left & ~is_dict  # a dict with no bar beside it takes the previous record's step
    keras = p.array("keras")
    claim(keras != NO, keras, 4)
    how: dict[str, int] = {}
    present = [s for s in range(len(_SOURCES)) if (source == s).any()]
    for s in sorted(present, key=lambda s: int(np.argmax(source == s))):  # in the order the log first uses them
        how[_SOURCES[s].format(base=base)] = int((source == s).sum())
    missing = steps < 0
    if missing.all() and n:
        steps, src = _infer_order(p, info)
        how[src] = n
    elif missing.any():
        # lines without their own step take the previous line's (summaries printed after a logged step)
        s = pd.Series(np.where(missing, np.nan, steps.astype(float))).ffill().fillna(0)
        steps = s.to_numpy().astype(np.int64)
        how["the previous line's step (lines without a step of their own)"] = int(missing.sum())
    return steps, "; ".join(f"{k} ({v} lines)" for k, v in how.items())


def _steps_from_bars(
    lines: np.ndarray,
    mask: np.ndarray,
    bar_lines: np.ndarray,
    bar_steps: np.ndarray,
    steps: np.ndarray,
    source: np.ndarray,
) -> None:
    """HF dicts take the step of the training bar printed right beside them: the one before (within BAR_DISTANCE
    lines), else the one after; a bar further away is another bar (loading weights, evaluation)."""
    at = lines[mask]
    k = np.searchsorted(bar_lines, at, side="right")
    before = np.maximum(k - 1, 0)
    after = np.minimum(k, len(bar_lines) - 1)
    use_before = (k > 0) & (at - bar_lines[before] <= BAR_DISTANCE)
    use_after = ~use_before & (k < len(bar_lines)) & (bar_lines[after] - at <= BAR_DISTANCE)
    got = np.where(use_before, bar_steps[before], np.where(use_after, bar_steps[after], -1))
    idx = np.flatnonzero(mask)
    steps[idx] = got
    source[idx[got >= 0]] = 3


def _infer_order(p: ConsoleParse, info: RunInfo) -> tuple[np.ndarray, str]:
    """No step anywhere: HF dicts from epoch x steps-per-epoch when known, else counted in order."""
    n = len(p)
    logging_steps = int(info.logging_steps or p.config.get("logging_steps") or 1)
    rec, codes, vals = p.array("v_rec"), p.array("v_code"), p.array("v_val")
    keys = [name[0] for name in p.names]
    trains = np.asarray([not k.startswith(("eval_", "test_")) for k in keys], dtype=bool)
    is_train = np.bincount(rec[trains[codes]], minlength=n)[:n] > 0 if len(rec) else np.zeros(n, dtype=bool)
    epoch = np.full(n, np.nan)
    is_epoch = np.asarray([k == "epoch" for k in keys], dtype=bool)[codes] if len(keys) else np.zeros(0, dtype=bool)
    epoch[rec[is_epoch]] = vals[is_epoch]
    spe = p.config.get("_steps_per_epoch")
    if spe and np.isfinite(epoch).all() and bool((p.array("kind") == DICT).all()):
        steps = np.maximum(np.round(epoch * float(spe)), 1).astype(np.int64)
        return steps, f"epoch x {spe:g} steps per epoch (the printed 'Num update steps per epoch')"
    count = np.cumsum(is_train)
    count = np.maximum(count, 1)
    steps = (count * logging_steps).astype(np.int64)
    where = "a printed logging_steps" if p.config.get("logging_steps") else "1 step per line: logging_steps unknown"
    return steps, f"counting the logged lines in order x {logging_steps} ({where}); the log prints no step"
