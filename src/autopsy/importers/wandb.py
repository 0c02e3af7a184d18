"""Weights & Biases: offline/synced run directories, the public API, and history exports.

* **Run directories** (``wandb/offline-run-<date>-<id>/run-<id>.wandb``, synced ``wandb/run-*/``):
  wandb ships no Python reader for ``.wandb`` files, so the record log is read here
  (:mod:`autopsy.importers._leveldb_log`) and each record decoded with wandb's own
  ``wandb.proto.wandb_internal_pb2.Record``: history rows, config and summary updates, the run
  record and the exit record. A synced directory's ``files/config.yaml`` and
  ``files/wandb-summary.json`` are read too (config values unwrapped from ``{"value": ...}``).
* **Online** (``wandb://entity/project/run_id``): :func:`load_wandb_url` and, in a notebook,
  :func:`from_api_run` on a ``wandb.Api().run(...)`` object; the history is read unsampled with
  ``scan_history`` (``history()`` returns 500 sampled points and would hide a single NaN step).
* **Exports**: :func:`read_wandb_export` reads the history Parquet artifact (``_step``,
  ``_timestamp``, metric columns) and the UI's CSV export (``Step``, ``<run> - <metric>``,
  ``<run> - <metric>__MIN/__MAX``), and plain metric CSVs with a step column.

The x-axis: HF's ``WandbCallback`` adds ``train/global_step`` to every row, while W&B's own
``_step`` counts rows (every evaluation adds one), so ``train/global_step`` is the step when a
run has it (rows without it take the last one seen), else ``_step``. ``_timestamp`` is the wall
time. A missing exit record or a non-zero exit code is kept in the run info and noted: it is
evidence of a crash or a kill.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from autopsy._optional import require
from autopsy.errors import AutopsyError, InputError, UnreadableError
from autopsy.frame import Damage, RunInfo, canonical_metric, empty_frame, make_frame

__all__ = ["SOURCE", "from_api_run", "load_wandb_url", "read_wandb", "read_wandb_export", "read_wandb_file"]

SOURCE = "wandb"
MAX_BYTES = 4 << 30  # a .wandb file of more than 4 GiB is read only up to here
# step keys, in order of preference: HF's global step first, then W&B's row counter
STEP_KEYS = ("train/global_step", "trainer/global_step", "global_step", "_step")
_META_KEYS = {"_step", "_timestamp", "_runtime", "_wandb"}
_SCHEDULE_KEYS = ("max_steps", "logging_steps", "eval_steps", "save_steps")
_URL = re.compile(r"^wandb:/{1,2}(?P<path>[^/\s]+/[^/\s]+/(?:runs/)?[^/\s]+)/?$")
_CSV_STEP = ("Step", "step", "_step", "global_step", "train/global_step", "trainer/global_step")
_CSV_SUFFIX = re.compile(r"__(MIN|MAX)$")


# --- values ----------------------------------------------------------------------------------


def _parse_values(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``value_json`` -> (float values, keep mask). ``NaN``/``Infinity`` are kept as numbers;
    strings, booleans, objects (histograms, tables) and ``null`` are not metrics and are dropped."""
    s = pd.Series(texts, dtype=object)
    num = np.array(pd.to_numeric(s, errors="coerce"), dtype=np.float64)  # a writable copy
    keep = ~np.isnan(num)
    odd = np.flatnonzero(~keep)  # text that is not a plain number: look at those only
    if len(odd):
        # bare NaN, or non-finite tokens some clients write as JSON strings
        token = s.iloc[odd].astype(str).str.strip().str.strip('"').str.lower()
        tok_val = token.map({"nan": np.nan, "infinity": np.inf, "inf": np.inf, "-infinity": -np.inf, "-inf": -np.inf})
        hit = token.isin(["nan", "infinity", "inf", "-infinity", "-inf"]).to_numpy(dtype=bool)
        num[odd[hit]] = tok_val.to_numpy(dtype=np.float64)[hit]
        keep[odd[hit]] = True
    return num, keep


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _unwrap(value: Any) -> Any:
    """config.yaml wraps each value: ``{"value": v}`` (0.10-0.17 also ``{"desc": ..., "value": v}``)."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def _plain_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Scalars only (histograms, tables and W&B's own ``_wandb`` block are not run totals)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key.startswith("_"):
            continue  # W&B's own bookkeeping (_step, _runtime, _timestamp, _wandb)
        if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
            value = float(value)
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 200):
            out[key] = value
    return out


def _key_of(item: Any) -> str:
    return item.key if item.key else ".".join(item.nested_key)


# --- history -> frame ------------------------------------------------------------------------


def _history_frame(rows: np.ndarray, keys: np.ndarray, values: np.ndarray, *, run: str, source: str,
                   info: RunInfo, fallback_step: np.ndarray | None = None) -> pd.DataFrame:
    """Long history cells (row number, key, float value) -> canonical frame, with the step axis chosen
    per row (see the module doc)."""
    if len(rows) == 0:
        return empty_frame()
    n_rows = int(rows.max()) + 1
    step_key = None
    step = np.full(n_rows, np.nan)
    for key in STEP_KEYS:
        sel = (keys == key) & np.isfinite(values)
        if sel.any():
            step[rows[sel]] = values[sel]
            step_key = key
            break
    if step_key is None and fallback_step is not None and len(fallback_step) == n_rows:
        step = fallback_step.astype(np.float64)
        step_key = "row number"
    if step_key is None:
        step = np.arange(n_rows, dtype=np.float64)
        step_key = "row number"
    missing = np.isnan(step)
    if missing.any():
        # a row without the global step (a custom wandb.log between Trainer logs) takes the last one seen
        step = pd.Series(step).ffill().to_numpy()
        if np.isnan(step).any():
            step = np.where(np.isnan(step), 0.0, step)
        info.notes.append(f"{int(missing.sum())} W&B history row(s) had no {step_key}: they took the previous row's step")
    if step_key == "row number":
        info.notes.append("W&B history has no step column: rows are numbered in order")
    wall = np.full(n_rows, np.nan)
    sel = keys == "_timestamp"
    wall[rows[sel]] = values[sel]
    metric_sel = ~np.isin(keys, list(_META_KEYS) + [step_key]) & ~pd.Series(keys).str.startswith("_").to_numpy(dtype=bool)
    if step_key != "_step":
        metric_sel &= ~np.isin(keys, STEP_KEYS)
    r = rows[metric_sel]
    raw = keys[metric_sel]
    uniq = pd.unique(raw)
    mapping = {k: canonical_metric(str(k)) for k in uniq}
    frame = make_frame(
        run=run,
        source=source,
        metric=pd.Series(raw).map(mapping).to_numpy(dtype=object),
        step=np.round(step[r]).astype(np.int64),
        value=values[metric_sel],
        wall_time=wall[r],
        raw_metric=raw.astype(object),
    )
    return frame


def _cells_from_objects(rows: np.ndarray, keys: np.ndarray, objs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Present history cells with Python values -> numeric cells. Numbers are kept (NaN/inf
    included), ``"NaN"``/``"Infinity"`` strings become numbers, everything else (booleans, text,
    ``None``, media dicts) is not a metric and is dropped."""
    s = pd.Series(objs, dtype=object)
    kind = s.map(type)
    is_num = kind.isin((int, float, np.float64, np.float32, np.int64, np.int32)).to_numpy(dtype=bool)
    is_str = kind.isin((str,)).to_numpy(dtype=bool)
    values = np.full(len(s), np.nan)
    if is_num.any():
        values[is_num] = s[is_num].astype(np.float64).to_numpy()
    keep = is_num.copy()
    if is_str.any():
        num, ok = _parse_values(s[is_str].to_numpy(dtype=object))
        values[is_str] = num
        keep[is_str] = ok
    return rows[keep], keys[keep], values[keep]


