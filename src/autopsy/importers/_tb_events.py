"""One TensorBoard event file read in bounded windows: the records framed (:mod:`autopsy.importers._tfrecord`), the
common one-scalar events decoded with numpy (:mod:`autopsy.importers._tb_fast`), every other record with
tensorboard's protobuf ``Event``.

The file is read :data:`WINDOW` bytes at a time, each window cut at its last whole record: memory holds one window
and the rows decoded so far, whatever the file's size (a 4 GB file, a 50 GB sparse one). A record longer than a
window is read alone (up to :data:`MAX_RECORD`; longer ones, never scalars, are skipped and counted). Reading stops
at the first framing that cannot be trusted (a bad length CRC: zero-filled or overwritten space); a record whose
data CRC fails is skipped alone.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy._optional import require
from autopsy.errors import UsageError
from autopsy.importers._base import ENGINES
from autopsy.importers._tb_fast import decode_fast
from autopsy.importers._tfrecord import FOOTER, HEADER, Problem, Records, scan
from autopsy.runinfo import Damage

__all__ = ["MAX_RECORD", "WINDOW", "EventFile", "read_event_file"]

WINDOW = 32 << 20  # bytes framed and decoded at a time
MAX_RECORD = 256 << 20  # a longer record (a graph, an image) is skipped unread: no scalar is that large


@dataclass
class EventFile:
    """What one event file holds: scalar rows in write order, texts, hparams, damage, notes."""

    path: Path
    tag_code: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # index into tag_names
    tag_names: list[str] = field(default_factory=list)  # distinct
    step: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    value: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    wall_time: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    texts: dict[str, str] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # value kinds not read (histograms, images, ...)
    damage: list[Damage] = field(default_factory=list)

    @property
    def tag(self) -> np.ndarray:
        """The tag of each row (object array of str)."""
        names = np.array(list(self.tag_names) + [""], dtype=object)[:-1]
        return names[self.tag_code] if len(self.tag_code) else np.empty(0, dtype=object)

    def set_tags(self, tags: Any) -> None:
        """Set the rows' tags from a sequence of str."""
        codes, uniq = pd.factorize(np.asarray(tags, dtype=object)) if len(tags) else (np.empty(0, np.int64), [])
        self.tag_code = np.asarray(codes, dtype=np.int64)
        self.tag_names = [str(u) for u in uniq]


_DT = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    14: "bf16",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}


def _tensor_scalar(t: Any) -> float | None:
    """The value of a one-element numeric TensorProto, or None."""
    size = 1
    for dim in t.tensor_shape.dim:
        size *= dim.size
    if size != 1 or t.dtype not in _DT:
        return None
    code = _DT[t.dtype]
    if t.tensor_content:
        raw = bytes(t.tensor_content)
        if code == "bf16":
            return float(np.frombuffer(raw[:2], dtype="<u2").astype(np.uint32).__lshift__(16).view(np.float32)[0])
        arr = np.frombuffer(raw, dtype=code)
        return float(arr[0]) if arr.size == 1 else None
    if t.dtype in (19, 14):  # half / bfloat16: the bits in half_val
        if not len(t.half_val):
            return None
        bits = int(t.half_val[0]) & 0xFFFF
        if t.dtype == 19:
            return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    for name in ("float_val", "double_val", "int_val", "int64_val", "bool_val", "uint32_val", "uint64_val"):
        vals = getattr(t, name)
        if len(vals):
            return float(vals[0])
    return None


def _hparams(content: bytes) -> dict[str, Any]:
    """The hyperparameters of an ``_hparams_/session_start_info`` (HF's old add_hparams)."""
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2

        data = plugin_data_pb2.HParamsPluginData.FromString(content)
    except Exception:
        return {}
    if not data.HasField("session_start_info"):
        return {}
    out: dict[str, Any] = {}
    for key, v in data.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            num = v.number_value
            out[key] = int(num) if num.is_integer() else num
        elif kind == "string_value":
            out[key] = None if v.string_value == "None" else v.string_value
        elif kind == "bool_value":
            out[key] = v.bool_value
    return out


