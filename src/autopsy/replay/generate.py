"""Checkpoint health: load a checkpoint, generate greedily from a few prompts, and flag degenerate output.

The monitoring practice of sampling from a checkpoint, made a check: ``autopsy replay CHECKPOINT --generate
[--prompts FILE]`` decodes greedily (deterministic: the same checkpoint gives the same text) from each prompt, with the
tokenizer saved with the run (the checkpoint's, the run's, or the base model's), and flags

* ``empty``: no new token before the end-of-sequence token, or only whitespace;
* ``repeated_token``: every new token the same;
* ``loop``: the output ends in one n-gram repeated (at least 3 times, over at least half the output);
* ``nonfinite_logits``: a NaN/Inf in the logits of any generated position.

as a ``degenerate_output`` finding with the samples as evidence; a clean result is a ``generation_ok`` note with them.
Without a tokenizer the prompts are token ids (a few fixed ones per vocabulary) and the samples show ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autopsy._version import __version__
from autopsy.checkpoints import find_checkpoints, is_adapter
from autopsy.errors import InputError
from autopsy.findings import Finding, Report, RunReport, Severity

__all__ = ["BUILTIN_PROMPTS", "degenerate", "generate_report"]

BUILTIN_PROMPTS = (
    "The capital of France is",
    "Once upon a time,",
    "def fibonacci(n):",
    "Question: What is 2 + 2?\nAnswer:",
    "The three primary colors are",
)
MAX_PROMPTS = 20


def degenerate(
    tokens: list[int], *, text: str | None = None, min_repeats: int = 3
) -> tuple[str, dict[str, Any]] | None:
    """Why a generation is degenerate (``empty``, ``repeated_token``, ``loop``) and the numbers behind it, or None."""
    if not tokens or (text is not None and not text.strip()):
        return "empty", {"new_tokens": len(tokens)}
    n = len(tokens)
    if n >= min_repeats + 1 and len(set(tokens)) == 1:
        return "repeated_token", {"token": tokens[0], "new_tokens": n}
    for period in range(1, n // min_repeats + 1):
        covered = period
        while covered < n and tokens[n - 1 - covered] == tokens[n - 1 - covered + period]:
            covered += 1
        repeats = covered // period
        if repeats >= min_repeats and covered * 2 >= n:
            return "loop", {"period": period, "repeats": repeats, "looping_tokens": covered, "new_tokens": n}
    return None


def _tokenizer(dirs: list[Path]) -> Any:
    """The tokenizer saved with the run (None when there is none)."""
    for d in dirs:
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            try:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            except Exception:
                continue
    return None


def _prompts(prompts: str | os.PathLike[str] | None) -> list[str]:
    if prompts is None:
        return list(BUILTIN_PROMPTS)
    try:
        lines = Path(prompts).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(f"--prompts {prompts}: {exc.strerror or exc}") from None
    out = [ln.replace("\\n", "\n") for ln in lines if ln.strip()][:MAX_PROMPTS]
    if not out:
        raise InputError(f"--prompts {prompts}: holds no prompt (one a line)")
    return out


def _checkpoint(p: Path) -> tuple[Path, list[str]]:
    if (p / "config.json").is_file() or is_adapter(p):
        return p, []
    cks = find_checkpoints(p)
    if not cks:
        raise InputError(f"{p}: not a checkpoint (config.json, adapter_config.json) and holds no checkpoint-N")
    last = cks[max(cks)]
    return last, [f"{p.name} is a run dir: its last checkpoint {last.name} is checked"]


def _sample(model: Any, tok: Any, prompt: Any, max_new_tokens: int, autocast: Any) -> dict[str, Any]:
    import torch

    from autopsy.replay.trace import precision

    dev = next(model.parameters()).device
    if tok is not None:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(dev)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    else:
        ids = torch.tensor([prompt], device=dev)
        pad = None
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    with torch.no_grad(), precision(dev, autocast):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad if pad is not None else eos,
        )
    new = out.sequences[0, ids.shape[1] :].tolist()
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    if tok is not None and tok.eos_token_id is not None:
        stops.add(tok.eos_token_id)
    while new and new[-1] in stops:
        new.pop()
    logits = torch.stack([t.float() for t in out.logits]) if out.logits else None
    finite = bool(torch.isfinite(logits).all()) if logits is not None else True
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
    sample: dict[str, Any] = {
        "prompt": prompt if tok is not None else list(prompt),
        "output": text if text is not None else new,
    }
    why = ("nonfinite_logits", {"new_tokens": len(new)}) if not finite else degenerate(new, text=text)
    if why is not None:
        sample["problem"], detail = why
        sample.update(detail)
    return sample


def _finding(samples: list[dict[str, Any]]) -> Finding:
    bad = [s for s in samples if "problem" in s]
    if not bad:
        return Finding(
            signature="generation_ok",
            severity=Severity.INFO,
            summary=f"{len(samples)} greedy generations look sound (none empty, looping or from NaN logits)",
            evidence={"samples": samples, "prompts": len(samples)},
            detector="replay.generate",
        )
    kinds: dict[str, int] = {}
    for s in bad:
        kinds[s["problem"]] = kinds.get(s["problem"], 0) + 1
    nan = "nonfinite_logits" in kinds
    severity = Severity.CRITICAL if nan else Severity.ERROR if len(bad) * 2 >= len(samples) else Severity.WARNING
    main = max(kinds, key=kinds.__getitem__)
    return Finding(
        signature="degenerate_output",
        severity=severity,
        summary=f"{len(bad)} of {len(samples)} greedy generations are degenerate ({', '.join(f'{k}: {v}' for k, v in kinds.items())})",
        evidence={
            "problem": main,
            "problems": kinds,
            "degenerate": len(bad),
            "prompts": len(samples),
            "samples": bad + [s for s in samples if "problem" not in s],
        },
        cause=(
            "the logits hold NaN/Inf: the weights are poisoned (see weights_nonfinite) or an activation overflows"
            if nan
            else "the model collapsed onto a few tokens: a learning rate too high, training on repeated or templated "
            "data, a loss that went to 0 (masked labels), or an adapter merged wrong"
        ),
        fix=(
            "restart from an earlier checkpoint whose generations are sound (run --generate on each), then replay the "
            "failing step; check the data for duplicates and the labels' masking (autopsy data)"
        ),
        detector="replay.generate",
    )


def generate_report(
    path: str | os.PathLike[str],
    *,
    base: Any = None,
    device: str | None = None,
    dtype: str | None = None,
    prompts: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 32,
) -> Report:
    """``replay CHECKPOINT --generate``: greedy samples and a ``degenerate_output`` or ``generation_ok`` finding."""
    from autopsy.checkpoints import scan_weights, weights_finding
    from autopsy.replay.checkpoint import base_model_dir, load_model, model_config, quant_bits
    from autopsy.replay.memory import plan_placement
    from autopsy.replay.precision import run_precision
    from autopsy.replay.resolve import run_dir_of

    p = Path(path)
    ck, notes = _checkpoint(p)
    model_dir = base_model_dir(ck, base) if is_adapter(ck) else ck
    run = run_dir_of(ck)
    prec = run_precision(model_dir, run_dir=run, checkpoint=ck, dtype=dtype)
    cfg = model_config(ck, base=base)
    placement = plan_placement(
        model_dir,
        cfg,
        requested=device,
        batch_shape=(1, 64),
        weights_dtype=prec.weights,
        quant_bits=quant_bits(prec.quantization) if is_adapter(ck) else None,
        adapter_dir=ck if is_adapter(ck) else None,
    )
    model = load_model(ck, base=base, precision=prec, placement=placement, notes=notes)
    model.eval()
    tok = _tokenizer([d for d in (ck, run, model_dir) if d is not None])
    texts = _prompts(prompts)
    vocab = int((cfg.get("text_config") or cfg).get("vocab_size") or 2)
    items: list[Any] = (
        texts if tok is not None else [[(7 * k + 3 * j) % vocab for j in range(4)] for k in range(len(texts))]
    )
    if tok is None:
        notes.append("no tokenizer was saved with the run: the prompts are token ids and the samples show ids")
    samples = [_sample(model, tok, item, max_new_tokens, prec.torch_dtype(prec.autocast)) for item in items]
    findings = [_finding(samples)]
    scan = scan_weights(ck)
    wf = weights_finding(scan.path, scan.nonfinite, tensors=scan.tensors)
    if wf is not None:
        findings.append(wf)
    config = {
        "checkpoint": str(ck),
        "mode": "generate",
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "tokenizer": tok is not None,
        "precision": prec.describe(),
        "placement": placement.describe(),
    }
    report = RunReport(run=p.name or str(p), path=str(p), sources=["replay"], config=config, findings=findings)
    for note in notes:
        report.skipped.append({"detector": "replay.generate", "reason": note})
    return Report(runs=[report], version=__version__)
