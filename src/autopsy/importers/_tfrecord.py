"""TFRecord framing of TensorBoard event files: record boundaries and CRC checks.

A record is ``uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32
masked_crc32c(data)``, little-endian, with ``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8``.

TensorBoard's own reader checks every CRC in pure Python, one record at a time. Here one tight pass
reads the length fields (the only sequential part: each record's offset depends on the previous
length); the length CRCs are then computed once per distinct length value (numpy tables: CRC-32C is
affine in the data, so an ``L``-byte CRC is ``crc(0^L)`` XOR each byte's table contribution at its
distance from the end), and the data CRCs with ``google_crc32c`` (C), or the same numpy tables
without it.

Damage (a record cut off by a crash, a flipped byte) never raises: :func:`scan` returns the intact
records and a list of :class:`Problem` entries saying where the damage starts and what was kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = ["HEADER", "Problem", "Records", "crc32c_many", "masked_crc", "scan"]

HEADER = 12  # 8-byte length + 4-byte length CRC
FOOTER = 4
_MASK_DELTA = np.uint32(0xA282EAD8)
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_MAX_RECORD = 1 << 31  # a length above 2 GiB is a broken length field, not a record


@dataclass
class Problem:
    """Damage found in the framing: where it starts and what it means."""

    offset: int
    problem: str
    records_lost: int | None = None  # known count of skipped records (None: the rest of the file)


@dataclass
class Records:
    """The intact records of one file: data start offsets and lengths (int64), in file order."""

    buf: bytes
    data_start: np.ndarray
    length: np.ndarray
    framed: int = 0  # records whose framing was read (intact or skipped for a bad data CRC)
    problems: list[Problem] = field(default_factory=list)


@lru_cache(maxsize=1)
def _table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


@lru_cache(maxsize=8)
def _distance_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``Z[k][v]``: the linear CRC contribution of byte ``v`` followed by ``k`` zero bytes; and
    ``C[L]`` = crc32c of ``L`` zero bytes (the affine part), for ``k, L < n``."""
    t = _table()
    z = np.empty((n, 256), dtype=np.uint32)
    z[0] = t
    for k in range(1, n):
        prev = z[k - 1]
        z[k] = t[prev & 0xFF] ^ (prev >> 8)
    c = np.empty(n + 1, dtype=np.uint32)
    state = 0xFFFFFFFF
    tl = t.tolist()
    for length in range(n + 1):
        c[length] = state ^ 0xFFFFFFFF
        state = tl[state & 0xFF] ^ (state >> 8)
    return z, c


def masked_crc(crc: np.ndarray) -> np.ndarray:
    """TFRecord's mask of a uint32 CRC array."""
    crc = crc.astype(np.uint32, copy=False)
    return (((crc >> np.uint32(15)) | (crc << np.uint32(17))) + _MASK_DELTA).astype(np.uint32)


def _view(b: np.ndarray, dtype: str) -> np.ndarray:
    """``b`` read as ``dtype`` at every byte offset (an unaligned strided view: index it with offsets)."""
    dt = np.dtype(dtype)
    return np.ndarray(shape=(max(len(b) - dt.itemsize + 1, 0),), dtype=dt, buffer=b, strides=(1,))