def _cells_from_dicts(dicts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """API history rows (each a dict of the keys logged in that row) -> numeric cells."""
    cells = [(i, str(k), v) for i, row in enumerate(dicts) for k, v in row.items()]
    if not cells:
        return np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.float64)
    rows, keys, objs = zip(*cells)
    return _cells_from_objects(np.asarray(rows, dtype=np.int64), np.asarray(keys, dtype=object),
                               np.asarray(objs + (None,), dtype=object)[:-1])


def _cells_from_text(wide: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A wide table of text cells (a CSV export) -> numeric cells; empty cells were not logged."""
    long = wide.reset_index(drop=True).rename_axis("row").reset_index().melt(id_vars="row", var_name="key", value_name="text")
    long = long[long["text"].notna() & (long["text"] != "")]
    values, keep = _parse_values(long["text"].to_numpy(dtype=object))
    return (long["row"].to_numpy(dtype=np.int64)[keep], long["key"].astype(str).to_numpy(dtype=object)[keep], values[keep])


def _cells_from_parquet(path: Path, batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W&B's history Parquet -> numeric cells; Arrow's null (not logged) and NaN (logged) stay apart.
    Read a batch of rows at a time, metric columns only: memory is the cells, not the table."""
    require("pyarrow", purpose="read W&B Parquet history")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_l, keys_l, vals_l = [], [], []
    with pq.ParquetFile(path) as pf:
        schema = pf.schema_arrow
        wanted = [f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)
                  or pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]  # not media, tables, histograms
        offset = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
            idx = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
            offset += batch.num_rows
            for name, col in zip(batch.schema.names, batch.columns):
                valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
                if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
                    num = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
                    keep = valid
                else:
                    num, keep = _parse_values(np.asarray(col.to_pylist(), dtype=object))
                    keep &= valid
                if keep.any():
                    rows_l.append(idx[keep])
                    keys_l.append(np.full(int(keep.sum()), name, dtype=object))
                    vals_l.append(num[keep])
    if not rows_l:
        return np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.float64)
    return np.concatenate(rows_l), np.concatenate(keys_l), np.concatenate(vals_l)


