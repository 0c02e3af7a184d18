"""Where a gradient first goes non-finite, with hooks that survive every architecture.

Full backward module hooks wrap a module's outputs in a ``BackwardHookFunction`` whose outputs are views: Falcon's
in-place residual add on a module output then fails ("Output 0 of BackwardHookFunction is a view and is being
modified inplace"). So nothing here wraps a tensor. One hooked forward + backward records, in the order the autograd
engine runs them:

* the gradient of every module output (a tensor hook registered in a forward hook), and
* the accumulated gradient of every parameter (``register_post_accumulate_grad_hook``),

each reduced on the device to its float32 max |g|, read back once. The first non-finite event names a tensor or a
parameter; the forward calls that consumed that tensor (or own that parameter) are the suspects, innermost first,
then the call whose own code holds the tensor (a residual add, the loss). A second pass captures the suspects'
inputs and output gradients, and each suspect's backward is re-run alone (:func:`autopsy.replay.rerun.local_backward`):
the first whose own backward turns finite output gradients into non-finite ones is the origin. A tied weight is
owned by two modules (embedding and LM head): its gradient is split this way between them, so the origin is the
module whose part went non-finite, not whichever name the weight has.

:func:`norm_overflow` covers the other way a step "goes non-finite": every gradient element is finite, but the
float32 sum of squares behind the gradient norm exceeds float32's max.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

from autopsy.replay.rerun import LocalGrads, capture, local_backward
from autopsy.replay.trace import forward_backward, module_inputs, module_outputs

__all__ = ["BackwardOrigin", "NormOverflow", "backward_origin", "norm_overflow", "param_owners", "split_tied"]


@dataclass
class _Call:
    idx: int
    name: str
    module: Any
    k: int  # the module's call number in the pass
    parent: int | None
    depth: int
    inputs: list = field(default_factory=list)  # weakrefs of the floating tensors it was called with


@dataclass
class _Events:
    calls: list[_Call] = field(default_factory=list)
    producers: dict[Any, list[int]] = field(default_factory=dict)  # weakref of an output -> the calls returning it
    events: list[tuple[str, Any, Any]] = field(default_factory=list)  # ("out", weakref, max|g|) / ("param", name, ...)


def param_owners(model: Any) -> dict[int, list[tuple[str, Any, str]]]:
    """``id(parameter) -> [(module name, module, parameter name)]``: a tied weight has several owners."""
    owners: dict[int, list[tuple[str, Any, str]]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, mod, pname))
    return owners


def _owners_of(model: Any, param: str) -> list[tuple[str, Any, str]]:
    p = dict(model.named_parameters()).get(param)
    return param_owners(model).get(id(p), []) if p is not None else []


def _inf_norm(t: Any) -> Any:
    """The largest magnitude in ``t`` (NaN when it holds a NaN), as a float32 scalar tensor."""
    import torch

    return torch.linalg.vector_norm(t.detach(), ord=math.inf, dtype=torch.float32)


def _record(model: Any, batch: dict[str, Any], autocast: Any) -> _Events:
    """The hooked pass: forward calls (with their inputs) and backward events in engine order."""

    ev = _Events()
    names: dict[Any, str] = {}
    for n, m in model.named_modules():
        names.setdefault(m, n)
    stack: list[int] = []
    counts: dict[Any, int] = {}
    state = {"forward": True}

    def grad_hook(wr: Any):
        return lambda g: ev.events.append(("out", wr, _inf_norm(g)))

    def pre(mod, args, kwargs):
        if not state["forward"]:
            return
        k = counts.get(mod, 0)
        counts[mod] = k + 1
        call = _Call(len(ev.calls), names[mod], mod, k, stack[-1] if stack else None, len(stack))
        call.inputs = [weakref.ref(t) for t in module_inputs(args, kwargs)]
        ev.calls.append(call)
        stack.append(call.idx)

    def post(mod, args, kwargs, output):
        if not state["forward"] or not stack:
            return
        idx = stack.pop()
        for t in module_outputs(output):
            wr = weakref.ref(t)
            if wr not in ev.producers and t.requires_grad:
                t.register_hook(grad_hook(wr))
            ev.producers.setdefault(wr, []).append(idx)

    def param_hook(name: str):
        return lambda p: ev.events.append(("param", name, _inf_norm(p.grad)))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in names]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in names]
    handles += [
        p.register_post_accumulate_grad_hook(param_hook(n)) for n, p in model.named_parameters() if p.requires_grad
    ]
    model.zero_grad(set_to_none=True)
    try:
        forward_backward(model, batch, autocast, state)
    finally:
        for h in handles:
            h.remove()
    return ev


def _first_bad(ev: _Events) -> tuple[str, Any] | None:
    import torch

    if not ev.events:
        return None
    dev = ev.events[0][2].device
    vals = torch.stack([v.to(dev) for _, _, v in ev.events]).cpu().tolist()
    k = next((i for i, v in enumerate(vals) if not math.isfinite(v)), None)
    return None if k is None else (ev.events[k][0], ev.events[k][1])


@dataclass
class BackwardOrigin:
    """The module whose own backward made the first non-finite gradient."""

    name: str
    module: Any
    via: str  # "input" (the gradient it passes back), "param" (its parameter's gradient) or "own_code"
    param: str | None = None  # the parameter whose gradient went non-finite first (via == "param")
    local: LocalGrads | None = None  # its backward re-run alone, in the run's precision
    captured: Any = None
    owners: list[str] = field(default_factory=list)  # a tied parameter's owners


def _suspects(ev: _Events, bad: tuple[str, Any], model: Any) -> tuple[list[_Call], str | None, list[str]]:
    """The calls that may have made the bad gradient, innermost first; the parameter's name; its owners."""
    kind, ref = bad
    if kind == "param":
        owners = _owners_of(model, ref)
        mods = {id(m) for _, m, _ in owners}
        calls = [c for c in ev.calls if id(c.module) in mods]
        return sorted(calls, key=lambda c: -c.depth), ref, [n for n, _, _ in owners]
    consumers = [c for c in ev.calls if any(w is ref for w in c.inputs)]
    consumers.sort(key=lambda c: (-c.depth, -c.idx))
    producer = ev.producers.get(ref, [])
    holder = ev.calls[producer[0]].parent if producer else None
    if holder is not None and all(c.idx != holder for c in consumers):
        consumers.append(ev.calls[holder])
    return consumers, None, []


