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
from pathlib import Path
from typing import Any

from autopsy.errors import InputError
from autopsy.findings import Finding, Severity

__all__ = ["load_state_file", "step_replay"]

_BATCH_RE = re.compile(r"^batches-step-(\d+)\.safetensors$")
_CK_RE = re.compile(r"^checkpoint-(\d+)$")


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
    except Exception as exc:  # noqa: BLE001 - a damaged file: a note, not a crash
        return None, f"{path.name} is not a readable torch file ({type(exc).__name__}): the replay runs without the {what}"
    allow = _numpy_allowlist()
    refused = sorted(n for n in names if n not in allow)
    if refused:
        return None, (f"{path.name} was not loaded: it references {', '.join(refused[:4])}, not on the allowlist "
                      f"(only weights_only loading is done): the replay runs without the {what}")
    try:
        with safe_globals(list(allow.values())):  # the dtype classes are found only while unpickling
            return torch.load(str(path), weights_only=True, map_location="cpu"), None
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return None, f"{path.name} could not be loaded safely ({msg}): the replay runs without the {what}"


def _recorded(run_dir: Path, batch: Path | None) -> tuple[dict[int, list[dict[str, Any]]], dict[int, dict[str, Any]], dict[str, str]]:
    """Every recorded step of the run (later dumps win), the per-step RNG states and the newest metadata."""
    from autopsy.replay.batch import load_batches

    if batch is not None:
        files = [batch]
    else:
        found = []
        for p in (run_dir / "autopsy").glob("batches-step-*.safetensors"):
            m = _BATCH_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        files = [p for _, p in sorted(found)]
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
    f = run_dir / "autopsy" / "losses.jsonl"
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
    raise InputError(f"step replay supports torch's AdamW, Adam, SGD, Adagrad and RMSprop; this run used optim={optim_name!r}")


def _build_optimizer(model: Any, cfg: dict[str, Any], saved: dict[str, Any] | None, notes: list[str]) -> Any:
    """The optimizer as HF's Trainer built it (decay / no-decay groups), with ``optimizer.pt``'s state when it fits."""
    cls = _optimizer_class(cfg.get("optim"), saved)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = _decay_names(model)
    wd = float(cfg.get("weight_decay") or 0.0)
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": wd},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    lr = float(cfg.get("learning_rate") or 1e-3)
    kwargs: dict[str, Any] = {"lr": lr}
    if cls.__name__.startswith("Adam"):
        kwargs.update(betas=(float(cfg.get("adam_beta1", 0.9)), float(cfg.get("adam_beta2", 0.999))), eps=float(cfg.get("adam_epsilon", 1e-8)))
    if saved is not None:
        sizes = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
        if sizes != [len(g["params"]) for g in groups]:
            if sizes == [len(named)]:
                groups = [{"params": [p for _, p in named], "weight_decay": wd}]
            else:
                notes.append(f"optimizer.pt holds parameter groups of sizes {sizes}, the model's trainable parameters group as "
                             f"{[len(g['params']) for g in groups]}: the replay runs with a fresh {cls.__name__} (its first steps will differ)")
                saved = None
    opt = cls(groups, **kwargs)
    if saved is not None:
        params = [p for g in groups for p in g["params"]]
        mismatch = [i for i, st in saved.get("state", {}).items()
                    if isinstance(i, int) and i < len(params) and any(
                        hasattr(v, "shape") and v.dim() > 0 and tuple(v.shape) != tuple(params[i].shape) for v in st.values())]
        if mismatch:
            notes.append(f"optimizer.pt does not match the model's parameters (shapes differ at {len(mismatch)} entries): "
                         f"the replay runs with a fresh {cls.__name__}")
            return opt
        opt._autopsy_saved = saved  # loaded after the scheduler is built, as Trainer does
    return opt


def _build_scheduler(opt: Any, cfg: dict[str, Any], max_steps: int | None, step: int, saved: dict[str, Any] | None,
                     notes: list[str]) -> Any:
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
        notes.append(f"the run's max_steps is unknown: the {name} schedule cannot be rebuilt; the learning rate is held constant")
        return None
    try:
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=extra or None)
    except Exception as exc:  # noqa: BLE001 - an exotic schedule: the LR is held, and the report says so
        notes.append(f"the LR schedule {name!r} could not be rebuilt ({type(exc).__name__}): the learning rate is held constant")
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
    flags = torch.stack([torch.sum(p.detach(), dtype=torch.float32) for _, p in named]).isfinite().cpu().tolist()  # one sync
    bad = [n for (n, _), ok in zip(named, flags) if not ok]
    return [n for n in bad if not bool(torch.isfinite(dict(named)[n]).all())]  # a finite sum can overflow; recheck the few


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


