"""The data side: checks over a training dataset (or a recorded batch) for rows that cannot train as meant.

``autopsy data DATASET [--tokenizer DIR] [--max-length N]`` reads a local dataset (``.jsonl``/``.json``, ``.parquet``,
``.arrow``, a ``datasets`` ``save_to_disk`` directory, a directory of such files) or a batch file recorded by
:class:`autopsy.callbacks.AutopsyCallback`, without torch, and reports as ``data_issue`` findings, each with its count
and the first example indices:

* ``empty``: no text (every string field blank) or no token (``input_ids`` empty, ``attention_mask`` all 0);
* ``all_labels_masked``: every label is -100 (the row teaches nothing; a batch of them makes the loss 0/0 = NaN);
* ``completion_truncated``: the prompt alone reaches ``max_length``, so the completion is cut away entirely;
* ``too_long``: longer than ``max_length`` tokens (the end is truncated);
* ``duplicate``: the same content as an earlier row.

The lengths and the number of unmasked (trained-on) tokens per row are summarized as a distribution (``data_summary``).
Token counts come from ``input_ids`` where the rows hold them, else from the tokenizer (``--tokenizer``: a dir with
``tokenizer.json``), else they are not checked (a note says so).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy._version import __version__
from autopsy.errors import InputError, UnreadableError, first_line
from autopsy.findings import Finding, Report, RunReport, Severity

__all__ = ["check_rows", "data_report", "read_dataset"]

MAX_ROWS = 2_000_000  # a bound on what is read (a note says when it is reached)
EXAMPLES = 20  # example indices kept per finding
IGNORE = -100
_TEXT_KEYS = (
    "text",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "question",
    "answer",
    "chosen",
    "response",
)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        data = json.loads(text)
        return [r for r in data if isinstance(r, dict)][:MAX_ROWS]
    rows = []
    for k, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise UnreadableError(f"{path}: line {k + 1} is not JSON") from None
        if isinstance(rec, dict):
            rows.append(rec)
        if len(rows) >= MAX_ROWS:
            break
    return rows


def _arrow(path: Path) -> list[dict[str, Any]]:
    from autopsy._optional import require

    pa = require("pyarrow", purpose="read Parquet/Arrow datasets")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
    else:
        with pa.memory_map(str(path)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()  # what datasets' save_to_disk writes
            except pa.ArrowInvalid:
                src.seek(0)
                table = pa.ipc.open_file(src).read_all()
    return table.slice(0, MAX_ROWS).to_pylist()


def _batch_file(path: Path) -> list[dict[str, Any]]:
    """A recorded batch: one row per sequence, steps and micro-batches in order (``step``/``micro_batch`` kept)."""
    import re

    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise UnreadableError(f"{path}: not a readable safetensors batch file ({first_line(exc)})") from None
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for key, arr in tensors.items():
        m = re.match(r"^step(\d+)\.mb(\d+)\.(.+)$", key)
        if m:
            groups.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = arr
        elif not key.startswith("rng."):
            groups.setdefault((-1, 0), {})[key] = arr
    rows = []
    for (step, mb), cols in sorted(groups.items()):
        seqs = {k: v for k, v in cols.items() if getattr(v, "ndim", 0) == 2}
        n = next(iter(seqs.values())).shape[0] if seqs else 0
        for r in range(n):
            row: dict[str, Any] = {k: v[r].tolist() for k, v in seqs.items()}
            if step >= 0:
                row.update(step=step, micro_batch=mb)
            rows.append(row)
    return rows


def _files_of(path: Path) -> list[Path]:
    state = path / "state.json"
    if state.is_file():  # datasets' save_to_disk of one Dataset
        try:
            files = [path / f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
        except (ValueError, KeyError, TypeError):
            files = []
        return files or sorted(path.glob("*.arrow"))
    found = sorted(
        p
        for ext in ("*.jsonl", "*.json", "*.parquet", "*.arrow")
        for p in path.glob(ext)
        if p.name not in ("dataset_info.json", "dataset_dict.json")
    )
    return found


def read_dataset(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """``{split: rows}``: one split for a file or a dataset dir, each split of a ``DatasetDict`` dir."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except ValueError:
            raise UnreadableError(f"{p / 'dataset_dict.json'}: not valid JSON") from None
        return {s: read_dataset(p / s)[p.joinpath(s).name] for s in splits if (p / s).is_dir()}
    files = _files_of(p) if p.is_dir() else [p]
    if not files:
        raise InputError(f"{p}: no dataset files (.jsonl, .json, .parquet, .arrow, a save_to_disk dir)")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            rows.extend(_jsonl(f))
        elif f.suffix in (".parquet", ".arrow"):
            rows.extend(_arrow(f))
        elif f.suffix == ".safetensors":
            rows.extend(_batch_file(f))
        else:
            raise InputError(
                f"{f}: unknown dataset format {f.suffix!r}: use .jsonl, .json, .parquet, .arrow or a batch .safetensors"
            )
    return {p.name: rows[:MAX_ROWS]}


