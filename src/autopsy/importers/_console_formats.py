"""Line grammars of training consoles: what a metric record, a step counter, a loss-scale message and a crash
look like in the text a job printed.

One pass over the lines (:func:`parse_console`) turns the text into *records* (one per printed metric line or HF
dict, with the step the line names, if any) plus the context a console carries (a printed ``max_steps``, the HF
``***** Running training *****`` banner, the final summary, fp16 overflow messages). :func:`find_crash` reads
the tail of the log for a traceback or a kill. The regexes are compiled once; lines that cannot hold a metric
are skipped by a cheap pre-filter, so a 100k-line log of progress bars parses in well under a second.

Grammars (each seen in real logs, ``../shared/issue-logs``):

- HF Trainer dicts, 4.x floats ``{'loss': 0.0, 'grad_norm': nan, ...}`` and 5.x strings ``{'loss': '0', ...}``,
  possibly wrapped by the terminal over several lines; their step is the tqdm counter printed beside them.
- ``key: value`` / ``key=value`` / ``key value`` pairs (mmengine, mmcv, Keras, Lightning, fairseq, Megatron,
  Caffe, loguru, LitGPT, custom loops); multi-word keys (``grad norm: nan``) only before ``:``/``=``.
- step counters: ``step``/``iter``/``num_updates`` keys, ``Epoch [e][i/N]`` / ``epoch e  i / N``,
  ``iteration N/ M``, tqdm's ``n/total [elapsed<left``, Keras ``Epoch e/E`` headers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConsoleParse", "find_crash", "parse_console", "parse_number"]

# --- tokens -------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:nan(?:\.0)?|inf(?:inity)?|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![a-z\d])"
_WORD = r"\[?[A-Za-z][\w./\-]*\]?"
# a value ends at a delimiter, or where a glued word starts with a capital ("0.2445Epoch 1/1000")
_END = r"(?=$|[\s,;|)\]}(%:*`']|[A-Z])"
PAIR = re.compile(
    rf"(?<![\w.\-])(?:(?P<k1>{_WORD}(?: {_WORD}){{0,3}})\s*[:=]\s*|(?P<k2>{_WORD})\s+)(?P<v>{_NUM}){_END}",
    re.IGNORECASE,
)
# cheap pre-filter: a line that could be a metric record
RECORD_HINT = re.compile(r"loss|norm|learning|lr\b|scale|acc|\bppl\b", re.IGNORECASE)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\^\[\[[0-9;]*[A-Za-z]|\x1b[()][A-Z0-9]")
CONTROL = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127, 0xFFFD])

DICT_START = re.compile(r"\{'")
DICT_PAIR = re.compile(r"'(?P<k>[^'\n]+)'\s*:\s*(?P<v>'[^']*'|\"[^\"]*\"|[^,}]+)")

EPOCH = re.compile(r"\bepoch\b(?:\(train\))?\s*:?\s*\[?\s*(?P<e>\d+)(?:\s*/\s*(?P<etot>\d+))?\s*\]?", re.IGNORECASE)
COUNTER = re.compile(r"(?P<i>\d+)\s*/\s*(?P<n>\d+)")
ITER_COUNTER = re.compile(r"\b(?:iteration|iter|step|global step)\s*[:=]?\s*(?P<i>\d+)\s*/\s*(?P<n>\d+)", re.IGNORECASE)
TQDM = re.compile(r"(?P<i>\d+)/(?P<n>\d+) \[(?:\d+:)?\d+:\d+<")
KERAS_HEADER = re.compile(r"^\s*Epoch (?P<e>\d+)/(?P<etot>\d+)\s*$")

STEP_KEYS = {
    "step",
    "global_step",
    "num_updates",
    "iteration",
    "iter",
    "steps",
    "update",
    "global_steps",
    "it",
    "train_step",
    "trainer/global_step",
}

# fp16 dynamic loss scalers: DeepSpeed, apex, fairseq, torch.cuda.amp (via a printed scale)
OVERFLOW = re.compile(
    r"OVERFLOW!.*?Attempted loss scale:\s*(?P<a>" + _NUM + r"),\s*reducing to\s*(?P<ds>" + _NUM + r")"
    r"|Gradient overflow\.\s+Skipping step.*?reducing loss scale to\s*(?P<apex>" + _NUM + r")"
    r"|overflow detected, setting loss scale to:?\s*(?P<fs>" + _NUM + r")",
    re.IGNORECASE,
)
SCALE_FLOOR = re.compile(r"Current loss scale already at minimum", re.IGNORECASE)

# printed configuration: HF's training banner, TrainingArguments repr, yaml/argparse dumps
BANNER = re.compile(r"\*{3,} Running training \*{3,}")
CONFIG_LINE = re.compile(
    r"(?P<k>Num Epochs|Num examples|Num update steps per epoch|Instantaneous batch size per device|Total optimization steps|"
    r"Gradient Accumulation steps|Number of trainable parameters|Total train batch size[^=]*)\s*=\s*(?P<v>[\d,.]+)"
    r"|\b(?P<ck>max_steps|logging_steps|eval_steps|save_steps|num_train_epochs|learning_rate|max_grad_norm|"
    r"per_device_train_batch_size|gradient_accumulation_steps|warmup_steps|warmup_ratio|max_seq_length|"
    r"max_length|model_max_length|cutoff_len|sequence_len|seq_length|fp16|bf16|gradient_checkpointing)"
    r"\s*[=:]\s*(?P<cv>True|False|true|false|" + _NUM + r")\b"
)
PEFT_PARAMS = re.compile(r"trainable params:\s*(?P<t>[\d,]+)\s*\|\|\s*all params:\s*(?P<a>[\d,]+)")
BANNER_KEYS = {
    "Num Epochs": "num_train_epochs",
    "Num examples": "num_examples",
    "Num update steps per epoch": "_steps_per_epoch",
    "Instantaneous batch size per device": "per_device_train_batch_size",
    "Total optimization steps": "max_steps",
    "Gradient Accumulation steps": "gradient_accumulation_steps",
    "Number of trainable parameters": "trainable_params",
}
# a run that printed its end: HF's summary dict, Lightning's stop line, LitGPT's training time
FINISHED = re.compile(
    r"'train_runtime'|Training completed\.|`Trainer\.fit` stopped|(?m:^Training time: [\d.]+s$)|"
    r"(?i:training finished)"
)
# notebook progress tables (HF/TRL in Jupyter, copied as text): "Step | Training Loss | ..." then numeric rows
TABLE_HEADER = re.compile(r"^\s*\|?\s*(?:Step|Epoch)\s*(?:\||\t)(?=.*loss)", re.IGNORECASE)

# --- crashes --------------------------------------------------------------------------------------------

CRASH_KINDS: list[tuple[str, re.Pattern[str]]] = [
    (
        "oom",
        re.compile(
            r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|RESOURCE_EXHAUSTED|"
            r"ResourceExhaustedError|OOM when allocating|ran out of memory|"
            r"bfc_allocator\.cc:\d+\] Allocator|HIP out of memory|MPS backend out of memory"
        ),
    ),
    (
        "device_assert",
        re.compile(
            r"device-side assert|Assertion [`'].*[`'] failed|index out of bounds|"
            r"srcIndex < srcSelectDimSize|CUDA error: an illegal memory access"
        ),
    ),
    ("disk_full", re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded")),
    (
        "killed",
        re.compile(
            r"(?m)^\W*Killed\W*$|\b\d+ Killed\s|已杀死|Signal 9 \(SIGKILL\)|\bSIGKILL\b|exit ?code:? ?(?:-9|137)\b|"
            r"oom-kill|Out of memory: Killed process|killed by signal 9"
        ),
    ),
    (
        "nccl_timeout",
        re.compile(
            r"Watchdog caught collective|collective operation timeout|NCCL.{0,80}time(?:d )?out|"
            r"ProcessGroupNCCL.{0,120}[Tt]imeout|DistBackendError.{0,80}[Tt]imeout"
        ),
    ),
    ("interrupted", re.compile(r"KeyboardInterrupt")),
]
TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
EXCEPTION_LINE = re.compile(
    r"(?m)^[\W_]*(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure|Fault))\b\W*?:?\s*(?P<msg>.*)$"
)
_UNIT = {
    "b": 1 / 2**30,
    "kib": 1 / 2**20,
    "kb": 1 / 2**20,
    "mib": 1 / 2**10,
    "mb": 1 / 2**10,
    "gib": 1.0,
    "gb": 1.0,
    "tib": 2**10,
    "tb": 2**10,
}
_SIZE = r"(?P<n>[\d.]+)\s*(?P<u>[KMGT]i?B|B)"
OOM_SIZES = {
    "tried_to_allocate_gib": re.compile(r"(?:Tried to allocate|trying to allocate)\s*" + _SIZE),
    "total_capacity_gib": re.compile(
        _SIZE + r" total capacity|total capacity of\s*" + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>")
    ),
    "already_allocated_gib": re.compile(
        _SIZE
        + r" already allocated|allocated memory\s*"
        + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>")
        + r" is allocated"
    ),
    "free_gib": re.compile(
        _SIZE + r" free\b|of which\s*" + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>") + r" is free"
    ),
    "reserved_gib": re.compile(
        _SIZE + r" reserved in total|" + _SIZE.replace("?P<n>", "?P<n2>").replace("?P<u>", "?P<u2>") + r" is reserved"
    ),
}


def parse_number(text: str) -> float | None:
    """A console number: ``nan``, ``-nan``, ``nan.0``, ``inf``, ``Infinity``, ``1,234``, ``31.8%`` -> float."""
    t = text.strip().strip("'\"").rstrip("%").replace(",", "")
    low = t.lower()
    if low.lstrip("+-").startswith("nan"):
        return math.nan
    try:
        return float(t)
    except ValueError:
        return None


@dataclass
class ConsoleParse:
    """What one pass over a console log found."""

    # records: parallel lists, one entry per metric line / dict
    line: list[int] = field(default_factory=list)
    step: list[int | None] = field(default_factory=list)  # from the line itself
    epoch: list[tuple[int, int, int] | None] = field(default_factory=list)  # epoch + counter on the line: (e, i, n)
    counter: list[tuple[int, int] | None] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)  # "dict", "pairs"
    pairs: list[dict[str, float]] = field(default_factory=list)
    raw_keys: list[dict[str, str]] = field(default_factory=list)
    # context
    tqdm_before: list[int | None] = field(default_factory=list)  # last tqdm counter before the record
    tqdm_lines: list[tuple[int, int, int]] = field(default_factory=list)  # (line, n, total)
    keras_epoch: list[int | None] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    max_steps_hint: int | None = None  # a counter's total (tqdm / iteration N/M), not a printed config
    has_banner: bool = False
    finished: bool = False
    summary: dict[str, float] = field(default_factory=dict)
    overflow: list[tuple[int, float]] = field(default_factory=list)  # (line, new scale)
    scale_floor_line: int | None = None
    n_lines: int = 0


def _clean_key(key: str) -> str:
    return " ".join(key.strip().strip("[]*`").split())


def _dict_record(text: str) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """Numbers, raw names and non-numeric strings of one printed HF dict."""
    values: dict[str, float] = {}
    raw: dict[str, str] = {}
    strings: dict[str, str] = {}
    for m in DICT_PAIR.finditer(text):
        key, v = m.group("k").strip(), m.group("v").strip()
        num = parse_number(v)
        if num is None or (v[:1] in "'\"" and "/" in v):
            strings[key] = v.strip("'\"")
            continue
        values[key] = num
        raw[key] = key
    return values, raw, strings


def parse_console(text: str) -> ConsoleParse:
    """One pass over the (cleaned) text of a console log."""
    out = ConsoleParse()
    lines = text.splitlines()
    out.n_lines = len(lines)
    last_tqdm: int | None = None
    keras_epoch: int | None = None
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        if not line or line.isspace() or line.startswith("# "):
            i += 1  # blank, or a comment around a pasted log (never a metric line)
            continue
        start = i
        # tqdm bars are most of a long log: handle them first and cheaply
        if "/" in line and "[" in line:
            t = TQDM.search(line)
            if t is not None:
                last_tqdm = int(t.group("i"))
                total = int(t.group("n"))
                out.tqdm_lines.append((i, last_tqdm, total))
                if EPOCH.search(line[: t.start()]) is None:
                    out.max_steps_hint = max(out.max_steps_hint or 0, total)
        if "{'" in line:
            j = line.index("{'")
            body = line[j:]
            # a dict wrapped by the terminal: join the following lines until it closes
            while "}" not in body and i + 1 < n and i - start < 50:
                i += 1
                body += lines[i]
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
                _add(out, start, step, None, None, "dict", values, raw, last_tqdm, keras_epoch)
            i += 1
            continue
        if "verflow" in line or "OVERFLOW" in line:
            m = OVERFLOW.search(line)
            if m is not None:
                v = m.group("ds") or m.group("apex") or m.group("fs")
                out.overflow.append((i, parse_number(v) or math.nan))
                i += 1
                continue
        if "minimum" in line and SCALE_FLOOR.search(line):
            out.scale_floor_line = i
        if "=" in line or ":" in line or "params" in line or "*****" in line:
            _config_line(out, line)
        if not out.finished and FINISHED.search(line):
            out.finished = True
        if ("|" in line or "\t" in line) and TABLE_HEADER.match(line):
            sep = "|" if "|" in line else "\t"
            header = [c.strip() for c in line.strip().strip("|").split(sep)]
            i = _table(out, lines, i + 1, header, sep, last_tqdm, keras_epoch)
            continue
        kh = KERAS_HEADER.match(line)
        if kh is not None:
            keras_epoch = int(kh.group("e"))
            out.config.setdefault("_epochs_planned", int(kh.group("etot")))
            i += 1
            continue
        if RECORD_HINT.search(line) and not line.lstrip().startswith("#"):
            _pairs_record(out, i, line, last_tqdm, keras_epoch)
        i += 1
    return out


def _table(
    out: ConsoleParse,
    lines: list[str],
    i: int,
    header: list[str],
    sep: str,
    last_tqdm: int | None,
    keras_epoch: int | None,
) -> int:
    """Rows of a notebook progress table under ``header``; returns the index of the first line after it."""
    names = [_clean_key(h).lower().replace(" ", "_").replace("_/_", "/") for h in header]
    while i < len(lines):
        cells = [c.strip() for c in lines[i].strip().strip("|").split(sep)]
        if len(cells) < 2 or not set(cells[0]) <= set("-: "):
            if len(cells) < 2 or not cells[0].isdigit():
                break
            values: dict[str, float] = {}
            for name, cell in zip(names[1:], cells[1:]):
                v = parse_number(cell)
                if v is not None:
                    values[name] = v
            if values:
                _add(out, i, int(cells[0]), None, None, "table", values, {k: k for k in values}, last_tqdm, keras_epoch)
        i += 1
    return i


def _add(
    out: ConsoleParse,
    line: int,
    step: int | None,
    epoch: tuple[int, int, int] | None,
    counter: tuple[int, int] | None,
    kind: str,
    values: dict[str, float],
    raw: dict[str, str],
    last_tqdm: int | None,
    keras_epoch: int | None,
) -> None:
    out.line.append(line)
    out.step.append(step)
    out.epoch.append(epoch)
    out.counter.append(counter)
    out.kind.append(kind)
    out.pairs.append(values)
    out.raw_keys.append(raw)
    out.tqdm_before.append(last_tqdm)
    out.keras_epoch.append(keras_epoch)


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


def _pairs_record(out: ConsoleParse, i: int, line: str, last_tqdm: int | None, keras_epoch: int | None) -> None:
    values: dict[str, float] = {}
    raw: dict[str, str] = {}
    step: int | None = None
    for m in PAIR.finditer(line):
        key = _clean_key(m.group("k1") or m.group("k2"))
        lit = m.group("v")
        norm = key.lower().replace(" ", "_")
        if norm in STEP_KEYS or norm == "global_step":
            if lit.isdigit() and step is None:
                step = int(lit)
            continue
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
        else:
            t = TQDM.search(line)
            if t is not None:
                counter = (int(t.group("i")), int(t.group("n")))
    _add(out, i, step, epoch, counter, "pairs", values, raw, last_tqdm, keras_epoch)


# --- crashes ----------------------------------------------------------------------------------------------


def _gib(m: re.Match[str]) -> float | None:
    n = m.group("n") if m.group("n") is not None else m.groupdict().get("n2")
    u = m.group("u") if m.group("u") is not None else m.groupdict().get("u2")
    if n is None or u is None:
        return None
    try:
        return round(float(n) * _UNIT[u.lower()], 4)
    except (ValueError, KeyError):
        return None


def find_crash(tail: str, *, offset_line: int = 0) -> dict[str, Any] | None:
    """The crash a log ends with: kind, exception, message, sizes (OOM), and the last lines. None when clean."""
    if not tail.strip():
        return None
    found: tuple[str, re.Match[str]] | None = None
    for kind, pattern in CRASH_KINDS:
        m = pattern.search(tail)
        if m is not None:
            found = (kind, m)
            break
    exc_name = exc_msg = None
    tracebacks = list(TRACEBACK.finditer(tail))
    tb = tracebacks[-1] if tracebacks else None
    # the exception a traceback ends with (the first one after the last traceback), else the last one printed
    candidates = [em for em in EXCEPTION_LINE.finditer(tail) if not em.group(0).lstrip().startswith("File ")]
    after = [em for em in candidates if tb is not None and em.start() > tb.end()]
    pick = after[0] if after else (candidates[-1] if candidates else None)
    if pick is not None and (tb is not None or found is not None):
        exc_name, exc_msg = pick.group("name"), pick.group("msg").strip(" *`")
    if found is None and exc_name is None:
        return None
    kind = found[0] if found else "other"
    match_line = tail.count("\n", 0, (found[1].start() if found else tb.start())) + offset_line  # type: ignore[union-attr]
    message = ""
    if found is not None:
        ls = tail.rfind("\n", 0, found[1].start()) + 1
        le = tail.find("\n", found[1].end())
        message = tail[ls : le if le >= 0 else len(tail)].strip()
    elif exc_name:
        message = f"{exc_name}: {exc_msg}".strip(": ")
    lines = [ln.rstrip() for ln in tail.splitlines() if ln.strip()]
    out: dict[str, Any] = {
        "kind": kind,
        "exception": exc_name,
        "message": message[:400],
        "line": match_line + 1,
        "tail": [ln[:300] for ln in lines[-12:]],
    }
    if kind == "oom":
        for name, pat in OOM_SIZES.items():
            m = pat.search(tail)
            if m is not None:
                v = _gib(m)
                if v is not None:
                    out[name] = v
        out["message_cut"] = not any(k in out for k in OOM_SIZES) and "bfc_allocator" in message
    return out
