"""Step replay: restart from a Trainer checkpoint and re-run the recorded steps until one goes non-finite.

``autopsy replay RUN_DIR --from checkpoint-N`` loads the weights of ``checkpoint-N`` with its optimizer
(``optimizer.pt``), scheduler (``scheduler.pt``) and RNG state (``rng_state.pth``), reads the run's config from
``training_args.bin`` (through the safe stubs of :mod:`autopsy.importers.training_args`) and re-runs the batches
that :class:`autopsy.callbacks.AutopsyCallback` recorded for steps N+1, N+2, ... the way HF's Trainer does:
forward and backward of each micro-batch, ``clip_grad_norm_`` with the run's ``max_grad_norm`` (the pre-clip norm
is the one reported, as HF logs it), ``optimizer.step()``, ``scheduler.step()``. The first step whose loss or
gradient norm is non-finite is localized with :func:`autopsy.replay.localize.localize` on the weights it saw.

Pickled state is read only with ``torch.load(weights_only=True)``, with an explicit allowlist of the numpy names
an RNG file holds; a file that needs anything else is not loaded, and the replay goes on without that state
(saying so in the report's notes). One host sync per replayed step (loss and grad norm together) and one after
each update (are all weights still finite).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.checkpoints import checkpoint_step, scan_weights, weights_finding
from autopsy.errors import InputError, first_line
from autopsy.findings import Finding, Severity, evidence_value
from autopsy.recording import LOSSES, record_dir, recorded_batches, weights_dir

__all__ = ["load_state_file", "step_replay"]


def _numpy_allowlist() -> dict[str, Any]:
    """The only globals an RNG file may name: numpy arrays and dtypes (for ``np.random.get_state()``)."""
    import numpy as np

    allow: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    import warnings

    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy 2 deprecates the numpy.core alias
                m = __import__(mod, fromlist=["_reconstruct"])
            allow[f"{mod}._reconstruct"] = m._reconstruct
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)
    for name in ("UInt32DType", "Int64DType", "Float64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allow[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return allow


def load_state_file(path: Path, *, what: str) -> tuple[Any, str | None]:
    """``torch.load(path, weights_only=True)`` with the numpy allowlist: (object, None) or (None, note)."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    if not path.is_file():
        return None, f"{path.name} is missing: the replay runs without the {what}"
    try:
        names = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        return (
            None,
            f"{path.name} is not a readable torch file ({type(exc).__name__}): the replay runs without the {what}",
        )
    allow = _numpy_allowlist()
    refused = sorted(n for n in names if n not in allow)
    if refused:
        return None, (
            f"{path.name} was not loaded: it references {', '.join(refused[:4])}, not on the allowlist "
            f"(only weights_only loading is done): the replay runs without the {what}"
        )
    try:
        with safe_globals(list(allow.values())):  # the dtype classes are found only while unpickling
            return torch.load(str(path), weights_only=True, map_location="cpu"), None
    except Exception as exc:
        return (
            None,
            f"{path.name} could not be loaded safely ({first_line(exc, 160)}): the replay runs without the {what}",
        )


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


def _decay_names(model: Any) -> set[str]:
    """The parameters HF's Trainer puts in its weight-decay group (``Trainer.get_decay_parameter_names``)."""
    import torch

    forbidden = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if not any(f.search(full.lower()) for f in forbidden):
                out.add(full)
    return out


_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


def _optimizer_class(optim_name: str | None, saved: dict[str, Any] | None) -> Any:
    import torch

    name = str(optim_name or "").lower()
    if name.startswith("adamw_torch") or name in ("adamw_hf", "adamw"):
        return torch.optim.AdamW
    for key, cls in _OPTIMIZERS.items():
        if name == key or name.startswith(key + "_"):
            if key == "adam" and name.startswith("adamw"):
                continue
            return getattr(torch.optim, cls)
    if not name and saved is not None:  # no config: guess from the saved hyperparameters
        g = (saved.get("param_groups") or [{}])[0]
        if "betas" in g:
            return torch.optim.AdamW if g.get("decoupled_weight_decay", True) else torch.optim.Adam
        if "momentum" in g and "dampening" in g:
            return torch.optim.SGD
    if not name:
        return torch.optim.AdamW  # HF Trainer's default
    raise InputError(
        f"step replay supports torch's AdamW, Adam, SGD, Adagrad and RMSprop; this run used optim={optim_name!r}"
    )


