"""A ``trainer_state.json`` read as a stream: its top-level fields, and ``log_history`` handed over in batches.

HF writes one JSON object (``json.dumps(asdict(state), indent=2, sort_keys=True)``); its ``log_history`` holds
one flat dict per log and is 99.9% of the file. Parsing all of it at once costs 18-23x the file in Python objects
(a 192 MB file of 2M entries peaked at 3.6 GB), so the file is decoded in chunks of :data:`CHUNK_BYTES`:

- a top-level field is one ``raw_decode`` (more text is read while the value may go on);
- ``log_history`` is cut at the last entry boundary in the window (``}`` then ``,`` ``{`` or ``]``) and the
  complete entries before it are parsed by one ``json.loads`` call (C speed, no Python per entry). A cut that
  is not a real boundary (a ``}`` inside a string or a nested value) cannot parse: ``"[" + prefix + "]"`` is
  valid JSON only when the prefix ends between two entries. Then that window is read one entry at a time.

Damage never raises: where the text stops being JSON (a file cut mid-write, a flipped byte) reading stops and
:class:`Stream` says where; a value nested too deeply for the parser (100,000 brackets) is skipped over and
reported, and the entries after it are read.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

__all__ = ["CHUNK_BYTES", "NAN", "Problem", "Stream", "read_stream"]

CHUNK_BYTES = 2 << 20  # bytes decoded per read: the window that batches of log entries are parsed from
MAX_VALUE_CHARS = 64 << 20  # one top-level value (or one log entry) longer than this is not HF's: damage
NAN = "\x00NaN"  # sentinel for a NaN written in the file (a missing key is absent instead)
_WS = re.compile(r"[ \t\r\n]*")
_BOUNDARY = re.compile(r"\}[ \t\r\n]*(?:,[ \t\r\n]*\{|\])")  # between two entries, or after the last one
_NUMBER_TAIL = re.compile(r"[0-9.eE+\-]*")  # all that is left of the window could still belong to a number
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings and brackets: what skipping a deep value counts


def _constant(name: str) -> Any:
    return NAN if name == "NaN" else float(name)


_DECODER = json.JSONDecoder(parse_constant=_constant)


@dataclass
class Problem:
    """Where the text stopped being readable (a character offset) and why."""

    offset: int
    problem: str


@dataclass
class Stream:
    """What a read found: the top-level fields but ``log_history``, how many entries were handed over, the
    type of a ``log_history`` that is not a list, the damage that ended reading and the values skipped."""

    state: dict[str, Any] = field(default_factory=dict)
    entries: int = 0
    history: str | None = None  # "list", another JSON type's name, or None when the file has no log_history
    stop: Problem | None = None
    skipped: list[Problem] = field(default_factory=list)
    top_level: str = "object"


class _Stop(Exception):
    def __init__(self, offset: int, problem: str) -> None:
        super().__init__(problem)
        self.where = Problem(offset, problem)


class _Text:
    """The decoded text of a binary file as a sliding window: ``buf`` starts at character ``base``."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buf = ""
        self.base = 0
        self.eof = False
        self.started = False

    def more(self) -> bool:
        """Read and decode the next chunk onto ``buf``. False at the end of the file."""
        if self.eof:
            return False
        data = self.fh.read(CHUNK_BYTES)
        text = self.dec.decode(data, final=not data)
        if not data:
            self.eof = True
        if not self.started and text:
            text, self.started = text.removeprefix("\ufeff"), True
        self.buf += text
        return bool(data)

    def drop(self, pos: int) -> int:
        """Forget the text before ``pos`` (an index into ``buf``); returns the same position in the new ``buf``."""
        if pos > (1 << 20):
            self.buf, self.base = self.buf[pos:], self.base + pos
            return 0
        return pos


