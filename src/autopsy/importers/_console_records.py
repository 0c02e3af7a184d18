"""What one pass over a console log found, stored by column: one entry per *record* (a printed metric line, an HF
dict, a table row), one per *value* (a record's name/number pairs, each pointing at its record), one per *progress
bar*. A million-line log makes half a million records and two million values; as typed arrays they cost some
tens of bytes each, where a dict per record cost some hundreds.

The line grammars (:mod:`autopsy.importers._console_formats`) add a record at a time with :meth:`ConsoleParse.add`;
the bulk readers of the two shapes that make up nearly every line of an HF log
(:mod:`autopsy.importers._console_stream`) add thousands at a time. :meth:`ConsoleParse.finish` puts the records in
line order and hands out numpy arrays.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BAR", "DICT", "KINDS", "NO", "PAIRS", "TABLE", "ConsoleParse"]

NO = -(1 << 62)  # "not printed" in an integer column
DICT, PAIRS, BAR, TABLE = 0, 1, 2, 3  # record kinds: an HF dict, key/value pairs, a progress bar's postfix, a table row
KINDS = ("dict", "pairs", "bar", "table")
_OPTIONAL = ("step", "ep_e", "ep_i", "ep_n", "ct_i", "ct_n", "keras")  # NO for nearly every record of an HF log
_INT_COLUMNS = ("line", *_OPTIONAL)


def _ints() -> array[int]:
    return array("q")


def _raw(values: np.ndarray) -> memoryview:
    """A numpy array's bytes, without the copy ``tobytes`` makes."""
    return np.ascontiguousarray(values).data.cast("B")


def _typed(typecode: str, values: np.ndarray) -> array[Any]:
    out = array(typecode)
    out.frombytes(_raw(values))
    return out


