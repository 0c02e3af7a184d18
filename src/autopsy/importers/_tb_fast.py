"""The fast TensorBoard engine: HF-shaped scalar events decoded with numpy, thousands of records per call.

An HF ``SummaryWriter`` event holding one ``simple_value`` has one fixed shape: ``09`` wall_time (8 bytes) |
``10`` step (varint) | ``2A`` summary { ``0A`` value { ``0A`` tag | ``15`` simple_value (4 bytes) } }. This module
finds the records of that shape, decodes their step varints and values in vectorised passes, and hashes their tags
to codes; every other record is left to tensorboard's protobuf ``Event`` (:mod:`autopsy.importers.tensorboard`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from autopsy.importers._tfrecord import gather

__all__ = ["decode_fast"]

_HASH_WEIGHTS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xA0761D6478BD642F,
        0xE7037ED1A0B428DB,
        0x8EBC6AF09C88C6E3,
        0x589965CC75374CC3,
        0x1D8E4E27C47D124F,
        0x9FB21C651E98DF25,
        0xBF58476D1CE4E5B9,
        0x94D049BB133111EB,
        0x2545F4914F6CDD1D,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0x62A9D9ED799705F5,
    ],
    dtype=np.uint64,
)


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
    names = [b[s : s + k].tobytes() for s, k in zip(start[first].tolist(), length[first].tolist())]
    rep_start, rep_len = start[first][codes], length[first][codes]
    same = rep_len == length
    for w in range(words):
        same &= ((u64(start + 8 * w) ^ u64(rep_start + 8 * w)) & masks[w]) == 0
    if not same.all():  # pragma: no cover - a 64-bit hash collision; exact fallback
        raw = [b[s : s + k].tobytes() for s, k in zip(start.tolist(), length.tolist())]
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


def _tag_codes(
    b: np.ndarray, start: np.ndarray, length: np.ndarray, words: np.ndarray | None = None
) -> tuple[np.ndarray, list[bytes]]:
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
    names = [b[s : s + m].tobytes() for s, m in zip(start[first].tolist(), length[first].tolist())]
    return codes, names


_SCALAR_MIN = 21  # 09 wall_time(8) | 2A len 0A len 0A len tag(>=1) | 15 simple_value(4)
_MID = np.uint64(0x0A_00_0A_00_2A)  # 2A l1 0A l2 0A lt, lengths zero
_SIX_BYTES = np.uint64(0xFFFF_FFFF_FFFF)


_DECODE_ROWS = 1 << 15  # records per chunk: the decode's temporaries stay in the CPU cache


def _decode_chunk(b: np.ndarray, d: np.ndarray, length: np.ndarray) -> tuple[Any, ...]:
    """:func:`decode_fast` on some records. Returns, for the ones of the scalar shape: (their index,
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
    mid = (
        _MID | ((ltu + np.uint64(9)) << np.uint64(8)) | ((ltu + np.uint64(7)) << np.uint64(24)) | (ltu << np.uint64(40))
    )
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
        words = mat[:, : 8 * k].view("<u8") & _tail_masks(k)[lt]
        if not good.all():
            rows, lt, e, value, words = rows[good], lt[good], e[good], value[good], words[good]
    else:
        good = b[np.maximum(e - 5, 0)] == 0x15
        rows, lt, e = rows[good], lt[good], e[good]
        value = _view(b, "<f4")[e - 4]
    return rows, step[rows], value.astype(np.float64), wall[rows], e - 5 - lt, lt, words


def decode_fast(buf: bytes, data_start: np.ndarray, length: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Vectorised decode of events of the shape ``{wall_time, step, summary{value{tag, simple_value}}}``.

    The bytes: ``09 wall(8) [10 step-varint] 2A l1 0A l2 0A lt tag(lt) 15 value(4)`` with
    ``l2 = lt + 7``, ``l1 = lt + 9 < 0x80`` and the record ending right after the value. Returns
    (columns of the decoded rows: their record index, tag codes and names, step, value, wall time;
    indices of the other records).
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    parts = [
        _decode_chunk(b, data_start[i : i + _DECODE_ROWS], length[i : i + _DECODE_ROWS])
        for i in range(0, len(data_start), _DECODE_ROWS)
    ]
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
    cols = {
        "record": rows,
        "code": codes,
        "names": [t.decode("utf-8", errors="replace") for t in names],
        "step": step,
        "value": value,
        "wall_time": wall,
    }
    return cols, np.flatnonzero(~ok)