class _Reader:
    def __init__(self, fh: BinaryIO, on_entries: Callable[[list[Any]], None]) -> None:
        self.t = _Text(fh)
        self.pos = 0
        self.on_entries = on_entries
        self.out = Stream()

    def offset(self, pos: int | None = None) -> int:
        return self.t.base + (self.pos if pos is None else pos)

    def peek(self) -> str:
        """Skip whitespace (reading on as needed); the next character, or "" at the end of the file."""
        while True:
            self.pos = _WS.match(self.t.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.t.buf):
                return self.t.buf[self.pos]
            if not self.t.more():
                return ""

    def value(self) -> Any:
        """One JSON value at ``pos`` (read on while it may be incomplete; a number may go on past the window)."""
        start = self.pos
        while True:
            buf = self.t.buf
            try:
                obj, end = _DECODER.raw_decode(buf, start)
            except RecursionError:
                self.skip_deep(start)
                return _SKIPPED
            except ValueError as exc:
                pos = getattr(exc, "pos", start)
                why = getattr(exc, "msg", str(exc))
                # an error near the end of the window (or an open string) may be a value that goes on
                maybe_cut = pos >= len(buf) - 32 or why.startswith("Unterminated string")
                if maybe_cut and len(buf) - start < MAX_VALUE_CHARS and self.t.more():
                    continue
                if self.t.eof and pos >= len(self.t.buf) - 1:
                    raise _Stop(self.offset(start), f"the file ends inside a value ({why})") from None
                raise _Stop(self.offset(pos), f"invalid JSON ({why})") from None
            if _NUMBER_TAIL.fullmatch(buf, end) and self.t.more():
                continue  # the window ends in what may be the rest of a number ("0" of "0.5"): read on
            self.pos = end
            return obj

    def skip_deep(self, start: int) -> None:
        """Skip a value too deeply nested for the parser: count brackets outside strings to its end."""
        depth = 0
        pos = start
        while True:
            buf = self.t.buf
            for m in _TOKEN.finditer(buf, pos):
                tok = m.group()
                if tok[0] == '"':
                    if m.end() == len(buf) and not self.t.eof:
                        break  # a string that may go on: read more first
                    continue
                depth += 1 if tok in "[{" else -1
                if depth == 0:
                    self.out.skipped.append(Problem(self.offset(start), "a value nested too deeply to read"))
                    self.pos = m.end()
                    return
                pos = m.end()
            else:
                pos = len(buf)
            if not self.t.more():
                raise _Stop(self.offset(start), "a value nested too deeply, cut off by the end of the file")

    def document(self) -> None:
        c = self.peek()
        if c != "{":
            self.out.top_level = "empty" if c == "" else "other"
            return
        self.pos += 1
        while True:
            c = self.peek()
            if c == "}":
                return
            if c == ",":
                self.pos += 1
                continue
            if c != '"':
                raise _Stop(self.offset(), f"invalid JSON (expected a key, found {c!r})" if c else "the file ends")
            key = self.value()
            if self.peek() != ":":
                raise _Stop(self.offset(), "invalid JSON (expected ':' after a key)")
            self.pos += 1
            c = self.peek()
            if key == "log_history" and c == "[":
                self.out.history = "list"
                self.history()
                continue
            value = self.value()
            if value is _SKIPPED:
                continue
            if key == "log_history":
                self.out.history = type(value).__name__
            elif isinstance(key, str):
                self.out.state[key] = value

    def history(self) -> None:
        self.pos += 1  # the '['
        while True:
            c = self.peek()
            if c == "]":
                self.pos += 1
                return
            if c == ",":
                self.pos += 1
                continue
            if c == "":
                raise _Stop(self.offset(), "the file ends inside log_history")
            self.pos = self.t.drop(self.pos)
            while len(self.t.buf) - self.pos < CHUNK_BYTES and self.t.more():
                pass
            cut = self._boundary()
            if cut > self.pos:
                try:
                    batch = json.loads("[" + self.t.buf[self.pos : cut] + "]", parse_constant=_constant)
                except (ValueError, RecursionError):
                    batch = None
                if batch is not None:
                    self.pos = cut
                    self._emit(batch)
                    continue
            self._one_by_one(max(cut, self.pos + 1))

    def _boundary(self) -> int:
        """The index just after the last entry-closing ``}`` in the window (-1: none found)."""
        buf, end = self.t.buf, len(self.t.buf)
        for _ in range(64):
            k = buf.rfind("}", self.pos, end)
            if k < 0:
                return -1
            if _BOUNDARY.match(buf, k):
                return k + 1
            end = k
        return -1

    def _one_by_one(self, until: int) -> None:
        """Entries one at a time up to ``until`` (a window whose batch did not parse), handed over together."""
        batch: list[Any] = []
        try:
            while self.pos < until:
                c = self.peek()
                if c in (",",):
                    self.pos += 1
                    continue
                if c in ("]", ""):
                    break
                v = self.value()
                if v is not _SKIPPED:
                    batch.append(v)
        finally:
            self._emit(batch)

    def _emit(self, batch: list[Any]) -> None:
        if batch:
            self.out.entries += len(batch)
            self.on_entries(batch)


_SKIPPED = object()


def read_stream(fh: BinaryIO, on_entries: Callable[[list[Any]], None]) -> Stream:
    """Read a trainer_state.json from ``fh``: ``on_entries`` gets the ``log_history`` entries in batches (in
    file order); the returned :class:`Stream` holds everything else."""
    reader = _Reader(fh, on_entries)
    try:
        reader.document()
    except _Stop as stop:
        reader.out.stop = stop.where
    return reader.out