def backward_origin(model: Any, batch: dict[str, Any], *, autocast: Any = None) -> BackwardOrigin | None:
    """The first module, in backward order, whose own backward turned finite gradients into non-finite ones."""
    ev = _record(model, batch, autocast)
    bad = _first_bad(ev)
    if bad is None:
        return None
    calls, param, owners = _suspects(ev, bad, model)
    if not calls:
        return None
    wanted: dict[Any, int] = {}
    for c in calls:
        wanted.setdefault(c.module, c.k)
    caps = capture(model, batch, wanted, autocast=autocast)
    for c in calls:
        cap = caps.get(c.module)
        if cap is None or wanted[c.module] != c.k:
            continue
        local = local_backward(c.module, cap, autocast=autocast)
        if local is None:
            continue
        if param is not None:
            own = [pn for mn, _, pn in _owners_of(model, param) if mn == c.name]
            if any(not math.isfinite(local.param_norms.get(pn, 0.0)) for pn in own):
                return BackwardOrigin(c.name, c.module, "param", param, local, cap, owners)
        elif not local.finite:
            via = "input" if not local.inputs_finite else "param"
            return BackwardOrigin(c.name, c.module, via, None, local, cap, owners)
    last = calls[-1]
    return BackwardOrigin(last.name, last.module, "own_code", param, None, caps.get(last.module), owners)


@dataclass
class NormOverflow:
    """Every gradient element finite, the float32 norm not."""

    total64: float
    max_abs: float
    max_abs_param: str
    top: list[tuple[str, float]]  # (parameter, float64 norm of its gradient), largest first
    owners: dict[str, list[str]] = field(default_factory=dict)  # tied parameters among the top: their owners


def norm_overflow(model: Any, *, top: int = 5) -> NormOverflow | None:
    """When every gradient element is finite but the float32 norm is not: the float64 norm and the parameters that
    contribute most (None when some element is non-finite, or the float32 norm is finite)."""
    import torch

    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    dev = named[0][1].device
    amax = torch.stack([torch.linalg.vector_norm(g, ord=math.inf, dtype=torch.float32).to(dev) for _, g in named])
    n32 = torch.stack([torch.linalg.vector_norm(g).float().to(dev) for _, g in named])
    maxes, norms32 = amax.cpu().tolist(), n32.cpu().tolist()
    if not all(math.isfinite(v) for v in maxes) or math.isfinite(math.sqrt(sum(v * v for v in norms32))):
        return None
    n64 = [float(torch.linalg.vector_norm(g.detach().double() if dev.type != "mps" else g.float())) for _, g in named]
    order = sorted(range(len(named)), key=lambda i: -n64[i])
    k = max(range(len(named)), key=lambda i: maxes[i])
    owners = param_owners(model)
    params = dict(model.named_parameters())
    tied = {named[i][0]: [o[0] for o in owners.get(id(params[named[i][0]]), [])] for i in order[:top]}
    return NormOverflow(
        total64=math.sqrt(sum(v * v for v in n64)),
        max_abs=maxes[k],
        max_abs_param=named[k][0],
        top=[(named[i][0], n64[i]) for i in order[:top]],
        owners={n: o for n, o in tied.items() if len(o) > 1},
    )


def split_tied(model: Any, batch: dict[str, Any], param: str, owners: list[str], *, autocast: Any = None) -> dict:
    """How much of a tied parameter's gradient each owner's use contributes (float64 norms), from one capture pass."""
    mods = dict(model.named_modules())
    wanted = {mods[o]: 0 for o in owners if o in mods}
    caps = capture(model, batch, wanted, autocast=autocast)
    out: dict[str, float] = {}
    for o in owners:
        mod = mods.get(o)
        cap = caps.get(mod) if mod is not None else None
        local = local_backward(mod, cap, autocast=autocast) if cap is not None else None
        if local is not None:
            pname = next((pn for mn, _, pn in _owners_of(model, param) if mn == o), None)
            if pname in local.param_norms:
                out[o] = local.param_norms[pname]
    return out
