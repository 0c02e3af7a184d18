"""Console logs: what a training job printed (``nohup.out``, ``slurm-1234.out``, a CI log, lines pasted in an issue).

The text is read a chunk at a time and cleaned (ANSI escapes, control characters, NUL and non-UTF-8 bytes dropped;
every line break, a progress bar's ``\\r`` rewrite too, as ``\\n``), parsed in one pass
(:mod:`autopsy.importers._console_stream`: bare progress bars and one-line HF dicts in bulk, every other line by the
line grammars of :mod:`autopsy.importers._console_formats`), and turned into the canonical frame
(``source="console"``); memory holds a chunk of text, the records as typed arrays and the lines after the last
record, never the whole log. Steps come from the line when it names one (``step``/``iter`` keys, ``Epoch [e][i/N]``
counters, tqdm's ``n/total`` beside an HF dict); otherwise they are inferred in order
(:mod:`autopsy.importers._console_steps`), and ``RunInfo.notes`` says how. What the log says about its end goes
into ``RunInfo``: ``finished`` (a final summary was printed), ``max_steps`` (a printed ``Total optimization
steps``/``max_steps``, else a counter's total), and ``crash`` (kind, exception, message, OOM sizes, last lines),
which the ``crash`` detector reads.

Each log file is a run of its own, unless it sits inside a run another source found (an HF output dir holding its
``train.log``): two logs in one folder are two jobs, never one merged curve.
"""

from __future__ import annotations

import codecs
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.errors import UnreadableError
from autopsy.frame import concat_frames, empty_frame, labelled_codes, make_frame
from autopsy.importers._base import Imported, ReadOptions
from autopsy.importers._console_crash import find_crash
from autopsy.importers._console_records import BAR, ConsoleParse
from autopsy.importers._console_steps import resolve_steps, training_bars
from autopsy.importers._console_stream import parse_console
from autopsy.importers._console_tokens import ANSI, CONTROL
from autopsy.metrics import canonical_metric
from autopsy.runinfo import Crash, Damage, LogStats, RunInfo

__all__ = ["ATTACH", "KIND", "PRIORITY", "claims", "parse_console_text", "read", "run_roots"]

KIND = SOURCE = "console"
PRIORITY = 3  # its step axis is often inferred: the last source to trust when another logs the same metric
ATTACH = "nearest"  # a log joins the run at or above it (an HF output dir's train.log); alone it is a run
_SUFFIXES = (".log", ".out", ".txt", ".err", ".stdout", ".stderr")
_NOT_LOGS = frozenset({"requirements.txt", "SOURCES.md", "LICENSE.txt", "merges.txt", "vocab.txt"})
_LOG_NAMES = re.compile(r"(nohup|slurm|train|output|stdout|stderr|console|log)", re.I)


def claims(path: Path) -> int:
    """``*.log``, ``*.out``, ``nohup.out``, ``slurm-*.out``...: 2; a ``.txt`` without a log-like name: 1 (a run of
    its own only where nothing else is)."""
    name = path.name
    if not name.endswith(_SUFFIXES) or name in _NOT_LOGS:
        return 0
    return 1 if name.endswith(".txt") and not _LOG_NAMES.search(name) else 2


def run_roots(files: list[Path], base: Path) -> dict[Path, Path]:
    """A log standing alone is a run of its own: the directory it is the only log of (its config.json beside it
    joins that run), else, in a directory of several logs (a folder of pasted logs, a SLURM dir), the file itself."""
    per_dir = Counter(f.parent for f in files)
    return {f: f.parent if per_dir[f.parent] == 1 else f for f in files}


MAX_BYTES = 1 << 30  # a console log over 1 GiB is read from its last GiB (the end is where crashes are)
# a loss under another name, when the log has no plain "loss": most specific first
_LOSS_FALLBACK = (
    "total_loss",
    "total-loss",
    "losses",
    "loss_total",
    "loss_net",
    "closs",
    "lm_loss",
    "lm-loss",
    "reduced_train_loss",
    "train_loss_epoch",
    "loss_sum",
    "objective",
    "total",  # YOLO's table: the sum of its box/obj/cls losses
)
_GRAD_FALLBACK = ("norm", "grad_norm_avg", "total_grad_norm")
_CONFIG_PRIVATE = ("_epochs_planned", "_steps_per_epoch")


