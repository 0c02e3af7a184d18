"""HF Trainer's ``trainer_state.json``: the root file and every ``checkpoint-*/trainer_state.json``.

HF writes bare ``NaN``/``Infinity`` tokens (Python's json reads them). ``log_history`` entries hold
train entries (``loss``, ``grad_norm``, ``learning_rate``, ``epoch``), eval entries (``eval_loss``,
``eval_<set>_loss``, ...), TRL metrics (``rewards/chosen``, ``logps/rejected``, ``kl``, ...) and a
final summary entry (``train_runtime``, ``train_loss``, ...), which goes into the run's summary,
not its series. A later checkpoint's history supersedes an earlier one's at the same step.

A file cut off mid-write is salvaged: every complete ``log_history`` entry before the cut is read,
and the damage is reported.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.checkpoints import checkpoint_step
from autopsy.errors import UnreadableError
from autopsy.frame import make_frame
from autopsy.importers._base import Imported, ReadOptions
from autopsy.metrics import canonical_metric
from autopsy.runinfo import Damage, RunInfo

__all__ = ["KIND", "PRIORITY", "claims", "parse_trainer_state", "read"]

KIND = SOURCE = "trainer_state"
PRIORITY = 2  # one row per logging_steps: after the loggers that see every step
MAX_BYTES = 2 << 30  # a trainer_state.json larger than 2 GiB is not an HF file
# keys of the final summary entry (Trainer.train's last log): run totals, not series
_SUMMARY_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}
_NON_METRIC_KEYS = {"step", "epoch_float"}
_MAX_STEP = 2**53  # steps are counted in int64 but compared as floats: larger ones are not exact


def claims(path: Path) -> int:
    """HF Trainer writes ``trainer_state.json`` into its output dir and every ``checkpoint-N/``."""
    return 2 if path.name == "trainer_state.json" else 0


_NAN = "\x00NaN"  # sentinel for a NaN written in the file (a missing key is absent instead)


def _constant(name: str) -> Any:
    return _NAN if name == "NaN" else float(name)


def _salvage(text: str) -> tuple[dict[str, Any], int]:
    """Read the complete ``log_history`` entries of a cut-off file. Returns (state, offset of damage)."""
    decoder = json.JSONDecoder(parse_constant=_constant)
    state: dict[str, Any] = {}
    # top-level scalar fields written before log_history (HF writes keys in a fixed order)
    for m in re.finditer(
        r'"(\w+)"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null|true|false|"[^"\n]*")\s*[,}\n]', text[:4096]
    ):
        try:
            state.setdefault(m.group(1), json.loads(m.group(2)))
        except ValueError:
            pass
    found = re.search(r'"log_history"\s*:\s*\[', text)
    if not found:
        return state, 0
    pos = found.end()
    history: list[Any] = []
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            break
        history.append(obj)
        pos = end
    state["log_history"] = history
    return state, pos


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


def parse_trainer_state(data: bytes, *, file: str = "trainer_state.json") -> tuple[dict[str, Any], Damage | None]:
    """Parse the bytes of a trainer_state.json; salvage what precedes any damage."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    try:
        state = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise UnreadableError(f"{file}: JSON nested too deeply to be a trainer_state.json") from None
    except ValueError as err:
        exc = err if isinstance(err, json.JSONDecodeError) else json.JSONDecodeError(str(err), text, 0)
        try:
            state, offset = _salvage(text)
        except RecursionError:
            raise UnreadableError(f"{file}: JSON nested too deeply to be a trainer_state.json") from None
        if not state.get("log_history"):
            raise UnreadableError(
                f"{file}: not valid JSON ({exc.msg} at offset {exc.pos}) and no log entry could be salvaged"
            ) from None
        entries = len(state["log_history"])
        return state, Damage(
            file=file,
            offset=offset,
            problem=f"invalid JSON ({exc.msg}) at offset {exc.pos}",
            salvaged=f"{entries} log_history entries before the damage",
        )
    if not isinstance(state, dict):
        raise UnreadableError(f"{file}: expected a JSON object, found {type(state).__name__}")
    return state, None


