"""Line grammars of training consoles: what a metric record, a step counter, a loss-scale message and a printed config
look like in the text a job printed.

:func:`parse_line` reads one line into *records* (one per printed metric line, HF dict or table row, with the step
the line names, if any, stored in a :class:`~autopsy.importers._console_records.ConsoleParse`) plus the context a
console carries (a printed ``max_steps``, the HF ``***** Running training *****`` banner, the final summary, fp16
overflow messages, the last progress counter); :class:`State` carries what one line leaves for the next. The pass
over a whole log, and the bulk reading of the bare progress bars and one-line HF dicts that make up nearly all of an
HF log, is :mod:`autopsy.importers._console_stream`'s. How a log ends (a traceback, a kill) is
:mod:`autopsy.importers._console_crash`'s. Lines that cannot hold a metric are skipped by cheap substring gates.

Grammars (each seen in real logs, ``../shared/issue-logs`` and the labelled corpora):

- HF Trainer dicts, 4.x floats ``{'loss': 0.0, 'grad_norm': nan, ...}`` and 5.x strings ``{'loss': '0', ...}``,
  possibly wrapped by the terminal over several lines; their step is the tqdm counter printed beside them.
- ``key: value`` / ``key=value`` / ``key value`` / ``key [value]`` pairs (mmengine, mmcv, Keras, Lightning, fairseq,
  Megatron, Caffe, DLLogger, loguru, LitGPT, nanoGPT, custom loops); multi-word keys (``grad norm: nan``,
  ``val. loss``) only before ``:``/``=``; a line whose phase is evaluation (``Eval Epoch: 1 ... Loss:``,
  ``Test net output #0: accuracy =``) puts its unprefixed values under eval.
- step counters: ``step``/``iter``/``num_updates`` keys (and ``<word> iter``), ``Epoch [e][i/N]`` / ``epoch e i / N``,
  ``iteration N/ M``, tqdm's ``n/total [elapsed<left``, Keras ``Epoch e/E`` headers.
- tables: notebook progress tables (``Step | Training Loss | ...``), whitespace tables with an ``Epoch`` header and
  ``e/E`` rows (YOLO), bare ``<step> <loss>`` columns.
- Tacotron-style ``Validation loss <iteration>: <value>``; markdown pastes (``> `` quotes, code fences glued to a line).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from autopsy.importers._console_records import BAR, DICT, PAIRS, TABLE, ConsoleParse
from autopsy.importers._console_tokens import (
    BANNER,
    BANNER_KEYS,
    CONFIG_LINE,
    COUNTER,
    DICT_PAIR,
    EPOCH,
    FINISHED,
    GLOG,
    HEADER_WORD,
    ITER_COUNTER,
    KERAS_HEADER,
    LOG_TAG,
    METRIC_WORDS,
    NUMERIC_ROW,
    OVERFLOW,
    PAIR,
    PEFT_PARAMS,
    PHASE,
    QUOTE,
    RECORD_HINT,
    SCALE_FLOOR,
    STEP_KEYS,
    STEP_WORDS,
    TABLE_HEADER,
    TQDM,
    TRAIN_WORD,
    VAL_AT_ITER,
    WS_HEADER,
    WS_ROW,
)

__all__ = ["ConsoleParse", "State", "dict_value", "flush_numeric", "parse_line", "parse_number"]


def parse_number(text: str) -> float | None:
    """A console number: ``nan``, ``-nan``, ``nan.0``, ``inf``, ``Infinity``, ``1,234``, ``31.8%`` -> float."""
    try:
        return float(text)  # the common case, at C speed
    except ValueError:
        pass
    t = text.strip().strip("'\"[]").rstrip("%").replace(",", "")
    low = t.lower()
    if low.lstrip("+-").startswith("nan"):
        return math.nan
    try:
        return float(t)
    except ValueError:
        return None


@dataclass
class State:
    """What the pass remembers from one line to the next."""

    keras_epoch: int | None = None
    keras_changes: list[tuple[int, int]] = field(default_factory=list)  # (line, epoch) of the headers in a chunk
    table: tuple[list[str], str] | None = None  # the notebook table being read: its column names, its separator
    table_next: int = -1  # the line its next row must be on
    ws_header: list[str] | None = None  # the last whitespace-table header (YOLO)
    numeric: list[tuple[int, int, float]] = field(default_factory=list)  # bare "<step> <value>" rows: (line, s, v)


def _clean_key(key: str) -> str:
    return " ".join(LOG_TAG.sub("", key.strip().strip("[]*`")).split())


def normalize_key(key: str) -> str:
    """``val. loss`` -> ``val_loss``, ``Grad Norm`` -> ``grad_norm``: lower case, runs of punctuation and spaces as
    one underscore (``/`` kept: it separates namespaces)."""
    return re.sub(r"[^a-z0-9/]+", "_", key.lower()).strip("_")


def _is_step_key(norm: str) -> bool:
    if norm in STEP_KEYS:
        return True
    words = norm.split("_")
    return len(words) > 1 and words[-1] in STEP_WORDS and not METRIC_WORDS.search("_".join(words[:-1]))


def dict_value(text: str) -> float | None:
    """The number an HF dict prints for a key (``0.5``, ``'0.5'``, ``nan``), None for text (``'10/100'``)."""
    v = text.strip()
    num = parse_number(v)
    return None if num is None or (v[:1] in "'\"" and "/" in v) else num


def _dict_record(text: str) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """Numbers, raw names and non-numeric strings of one printed HF dict."""
    values: dict[str, float] = {}
    raw: dict[str, str] = {}
    strings: dict[str, str] = {}
    for m in DICT_PAIR.finditer(text):
        key, v = m.group("k").strip(), m.group("v")
        num = dict_value(v)
        if num is None:
            strings[key] = v.strip().strip("'\"")
            continue
        values[key] = num
        raw[key] = key
    return values, raw, strings


def _hf_dict(out: ConsoleParse, st: State, first: str, lines: list[str], j: int, base: int) -> int:
    """An HF Trainer dict (possibly wrapped over lines) starting on ``first`` (``lines[j]`` cleaned of markdown
    quotes); returns the index of the next line."""
    start = j
    body = first[first.index("{'") :]
    while "}" not in body and j + 1 < len(lines) and j - start < 50:  # a dict wrapped by the terminal
        j += 1
        body += lines[j]
    values, raw, strings = _dict_record(body[: body.find("}") + 1] if "}" in body else body)
    step = None
    gs = strings.get("global_step/max_steps")
    if gs and "/" in gs:
        a, _, b = gs.partition("/")
        if a.strip().isdigit():
            step = int(a)
        if b.strip().isdigit():
            out.max_steps_hint = max(out.max_steps_hint or 0, int(b))
    for k in ("step", "global_step"):
        if step is None and k in values and math.isfinite(values[k]):
            step = int(values.pop(k))
    if "train_runtime" in values:
        out.summary.update(values)
        out.finished = True
    elif values:
        out.add(base + start, step, DICT, values, raw, keras=st.keras_epoch)
    return j + 1


def _context_line(out: ConsoleParse, st: State, i: int, line: str) -> None:
    """What a line says about the run besides metrics: a tqdm counter, a scale floor, config, the end."""
    if "/" in line and "[" in line:
        t = TQDM.search(line)
        if t is not None:
            n, total = int(t.group("i")), int(t.group("n"))
            out.tq_line.append(i)
            out.tq_i.append(n)
            out.tq_n.append(total)
            out.counter_at(i, (n, total))
            if EPOCH.search(line[: t.start()]) is None:
                out.max_steps_hint = max(out.max_steps_hint or 0, total)
    if "minimum" in line and SCALE_FLOOR.search(line):
        out.scale_floor_line = i
    if ("=" in line or ":" in line or "params" in line or "*****" in line) and "{'" not in line:
        _config_line(out, line)  # (an HF dict's keys are quoted: no config line pattern matches inside one)
    if not out.finished and ("rain" in line or "RAIN" in line) and FINISHED.search(line):  # every end names "train"
        out.finished = True


def _special_line(out: ConsoleParse, st: State, i: int, line: str) -> bool:
    """Lines of a grammar of their own; True when the line was one."""
    if "verflow" in line or "OVERFLOW" in line:
        m = OVERFLOW.search(line)
        if m is not None:
            v = m.group("ds") or m.group("apex") or m.group("fs")
            out.overflow.append((i, parse_number(v) or math.nan))
            return True
    kh = KERAS_HEADER.match(line)
    if kh is not None:
        st.keras_epoch = int(kh.group("e"))
        st.keras_changes.append((i, st.keras_epoch))
        out.config.setdefault("_epochs_planned", int(kh.group("etot")))
        return True
    va = VAL_AT_ITER.search(line) if ("oss " in line or "OSS " in line) else None
    if va is not None:
        out.add(
            i,
            int(va.group("s")),
            PAIRS,
            {"eval_loss": parse_number(va.group("v")) or math.nan},
            {"eval_loss": "validation loss"},
            keras=st.keras_epoch,
        )
        return True
    words = line.split()
    if (
        WS_HEADER.match(line)
        and all(HEADER_WORD.fullmatch(w) for w in words)
        and any(w.lower() in ("box", "obj", "cls", "total") or "loss" in w.lower() for w in words)
    ):
        st.ws_header = [normalize_key(w) for w in words]
        return True
    if st.ws_header is not None:
        row = WS_ROW.match(line)
        if row is not None:
            _ws_row(out, st, i, line)
            return True
    num = NUMERIC_ROW.match(line)
    if num is not None:
        v = parse_number(line.replace(",", " ").split()[1])
        if v is not None:
            st.numeric.append((i, int(num.group("s")), v))
        return True
    return False


def _ws_row(out: ConsoleParse, st: State, i: int, line: str) -> None:
    """A row of a whitespace table (YOLO): cells by the header's position; the step is the epoch of ``e/E``."""
    assert st.ws_header is not None
    cells = line.split()
    e, n = (int(x) for x in cells[0].split("/"))
    values: dict[str, float] = {}
    for name, cell in zip(st.ws_header[1:], cells[1:]):
        v = parse_number(cell.rstrip(":"))
        if v is not None and not cell.endswith(("G", "M")) and name not in ("labels", "instances", "img_size", "size"):
            values[name] = v
    if values:
        out.add(i, e, TABLE, values, {k: k for k in values}, keras=st.keras_epoch, counter=(e, n))