_SPLITS = ("train", "training", "valid", "val", "validation", "eval", "test")


def _metric_name(key: str, from_dict: bool) -> str:
    if from_dict:
        return canonical_metric(key, hf_flat=True)
    # "val_loss valid" / "loss train" (LitGPT): a split word after a loss name names the split
    head, _, split = key.rpartition("_")
    if head and split in _SPLITS and "loss" in head:
        key = head if head.startswith(_SPLITS) else f"{split}_{head}"
    return canonical_metric(key)


_CHUNK = 1 << 20  # bytes decoded and cleaned at a time


_CONTROL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


def _clean(text: str, *, control: bool = True, replacements: bool = True) -> str:
    """ANSI escapes and control characters out; every line break as ``\\n`` (:func:`_line_breaks`). ``control``
    False says the bytes held no control character (so no escape, and no break but ``\\n``, ``\\r`` and the rare
    U+0085, U+2028, U+2029); ``replacements`` False that the text holds no U+FFFD."""
    if (control and "\x1b" in text) or "^[[" in text:
        text = ANSI.sub("", text)
    if control:
        return _line_breaks(CONTROL.sub("", text))
    if replacements:
        text = text.replace("\ufffd", "")
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        return _line_breaks(text)
    if "\r" not in text:
        return text
    return (text.replace("\r\n", "\n") if "\r\n" in text else text).replace("\r", "\n")


_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _line_breaks(text: str) -> str:
    """Every line break ``str.splitlines`` knows (``\\r\\n``, the bare ``\\r`` of a progress bar's rewrite, U+2028...)
    as ``\\n``."""
    return _BREAKS.sub("\n", text) if _BREAKS.search(text) else text