# --- the .wandb record log -------------------------------------------------------------------


def read_wandb_file(path: Path, *, run: str, info: RunInfo) -> pd.DataFrame:
    """One ``.wandb`` file -> canonical frame; fills ``info`` (config, summary, exit, damage, notes)."""
    pb = require("wandb.proto.wandb_internal_pb2", purpose="read .wandb run files")
    try:
        size = path.stat().st_size
        if size == 0:
            info.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
            return empty_frame()
        with open(path, "rb") as fh:
            return _read_wandb_stream(fh, path, size, pb, run=run, info=info)
    except OSError as exc:
        info.damage.append(Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing"))
        return empty_frame()


def _read_wandb_stream(fh: Any, path: Path, size: int, pb: Any, *, run: str, info: RunInfo) -> pd.DataFrame:
    """The records of an open ``.wandb`` file, streamed block by block (memory: the decoded history, not the file)."""
    from autopsy.importers._leveldb_log import LogStream

    try:
        log = LogStream(fh, limit=MAX_BYTES)
    except ValueError as exc:
        info.damage.append(Damage(file=str(path), offset=0, problem=str(exc), salvaged="nothing"))
        return empty_frame()
    if size > MAX_BYTES:
        info.notes.append(f"{path}: read the first {MAX_BYTES} of {size} bytes")

    Record = pb.Record
    h_rows: list[int] = []
    h_keys: list[str] = []
    h_vals: list[str] = []
    h_stepnum: list[int] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    undecodable = 0
    exit_code: int | None = None
    has_exit = False
    for raw in log:
        rec = Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # google.protobuf.message.DecodeError and friends: one bad record, not the file
            undecodable += 1
            continue
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = len(h_stepnum)
            hist = rec.history
            h_stepnum.append(hist.step.num if hist.HasField("step") else row)
            items = hist.item
            h_rows.extend([row] * len(items))
            h_keys.extend([i.key or ".".join(i.nested_key) for i in items])
            h_vals.extend([i.value_json for i in items])
        elif kind == "config":
            _apply_updates(config, rec.config.update, rec.config.remove)
        elif kind == "summary":
            _apply_updates(summary, rec.summary.update, rec.summary.remove)
        elif kind == "run":
            r = rec.run
            _apply_updates(config, r.config.update, r.config.remove)
            _apply_updates(summary, r.summary.update, r.summary.remove)
            meta = {"id": r.run_id, "project": r.project, "entity": r.entity, "name": r.display_name}
            if r.HasField("start_time"):
                meta["start_time"] = r.start_time.seconds + r.start_time.nanos / 1e9
            if r.HasField("telemetry") and r.telemetry.cli_version:
                meta["client"] = r.telemetry.cli_version
            if r.resumed:
                meta["resumed"] = True
            slot = info.config.setdefault("wandb", {})
            if isinstance(slot, dict):
                slot.update({k: v for k, v in meta.items() if v not in ("", None)})
        elif kind == "exit":
            has_exit = True
            exit_code = int(rec.exit.exit_code)
    if undecodable:
        info.notes.append(f"{path}: {undecodable} of {log.n_records} records could not be decoded by this wandb's protobuf; skipped")
    if log.problems:
        first = log.problems[0][0]
        problems = "; ".join(f"{p} at offset {o}" for o, p in log.problems[:5])
        more = f" (+{len(log.problems) - 5} more)" if len(log.problems) > 5 else ""
        info.damage.append(Damage(file=str(path), offset=first, problem=problems + more,
                                  salvaged=f"{log.n_records} records ({len(h_stepnum)} history rows) read; "
                                           f"{log.skipped_bytes} bytes skipped"))
    if log.padded_tail:
        info.notes.append(f"{path}: ends in {log.padded_tail} zero bytes of block padding (the writer was stopped mid-block)")
    for key, value in _decoded(config).items():
        if key != "_wandb":
            info.config.setdefault(key, _unwrap(value))
    for key, value in _plain_summary(_decoded(summary)).items():
        info.summary.setdefault(key, value)
    _note_exit(info, path, has_exit=has_exit, exit_code=exit_code)
    if not h_rows:
        return empty_frame()
    values, keep = _parse_values(np.asarray(h_vals, dtype=object))
    rows = np.asarray(h_rows, dtype=np.int64)[keep]
    keys = np.asarray(h_keys, dtype=object)[keep]
    return _history_frame(rows, keys, values[keep], run=run, source=SOURCE, info=info,
                          fallback_step=np.asarray(h_stepnum, dtype=np.int64))


def _apply_updates(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any] = ()) -> None:
    """Fold config/summary updates; values stay JSON text until the end (:func:`_decoded`): a run's
    summary is rewritten at every step, and only its last value of each key matters."""
    target.update({i.key or ".".join(i.nested_key): i.value_json for i in updates})
    for item in removes:
        target.pop(_key_of(item), None)