@dataclass
class ConsoleParse:
    """Records, values and progress bars of one console log, and the context it printed."""

    # records: the line, the step the line names, an "epoch e [i/n]" (ep_*), an "i/n" counter (ct_*), the Keras
    # epoch header in force, each NO where the line printed none; the kind (DICT, PAIRS, BAR, TABLE). The optional
    # columns stop at their last printed value (the records after it are NO): read them with array().
    line: array[int] = field(default_factory=_ints)
    step: array[int] = field(default_factory=_ints)
    ep_e: array[int] = field(default_factory=_ints)
    ep_i: array[int] = field(default_factory=_ints)
    ep_n: array[int] = field(default_factory=_ints)
    ct_i: array[int] = field(default_factory=_ints)
    ct_n: array[int] = field(default_factory=_ints)
    keras: array[int] = field(default_factory=_ints)
    kind: array[int] = field(default_factory=lambda: array("b"))
    # values: the record, the name's code (see names), the number
    v_rec: array[int] = field(default_factory=_ints)
    v_code: array[int] = field(default_factory=_ints)
    v_val: array[float] = field(default_factory=lambda: array("d"))
    names: list[tuple[str, str, bool]] = field(default_factory=list)  # code -> (key, raw name, from an HF dict)
    _codes: dict[tuple[str, str, bool], int] = field(default_factory=dict)
    # progress bars: line, n, total
    tq_line: array[int] = field(default_factory=_ints)
    tq_i: array[int] = field(default_factory=_ints)
    tq_n: array[int] = field(default_factory=_ints)
    # context
    config: dict[str, Any] = field(default_factory=dict)
    max_steps_hint: int | None = None  # a counter's total (tqdm / iteration N/M), not a printed config
    has_banner: bool = False
    finished: bool = False
    summary: dict[str, float] = field(default_factory=dict)
    overflow: list[tuple[int, float]] = field(default_factory=list)  # (line, new scale)
    scale_floor_line: int | None = None
    last_counter: tuple[int, int] | None = None  # the last "i of n" progress the log printed
    last_counter_line: int = -1
    n_lines: int = 0
    tail: list[str] = field(default_factory=list)  # the lines from tail_start on (where a crash is looked for)
    tail_start: int = 0

    def __len__(self) -> int:
        return len(self.line)

    def code(self, key: str, raw: str, from_dict: bool) -> int:
        """The code of a value's name (its key on the line, its raw name, whether an HF dict printed it)."""
        k = (key, raw, from_dict)
        c = self._codes.get(k)
        if c is None:
            c = self._codes[k] = len(self.names)
            self.names.append(k)
        return c

    def counter_at(self, line: int, counter: tuple[int, int]) -> None:
        if line >= self.last_counter_line:
            self.last_counter, self.last_counter_line = counter, line

    def add(
        self,
        line: int,
        step: int | None,
        kind: int,
        values: dict[str, float],
        raw: dict[str, str],
        *,
        keras: int | None,
        epoch: tuple[int, int, int] | None = None,
        counter: tuple[int, int] | None = None,
    ) -> None:
        """One record and its values."""
        r = len(self.line)
        self.line.append(line)
        e, i, n = epoch if epoch is not None else (NO, NO, NO)
        ci, cn = counter if counter is not None else (NO, NO)
        printed = (step, e, i, n, ci, cn, keras)
        for name, v in zip(_OPTIONAL, printed):
            if v is not None and v != NO:
                col = getattr(self, name)
                if len(col) < r:
                    col.frombytes(_raw(np.full(r - len(col), NO, dtype=np.int64)))
                col.append(v)
        self.kind.append(kind)
        from_dict = kind == DICT
        for key, value in values.items():
            self.v_rec.append(r)
            self.v_code.append(self.code(key, raw.get(key, key), from_dict))
            self.v_val.append(value)
        if epoch is not None:
            self.counter_at(line, epoch[1:])
        elif counter is not None:
            self.counter_at(line, counter)

    def add_dicts(
        self, lines: np.ndarray, rec: np.ndarray, codes: np.ndarray, vals: np.ndarray, keras: np.ndarray
    ) -> None:
        """HF dict records in bulk: their lines and Keras epochs, and their values (``rec`` indexes ``lines``)."""
        r0 = len(self.line)
        n = len(lines)
        if (keras != NO).any():
            if len(self.keras) < r0:
                self.keras.frombytes(_raw(np.full(r0 - len(self.keras), NO, dtype=np.int64)))
            self.keras.frombytes(_raw(keras.astype(np.int64, copy=False)))
        self.line.frombytes(_raw(lines.astype(np.int64, copy=False)))
        self.kind.frombytes(_raw(np.full(n, DICT, dtype=np.int8)))
        self.v_rec.frombytes(_raw(rec.astype(np.int64) + r0))
        self.v_code.frombytes(_raw(codes.astype(np.int64, copy=False)))
        self.v_val.frombytes(_raw(vals.astype(np.float64, copy=False)))

    def add_bars(self, lines: np.ndarray, i: np.ndarray, n: np.ndarray) -> None:
        """Progress bars in bulk (lines in order, after every bar already added)."""
        self.tq_line.frombytes(_raw(lines.astype(np.int64, copy=False)))
        self.tq_i.frombytes(_raw(i.astype(np.int64, copy=False)))
        self.tq_n.frombytes(_raw(n.astype(np.int64, copy=False)))

    def array(self, name: str) -> np.ndarray:
        """A column as a numpy array (int64, float64 for values, int8 for the kind)."""
        col = getattr(self, name)
        dtype = {"d": np.float64, "b": np.int8}.get(col.typecode, np.int64)
        out = np.frombuffer(col, dtype=dtype) if len(col) else np.empty(0, dtype=dtype)
        if name in _OPTIONAL and len(out) < len(self.line):  # NO after the last printed value
            out = np.concatenate([out, np.full(len(self.line) - len(out), NO, dtype=np.int64)])
        return out

    def finish(self) -> None:
        """Records in line order (the bulk readers add theirs after a chunk's other lines), values grouped by record in
        the order they were printed, progress bars in line order."""
        self._sort("line", _INT_COLUMNS[1:] + ("kind",), record=True)
        self._sort("tq_line", ("tq_i", "tq_n"), record=False)

    def _sort(self, key: str, others: tuple[str, ...], *, record: bool) -> None:
        order = self.array(key)
        if not len(order) or bool((np.diff(order) >= 0).all()):
            return
        perm = np.argsort(order, kind="stable")
        columns = {name: self.array(name) for name in (key, *others)}
        for name, values in columns.items():
            setattr(self, name, _typed(getattr(self, name).typecode, values[perm]))
        if record:
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            rec = inverse[self.array("v_rec")]
            by = np.argsort(rec, kind="stable")
            self.v_rec = _typed("q", rec[by])
            self.v_code = _typed("q", self.array("v_code")[by])
            self.v_val = _typed("d", self.array("v_val")[by])

    def keep(self, keep: np.ndarray) -> None:
        """Only the records where ``keep`` is true, and their values."""
        columns = {name: self.array(name) for name in (*_INT_COLUMNS, "kind")}  # (before "line" gets shorter)
        for name, values in columns.items():
            setattr(self, name, _typed(getattr(self, name).typecode, values[keep]))
        rec = self.array("v_rec")
        vk = keep[rec]
        new_index = np.cumsum(keep) - 1
        self.v_rec = _typed("q", new_index[rec[vk]])
        self.v_code = _typed("q", self.array("v_code")[vk])
        self.v_val = _typed("d", self.array("v_val")[vk])
