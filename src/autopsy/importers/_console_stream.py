"""The pass over a whole console log, a chunk of lines at a time, with the two shapes that make up nearly every line
of an HF Trainer log read in bulk.

A million-line HF log is half bare tqdm bars (``  5%|▌    | 1234/25000 [02:49<54:12,  7.30it/s]``) and half one-line
dicts of numbers (``{'loss': 1.52, 'grad_norm': 0.61, ...}``). In each chunk:

- the lines that end the way a bar does are checked and read by one compiled regex over their bytes
  (:data:`~autopsy.importers._console_tokens.BAR_LINE`);
- the lines that are an HF dict closed on the line are read by one regex built from the keys of the chunk's common
  shape (:func:`_template_read`), else split with ``str`` methods (:func:`_plain_dicts`), their numbers read by
  ``float``;
- every other line, and every near miss (a bar with a description or postfix, a dict that names a step or the end
  of training, quoted values, odd spacing), goes through the line grammars one by one
  (:func:`~autopsy.importers._console_formats.parse_line`).

A line is read in bulk only where the line grammars would read it the same way, so both paths give the same
records (``tests/test_console_bulk.py`` checks it on random mixes of lines and on every real log).

Memory stays bounded: a chunk of text at a time, the records as typed arrays, and of the text itself only the lines
after the last record (where :func:`~autopsy.importers._console_crash.find_crash` looks), at most
:data:`TAIL_LINES` of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, compress, repeat
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd

from autopsy.importers._console_formats import State, dict_value, flush_numeric, parse_line
from autopsy.importers._console_records import NO, ConsoleParse
from autopsy.importers._console_tokens import BAR_ENDS, BAR_LINE, BULK_PAIR, DICT_LINE_GRAMMAR, DICT_START

__all__ = ["TAIL_LINES", "parse_console"]

_MARGIN = 64  # lines held back at a chunk's end: a wrapped HF dict (up to 50 lines) is read whole
TAIL_LINES = 100_000  # lines kept after the last record, for the crash a log ends with


def parse_console(chunks: Iterable[str]) -> ConsoleParse:
    """One pass over the (cleaned) text of a console log, given as pieces (any split; lines may span pieces)."""
    out = ConsoleParse()
    st = State()
    carry: list[str] = []  # the unread lines of the last piece
    partial = ""  # a line cut by the piece's end
    base = 0  # the log's line number of carry[0]
    last_record = -1  # the line of the last record so far
    pieces = iter(chunks)
    piece = next(pieces, None)
    while piece is not None:
        following = next(pieces, None)
        final = following is None
        parts = (partial + piece).split("\n")
        partial = "" if final else parts.pop()
        if final and parts[-1] == "":
            parts.pop()  # the text ends with a line break
        lines = carry + parts if carry else parts
        stop = len(lines) if final else max(len(lines) - _MARGIN, 0)
        before = len(out)
        done = _read_lines(out, st, lines, base, stop) if stop else 0
        if len(out) > before:  # this chunk's records (lines only grow from chunk to chunk)
            last_record = max(last_record, int(out.array("line")[before:].max()))
        _keep_tail(out, st, lines, base, done, last_record)
        carry = lines[done:]
        base += done
        piece = following
    out.n_lines = base
    flush_numeric(out, st)
    out.finish()
    last = out.line[-1] if len(out.line) else 0
    if last > out.tail_start:
        del out.tail[: last - out.tail_start]
        out.tail_start = last
    return out


def _read_lines(out: ConsoleParse, st: State, lines: list[str], base: int, stop: int) -> int:
    """Lines ``lines[:stop]`` (and those a wrapped dict takes past it); returns how many lines were read."""
    n = len(lines)
    is_bar = np.fromiter(map(str.endswith, lines, repeat(BAR_ENDS)), dtype=bool, count=n)
    bars = np.flatnonzero(is_bar)
    bar_n: list[bytes] = []
    bar_total: list[bytes] = []
    if len(bars):
        kinds = BAR_LINE.findall("\n".join(_pick(lines, bars)).encode("utf-8", "surrogatepass"))
        bar_n, bar_total = list(map(itemgetter(0), kinds)), list(map(itemgetter(1), kinds))
        is_bar[bars] = np.fromiter(map(bool, bar_n), dtype=bool, count=len(bars))
    is_dict = np.fromiter(map(str.startswith, lines, repeat(DICT_START)), dtype=bool, count=n)
    is_dict[stop:] = False  # (read once the lines a wrapped dict may take are known)
    dicts = np.flatnonzero(is_dict)
    text = _pick(lines, dicts)
    tpl = None  # the dicts of the chunk's common shape, read already
    if len(dicts):
        closed = np.fromiter(map(str.__contains__, text, repeat("}")), dtype=bool, count=len(text))
        is_dict[dicts[~closed]] = False
        tpl = _template_read(text, closed)
        rest = np.flatnonzero(closed & ~tpl.matched) if tpl is not None else np.flatnonzero(closed)
        is_dict[dicts[rest[_lines_with(_pick(text, rest), DICT_LINE_GRAMMAR)]]] = False
    st.keras_changes = []
    keras_before = st.keras_epoch
    upto = 0
    taken: list[tuple[int, int]] = []  # lines a wrapped HF dict took: [from, to)
    for j in np.flatnonzero(~(is_bar[:stop] | is_dict[:stop])).tolist():
        if j < upto:
            continue
        upto = parse_line(out, st, lines, j, base)
        if upto > j + 1:
            taken.append((j + 1, upto))
    done = max(stop, upto)
    is_bar[done:] = False
    for a, b in taken:
        is_bar[a:b] = is_dict[a:b] = False
    if is_bar.any():
        mine = is_bar[bars]
        _bulk_bars(out, base, bars[mine], list(compress(bar_n, mine)), list(compress(bar_total, mine)))
    if tpl is not None:  # the common shape's dicts that are still dicts (a wrapped dict may have taken one)
        at = dicts[tpl.matched]
        mine = is_dict[at]
        width = len(tpl.keys)
        vals = tpl.values[np.repeat(mine, width)]
        n_mine = int(mine.sum())
        codes = np.tile(np.arange(width), n_mine)
        _add_dicts(out, st, base, at[mine], np.full(n_mine, width), codes, tpl.keys, vals, None, keras_before)
        is_dict[at] = False
    still = is_dict[dicts]
    if still.any():
        _bulk_dicts(out, st, base, dicts[still], list(compress(text, still)), keras_before)
    return done


@dataclass
class _Template:
    """The dicts of a chunk that print one shape (the same keys in the same order, plain numbers), read at once."""

    matched: np.ndarray  # per dict line of the chunk: of this shape
    keys: list[str]
    values: np.ndarray  # the matched lines' numbers, line by line


def _template_read(text: list[str], closed: np.ndarray) -> _Template | None:
    """The lines of ``text`` that are exactly ``{'k1': v1, 'k2': v2, ...}`` with the first closed line's keys and
    plain numbers, read with one regex of the keys' text over the lines' bytes (None when that shape is not one to
    read in bulk). Their keys and numbers hold none of the words that send a dict line to the line grammars, so those
    lines need no search for them; and they are read as :func:`_plain_dicts` reads them, by the same argument."""
    first = int(np.argmax(closed)) if closed.any() else -1
    if first < 0:
        return None
    keys = [k for k, _ in BULK_PAIR.findall(text[first][: text[first].find("}") + 1])]
    if not keys or any("'" in k or "}" in k or any(w in k for w in DICT_LINE_GRAMMAR) for k in keys):
        return None
    found = _template(tuple(keys)).findall("\n".join(text).encode("utf-8", "surrogatepass"))
    if len(keys) == 1:
        matched = np.fromiter(map(bool, found), dtype=bool, count=len(found))
        values: Iterable[bytes] = compress(found, matched)
    else:
        matched = np.fromiter(map(bool, map(itemgetter(0), found)), dtype=bool, count=len(found))
        values = chain.from_iterable(compress(found, matched))
    try:
        numbers = np.fromiter(map(float, values), dtype=np.float64, count=len(keys) * int(matched.sum()))
    except ValueError:  # "0x10", "step": not numbers, and maybe words for the line grammars
        return None
    return _Template(matched, keys, numbers)


def _lines_with(text: list[str], needles: tuple[str, ...]) -> np.ndarray:
    """The indices of the lines of ``text`` holding any of ``needles`` (``str.find`` over the joined lines)."""
    joined = "\n".join(text)
    hits: list[int] = []
    for needle in needles:
        at = joined.find(needle)
        while at >= 0:
            hits.append(at)
            end = joined.find("\n", at)
            at = joined.find(needle, end) if end >= 0 else -1
    if not hits:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(np.fromiter(map(len, text), dtype=np.int64, count=len(text)) + 1)
    return np.searchsorted(ends, hits, side="right")


def _pick(items: list[Any], at: np.ndarray) -> list[Any]:
    """``[items[j] for j in at]``, at C speed."""
    if len(at) == 1:
        return [items[int(at[0])]]
    return list(itemgetter(*at.tolist())(items)) if len(at) else []


def _bulk_bars(out: ConsoleParse, base: int, bars: np.ndarray, n_text: list[bytes], total_text: list[bytes]) -> None:
    """Bare tqdm bars: each a progress point (line, n, total); the largest total is a max_steps hint."""
    n = np.fromiter(map(int, n_text), dtype=np.int64, count=len(bars))
    total = np.fromiter(map(int, total_text), dtype=np.int64, count=len(bars))
    out.add_bars(bars + base, n, total)
    out.max_steps_hint = max(out.max_steps_hint or 0, int(total.max()))
    out.counter_at(int(bars[-1]) + base, (int(n[-1]), int(total[-1])))


def _bulk_dicts(
    out: ConsoleParse, st: State, base: int, dicts: np.ndarray, bodies: list[str], keras_before: int | None
) -> None:
    """One-line HF dicts: one record each, with the values :func:`~autopsy.importers._console_formats.dict_value`
    reads, in printed order (a key printed twice keeps its first place and its last value, as a Python dict would);
    a dict with no number makes no record."""
    got = _template_dicts(bodies)
    if got is None:
        got = _plain_dicts(bodies)
    if got is None:  # quoted (HF 5.x), "nan.0", text, odd spacing: DICT_PAIR and the line grammars' reading
        found = [BULK_PAIR.findall(b[: b.find("}") + 1]) for b in bodies]  # a dict ends at its first "}"
        counts = np.fromiter(map(len, found), dtype=np.int64, count=len(found))
        pairs = list(chain.from_iterable(found))
        key_codes, uniq = _key_codes(list(map(itemgetter(0), pairs)), counts)
        read = [dict_value(v) for v in map(itemgetter(1), pairs)]
        ok = np.asarray([v is not None for v in read], dtype=bool)
        vals = np.asarray([math.nan if v is None else v for v in read], dtype=np.float64)
    else:
        counts, key_codes, uniq, vals = got
        ok = None
    _add_dicts(out, st, base, dicts, counts, key_codes, uniq, vals, ok, keras_before)


def _add_dicts(
    out: ConsoleParse,
    st: State,
    base: int,
    dicts: np.ndarray,
    counts: np.ndarray,
    key_codes: np.ndarray,
    uniq: list[str],
    vals: np.ndarray,
    ok: np.ndarray | None,
    keras_before: int | None,
) -> None:
    """Records of the dicts on lines ``dicts``: ``counts`` values each (``ok`` says which are numbers)."""
    rec = np.repeat(np.arange(len(dicts)), counts)
    code_of = np.asarray([out.code(k.strip(), k.strip(), True) for k in uniq], dtype=np.int64)
    codes = code_of[key_codes]
    if ok is not None:
        rec, codes, vals = rec[ok], codes[ok], vals[ok]
    pair = rec * len(out.names) + codes
    if _repeats(pair):
        rec, codes, vals = _last_value_first_place(pair, rec, codes, vals)
    used = rec[np.r_[True, rec[1:] != rec[:-1]]] if len(rec) else rec  # dicts with at least one number (rec sorted)
    at = dicts[used] + base
    keras = np.full(len(at), NO if keras_before is None else keras_before, dtype=np.int64)
    if st.keras_changes:
        change_at = np.asarray([c[0] for c in st.keras_changes])
        k = np.searchsorted(change_at, at, side="right") - 1
        keras = np.where(k >= 0, np.asarray([c[1] for c in st.keras_changes])[np.maximum(k, 0)], keras)
    out.add_dicts(at, np.searchsorted(used, rec), codes, vals, keras)


@lru_cache(maxsize=64)
def _template(keys: tuple[str, ...]) -> re.Pattern[bytes]:
    """One match per line: a line that is exactly ``{'k1': v1, 'k2': v2, ...}`` with these keys gives its values,
    any other line empty strings."""
    pairs = b", '".join(re.escape(k.encode("utf-8", "surrogatepass")) + rb"': ([^,}\n]+)" for k in keys)
    return re.compile(rb"^(?:\{'" + pairs + rb"\}|[^\n]*)$", re.MULTILINE)


def _template_dicts(bodies: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray] | None:
    """Dicts that all print the first one's shape (:func:`_template_read`): (pairs per dict, key codes, the keys,
    values); None when any does not."""
    tpl = _template_read(bodies, np.ones(len(bodies), dtype=bool))
    if tpl is None or not tpl.matched.all():
        return None
    width = len(tpl.keys)
    return np.full(len(bodies), width), np.tile(np.arange(width), len(bodies)), tpl.keys, tpl.values


def _key_codes(keys: list[str], counts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each key's code into the distinct keys (in the order they first appear). An HF log prints the same keys in the
    same order in every dict: where all dicts hold the first dict's keys, the codes repeat without hashing a key."""
    first = int(counts[0]) if len(counts) else 0
    if first and bool((counts == first).all()) and len(set(keys[:first])) == first:
        if all(keys[k::first].count(keys[k]) == len(counts) for k in range(first)):
            return np.tile(np.arange(first), len(counts)), keys[:first]
    codes, uniq = pd.factorize(np.asarray(keys, dtype=object))
    return np.asarray(codes), list(uniq)