def _decoded(raw: dict[str, str]) -> dict[str, Any]:
    return {key: _json_value(text) for key, text in raw.items()}


def _note_exit(info: RunInfo, path: Path, *, has_exit: bool, exit_code: int | None) -> None:
    if has_exit:
        info.exit_code = exit_code
        info.finished = True
        if exit_code:
            info.notes.append(f"{path.name}: the process exited with code {exit_code} (a crash or an interrupt)")
    else:
        info.finished = False
        info.notes.append(f"{path.name}: no exit record: the process was killed or crashed before finishing the W&B run")


def _read_run_files(files_dir: Path, info: RunInfo) -> None:
    """A synced run dir's ``files/config.yaml`` and ``files/wandb-summary.json``."""
    cfg_path = files_dir / "config.yaml"
    if cfg_path.is_file():
        yaml = require("yaml", purpose="read W&B config.yaml")
        try:
            data = yaml.safe_load(cfg_path.read_text(encoding="utf-8", errors="replace")) if cfg_path.stat().st_size < (16 << 20) else None
        except (OSError, yaml.YAMLError) as exc:
            info.damage.append(Damage(file=str(cfg_path), offset=None, problem=f"unreadable YAML: {str(exc).splitlines()[0]}", salvaged="nothing"))
            data = None
        if isinstance(data, dict):
            for key, value in data.items():
                if str(key) not in ("_wandb", "wandb_version"):
                    info.config.setdefault(str(key), _unwrap(value))
        info.files.append(str(cfg_path))
    sum_path = files_dir / "wandb-summary.json"
    if sum_path.is_file():
        try:
            data = json.loads(sum_path.read_text(encoding="utf-8", errors="replace")) if sum_path.stat().st_size < (16 << 20) else None
        except (OSError, ValueError, RecursionError) as exc:
            info.damage.append(Damage(file=str(sum_path), offset=None, problem=f"unreadable JSON: {exc}", salvaged="nothing"))
            data = None
        if isinstance(data, dict):
            # the summary file is the final state: it wins over the record log's updates
            info.summary.update(_plain_summary(data))
        info.files.append(str(sum_path))


