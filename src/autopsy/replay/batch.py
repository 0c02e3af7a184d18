"""Batch files for replay, and the checks that run on a batch before any model sees it.

A batch file is a safetensors file. The simple form holds one batch: ``input_ids``, ``attention_mask``,
``labels`` (and any other model inputs). The recorder (:class:`autopsy.callbacks.AutopsyCallback`) writes
several: keys ``step<N>.mb<i>.<name>`` (step N, micro-batch i), the RNG state at the start of the trigger
step as ``rng.<name>`` tensors and at the start of every recorded step as ``rng.step<N>.<name>``, and string metadata (``first_bad_step``, ``reason``, ``steps``, the true per-step ``losses``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.errors import InputError, UnreadableError
from autopsy.findings import Finding, Severity

__all__ = ["BatchFile", "inspect_batch", "load_batches", "save_batches"]

_KEY_RE = re.compile(r"^step(\d+)\.mb(\d+)\.(.+)$")
_RNG_RE = re.compile(r"^rng\.step(\d+)\.(.+)$")


@dataclass
class BatchFile:
    """The batches of one file: ``{step: [micro-batch dict, ...]}`` (step ``None`` for a plain batch)."""

    path: str
    batches: dict[int | None, list[dict[str, Any]]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    step_rng: dict[int, dict[str, Any]] = field(default_factory=dict)  # RNG state at the start of each recorded step

    @property
    def first_bad_step(self) -> int | None:
        v = self.metadata.get("first_bad_step")
        return int(v) if v not in (None, "", "None") else None

    def pick(self, step: int | None = None) -> tuple[int | None, list[dict[str, Any]]]:
        """The micro-batches of ``step`` (default: the first bad step, else the last recorded)."""
        if step is None:
            step = (
                self.first_bad_step
                if self.first_bad_step in self.batches
                else max((s for s in self.batches if s is not None), default=None)
            )
        if step not in self.batches:
            have = ", ".join(str(s) for s in self.batches) or "none"
            raise InputError(f"{self.path}: no batch for step {step} (steps recorded: {have})")
        return step, self.batches[step]


def load_batches(path: str | os.PathLike[str]) -> BatchFile:
    """Read a batch file (one plain batch, or the recorder's steps)."""
    from autopsy._optional import require

    require("torch", purpose="read a batch file")
    st = require("safetensors", purpose="read a batch file")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such batch file: {p}")
    try:
        with st.safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise UnreadableError(
            f"{p}: not a readable safetensors batch file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    out = BatchFile(path=str(p), metadata=meta)
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m:
            step, mb, name = int(m.group(1)), int(m.group(2)), m.group(3)
            lst = out.batches.setdefault(step, [])
            while len(lst) <= mb:
                lst.append({})
            lst[mb][name] = t
        elif (r := _RNG_RE.match(key)) is not None:
            out.step_rng.setdefault(int(r.group(1)), {})[r.group(2)] = t
        elif key.startswith("rng."):
            out.rng[key[4:]] = t
        else:
            out.batches.setdefault(None, [{}])[0][key] = t
    if not any(mb for mbs in out.batches.values() for mb in mbs):
        raise InputError(f"{p}: holds no batch tensors (expected input_ids, attention_mask, labels)")
    return out


def save_batches(
    path: str | os.PathLike[str],
    batches: dict[int, list[dict[str, Any]]],
    *,
    metadata: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    step_rng: dict[int, dict[str, Any]] | None = None,
) -> Path:
    """Write recorded batches (``{step: [micro-batch, ...]}``) and RNG states to one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    for step, mbs in batches.items():
        for i, mb in enumerate(mbs):
            for name, t in mb.items():
                t = t.detach().to("cpu").contiguous()
                if t.data_ptr() in seen:
                    t = t.clone()  # safetensors refuses two names for one storage
                seen.add(t.data_ptr())
                tensors[f"step{step}.mb{i}.{name}"] = t
    for name, t in (rng or {}).items():
        tensors[f"rng.{name}"] = t.detach().to("cpu").contiguous()
    for step, states in (step_rng or {}).items():
        for name, t in states.items():
            tensors[f"rng.step{step}.{name}"] = (
                t.detach().to("cpu").clone()
            )  # own storage: rng.<name> may be the same tensor
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    meta["steps"] = json.dumps(sorted(batches))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


def _rows(mask: Any) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten().tolist()]


def _finding(
    rows: list[int],
    n_rows: int,
    problem: str,
    summary: str,
    severity: Severity,
    cause: str,
    fix: str,
    step: int | None,
    **extra: Any,
) -> Finding:
    return Finding(
        signature="bad_batch",
        severity=severity,
        step=step,
        summary=f"{summary} ({len(rows)} of {n_rows} rows)",
        evidence={"rows": rows, "problem": problem, "batch_rows": n_rows, **extra},
        cause=cause,
        fix=fix,
        detector="replay.batch",
    )


@dataclass
class _Batch:
    """The batch's tensors as 2-D (rows, positions), and its row count."""

    ids: Any
    labels: Any
    mask: Any
    n: int
    step: int | None


def _check_ids(b: _Batch, vocab_size: int | None) -> list[Finding]:
    if b.ids is None or vocab_size is None or not b.ids.numel():
        return []
    bad = ((b.ids < 0) | (b.ids >= vocab_size)).flatten(1).any(1)
    if not bad.any():
        return []
    lo, hi = int(b.ids.min()), int(b.ids.max())
    return [
        _finding(
            _rows(bad),
            b.n,
            "token_id_out_of_range",
            f"token ids outside [0, {vocab_size}) (min {lo}, max {hi})",
            Severity.CRITICAL,
            "the tokenizer and the model disagree on the vocabulary (added tokens without resize_token_embeddings, a wrong tokenizer); on a GPU this is the 'device-side assert triggered' crash",
            "resize the embeddings to len(tokenizer) or fix the tokenizer; check the ids named here",
            b.step,
            min_id=lo,
            max_id=hi,
            vocab_size=vocab_size,
        )
    ]


def _check_labels(b: _Batch, vocab_size: int | None, ignore_index: int) -> list[Finding]:
    labels = b.labels
    if labels is None or not labels.numel():
        return []
    out = []
    valid = labels != ignore_index
    if vocab_size is not None:
        bad = (valid & ((labels < 0) | (labels >= vocab_size))).flatten(1).any(1)
        if bad.any():
            out.append(
                _finding(
                    _rows(bad),
                    b.n,
                    "label_out_of_range",
                    f"labels outside [0, {vocab_size}) and not {ignore_index}",
                    Severity.CRITICAL,
                    "labels built with the wrong tokenizer or a padding value other than -100",
                    "pad labels with -100 and use the model's tokenizer",
                    b.step,
                    vocab_size=vocab_size,
                )
            )
    # a causal LM shifts labels by one: a row needs a valid label after position 0 to contribute
    learnable = (
        valid[..., 1:].flatten(1).any(1) if labels.dim() >= 2 and labels.shape[-1] > 1 else valid.flatten(1).any(1)
    )
    masked = ~learnable
    if masked.all():
        out.append(
            _finding(
                _rows(masked),
                b.n,
                "all_labels_masked",
                f"every label is {ignore_index}: nothing to learn",
                Severity.ERROR,
                "the loss is NaN (0/0) or 0.0 for this batch: a collator or template that masks every token (prompt longer than the cut, wrong response template)",
                "check the collator's masking and the max length; drop rows with no label",
                b.step,
            )
        )
    elif masked.any():
        out.append(
            _finding(
                _rows(masked),
                b.n,
                "rows_fully_masked",
                f"rows whose labels are all {ignore_index}",
                Severity.WARNING,
                "these rows contribute nothing (prompt cut at max length, template mismatch)",
                "check the collator's masking and the max length for these rows",
                b.step,
            )
        )
    return out


def _check_length(b: _Batch, max_positions: int | None) -> list[Finding]:
    import torch

    seq = b.ids if b.ids is not None else b.labels
    if max_positions is None or seq is None or seq.dim() < 2 or seq.shape[1] <= max_positions:
        return []
    if b.mask is not None and b.mask.shape == seq.shape:
        long_rows = b.mask.to(torch.int64).sum(1) > max_positions
    else:
        long_rows = torch.ones(seq.shape[0], dtype=torch.bool)
    if not long_rows.any():
        return []
    return [
        _finding(
            _rows(long_rows),
            b.n,
            "sequence_too_long",
            f"sequences of {seq.shape[1]} tokens, longer than the model's {max_positions} positions",
            Severity.CRITICAL,
            "no truncation to the model's max_position_embeddings",
            f"truncate to max_length <= {max_positions}",
            b.step,
            seq_len=int(seq.shape[1]),
            max_positions=max_positions,
        )
    ]


def _check_values(batch: dict[str, Any], b: _Batch) -> list[Finding]:
    import torch

    out = []
    for name, t in batch.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            bad = ~torch.isfinite(t)
            if bad.any():
                per_row = bad.reshape(bad.shape[0], -1).any(1) if bad.dim() >= 1 else bad.reshape(1)
                out.append(
                    _finding(
                        _rows(per_row),
                        int(per_row.numel()),
                        "nonfinite_input",
                        f"NaN/Inf in the input {name!r}",
                        Severity.CRITICAL,
                        "broken preprocessing (a division by zero, a corrupt sample)",
                        "find these samples in the dataset and fix or drop them",
                        b.step,
                        input=name,
                        nonfinite_values=int(bad.sum()),
                    )
                )
    return out


def _check_empty(b: _Batch) -> list[Finding]:
    import torch

    if b.mask is not None and b.mask.numel() and b.mask.dim() >= 2:
        empty = ~(b.mask != 0).flatten(1).any(1)
    elif b.ids is not None and b.ids.dim() >= 2:
        empty = torch.full((b.ids.shape[0],), b.ids.shape[1] == 0)
    else:
        return []
    if not empty.any():
        return []
    return [
        _finding(
            _rows(empty),
            b.n,
            "empty_rows",
            "rows with no tokens (attention mask all zero)",
            Severity.ERROR,
            "empty samples in the dataset (blank text, a filter that emptied them)",
            "drop empty samples before batching",
            b.step,
        )
    ]


def inspect_batch(
    batch: dict[str, Any],
    *,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    step: int | None = None,
    ignore_index: int = -100,
) -> list[Finding]:
    """Check a batch before the model runs: masked labels, ids out of range, too long, NaN/Inf, empty rows.

    Each problem is one ``bad_batch`` finding naming the rows. Vectorised over the batch.
    """

    def two_d(t: Any) -> Any:
        return t.unsqueeze(0) if t is not None and t.dim() == 1 else t

    ids, labels, mask = (batch.get(k) for k in ("input_ids", "labels", "attention_mask"))
    ref = next((t for t in (ids, labels, mask) if t is not None and t.dim() >= 1), None)
    b = _Batch(two_d(ids), two_d(labels), two_d(mask), int(ref.shape[0]) if ref is not None else 0, step)
    return (
        _check_ids(b, vocab_size)
        + _check_labels(b, vocab_size, ignore_index)
        + _check_length(b, max_positions)
        + _check_values(batch, b)
        + _check_empty(b)
    )
