"""The record log under a W&B ``.wandb`` file: leveldb-log framing, read with salvage.

Layout (checked against files written by wandb 0.10.32 to 0.31 and the writer of those clients):

* a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` (uint16, little-endian), version ``0``;
* then 32 KiB blocks (the header counts towards the first one). Each chunk is a 7-byte header,
  ``crc32`` (uint32 LE), ``length`` (uint16 LE), ``type`` (uint8), and ``length`` bytes of data.
  Types: FULL=1, FIRST=2, MIDDLE=3, LAST=4; a record larger than a block is split in
  FIRST/MIDDLE.../LAST. Fewer than 7 bytes left in a block are zero padding; a zero chunk header
  means "the rest of this block is padding" (a killed process leaves its file padded this way).
* The CRC is the plain zlib CRC-32 (IEEE) of the type byte followed by the data, *not* leveldb's
  masked CRC-32C; a masked CRC-32C is accepted too, for writers that follow leveldb exactly.

Damage is skipped, not fatal: a bad CRC, an impossible length or an unknown chunk type drops the
rest of that block and reading resumes at the next one; a truncated tail ends the read. Every
skip is reported with its byte offset.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

__all__ = ["BLOCK_SIZE", "FILE_HEADER", "LogRead", "read_log"]

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_CHUNK = struct.Struct("<IHB")
_MASK_DELTA = 0xA282EAD8


@dataclass
class LogRead:
    """The records of one log, and what could not be read (``(offset, problem)`` pairs)."""

    records: list[bytes] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    skipped_bytes: int = 0
    padded_tail: int = 0  # zero bytes after the last record (a killed writer pads to its block end)
    version: int | None = None


def _crc_ok(crc: int, ctype: int, data: bytes) -> bool:
    if zlib.crc32(data, zlib.crc32(bytes((ctype,)))) == crc:
        return True
    try:  # leveldb proper: masked CRC-32C
        import google_crc32c
    except ImportError:  # pragma: no cover - google_crc32c ships with the extras
        return False
    c = google_crc32c.value(bytes((ctype,)) + data)
    return ((((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF) == crc


def read_log(data: bytes) -> LogRead:
    """Split a W&B record log into records. Raises ``ValueError`` when the file header is wrong."""
    out = LogRead()
    if len(data) < len(FILE_HEADER):
        raise ValueError(f"{len(data)} bytes: shorter than the 7-byte W&B header")
    if data[:4] != FILE_HEADER[:4]:
        raise ValueError(f"not a W&B record log (starts with {data[:4]!r}, expected b':W&B')")
    magic, version = struct.unpack_from("<HB", data, 4)
    if magic != 0xBEE1:
        raise ValueError(f"W&B header has magic 0x{magic:04X}, expected 0xBEE1")
    out.version = version
    n = len(data)
    pos = len(FILE_HEADER)
    pending: list[bytes] | None = None  # fragments of a record split over chunks
    pending_at = 0

    def drop_pending(reason: str) -> None:
        nonlocal pending
        if pending is not None:
            out.problems.append((pending_at, f"a record split over blocks lost its end ({reason})"))
            pending = None

    while pos < n:
        block_end = (pos // BLOCK_SIZE + 1) * BLOCK_SIZE
        if block_end - pos < CHUNK_HEADER:
            pos = block_end  # block trailer: zero padding
            continue
        if pos + CHUNK_HEADER > n:
            if data[pos:].strip(b"\x00"):
                out.problems.append((pos, f"truncated chunk header ({n - pos} bytes at the end of the file)"))
                out.skipped_bytes += n - pos
            else:
                out.padded_tail += n - pos
            break
        crc, length, ctype = _CHUNK.unpack_from(data, pos)
        if ctype == 0 and length == 0 and crc == 0:
            # the rest of this block is padding; if everything after is zero, the file ends here
            rest = data[pos:block_end]
            if rest.strip(b"\x00"):
                out.problems.append((pos, "non-zero bytes in a block's padding"))
                out.skipped_bytes += len(rest)
                drop_pending("damaged block")
            elif not data[block_end:].strip(b"\x00"):
                out.padded_tail += n - pos
                break
            pos = block_end
            continue
        end = pos + CHUNK_HEADER + length
        if ctype not in (FULL, FIRST, MIDDLE, LAST) or end > block_end:
            problem = f"unknown chunk type {ctype}" if ctype not in (FULL, FIRST, MIDDLE, LAST) else \
                f"chunk length {length} runs past its block"
            if end > n and ctype in (FULL, FIRST, MIDDLE, LAST) and n < block_end:
                problem = f"truncated record: {length} bytes announced, {n - pos - CHUNK_HEADER} present"
            out.problems.append((pos, problem))
            out.skipped_bytes += min(block_end, n) - pos
            drop_pending("damaged block")
            pos = block_end
            continue
        if end > n:
            out.problems.append((pos, f"truncated record: {length} bytes announced, {n - pos - CHUNK_HEADER} present"))
            out.skipped_bytes += n - pos
            drop_pending("truncated file")
            break
        chunk = data[pos + CHUNK_HEADER:end]
        if not _crc_ok(crc, ctype, chunk):
            out.problems.append((pos, "CRC mismatch"))
            out.skipped_bytes += min(block_end, n) - pos
            drop_pending("CRC mismatch")
            pos = block_end
            continue
        if ctype == FULL:
            drop_pending("a new record began")
            out.records.append(chunk)
        elif ctype == FIRST:
            drop_pending("a new record began")
            pending, pending_at = [chunk], pos
        elif pending is None:
            # the continuation of a record whose start was in a skipped block: nothing to join it to
            out.skipped_bytes += len(chunk)
        elif ctype == MIDDLE:
            pending.append(chunk)
        else:  # LAST
            pending.append(chunk)
            out.records.append(b"".join(pending))
            pending = None
        pos = end
    drop_pending("end of file")
    return out
