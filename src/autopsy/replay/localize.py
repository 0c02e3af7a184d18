"""Where inside the model the first NaN/Inf is born: the passes that are needed, and the finding they support.

1. :func:`autopsy.replay.trace.trace` (leaf modules and blocks hooked, float32 sums on the device, one host sync
   for the forward): the origin is the first module, in execution order, whose output is non-finite while its inputs
   were finite (phase ``forward``). The backward runs only when the forward was finite.
2. When the first non-finite output is not a leaf with finite inputs (a NaN born in a container's own code), a
   forward-only pass with every module hooked narrows it.
3. When the forward is finite and the gradient is not: if every gradient element is finite but the float32 norm
   overflows, that is its own finding (``grad_norm_overflow``); otherwise :func:`autopsy.replay.grads.backward_origin`
   finds the module whose own backward made the first non-finite gradient (phase ``backward``).

The culprit is then re-run alone in float32 (``finite_in_float32``): its forward from the same inputs, or its backward
from the same inputs and output gradient. Under the run's autocast (``autocast=``) every pass runs in it and the
float32 re-run runs without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from autopsy.findings import Finding, Severity, evidence_value
from autopsy.replay.grads import BackwardOrigin, NormOverflow, backward_origin, norm_overflow, split_tied
from autopsy.replay.rerun import forward_extent, local_backward, rerun_forward
from autopsy.replay.trace import Trace, trace

__all__ = ["localize", "overflow_finding"]


def _layer_names(modules: dict[str, Any]) -> list[str]:
    import torch

    parents = {n for n, m in modules.items() if isinstance(m, torch.nn.ModuleList)}
    return [n for n in modules if "." in n and n.rsplit(".", 1)[0] in parents and n.rsplit(".", 1)[1].isdigit()]


def _layer_of(name: str, layer_names: list[str]) -> str | None:
    best = None
    for ln in layer_names:
        if (name == ln or name.startswith(ln + ".")) and (best is None or len(ln) > len(best)):
            best = ln
    return best


def _module_dtype(module: Any, default: Any) -> Any:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


def _common(model: Any, tr: Trace, name: str, module: Any, dtype: Any) -> dict[str, Any]:
    """Evidence every origin carries: where it is, its dtype and range, the blocks' magnitudes, the loss."""
    import torch

    modules = dict(model.named_modules())
    layers = [
        {
            "module": ln,
            "max_abs_input": evidence_value(i) if i is not None else None,
            "max_abs_output": evidence_value(o),
        }
        for ln, (i, o) in tr.max_abs().items()
    ]
    return {
        "module": name,
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_max": float(torch.finfo(dtype).max) if dtype.is_floating_point else None,
        "module_type": type(module).__name__,
        "layer": _layer_of(name, _layer_names(modules)),
        "layers": layers,
        "loss": evidence_value(tr.loss),
        "grad_norm": evidence_value(tr.grad_norm),
    }


def _nonfinite_params(name: str, module: Any) -> list[str]:
    import torch

    return sorted(
        f"{name}.{pn}" if name else pn
        for pn, p in module.named_parameters(recurse=False)
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    )


def _embedding_tokens(module: Any, batch: dict[str, Any]) -> list[int] | None:
    """For an embedding with NaN/Inf rows: the token ids of this batch whose rows are non-finite."""
    import torch

    if not isinstance(module, torch.nn.Embedding) or "input_ids" not in batch:
        return None
    bad_rows = (~torch.isfinite(module.weight.detach())).flatten(1).any(1)
    ids = batch["input_ids"].to(bad_rows.device).flatten().unique()
    ids = ids[(ids >= 0) & (ids < bad_rows.numel())]
    return sorted(int(i) for i in ids[bad_rows[ids]].tolist())


