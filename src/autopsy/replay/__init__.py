"""Replay: reload a checkpoint and a batch, and localize where the first NaN/Inf is born.

A side door of the pipeline (torch only, imported lazily): it takes a checkpoint and a batch and returns
findings of the same kind as :func:`autopsy.analyze`, so the same renderers print them. ``replay(path)`` accepts
a checkpoint directory (full model or PEFT adapter) with ``batch=``, or a training output directory written
with :class:`autopsy.callbacks.AutopsyCallback`, where it finds the recorded batch and the checkpoint itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autopsy._version import __version__
from autopsy.checkpoints import find_checkpoints, is_adapter, scan_weights, weights_finding
from autopsy.errors import InputError
from autopsy.findings import Finding, Report, RunReport
from autopsy.recording import recorded_batches, weights_before

__all__ = ["replay", "resolve"]


def resolve(
    path: str | os.PathLike[str], *, batch: str | os.PathLike[str] | None = None, from_checkpoint: str | None = None
) -> dict[str, Any]:
    """Find the checkpoint, batch file and step to replay from ``path`` (a checkpoint or a run's output dir)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    out: dict[str, Any] = {
        "checkpoint": None,
        "batch": Path(batch) if batch else None,
        "step": None,
        "notes": [],
        "restart_from": None,
    }
    is_model = (p / "config.json").is_file() or is_adapter(p)
    recorded = recorded_batches(p) if p.is_dir() else {}
    if out["batch"] is None and recorded:
        out["batch"] = next(iter(recorded.values()))  # the first recording: the first failure
    if out["batch"] is None:
        if is_model and p.parent.is_dir() and recorded_batches(p.parent):
            out["batch"] = next(iter(recorded_batches(p.parent).values()))
        else:
            raise InputError(
                f"{p}: no batch to replay: pass --batch FILE (or train with autopsy.callbacks.AutopsyCallback)"
            )
    if out["batch"] is not None and not Path(out["batch"]).is_file():
        raise InputError(f"no such batch file: {out['batch']}")
    bad_step = None
    try:
        from autopsy.replay.batch import load_batches

        bad_step = load_batches(out["batch"]).first_bad_step
    except Exception:
        pass
    out["step"] = bad_step
    if from_checkpoint:
        ck = p / from_checkpoint if (p / from_checkpoint).exists() else Path(from_checkpoint)
        if not ck.is_dir():
            raise InputError(f"no such checkpoint: {from_checkpoint}")
        out["checkpoint"] = ck
        return out
    if is_model:
        out["checkpoint"] = p
        return out
    # a run's output dir: the weights saved just before the failing step, else the last finite checkpoint before it
    cks = find_checkpoints(p)
    if bad_step is not None:
        cks = {s: c for s, c in cks.items() if s < bad_step}
    finite_ck = None
    for s in sorted(cks, reverse=True):
        if scan_weights(cks[s]).finite:
            finite_ck = (s, cks[s])
            break
    if finite_ck:
        out["restart_from"] = str(finite_ck[1])
    before = list(weights_before(p).items())
    before = [(s, c) for s, c in before if bad_step is None or s == bad_step] or before
    if before:
        out["checkpoint"] = before[0][1]
    elif finite_ck:
        out["checkpoint"] = finite_ck[1]
        if bad_step is not None and finite_ck[0] < bad_step - 1:
            out["notes"].append(
                f"{finite_ck[1].name} is {bad_step - 1 - finite_ck[0]} steps before the failing step {bad_step}: "
                "the batch is replayed on older weights"
            )
    else:
        raise InputError(f"{p}: no checkpoint with finite weights before step {bad_step}; pass a checkpoint directory")
    return out


def _step_report(
    path: str | os.PathLike[str], from_checkpoint: str, *, batch: Any, base: Any, device: Any, until: int | None
) -> Report:
    """``--from checkpoint-N``: step replay (see :mod:`autopsy.replay.step`)."""
    from autopsy.replay.step import step_replay

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"no such run directory: {p}")
    ck = p / from_checkpoint if (p / from_checkpoint).is_dir() else Path(from_checkpoint)
    if not ck.is_dir():
        raise InputError(f"no such checkpoint: {from_checkpoint}")
    findings, config, notes = step_replay(p, ck, batch=batch, base=base, device=device, until=until)
    report = RunReport(run=p.name or str(p), path=str(p), sources=["replay"], config=config, findings=findings)
    for note in notes:
        report.skipped.append({"detector": "replay", "reason": note})
    return Report(runs=[report], version=__version__)


def replay(
    path: str | os.PathLike[str],
    *,
    batch: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    device: Any = None,
    from_checkpoint: str | None = None,
    step: int | None = None,
) -> Report:
    """Replay a checkpoint on a batch: weight scan, batch inspection, then localization. Returns a Report.

    With ``from_checkpoint`` (``checkpoint-N`` of the run dir ``path``), a step replay: the recorded steps after
    it are re-run with the checkpoint's optimizer, scheduler and RNG state until one goes non-finite (``step``
    caps the last step replayed).
    """
    from autopsy._optional import require

    require("torch", purpose="replay a checkpoint")
    from autopsy.replay.batch import inspect_batch, load_batches
    from autopsy.replay.checkpoint import load_model, model_config
    from autopsy.replay.device import pick_device
    from autopsy.replay.localize import localize

    if from_checkpoint:
        return _step_report(path, from_checkpoint, batch=batch, base=base, device=device, until=step)
    where = resolve(path, batch=batch, from_checkpoint=from_checkpoint)
    ck: Path = where["checkpoint"]
    bf = load_batches(where["batch"])
    use_step, micro = bf.pick(step)
    dev = pick_device(device)
    findings: list[Finding] = []
    scan = scan_weights(ck)
    wf = weights_finding(scan.path, scan.nonfinite, tensors=scan.tensors, step=use_step)
    if wf is not None:
        findings.append(wf)
    cfg = model_config(ck, base=base)
    text_cfg = cfg.get("text_config") or cfg
    vocab = text_cfg.get("vocab_size")
    max_pos = text_cfg.get("max_position_embeddings")
    fatal = False
    for mb in micro:
        got = inspect_batch(mb, vocab_size=vocab, max_positions=max_pos, step=use_step)
        findings.extend(got)
        fatal |= any(
            f.evidence["problem"] in ("token_id_out_of_range", "label_out_of_range", "sequence_too_long") for f in got
        )
    config: dict[str, Any] = {
        "checkpoint": str(ck),
        "batch": str(where["batch"]),
        "step": use_step,
        "device": str(dev),
        "adapter": is_adapter(ck),
        "micro_batches": len(micro),
    }
    if where["restart_from"]:
        config["restart_from"] = where["restart_from"]
    if fatal:
        config["localization"] = "skipped: the batch cannot run on this model (see bad_batch)"
    else:
        model = load_model(ck, base=base, device=dev)
        config["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        import torch

        loc: list[Finding] = []
        for mb in micro:
            inputs = {k: v.to(dev) for k, v in mb.items()}
            torch.manual_seed(int(bf.metadata.get("seed", 0) or 0))
            loc = localize(model, inputs, step=use_step)
            if loc and loc[0].signature == "nonfinite_origin":
                break
        findings.extend(loc)
        for f in loc:
            if where["restart_from"]:
                f.evidence["restart_from"] = where["restart_from"]
    report = RunReport(
        run=Path(path).name or str(path), path=str(path), sources=["replay"], config=config, findings=findings
    )
    for note in where["notes"]:
        report.skipped.append({"detector": "replay", "reason": note})
    return Report(runs=[report], version=__version__)