def _text_chunks(fh: Any, file: str, notes: list[str], limit: int = MAX_BYTES) -> Iterator[str]:
    """The text of a log, read and cleaned a chunk at a time (each ends on a line break where the chunk holds one),
    with binary and non-UTF-8 bytes dropped; ``notes`` gets what was dropped once the text is read.

    Memory holds a chunk, never the raw bytes beside their decoded copy: a binary or NUL-filled file costs next to
    nothing, and a million-line log is never held whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""  # text after the chunk's last line break
    bad = 0
    left = limit
    head: bytearray | None = bytearray()
    flagged = False  # the carry's bytes held a control character
    while True:
        data = fh.read(min(_CHUNK, left)) if left > 0 else b""
        left -= len(data)
        if head is not None:  # the first 64 KiB say whether this is a text log at all
            head += data[: (1 << 16) - len(head)]
            if len(head) >= 1 << 16 or not data:
                if head and head.count(b"\x00") / len(head) > 0.3:
                    notes.append(f"{file}: looks binary (NUL bytes), not a text log; its text fragments were read")
                head = None
        now = len(data.translate(None, _CONTROL_BYTES)) != len(data)
        control, flagged = now or flagged, now
        decoded = decoder.decode(data, final=not data)
        text = carry + decoded
        carry = ""
        if data:
            cut = text.rfind("\n") + 1
            if cut == 0:  # no line break in the chunk: keep back a possible escape's start
                esc = max(text.rfind("\x1b"), text.rfind("^"))
                cut = esc if esc >= 0 and len(text) - esc < 64 else len(text)
            text, carry = text[:cut], text[cut:]
            if len(carry) > len(decoded):  # the carry holds text of an earlier read too
                flagged = control
        replaced = text.count("\ufffd")
        bad += replaced
        if text:
            yield _clean(text, control=control, replacements=replaced > 0)
        if not data:
            break
    if bad:
        notes.append(f"{file}: {bad} byte(s) that are not UTF-8 were skipped")


# train metrics that are not the loss, when the log names its training objective "train_<something>"
_NOT_A_LOSS = re.compile(
    r"acc|time|runtime|step|epoch|lr|rate|samples|tokens|speed|batch|size|memory|mem|norm|scale|skip"
)


def _fallback_names(names: set[str]) -> dict[str, str]:
    """Rename a total loss / grad norm logged under another name when the log has no plain one: a total under
    another name (``total_loss``, ``lm loss``), else the one training objective the log prints (``Train_rf``)."""
    out: dict[str, str] = {}
    if "train/loss" not in names:
        cand = next((c for c in _LOSS_FALLBACK if c in names), None)
        if cand is None:
            objectives = sorted(
                n
                for n in names
                if n.startswith(("train_", "train/")) and "/" not in n[6:] and not _NOT_A_LOSS.search(n[6:])
            )
            cand = objectives[0] if len(objectives) == 1 else None
        if cand is not None:
            out[cand] = "train/loss"
    if "train/grad_norm" not in names:
        for cand in _GRAD_FALLBACK:
            if cand in names:
                out[cand] = "train/grad_norm"
                break
    return out


def _dedupe_stale_bars(p: ConsoleParse) -> int:
    """A progress bar re-printed with the same postfix (Lightning freezes it while validation runs) is one
    measurement, not a flat curve: consecutive bar records with identical values keep the first. Returns how many
    were dropped."""
    kind = p.array("kind")
    twice = np.flatnonzero((kind[1:] == BAR) & (kind[:-1] == BAR)) + 1
    if not len(twice):
        return 0
    starts = np.searchsorted(p.array("v_rec"), np.arange(len(kind) + 1)).tolist()
    codes, vals = p.array("v_code").tolist(), p.array("v_val").tolist()

    def values(r: int) -> dict[str, float]:
        return {p.names[c][0]: v for c, v in zip(codes[starts[r] : starts[r + 1]], vals[starts[r] : starts[r + 1]])}

    keep = np.ones(len(kind), dtype=bool)
    for r in twice.tolist():
        keep[r] = values(r) != values(r - 1)
    dropped = int((~keep).sum())
    if dropped:
        p.keep(keep)
    return dropped


def _config_into_info(p: ConsoleParse, info: RunInfo) -> None:
    cfg = {k: v for k, v in p.config.items() if k not in _CONFIG_PRIVATE}
    info.config.update(cfg)
    for key in ("logging_steps", "eval_steps", "save_steps"):
        v = cfg.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            setattr(info, key, int(v))
    if isinstance(cfg.get("num_train_epochs"), (int, float)) and cfg["num_train_epochs"] > 0:
        info.num_train_epochs = float(cfg["num_train_epochs"])
    printed_max = cfg.get("max_steps")
    if isinstance(printed_max, (int, float)) and printed_max > 0:
        info.max_steps = int(printed_max)
    elif p.max_steps_hint:
        info.max_steps = int(p.max_steps_hint)


def _overflow_rows(p: ConsoleParse, info: RunInfo, file: str) -> tuple[list[str], list[str], list[int], list[float]]:
    """fp16 loss-scale messages: each is a skipped step with the new scale, at the training bar's step before it."""
    metric: list[str] = []
    raw: list[str] = []
    steps: list[int] = []
    values: list[float] = []
    bar_lines, bar_steps = training_bars(p)
    for k, (ln, scale) in enumerate(p.overflow):
        if len(bar_lines):
            j = int(np.searchsorted(bar_lines, ln, side="right")) - 1
            s = int(bar_steps[j]) if j >= 0 else max(int(bar_steps[0]) - 1, 0)
        else:
            s = k + 1
        metric += ["train/loss_scale", "train/overflow"]
        raw += ["loss scale (overflow message)", "overflow message"]
        steps += [s, s]
        values += [scale, 1.0]
    if p.overflow and not len(bar_lines):
        info.notes.append(f"{file}: loss-scale messages carry no step: numbered 1..{len(p.overflow)} in order")
    return metric, raw, steps, values


def _frame(p: ConsoleParse, steps: np.ndarray, info: RunInfo, file: str, run: str) -> pd.DataFrame:
    """The long frame (metric, raw name, step, value) of every record and every loss-scale message."""
    rec, codes, vals = p.array("v_rec"), p.array("v_code"), p.array("v_val")
    metric = [_metric_name(key, from_dict) for key, _, from_dict in p.names]
    rename = _fallback_names(set(metric[c] for c in np.unique(codes).tolist()))
    if rename:
        metric = [rename.get(m, m) for m in metric]
        info.notes.append(
            f"{file}: " + ", ".join(f"{a!r} read as {b}" for a, b in rename.items()) + " (the log has no plain one)"
        )
    raw = [name for _, name, _ in p.names]
    step = steps[rec]
    ov_metric, ov_raw, ov_steps, ov_values = _overflow_rows(p, info, file)
    if ov_metric:  # the messages' names take codes after the records'
        codes = np.concatenate([codes, len(p.names) + np.arange(len(ov_metric))])
        metric, raw = metric + ov_metric, raw + ov_raw
        step = np.concatenate([step, np.asarray(ov_steps, dtype=np.int64)])
        vals = np.concatenate([vals, np.asarray(ov_values, dtype=np.float64)])
    if not len(vals):
        return empty_frame()
    return make_frame(
        run=run,
        source=SOURCE,
        metric=labelled_codes(codes, metric),
        raw_metric=labelled_codes(codes, raw),
        step=step,
        value=vals,
        take=True,
    )


