"""Console logs: what a training job printed (``nohup.out``, ``slurm-1234.out``, a CI log, lines pasted in an issue).

The text is cleaned (ANSI escapes, ``\\r`` progress-bar rewrites, NUL and non-UTF-8 bytes dropped), parsed by the
line grammars of :mod:`autopsy.importers._console_formats`, and turned into the canonical frame
(``source="console"``). Steps come from the line when it names one (``step``/``iter`` keys, ``Epoch [e][i/N]``
counters, tqdm's ``n/total`` beside an HF dict); otherwise they are inferred in order, and
``RunInfo.notes`` says how. What the log says about its end goes into ``RunInfo``: ``finished`` (a final summary
was printed), ``max_steps`` (a printed ``Total optimization steps``/``max_steps``, else a counter's total), and
``crash`` (kind, exception, message, OOM sizes, last lines), which the ``crash`` detector reads.

Each log file is a run of its own, unless it sits inside a run another source found (an HF output dir holding its
``train.log``): two logs in one folder are two jobs, never one merged curve.
"""

from __future__ import annotations

import bisect
import codecs
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.errors import UnreadableError
from autopsy.frame import concat_frames, empty_frame, make_frame
from autopsy.importers._base import Imported, ReadOptions
from autopsy.importers._console_crash import find_crash
from autopsy.importers._console_formats import ConsoleParse, parse_console
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
_BAR_DISTANCE = 3  # lines between an HF dict and its progress bar (a blank line each side in LLaMA-Factory logs)
_CONFIG_PRIVATE = ("_epochs_planned", "_steps_per_epoch")


_SPLITS = ("train", "training", "valid", "val", "validation", "eval", "test")


def _metric_name(key: str, kind: str) -> str:
    if kind == "dict":
        return canonical_metric(key, hf_flat=True)
    # "val_loss valid" / "loss train" (LitGPT): a split word after a loss name names the split
    head, _, split = key.rpartition("_")
    if head and split in _SPLITS and "loss" in head:
        key = head if head.startswith(_SPLITS) else f"{split}_{head}"
    return canonical_metric(key)


_CHUNK = 1 << 20  # bytes decoded and cleaned at a time


def _clean(text: str) -> str:
    if "\x1b" in text or "^[[" in text:
        text = ANSI.sub("", text)
    return CONTROL.sub("", text)


def _read_text(fh: Any, file: str, limit: int = MAX_BYTES) -> tuple[str, list[str]]:
    """Text of a log read in chunks, with binary and non-UTF-8 bytes dropped; notes say what was dropped.

    Each chunk is decoded and cleaned (ANSI escapes, control characters) before the next is read, so
    memory holds the cleaned text and one chunk, never the raw bytes beside their decoded copy: a
    binary or NUL-filled file costs next to nothing."""
    notes: list[str] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    carry = ""  # the end of a chunk that may hold the start of an ANSI escape cut by the chunk border
    bad = 0
    left = limit
    head: bytearray | None = bytearray()
    while True:
        data = fh.read(min(_CHUNK, left)) if left > 0 else b""
        left -= len(data)
        if head is not None:  # the first 64 KiB say whether this is a text log at all
            head += data[: (1 << 16) - len(head)]
            if len(head) >= 1 << 16 or not data:
                if head and head.count(b"\x00") / len(head) > 0.3:
                    notes.append(f"{file}: looks binary (NUL bytes), not a text log; its text fragments were read")
                head = None
        text = carry + decoder.decode(data, final=not data)
        carry = ""
        if data:
            cut = text.rfind("\n") + 1
            if cut == 0:  # no line end in the chunk: keep back a possible escape's start
                esc = max(text.rfind("\x1b"), text.rfind("^"))
                cut = esc if esc >= 0 and len(text) - esc < 64 else len(text)
            text, carry = text[:cut], text[cut:]
        bad += text.count("\ufffd")
        if text:
            pieces.append(_clean(text))
        if not data:
            break
    if bad:
        notes.append(f"{file}: {bad} byte(s) that are not UTF-8 were skipped")
    return "".join(pieces), notes