def flush_numeric(out: ConsoleParse, st: State) -> None:
    """Bare ``<step> <value>`` rows count as (step, loss) when there are at least 3 with a rising step."""
    rows = st.numeric
    if len(rows) >= 3 and all(b[1] > a[1] for a, b in zip(rows, rows[1:])):
        for ln, s, v in rows:
            out.add(ln, s, TABLE, {"loss": v}, {"loss": "column 2"}, keras=st.keras_epoch)
    st.numeric = []


def parse_line(out: ConsoleParse, st: State, lines: list[str], j: int, base: int) -> int:
    """Line ``j`` of ``lines`` (line ``base + j`` of the log) by the line grammars; returns the index of the next
    line to read (past the lines a wrapped HF dict took)."""
    i = base + j
    line = lines[j]
    if st.table is not None:
        if i == st.table_next and _table_row(out, st, i, line):
            st.table_next = i + 1
            return j + 1
        st.table = None
    if line.startswith(("> ", ">", "`")) or "```" in line:
        line = QUOTE.sub("", line)
    if line[:1] in "IWEF" and GLOG.match(line):
        line = GLOG.sub("", line)
    if not line or line.isspace() or line.startswith("# "):
        return j + 1  # blank, or a comment around a pasted log (never a metric line)
    _context_line(out, st, i, line)
    if "{'" in line:
        return _hf_dict(out, st, line, lines, j, base)
    if _special_line(out, st, i, line):
        return j + 1
    if ("|" in line or "\t" in line) and TABLE_HEADER.match(line):
        sep = "|" if "|" in line else "\t"
        header = [c.strip() for c in line.strip().strip("|").split(sep)]
        names = [_clean_key(h).lower().replace(" ", "_").replace("_/_", "/") for h in header]
        st.table, st.table_next = (names, sep), i + 1
        return j + 1
    if RECORD_HINT.search(line) and not line.lstrip().startswith("#"):
        _pairs_record(out, st, i, line)
    return j + 1