def _forward_cause(ev: dict[str, Any], bad_params: list[str], f32: bool | None) -> tuple[str, str]:
    max_in, dmax = ev.get("max_abs_input"), ev.get("dtype_max")
    if bad_params:
        tokens = f" (the rows of tokens {ev['tokens'][:8]} of this batch)" if ev.get("tokens") else ""
        return (
            f"the module's own weights hold NaN/Inf ({', '.join(bad_params)}){tokens}: the checkpoint was already "
            "poisoned by an earlier update",
            "restart from the last checkpoint whose weights are all finite and find the step that poisoned them (step replay)",
        )
    if f32:
        return (
            f"overflow: the module's output exceeds the {ev['dtype']} range (max {dmax:.4g}) but is finite in float32",
            "train in bfloat16 or keep this module in float32; lower the LR or clip; check the inputs' scale (max_abs_input)",
        )
    max_w = ev.get("max_abs_weight")
    if isinstance(max_in, float) and isinstance(max_w, float) and dmax and max_in * max_w * ev.get("fan_in", 1) > dmax:
        return (
            f"overflow in the module's matrix product: inputs up to {max_in:.3g} times weights up to {max_w:.3g} over "
            f"{ev.get('fan_in')} features exceed the {ev['dtype']} range, even in float32: the activations or the "
            "weights grew over the steps before",
            "find the step where they started to grow (the grad norm and loss before it): lower the LR or weight "
            "decay; an upcast does not help once float32 overflows",
        )
    if isinstance(max_in, float) and dmax and max_in * max_in > dmax:
        return (
            f"overflow inside the module's arithmetic: its inputs reach {max_in:.3g}, whose square exceeds the "
            f"{ev['dtype']} range ({dmax:.3g}): a norm's x**2 / variance or a softmax's exp overflows although the "
            "inputs are finite",
            "find why the activations grew (the blocks' max_abs_output in 'layers'): lower the LR, weight decay or "
            "init scale; an upcast does not help once the square exceeds float32",
        )
    return (
        "a non-finite value appears in this module even in float32: an invalid operation (0/0, inf-inf, log of 0) on its inputs",
        "inspect the inputs named by max_abs_input and the module's parameters; lower the LR; check the data of this batch",
    )


def _forward_finding(model: Any, batch: dict[str, Any], tr: Trace, origin: tuple, step: Any, autocast: Any) -> Finding:
    import torch

    name = origin[0]
    modules = dict(model.named_modules())
    module = modules.get(name, model)
    bad_params = _nonfinite_params(name, module)
    max_in, max_out, out_dtype, call = forward_extent(model, batch, module, autocast=autocast)
    dtype = out_dtype if out_dtype is not None and out_dtype.is_floating_point else _module_dtype(module, torch.float32)
    f32: bool | None = False
    if not bad_params and (dtype != torch.float32 or autocast is not None) and call is not None:
        f32 = rerun_forward(module, *call)
    ev = _common(model, tr, name, module, dtype)
    ev.update(
        phase="forward",
        finite_in_float32=f32,
        max_abs_input=evidence_value(max_in) if max_in is not None else None,
        max_abs_output=evidence_value(max_out) if max_out is not None else None,
    )
    weight = getattr(module, "weight", None)
    if not bad_params and weight is not None and getattr(weight, "dim", lambda: 0)() == 2 and max_in is not None:
        ev["max_abs_weight"] = evidence_value(float(weight.detach().abs().max()))
        ev["fan_in"] = int(getattr(module, "in_features", None) or getattr(module, "nx", None) or weight.shape[1])
    if bad_params:
        ev["nonfinite_params"] = bad_params
        tokens = _embedding_tokens(module, batch)
        if tokens is not None:
            ev["tokens"] = tokens
    if any(True for _ in module.children()):
        ev["children_finite"] = True  # the NaN is born in the module's own code, between its sub-modules
    cause, fix = _forward_cause(ev, bad_params, f32)
    where = f"{name or type(model).__name__} ({type(module).__name__})"
    return Finding(
        signature="nonfinite_origin",
        severity=Severity.CRITICAL,
        step=step,
        summary=f"the first non-finite value is born in {where}, forward pass",
        evidence=ev,
        cause=cause,
        fix=fix,
        detector="replay.localize",
    )


