"""TensorBoard event files (``events.out.tfevents.*``), as HF Trainer's TensorBoardCallback writes them.

Scalars come from ``simple_value`` and from scalar tensors (float/double/half/bfloat16/int, in
``tensor_content`` or the ``*_val`` fields). The ``args`` and ``model_config`` text summaries
(JSON) become the run's config; HF's old ``add_hparams`` subdirectory (``_hparams_`` plugin data)
fills keys the args text did not give. HF's end-of-run entries (``train/train_runtime``,
``train/train_loss``, ...) go to the run's summary, not its series.

Engines: ``"fast"`` (default, ``"auto"``) frames records with :mod:`autopsy.importers._tfrecord`
(every CRC verified) and decodes the common one-scalar-per-event shape with numpy, falling back
to tensorboard's protobuf ``Event`` for every other record. ``"tbparse"`` reads values with tbparse
(the reference); damage is then still reported from the framing scan.

Several files of one run are read in write order (the timestamp and index in their names), so a
resumed run's repeated steps are flagged ``superseded`` by :func:`autopsy.frame.make_frame`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy._optional import require
from autopsy.errors import UsageError
from autopsy.frame import Damage, RunInfo, canonical_metric, make_frame
from autopsy.importers._tfrecord import gather

__all__ = ["ENGINES", "read_event_file", "read_tensorboard"]

SOURCE = "tensorboard"
ENGINES = ("auto", "fast", "tbparse")
# HF Trainer's final summary entry, logged once at the last step: run totals, not series
_SUMMARY_TAGS = {"train/train_runtime": "train_runtime", "train/train_samples_per_second": "train_samples_per_second",
                 "train/train_steps_per_second": "train_steps_per_second", "train/total_flos": "total_flos",
                 "train/train_loss": "train_loss"}
_ARGS_TAGS = ("args/text_summary", "args")
_MODEL_TAGS = ("model_config/text_summary", "model_config")
_NAME = re.compile(r"tfevents\.(?P<ts>\d+)(?:\.(?P<rest>.*?))?(?:\.(?P<idx>\d+))?(?:\.v2)?$")
_HASH_WEIGHTS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                          0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3,
                          0x1D8E4E27C47D124F, 0x9FB21C651E98DF25, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
                          0x2545F4914F6CDD1D, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x62A9D9ED799705F5],
                         dtype=np.uint64)


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


# --- the fast engine ------------------------------------------------------------------------------


def _varint(b: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode protobuf varints at ``pos`` (vectorised). Returns (value as int64, byte length)."""
    word = _view(b, "<u8")[pos]
    value = np.zeros(len(pos), dtype=np.uint64)
    size = np.zeros(len(pos), dtype=np.int64)
    going = np.ones(len(pos), dtype=bool)
    for k in range(8):  # steps below 2**56 fit in 8 bytes
        byte = (word >> np.uint64(8 * k)) & np.uint64(0xFF)
        value |= np.where(going, (byte & np.uint64(0x7F)) << np.uint64(7 * k), np.uint64(0))
        size += going
        going &= byte >= np.uint64(0x80)
    if going.any():  # 9- and 10-byte varints (negative steps): byte by byte
        idx = np.flatnonzero(going)
        for k in (8, 9):
            byte = b[pos[idx] + k].astype(np.uint64)
            live = going[idx]
            value[idx] |= np.where(live, (byte & np.uint64(0x7F)) << np.uint64(7 * k), np.uint64(0))
            size[idx] += live
            going[idx] = live & (byte >= 0x80)
    return value.view(np.int64), size


_U64 = np.uint64
_HIGH_BITS = _U64(0x8080808080808080)