def _texts(row: dict[str, Any]) -> list[str]:
    """The row's text: the usual fields (text, prompt/completion, chat messages...), else every string field."""
    out = [row[k] for k in _TEXT_KEYS if isinstance(row.get(k), str)]
    msgs = row.get("messages") or row.get("conversations")
    if isinstance(msgs, list):
        out += [str(m.get("content") or m.get("value") or "") for m in msgs if isinstance(m, dict)]
    if not out and "input_ids" not in row:
        out = [v for v in row.values() if isinstance(v, str)]
    return out


def _tokens(row: dict[str, Any], tok: Any) -> list[int] | None:
    ids = row.get("input_ids")
    if isinstance(ids, list):
        mask = row.get("attention_mask")
        if isinstance(mask, list) and len(mask) == len(ids):
            return [i for i, m in zip(ids, mask) if m]
        return list(ids)
    if tok is None:
        return None
    return tok(" ".join(t for t in _texts(row) if t))


@dataclass
class _Checks:
    rows: int
    hits: dict[str, list[int]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    unmasked: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def hit(self, problem: str, i: int) -> None:
        self.hits.setdefault(problem, []).append(i)


def _row_checks(
    c: _Checks, i: int, row: dict[str, Any], tok: Any, max_length: int | None, seen: dict[str, int]
) -> None:
    texts = _texts(row)
    ids = _tokens(row, tok)
    if (texts and not any(t.strip() for t in texts)) or (ids is not None and not ids) or (not texts and ids is None):
        c.hit("empty", i)
    if ids is not None:
        c.lengths.append(len(ids))
        if max_length is not None and len(ids) > max_length:
            c.hit("too_long", i)
    labels = row.get("labels")
    if isinstance(labels, list) and labels:
        n = sum(1 for v in labels if v != IGNORE)
        c.unmasked.append(n)
        if n == 0:
            c.hit("all_labels_masked", i)
    elif tok is not None and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        p = len(tok(row["prompt"]))
        c.unmasked.append(max(0, min(len(ids or []), max_length or 1 << 62) - p))
        if max_length is not None and p >= max_length:
            c.hit("completion_truncated", i)
    key = json.dumps(ids if ids is not None and "input_ids" in row else texts, sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    if digest in seen and (texts or ids):
        c.hit("duplicate", i)
    else:
        seen.setdefault(digest, i)


def check_rows(rows: list[dict[str, Any]], *, tokenizer: Any = None, max_length: int | None = None) -> _Checks:
    """Run every check over ``rows`` (``tokenizer``: a callable text -> token ids, or None)."""
    c = _Checks(rows=len(rows))
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        _row_checks(c, i, row, tokenizer, max_length, seen)
    if not c.lengths:
        c.notes.append("the rows hold no input_ids and no --tokenizer was given: token lengths are not checked")
    elif max_length is None:
        c.notes.append("no --max-length: rows are not checked for truncation")
    return c


_WHY = {
    "empty": (
        Severity.ERROR,
        "rows with no text or no token",
        "blank samples, a filter or template that emptied them; a batch of them has nothing to attend to",
        "drop empty rows before tokenizing",
    ),
    "all_labels_masked": (
        Severity.ERROR,
        "rows whose labels are all -100",
        "the collator masked every token (a prompt longer than the cut, a wrong response template): the row teaches nothing, and a batch of them makes the loss 0/0 = NaN",
        "check the masking (response template) and max_length; drop rows with no label",
    ),
    "completion_truncated": (
        Severity.ERROR,
        "rows whose prompt alone reaches max_length: the completion is cut away",
        "prompts longer than the context: the completion (the part trained on) is truncated entirely",
        "raise max_length, shorten or drop these prompts, or truncate the prompt from the left",
    ),
    "too_long": (
        Severity.WARNING,
        "rows longer than max_length tokens (their end is truncated)",
        "long samples: the end of the row (often the answer) is cut",
        "raise max_length or drop/split the long rows",
    ),
    "duplicate": (
        Severity.WARNING,
        "rows identical to an earlier row",
        "duplicated samples: they are memorized (epoch-boundary drops, overfitting)",
        "deduplicate the dataset",
    ),
}


def _dist(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def q(p: float) -> float:
        return float(v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))])

    return {
        "min": float(v[0]),
        "p5": q(0.05),
        "median": q(0.5),
        "p95": q(0.95),
        "max": float(v[-1]),
        "mean": round(sum(v) / len(v), 2),
    }


