"""HF Trainer's ``trainer_state.json``: the root file and every ``checkpoint-*/trainer_state.json``.

HF writes bare ``NaN``/``Infinity`` tokens (Python's json reads them); some loggers write them as strings
(``"NaN"``, ``"nan"``, ``"inf"``, ``"-Infinity"``): those are the same numbers. ``log_history`` holds train
entries (``loss``, ``grad_norm``, ``learning_rate``, ``epoch``), eval entries (``eval_loss``, ``eval_<set>_loss``,
...), TRL metrics (``rewards/chosen``, ``logps/rejected``, ``kl``, ...) and the final summary entry
(``train_loss``, ``total_flos``, ``train_runtime``, ...), which goes into the run's summary, not its series. A
later checkpoint's history supersedes an earlier one's at the same step; what was superseded is said in a note.

The file is streamed (:mod:`autopsy.importers._trainer_json`): memory holds a window of text and the long rows
read so far, never the whole file's Python objects. A file cut off mid-write, or holding a value nested too
deeply to be a log entry, is salvaged: every entry before the damage (and after a skipped value) is read, and
the damage is reported.

End of run (:func:`_end_of_run`): the final summary is a summary entry at the END of log_history (no train log
after it: with ``include_num_input_tokens_seen=True`` HF writes ``train_runtime`` into every train log, which
proves nothing), checked against ``global_step`` and ``max_steps``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.checkpoints import checkpoint_step
from autopsy.errors import UnreadableError
from autopsy.frame import make_frame, text_categories
from autopsy.importers._base import Imported, ReadOptions
from autopsy.importers._trainer_history import SUMMARY_KEYS, StateFile
from autopsy.importers._trainer_json import NAN, read_stream
from autopsy.metrics import canonical_metric
from autopsy.runinfo import Damage, RunInfo

__all__ = ["KIND", "PRIORITY", "StateFile", "claims", "read", "read_file"]

KIND = SOURCE = "trainer_state"
PRIORITY = 2  # one row per logging_steps: after the loggers that see every step
MAX_BYTES = 2 << 30  # a trainer_state.json larger than 2 GiB is not an HF file


def claims(path: Path) -> int:
    """HF Trainer writes ``trainer_state.json`` into its output dir and every ``checkpoint-N/``; a copy renamed
    (``run7_state.json``) is known by its content: a JSON object whose first 4 KiB name ``log_history`` (HF writes
    the keys sorted: it comes within the first dozen)."""
    if path.name == "trainer_state.json":
        return 2
    if path.suffix.lower() != ".json":
        return 0
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return 0
    body = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return 2 if body[:1] == b"{" and b'"log_history"' in head else 0


def run_roots(files: list[Path], base: Path) -> dict[Path, Path]:
    """A ``trainer_state.json`` belongs to the run of its directory (the output dir above a ``checkpoint-N/``: the
    discovery default); a renamed copy stands alone, a run of its own, like a console log."""
    return {f: f for f in files if f.name != "trainer_state.json"}


def _sniff(path: Path, head: int = 4096) -> None:
    """Refuse a file that cannot be a trainer_state.json from its first bytes, before reading all of it.

    HF writes a JSON object: ``{`` after optional whitespace. A sparse, zero-filled or binary file
    (a crashed copy, a mis-named file) is rejected here with bounded memory, however large it is.
    """
    with path.open("rb") as fh:
        start = fh.read(head)
    body = start.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if body[:1] != b"{":
        what = repr(body[:16]) if body else "only whitespace"
        raise UnreadableError(f"{path}: not a JSON object (starts with {what})")


def read_file(path: Path) -> StateFile:
    """Stream one trainer_state.json. Raises :class:`UnreadableError` when nothing of it can be read."""
    sf = StateFile(path=path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UnreadableError(f"{path}: {size} bytes is too large for a trainer_state.json")
    _sniff(path)
    try:
        with path.open("rb") as fh:
            got = read_stream(fh, sf.add)
    except MemoryError:
        raise UnreadableError(f"{path}: out of memory reading {size} bytes") from None
    sf.state, sf.history = got.state, got.history
    read = f"{sf.entries + sf.non_dict} log_history entries"
    if got.stop is not None:
        if not sf.entries:
            raise UnreadableError(f"{path}: {got.stop.problem} at offset {got.stop.offset}; no log entry could be read")
        sf.damage = Damage(
            file=str(path), offset=got.stop.offset, problem=got.stop.problem, salvaged=f"{read} before the damage"
        )
    elif got.skipped:
        first = got.skipped[0]
        sf.damage = Damage(
            file=str(path),
            offset=first.offset,
            problem=f"{len(got.skipped)} value(s) nested too deeply to read: skipped",
            salvaged=f"{read} around it",
        )
    return sf


def _note_superseded(info: RunInfo, frame: pd.DataFrame) -> None:
    """Say which rows a later row of the same metric rewrote (a resumed run, a repeated entry)."""
    sup = frame["superseded"].to_numpy(dtype=bool)
    if not sup.any():
        return
    steps = frame["step"].to_numpy()[sup]
    metrics = sorted({str(m) for m in frame["metric"][sup]})
    shown = ", ".join(metrics[:4]) + (f" and {len(metrics) - 4} more" if len(metrics) > 4 else "")
    info.notes.append(
        f"trainer_state: {int(sup.sum())} rows at steps {int(steps.min())}-{int(steps.max())} ({shown}) were logged "
        "again later (a resumed run or a repeated entry): the later values are used; the earlier ones are kept, "
        "flagged superseded"
    )


def _dedupe(rank: np.ndarray, code: np.ndarray, step: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows kept when several files log the same (metric, step): the highest-ranked file's. Returns (keep mask,
    number of dropped rows whose value differs from the kept one: history a later file rewrote)."""
    order = np.lexsort((np.arange(len(rank)), rank, step, code))
    c, s, r, v = code[order], step[order], rank[order], value[order]
    new = np.ones(len(c), dtype=bool)
    new[1:] = (c[1:] != c[:-1]) | (s[1:] != s[:-1])
    group = np.cumsum(new) - 1
    last = np.append(np.flatnonzero(new)[1:], len(c)) - 1  # the last row of each group: top rank, last written
    top = r[last][group]
    keep_sorted = r == top
    lv = v[last][group]
    differs = ~keep_sorted & ~((v == lv) | (np.isnan(v) & np.isnan(lv)))
    keep = np.empty(len(c), dtype=bool)
    keep[order] = keep_sorted
    return keep, int(differs.sum())


def _read_files(paths: list[Path], info: RunInfo) -> list[StateFile]:
    parsed: list[StateFile] = []
    for path in paths:
        try:
            if path.stat().st_size == 0:
                info.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
                continue
            sf = read_file(path)
        except UnreadableError as exc:
            problem = str(exc).split(": ", 1)[-1]
            info.damage.append(Damage(file=str(path), offset=0, problem=problem, salvaged="nothing"))
            continue
        except OSError as exc:
            info.damage.append(
                Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing")
            )
            continue
        if sf.damage is not None:
            info.damage.append(sf.damage)
        parsed.append(sf)
        info.files.append(str(path))
        ck_step = checkpoint_step(path.parent.name)
        if ck_step is not None:
            info.checkpoints[ck_step] = str(path.parent)
    return parsed


def _rank_key(sf: StateFile) -> tuple[int, int]:
    gs = _int_or_none(sf.state.get("global_step"))
    if gs is None:  # no usable global_step: rank the file by the last step it logged
        gs = sf.last_step()
    return (gs if gs is not None else -1, 1 if checkpoint_step(sf.path.parent.name) is None else 0)


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read and merge trainer_state.json files of one run into a canonical frame.

    Files are ranked by their ``global_step`` (the root file wins ties): for each (metric, step) the
    row from the highest-ranked file is kept, so a later checkpoint supersedes an earlier one and a
    history that only an earlier file holds is not lost.
    """
    info = RunInfo(name=run, sources=[SOURCE])
    parsed = sorted(_read_files(paths, info), key=_rank_key)
    names: dict[str, int] = {}
    ranks: list[tuple[int, int]] = []  # (rank, rows) of each file with rows
    codes: list[np.ndarray] = []
    steps: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for rank, sf in enumerate(parsed):
        _history_notes(info, sf)
        _fill_info(info, sf.state, is_root=checkpoint_step(sf.path.parent.name) is None)
        if not sf.code:
            continue
        entry_step, valid, _, _ = sf.step_of_entries()
        remap = np.array([names.setdefault(n, len(names)) for n in sf.names] + [0], dtype=np.int32)[:-1]
        # one array at a time, each batch list dropped once joined: memory holds the rows once, not three times
        entry = np.concatenate(sf.entry)
        sf.entry = []
        ok = valid[entry]
        steps.append(entry_step[entry[ok]] if not ok.all() else entry_step[entry])
        del entry
        code = np.concatenate(sf.code)
        sf.code = []
        codes.append(remap[code[ok]] if not ok.all() else remap[code])
        del code
        value = np.concatenate(sf.value)
        sf.value = []
        values.append(value[ok] if not ok.all() else value)
        del value
        ranks.append((rank, len(steps[-1])))
    _end_of_run(info, parsed)
    if not codes or not sum(len(c) for c in codes):
        return Imported.one(make_frame(run=[], source=[], metric=[], step=[], value=[]), info)
    if len(codes) == 1:
        code, step, value = codes.pop(), steps.pop(), values.pop()
    else:
        code, step, value = np.concatenate(codes), np.concatenate(steps), np.concatenate(values)
        codes, steps, values = [], [], []
    if len(ranks) > 1:
        rank_of_row = np.repeat(np.asarray([r for r, _ in ranks], dtype=np.int32), [k for _, k in ranks])
        keep, differ = _dedupe(rank_of_row, code, step, value)
        del rank_of_row
        if differ:
            info.notes.append(
                f"trainer_state: {differ} values of earlier files differ from a later file's at the same step (a "
                "resumed run rewrote that history): the later file's values are used"
            )
        code, step, value = code[keep], step[keep], value[keep]
    raw_names = list(names)
    canon = np.array([canonical_metric(r, hf_flat=True) for r in raw_names] + [""], dtype=object)[:-1]
    metric_codes, metric_names = pd.factorize(canon)
    metric = pd.Categorical.from_codes(
        np.asarray(metric_codes, dtype=np.int32)[code], categories=text_categories(list(metric_names))
    )
    raw = pd.Categorical.from_codes(code, categories=text_categories(raw_names))
    del code  # the categoricals hold the codes in the smallest integer type
    frame = make_frame(run=run, source=SOURCE, metric=metric, step=step, value=value, raw_metric=raw, take=True)
    _note_superseded(info, frame)
    return Imported.one(frame, info)


def _history_notes(info: RunInfo, sf: StateFile) -> None:
    path = sf.path
    if sf.history not in (None, "list"):
        info.notes.append(f"{path}: log_history is {sf.history}, not a list; ignored")
    elif not sf.entries and not sf.non_dict:
        info.notes.append(f"{path}: log_history is empty: nothing was logged yet")
    if sf.non_dict:
        info.notes.append(f"{path}: {sf.non_dict} log_history entries are not JSON objects; ignored")
    if not sf.steps:
        return
    _, _, missing, invalid = sf.step_of_entries()
    if invalid:
        info.notes.append(
            f"{path}: {invalid} log_history entries dropped: their step is negative, fractional or too large"
        )
    if missing:
        info.notes.append(f"{path}: {missing} log_history entries had no step; they took the previous entry's step")


def _stop_requested(state: dict[str, Any]) -> bool | None:
    """What the saved TrainerControl says: did a callback ask training to stop (None: not recorded)?"""
    cbs = state.get("stateful_callbacks")
    if not isinstance(cbs, dict):
        return None
    if "EarlyStoppingCallback" in cbs:
        return True
    control = cbs.get("TrainerControl")
    args = control.get("args") if isinstance(control, dict) else None
    flag = args.get("should_training_stop") if isinstance(args, dict) else None
    return flag if isinstance(flag, bool) else None


def _end_of_run(info: RunInfo, parsed: list[StateFile]) -> None:
    """The final summary and ``info.finished``: the summary entry at the end of the highest-ranked file that has
    one, checked against the run's last step and ``max_steps``.

    A summary entry followed by train logs (a run resumed after it), or short of the run's global step, is not an
    end. One short of ``max_steps`` is an end the run was asked for only when a callback requested the stop
    (early stopping); with the saved TrainerControl saying no stop was requested, the run was cut short.
    """
    ends = [sf for sf in parsed if sf.summary is not None]
    if not ends:
        return  # a checkpoint's copy is saved mid-run, and HF writes the root file only at save_state()
    sf = ends[-1]
    summary = sf.summary or {}
    where = _int_or_none(summary.get("step"))
    if sf.last_train > sf.summary_at:
        info.notes.append(
            f"{sf.path}: a final summary entry (step {where}) is followed by more train logs: the run was resumed "
            "after it, so it is not the end"
        )
        return
    if where is not None and info.global_step is not None and where < info.global_step:
        info.notes.append(f"{sf.path}: its final summary (step {where}) is older than step {info.global_step}")
        return
    for key in SUMMARY_KEYS:
        if key in summary and summary[key] is not None:
            info.summary[key] = float("nan") if summary[key] == NAN else summary[key]
    info.finished = True
    planned = info.max_steps
    if where is None or not planned or planned <= 0 or where >= planned:
        return
    asked = _stop_requested(sf.state)
    share = f"{where} of max_steps {planned} ({100 * where / planned:.1f}%)"
    if asked is False:
        info.finished = False
        info.notes.append(
            f"{sf.path}: train() returned at step {share} with no stop requested by a callback: cut short"
        )
    elif asked:
        info.notes.append(f"{sf.path}: training stopped at step {share}: a callback requested it (early stopping)")
    else:
        info.notes.append(
            f"{sf.path}: training ended at step {share} (early stopping, or a stop the file does not record)"
        )


def _int_or_none(x: Any) -> int | None:
    try:
        if x is None or isinstance(x, bool):
            return None
        v = float(x)
        return int(v) if math.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _fill_info(info: RunInfo, state: dict[str, Any], *, is_root: bool) -> None:
    gs = _int_or_none(state.get("global_step"))
    if gs is not None:
        info.global_step = max(info.global_step or 0, gs)
    for key in ("max_steps", "logging_steps", "eval_steps", "save_steps"):
        v = _int_or_none(state.get(key))
        if v is not None and (getattr(info, key) is None or is_root):
            setattr(info, key, v)
    ep = state.get("num_train_epochs")
    if isinstance(ep, (int, float)) and not isinstance(ep, bool):
        info.num_train_epochs = float(ep)
    best = state.get("best_model_checkpoint")
    if isinstance(best, str):
        info.best_checkpoint = best
    bm = state.get("best_metric")
    if isinstance(bm, (int, float)) and not isinstance(bm, bool):
        info.best_metric = float(bm)
    for key in ("train_batch_size", "is_hyper_param_search", "trial_name"):
        if key in state and state[key] is not None:
            info.config.setdefault(key, state[key])
    for key in ("max_steps", "logging_steps", "eval_steps", "save_steps", "num_train_epochs"):
        if state.get(key) is not None:
            info.config.setdefault(key, state[key])
