"""The record log under a W&B ``.wandb`` file: leveldb-log framing, read with salvage.

Layout (checked against files written by wandb 0.10.32 to 0.31 and the writer of those clients):

* a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` (uint16, little-endian), version ``0`` (another
  version byte is read as version 0, and said in :attr:`LogStream.notes`);
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

The file is streamed block by block (:class:`LogStream`): memory holds one block and the record
being joined, so a file of gigabytes costs what its decoded records cost, not its size.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = ["BLOCK_SIZE", "FILE_HEADER", "LogRead", "LogStream", "read_log"]

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
    notes: list[str] = field(default_factory=list)


def _crc_ok(crc: int, ctype: int, data: bytes) -> bool:
    if zlib.crc32(data, zlib.crc32(bytes((ctype,)))) == crc:
        return True
    try:  # leveldb proper: masked CRC-32C
        import google_crc32c
    except ImportError:  # pragma: no cover - google_crc32c ships with the extras
        return False
    c = google_crc32c.value(bytes((ctype,)) + data)
    return ((((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF) == crc


class LogStream:
    """Streaming reader of one record log: iterate it for the records, one at a time; the counts
    and problems are complete once the iteration ends. Memory holds one 32 KiB block and the
    record being joined, never the file.

    ``source`` is a binary file object (read from its current position, which must be the start of
    the log) or a bytes-like object; at most ``limit`` bytes are read. Raises ``ValueError`` at once
    when the file header is wrong.
    """

    def __init__(self, source: BinaryIO | bytes | bytearray | memoryview, *, limit: int | None = None) -> None:
        self._fh: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        self._left = limit
        self.problems: list[tuple[int, str]] = []
        self.skipped_bytes = 0
        self.padded_tail = 0
        self.n_records = 0
        self.bytes_read = 0
        first = self._block()
        if len(first) < len(FILE_HEADER):
            raise ValueError(f"{len(first)} bytes: shorter than the 7-byte W&B header")
        if first[:4] != FILE_HEADER[:4]:
            raise ValueError(f"not a W&B record log (starts with {first[:4]!r}, expected b':W&B')")
        magic, version = struct.unpack_from("<HB", first, 4)
        if magic != 0xBEE1:
            raise ValueError(f"W&B header has magic 0x{magic:04X}, expected 0xBEE1")
        self.version: int | None = version
        # what the reader assumed: the owner of the run's RunInfo puts these into its notes
        self.notes: list[str] = []
        if version != 0:
            self.notes.append(f"unknown W&B log version {version} (this reader knows 0): read as version 0")
        self._first: bytes | None = first

    def _block(self) -> bytes:
        """The next 32 KiB block (shorter only at the end of the file or of ``limit``)."""
        want = BLOCK_SIZE if self._left is None else min(BLOCK_SIZE, self._left)
        parts = []
        got = 0
        while got < want:
            piece = self._fh.read(want - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._left is not None:
            self._left -= len(data)
        self.bytes_read += len(data)
        return bytes(data)

    def __iter__(self) -> Iterator[bytes]:
        if self._first is None:
            raise RuntimeError("a LogStream is read once")
        data, self._first = self._first, None
        problems = self.problems
        pending: list[bytes] | None = None  # fragments of a record split over chunks
        pending_at = 0
        self._zero_run = 0  # zero padding seen since the last record: the padded tail, if nothing follows it
        self._stop = False
        start = 0  # file offset of this block
        pos = len(FILE_HEADER)  # offset inside this block

        def drop_pending(reason: str) -> None:
            nonlocal pending
            if pending is not None:
                problems.append((pending_at, f"a record split over blocks lost its end ({reason})"))
                pending = None

        while data:
            for ctype, chunk, at in self._chunks(data, start, pos):
                if ctype == 0:  # the block is damaged from here: a record being joined loses its end
                    drop_pending(chunk.decode())
                elif ctype == FULL:
                    drop_pending("a new record began")
                    self.n_records += 1
                    yield chunk
                elif ctype == FIRST:
                    drop_pending("a new record began")
                    pending, pending_at = [chunk], at
                elif pending is None:
                    # the continuation of a record whose start was in a skipped block: nothing to join it to
                    self.skipped_bytes += len(chunk)
                elif ctype == MIDDLE:
                    pending.append(chunk)
                else:  # LAST
                    pending.append(chunk)
                    record = b"".join(pending)
                    pending = None
                    self.n_records += 1
                    yield record
            if self._stop or len(data) < BLOCK_SIZE:  # only the last block is short
                break
            start += len(data)
            pos = 0
            data = self._block()
        self.padded_tail += self._zero_run
        drop_pending("end of file")

    def _chunks(self, data: bytes, start: int, pos: int) -> Iterator[tuple[int, bytes, int]]:
        """The good chunks of one block from ``pos``: (type, data, file offset). Type 0 says the block is damaged
        from there (its data: why); ``self._stop`` is set where nothing can follow (the file ends)."""
        n = len(data)
        while pos < n:
            if BLOCK_SIZE - pos < CHUNK_HEADER:
                return  # block trailer: zero padding
            if pos + CHUNK_HEADER > n:  # the last block ends inside a chunk header
                if data[pos:].strip(b"\x00"):
                    self.problems.append(
                        (start + pos, f"truncated chunk header ({n - pos} bytes at the end of the file)")
                    )
                    self.skipped_bytes += n - pos
                    self._zero_run = 0
                else:
                    self._zero_run += n - pos
                self._stop = True
                return
            crc, length, ctype = _CHUNK.unpack_from(data, pos)
            if ctype == 0 and length == 0 and crc == 0:
                # the rest of this block is padding; if everything after is zero, the file ends here
                if data[pos:].strip(b"\x00"):
                    self.problems.append((start + pos, "non-zero bytes in a block's padding"))
                    self.skipped_bytes += n - pos
                    self._zero_run = 0
                    yield 0, b"damaged block", start + pos
                else:
                    self._zero_run += n - pos
                return
            self._zero_run = 0
            end = pos + CHUNK_HEADER + length
            known = ctype in (FULL, FIRST, MIDDLE, LAST)
            if not known or end > BLOCK_SIZE:
                problem = f"chunk length {length} runs past its block" if known else f"unknown chunk type {ctype}"
                if end > n and known and n < BLOCK_SIZE:
                    problem = f"truncated record: {length} bytes announced, {n - pos - CHUNK_HEADER} present"
                self.problems.append((start + pos, problem))
                self.skipped_bytes += n - pos
                yield 0, b"damaged block", start + pos
                return
            if end > n:
                self.problems.append(
                    (start + pos, f"truncated record: {length} bytes announced, {n - pos - CHUNK_HEADER} present")
                )
                self.skipped_bytes += n - pos
                self._stop = True
                yield 0, b"truncated file", start + pos
                return
            chunk = data[pos + CHUNK_HEADER : end]
            if not _crc_ok(crc, ctype, chunk):
                self.problems.append((start + pos, "CRC mismatch"))
                self.skipped_bytes += n - pos
                yield 0, b"CRC mismatch", start + pos
                return
            yield ctype, chunk, start + pos
            pos = end


def read_log(data: bytes) -> LogRead:
    """Split a W&B record log held in memory into records. Raises ``ValueError`` when the file header is wrong."""
    stream = LogStream(data)
    out = LogRead(version=stream.version, notes=list(stream.notes))
    out.records = list(stream)
    out.problems, out.skipped_bytes, out.padded_tail = stream.problems, stream.skipped_bytes, stream.padded_tail
    return out