def _table_row(out: ConsoleParse, st: State, i: int, line: str) -> bool:
    """A row of the notebook progress table being read (or its ``---|---`` rule); False where the table ends."""
    assert st.table is not None
    names, sep = st.table
    cells = [c.strip() for c in line.strip().strip("|").split(sep)]
    if len(cells) >= 2 and set(cells[0]) <= set("-: "):
        return True
    if len(cells) < 2 or not cells[0].isdigit():
        return False
    values: dict[str, float] = {}
    for name, cell in zip(names[1:], cells[1:]):
        v = parse_number(cell)
        if v is not None:
            values[name] = v
    if values:
        out.add(i, int(cells[0]), TABLE, values, {k: k for k in values}, keras=st.keras_epoch)
    return True


def _config_line(out: ConsoleParse, line: str) -> None:
    if BANNER.search(line):
        out.has_banner = True
    m = PEFT_PARAMS.search(line)
    if m is not None:
        out.config.setdefault("trainable_params", int(m.group("t").replace(",", "")))
        out.config.setdefault("total_params", int(m.group("a").replace(",", "")))
    for m in CONFIG_LINE.finditer(line):
        if m.group("k"):
            key = m.group("k").strip()
            name = BANNER_KEYS.get(key, "total_train_batch_size" if key.startswith("Total train batch size") else key)
            v = parse_number(m.group("v"))
            if v is not None and math.isfinite(v):
                out.config.setdefault(name, int(v) if v == int(v) else v)
                if name == "max_steps":
                    out.has_banner = True
        else:
            key, raw = m.group("ck"), m.group("cv")
            if raw.lower() in ("true", "false"):
                out.config.setdefault(key, raw.lower() == "true")
            else:
                v = parse_number(raw)
                if v is not None and math.isfinite(v):
                    out.config.setdefault(key, int(v) if v == int(v) and "." not in raw else v)