def _u32_at(b: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return _view(b, "<u4")[pos]


def _crc_group(b: np.ndarray, start: np.ndarray, n: int) -> np.ndarray:
    """crc32c of ``n``-byte ranges at ``start``, vectorised across the ranges (one table lookup per byte)."""
    z, c = _distance_tables(max(n + 1, 64))
    acc = np.full(len(start), c[n], dtype=np.uint32)
    for j in range(n):
        acc ^= z[n - 1 - j][b[start + j]]
    return acc


def crc32c_many(b: np.ndarray, start: np.ndarray, length: np.ndarray, *, buf: bytes | None = None) -> np.ndarray:
    """crc32c of the byte ranges ``b[start:start+length]``.

    With ``google_crc32c`` (C, in the tensorboard extra) one call per range: in a fresh process this
    beats the table lookups, whose tables are cold. Without it, numpy: ranges of one length at a time.
    """
    from autopsy._optional import available

    if available("google_crc32c"):
        import google_crc32c

        src = buf if buf is not None else b.tobytes()
        value = google_crc32c.value
        return np.fromiter((value(src[s:s + n]) for s, n in zip(start.tolist(), length.tolist())),
                           dtype=np.uint32, count=len(start))
    out = np.zeros(len(start), dtype=np.uint32)
    order = np.argsort(length, kind="stable")
    bounds = np.flatnonzero(np.diff(length[order])) + 1
    for grp in np.split(order, bounds) if len(order) else []:
        out[grp] = _crc_group(b, start[grp], int(length[grp[0]]))
    return out


def _length_crc(b: np.ndarray, start: np.ndarray) -> np.ndarray:
    """crc32c of the 8-byte length fields at ``start``: computed once per distinct length value."""
    values, inverse = np.unique(_view(b, "<u8")[start], return_inverse=True)
    raw = np.frombuffer(values.astype("<u8").tobytes(), dtype=np.uint8)
    return _crc_group(raw, np.arange(len(values), dtype=np.int64) * 8, 8)[inverse]


@lru_cache(maxsize=1)
def _zero_length_crc() -> bytes:
    """The length CRC field of a record whose length is 0 (masked crc32c of 8 zero bytes)."""
    t = _table().tolist()
    state = 0xFFFFFFFF
    for _ in range(8):
        state = t[state & 0xFF] ^ (state >> 8)
    crc = np.array([state ^ 0xFFFFFFFF], dtype=np.uint32)
    return masked_crc(crc).astype("<u4").tobytes()


def _boundaries_walk(buf: bytes) -> tuple[list[int], int]:
    """Walk the length fields from offset 0. Returns (record offsets, end position reached)."""
    n = len(buf)
    offsets: list[int] = []
    add = offsets.append
    unpack = struct.Struct("<Q").unpack_from
    pos = 0
    zero_crc = _zero_length_crc()
    while pos + HEADER <= n:
        length = unpack(buf, pos)[0]
        if length > _MAX_RECORD:
            add(pos)  # a broken length: its CRC check below reports it
            return offsets, pos
        if length == 0 and buf[pos + 8:pos + 12] != zero_crc:
            # zero-filled space (a preallocated or wiped file): no real record has length 0 with a bad
            # CRC; stop here instead of framing millions of 16-byte "records"
            add(pos)
            return offsets, pos
        add(pos)
        pos += HEADER + length + FOOTER
    return offsets, pos


def scan(buf: bytes) -> Records:
    """Frame ``buf`` into records, verify every CRC, and say what was lost.

    - a truncated last record (crash mid-write): everything before it is kept;
    - a bad length CRC: the framing after it cannot be trusted; everything before it is kept;
    - a bad data CRC with a good length CRC: that record alone is skipped, reading goes on.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    n = len(b)
    problems: list[Problem] = []
    offsets, end = _boundaries_walk(buf)
    starts = np.asarray(offsets, dtype=np.int64)
    if not len(starts):
        if n:
            problems.append(Problem(0, f"truncated record header ({n} bytes, need {HEADER})"))
        return Records(buf, np.empty(0, np.int64), np.empty(0, np.int64), 0, problems)
    length = np.zeros(len(starts), dtype=np.int64)
    head_ok = starts + HEADER <= n
    length[head_ok] = _view(b, "<u8")[starts[head_ok]].astype(np.int64)
    keep = len(starts)
    # 1. the length fields: the first bad one ends what can be framed
    len_ok = head_ok.copy()
    if head_ok.any():
        len_ok[head_ok] = masked_crc(_length_crc(b, starts[head_ok])) \
            == _u32_at(b, starts[head_ok] + 8)
    if not len_ok.all():
        k = int(np.argmin(len_ok))
        problems.append(Problem(int(starts[k]), "length CRC mismatch: the framing after this offset cannot be trusted"))
        keep = k
    # 2. a record that runs past the end of the file was cut off mid-write
    if keep and int(starts[keep - 1] + HEADER + length[keep - 1] + FOOTER) > n:
        k = keep - 1
        have = n - int(starts[k])
        need = HEADER + int(length[k]) + FOOTER
        if not problems:
            problems.append(Problem(int(starts[k]), f"truncated last record: {have} of {need} bytes written"))
        keep = k
    elif keep == len(starts) and end < n and not problems:
        problems.append(Problem(int(end), f"truncated record header: {n - end} trailing bytes"))
    starts, length = starts[:keep], length[:keep]
    data_start = starts + HEADER
    # 3. the data CRCs: a bad one costs only its own record
    data_ok = masked_crc(crc32c_many(b, data_start, length, buf=buf)) == _u32_at(b, data_start + length)
    if not data_ok.all():
        bad = np.flatnonzero(~data_ok)
        problems.insert(0, Problem(int(starts[bad[0]]),
                                   f"data CRC mismatch in {len(bad)} record(s) (first at offset {int(starts[bad[0]])}): skipped",
                                   records_lost=len(bad)))
        data_start, length = data_start[data_ok], length[data_ok]
    return Records(buf, data_start, length, keep, problems)