def _history_frame(history: list[Any], run: str, rank: int) -> tuple[pd.DataFrame, dict[str, Any], int, int]:
    """Long rows (raw, step, value, order, rank) of one log_history.

    Returns (rows, summary, entries without a step, entries dropped for an invalid step).

    Vectorised per column: a key missing from an entry is absent, a ``NaN`` written by HF is kept
    (the parser turns it into the :data:`_NAN` sentinel so the two can be told apart).
    """
    entries = [e for e in history if isinstance(e, dict)]
    empty = pd.DataFrame({"raw": [], "step": [], "value": [], "order": [], "rank": []})
    if not entries:
        return empty, {}, 0, 0
    wide = pd.DataFrame.from_records(entries)
    summary: dict[str, Any] = {}
    # the final summary entry has train_runtime: its values are the run's summary, not series
    if "train_runtime" in wide.columns:
        last = wide[wide["train_runtime"].notna()].tail(1)
        for key in _SUMMARY_KEYS:
            if key in last.columns and last[key].notna().any():
                summary[key] = _as_number(last[key].iloc[0])
        wide = wide.drop(columns=[c for c in _SUMMARY_KEYS if c in wide.columns])
    # entries without a step take the previous entry's step (HF always writes one; hand-made files may not)
    step = (
        pd.to_numeric(wide["step"], errors="coerce") if "step" in wide.columns else pd.Series(np.nan, index=wide.index)
    )
    step = step.where(np.isfinite(step.to_numpy(dtype=float)))
    # a step that is not a whole number in [0, 2**53) is not a global step: drop the entry (a single
    # negative step would otherwise read as a resume that supersedes the whole history before it)
    sv = step.to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isnan(sv) & ((sv < 0) | (sv >= _MAX_STEP) | (sv != np.floor(sv)))
    invalid = int(bad.sum())
    if invalid:
        wide, step = wide[~bad], step[~bad]
    missing = int(step.isna().sum())
    step = step.ffill().fillna(0).astype(np.int64).to_numpy()
    order = np.arange(len(wide))
    raws, steps, values, orders = [], [], [], []
    for col in wide.columns:
        if col == "step" or col in _NON_METRIC_KEYS:
            continue
        data = wide[col]
        if data.dtype == bool:
            continue
        if not pd.api.types.is_numeric_dtype(data.dtype):  # object, or pandas 3 string columns
            is_nan = (data == _NAN).to_numpy(dtype=bool)
            is_bool = data.map(type).isin((bool,)).to_numpy()
            num = pd.to_numeric(data.where(~is_nan & ~is_bool), errors="coerce").to_numpy(dtype=np.float64)
            keep = (~np.isnan(num)) | is_nan
            num = np.where(is_nan, np.nan, num)
        else:
            num = data.to_numpy(dtype=np.float64)
            keep = ~np.isnan(num)
        if not keep.any():
            continue
        raws.append(np.full(int(keep.sum()), str(col), dtype=object))
        steps.append(step[keep])
        values.append(num[keep])
        orders.append(order[keep])
    if not raws:
        return empty, summary, missing, invalid
    long = pd.DataFrame(
        {
            "raw": np.concatenate(raws),
            "step": np.concatenate(steps),
            "value": np.concatenate(values),
            "order": np.concatenate(orders),
        }
    )
    long["rank"] = rank
    return long, summary, missing, invalid