def _eval_phase(line: str, first_key_at: int) -> bool:
    """True when the line names an evaluation phase before its first metric and no training phase."""
    head = line[:first_key_at]
    return PHASE.search(head) is not None and TRAIN_WORD.search(line) is None


def _pairs_record(out: ConsoleParse, st: State, i: int, line: str) -> None:
    values: dict[str, float] = {}
    raw: dict[str, str] = {}
    step: int | None = None
    matches = list(PAIR.finditer(line))
    first_metric = next((m.start() for m in matches if RECORD_HINT.search(m.group("k1") or m.group("k2"))), None)
    eval_phase = first_metric is not None and _eval_phase(line, first_metric)
    for m in matches:
        key = _clean_key(m.group("k1") or m.group("k2"))
        lit = m.group("v")
        norm = normalize_key(key)
        if _is_step_key(norm):
            if lit.isdigit() and step is None:
                step = int(lit)
            continue
        if eval_phase and not norm.startswith(("eval", "val", "test", "train")):
            norm = f"eval_{norm}"
        if norm in values:
            continue  # the first value of a key on a line is the current one ("loss=9.57 (10.94)")
        num = parse_number(lit)
        if num is None:
            continue
        values[norm] = num
        raw[norm] = key
    if not any(RECORD_HINT.search(k) for k in values) or "optimization steps" in line or "Accumulation steps" in line:
        return  # prose or a config dump, not a metric line
    epoch = counter = None
    t = TQDM.search(line)
    kind = BAR if t is not None and matches and first_metric is not None and first_metric > t.end() else PAIRS
    e = EPOCH.search(line)
    if e is not None:
        c = COUNTER.search(line, e.end())
        if c is not None:
            epoch = (int(e.group("e")), int(c.group("i")), int(c.group("n")))
    if epoch is None:
        ic = ITER_COUNTER.search(line)
        if ic is not None:
            counter = (int(ic.group("i")), int(ic.group("n")))
            out.max_steps_hint = max(out.max_steps_hint or 0, counter[1])
        elif t is not None:
            counter = (int(t.group("i")), int(t.group("n")))
    out.add(i, step, kind, values, raw, keras=st.keras_epoch, epoch=epoch, counter=counter)
