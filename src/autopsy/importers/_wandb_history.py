"""W&B history rows -> the canonical frame: shared by the run-file, export and API readers.

The x-axis: HF's ``WandbCallback`` adds ``train/global_step`` to every row, while W&B's own ``_step`` counts rows
(every evaluation adds one), so ``train/global_step`` is the step when a run has it (rows without it take the last
one seen), else ``_step``. ``_timestamp`` is the wall time. Values arrive as JSON text; strings, booleans, objects
(histograms, tables) and ``null`` are not metrics and are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy._optional import require
from autopsy.frame import empty_frame, make_frame
from autopsy.metrics import canonical_metric, media_leaves
from autopsy.runinfo import RunInfo

SOURCE = "wandb"
# step keys, in order of preference: HF's global step first, then W&B's row counter
STEP_KEYS = ("train/global_step", "trainer/global_step", "global_step", "_step")
_META_KEYS = {"_step", "_timestamp", "_runtime", "_wandb"}


# --- values ----------------------------------------------------------------------------------


def parse_values(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def unwrap(value: Any) -> Any:
    """config.yaml wraps each value: ``{"value": v}`` (0.10-0.17 also ``{"desc": ..., "value": v}``)."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def plain_summary(summary: dict[str, Any]) -> dict[str, Any]:
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


def key_of(item: Any) -> str:
    return item.key if item.key else ".".join(item.nested_key)


# --- history -> frame ------------------------------------------------------------------------


def history_frame(
    rows: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    run: str,
    source: str,
    info: RunInfo,
    fallback_step: np.ndarray | None = None,
) -> pd.DataFrame:
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
        info.notes.append(
            f"{int(missing.sum())} W&B history row(s) had no {step_key}: they took the previous row's step"
        )
    if step_key == "row number":
        info.notes.append("W&B history has no step column: rows are numbered in order")
    wall = np.full(n_rows, np.nan)
    sel = keys == "_timestamp"
    wall[rows[sel]] = values[sel]
    metric_sel = ~np.isin(keys, list(_META_KEYS) + [step_key]) & ~pd.Series(keys).str.startswith("_").to_numpy(
        dtype=bool
    )
    if step_key != "_step":
        metric_sel &= ~np.isin(keys, STEP_KEYS)
    media = media_leaves(pd.unique(keys[metric_sel]))
    if media:
        metric_sel &= ~np.isin(keys, list(media))
        info.notes.append(f"{len(media)} W&B media/table field(s) (such as {sorted(media)[0]}) are not metrics")
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


def cells_from_objects(
    rows: np.ndarray, keys: np.ndarray, objs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        num, ok = parse_values(s[is_str].to_numpy(dtype=object))
        values[is_str] = num
        keep[is_str] = ok
    return rows[keep], keys[keep], values[keep]


def cells_from_dicts(dicts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """API history rows (each a dict of the keys logged in that row) -> numeric cells."""
    cells = [(i, str(k), v) for i, row in enumerate(dicts) for k, v in row.items()]
    if not cells:
        return np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.float64)
    rows, keys, objs = zip(*cells)
    return cells_from_objects(
        np.asarray(rows, dtype=np.int64), np.asarray(keys, dtype=object), np.asarray(objs + (None,), dtype=object)[:-1]
    )


def cells_from_text(wide: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A wide table of text cells (a CSV export) -> numeric cells; empty cells were not logged."""
    long = (
        wide.reset_index(drop=True)
        .rename_axis("row")
        .reset_index()
        .melt(id_vars="row", var_name="key", value_name="text")
    )
    long = long[long["text"].notna() & (long["text"] != "")]
    values, keep = parse_values(long["text"].to_numpy(dtype=object))
    return (
        long["row"].to_numpy(dtype=np.int64)[keep],
        long["key"].astype(str).to_numpy(dtype=object)[keep],
        values[keep],
    )


def cells_from_parquet(path: Path, batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W&B's history Parquet -> numeric cells; Arrow's null (not logged) and NaN (logged) stay apart.
    Read a batch of rows at a time, metric columns only: memory is the cells, not the table."""
    require("pyarrow", purpose="read W&B Parquet history")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_l, keys_l, vals_l = [], [], []
    with pq.ParquetFile(path) as pf:
        schema = pf.schema_arrow
        wanted = [
            f.name
            for f in schema
            if pa.types.is_floating(f.type)
            or pa.types.is_integer(f.type)
            or pa.types.is_string(f.type)
            or pa.types.is_large_string(f.type)
        ]  # not media, tables, histograms
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
                    num, keep = parse_values(np.asarray(col.to_pylist(), dtype=object))
                    keep &= valid
                if keep.any():
                    rows_l.append(idx[keep])
                    keys_l.append(np.full(int(keep.sum()), name, dtype=object))
                    vals_l.append(num[keep])
    if not rows_l:
        return np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.float64)
    return np.concatenate(rows_l), np.concatenate(keys_l), np.concatenate(vals_l)
