"""TFRecord framing of TensorBoard event files: record boundaries and CRC checks.

A record is ``uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32
masked_crc32c(data)``, little-endian, with ``masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8``.

TensorBoard's own reader checks every CRC in pure Python, one record at a time. Here nothing runs
per record in Python:

- framing: every record start is a byte position whose 8-byte length field has a zero high word
  and whose length CRC holds. Those positions are found for the whole file at once (numpy), and
  the chain ``start + 16 + length == next start`` from offset 0 is checked vectorised; the chain is
  then exactly what a sequential walk of the length fields gives. Where the chain breaks (damage, a
  stray match) the sequential walk takes over from the last good record.
- CRCs: CRC-32C is affine in the data, so an ``L``-byte CRC is ``crc(0^L)`` XOR a table entry for
  each 16-bit word at its distance from the end. Records are grouped by length (an HF file has a
  dozen lengths) and each group is done as a byte matrix, one table lookup per column; rare long
  records and small groups go to ``google_crc32c`` (C) one by one, or to byte tables without it.

Damage (a record cut off by a crash, a flipped byte) never raises: :func:`scan` returns the intact records and
a list of :class:`Problem` entries saying where the damage starts and what was kept (or that a window of a longer
file ends inside a record: :attr:`Records.cut`, :attr:`Records.next`)."""

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
    next: int = 0  # where the record after the framed ones starts (the end of ``buf`` when all was read)
    cut: bool = False  # the last problem is only ``buf`` ending inside a record: a window of a longer file


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


