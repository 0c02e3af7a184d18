"""Step replay: restart from a Trainer checkpoint and re-run the recorded steps until one goes non-finite.

``autopsy replay RUN_DIR --from checkpoint-N`` loads the weights of ``checkpoint-N`` with its optimizer
(``optimizer.pt``), scheduler (``scheduler.pt``) and RNG state (``rng_state.pth``), reads the run's config from
``training_args.bin`` (through the safe stubs of :mod:`autopsy.importers.training_args`) and re-runs the batches
that :class:`autopsy.callbacks.AutopsyCallback` recorded for steps N+1, N+2, ... the way HF's Trainer does:
forward and backward of each micro-batch, ``clip_grad_norm_`` with the run's ``max_grad_norm`` (the pre-clip norm
is the one reported, as HF logs it), ``optimizer.step()``, ``scheduler.step()``. The first step whose loss or
gradient norm is non-finite is localized with :func:`autopsy.replay.localize.localize` on the weights it saw.

The steps run in the run's precision (:mod:`autopsy.replay.precision`: the autocast of ``fp16``/``bf16`` runs; the
fp16 loss scaler is not replayed). The training state is read by :mod:`autopsy.replay.state` (``weights_only``, an
allowlist, and size caps checked before anything is inflated). One host sync per replayed step (loss and grad norm
together) and one after each update (are all weights still finite).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.checkpoints import checkpoint_step, scan_weights, weights_finding
from autopsy.errors import InputError
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.recording import LOSSES, record_dir, recorded_batches, weights_dir
from autopsy.replay.state import (
    SMALL_STATE_CAP,
    build_optimizer,
    build_scheduler,
    load_state_file,
    optimizer_cap,
    set_rng,
)

__all__ = ["step_loss", "step_replay"]

LOCALIZED = ("nonfinite_origin", "grad_norm_overflow")


def _recorded(
    run_dir: Path, batch: Path | None
) -> tuple[dict[int, list[dict[str, Any]]], dict[int, dict[str, Any]], dict[str, str]]:
    """Every recorded step of the run (later dumps win), the per-step RNG states and the newest metadata."""
    from autopsy.replay.batch import load_batches

    files = [batch] if batch is not None else list(recorded_batches(run_dir).values())
    steps: dict[int, list[dict[str, Any]]] = {}
    rng: dict[int, dict[str, Any]] = {}
    meta: dict[str, str] = {}
    for f in files:
        bf = load_batches(f)
        steps.update({s: mbs for s, mbs in bf.batches.items() if s is not None})
        rng.update(bf.step_rng)
        if bf.rng and bf.metadata.get("rng_step", "").isdigit():
            rng.setdefault(int(bf.metadata["rng_step"]), bf.rng)
        if bf.first_bad_step is not None or not meta:
            meta = bf.metadata
    return dict(sorted(steps.items())), rng, meta


def _original_trajectory(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The true per-step loss and grad norm of the original run (``autopsy/losses.jsonl``)."""
    out: dict[int, dict[str, Any]] = {}
    f = record_dir(run_dir) / LOSSES
    if not f.is_file():
        return out
    for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            out[int(rec["step"])] = {k: float(rec[k]) for k in ("loss", "grad_norm") if k in rec}
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _first_bad(traj: dict[int, dict[str, Any]]) -> int | None:
    return next((s for s, r in sorted(traj.items()) if any(not math.isfinite(v) for v in r.values())), None)


def _nonfinite_params(model: Any) -> list[str]:
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return []
    flags = (
        torch.stack([torch.sum(p.detach(), dtype=torch.float32) for _, p in named]).isfinite().cpu().tolist()
    )  # one sync
    bad = [n for (n, _), ok in zip(named, flags) if not ok]
    return [
        n for n in bad if not bool(torch.isfinite(dict(named)[n]).all())
    ]  # a finite sum can overflow; recheck the few


def _saved_names(model: Any) -> dict[str, Any]:
    """The model's parameters by the names ``save_pretrained`` writes (a PEFT adapter's without ``.<adapter>``)."""
    params = dict(model.named_parameters())
    adapters = list(getattr(model, "peft_config", {}) or {})
    out = dict(params)
    for name, p in params.items():
        for a in adapters:
            out.setdefault(name.replace(f".{a}.", "."), p)
    return out