def _fill_schedule(info: RunInfo) -> None:
    for key in _SCHEDULE_KEYS:
        v = info.config.get(key)
        if getattr(info, key) is None and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            setattr(info, key, int(v))
    ep = info.config.get("num_train_epochs")
    if info.num_train_epochs is None and isinstance(ep, (int, float)) and not isinstance(ep, bool):
        info.num_train_epochs = float(ep)


def read_wandb(paths: list[Path], *, run: str) -> pd.DataFrame:
    """Read a W&B run directory's files (``run-<id>.wandb``, ``files/config.yaml``,
    ``files/wandb-summary.json``) into one canonical frame (``source="wandb"``).

    Damage is salvaged and reported per file in ``RunInfo.damage``; a file from an older client
    whose records this wandb cannot decode is noted, never raised.
    """
    paths = [Path(p) for p in paths]
    info = RunInfo(name=run, sources=[SOURCE])
    frames = []
    logs = sorted(p for p in paths if p.suffix == ".wandb")
    for path in logs:
        info.files.append(str(path))
        frames.append(read_wandb_file(path, run=run, info=info))
    dirs = {p.parent / "files" for p in logs} | {p.parent for p in paths if p.parent.name == "files"}
    for files_dir in sorted(dirs):
        _read_run_files(files_dir, info)
    if not logs:
        info.notes.append("W&B run directory without a .wandb file: config and summary only, no history")
    _fill_schedule(info)
    frames = [f for f in frames if len(f)]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else empty_frame())
    if len(frames) > 1:
        frame = make_frame(**{c: frame[c].to_numpy() for c in ("run", "source", "metric", "step", "value", "wall_time", "raw_metric")})
    frame.attrs["runs"] = {run: info}
    return frame


# --- online: the public API ------------------------------------------------------------------


def from_api_run(run_obj: Any, *, name: str | None = None, page_size: int = 10_000) -> pd.DataFrame:
    """A ``wandb.Api().run("entity/project/run_id")`` object -> canonical frame (for notebooks).

    The history is read unsampled with ``run_obj.scan_history(page_size=...)`` (each row a dict of
    the keys logged in it). Only the attributes ``id``, ``name``, ``config``, ``summary``, ``state``
    and ``scan_history`` are used; the tests (which have no network) pass an object of that shape.
    """
    run = name or str(getattr(run_obj, "name", None) or getattr(run_obj, "id", None) or "wandb-run")
    info = RunInfo(name=run, sources=[SOURCE])
    try:
        rows = list(run_obj.scan_history(page_size=page_size))
        config = dict(run_obj.config or {})
        raw_summary = getattr(run_obj, "summary", None) or {}
        # the real HTTPSummary keeps its values in _json_dict; a plain mapping works as is
        summary = dict(getattr(raw_summary, "_json_dict", None) or raw_summary)
    except AutopsyError:
        raise
    except Exception as exc:  # the API raises requests/CommError/ValueError...: one line for a person
        raise UnreadableError(f"W&B API: cannot read run {getattr(run_obj, 'id', run)}: {_one_line(exc)}") from None
    for key, value in config.items():
        if not str(key).startswith("_wandb"):
            info.config.setdefault(str(key), _unwrap(value))
    info.config["wandb"] = {k: v for k, v in {"id": getattr(run_obj, "id", None), "name": getattr(run_obj, "name", None),
                                              "state": getattr(run_obj, "state", None)}.items() if v}
    info.summary.update(_plain_summary({str(k): v for k, v in summary.items()}))
    state = getattr(run_obj, "state", None)
    if state in ("finished",):
        info.finished = True
    elif state in ("crashed", "failed", "killed"):
        info.finished = False
        info.notes.append(f"W&B marks this run as {state}")
    _fill_schedule(info)
    r, k, v = _cells_from_dicts([row for row in rows if isinstance(row, dict)])
    frame = _history_frame(r, k, v, run=run, source=SOURCE, info=info) if len(r) else empty_frame()
    frame.attrs["runs"] = {run: info}
    return frame


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def load_wandb_url(spec: str, *, timeout: int = 20) -> pd.DataFrame:
    """``wandb://entity/project/run_id`` -> canonical frame through ``wandb.Api()``.

    An unreachable or unauthenticated API is a one-line :class:`AutopsyError` (the run can also be
    exported and read with :func:`read_wandb_export`, or its local ``wandb/run-*`` dir analysed).
    """
    m = _URL.match(str(spec).strip())
    if not m:
        raise InputError(f"not a W&B run address: {spec!r}; expected wandb://entity/project/run_id")
    path = m.group("path").replace("/runs/", "/")
    wandb = require("wandb", purpose="read runs from the W&B API")
    try:
        api = wandb.Api(timeout=timeout)
        run_obj = api.run(path)
    except Exception as exc:
        raise UnreadableError(f"W&B API: cannot open run {path}: {_one_line(exc)} "
                              "(check the network and WANDB_API_KEY, or analyse the local wandb/run-* directory)") from None
    return from_api_run(run_obj, name=path.rsplit("/", 1)[-1])