def _resolve_steps(p: ConsoleParse, info: RunInfo) -> tuple[np.ndarray, str]:
    """One step per record, and a sentence saying where the steps came from."""
    n = len(p.line)
    steps = np.full(n, -1, dtype=np.int64)
    how: dict[str, int] = {}
    epochs = [e for e in p.epoch if e is not None]
    base = 0 if any(e[0] == 0 for e in epochs) else 1
    bars = _training_bars(p)
    tq_lines = [ln for ln, _, _ in bars]
    for r in range(n):
        src = None
        step, epoch, counter, keras = p.step[r], p.epoch[r], p.counter[r], p.keras_epoch[r]
        if step is not None:
            steps[r], src = step, "the step printed on each line"
        elif epoch is not None:
            e, i, tot = epoch
            steps[r], src = (
                (e - base) * tot + i,
                f"epoch x iterations-per-epoch + iteration (epochs counted from {base})",
            )
        elif counter is not None:
            steps[r], src = counter[0], "the iteration counter on each line"
        elif p.kind[r] == "dict" and bars:
            # the training bar is printed right beside each dict (before it, or re-printed after the first);
            # a bar further away is another bar (loading weights, evaluation)
            k = bisect.bisect_right(tq_lines, p.line[r])
            if k > 0 and p.line[r] - tq_lines[k - 1] <= _BAR_DISTANCE:
                steps[r] = bars[k - 1][1]
            elif k < len(tq_lines) and tq_lines[k] - p.line[r] <= _BAR_DISTANCE:
                steps[r] = bars[k][1]
            if steps[r] >= 0:
                src = "the progress bar's step printed beside each HF log dict"
        elif keras is not None:
            steps[r], src = keras, "the epoch number (Keras 'Epoch e/E' headers): one point per epoch"
        if src:
            how[src] = how.get(src, 0) + 1
    missing = steps < 0
    if missing.all() and n:
        steps, src = _infer_order(p, info)
        how[src] = n
    elif missing.any():
        # lines without their own step take the previous line's (summaries printed after a logged step)
        s = pd.Series(np.where(missing, np.nan, steps.astype(float))).ffill().fillna(0)
        steps = s.to_numpy().astype(np.int64)
        how["the previous line's step (lines without a step of their own)"] = int(missing.sum())
    sentence = "; ".join(f"{k} ({v} lines)" for k, v in how.items())
    return steps, sentence


def _training_bars(p: ConsoleParse) -> list[tuple[int, int, int]]:
    """The training progress bar's lines: the printed max_steps as total, else the most printed total
    (other bars -- loading weights, writing shards, evaluation -- have other totals)."""
    if not p.tqdm_lines:
        return []
    totals = [t for _, _, t in p.tqdm_lines if t > 1]
    want = p.config.get("max_steps")
    if want is not None and want not in totals:
        return []  # a printed plan and no bar with that total: no training bar (disable_tqdm)
    if want is None:
        if not totals:
            return []
        want = max(set(totals), key=totals.count)
    return [b for b in p.tqdm_lines if b[2] == want]


def _infer_order(p: ConsoleParse, info: RunInfo) -> tuple[np.ndarray, str]:
    """No step anywhere: HF dicts from epoch x steps-per-epoch when known, else counted in order."""
    n = len(p.line)
    logging_steps = int(info.logging_steps or p.config.get("logging_steps") or 1)
    is_train = np.array([not all(k.startswith(("eval_", "test_")) for k in d) for d in p.pairs], dtype=bool)
    epoch = np.array([d.get("epoch", np.nan) for d in p.pairs], dtype=float)
    spe = p.config.get("_steps_per_epoch")
    if spe and np.isfinite(epoch).all() and p.kind.count("dict") == n:
        steps = np.maximum(np.round(epoch * float(spe)), 1).astype(np.int64)
        return steps, f"epoch x {spe:g} steps per epoch (the printed 'Num update steps per epoch')"
    count = np.cumsum(is_train)
    count = np.maximum(count, 1)
    steps = (count * logging_steps).astype(np.int64)
    where = "a printed logging_steps" if p.config.get("logging_steps") else "1 step per line: logging_steps unknown"
    return steps, f"counting the logged lines in order x {logging_steps} ({where}); the log prints no step"


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
    keep = [
        not (k == "bar" and r > 0 and p.kind[r - 1] == "bar" and p.pairs[r] == p.pairs[r - 1])
        for r, k in enumerate(p.kind)
    ]
    dropped = keep.count(False)
    if dropped:
        for name in ("line", "step", "epoch", "counter", "kind", "pairs", "raw_keys", "keras_epoch"):
            values = getattr(p, name)
            setattr(p, name, [v for v, ok in zip(values, keep) if ok])
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