def _as_number(x: Any) -> Any:
    if isinstance(x, str) and x == _NAN:
        return float("nan")
    return x.item() if hasattr(x, "item") else x


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read and merge trainer_state.json files of one run into a canonical frame.

    Files are ranked by their ``global_step`` (the root file wins ties): for each (metric, step) the
    row from the highest-ranked file is kept, so a later checkpoint supersedes an earlier one and a
    history that only an earlier file holds is not lost.
    """
    info = RunInfo(name=run, sources=[SOURCE])
    parsed: list[tuple[int, int, Path, dict[str, Any]]] = []
    for path in paths:
        try:
            size = path.stat().st_size
            if size > MAX_BYTES:
                raise UnreadableError(f"{path}: {size} bytes is too large for a trainer_state.json")
            if size == 0:
                info.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
                continue
            _sniff(path)
            state, damage = parse_trainer_state(path.read_bytes(), file=str(path))
        except UnreadableError as exc:
            info.damage.append(
                Damage(file=str(path), offset=0, problem=str(exc).split(": ", 1)[-1], salvaged="nothing")
            )
            continue
        except OSError as exc:
            info.damage.append(
                Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing")
            )
            continue
        if damage is not None:
            info.damage.append(damage)
        gs = _int_or_none(state.get("global_step"))
        if gs is None:  # no usable global_step: rank the file by the last step it logged
            gs = _last_logged_step(state.get("log_history"))
        ck_step = checkpoint_step(path.parent.name)
        is_root = ck_step is None
        parsed.append((gs if gs is not None else -1, 1 if is_root else 0, path, state))
        info.files.append(str(path))
        if ck_step is not None:
            info.checkpoints[ck_step] = str(path.parent)
    parsed.sort(key=lambda t: (t[0], t[1]))
    rows = []
    for rank, (_, root_rank, path, state) in enumerate(parsed):
        history = state.get("log_history")
        if not isinstance(history, list):
            if history is not None:
                info.notes.append(f"{path}: log_history is {type(history).__name__}, not a list; ignored")
            history = []
        long, summary, missing, invalid = _history_frame(history, run, rank)
        if invalid:
            info.notes.append(
                f"{path}: {invalid} log_history entries dropped: their step is negative, fractional or too large"
            )
        if missing:
            info.notes.append(f"{path}: {missing} log_history entries had no step; they took the previous entry's step")
        for key, value in summary.items():
            info.summary[key] = value  # later (higher-ranked) files win
        rows.append(long)
        _fill_info(info, state, is_root=bool(root_rank))
    # the final summary entry proves the run finished; its absence proves nothing: HF writes a root
    # trainer_state.json only when the script calls save_state(), and a checkpoint's copy is saved mid-run
    info.finished = True if info.summary.get("train_runtime") is not None else None
    if rows and any(len(r) for r in rows):
        long = pd.concat([r for r in rows if len(r)], ignore_index=True)
        long = long.sort_values(["rank", "order"], kind="stable")
        # one row per (metric, step) from the highest-ranked file that has it
        top = long.groupby(["raw", "step"], sort=False)["rank"].transform("max")
        long = long[long["rank"] == top].sort_values(["rank", "order"], kind="stable")
        raw = long["raw"].astype(str).to_numpy()
        uniq = pd.unique(raw)
        mapping = {r: canonical_metric(r, hf_flat=True) for r in uniq}
        frame = make_frame(
            run=run,
            source=SOURCE,
            metric=pd.Series(raw).map(mapping).to_numpy(dtype=object),
            step=long["step"].to_numpy(),
            value=long["value"].to_numpy(dtype=np.float64),
            raw_metric=raw,
        )
    else:
        frame = make_frame(run=[], source=[], metric=[], step=[], value=[])
    return Imported.one(frame, info)


def _last_logged_step(history: Any) -> int | None:
    if not isinstance(history, list):
        return None
    steps = pd.to_numeric(
        pd.Series([e.get("step") if isinstance(e, dict) else None for e in history], dtype=object), errors="coerce"
    ).to_numpy(dtype=float)
    steps = steps[np.isfinite(steps) & (steps >= 0) & (steps < _MAX_STEP)]
    return int(steps.max()) if len(steps) else None


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