def _findings(c: _Checks) -> list[Finding]:
    out = []
    for problem, rows in c.hits.items():
        sev, what, cause, fix = _WHY[problem]
        share = len(rows) / max(c.rows, 1)
        out.append(
            Finding(
                signature="data_issue",
                severity=sev,
                summary=f"{what}: {len(rows)} of {c.rows} ({share:.1%})",
                evidence={
                    "problem": problem,
                    "count": len(rows),
                    "rows": c.rows,
                    "share": round(share, 4),
                    "examples": rows[:EXAMPLES],
                },
                cause=cause,
                fix=fix,
                detector="data",
            )
        )
    lengths, unmasked = _dist(c.lengths), _dist(c.unmasked)
    ev = {"rows": c.rows, "tokens_per_row": lengths, "unmasked_tokens_per_row": unmasked}
    out.append(
        Finding(
            signature="data_summary",
            severity=Severity.INFO,
            evidence=ev,
            detector="data",
            summary=f"{c.rows} rows"
            + (f", median {lengths['median']:.0f} tokens" if lengths else "")
            + (f", median {unmasked['median']:.0f} trained-on tokens a row" if unmasked else ""),
        )
    )
    return out


def _load_tokenizer(path: str | os.PathLike[str] | None) -> Any:
    if path is None:
        return None
    p = Path(path)
    if (p / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(str(p / "tokenizer.json"))
            return lambda text: t.encode(text, add_special_tokens=False).ids
        except ImportError:
            pass
        except Exception as exc:
            raise UnreadableError(f"{p / 'tokenizer.json'}: {first_line(exc)}") from None
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise InputError(f"--tokenizer {p}: no tokenizer could be loaded from it ({first_line(exc, 160)})") from None
    return lambda text: hf(text, add_special_tokens=False)["input_ids"]


def data_report(
    path: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None, max_length: int | None = None
) -> Report:
    """``autopsy data``: one RunReport per split, with ``data_issue`` findings and a ``data_summary``."""
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise InputError(f"--tokenizer {tokenizer}: not a directory")
    if max_length is not None and max_length <= 0:
        raise InputError(f"--max-length {max_length}: a positive number of tokens")
    splits = read_dataset(path)
    tok = _load_tokenizer(tokenizer)
    runs = []
    for name, rows in splits.items():
        c = check_rows(rows, tokenizer=tok, max_length=max_length)
        config = {"rows": c.rows, "tokenizer": str(tokenizer) if tokenizer else None, "max_length": max_length}
        run = RunReport(run=name, path=str(path), sources=["data"], config=config, findings=_findings(c))
        run.skipped.extend({"detector": "data", "reason": n} for n in c.notes)
        runs.append(run)
    return Report(runs=runs, version=__version__)