def _backward_finding(model: Any, tr: Trace, bo: BackwardOrigin, step: Any, autocast: Any) -> Finding:
    import torch

    dtype = bo.captured.out_dtype if bo.captured is not None and bo.captured.out_dtype is not None else None
    dtype = dtype or _module_dtype(bo.module, torch.float32)
    f32: bool | None = False if dtype == torch.float32 and autocast is None else None
    if f32 is None and bo.captured is not None:
        local = local_backward(bo.module, bo.captured, float32=True)
        f32 = None if local is None else (local.finite if bo.param is None else local.params_finite)
    ev = _common(model, tr, bo.name, bo.module, dtype)
    max_in = bo.local.max_abs_input if bo.local is not None else None
    ev.update(
        phase="backward",
        finite_in_float32=f32,
        max_abs_input=evidence_value(max_in) if max_in is not None else None,
        max_abs_output=None,
        gradient=bo.via,
    )
    if bo.param:
        ev["param"] = bo.param
    if len(bo.owners) > 1:
        ev["tied_with"] = [o for o in bo.owners if o != bo.name]
    where = f"{bo.name or type(model).__name__} ({type(bo.module).__name__})"
    dmax = ev.get("dtype_max")
    if isinstance(max_in, float) and dmax and math.isfinite(max_in) and max_in * max_in > dmax:
        cause = (
            f"the forward pass is finite but this module's inputs reach {max_in:.3g}, whose square exceeds the "
            f"{ev['dtype']} range ({dmax:.3g}): a norm's variance overflows to inf (its output collapses to 0, the loss to "
            "a constant) and its backward gives NaN"
        )
        fix = (
            "find why the activations grew (the blocks' max_abs_output in 'layers'): lower the LR or weight decay; "
            "the step where the loss went flat (ln(vocab)) and the grad norm to 0 is where it started"
        )
    elif f32:
        cause = f"the gradient overflows {ev['dtype']} in this module's backward (finite in float32)"
        fix = "use bfloat16 (or keep this module in float32); lower the loss scale or the LR"
    elif bo.via == "own_code":
        cause = "the forward is finite; the gradient becomes non-finite in the module's own code (between its sub-modules: a residual add, the loss)"
        fix = "check that code for backward-unsafe ops (sqrt/log/division at 0) and overflowing sums"
    else:
        tied = (
            f" (its weight is tied with {', '.join(ev['tied_with'])}: this module's part of the gradient is the non-finite one)"
            if ev.get("tied_with")
            else ""
        )
        cause = f"the forward pass is finite; the gradient becomes non-finite in this module's backward{tied} (a sqrt/log/division at 0, an overflow of the gradient)"
        fix = "check the module's backward-unsafe ops (eps in norms, clamp before log/sqrt); lower the loss scale or use bf16"
    return Finding(
        signature="nonfinite_origin",
        severity=Severity.CRITICAL,
        step=step,
        summary=f"the first non-finite value is born in {where}, backward pass",
        evidence=ev,
        cause=cause,
        fix=fix,
        detector="replay.localize",
    )