def _decode_protobuf(
    ef: EventFile, buf: bytes, data_start: np.ndarray, length: np.ndarray, records: np.ndarray
) -> dict[str, list]:
    """Decode the records the fast path left with tensorboard's protobuf."""
    event_pb2 = require("tensorboard.compat.proto.event_pb2", purpose="read TensorBoard event files")
    parse = event_pb2.Event.FromString
    cols: dict[str, list] = {"record": [], "tag": [], "step": [], "value": [], "wall_time": []}
    for i in records.tolist():
        s = int(data_start[i])
        try:
            event = parse(buf[s : s + int(length[i])])
        except Exception:
            ef.skipped["undecodable event"] += 1
            continue
        if not event.HasField("summary"):
            continue  # file_version, session_log, graph, ...
        for v in event.summary.value:
            kind = v.WhichOneof("value")
            plugin = v.metadata.plugin_data.plugin_name
            number: float | None = None
            if plugin == "hparams":  # torch's add_hparams (no value) and TF2's hp.hparams (an empty tensor)
                if v.tag.endswith("session_start_info"):
                    ef.hparams.update(_hparams(bytes(v.metadata.plugin_data.content)))
                continue
            if kind == "simple_value":
                number = v.simple_value
            elif kind == "tensor" and (plugin == "text" or v.tensor.dtype == 7):
                if v.tensor.string_val:
                    ef.texts[v.tag] = bytes(v.tensor.string_val[0]).decode("utf-8", errors="replace")
                continue
            elif kind == "tensor":
                number = _tensor_scalar(v.tensor)
            if number is None:
                ef.skipped[plugin or kind or "empty value"] += 1
                continue
            cols["record"].append(i)
            cols["tag"].append(v.tag)
            cols["step"].append(event.step)
            cols["value"].append(number)
            cols["wall_time"].append(event.wall_time)
    return cols


def _windows(path: Path, ef: EventFile) -> Iterator[tuple[int, Records]]:
    """The file as (offset, framed window) pairs, each window cut after its last whole record; damage offsets in
    each window's problems are made absolute. Stops after a problem that ends what can be framed."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pos, want = 0, WINDOW
        while pos < size:
            fh.seek(pos)
            buf = fh.read(want)
            if not buf:
                break
            rec = scan(buf)
            more = pos + len(buf) < size
            if rec.cut and more:  # the window, not the file, ends inside a record: go on from that record
                rec.problems = [p for p in rec.problems if not p.problem.startswith("truncated")]
                if rec.next == 0:  # one record longer than the window
                    need = HEADER + int.from_bytes(buf[:8], "little") + FOOTER
                    if need <= MAX_RECORD and need > want:
                        want = need
                        continue
                    ef.skipped[f"record over {MAX_RECORD >> 20} MiB, not read"] += 1
                    pos, want = pos + need, WINDOW
                    continue
            for p in rec.problems:
                p.offset += pos
            yield pos, rec
            ended = rec.next < len(buf) and not rec.cut
            if not more or ended:
                break
            pos, want = pos + rec.next, WINDOW


def _damage(path: Path, problems: list[Problem], kept: int) -> list[Damage]:
    """The framing problems of one file as :class:`Damage` entries."""
    out = []
    for p in problems:
        if p.records_lost is not None:
            salvaged = f"{kept} intact record(s); {p.records_lost} skipped"
        else:
            salvaged = f"{kept} record(s) before offset {p.offset}" if kept else "nothing"
        out.append(Damage(file=str(path), offset=p.offset, problem=p.problem, salvaged=salvaged))
    return out


class _Rows:
    """Rows decoded window by window, with tag codes into one list of names."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, names: list[str], code: np.ndarray, step: Any, value: Any, wall: Any) -> None:
        if not len(code):
            return
        remap = np.array([self.names.setdefault(n, len(self.names)) for n in names] + [0], dtype=np.int64)[:-1]
        self.parts.append(
            (
                remap[code],
                np.asarray(step, dtype=np.int64),
                np.asarray(value, dtype=np.float64),
                np.asarray(wall, dtype=np.float64),
            )
        )

    def into(self, ef: EventFile) -> None:
        ef.tag_names = list(self.names)
        if self.parts:
            ef.tag_code, ef.step, ef.value, ef.wall_time = (np.concatenate(c) for c in zip(*self.parts))