def _varint_words(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode the protobuf varint at the start of each little-endian uint64 ``word`` (bit tricks, no
    loop). Returns (value as int64, byte length); the length is 0 where the varint is longer than 8
    bytes (value then meaningless)."""
    stop = ~word & _HIGH_BITS  # the high bit of each byte that ends a varint
    last = stop & (~stop + _U64(1))  # the first one
    keep = (last << _U64(1)) - _U64(1)  # the varint's bytes (all ones for an 8-byte varint)
    size = np.bitwise_count(keep & _HIGH_BITS).astype(np.int64)
    size[last == 0] = 0
    x = word & keep & _U64(0x7F7F7F7F7F7F7F7F)
    x = (x & _U64(0x007F007F007F007F)) | ((x & _U64(0x7F007F007F007F00)) >> _U64(1))
    x = (x & _U64(0x00003FFF00003FFF)) | ((x & _U64(0x3FFF00003FFF0000)) >> _U64(2))
    x = (x & _U64(0x000000000FFFFFFF)) | ((x & _U64(0x0FFFFFFF00000000)) >> _U64(4))
    return x.view(np.int64), size


def _view(b: np.ndarray, dtype: str) -> np.ndarray:
    """``b`` read as ``dtype`` at every byte offset (an unaligned strided view: index it with offsets)."""
    dt = np.dtype(dtype)
    return np.ndarray(shape=(len(b) - dt.itemsize + 1,), dtype=dt, buffer=b, strides=(1,))


def _tag_codes_long(b: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
    """Factorize the tag byte strings ``b[start:start+length]`` without making a Python object per row.

    Each tag is read as 8-byte words (bytes past its end masked off) and hashed; every row is then
    compared word by word with the first row of its code, so a hash collision cannot merge two tags.
    """
    n = len(start)
    words = (int(length.max()) + 7) // 8 if n else 0
    def u64(pos: np.ndarray) -> np.ndarray:  # the 8 bytes at each of pos, zero past the end of b
        return gather(b, pos, 8).view("<u8").reshape(-1)

    ones = np.uint64(0xFFFFFFFFFFFFFFFF)

    masks = []
    for w in range(words):
        keep = np.clip(length - 8 * w, 0, 8).astype(np.uint64)  # bytes of this word inside the tag
        masks.append(np.where(keep == 8, ones, (np.uint64(1) << (keep * np.uint64(8))) - np.uint64(1)))
    key = length.astype(np.uint64) * np.uint64(0x100000001B3)
    for w in range(words):
        key = key ^ ((u64(start + 8 * w) & masks[w]) * _HASH_WEIGHTS[w % len(_HASH_WEIGHTS)] + np.uint64(w))
        key = (key << np.uint64(13)) | (key >> np.uint64(51))
    codes, uniques = pd.factorize(key)
    codes = np.asarray(codes, dtype=np.int64)
    first = np.full(len(uniques), -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(n)[::-1]  # first row of each code
    names = [b[s:s + k].tobytes() for s, k in zip(start[first].tolist(), length[first].tolist())]
    rep_start, rep_len = start[first][codes], length[first][codes]
    same = rep_len == length
    for w in range(words):
        same &= ((u64(start + 8 * w) ^ u64(rep_start + 8 * w)) & masks[w]) == 0
    if not same.all():  # pragma: no cover - a 64-bit hash collision; exact fallback
        raw = [b[s:s + k].tobytes() for s, k in zip(start.tolist(), length.tolist())]
        codes, uniq = pd.factorize(pd.Series(raw, dtype=object))
        codes, names = np.asarray(codes, dtype=np.int64), list(uniq)
    return codes, names


_TAG_WORDS = 8  # tags up to 64 bytes: one (rows, words) matrix; longer ones word by word


@lru_cache(maxsize=_TAG_WORDS)
def _tail_masks(k: int) -> np.ndarray:
    """``[length]``: the (k,) uint64 words that keep the last ``length`` bytes of a ``8 k``-byte row."""
    width = 8 * k
    keep = (np.arange(width)[None, :] >= width - np.arange(256)[:, None]).astype(np.uint8) * np.uint8(0xFF)
    return np.ascontiguousarray(keep).view("<u8")


def _tag_codes(b: np.ndarray, start: np.ndarray, length: np.ndarray,
               words: np.ndarray | None = None) -> tuple[np.ndarray, list[bytes]]:
    """Factorize the tag byte strings ``b[start:start+length]`` (no Python object per row).

    ``words``: the tags right-aligned in (rows, k) 8-byte words, zero before each tag (else they are
    gathered here). The words are hashed and factorized on the hash; every row is then compared with
    the first row of its code, so a hash collision cannot merge two tags.
    """
    n = len(start)
    if not n:
        return np.empty(0, np.int64), []
    if words is None:
        k = (int(length.max()) + 7) // 8
        if k > _TAG_WORDS or k == 0:
            return _tag_codes_long(b, start, length)
        pos = start + length - 8 * k
        if int(pos.min()) < 0:
            return _tag_codes_long(b, start, length)
        words = gather(b, pos, 8 * k).view("<u8") & _tail_masks(k)[length]
    k = words.shape[1]
    key = length.astype(np.uint64) * np.uint64(0x100000001B3)
    for w in range(k):
        key ^= words[:, w] * _HASH_WEIGHTS[w]
    codes, _ = pd.factorize(key)
    codes = np.asarray(codes, dtype=np.int64)
    first = np.empty(int(codes.max()) + 1, dtype=np.int64)
    first[codes[::-1]] = np.arange(n)[::-1]  # first row of each code
    if not ((words == words[first][codes]).all() and (length == length[first][codes]).all()):
        return _tag_codes_long(b, start, length)  # pragma: no cover - a 64-bit hash collision
    names = [b[s:s + m].tobytes() for s, m in zip(start[first].tolist(), length[first].tolist())]
    return codes, names


_SCALAR_MIN = 21  # 09 wall_time(8) | 2A len 0A len 0A len tag(>=1) | 15 simple_value(4)
_MID = np.uint64(0x0A_00_0A_00_2A)  # 2A l1 0A l2 0A lt, lengths zero
_SIX_BYTES = np.uint64(0xFFFF_FFFF_FFFF)


_DECODE_ROWS = 1 << 15  # records per chunk: the decode's temporaries stay in the CPU cache


def _decode_chunk(b: np.ndarray, d: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`_decode_fast` on some records. Returns, for the ones of the scalar shape: (their index,
    step, value, wall time, tag start, tag length, tags right-aligned in k zero-filled words or None)."""
    n = len(b)
    e = d + length
    m = len(d)
    head = gather(b, d, 18)  # 09 wall(8) 10 step-varint(8): reads past a record land in the next, then fail
    ok = (length >= _SCALAR_MIN) & (head[:, 0] == 0x09)
    wall = np.ndarray(shape=(m,), dtype="<f8", buffer=head, offset=1, strides=(18,))  # read at `rows` below
    has_step = head[:, 9] == 0x10
    step, vlen = _varint_words(np.ndarray(shape=(m,), dtype="<u8", buffer=head, offset=10, strides=(18,)))
    step[~has_step] = 0
    long = has_step & (vlen == 0)
    if long.any():  # 9- and 10-byte varints (negative steps)
        idx = np.flatnonzero(long)
        lo = int(d[idx].min())
        pad = np.concatenate([b[lo:], np.zeros(32, dtype=np.uint8)])
        step[idx], vlen[idx] = _varint(pad, d[idx] + 10 - lo)
    p = d + 9 + np.where(has_step, 1 + vlen, 0)
    lt = e - 11 - p  # what the tag length must be
    ok &= (lt >= 0) & (lt + 9 < 0x80)
    lt[~ok] = 0
    ltu = lt.astype(np.uint64)
    mid = _MID | ((ltu + np.uint64(9)) << np.uint64(8)) | ((ltu + np.uint64(7)) << np.uint64(24)) | (ltu << np.uint64(40))
    ok &= (_view(b, "<u8")[np.minimum(p, n - 8)] & _SIX_BYTES) == mid
    rows = np.flatnonzero(ok)
    lt, e = lt[rows], e[rows]
    k = (int(lt.max()) + 7) // 8 if len(rows) else 0
    words = None
    if 0 < k <= _TAG_WORDS:  # the tags right-aligned in k words, then 15 value(4)
        at = e - 5 - 8 * k
        mat = gather(b, np.maximum(at, 0), 8 * k + 5)
        good = (mat[:, 8 * k] == 0x15) & (at >= 0)  # (a scalar event in the first bytes: never, after file_version)
        value = np.ndarray(shape=(len(rows),), dtype="<f4", buffer=mat, offset=8 * k + 1, strides=(8 * k + 5,))
        words = mat[:, :8 * k].view("<u8") & _tail_masks(k)[lt]
        if not good.all():
            rows, lt, e, value, words = rows[good], lt[good], e[good], value[good], words[good]
    else:
        good = b[np.maximum(e - 5, 0)] == 0x15
        rows, lt, e = rows[good], lt[good], e[good]
        value = _view(b, "<f4")[e - 4]
    return rows, step[rows], value.astype(np.float64), wall[rows], e - 5 - lt, lt, words


def _decode_fast(buf: bytes, data_start: np.ndarray, length: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Vectorised decode of events of the shape ``{wall_time, step, summary{value{tag, simple_value}}}``.

    The bytes: ``09 wall(8) [10 step-varint] 2A l1 0A l2 0A lt tag(lt) 15 value(4)`` with
    ``l2 = lt + 7``, ``l1 = lt + 9 < 0x80`` and the record ending right after the value. Returns
    (columns of the decoded rows: their record index, tag codes and names, step, value, wall time;
    indices of the other records).
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    parts = [_decode_chunk(b, data_start[i:i + _DECODE_ROWS], length[i:i + _DECODE_ROWS])
             for i in range(0, len(data_start), _DECODE_ROWS)]
    if not parts:
        parts = [_decode_chunk(b, data_start, length)]
    for i, part in zip(range(0, len(data_start), _DECODE_ROWS), parts):
        part[0][:] += i
    rows, step, value, wall, start, lt = (np.concatenate([q[c] for q in parts]) for c in range(6))
    if all(q[6] is not None or not len(q[0]) for q in parts) and any(q[6] is not None for q in parts):
        k = max(q[6].shape[1] for q in parts if q[6] is not None)
        words = np.concatenate([np.pad(q[6], ((0, 0), (k - q[6].shape[1], 0))) for q in parts if q[6] is not None])
        codes, names = _tag_codes(b, start, lt, words)
    else:
        codes, names = _tag_codes(b, start, lt)
    ok = np.zeros(len(data_start), dtype=bool)
    ok[rows] = True
    cols = {"record": rows, "code": codes, "names": [t.decode("utf-8", errors="replace") for t in names],
            "step": step, "value": value, "wall_time": wall}
    return cols, np.flatnonzero(~ok)


_DT = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 14: "bf16", 17: "<u2",
       19: "<f2", 22: "<u4", 23: "<u8"}


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
    except Exception:  # noqa: BLE001 - a damaged plugin payload is skipped, not fatal
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


def _decode_protobuf(ef: EventFile, buf: bytes, data_start: np.ndarray, length: np.ndarray,
                     records: np.ndarray) -> dict[str, list]:
    """Decode the records the fast path left with tensorboard's protobuf."""
    event_pb2 = require("tensorboard.compat.proto.event_pb2", purpose="read TensorBoard event files")
    parse = event_pb2.Event.FromString
    cols: dict[str, list] = {"record": [], "tag": [], "step": [], "value": [], "wall_time": []}
    for i in records.tolist():
        s = int(data_start[i])
        try:
            event = parse(buf[s:s + int(length[i])])
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: the CRC held, the payload is not an Event
            ef.skipped["undecodable event"] += 1
            continue
        if not event.HasField("summary"):
            continue  # file_version, session_log, graph, ...
        for v in event.summary.value:
            kind = v.WhichOneof("value")
            plugin = v.metadata.plugin_data.plugin_name
            number: float | None = None
            if kind == "simple_value":
                number = v.simple_value
            elif kind == "tensor" and (plugin == "text" or v.tensor.dtype == 7):
                if v.tensor.string_val:
                    ef.texts[v.tag] = bytes(v.tensor.string_val[0]).decode("utf-8", errors="replace")
                continue
            elif kind == "tensor":
                number = _tensor_scalar(v.tensor)
            elif plugin == "hparams":
                if v.tag.endswith("session_start_info"):
                    ef.hparams.update(_hparams(bytes(v.metadata.plugin_data.content)))
                continue
            if number is None:
                ef.skipped[plugin or kind or "empty value"] += 1
                continue
            cols["record"].append(i)
            cols["tag"].append(v.tag)
            cols["step"].append(event.step)
            cols["value"].append(number)
            cols["wall_time"].append(event.wall_time)
    return cols


def _damage(path: Path, problems: list, kept: int) -> list[Damage]:
    """The framing problems of one file as :class:`Damage` entries."""
    out = []
    for p in problems:
        if p.records_lost is not None:
            salvaged = f"{kept} intact record(s); {p.records_lost} skipped"
        else:
            salvaged = f"{kept} record(s) before offset {p.offset}" if kept else "nothing"
        out.append(Damage(file=str(path), offset=p.offset, problem=p.problem, salvaged=salvaged))
    return out


def _read_fast(path: Path, buf: bytes) -> EventFile:
    from autopsy.importers._tfrecord import scan

    ef = EventFile(path=path)
    rec = scan(buf)
    ef.records = len(rec.data_start)
    ef.damage = _damage(path, rec.problems, ef.records)
    if not ef.records:
        return ef
    fast, rest = _decode_fast(buf, rec.data_start, rec.length)
    slow = _decode_protobuf(ef, buf, rec.data_start, rec.length, rest) if len(rest) else None
    names = fast["names"]
    code = fast["code"]
    if len(set(names)) < len(names):  # two byte strings decoded to one str (invalid UTF-8 replaced)
        uniq, remap = np.unique(np.array(names, dtype=object), return_inverse=True)
        names, code = [str(u) for u in uniq], remap.reshape(-1)[code]
    if slow and slow["record"]:
        index = {name: i for i, name in enumerate(names)}
        names = list(names)
        slow_code = np.fromiter((index.setdefault(t, len(index)) for t in slow["tag"]), dtype=np.int64,
                                count=len(slow["tag"]))
        names.extend(list(index)[len(names):])
        record = np.concatenate([fast["record"], np.asarray(slow["record"], dtype=np.int64)])
        order = np.argsort(record, kind="stable")  # write order; values of one event stay in order
        ef.tag_code = np.concatenate([code, slow_code])[order]
        ef.step = np.concatenate([fast["step"], np.asarray(slow["step"], dtype=np.int64)])[order]
        ef.value = np.concatenate([fast["value"], np.asarray(slow["value"], dtype=np.float64)])[order]
        ef.wall_time = np.concatenate([fast["wall_time"], np.asarray(slow["wall_time"], dtype=np.float64)])[order]
    else:
        ef.tag_code, ef.step, ef.value, ef.wall_time = code, fast["step"], fast["value"], fast["wall_time"]
    ef.tag_names = list(names)
    return ef


# --- the tbparse engine -----------------------------------------------------------------------------


def _read_tbparse(path: Path, buf: bytes) -> EventFile:
    from autopsy.importers._tfrecord import scan

    tbparse = require("tbparse", purpose="read TensorBoard files with engine='tbparse'")
    ef = EventFile(path=path)
    rec = scan(buf)  # tbparse does not say what it could not read: the framing scan does
    ef.records = len(rec.data_start)
    ef.damage = _damage(path, rec.problems, ef.records)
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


# --- one file, one run ----------------------------------------------------------------------------------


def read_event_file(path: str | Path, *, engine: str = "auto") -> EventFile:
    """Read one event file; damage and unreadable files are reported in ``.damage``, never raised."""
    if engine not in ENGINES:
        raise UsageError(f"unknown TensorBoard engine {engine!r}: use one of {', '.join(ENGINES)}")
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        ef = EventFile(path=path)
        ef.damage.append(Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing"))
        return ef
    if not buf:
        ef = EventFile(path=path)
        ef.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
        return ef
    return _read_tbparse(path, buf) if engine == "tbparse" else _read_fast(path, buf)


def _write_order(path: Path) -> tuple[int, int, str]:
    """Files of one run sort by the creation timestamp and the writer index in their names."""
    m = _NAME.search(path.name)
    if not m:
        return (0, 0, str(path))
    return (int(m.group("ts")), int(m.group("idx") or 0), str(path))


def _json_text(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):  # some writers fence the JSON as markdown
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


def _apply_texts(info: RunInfo, ef: EventFile) -> bool:
    """The args/model_config texts into the config. Returns True when HF's args text was found."""
    from autopsy.importers import _MODEL_KEYS

    found = False
    for tag in _ARGS_TAGS:
        if tag in ef.texts:
            data = _json_text(ef.texts[tag])
            if isinstance(data, dict):
                found = True
                for key, value in data.items():
                    info.config.setdefault(key, value)
            else:
                info.notes.append(f"{ef.path}: the '{tag}' text is not JSON; ignored")
    for tag in _MODEL_TAGS:
        if tag in ef.texts:
            data = _json_text(ef.texts[tag])
            if isinstance(data, dict):
                info.config.setdefault("model", {k: data[k] for k in _MODEL_KEYS if k in data})
    for key, value in ef.hparams.items():
        info.config.setdefault(key, value)
    return found


def _first_seen(codes: np.ndarray, k: int) -> np.ndarray:
    """Relabel ``codes`` (``0..k-1``) in order of first appearance, dropping labels never used.
    Returns the new code of each old label (-1: unused)."""
    first = np.full(k, len(codes), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes), dtype=np.int64)[::-1]
    used = np.flatnonzero(first < len(codes))
    new = np.full(k, -1, dtype=np.int64)
    new[used[np.argsort(first[used], kind="stable")]] = np.arange(len(used), dtype=np.int64)
    return new


def _text_index(names: list[str]) -> pd.Index:
    return pd.Index(np.asarray(names + [""], dtype=object)[:-1].astype(str))


def read_tensorboard(paths: list[Path], *, run: str, engine: str = "auto") -> pd.DataFrame:
    """Read the event files of one run into a canonical frame (``source="tensorboard"``)."""
    info = RunInfo(name=run, sources=[SOURCE])
    codes, steps, values, walls = [], [], [], []
    names: dict[str, int] = {}  # every tag of the run -> its code
    hf_args = False
    for path in sorted((Path(p) for p in paths), key=_write_order):
        ef = read_event_file(path, engine=engine)
        info.files.append(str(path))
        info.damage.extend(ef.damage)
        if not ef.damage and ef.records <= 1 and not len(ef.tag_code):
            info.notes.append(f"{path}: header only: the writer was opened but logged nothing")
        elif not len(ef.tag_code) and not ef.damage and (ef.texts or ef.hparams):
            info.notes.append(f"{path}: no scalars (only {', '.join(sorted(ef.texts) or ['hparams'])})")
        if ef.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(ef.skipped.items()))
            info.notes.append(f"{path}: values not read as scalars: {kinds}")
        hf_args |= _apply_texts(info, ef)
        remap = np.array([names.setdefault(t, len(names)) for t in ef.tag_names] + [0], dtype=np.int64)[:-1]
        codes.append(remap[ef.tag_code] if len(ef.tag_code) else np.empty(0, dtype=np.int64))
        steps.append(ef.step)
        values.append(ef.value)
        walls.append(ef.wall_time)
    code = np.concatenate(codes) if codes else np.empty(0, dtype=np.int64)
    step = np.concatenate(steps) if steps else np.empty(0, dtype=np.int64)
    value = np.concatenate(values) if values else np.empty(0, dtype=np.float64)
    wall = np.concatenate(walls) if walls else np.empty(0, dtype=np.float64)
    tags = list(names)
    is_summary = np.array([t in _SUMMARY_TAGS for t in tags] + [False], dtype=bool)[:-1]
    if len(code) and is_summary.any():
        summary = is_summary[code]
        if summary.any():
            for c, v in zip(code[summary].tolist(), value[summary].tolist()):
                info.summary[_SUMMARY_TAGS[tags[c]]] = v  # the last one written wins
            keep = ~summary
            code, step, value, wall = code[keep], step[keep], value[keep], wall[keep]
    if len(code):
        new = _first_seen(code, len(tags))  # categories in order of first appearance, none unused
        raw_names = [t for t, c in sorted(((t, int(c)) for t, c in zip(tags, new) if c >= 0), key=lambda x: x[1])]
        code = new[code]
        metric_codes, metric_names = pd.factorize(np.array([canonical_metric(t) for t in raw_names] + [""],
                                                           dtype=object)[:-1])
        metric = pd.Categorical.from_codes(np.asarray(metric_codes, dtype=np.int64)[code],
                                           categories=_text_index([str(m) for m in metric_names]))
        raw = pd.Categorical.from_codes(code, categories=_text_index(raw_names))
    else:
        metric, raw = [], np.empty(0, dtype=object)
    frame = make_frame(run=run, source=SOURCE, metric=metric, step=step, value=value, wall_time=wall, raw_metric=raw)
    if len(frame):
        info.global_step = int(frame.loc[~frame["superseded"], "step"].max())
    if "train_runtime" in info.summary:
        info.finished = True
    elif hf_args and len(frame):
        info.finished = False  # HF's callback logs train_runtime when train() returns
    frame.attrs["runs"] = {run: info}
    return frame