def overflow_finding(
    model: Any, batch: dict[str, Any], tr: Trace, ov: NormOverflow, step: Any, autocast: Any
) -> Finding:
    """``grad_norm_overflow``: every gradient element finite, the float32 norm not (``tr`` gives loss and norm)."""
    top_param = ov.top[0][0]
    owners = ov.owners.get(top_param)
    params_owner = top_param.rsplit(".", 1)[0] if "." in top_param else ""
    module, split = params_owner, None
    if owners:
        split = split_tied(model, batch, top_param, owners, autocast=autocast)
        if split:
            module = max(split, key=lambda k: split[k])
    f32max = 3.4028234663852886e38
    ev = {
        "module": module,
        "phase": "backward",
        "params": [{"param": n, "grad_norm_float64": evidence_value(v)} for n, v in ov.top],
        "max_abs_grad": evidence_value(ov.max_abs),
        "max_abs_grad_param": ov.max_abs_param,
        "grad_norm_float32": evidence_value(tr.grad_norm),
        "grad_norm_float64": evidence_value(ov.total64),
        "float32_max": f32max,
        "nonfinite_grad_elements": 0,
        "loss": evidence_value(tr.loss),
    }
    if split:
        ev["tied_contributions"] = {k: evidence_value(v) for k, v in split.items()}
    names = ", ".join(n for n, _ in ov.top[:3])
    return Finding(
        signature="grad_norm_overflow",
        severity=Severity.CRITICAL,
        step=step,
        summary=(
            f"every gradient element is finite (max |g| {ov.max_abs:.3g}) but the float32 gradient norm overflows "
            f"(float64: {ov.total64:.3g}); largest: {names}"
        ),
        evidence=ev,
        cause=(
            f"the gradients are huge but finite: the float32 sum of squares behind the norm exceeds {f32max:.3g}, so "
            "the norm is inf, clip_grad_norm_ multiplies every gradient by 0 (or NaN) and HF logs grad_norm inf; "
            "the weights or activations grew over the steps before (weight decay or LR too high)"
        ),
        fix=(
            "clipping in float32 cannot help (the norm it divides by is itself inf): lower the learning rate (and "
            "weight decay), or scale the loss or weights down; look at the grad norm's growth before this step"
        ),
        detector="replay.localize",
    )


def _not_reproduced(tr: Trace, step: Any, modules: int) -> Finding:
    return Finding(
        signature="replay_not_reproduced",
        severity=Severity.INFO,
        step=step,
        summary=f"the batch runs clean from this checkpoint (loss {tr.loss:.4g}, grad norm {tr.grad_norm:.4g})",
        evidence={
            "loss": evidence_value(tr.loss),
            "grad_norm": evidence_value(tr.grad_norm),
            "modules_traced": modules,
        },
        cause="a transient fault (hardware, a race), weights changed between the checkpoint and the failing step, or the wrong batch/checkpoint",
        fix="replay from the checkpoint saved just before the failing step with the batch of that step (AutopsyCallback records both)",
        detector="replay.localize",
    )


def localize(
    model: Any,
    batch: dict[str, Any],
    *,
    step: int | None = None,
    autocast: Any = None,
    reset: Callable[[], None] | None = None,
) -> list[Finding]:
    """Replay ``batch`` on ``model``: ``nonfinite_origin``, ``grad_norm_overflow`` or ``replay_not_reproduced``.

    ``autocast``: the torch dtype the run computed in under autocast (None: the weights' dtype). ``reset``: called
    before every pass through the whole model (restores the RNG, so dropout draws the same masks in each pass).
    """
    handle = model.register_forward_pre_hook(lambda *_: reset()) if reset is not None else None
    try:
        return _localize(model, batch, step, autocast)
    finally:
        if handle is not None:
            handle.remove()
        model.zero_grad(set_to_none=True)


def _localize(model: Any, batch: dict[str, Any], step: Any, autocast: Any) -> list[Finding]:
    model.zero_grad(set_to_none=True)
    tr = trace(model, batch, autocast=autocast)
    origin = tr.forward_origin()
    first_bad = tr.first_nonfinite()
    if (origin is not None and origin is not first_bad) or (
        origin is None and (first_bad is not None or not math.isfinite(tr.loss))
    ):
        # the NaN is born in a non-leaf's own code (attention math, the loss): narrow with every module hooked
        full = trace(model, batch, backward=False, scope="all", autocast=autocast)
        origin, tr.forward = full.forward_origin(), full.forward
        if origin is None and not math.isfinite(full.loss):
            origin = ("", None, full.loss)  # only the loss itself: the model's own code
    if origin is not None:
        return [_forward_finding(model, batch, tr, origin, step, autocast)]
    if not tr.backward_ran or math.isfinite(tr.grad_norm):
        return [_not_reproduced(tr, step, sum(1 for _ in model.modules()))]
    ov = norm_overflow(model)
    if ov is not None:
        return [overflow_finding(model, batch, tr, ov, step, autocast)]
    bo = backward_origin(model, batch, autocast=autocast) or BackwardOrigin("", model, "own_code")
    return [_backward_finding(model, tr, bo, step, autocast)]