def _decode_window(ef: EventFile, rows: _Rows, rec: Records) -> None:
    buf = rec.buf
    fast, rest = decode_fast(buf, rec.data_start, rec.length)
    slow = _decode_protobuf(ef, buf, rec.data_start, rec.length, rest) if len(rest) else None
    names, code = fast["names"], fast["code"]
    if slow and slow["record"]:
        index = {name: i for i, name in enumerate(names)}
        slow_code = np.fromiter(
            (index.setdefault(t, len(index)) for t in slow["tag"]), dtype=np.int64, count=len(slow["tag"])
        )
        names = list(index)
        record = np.concatenate([fast["record"], np.asarray(slow["record"], dtype=np.int64)])
        order = np.argsort(record, kind="stable")  # write order; values of one event stay in order
        rows.add(
            names,
            np.concatenate([code, slow_code])[order],
            np.concatenate([fast["step"], np.asarray(slow["step"], dtype=np.int64)])[order],
            np.concatenate([fast["value"], np.asarray(slow["value"], dtype=np.float64)])[order],
            np.concatenate([fast["wall_time"], np.asarray(slow["wall_time"], dtype=np.float64)])[order],
        )
    else:
        rows.add(names, code, fast["step"], fast["value"], fast["wall_time"])


def _read_fast(path: Path) -> EventFile:
    ef = EventFile(path=path)
    rows = _Rows()
    problems: list[Problem] = []
    for _, rec in _windows(path, ef):
        ef.records += len(rec.data_start)
        problems.extend(rec.problems)
        if len(rec.data_start):
            _decode_window(ef, rows, rec)
    rows.into(ef)
    if len(set(ef.tag_names)) < len(ef.tag_names):  # two byte strings decoded to one str (invalid UTF-8 replaced)
        uniq, remap = np.unique(np.array(ef.tag_names, dtype=object), return_inverse=True)
        ef.tag_names, ef.tag_code = [str(u) for u in uniq], remap.reshape(-1)[ef.tag_code]
    ef.damage = _damage(path, problems, ef.records)
    return ef


# --- the tbparse engine -----------------------------------------------------------------------------


def _read_tbparse(path: Path) -> EventFile:
    tbparse = require("tbparse", purpose="read TensorBoard files with engine='tbparse'")
    ef = EventFile(path=path)
    problems: list[Problem] = []
    for _, rec in _windows(path, ef):  # tbparse does not say what it could not read: the framing scan does
        ef.records += len(rec.data_start)
        problems.extend(rec.problems)
    ef.damage = _damage(path, problems, ef.records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tbparse raises pandas deprecation warnings (Pandas4Warning)
        reader = tbparse.SummaryReader(str(path), pivot=False, extra_columns={"wall_time"})
        scalars = reader.scalars
        try:
            tensors = reader.tensors
        except AttributeError as exc:  # tbparse 0.0.9 + tensorboard 2.21: no dtypes.int4 for int tensors
            tensors = pd.DataFrame()
            ef.skipped[f"scalar tensors tbparse cannot decode ({exc})"] += 1
        text = reader.text
    parts = []
    if len(scalars):
        parts.append(scalars[["step", "tag", "value", "wall_time"]])
    if len(tensors):
        t = tensors[["step", "tag", "value", "wall_time"]].copy()
        is_scalar = t["value"].map(lambda v: np.size(v) == 1 and np.asarray(v).dtype.kind in "fiub")
        t = t[is_scalar]
        t["value"] = t["value"].map(lambda v: float(np.asarray(v).reshape(-1)[0]))
        parts.append(t)
    if parts:
        df = pd.concat(parts, ignore_index=True).sort_values(["wall_time"], kind="stable")
        ef.set_tags(df["tag"].astype(str).to_numpy(dtype=object))
        ef.step = df["step"].to_numpy(dtype=np.int64)
        ef.value = df["value"].to_numpy(dtype=np.float64)
        ef.wall_time = df["wall_time"].to_numpy(dtype=np.float64)
    for tag, value in zip(text.get("tag", []), text.get("value", [])):
        ef.texts[str(tag)] = str(value)
    return ef


def read_event_file(path: str | Path, *, engine: str = "auto") -> EventFile:
    """Read one event file; damage and unreadable files are reported in ``.damage``, never raised."""
    if engine not in ENGINES:
        raise UsageError(f"unknown TensorBoard engine {engine!r}: use one of {', '.join(ENGINES)}")
    path = Path(path)
    ef = EventFile(path=path)
    try:
        if not path.stat().st_size:
            ef.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
            return ef
        return _read_tbparse(path) if engine == "tbparse" else _read_fast(path)
    except OSError as exc:
        problem = f"cannot read: {exc.strerror or exc}"
    except MemoryError:
        problem = "out of memory while reading it"
    ef.damage.append(Damage(file=str(path), offset=None, problem=problem, salvaged="nothing"))
    return ef