def _build_optimizer(
    model: Any, cfg: dict[str, Any], saved: dict[str, Any] | None, notes: list[str]
) -> tuple[Any, dict[str, Any] | None]:
    """The optimizer as HF's Trainer built it (decay / no-decay groups), and ``optimizer.pt``'s state when it fits
    (None otherwise): Trainer loads that state after the scheduler is built, and so does the caller."""
    cls = _optimizer_class(cfg.get("optim"), saved)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = _decay_names(model)
    wd = float(cfg.get("weight_decay") or 0.0)
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if n in decay], "weight_decay": wd},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    lr = float(cfg.get("learning_rate") or 1e-3)
    kwargs: dict[str, Any] = {"lr": lr}
    if cls.__name__.startswith("Adam"):
        kwargs.update(
            betas=(float(cfg.get("adam_beta1", 0.9)), float(cfg.get("adam_beta2", 0.999))),
            eps=float(cfg.get("adam_epsilon", 1e-8)),
        )
    if saved is not None:
        sizes = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
        if sizes != [len(g["params"]) for g in groups]:
            if sizes == [len(named)]:
                groups = [{"params": [p for _, p in named], "weight_decay": wd}]
            else:
                notes.append(
                    f"optimizer.pt holds parameter groups of sizes {sizes}, the model's trainable parameters group as "
                    f"{[len(g['params']) for g in groups]}: the replay runs with a fresh {cls.__name__} (its first steps will differ)"
                )
                saved = None
    opt = cls(groups, **kwargs)
    if saved is not None:
        params = [p for g in groups for p in g["params"]]
        mismatch = [
            i
            for i, st in saved.get("state", {}).items()
            if isinstance(i, int)
            and i < len(params)
            and any(
                hasattr(v, "shape") and v.dim() > 0 and tuple(v.shape) != tuple(params[i].shape) for v in st.values()
            )
        ]
        if mismatch:
            notes.append(
                f"optimizer.pt does not match the model's parameters (shapes differ at {len(mismatch)} entries): "
                f"the replay runs with a fresh {cls.__name__}"
            )
            return opt, None
    return opt, saved


def _build_scheduler(
    opt: Any, cfg: dict[str, Any], max_steps: int | None, step: int, saved: dict[str, Any] | None, notes: list[str]
) -> Any:
    """The LR scheduler of the run (``transformers.get_scheduler``), then ``scheduler.pt``'s state or advanced to ``step``."""
    from transformers import get_scheduler

    name = cfg.get("lr_scheduler_type") or "linear"
    total = int(max_steps or cfg.get("max_steps") or 0)
    warm = cfg.get("warmup_steps") or 0
    ratio = cfg.get("warmup_ratio") or 0
    warmup = math.ceil(float(warm) * total) if 0 < float(warm) < 1 else int(warm)
    if not warmup and ratio:
        warmup = math.ceil(float(ratio) * total)
    extra = cfg.get("lr_scheduler_kwargs") if isinstance(cfg.get("lr_scheduler_kwargs"), dict) else {}
    if total <= 0 and name not in ("constant", "constant_with_warmup"):
        notes.append(
            f"the run's max_steps is unknown: the {name} schedule cannot be rebuilt; the learning rate is held constant"
        )
        return None
    try:
        sched = get_scheduler(
            name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=extra or None
        )
    except Exception as exc:
        notes.append(
            f"the LR schedule {name!r} could not be rebuilt ({type(exc).__name__}): the learning rate is held constant"
        )
        return None
    if saved is None:
        for _ in range(step):
            sched.step()
    return sched


def _set_rng(state: dict[str, Any] | None) -> bool:
    import torch

    if not state:
        return False
    cpu = state.get("torch_cpu", state.get("cpu"))
    if torch.is_tensor(cpu):
        torch.set_rng_state(cpu.to("cpu", torch.uint8))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            t = state.get(f"torch_cuda{i}")
            if t is None and i == 0:
                t = state.get("cuda")
            if torch.is_tensor(t):
                torch.cuda.set_rng_state(t.to("cpu", torch.uint8), i)
    return True


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


def _compare_weights(model: Any, weights_dir: Path) -> list[str]:
    """Tensors of the original run's pre-failure weights that are non-finite where the replayed ones are finite."""
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters())
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