def _end_of_log(p: ConsoleParse, steps: np.ndarray, info: RunInfo, file: str) -> dict[str, Any] | None:
    """A crash after the last metric line (comment lines, ``# ...``, are notes around a pasted log, never one)."""
    tail = "\n".join("" if ln.lstrip().startswith("# ") else ln for ln in p.tail)
    crash = find_crash(tail, offset_line=p.tail_start)
    if crash is not None:
        p.finished = False
        info.crash = Crash.from_dict({**crash, "file": file, "last_step": int(steps[-1]) if len(steps) else None})
    info.loss_scale_at_minimum = p.scale_floor_line is not None
    info.summary.update({k: v for k, v in p.summary.items() if k.startswith("train_") or k in ("total_flos",)})
    info.finished = True if p.finished else (False if p.has_banner else None)
    return crash


def parse_console_text(text: str, *, run: str = "console", file: str = "<text>") -> Imported:
    """Parse the text of a console log into a canonical frame and its :class:`RunInfo`."""
    return _parse(iter([_line_breaks(text)]), run=run, file=file)


def _parse(chunks: Iterator[str], *, run: str, file: str) -> Imported:
    info = RunInfo(name=run, sources=[SOURCE], files=[file])
    p = parse_console(chunks)
    stale = _dedupe_stale_bars(p)
    if stale:
        info.notes.append(
            f"{file}: {stale} progress-bar line(s) re-printed the same values (a stale postfix): read once"
        )
    _config_into_info(p, info)
    steps, how = resolve_steps(p, info)
    frame = _frame(p, steps, info, file, run)
    crash = _end_of_log(p, steps, info, file)
    stats = LogStats(
        file=file,
        lines=p.n_lines,
        records=len(p),
        step_axis=how,
        printed_start=p.has_banner,
        overflow_messages=len(p.overflow),
        last_counter=p.last_counter,
    )
    info.logs.append(stats)
    if len(p):
        info.notes.append(f"{file}: {len(p)} metric lines read; steps from {how}")
        if len(steps):
            info.global_step = int(steps.max())
    elif crash is not None:
        info.notes.append(f"{file}: no metric lines; the log ends in a crash ({crash['kind']})")
    elif not p.overflow:
        info.unread_logs.append(stats)
        info.notes.append(
            f"{file}: no metric line in a format autopsy reads ({p.n_lines} lines): HF Trainer dicts, "
            "'key: value' / 'key=value' loggers, progress bars, loss-scale messages"
        )
    return Imported.one(frame, info)


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read one run's console logs into a canonical frame (``source="console"``)."""
    infos: list[RunInfo] = []
    frames: list[pd.DataFrame] = []
    for path in map(Path, paths):
        damage = []
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                if size > MAX_BYTES:
                    fh.seek(size - MAX_BYTES)
                    damage.append(
                        Damage(
                            file=str(path),
                            offset=0,
                            problem=f"log of {size} bytes is over the {MAX_BYTES}-byte limit",
                            salvaged="its last GiB",
                        )
                    )
                notes: list[str] = []
                got = _parse(_text_chunks(fh, str(path), notes), run=run, file=str(path))
        except OSError as exc:
            raise UnreadableError(f"{path}: cannot read ({exc.strerror or exc})") from None
        file_info = got.runs[run]
        file_info.notes[:0] = notes
        file_info.damage[:0] = damage
        frames.append(got.frame)
        infos.append(file_info)
    info = RunInfo(name=run, sources=[SOURCE])
    for file_info in infos:
        info.merge(file_info)
    crashed = [i.crash for i in infos if i.crash is not None]
    info.crash = crashed[-1] if crashed else None  # the last file with a crash speaks for the run's end
    return Imported.one(concat_frames(frames), info)