def _compare_weights(model: Any, weights_dir: Path) -> list[str]:
    """Tensors of the original run's pre-failure weights that are non-finite where the replayed ones are finite."""
    import torch
    from safetensors import safe_open

    params = _saved_names(model)
    out = []
    for f in sorted(weights_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                p = params.get(key)
                if p is None:
                    continue
                t = fh.get_tensor(key)
                if not bool(torch.isfinite(t).all()) and bool(torch.isfinite(p.detach()).all()):
                    out.append(key)
    return sorted(out)


@dataclass
class _Plan:
    """What a step replay will re-run: the recorded steps after the checkpoint, and the original run's record."""

    start: int
    want: list[int]
    steps: dict[int, list[dict[str, Any]]]
    step_rng: dict[int, dict[str, Any]]
    original: dict[int, dict[str, Any]]
    orig_bad: int | None
    max_steps: int | None
    notes: list[str] = field(default_factory=list)


def _plan(run: Path, ck: Path, batch: Path | None, until: int | None) -> _Plan:
    tstate: dict[str, Any] = {}
    if (ck / "trainer_state.json").is_file():
        try:
            tstate = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            tstate = {}
    start = int(tstate.get("global_step") or checkpoint_step(ck.name) or 0)
    steps, step_rng, meta = _recorded(run, batch)
    if not steps:
        raise InputError(
            f"{run}: no recorded batches (train with autopsy.callbacks.AutopsyCallback, or pass --batch FILE)"
        )
    original = _original_trajectory(run)
    orig_bad = _first_bad(original)
    if orig_bad is None and meta.get("first_bad_step", "").isdigit():
        orig_bad = int(meta["first_bad_step"])
    want = list(range(start + 1, (until or orig_bad or max(steps)) + 1))
    if not want:
        raise InputError(
            f"{ck.name} is at step {start}, at or after the failing step {until or orig_bad or max(steps)}: "
            "replay from an earlier checkpoint"
        )
    plan = _Plan(start, want, steps, step_rng, original, orig_bad, tstate.get("max_steps"))
    missing = [s for s in want if s not in steps]
    if missing and missing[0] == start + 1:
        raise InputError(
            f"the batches of steps {missing[0]}..{missing[-1]} after {ck.name} were not recorded (recorded: "
            f"{min(steps)}..{max(steps)}); replay from a later checkpoint, or train with "
            "AutopsyCallback(keep_last >= save_steps)"
        )
    if missing:
        plan.notes.append(
            f"the batches of steps {missing[0]}..{missing[-1]} were not recorded: the replay stops at step {missing[0] - 1}"
        )
        plan.want = [s for s in want if s < missing[0]]
    return plan


@dataclass
class _Training:
    """The model, optimizer and scheduler restored from the checkpoint, as HF's Trainer had them."""

    model: Any
    opt: Any
    sched: Any
    device: Any
    max_grad_norm: float | None  # None: clipping off
    state_loaded: dict[str, bool]
    precision: Any = None


def _restore(ck: Path, run: Path, plan: _Plan, *, base: Any, device: Any, dtype: str | None) -> _Training:
    from autopsy.importers.training_args import read_training_args
    from autopsy.replay.checkpoint import load_model
    from autopsy.replay.precision import run_precision

    cfg, cfg_note = (
        read_training_args(ck / "training_args.bin")
        if (ck / "training_args.bin").is_file()
        else ({}, "training_args.bin is missing")
    )
    if cfg_note:
        plan.notes.append(f"{cfg_note}: HF's defaults are assumed (max_grad_norm 1.0, AdamW, linear schedule)")
    max_grad_norm = cfg.get("max_grad_norm", 1.0) if cfg else 1.0
    model_dir = _model_dir(ck, base)
    prec = run_precision(model_dir, run_dir=run, checkpoint=ck, dtype=dtype)
    model = load_model(ck, base=base, device=device, precision=prec, notes=plan.notes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt_state, note1 = load_state_file(
        ck / "optimizer.pt",
        what="optimizer state (a fresh optimizer: its first steps will differ)",
        cap=optimizer_cap(trainable),
    )
    sched_state, note2 = load_state_file(
        ck / "scheduler.pt",
        what=f"scheduler state (a fresh scheduler advanced to step {plan.start})",
        cap=SMALL_STATE_CAP,
    )
    rng_state, note3 = load_state_file(ck / "rng_state.pth", what="checkpoint's RNG state", cap=SMALL_STATE_CAP)
    plan.notes.extend(n for n in (note1, note2, note3) if n)
    if prec.autocast == "float16":
        plan.notes.append(
            "the run used fp16 mixed precision: the steps replay under fp16 autocast without its loss scaler"
        )
    opt, fits = build_optimizer(model, cfg, opt_state, plan.notes)
    sched = build_scheduler(opt, cfg, plan.max_steps, plan.start, sched_state, plan.notes)
    if fits is not None:
        opt.load_state_dict(fits)
    if sched is not None and sched_state is not None:
        try:
            sched.load_state_dict(sched_state)
        except Exception as exc:
            plan.notes.append(
                f"scheduler.pt does not fit the rebuilt {type(sched).__name__} ({type(exc).__name__}): its state is ignored"
            )
    if isinstance(rng_state, dict):
        set_rng(rng_state)
    clip = max_grad_norm is not None and float(max_grad_norm) > 0
    return _Training(
        model,
        opt,
        sched,
        next(model.parameters()).device,
        float(max_grad_norm) if clip else None,
        {"optimizer": fits is not None, "scheduler": sched_state is not None, "rng": rng_state is not None},
        prec,
    )


def _model_dir(ck: Path, base: Any) -> Path:
    from autopsy.checkpoints import is_adapter
    from autopsy.replay.checkpoint import base_model_dir

    return base_model_dir(ck, base) if is_adapter(ck) else ck


def step_loss(losses: list[Any], micro: list[dict[str, Any]]) -> Any:
    """A step's loss as HF's Trainer logs it from its micro-batches' losses: their sum when each was normalized by
    the step's ``num_items_in_batch`` (already a share of the step's mean), else their mean."""
    import torch

    stacked = torch.stack([v.reshape(()).to(losses[0].device) for v in losses])
    return stacked.sum() if any("num_items_in_batch" in mb for mb in micro) else stacked.mean()


def _one_step(t: _Training, micro: list[dict[str, Any]]) -> tuple[float, float]:
    """Forward and backward of each micro-batch, then the pre-clip norm as HF computes it: (step loss, grad norm)."""
    import torch

    from autopsy.replay.trace import precision

    params = [p for p in t.model.parameters() if p.requires_grad]
    autocast = t.precision.torch_dtype(t.precision.autocast) if t.precision is not None else None
    losses = []
    with torch.enable_grad():
        for mb in micro:
            inputs = {k: v.to(t.device) for k, v in mb.items()}
            with precision(t.device, autocast):
                out = t.model(**inputs)
            loss = out.loss if hasattr(out, "loss") else out[0]
            # HF: a loss normalized by num_items_in_batch is already scaled for gradient accumulation
            scaled = loss if "num_items_in_batch" in inputs or len(micro) == 1 else loss / len(micro)
            scaled.backward()
            losses.append(loss.detach().float())
    gnorm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm is not None else math.inf)
    total = step_loss(losses, micro)
    loss_v, gn_v = torch.stack([total, gnorm.detach().float().to(total.device)]).cpu().tolist()
    return float(loss_v), float(gn_v)


def _run_steps(t: _Training, plan: _Plan) -> tuple[list[dict[str, Any]], int | None, tuple[int, list[str]] | None]:
    """Re-run the planned steps until one goes non-finite: (trajectory, the bad step, the first update that wrote
    NaN/Inf into the weights)."""
    traj: list[dict[str, Any]] = []
    poisoned: tuple[int, list[str]] | None = None
    for s in plan.want:
        if s in plan.step_rng:
            set_rng(plan.step_rng[s])
        lr = float(t.opt.param_groups[0]["lr"])
        loss_v, gn_v = _one_step(t, plan.steps[s])
        rec = {
            "step": s,
            "loss": evidence_value(loss_v),
            "grad_norm": evidence_value(gn_v),
            "learning_rate": evidence_value(lr),
        }
        if s in plan.original:
            rec["original_loss"] = evidence_value(plan.original[s].get("loss", math.nan))
        traj.append(rec)
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
            return traj, s, poisoned
        t.opt.step()
        if t.sched is not None:
            t.sched.step()
        t.model.zero_grad(set_to_none=True)
        if poisoned is None:
            bad = _nonfinite_params(t.model)
            if bad:
                poisoned = (s, bad)
    return traj, None, poisoned


def _not_reproduced(
    run: Path, ck: Path, t: _Training, plan: _Plan, traj: list[dict[str, Any]], ev: dict[str, Any]
) -> Finding:
    ran = [r["step"] for r in traj]
    last_rec = traj[-1] if traj else {"loss": math.nan, "grad_norm": math.nan}
    ev = {"loss": last_rec["loss"], "grad_norm": last_rec["grad_norm"], **ev}
    before = weights_dir(run, plan.orig_bad) if plan.orig_bad is not None else None
    cause = (
        "the optimizer's own arithmetic on the recorded batches stays finite: the fault came from outside it "
        "(weights written by other code, a hardware or non-deterministic kernel fault), or the wrong checkpoint/batches"
    )
    if before is not None and before.is_dir() and ran and ran[-1] >= plan.orig_bad - 1:  # type: ignore[operator]
        written = _compare_weights(t.model, before)
        ev["original_nonfinite_weights_not_reproduced"] = written
        if written:
            cause = (
                f"the original run's weights before step {plan.orig_bad} hold NaN/Inf in {', '.join(written[:4])}, which "
                "the replayed updates do not produce: they were written outside the optimizer step (a callback, a "
                "hook, a hardware fault)"
            )
    return Finding(
        signature="replay_not_reproduced",
        severity=Severity.INFO,
        step=ran[-1] if ran else plan.start,
        summary=(f"steps {ran[0]}..{ran[-1]} replayed from {ck.name} stay finite" if ran else "nothing replayed")
        + (f" (the original run went non-finite at step {plan.orig_bad})" if plan.orig_bad is not None else ""),
        evidence=ev,
        cause=cause,
        fix="check code that touches the weights between steps and the hardware; replay again to rule out non-determinism",
        detector="replay.step",
    )


def _localize_step(
    t: _Training, plan: _Plan, bad_step: int, ev: dict[str, Any], poisoned: tuple[int, list[str]] | None
) -> list[Finding]:
    """Localize inside the failing step, on the weights it saw (the update of that step has not run)."""
    from autopsy.replay.diagnose import diagnose

    autocast = t.precision.torch_dtype(t.precision.autocast) if t.precision is not None else None
    loc = diagnose(t.model, plan.steps[bad_step], step=bad_step, autocast=autocast, rng=plan.step_rng.get(bad_step))
    for f in loc:
        f.evidence.update(ev)
        f.detector = "replay.step"
        if poisoned is not None and f.signature in LOCALIZED:
            f.cause = f"the update of step {poisoned[0]} wrote NaN/Inf into {', '.join(poisoned[1][:4])}; " + f.cause
    return loc


def step_replay(
    run_dir: str | Path,
    checkpoint: str | Path,
    *,
    batch: str | Path | None = None,
    base: Any = None,
    device: Any = None,
    until: int | None = None,
    dtype: str | None = None,
) -> tuple[list[Finding], dict[str, Any], list[str]]:
    """Re-run the recorded steps after ``checkpoint`` until one goes non-finite. Returns (findings, config, notes)."""
    run, ck = Path(run_dir), Path(checkpoint)
    plan = _plan(run, ck, Path(batch) if batch else None, until)
    scan = scan_weights(ck)
    t = _restore(ck, run, plan, base=base, device=device, dtype=dtype)
    traj, bad_step, poisoned = _run_steps(t, plan)
    ran = [r["step"] for r in traj]
    ev: dict[str, Any] = {
        "replayed_from": ck.name,
        "replayed_steps": [ran[0], ran[-1]] if ran else [],
        "first_nonfinite_step": bad_step,
        "original_first_bad_step": plan.orig_bad,
        "reproduced": bad_step is not None and (plan.orig_bad is None or bad_step == plan.orig_bad),
        "max_grad_norm": t.max_grad_norm,
        "trajectory": traj,
    }
    diffs = [
        abs(r["loss"] - r["original_loss"]) / max(abs(r["original_loss"]), 1e-12)
        for r in traj
        if isinstance(r.get("original_loss"), float) and isinstance(r["loss"], float)
    ]
    if diffs:
        ev["max_rel_loss_diff_vs_original"] = evidence_value(max(diffs))
    if poisoned is not None:
        ev["weights_nonfinite_after_update"] = {"step": poisoned[0], "tensors": poisoned[1]}
    config = {
        "checkpoint": str(ck),
        "mode": "step replay",
        "from_step": plan.start,
        "device": str(t.device),
        "dtype": str(next(t.model.parameters()).dtype).replace("torch.", ""),
        "optimizer": type(t.opt).__name__,
        "scheduler": type(t.sched).__name__ if t.sched is not None else None,
        "max_grad_norm": t.max_grad_norm,
        "state_loaded": t.state_loaded,
        "precision": t.precision.describe() if t.precision is not None else None,
    }
    findings: list[Finding] = []
    wf = weights_finding(scan.path, scan.nonfinite, tensors=scan.tensors, step=plan.start)
    if wf is not None:
        findings.append(wf)
    if bad_step is None:
        findings.append(_not_reproduced(run, ck, t, plan, traj, ev))
    else:
        findings.extend(_localize_step(t, plan, bad_step, ev, poisoned))
    return findings, config, plan.notes