# --- exports ---------------------------------------------------------------------------------


def read_wandb_export(paths: list[Path], *, run: str) -> pd.DataFrame:
    """W&B history exports: the Parquet history artifact and the UI's CSV export (also plain metric CSVs).

    A CSV holding several runs' columns (``<run> - <metric>``) gives one run per name; a file with no
    step column is not a metrics export and is noted and skipped.
    """
    frames: list[pd.DataFrame] = []
    runs: dict[str, RunInfo] = {run: RunInfo(name=run, sources=[SOURCE])}
    for path in (Path(p) for p in paths):
        info = runs[run]
        try:
            if path.suffix == ".parquet":
                per_run = {run: _cells_from_parquet(path)}
            else:
                per_run = _csv_runs(path, run, info)
        except AutopsyError:
            raise
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            info.damage.append(Damage(file=str(path), offset=None, problem=f"unreadable export: {_one_line(exc)}", salvaged="nothing"))
            continue
        except Exception as exc:  # pyarrow.ArrowInvalid and friends
            info.damage.append(Damage(file=str(path), offset=None, problem=f"unreadable export: {_one_line(exc)}", salvaged="nothing"))
            continue
        if per_run is None:
            info.notes.append(f"{path.name}: no step column (Step, _step, global_step): not a metrics export; skipped")
            continue
        for name, cells in per_run.items():
            ri = runs.setdefault(name, RunInfo(name=name, sources=[SOURCE]))
            ri.files.append(str(path))
            r, k, v = cells if isinstance(cells, tuple) else _cells_from_text(cells)
            frames.append(_history_frame(r, k, v, run=name, source=SOURCE, info=ri))
    frames = [f for f in frames if len(f)]
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    if len(frames) > 1:
        frame = make_frame(**{c: frame[c].to_numpy() for c in ("run", "source", "metric", "step", "value", "wall_time", "raw_metric")})
    frame.attrs["runs"] = runs
    return frame


