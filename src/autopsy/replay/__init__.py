"""Replay: reload a checkpoint and a batch, and localize where the first NaN/Inf is born.

A side door of the pipeline (torch only, imported lazily): it takes a checkpoint and a batch and returns findings of
the same kind as :func:`autopsy.analyze`, so the same renderers print them. ``replay(path)`` accepts a checkpoint
directory (full model or PEFT adapter) with ``batch=``, or a training output directory written with
:class:`autopsy.callbacks.AutopsyCallback`, where it finds the failing step, its batch and the weights from before it
(:mod:`autopsy.replay.resolve`). It replays in the run's precision (:mod:`autopsy.replay.precision`), where the model
fits (:mod:`autopsy.replay.memory`). ``from_checkpoint`` re-runs the recorded steps after a checkpoint
(:mod:`autopsy.replay.step`); ``generate`` checks a checkpoint's greedy output (:mod:`autopsy.replay.generate`).

Every argument is checked before torch is imported: a wrong path or flag costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autopsy._version import __version__
from autopsy.checkpoints import is_adapter, scan_weights, weights_finding
from autopsy.errors import InputError, UsageError
from autopsy.findings import Finding, Report, RunReport
from autopsy.replay.resolve import Target, resolve

__all__ = ["check_arguments", "replay", "resolve"]

_FATAL = ("token_id_out_of_range", "label_out_of_range", "sequence_too_long")


def check_arguments(
    path: str | os.PathLike[str],
    *,
    batch: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    device: str | None = None,
    from_checkpoint: str | None = None,
    step: int | None = None,
    dtype: str | None = None,
    generate: bool = False,
    prompts: str | os.PathLike[str] | None = None,
) -> None:
    """Every argument checked without torch: one-line errors for a wrong path or flag."""
    from autopsy.replay.device import check_device
    from autopsy.replay.precision import _check

    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    for flag, f in (("--batch", batch), ("--prompts", prompts)):
        if f is not None and not Path(f).is_file():
            raise InputError(f"{flag}: no such file: {f}")
    if base is not None and not (Path(base) / "config.json").is_file():
        raise InputError(f"--base {base}: not a local model directory (no config.json)")
    if from_checkpoint is not None and not (p / from_checkpoint).is_dir() and not Path(from_checkpoint).is_dir():
        raise InputError(f"--from: no such checkpoint: {from_checkpoint}")
    if step is not None and step < 0:
        raise UsageError(f"--step {step}: a step is a non-negative number")
    if generate and (batch is not None or from_checkpoint is not None):
        raise UsageError("--generate checks a checkpoint's output: it takes --prompts, not --batch or --from")
    if prompts is not None and not generate:
        raise UsageError("--prompts is for --generate")
    check_device(device)
    _check(dtype)


def _step_report(
    path: str | os.PathLike[str], from_checkpoint: str, *, batch: Any, base: Any, device: Any, until: Any, dtype: Any
) -> Report:
    """``--from checkpoint-N``: step replay (see :mod:`autopsy.replay.step`)."""
    from autopsy.replay.step import step_replay

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"no such run directory: {p}")
    ck = p / from_checkpoint if (p / from_checkpoint).is_dir() else Path(from_checkpoint)
    findings, config, notes = step_replay(p, ck, batch=batch, base=base, device=device, until=until, dtype=dtype)
    return _report(p, findings, config, notes)


def _report(path: Path, findings: list[Finding], config: dict[str, Any], notes: list[str]) -> Report:
    report = RunReport(run=path.name or str(path), path=str(path), sources=["replay"], config=config, findings=findings)
    for note in notes:
        report.skipped.append({"detector": "replay", "reason": note})
    return Report(runs=[report], version=__version__)


def _inspect(ck: Path, micro: list[dict[str, Any]], cfg: dict[str, Any], step: Any) -> tuple[list[Finding], bool]:
    """The weight scan and the batch checks: (findings, whether the batch cannot run on this model at all)."""
    from autopsy.replay.batch import inspect_batch

    findings: list[Finding] = []
    scan = scan_weights(ck)
    wf = weights_finding(scan.path, scan.nonfinite, tensors=scan.tensors, step=step)
    if wf is not None:
        findings.append(wf)
    text_cfg = cfg.get("text_config") or cfg
    vocab = text_cfg.get("vocab_size")
    max_pos = text_cfg.get("max_position_embeddings") or text_cfg.get("n_positions")
    fatal = False
    for mb in micro:
        got = inspect_batch(mb, vocab_size=vocab, max_positions=max_pos, step=step)
        findings.extend(got)
        fatal |= any(f.evidence["problem"] in _FATAL for f in got)
    return findings, fatal


def _batch_report(path: Path, target: Target, *, base: Any, device: Any, dtype: Any) -> Report:
    from autopsy.replay.batch import load_batches
    from autopsy.replay.checkpoint import base_model_dir, load_model, model_config, quant_bits
    from autopsy.replay.diagnose import diagnose, explain
    from autopsy.replay.memory import plan_placement
    from autopsy.replay.precision import run_precision, sdpa_context

    ck = target.checkpoint
    bf = load_batches(target.batch)
    use_step, micro = bf.pick(target.step)
    adapter = is_adapter(ck)
    model_dir = base_model_dir(ck, base) if adapter else ck
    cfg = model_config(ck, base=base)
    prec = run_precision(model_dir, run_dir=target.run_dir, checkpoint=ck, dtype=dtype)
    findings, fatal = _inspect(ck, micro, cfg, use_step)
    config: dict[str, Any] = {
        "checkpoint": str(ck),
        "batch": str(target.batch),
        "step": use_step,
        "adapter": adapter,
        "micro_batches": len(micro),
        "precision": prec.describe(),
    }
    if target.first_bad:
        config["first_nonfinite"] = target.first_bad
    if target.candidates:
        config["other_candidates"] = [
            {k: c.get(k) for k in ("file", "reason", "trigger_step", "steps")} for c in target.candidates
        ]
    if target.restart_from:
        config["restart_from"] = target.restart_from
    notes = list(target.notes)
    if fatal:
        config["localization"] = "skipped: the batch cannot run on this model (see bad_batch)"
    else:
        ids = next((v for v in micro[0].values() if getattr(v, "dim", lambda: 0)() == 2), None)
        shape = (int(ids.shape[0]), int(ids.shape[1])) if ids is not None else (1, 1)
        placement = plan_placement(
            model_dir,
            cfg,
            requested=device,
            batch_shape=shape,
            weights_dtype=prec.weights,
            quant_bits=quant_bits(prec.quantization) if adapter else None,
            adapter_dir=ck if adapter else None,
        )
        config["placement"] = placement.describe()
        with sdpa_context(prec.sdpa_backends):
            model = load_model(ck, base=base, precision=prec, placement=placement, notes=notes)
            config["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
            config["device"] = str(next(model.parameters()).device)
            seed = int(bf.metadata.get("seed", 0) or 0) if str(bf.metadata.get("seed", "0")).isdigit() else 0
            loc = diagnose(
                model,
                micro,
                step=use_step,
                autocast=prec.torch_dtype(prec.autocast),
                rng=bf.step_rng.get(use_step) if use_step is not None else None,
                seed=seed,
            )
        for f in loc:
            if target.restart_from:
                f.evidence["restart_from"] = target.restart_from
        findings.extend(loc)
    explain(findings)
    return _report(path, findings, config, notes)


def replay(
    path: str | os.PathLike[str],
    *,
    batch: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    device: Any = None,
    from_checkpoint: str | None = None,
    step: int | None = None,
    dtype: str | None = None,
    generate: bool = False,
    prompts: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 32,
) -> Report:
    """Replay a checkpoint on a batch: weight scan, batch inspection, then localization. Returns a Report.

    ``path``: a checkpoint (with ``batch``) or a run's output dir recorded with AutopsyCallback. ``step``: which
    recorded step to replay (default: the first non-finite one). ``dtype``: replay in this precision instead of the
    run's. ``device``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:N``. With ``from_checkpoint`` (``checkpoint-N``
    of the run dir ``path``), a step replay: the recorded steps after it are re-run with the checkpoint's optimizer,
    scheduler and RNG state until one goes non-finite (``step`` caps the last step replayed). With ``generate``, a
    checkpoint health check: greedy generations from ``prompts`` (a file, one prompt a line) or built-in ones.
    """
    dev = None if device is None else str(device)
    check_arguments(
        path,
        batch=batch,
        base=base,
        device=dev,
        from_checkpoint=from_checkpoint,
        step=step,
        dtype=dtype,
        generate=generate,
        prompts=prompts,
    )
    from autopsy._optional import require

    require("torch", purpose="replay a checkpoint")
    if generate:
        from autopsy.replay.generate import generate_report

        return generate_report(path, base=base, device=dev, dtype=dtype, prompts=prompts, max_new_tokens=max_new_tokens)
    if from_checkpoint:
        return _step_report(path, from_checkpoint, batch=batch, base=base, device=dev, until=step, dtype=dtype)
    return _batch_report(Path(path), resolve(path, batch=batch, step=step), base=base, device=dev, dtype=dtype)