def step_replay(run_dir: str | Path, checkpoint: str | Path, *, batch: str | Path | None = None, base: Any = None,
                device: Any = None, until: int | None = None) -> tuple[list[Finding], dict[str, Any], list[str]]:
    """Re-run the recorded steps after ``checkpoint`` until one goes non-finite. Returns (findings, config, notes)."""
    import torch

    from autopsy.detectors._common import evidence_value
    from autopsy.importers.training_args import read_training_args
    from autopsy.replay.checkpoint import load_model, scan_weights
    from autopsy.replay.device import pick_device
    from autopsy.replay.localize import localize

    run = Path(run_dir)
    ck = Path(checkpoint)
    m = _CK_RE.match(ck.name)
    ts_file = ck / "trainer_state.json"
    tstate: dict[str, Any] = {}
    if ts_file.is_file():
        try:
            tstate = json.loads(ts_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            tstate = {}
    start = int(tstate.get("global_step") or (m.group(1) if m else 0))
    notes: list[str] = []
    steps, step_rng, meta = _recorded(run, Path(batch) if batch else None)
    if not steps:
        raise InputError(f"{run}: no recorded batches (train with autopsy.callbacks.AutopsyCallback, or pass --batch FILE)")
    original = _original_trajectory(run)
    orig_bad = _first_bad(original)
    if orig_bad is None and meta.get("first_bad_step", "").isdigit():
        orig_bad = int(meta["first_bad_step"])
    last = until or orig_bad or max(steps)
    want = list(range(start + 1, last + 1))
    if not want:
        raise InputError(f"{ck.name} is at step {start}, at or after the failing step {last}: replay from an earlier checkpoint")
    missing = [s for s in want if s not in steps]
    if missing and missing[0] == start + 1:
        have = f"{min(steps)}..{max(steps)}"
        raise InputError(f"the batches of steps {missing[0]}..{missing[-1]} after {ck.name} were not recorded (recorded: {have}); "
                         f"replay from a later checkpoint, or train with AutopsyCallback(keep_last >= save_steps)")
    if missing:
        notes.append(f"the batches of steps {missing[0]}..{missing[-1]} were not recorded: the replay stops at step {missing[0] - 1}")
        want = [s for s in want if s < missing[0]]

    cfg, cfg_note = read_training_args(ck / "training_args.bin") if (ck / "training_args.bin").is_file() else ({}, "training_args.bin is missing")
    if cfg_note:
        notes.append(f"{cfg_note}: HF's defaults are assumed (max_grad_norm 1.0, AdamW, linear schedule)")
    max_grad_norm = cfg.get("max_grad_norm", 1.0) if cfg else 1.0
    clip = max_grad_norm is not None and float(max_grad_norm) > 0
    dev = pick_device(device)
    scan = scan_weights(ck)
    model = load_model(ck, base=base, device=dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    opt_state, note = load_state_file(ck / "optimizer.pt", what="optimizer state (a fresh optimizer: its first steps will differ)")
    if note:
        notes.append(note)
    sched_state, note = load_state_file(ck / "scheduler.pt", what=f"scheduler state (a fresh scheduler advanced to step {start})")
    if note:
        notes.append(note)
    rng_state, note = load_state_file(ck / "rng_state.pth", what="checkpoint's RNG state")
    if note:
        notes.append(note)
    opt = _build_optimizer(model, cfg, opt_state, notes)
    sched = _build_scheduler(opt, cfg, tstate.get("max_steps"), start, sched_state, notes)
    saved = getattr(opt, "_autopsy_saved", None)
    if saved is not None:
        opt.load_state_dict(saved)
        del opt._autopsy_saved
    if sched is not None and sched_state is not None:
        try:
            sched.load_state_dict(sched_state)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"scheduler.pt does not fit the rebuilt {type(sched).__name__} ({type(exc).__name__}): its state is ignored")
    if isinstance(rng_state, dict):
        _set_rng(rng_state)

    traj: list[dict[str, Any]] = []
    bad_step: int | None = None
    poisoned: tuple[int, list[str]] | None = None
    for s in want:
        if s in step_rng:
            _set_rng(step_rng[s])
        lr = float(opt.param_groups[0]["lr"])
        micro = steps[s]
        losses = []
        with torch.enable_grad():
            for mb in micro:
                inputs = {k: v.to(dev) for k, v in mb.items()}
                out = model(**inputs)
                loss = out.loss if hasattr(out, "loss") else out[0]
                # HF: a loss normalized by num_items_in_batch is already scaled for gradient accumulation
                scaled = loss if "num_items_in_batch" in inputs or len(micro) == 1 else loss / len(micro)
                scaled.backward()
                losses.append(loss.detach().float())
        gnorm = torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm) if clip else math.inf)
        loss_v, gn_v = torch.stack([torch.stack(losses).mean(), gnorm.detach().float().to(losses[0].device)]).cpu().tolist()
        rec = {"step": s, "loss": evidence_value(loss_v), "grad_norm": evidence_value(gn_v), "learning_rate": evidence_value(lr)}
        if s in original:
            rec["original_loss"] = evidence_value(original[s].get("loss", math.nan))
        traj.append(rec)
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
            bad_step = s
            break
        opt.step()
        if sched is not None:
            sched.step()
        model.zero_grad(set_to_none=True)
        if poisoned is None:
            bad = _nonfinite_params(model)
            if bad:
                poisoned = (s, bad)

    ran = [r["step"] for r in traj]
    replay_ev: dict[str, Any] = {
        "replayed_from": ck.name, "replayed_steps": [ran[0], ran[-1]] if ran else [], "first_nonfinite_step": bad_step,
        "original_first_bad_step": orig_bad, "reproduced": bad_step is not None and (orig_bad is None or bad_step == orig_bad),
        "max_grad_norm": max_grad_norm if clip else None, "trajectory": traj,
    }
    diffs = [abs(r["loss"] - r["original_loss"]) / max(abs(r["original_loss"]), 1e-12) for r in traj
             if isinstance(r.get("original_loss"), float) and isinstance(r["loss"], float)]
    if diffs:
        replay_ev["max_rel_loss_diff_vs_original"] = evidence_value(max(diffs))
    if poisoned is not None:
        replay_ev["weights_nonfinite_after_update"] = {"step": poisoned[0], "tensors": poisoned[1]}
    config = {"checkpoint": str(ck), "mode": "step replay", "from_step": start, "device": str(dev),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "optimizer": type(opt).__name__,
              "scheduler": type(sched).__name__ if sched is not None else None, "max_grad_norm": max_grad_norm if clip else None,
              "state_loaded": {"optimizer": opt_state is not None and saved is not None, "scheduler": sched_state is not None,
                               "rng": rng_state is not None}}
    findings: list[Finding] = []
    from autopsy.replay import weights_finding

    wf = weights_finding(scan, step=start)
    if wf is not None:
        findings.append(wf)
    if bad_step is None:
        last_rec = traj[-1] if traj else {"loss": math.nan, "grad_norm": math.nan}
        ev = {"loss": last_rec["loss"], "grad_norm": last_rec["grad_norm"], **replay_ev}
        before = run / "autopsy" / f"weights-before-step-{orig_bad}"
        cause = ("the optimizer's own arithmetic on the recorded batches stays finite: the fault came from outside it "
                 "(weights written by other code, a hardware or non-deterministic kernel fault), or the wrong checkpoint/batches")
        if orig_bad is not None and before.is_dir() and ran and ran[-1] >= orig_bad - 1:
            written = _compare_weights(model, before)
            ev["original_nonfinite_weights_not_reproduced"] = written
            if written:
                cause = (f"the original run's weights before step {orig_bad} hold NaN/Inf in {', '.join(written[:4])}, which the "
                         "replayed updates do not produce: they were written outside the optimizer step (a callback, a hook, "
                         "a hardware fault)")
        findings.append(Finding(
            signature="replay_not_reproduced", severity=Severity.INFO, step=ran[-1] if ran else start,
            summary=(f"steps {ran[0]}..{ran[-1]} replayed from {ck.name} stay finite" if ran else "nothing replayed")
            + (f" (the original run went non-finite at step {orig_bad})" if orig_bad is not None else ""),
            evidence=ev, cause=cause,
            fix="check code that touches the weights between steps and the hardware; replay again to rule out non-determinism",
            detector="replay.step"))
        return findings, config, notes

    # localize inside the failing step, on the weights it saw (the update of that step has not run)
    loc: list[Finding] = []
    for mb in steps[bad_step]:
        _set_rng(step_rng.get(bad_step))
        loc = localize(model, {k: v.to(dev) for k, v in mb.items()}, step=bad_step)
        if loc and loc[0].signature == "nonfinite_origin":
            break
    for f in loc:
        f.evidence.update(replay_ev)
        f.detector = "replay.step"
        if poisoned is not None and f.signature == "nonfinite_origin":
            f.cause = (f"the update of step {poisoned[0]} wrote NaN/Inf into {', '.join(poisoned[1][:4])}; " + f.cause)
    findings.extend(loc)
    return findings, config, notes