class _LineCapped(io.RawIOBase):
    """A binary file read through with its absurd physical lines (over ``cap`` bytes) dropped, so that
    pandas never holds one: memory is one read block plus at most ``cap`` bytes of a pending line.

    A first line (the header) over ``cap`` ends the stream: ``header_too_long`` says so."""

    def __init__(self, fh: Any, cap: int, block: int = 1 << 20) -> None:
        super().__init__()
        self._fh, self._cap, self._block = fh, cap, max(1, min(block, cap))
        self._out = bytearray()  # ready to hand out
        self._cur = bytearray()  # the line being read (not yet known to be short enough)
        self._cur_at = 0  # its byte offset
        self._skipping = False  # inside a line already over the cap
        self._pos = 0  # bytes read from the file
        self._lines = 0  # complete lines seen
        self._eof = False
        self.header_too_long = False
        self.dropped = 0
        self.first_dropped_at: int | None = None

    def readable(self) -> bool:
        return True

    def _drop(self) -> None:
        if self._lines == 0:
            self.header_too_long = True
            self._eof = True
        self.dropped += 1
        if self.first_dropped_at is None:
            self.first_dropped_at = self._cur_at
        self._cur = bytearray()
        self._skipping = False

    def _fill(self) -> None:
        data = self._fh.read(self._block)
        at = self._pos
        self._pos += len(data)
        if not data:
            self._eof = True
            if self._cur or self._skipping:  # a last line without its newline
                if self._skipping:
                    self._drop()
                else:
                    self._out += self._cur
                    self._cur = bytearray()
            return
        first = data.find(b"\n")
        if first < 0:  # the whole block continues the current line
            if not self._skipping:
                self._cur += data
                if len(self._cur) > self._cap:
                    self._skipping = True
                    self._cur = bytearray()
            return
        # the current line ends in this block
        if self._skipping or len(self._cur) + first + 1 > self._cap:
            self._drop()
            if self._eof:
                return
        else:
            self._out += self._cur
            self._out += data[:first + 1]
            self._cur = bytearray()
        self._lines += 1
        last = data.rfind(b"\n")
        if last > first:  # whole lines inside one block: each shorter than the block, so under the cap
            self._out += data[first + 1:last + 1]
            self._lines += 1  # at least one more (only "the header" vs "a later line" matters)
        self._cur = bytearray(data[last + 1:])
        self._cur_at = at + last + 1

    def peek_line(self) -> bytes:
        """The first line as it will be read (without consuming it); ``b""`` when there is none."""
        while b"\n" not in self._out and not self._eof:
            self._fill()
        end = self._out.find(b"\n")
        return bytes(self._out if end < 0 else self._out[:end + 1])

    def readinto(self, buf: Any) -> int:
        while not self._out and not self._eof:
            self._fill()
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        del self._out[:n]
        return n


_CSV_MAX_LINE = 4 << 20  # a physical line longer than this is not a CSV row (a corrupt or binary file)
_CSV_CELLS_PER_CHUNK = 2_000_000  # text cells parsed at a time


def _csv_runs(path: Path, run: str, info: RunInfo) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """The UI's CSV export split per run, with plain metric names; ``None`` without a step column.

    Cells are read as text so that an empty cell (not logged) and a written ``NaN`` stay apart. The
    file is streamed in chunks of rows, each turned into numeric cells at once; the ``__MIN``/``__MAX``
    columns are never parsed, and a line over 4 MiB is skipped (noted as damage)."""
    with open(path, "rb") as fh:
        stream = _LineCapped(fh, _CSV_MAX_LINE)
        header = stream.peek_line()
        if stream.header_too_long:
            raise ValueError(f"the first line is over {_CSV_MAX_LINE >> 20} MiB: not a CSV export")
        chunk_rows = max(100, _CSV_CELLS_PER_CHUNK // (header.count(b",") + 1))
        reader = pd.read_csv(io.BufferedReader(stream, buffer_size=1 << 20), dtype=str, keep_default_na=False,
                             na_values=[], usecols=lambda c: not _CSV_SUFFIX.search(str(c)), chunksize=chunk_rows)
        step_col: str | None = None
        groups: dict[str, dict[str, str]] = {}
        cells: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        offset = 0
        with reader:
            for text in reader:
                if step_col is None:
                    step_col = next((c for c in _CSV_STEP if c in text.columns), None)
                    if step_col is None:
                        return None
                    for col in text.columns:
                        if col == step_col:
                            continue
                        who, metric = col.split(" - ", 1) if " - " in col else (run, col)
                        groups.setdefault(who, {})[col] = metric
                single = len(groups) == 1
                for who, mapping in groups.items():
                    wide = text[[step_col, *mapping]].rename(columns={**mapping, step_col: "_step"})
                    r, k, v = _cells_from_text(wide)
                    cells.setdefault(run if single else who, []).append((r + offset, k, v))
                offset += len(text)
    if stream.dropped:
        info.damage.append(Damage(file=str(path), offset=stream.first_dropped_at,
                                  problem=f"{stream.dropped} line(s) over {_CSV_MAX_LINE >> 20} MiB (not CSV rows)",
                                  salvaged=f"{offset} rows read; those lines skipped"))
    if step_col is None:  # a header and no rows: look at the header alone
        cols = pd.read_csv(io.BytesIO(header), nrows=0, dtype=str).columns
        if not any(c in cols for c in _CSV_STEP):
            return None
        return {}
    out = {}
    for who, parts in cells.items():
        rows, keys, values = zip(*parts)
        out[who] = (np.concatenate(rows), np.concatenate(keys), np.concatenate(values))
    return out