def gather(b: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` bytes at each of ``pos`` (``>= 0``) as a (len(pos), width) uint8 matrix; bytes past
    the end of ``b`` read as 0. One copy per row through a void-dtype view: much quicker than an
    (n, width) strided fancy index or ``width`` separate gathers."""
    n = len(b)
    pos = np.asarray(pos, dtype=np.int64)
    if n >= width:
        rows = np.ndarray(shape=(n - width + 1,), dtype=np.dtype(f"V{width}"), buffer=b, strides=(1,))
        out = rows[np.minimum(pos, n - width)].view(np.uint8).reshape(len(pos), width)
    else:
        out = np.zeros((len(pos), width), dtype=np.uint8)
    over = np.flatnonzero(pos > n - width)
    if len(over):  # rows running past the end (the last few records): from a zero-padded copy of the tail
        base = max(min(int(pos[over].min()), n), 0)
        tail = np.zeros(n - base + width, dtype=np.uint8)
        tail[: n - base] = b[base:]
        out[over] = gather(tail, np.minimum(pos[over], n) - base, width)
    return out


def _crc_group(b: np.ndarray, start: np.ndarray, n: int) -> np.ndarray:
    """crc32c of ``n``-byte ranges at ``start``, vectorised across the ranges (one table lookup per byte)."""
    z, c = _distance_tables(max(n + 1, 64))
    acc = np.full(len(start), c[n], dtype=np.uint32)
    for j in range(n):
        acc ^= z[n - 1 - j][b[start + j]]
    return acc


_T16: list[np.ndarray] = []  # _T16[j][w]: the CRC contribution of the 16-bit word w ending 2*j bytes before the end


def _word_tables(k: int) -> list[np.ndarray]:
    """The 16-bit distance tables up to ``k`` words (built once, grown on demand: 256 KiB each)."""
    if len(_T16) < k:
        z, _ = _distance_tables(max(2 * k + 2, 64))
        for j in range(len(_T16), k):
            # a little-endian word: low byte first, 2*j+1 bytes from the end; high byte 2*j bytes
            _T16.append((z[2 * j][:, None] ^ z[2 * j + 1][None, :]).reshape(-1))
    return _T16


_CRC_ROWS = 16384
_WORD_MAX = 256  # longer records (texts, graphs) are few: one C call each, not 256 KiB tables per word
_WORD_MIN_GROUP = 128  # below this many records of one length, one C call each beats the tables


def _crc_words(b: np.ndarray, start: np.ndarray, n: int, stored: np.ndarray | None = None) -> np.ndarray:
    """crc32c of ``n``-byte ranges at ``start`` (``start >= n & 1``): a (ranges, words) matrix of
    16-bit words, one table lookup per column. An odd length reads one byte before the range and
    zeroes it: a leading zero byte adds nothing to the linear part. With ``stored``, the 4 bytes
    after each range (a TFRecord's data CRC) are read into it on the way."""
    pad = n & 1
    width = n + pad
    extra = 4 if stored is not None else 0
    k = width // 2
    tables = _word_tables(k)
    _, c = _distance_tables(max(n + 1, 64))
    acc = np.empty(len(start), dtype=np.uint32)
    tmp = np.empty(min(len(start), _CRC_ROWS), dtype=np.uint32)
    for i in range(0, len(start), _CRC_ROWS):  # in chunks: the matrix and its transpose stay in cache
        rows = gather(b, start[i : i + _CRC_ROWS] - pad, width + extra)
        m = len(rows)
        if stored is not None:
            stored[i : i + m] = np.ndarray(shape=(m,), dtype="<u4", buffer=rows, offset=width, strides=(width + extra,))
        if pad:
            rows[:, 0] = 0
        cols = np.ascontiguousarray(rows[:, :width].view("<u2").T)  # (words, ranges): lookups read contiguously
        part, t = acc[i : i + m], tmp[:m]
        part[:] = c[n]
        for w in range(k):
            np.take(tables[k - 1 - w], cols[w], out=t)
            part ^= t
    return acc


def _crc_ranges(
    b: np.ndarray, start: np.ndarray, length: np.ndarray, buf: bytes | None, stored: np.ndarray | None = None
) -> np.ndarray:
    """:func:`crc32c_many`, and with ``stored`` the u32 after each range read into it."""
    from autopsy._optional import available

    out = np.zeros(len(start), dtype=np.uint32)
    if not len(start):
        return out
    order = np.argsort(length.astype(np.uint16) if int(length.max()) < 1 << 16 else length, kind="stable")
    sorted_len = length[order]
    bounds = np.flatnonzero(np.diff(sorted_len)) + 1
    rest = []
    for grp, n in zip(np.split(order, bounds), sorted_len[np.r_[0, bounds]].tolist()):
        if n <= _WORD_MAX and len(grp) >= _WORD_MIN_GROUP and int(start[grp].min()) >= (n & 1):
            got = np.empty(len(grp), dtype=np.uint32) if stored is not None else None
            out[grp] = _crc_words(b, start[grp], n, got)
            if stored is not None:
                stored[grp] = got
        else:
            rest.append(grp)
    if not rest:
        return out
    idx = np.concatenate(rest)
    if stored is not None:
        stored[idx] = _view(b, "<u4")[start[idx] + length[idx]]
    if available("google_crc32c"):
        import google_crc32c

        src = buf if buf is not None else b.tobytes()
        value = google_crc32c.value
        out[idx] = np.fromiter(
            (value(src[s : s + n]) for s, n in zip(start[idx].tolist(), length[idx].tolist())),
            dtype=np.uint32,
            count=len(idx),
        )
    else:
        for grp in rest:
            out[grp] = _crc_group(b, start[grp], int(length[grp[0]])) if len(grp) else 0
    return out


def crc32c_many(b: np.ndarray, start: np.ndarray, length: np.ndarray, *, buf: bytes | None = None) -> np.ndarray:
    """crc32c of the byte ranges ``b[start:start+length]``.

    Ranges are grouped by length; a large group of short ranges is done with numpy word tables (no
    Python per range). The rest: ``google_crc32c`` (C, in the tensorboard extra) one call per range,
    or numpy byte tables without it.
    """
    return _crc_ranges(
        np.asarray(b, dtype=np.uint8), np.asarray(start, dtype=np.int64), np.asarray(length, dtype=np.int64), buf
    )


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


def _boundaries_walk(buf: bytes, pos: int = 0) -> tuple[list[int], int]:
    """Walk the length fields from ``pos`` (a record start). Returns (record offsets, end position reached)."""
    n = len(buf)
    offsets: list[int] = []
    add = offsets.append
    unpack = struct.Struct("<Q").unpack_from
    zero_crc = _zero_length_crc()
    while pos + HEADER <= n:
        length = unpack(buf, pos)[0]
        if length > _MAX_RECORD:
            add(pos)  # a broken length: its CRC check below reports it
            return offsets, pos
        if length == 0 and buf[pos + 8 : pos + 12] != zero_crc:
            # zero-filled space (a preallocated or wiped file): no real record has length 0 with a bad
            # CRC; stop here instead of framing millions of 16-byte "records"
            add(pos)
            return offsets, pos
        add(pos)
        pos += HEADER + length + FOOTER
    return offsets, pos


_VECTOR_MIN = 1 << 16  # below this many bytes the walk is as quick


def _headers_ok(b: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``pos`` (each ``<= len(b) - 12``) hold a record header: a length below 2 GiB (a zero
    high word) whose CRC holds. Returns (mask, lengths)."""
    head = gather(b, pos, HEADER)
    u32, u16 = head.view("<u4"), head.view("<u2")
    low = u32[:, 0]
    # the length CRC of (low, 0): its 4 zero bytes add nothing to the linear part
    tables = _word_tables(4)
    _, c = _distance_tables(64)
    crc = tables[3].take(u16[:, 0]) ^ tables[2].take(u16[:, 1]) ^ c[8]
    ok = (masked_crc(crc) == u32[:, 2]) & (u32[:, 1] == 0) & (low <= _MAX_RECORD)
    return ok, low.astype(np.int64)


_CHUNK = 1 << 18  # bytes per pass of the search: its temporaries stay in the CPU cache


def _header_runs(b: np.ndarray) -> np.ndarray:
    """Positions ``p <= len(b) - 12`` whose bytes ``p+4..p+7`` are zero and ``p+8`` is not: where the
    high word of a length field ends, in chunks (a few passes over cached chunks beat whole-file ones)."""
    n = len(b)
    last = n - HEADER  # the last position a header fits at
    zero = np.empty(_CHUNK + 9, dtype=bool)
    run = np.empty(_CHUNK, dtype=bool)
    tmp = np.empty(_CHUNK, dtype=bool)
    out = []
    for s in range(0, last + 1, _CHUNK):
        m = min(_CHUNK, last + 1 - s)
        z, r, t = zero[: m + 9], run[:m], tmp[:m]
        np.equal(b[s : s + m + 9], 0, out=z)
        np.logical_and(z[4 : m + 4], z[5 : m + 5], out=r)
        r &= z[6 : m + 6]
        r &= z[7 : m + 7]
        np.logical_not(z[8 : m + 8], out=t)
        r &= t
        hits = np.flatnonzero(r)
        hits += s
        out.append(hits)
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _complete(b: np.ndarray, start: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add the good headers the run search missed (successors of good ones, until no new one turns
    up) and drop the stray ones (nobody's successor, not 0). Sorted sets, nothing the file's size."""
    n = len(b)
    checked = start
    fresh_start, fresh_low = start, low
    starts, lows = [start], [low]
    for _ in range(64):  # one more round per consecutive miss
        nxt = np.unique(fresh_start + (HEADER + FOOTER) + fresh_low)
        nxt = nxt[nxt <= n - HEADER]
        nxt = nxt[~np.isin(nxt, checked, assume_unique=True)]
        if not len(nxt):
            break
        checked = np.union1d(checked, nxt)
        ok, low = _headers_ok(b, nxt)
        fresh_start, fresh_low = nxt[ok], low[ok]
        starts.append(fresh_start)
        lows.append(fresh_low)
    if len(starts) > 1:
        start, low = np.concatenate(starts), np.concatenate(lows)
        order = np.argsort(start, kind="stable")
        start, low = start[order], low[order]
    linked = np.isin(start, start + (HEADER + FOOTER) + low) | (start == 0)
    return start[linked], low[linked]


def _boundaries(buf: bytes, b: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The record offsets a walk of the length fields from 0 gives, found vectorised where the file allows.

    Returns (offsets, end position reached, how many leading offsets are known to have a good length
    CRC). Every record start ``p`` is a header (:func:`_headers_ok`); candidates are 0 and the ``p``
    whose bytes ``p+4..p+7`` are zero and ``p+8`` is not (every record, bar a length CRC starting
    with a zero byte). The good ones chained from 0 (``p + 16 + length`` is the next) are exactly
    what the walk gives, as far as the chain goes. Where it stops short of the end:

    - the header there is bad: scan stops reading there (a bad length CRC), or the walk would (a
      length of 2 GiB or more): nothing after it matters;
    - it is good (a header the search missed, or a stray header-shaped run in some record's data
      broke the chain): :func:`_complete` repairs the candidates once; then the walk takes over.
    """
    n = len(b)
    if n < _VECTOR_MIN:
        offsets, end = _boundaries_walk(buf)
        return np.asarray(offsets, dtype=np.int64), end, 0
    cand = _header_runs(b)
    if not len(cand) or cand[0] != 0:
        cand = np.concatenate([np.zeros(1, dtype=np.int64), cand])
    ok, low = _headers_ok(b, cand)
    start, low = cand[ok], low[ok]
    for repaired in (False, True):
        if not len(start) or start[0] != 0:
            if repaired or not len(start):
                break
            start, low = _complete(b, start, low)
            continue
        end = start + (HEADER + FOOTER) + low
        brk = np.flatnonzero(start[1:] != end[:-1])
        last = int(brk[0]) + 1 if len(brk) else len(start)
        pos = int(end[last - 1])
        if pos + HEADER > n:  # the usual file: one chain from 0 to the end (or into a cut last record)
            return start[:last], pos, last
        if not _headers_ok(b, np.array([pos], dtype=np.int64))[0][0]:
            return np.append(start[:last], pos), pos, last
        if repaired:
            more, stop = _boundaries_walk(buf, pos)
            return np.concatenate([start[:last], np.asarray(more, dtype=np.int64)]), stop, last
        start, low = _complete(b, start, low)
    offsets, stop = _boundaries_walk(buf)
    return np.asarray(offsets, dtype=np.int64), stop, 0


def scan(buf: bytes) -> Records:
    """Frame ``buf`` into records, verify every CRC, and say what was lost.

    - a truncated last record (crash mid-write): everything before it is kept;
    - a bad length CRC: the framing after it cannot be trusted; everything before it is kept;
    - a bad data CRC with a good length CRC: that record alone is skipped, reading goes on.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    n = len(b)
    problems: list[Problem] = []
    starts, end, checked = _boundaries(buf, b)
    if not len(starts):
        if n:
            problems.append(Problem(0, f"truncated record header ({n} bytes, need {HEADER})"))
        return Records(buf, np.empty(0, np.int64), np.empty(0, np.int64), 0, problems, 0, bool(n))
    length = np.zeros(len(starts), dtype=np.int64)
    if checked:  # the chained records: each one's length is the gap to the next, less the framing
        nxt = np.append(starts[1:checked], starts[checked] if checked < len(starts) else end)
        length[:checked] = nxt - starts[:checked] - (HEADER + FOOTER)
    head_ok = starts + HEADER <= n
    walked = np.flatnonzero(head_ok[checked:]) + checked
    length[walked] = _view(b, "<u8")[starts[walked]].astype(np.int64)
    keep = len(starts)
    cut = False
    # 1. the length fields: the first bad one ends what can be framed (the chained ones were checked)
    len_ok = head_ok.copy()
    if len(walked):
        len_ok[walked] = masked_crc(_length_crc(b, starts[walked])) == _view(b, "<u4")[starts[walked] + 8]
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
            cut = True
        keep = k
    elif keep == len(starts) and end < n and not problems:
        problems.append(Problem(int(end), f"truncated record header: {n - end} trailing bytes"))
        cut = True
    resume = n if not problems else (int(starts[keep]) if keep < len(starts) else int(end))
    starts, length = starts[:keep], length[:keep]
    data_start = starts + HEADER
    # 3. the data CRCs: a bad one costs only its own record
    stored = np.empty(len(data_start), dtype=np.uint32)
    data_ok = masked_crc(_crc_ranges(b, data_start, length, buf, stored)) == stored
    if not data_ok.all():
        bad, at = np.flatnonzero(~data_ok), int(starts[int(np.argmin(data_ok))])
        what = f"data CRC mismatch in {len(bad)} record(s) (first at offset {at}): skipped"
        problems.insert(0, Problem(at, what, records_lost=len(bad)))
        data_start, length = data_start[data_ok], length[data_ok]
    return Records(buf, data_start, length, keep, problems, resume, cut)
