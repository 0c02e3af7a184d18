"""One step's diagnosis on a loaded model: each micro-batch localized in turn, then the accumulated step, then the
order of the findings (a batch that explains the failure leads it).

Gradient accumulation sums the micro-batches' gradients before the norm is taken: a step can overflow only as a
whole, so when no micro-batch goes non-finite alone, the step is re-run the way HF's Trainer runs it (each
micro-batch's loss scaled for accumulation, unless the model normalized it by ``num_items_in_batch``) and its
accumulated gradients are checked.
"""

from __future__ import annotations

import math
from typing import Any

from autopsy.findings import Finding, Severity, evidence_value

__all__ = ["LOCALIZED", "diagnose", "diagnose_model", "explain"]

LOCALIZED = ("nonfinite_origin", "grad_norm_overflow")
_EXPLAINS = ("all_labels_masked", "nonfinite_input", "empty_rows")


def _inputs_device(model: Any) -> Any:
    dev = getattr(model, "device", None)
    if dev is None:
        dev = next(model.parameters()).device
    return dev


def _accumulated(model: Any, micro: list[dict[str, Any]], *, step: Any, autocast: Any, reset: Any) -> list[Finding]:
    """The whole step with its gradients accumulated over the micro-batches (None-like empty list: finite)."""
    import torch

    from autopsy.replay.grads import norm_overflow, param_owners
    from autopsy.replay.localize import overflow_finding
    from autopsy.replay.trace import Trace, grad_norm, precision

    dev = _inputs_device(model)
    model.zero_grad(set_to_none=True)
    losses = []
    reset()
    with torch.enable_grad():
        for mb in micro:
            inputs = {k: v.to(dev) for k, v in mb.items()}
            with precision(dev, autocast):
                out = model(**inputs)
            loss = out.loss if hasattr(out, "loss") else out[0]
            (loss if "num_items_in_batch" in inputs else loss / len(micro)).backward()
            losses.append(loss.detach().float())
    gnorm = float(grad_norm(list(model.parameters()), dev))
    total = float(torch.stack(losses).sum() if "num_items_in_batch" in micro[0] else torch.stack(losses).mean())
    try:
        if math.isfinite(gnorm):
            return []
        ov = norm_overflow(model)
        if ov is not None:
            f = overflow_finding(
                model, {k: v.to(dev) for k, v in micro[0].items()}, Trace(total, gnorm), ov, step, autocast
            )
            f.evidence["accumulated_micro_batches"] = len(micro)
            return [f]
        bad = next(
            n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        )
        owner = param_owners(model)[id(dict(model.named_parameters())[bad])][0][0]
    finally:
        model.zero_grad(set_to_none=True)
    return [
        Finding(
            signature="nonfinite_origin",
            severity=Severity.CRITICAL,
            step=step,
            summary=f"each micro-batch alone is finite; the gradient of {bad} summed over {len(micro)} micro-batches is not",
            evidence={
                "module": owner,
                "phase": "backward",
                "param": bad,
                "accumulated_micro_batches": len(micro),
                "loss": evidence_value(total),
                "grad_norm": evidence_value(gnorm),
            },
            cause="gradient accumulation overflows the gradients' dtype: the sum of finite micro-batch gradients is not finite",
            fix="keep gradients in float32 (mixed precision rather than half weights), lower the LR or the loss scale",
            detector="replay.localize",
        )
    ]


def diagnose(
    model: Any,
    micro: list[dict[str, Any]],
    *,
    step: int | None,
    autocast: Any = None,
    rng: dict | None = None,
    seed: int = 0,
) -> list[Finding]:
    """Localize the step's micro-batches in order until one goes non-finite; then the accumulated step."""
    import torch

    from autopsy.replay.localize import localize
    from autopsy.replay.state import set_rng

    def reset() -> None:
        if not set_rng(rng):
            torch.manual_seed(seed)

    dev = _inputs_device(model)
    loc: list[Finding] = []
    for mb in micro:
        loc = localize(model, {k: v.to(dev) for k, v in mb.items()}, step=step, autocast=autocast, reset=reset)
        if loc and loc[0].signature in LOCALIZED:
            return loc
    if len(micro) > 1:
        acc = _accumulated(model, micro, step=step, autocast=autocast, reset=reset)
        if acc:
            return acc
    return loc


def _in_loss(origin: Finding) -> bool:
    """The origin is the loss: the model's own code, outside every block (``LlamaForCausalLM``, ``T5For...``)."""
    ev = origin.evidence
    return (
        ev.get("phase") == "forward"
        and ev.get("layer") is None
        and (ev.get("module") == "" or "For" in str(ev.get("module_type", "")))
    )


def explain(findings: list[Finding]) -> None:
    """A broken batch that explains the non-finite loss leads the report: every label masked (the mean loss is
    0/0), NaN inputs, or every row empty, with the origin in the loss or its inputs rather than in a weight."""
    origin = next((f for f in findings if f.signature == "nonfinite_origin"), None)
    for f in findings:
        if f.signature != "bad_batch" or f.evidence.get("problem") not in _EXPLAINS:
            continue
        if f.evidence["problem"] == "empty_rows" and len(f.evidence.get("rows", [])) < f.evidence.get("batch_rows", 0):
            continue
        if origin is None or origin.evidence.get("nonfinite_params"):
            continue  # no failure to explain, or a poisoned weight explains it
        if f.evidence["problem"] == "all_labels_masked" and not _in_loss(origin):
            continue  # the forward broke before the loss: the masked labels are not why
        f.severity = Severity.CRITICAL
        f.evidence["explains"] = f"the non-finite {origin.evidence.get('phase', 'forward')} pass (nonfinite_origin)"
        origin.evidence["explained_by"] = "bad_batch"
        origin.cause = f"the batch explains it ({f.evidence['problem']}, see bad_batch): " + origin.cause


def diagnose_model(
    model: Any, micro: list[dict[str, Any]], *, step: int | None = None, autocast: Any = None, seed: int = 0
) -> list[Finding]:
    """A model already in memory (a notebook's, a test's) on a step's micro-batches: the batch checks against its
    config, localization, and the findings in report order (what ``replay`` does after loading a checkpoint)."""
    from autopsy.findings import finding_order
    from autopsy.replay.batch import inspect_batch

    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) or cfg
    vocab = getattr(text, "vocab_size", None)
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    findings: list[Finding] = []
    for mb in micro:
        findings.extend(inspect_batch(mb, vocab_size=vocab, max_positions=max_pos, step=step))
    if not any(
        f.evidence.get("problem") in ("token_id_out_of_range", "label_out_of_range", "sequence_too_long")
        for f in findings
    ):
        findings.extend(diagnose(model, micro, step=step, autocast=autocast, seed=seed))
    explain(findings)
    return sorted(findings, key=finding_order)