def _restore(ck: Path, plan: _Plan, *, base: Any, device: Any) -> _Training:
    from autopsy.importers.training_args import read_training_args
    from autopsy.replay.checkpoint import load_model
    from autopsy.replay.device import pick_device

    cfg, cfg_note = (
        read_training_args(ck / "training_args.bin")
        if (ck / "training_args.bin").is_file()
        else ({}, "training_args.bin is missing")
    )
    if cfg_note:
        plan.notes.append(f"{cfg_note}: HF's defaults are assumed (max_grad_norm 1.0, AdamW, linear schedule)")
    max_grad_norm = cfg.get("max_grad_norm", 1.0) if cfg else 1.0
    dev = pick_device(device)
    model = load_model(ck, base=base, device=dev)
    model.train()
    opt_state, note1 = load_state_file(
        ck / "optimizer.pt", what="optimizer state (a fresh optimizer: its first steps will differ)"
    )
    sched_state, note2 = load_state_file(
        ck / "scheduler.pt", what=f"scheduler state (a fresh scheduler advanced to step {plan.start})"
    )
    rng_state, note3 = load_state_file(ck / "rng_state.pth", what="checkpoint's RNG state")
    plan.notes.extend(n for n in (note1, note2, note3) if n)
    opt, fits = _build_optimizer(model, cfg, opt_state, plan.notes)
    sched = _build_scheduler(opt, cfg, plan.max_steps, plan.start, sched_state, plan.notes)
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
        _set_rng(rng_state)
    clip = max_grad_norm is not None and float(max_grad_norm) > 0
    return _Training(
        model,
        opt,
        sched,
        dev,
        float(max_grad_norm) if clip else None,
        {"optimizer": fits is not None, "scheduler": sched_state is not None, "rng": rng_state is not None},
    )


def _one_step(t: _Training, micro: list[dict[str, Any]]) -> tuple[float, float]:
    """Forward and backward of each micro-batch, then the pre-clip norm as HF computes it: (mean loss, grad norm)."""
    import torch

    params = [p for p in t.model.parameters() if p.requires_grad]
    losses = []
    with torch.enable_grad():
        for mb in micro:
            inputs = {k: v.to(t.device) for k, v in mb.items()}
            out = t.model(**inputs)
            loss = out.loss if hasattr(out, "loss") else out[0]
            # HF: a loss normalized by num_items_in_batch is already scaled for gradient accumulation
            scaled = loss if "num_items_in_batch" in inputs or len(micro) == 1 else loss / len(micro)
            scaled.backward()
            losses.append(loss.detach().float())
    gnorm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm is not None else math.inf)
    loss_v, gn_v = torch.stack([torch.stack(losses).mean(), gnorm.detach().float().to(losses[0].device)]).cpu().tolist()
    return float(loss_v), float(gn_v)


def _run_steps(t: _Training, plan: _Plan) -> tuple[list[dict[str, Any]], int | None, tuple[int, list[str]] | None]:
    """Re-run the planned steps until one goes non-finite: (trajectory, the bad step, the first update that wrote
    NaN/Inf into the weights)."""
    traj: list[dict[str, Any]] = []
    poisoned: tuple[int, list[str]] | None = None
    for s in plan.want:
        if s in plan.step_rng:
            _set_rng(plan.step_rng[s])
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
    from autopsy.replay.localize import localize

    loc: list[Finding] = []
    for mb in plan.steps[bad_step]:
        _set_rng(plan.step_rng.get(bad_step))
        loc = localize(t.model, {k: v.to(t.device) for k, v in mb.items()}, step=bad_step)
        if loc and loc[0].signature == "nonfinite_origin":
            break
    for f in loc:
        f.evidence.update(ev)
        f.detector = "replay.step"
        if poisoned is not None and f.signature == "nonfinite_origin":
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
) -> tuple[list[Finding], dict[str, Any], list[str]]:
    """Re-run the recorded steps after ``checkpoint`` until one goes non-finite. Returns (findings, config, notes)."""
    run, ck = Path(run_dir), Path(checkpoint)
    plan = _plan(run, ck, Path(batch) if batch else None, until)
    scan = scan_weights(ck)
    t = _restore(ck, plan, base=base, device=device)
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