def _plain_dicts(bodies: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray] | None:
    """Dicts written ``{'k': v, 'k': v}`` with plain numbers, split with ``str`` methods: (pairs per dict, key codes,
    the keys, values); None when any is not so. Where every line ends with ``}``, every key is free of quotes and braces and
    every value is a number ``float`` reads, a line is exactly ``{'`` k ``': `` v (``, '`` k ``': `` v)... ``}``, its
    first ``}`` ends it, and DICT_PAIR would find just these pairs."""
    if not all(map(str.endswith, bodies, repeat("}"))):
        return None
    counts = np.fromiter(map(str.count, bodies, repeat("': ")), dtype=np.int64, count=len(bodies))
    parts = "\n".join(bodies)[2:-1].replace("}\n{'", ", '").replace("': ", "\n").replace(", '", "\n").split("\n")
    if len(parts) != 2 * int(counts.sum()):
        return None
    codes, keys = _key_codes(parts[0::2], counts)
    if any("'" in k or "}" in k for k in keys):
        return None
    try:
        vals = np.fromiter(map(float, parts[1::2]), dtype=np.float64, count=len(codes))
    except ValueError:
        return None
    return counts, codes, keys, vals


def _repeats(pair: np.ndarray) -> bool:
    """Whether a value appears twice in ``pair`` (by counting where the range is small, else by hashing)."""
    if not len(pair):
        return False
    top = int(pair.max()) + 1
    return bool(np.bincount(pair).max() > 1) if top <= 8 * len(pair) + 1024 else len(np.unique(pair)) < len(pair)


def _last_value_first_place(
    pair: np.ndarray, rec: np.ndarray, codes: np.ndarray, vals: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(pair, kind="stable")
    sp = pair[order]
    first = np.r_[True, sp[1:] != sp[:-1]]
    last = np.r_[sp[1:] != sp[:-1], True]
    firsts, lasts = order[first], order[last]
    out_vals = vals.copy()
    out_vals[firsts] = vals[lasts]
    keep = np.zeros(len(pair), dtype=bool)
    keep[firsts] = True
    return rec[keep], codes[keep], out_vals[keep]


def _keep_tail(out: ConsoleParse, st: State, lines: list[str], base: int, done: int, last_record: int) -> None:
    """Keep the lines after the last record (``last_record``, -1 for none yet), or after the last bare numeric row,
    which may become one."""
    out.tail.extend(lines[:done])
    start = max(last_record, 0)
    if st.numeric:
        start = min(start, st.numeric[-1][0]) if last_record >= 0 else st.numeric[-1][0]
    start = max(start, out.tail_start, base + done - TAIL_LINES)
    if start > out.tail_start:
        del out.tail[: start - out.tail_start]
        out.tail_start = start
