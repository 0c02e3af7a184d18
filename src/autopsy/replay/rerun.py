"""A module re-run alone: the inputs (and output gradients) of one of its calls are captured in a hooked pass, then
the module is run again on them, in the run's precision or in float32.

This is how a culprit is confirmed without trusting the whole model: forward, ``finite_in_float32`` says whether the
same module on the same inputs stays finite in float32; backward, :func:`local_backward` gives the gradients that
*this module's own backward* produces from the output gradient it received (its inputs' and its parameters'), so a
tied weight's gradient is split between the modules that use it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any

from autopsy.replay.trace import device_of, forward_backward, module_inputs, module_outputs, precision, run_loss

__all__ = ["Captured", "capture", "capture_forward", "local_backward", "rerun_forward"]


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once the inputs are captured."""


def _clone(obj: Any) -> Any:
    """Floating tensors detached and copied (a later in-place op must not change what was captured)."""
    import torch

    if torch.is_tensor(obj):
        return obj.detach().clone() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


@dataclass
class Captured:
    """One call of a module: its arguments and the gradient of each of its floating outputs (None: no gradient)."""

    args: tuple
    kwargs: dict
    out_dtype: Any = None
    grads: list = field(default_factory=list)


def capture_forward(model: Any, batch: dict[str, Any], module: Any, *, autocast: Any = None) -> tuple | None:
    """The args/kwargs and output of ``module``'s first call in a forward pass (the pass stops there)."""
    import torch

    got: list = []

    def hook(mod, args, kwargs, output):
        got.append((args, kwargs, output))
        raise _Stop

    h = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), precision(device_of(model), autocast):
            run_loss(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def capture(model: Any, batch: dict[str, Any], wanted: dict[Any, int], *, autocast: Any = None) -> dict[Any, Captured]:
    """One forward + backward that keeps, for each ``{module: call number}``, that call's inputs and output
    gradients. The model's ``.grad`` are left as they were."""

    calls: dict[Any, int] = {}
    got: dict[Any, Captured] = {}
    state = {"forward": True}

    def keep(c: Captured, i: int):
        def hook(g):
            c.grads[i] = g.detach().clone()

        return hook

    def fwd(mod, args, kwargs, output):
        if not state["forward"]:
            return
        k = calls.get(mod, 0)
        calls[mod] = k + 1
        if k != wanted[mod]:
            return
        outs = module_outputs(output)
        c = Captured(_clone(args), _clone(kwargs), outs[0].dtype if outs else None, [None] * len(outs))
        got[mod] = c
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(keep(c, i))

    saved = {p: p.grad for p in model.parameters()}
    for p in saved:
        p.grad = None  # the pass accumulates into fresh tensors: the saved ones are put back untouched
    handles = [m.register_forward_hook(fwd, with_kwargs=True) for m in wanted]
    try:
        forward_backward(model, batch, autocast, state)
    finally:
        for h in handles:
            h.remove()
        for p, g in saved.items():
            p.grad = g
    return got


def _float32(module: Any) -> Any:
    """``module`` itself when its floating parameters are float32, else a float32 copy (None when it cannot be
    copied)."""
    import torch

    if all(not p.is_floating_point() or p.dtype == torch.float32 for p in module.parameters()):
        return module
    try:
        return copy.deepcopy(module).float()
    except Exception:
        return None


def _no_autocast(device: Any) -> Any:
    import torch

    kind = device.type if hasattr(device, "type") else "cpu"
    try:
        return torch.autocast(device_type=kind, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def rerun_forward(module: Any, args: tuple, kwargs: dict) -> bool | None:
    """Whether ``module`` re-run in float32 (autocast off) on these inputs gives finite outputs (None: cannot run)."""
    import torch

    mod = _float32(module)
    if mod is None:
        return None
    try:
        with torch.no_grad(), _no_autocast(device_of(mod)):
            out = mod(*_convert(args, {}, True), **_convert(kwargs, {}, True))
    except Exception:
        return None
    outs = module_outputs(out)
    return bool(all(torch.isfinite(t).all() for t in outs)) if outs else None


def _convert(obj: Any, leaves: dict[int, Any], float32: bool) -> Any:
    """Floating tensors become fresh leaves that require grad (remembered in ``leaves``), in float32 if asked."""
    import torch

    if torch.is_tensor(obj):
        if not obj.is_floating_point():
            return obj
        if id(obj) not in leaves:
            t = obj.detach().float() if float32 else obj.detach()
            leaves[id(obj)] = t.requires_grad_(True)
        return leaves[id(obj)]
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_convert(v, leaves, float32) for v in obj)
    if isinstance(obj, dict):
        return {k: _convert(v, leaves, float32) for k, v in obj.items()}
    return obj


@dataclass
class LocalGrads:
    """What a module's own backward gives from the output gradient it received."""

    inputs_finite: bool
    params_finite: bool
    max_abs_input: float | None
    param_norms: dict[str, float] = field(default_factory=dict)  # float64 norm of each parameter's gradient part

    @property
    def finite(self) -> bool:
        return self.inputs_finite and self.params_finite


def local_backward(
    module: Any, cap: Captured, *, float32: bool = False, autocast: Any = None, params: bool = True
) -> LocalGrads | None:
    """Run ``module`` alone on a captured call and backpropagate its captured output gradients: the gradients its
    own backward produces (None when it cannot be run alone or received no gradient)."""
    import torch

    mod = _float32(module) if float32 else module
    if mod is None or all(g is None for g in cap.grads):
        return None
    leaves: dict[int, Any] = {}
    ctx = _no_autocast(device_of(mod)) if float32 else precision(device_of(mod), autocast)
    try:
        with torch.enable_grad(), ctx:
            outs = module_outputs(mod(*_convert(cap.args, leaves, float32), **_convert(cap.kwargs, leaves, float32)))
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, cap.grads) if g is not None and o.requires_grad]
        named = [(n, p) for n, p in mod.named_parameters(recurse=True) if p.requires_grad] if params else []
        wrt = list(leaves.values()) + [p for _, p in named]
        if not pairs or not wrt:
            return None
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    except Exception:
        return None
    gin = [g for g in grads[: len(leaves)] if g is not None]
    gpar = list(zip([n for n, _ in named], grads[len(leaves) :]))
    ins = [t for t in leaves.values()]
    max_in = max((float(t.detach().abs().max()) for t in ins if t.numel()), default=None)
    return LocalGrads(
        inputs_finite=all(bool(torch.isfinite(g).all()) for g in gin),
        params_finite=all(g is None or bool(torch.isfinite(g).all()) for _, g in gpar),
        max_abs_input=max_in,
        param_norms={
            n: float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64)) for n, g in gpar if g is not None
        },
    )


def finite_max(ts: list) -> float | None:
    """The largest |x| over tensors (NaN when any holds a NaN; None for none)."""
    import torch

    if not ts:
        return None
    vals = torch.stack(
        [torch.linalg.vector_norm(t.detach(), ord=math.inf, dtype=torch.float32).cpu() for t in ts]
    ).tolist()
    return math.nan if any(math.isnan(v) for v in vals) else max(vals)


def forward_extent(model: Any, batch: dict[str, Any], module: Any, *, autocast: Any = None) -> tuple:
    """The culprit's exact max |input| and |output| in the replay, its output dtype, and its captured call."""
    got = capture_forward(model, batch, module, autocast=autocast)
    if got is None:
        return None, None, None, None
    args, kwargs, output = got
    outs = module_outputs(output)
    return (
        finite_max(module_inputs(args, kwargs)),
        finite_max(outs),
        outs[0].dtype if outs else None,
        (args, kwargs),
    )