def _rows(p: ConsoleParse, steps: np.ndarray, info: RunInfo, file: str) -> dict[str, list[Any]]:
    """Long rows (metric, raw name, step, value) of every record and every loss-scale message."""
    rows: dict[str, list[Any]] = {"metric": [], "raw_metric": [], "step": [], "value": []}
    for r, values in enumerate(p.pairs):
        raw = p.raw_keys[r]
        for key, value in values.items():
            rows["metric"].append(_metric_name(key, p.kind[r]))
            rows["raw_metric"].append(raw.get(key, key))
            rows["step"].append(int(steps[r]))
            rows["value"].append(value)
    rename = _fallback_names(set(rows["metric"]))
    if rename:
        rows["metric"] = [rename.get(m, m) for m in rows["metric"]]
        info.notes.append(
            f"{file}: " + ", ".join(f"{a!r} read as {b}" for a, b in rename.items()) + " (the log has no plain one)"
        )
    if p.overflow:  # fp16 loss-scale messages: each is a skipped step with the new scale
        bars = _training_bars(p)
        tq_lines = [ln for ln, _, _ in bars]
        ov_steps = []
        for k, (ln, _) in enumerate(p.overflow):
            if tq_lines:
                j = bisect.bisect_right(tq_lines, ln) - 1
                ov_steps.append(bars[j][1] if j >= 0 else max(bars[0][1] - 1, 0))
            else:
                ov_steps.append(k + 1)
        if not tq_lines:
            info.notes.append(f"{file}: loss-scale messages carry no step: numbered 1..{len(p.overflow)} in order")
        for s, (_, scale) in zip(ov_steps, p.overflow):
            rows["metric"] += ["train/loss_scale", "train/overflow"]
            rows["raw_metric"] += ["loss scale (overflow message)", "overflow message"]
            rows["step"] += [s, s]
            rows["value"] += [scale, 1.0]
    return rows


def _end_of_log(text: str, p: ConsoleParse, steps: np.ndarray, info: RunInfo, file: str) -> dict[str, Any] | None:
    """A crash after the last metric line (comment lines, ``# ...``, are notes around a pasted log, never one)."""
    lines = text.splitlines()
    start = p.line[-1] if p.line else 0
    tail = "\n".join("" if ln.lstrip().startswith("# ") else ln for ln in lines[start:])
    crash = find_crash(tail, offset_line=start)
    if crash is not None:
        p.finished = False
        info.crash = Crash.from_dict({**crash, "file": file, "last_step": int(steps[-1]) if len(steps) else None})
    info.loss_scale_at_minimum = p.scale_floor_line is not None
    info.summary.update({k: v for k, v in p.summary.items() if k.startswith("train_") or k in ("total_flos",)})
    info.finished = True if p.finished else (False if p.has_banner else None)
    return crash


def parse_console_text(text: str, *, run: str = "console", file: str = "<text>") -> Imported:
    """Parse the text of a console log into a canonical frame and its :class:`RunInfo`."""
    info = RunInfo(name=run, sources=[SOURCE], files=[file])
    p = parse_console(text)
    stale = _dedupe_stale_bars(p)
    if stale:
        info.notes.append(
            f"{file}: {stale} progress-bar line(s) re-printed the same values (a stale postfix): read once"
        )
    _config_into_info(p, info)
    steps, how = _resolve_steps(p, info)
    rows = _rows(p, steps, info, file)
    frame = make_frame(run=run, source=SOURCE, **rows) if rows["metric"] else empty_frame()
    crash = _end_of_log(text, p, steps, info, file)
    stats = LogStats(
        file=file,
        lines=p.n_lines,
        records=len(p.line),
        step_axis=how,
        printed_start=p.has_banner,
        overflow_messages=len(p.overflow),
        last_counter=p.last_counter,
    )
    info.logs.append(stats)
    if p.line:
        info.notes.append(f"{file}: {len(p.line)} metric lines read; steps from {how}")
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
                text, notes = _read_text(fh, str(path))
        except OSError as exc:
            raise UnreadableError(f"{path}: cannot read ({exc.strerror or exc})") from None
        got = parse_console_text(text, run=run, file=str(path))
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
