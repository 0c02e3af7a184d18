"""W&B history exports: the Parquet history artifact and the UI's CSV export (also plain metric CSVs).

The Parquet artifact has ``_step``, ``_timestamp`` and metric columns; the UI's CSV export has ``Step`` and
``<run> - <metric>`` columns (with ``__MIN``/``__MAX`` companions, left out). A CSV holding several runs' columns
gives one run per name; a file with no step column is not a metrics export and is noted and skipped. CSV files are
read in bounded chunks with absurd physical lines dropped, so a corrupt or binary file costs little memory.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.errors import AutopsyError, first_line
from autopsy.frame import empty_frame, make_frame
from autopsy.importers._base import Imported, ReadOptions
from autopsy.importers._wandb_history import SOURCE, cells_from_parquet, cells_from_text, history_frame
from autopsy.runinfo import Damage, RunInfo

__all__ = ["KIND", "PRIORITY", "claims", "read"]

KIND = "wandb_export"
PRIORITY = 1
_CSV_STEP = ("Step", "step", "_step", "global_step", "train/global_step", "trainer/global_step")
_CSV_SUFFIX = re.compile(r"__(MIN|MAX)$")


def claims(path: Path) -> int:
    """``wandb-history.parquet`` (or a ``*history*.parquet``) and CSV files."""
    name = path.name
    if name.endswith(".parquet") and "history" in name.lower():
        return 2
    return 2 if name.endswith(".csv") else 0


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """W&B history exports: the Parquet history artifact and the UI's CSV export (also plain metric CSVs).

    A CSV holding several runs' columns (``<run> - <metric>``) gives one run per name; a file with no
    step column is not a metrics export and is noted and skipped.
    """
    frames: list[pd.DataFrame] = []
    runs: dict[str, RunInfo] = {run: RunInfo(name=run, sources=[SOURCE])}
    for path in (Path(p) for p in paths):
        info = runs[run]
        per_run: dict[str, Any] | None
        try:
            if path.suffix == ".parquet":
                per_run = {run: cells_from_parquet(path)}
            else:
                per_run = _csv_runs(path, run, info)
        except AutopsyError:
            raise
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            info.damage.append(
                Damage(file=str(path), offset=None, problem=f"unreadable export: {first_line(exc)}", salvaged="nothing")
            )
            continue
        except Exception as exc:  # pyarrow.ArrowInvalid and friends
            info.damage.append(
                Damage(file=str(path), offset=None, problem=f"unreadable export: {first_line(exc)}", salvaged="nothing")
            )
            continue
        if per_run is None:
            info.notes.append(f"{path.name}: no step column (Step, _step, global_step): not a metrics export; skipped")
            continue
        for name, cells in per_run.items():
            ri = runs.setdefault(name, RunInfo(name=name, sources=[SOURCE]))
            ri.files.append(str(path))
            r, k, v = cells if isinstance(cells, tuple) else cells_from_text(cells)
            frames.append(history_frame(r, k, v, run=name, source=SOURCE, info=ri))
    frames = [f for f in frames if len(f)]
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    if len(frames) > 1:
        frame = make_frame(
            **{c: frame[c].array for c in ("run", "source", "metric", "step", "value", "wall_time", "raw_metric")}
        )
    return Imported(frame=frame, runs=runs)


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
            self._out += data[: first + 1]
            self._cur = bytearray()
        self._lines += 1
        last = data.rfind(b"\n")
        if last > first:  # whole lines inside one block: each shorter than the block, so under the cap
            self._out += data[first + 1 : last + 1]
            self._lines += 1  # at least one more (only "the header" vs "a later line" matters)
        self._cur = bytearray(data[last + 1 :])
        self._cur_at = at + last + 1

    def peek_line(self) -> bytes:
        """The first line as it will be read (without consuming it); ``b""`` when there is none."""
        while b"\n" not in self._out and not self._eof:
            self._fill()
        end = self._out.find(b"\n")
        return bytes(self._out if end < 0 else self._out[: end + 1])

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
        reader = pd.read_csv(
            io.BufferedReader(stream, buffer_size=1 << 20),
            dtype=str,
            keep_default_na=False,
            na_values=[],
            usecols=lambda c: not _CSV_SUFFIX.search(str(c)),
            chunksize=chunk_rows,
        )
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
                    r, k, v = cells_from_text(wide)
                    cells.setdefault(run if single else who, []).append((r + offset, k, v))
                offset += len(text)
    if stream.dropped:
        info.damage.append(
            Damage(
                file=str(path),
                offset=stream.first_dropped_at,
                problem=f"{stream.dropped} line(s) over {_CSV_MAX_LINE >> 20} MiB (not CSV rows)",
                salvaged=f"{offset} rows read; those lines skipped",
            )
        )
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
