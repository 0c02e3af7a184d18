"""Where inside the model the first NaN/Inf is born: one hooked forward + backward pass.

The first pass hooks the leaf modules and the blocks of the model (children of a ``ModuleList``: the decoder
layers): a forward hook reduces each floating input and output to its float32 sum, a 0-dim tensor kept **on the
device** (a sum is non-finite whenever any element is NaN/Inf, and a float32 sum is the cheapest reduction there is:
about 6x cheaper on the CPU than max |x|); the blocks also record max |input| and |output|. Nothing is read back
until the pass is over: the scalars are stacked and copied to the host once. When the first non-finite output is
not a leaf with finite inputs (a NaN born in a container's own code), a second forward pass hooks every module.

The origin is the first module, in execution order, whose output is non-finite while its inputs were finite
(phase ``forward``); forward hooks fire children-first, so this is the innermost such module. When the forward
is finite but a gradient is not, a second pass with backward hooks on the leaf modules finds the first one whose
output gradient was finite and whose input or parameter gradient was not (phase ``backward``). The culprit is
then re-run in float32 from the same inputs (``finite_in_float32``); for a backward-phase culprit, its backward is
re-run in float32 from the inputs and output gradient of its first call, captured in one more hooked pass.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from autopsy.findings import Finding, Severity

__all__ = ["Trace", "localize", "run_loss", "trace"]

_SKIP_KW = ("mask", "position_ids", "position_embeddings", "cache_position", "past_key")


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once the inputs are captured."""


def _tensors(obj: Any, out: list, depth: int = 0) -> list:
    import torch

    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel():
            out.append(obj)
    elif depth < 4:
        if isinstance(obj, (list, tuple)):
            for v in obj:
                _tensors(v, out, depth + 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                _tensors(v, out, depth + 1)
    return out


def _inputs(args: tuple, kwargs: dict) -> list:
    out: list = []
    _tensors(args, out)
    for k, v in kwargs.items():
        if not any(s in k for s in _SKIP_KW):
            _tensors(v, out)
    return out


def _outputs(output: Any) -> list:
    if hasattr(output, "to_tuple") and not isinstance(output, tuple):
        output = [output[k] for k in output.keys()]
    return _tensors(output, [])


def run_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Call the model on ``batch`` and return its loss (labels default to the input ids)."""
    kwargs = dict(batch)
    if "labels" not in kwargs and "input_ids" in kwargs:
        kwargs["labels"] = kwargs["input_ids"]
    out = model(**kwargs)
    loss = out.loss if hasattr(out, "loss") else out[0] if isinstance(out, (tuple, list)) else out
    if loss is None:
        raise ValueError("the model returned no loss for this batch")
    return loss.float().sum() if loss.dim() else loss.float()


@dataclass
class Trace:
    """The host-side result of the hooked pass."""

    loss: float
    grad_norm: float
    forward: list[tuple[str, float | None, float]] = field(
        default_factory=list
    )  # (module, sum of inputs or None, sum of outputs)
    backward: list[tuple[str, float]] = field(
        default_factory=list
    )  # (module, sum of its output's gradient), backward order
    layers: list[tuple[str, float | None, float]] = field(default_factory=list)  # (block, max|input|, max|output|)
    backward_ran: bool = True

    def forward_origin(self) -> tuple[str, float | None, float] | None:
        for name, i, o in self.forward:
            if not math.isfinite(o) and (i is None or math.isfinite(i)):
                return name, i, o
        return None

    def max_abs(self) -> dict[str, tuple[float | None, float]]:
        """Per block, the largest |input| and |output| seen (over repeated calls)."""
        out: dict[str, tuple[float | None, float]] = {}
        for name, i, o in self.layers:
            pi, po = out.get(name, (None, -math.inf))
            ni = i if pi is None else (pi if i is None else _nanmax(pi, i))
            out[name] = (ni, _nanmax(po, o))
        return out


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def trace(
    model: Any, batch: dict[str, Any], *, backward: bool = True, scope: str = "leaves", grad_hooks: bool = False
) -> Trace:
    """One forward (+ backward) pass with per-module finite checks kept on the device; one host sync at the end.

    ``scope="leaves"`` hooks the leaf modules and the blocks only (the cheap first pass: the fixed cost of a hook
    is per module); ``"all"`` hooks every module (the narrowing pass, when a NaN is born in a non-leaf's own code).
    ``grad_hooks`` also records a sum of each module output's gradient (off by default: a non-finite gradient shows
    in the grad norm, and :func:`_backward_origin` finds its module).
    """
    import torch

    names: dict[Any, str] = {}
    for n, m in model.named_modules():
        names.setdefault(m, n)
    all_lists = [m for m in names if isinstance(m, torch.nn.ModuleList)]
    block_set = {c for m in all_lists for c in m.children()}
    if scope == "leaves":
        names = {m: n for m, n in names.items() if m in block_set or not any(True for _ in m.children())}
    cache: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (tensor, its max |x|): outputs are the next inputs
    fwd: list[tuple[str, Any, Any]] = []
    bwd: list[tuple[str, Any]] = []
    hooked: set[int] = set()
    inf = float("inf")
    blocks = block_set
    lay: list[tuple[str, Any, Any]] = []

    def stat(ts: list) -> Any:
        vals = []
        for t in ts:
            hit = cache.get(id(t))
            if hit is None or hit[0] is not t:
                hit = (t, torch.sum(t.detach(), dtype=torch.float32))
                cache[id(t)] = hit
            vals.append(hit[1])
        return vals[0] if len(vals) == 1 else torch.stack(vals).sum()

    def maxabs(ts: list) -> Any:
        return torch.stack([torch.linalg.vector_norm(t.detach(), ord=inf, dtype=torch.float32) for t in ts]).amax()

    def grad_hook(name: str):
        def hook(g):
            bwd.append((name, torch.sum(g.detach(), dtype=torch.float32)))

        return hook

    def fwd_hook(mod, args, kwargs, output):
        name = names.get(mod, type(mod).__name__)
        ins = _inputs(args, kwargs)
        outs = _outputs(output)
        if not outs:
            return
        fwd.append((name, stat(ins) if ins else None, stat(outs)))
        if mod in blocks:
            lay.append((name, maxabs(ins) if ins else None, maxabs(outs)))
        if backward and grad_hooks:
            for t in outs:
                if t.requires_grad and id(t) not in hooked:
                    hooked.add(id(t))
                    t.register_hook(grad_hook(name))

    handles = [m.register_forward_hook(fwd_hook, with_kwargs=True) for m in names]
    try:
        with torch.enable_grad():
            loss = run_loss(model, batch)
            ran = False
            if backward and loss.requires_grad:
                loss.backward()
                ran = True
    finally:
        for h in handles:
            h.remove()
        cache.clear()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    gnorm = (
        torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads])
        )
        if grads
        else torch.zeros((), device=loss.device)
    )
    # the one host sync of the pass
    nan = torch.full((), math.nan, device=loss.device)
    flat = [loss.detach().float(), gnorm.float()]
    for _, i, o in fwd:
        flat += [nan if i is None else i, o]
    flat += [g for _, g in bwd]
    for _, i, o in lay:
        flat += [nan if i is None else i, o]
    vals = torch.stack([v.to(loss.device) for v in flat]).cpu().tolist()
    out = Trace(loss=vals[0], grad_norm=vals[1], backward_ran=ran)
    k = 2
    for name, i, _ in fwd:
        out.forward.append((name, None if i is None else vals[k], vals[k + 1]))
        k += 2
    for name, _ in bwd:
        out.backward.append((name, vals[k]))
        k += 1
    for name, i, _ in lay:
        out.layers.append((name, None if i is None else vals[k], vals[k + 1]))
        k += 2
    return out


def _capture(model: Any, batch: dict[str, Any], module: Any) -> tuple[tuple, dict, Any] | None:
    """The args/kwargs and output of ``module``'s first call in a forward pass (the pass stops there)."""
    import torch

    got: list = []

    def hook(mod, args, kwargs, output):
        got.append((args, kwargs, output))
        raise _Stop

    h = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run_loss(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def _to_float32(obj: Any) -> Any:
    import torch

    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_float32(v) for v in obj)
    if isinstance(obj, list):
        return [_to_float32(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


def _rerun(
    model: Any, batch: dict[str, Any], module: Any, *, float32: bool
) -> tuple[float | None, float | None, bool | None]:
    """The culprit's exact max |input| and |output| in the replay, and whether it is finite re-run alone in float32."""
    import torch

    captured = _capture(model, batch, module)
    if captured is None:
        return None, None, None
    args, kwargs, output = captured
    ins, outs = _inputs(args, kwargs), _outputs(output)
    inf = float("inf")
    vals = [torch.linalg.vector_norm(t.detach(), ord=inf, dtype=torch.float32) for t in ins + outs]
    host = torch.stack(vals).cpu().tolist() if vals else []
    max_in = max(host[: len(ins)], default=None) if ins else None
    out_vals = host[len(ins) :]
    max_out = (math.nan if any(math.isnan(v) for v in out_vals) else max(out_vals)) if out_vals else None
    if ins and any(math.isnan(v) for v in host[: len(ins)]):
        max_in = math.nan
    if not float32:
        return max_in, max_out, False
    try:
        clone = copy.deepcopy(module).float()
        with torch.no_grad():
            out = clone(*_to_float32(args), **_to_float32(kwargs))
    except Exception:
        return max_in, max_out, None
    outs = _outputs(out)
    return max_in, max_out, (bool(all(torch.isfinite(t).all() for t in outs)) if outs else None)


def _rerun_backward(model: Any, batch: dict[str, Any], module: Any) -> tuple[float | None, bool | None]:
    """Re-run ``module``'s backward alone in float32, from the inputs and output gradient of its first call in one
    more hooked pass: (max |input|, whether every input and parameter gradient is then finite; None when it
    cannot be run alone)."""
    import torch

    got: dict[str, Any] = {}

    def keep(i: int):
        def hook(g):
            got["grads"][i] = g.detach().clone()

        return hook

    def fwd(mod, args, kwargs, output):
        if "args" in got:
            return
        outs = _outputs(output)
        got.update(args=args, kwargs=kwargs, grads=[None] * len(outs))
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(keep(i))

    model.zero_grad(set_to_none=True)
    h = module.register_forward_hook(fwd, with_kwargs=True)
    try:
        with torch.enable_grad():
            run_loss(model, batch).backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    if "args" not in got or all(g is None for g in got["grads"]):
        return None, None
    args, kwargs = got["args"], got["kwargs"]
    ins = _inputs(args, kwargs)
    inf = float("inf")
    max_in = (
        max(
            torch.stack([torch.linalg.vector_norm(t.detach(), ord=inf, dtype=torch.float32) for t in ins])
            .cpu()
            .tolist()
        )
        if ins
        else None
    )
    leaves: dict[int, Any] = {id(t): t.detach().float().requires_grad_(True) for t in ins}

    def conv(obj: Any) -> Any:
        if torch.is_tensor(obj):
            if id(obj) in leaves:
                return leaves[id(obj)]
            return obj.detach().float() if obj.is_floating_point() else obj
        if isinstance(obj, (list, tuple)):
            return type(obj)(conv(v) for v in obj)
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        return obj

    try:
        clone = copy.deepcopy(module).float()
        with torch.enable_grad():
            outs = _outputs(clone(*conv(args), **conv(kwargs)))
            pairs = [(o, g.float()) for o, g in zip(outs, got["grads"]) if g is not None and o.requires_grad]
            if not pairs:
                return max_in, None
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    except Exception:
        return max_in, None
    grads = [t.grad for t in leaves.values() if t.grad is not None] + [
        p.grad for p in clone.parameters() if p.grad is not None
    ]
    if not grads:
        return max_in, None
    return max_in, all(bool(torch.isfinite(g).all()) for g in grads)


def _backward_origin(model: Any, batch: dict[str, Any]) -> str | None:
    """Second pass (only when the forward was finite): the first leaf, in backward order, that turned finite
    output gradients into non-finite input or parameter gradients."""
    import torch

    model.zero_grad(set_to_none=True)
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    order: list[tuple[str, Any, Any, Any]] = []
    inf = float("inf")

    def maxabs(gs) -> Any:
        ts = [g for g in gs if g is not None and g.numel()]
        if not ts:
            return None
        return torch.stack([torch.linalg.vector_norm(g.detach(), ord=inf, dtype=torch.float32) for g in ts]).amax()

    def make(name, mod):
        def hook(m, grad_input, grad_output):
            order.append((name, mod, maxabs(grad_output), maxabs(grad_input)))

        return hook

    handles = [m.register_full_backward_hook(make(n, m)) for n, m in leaves]
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first leaf's inputs (token ids) need no gradient: torch says so
            run_loss(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
    for name, mod, go, gi in order:
        go_ok = go is None or bool(torch.isfinite(go))
        gi_bad = gi is not None and not bool(torch.isfinite(gi))
        p_bad = any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in mod.parameters(recurse=False)
        )
        if go_ok and (gi_bad or p_bad):
            return name
    return None


def _layer_of(name: str, layer_names: list[str]) -> str | None:
    best = None
    for ln in layer_names:
        if name == ln or name.startswith(ln + "."):
            if best is None or len(ln) > len(best):
                best = ln
    return best


def _module_dtype(module: Any, default: Any) -> Any:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def localize(model: Any, batch: dict[str, Any], *, step: int | None = None) -> list[Finding]:
    """Replay ``batch`` on ``model`` and return ``nonfinite_origin`` or ``replay_not_reproduced``."""
    import torch

    from autopsy.findings import evidence_value

    model.zero_grad(set_to_none=True)
    modules = dict(model.named_modules())
    tr = trace(model, batch)
    origin = tr.forward_origin()
    first_bad = next((r for r in tr.forward if not math.isfinite(r[2])), None)
    if (origin is not None and origin is not first_bad) or (
        origin is None and (first_bad is not None or not math.isfinite(tr.loss))
    ):
        # the NaN is born in a non-leaf's own code (attention math, the loss): narrow with every module hooked
        model.zero_grad(set_to_none=True)
        full = trace(model, batch, backward=False, scope="all")
        origin = full.forward_origin()
        tr.forward = full.forward
    phase = "forward"
    if origin is None:
        bad_grad = next((n for n, g in tr.backward if not math.isfinite(g)), None)
        if bad_grad is None and math.isfinite(tr.loss) and math.isfinite(tr.grad_norm):
            return [
                Finding(
                    signature="replay_not_reproduced",
                    severity=Severity.INFO,
                    step=step,
                    summary=f"the batch runs clean from this checkpoint (loss {tr.loss:.4g}, grad norm {tr.grad_norm:.4g})",
                    evidence={
                        "loss": evidence_value(tr.loss),
                        "grad_norm": evidence_value(tr.grad_norm),
                        "modules_traced": len(modules),
                    },
                    cause="a transient fault (hardware, a race), weights changed between the checkpoint and the failing step, or the wrong batch/checkpoint",
                    fix="replay from the checkpoint saved just before the failing step with the batch of that step (AutopsyCallback records both)",
                    detector="replay.localize",
                )
            ]
        phase = "backward"
        name = _backward_origin(model, batch) or bad_grad or ""
        origin = (name, None, math.nan)
    name = origin[0]
    max_in: float | None = origin[1]
    max_out: float | None = origin[2]
    module = modules.get(name, model)
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype = _module_dtype(module, param_dtype)
    bad_params = sorted(
        f"{name}.{pn}" if name else pn
        for pn, p in module.named_parameters(recurse=False)
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    )
    if phase == "forward":
        max_in, max_out, f32 = _rerun(model, batch, module, float32=not bad_params and dtype != torch.float32)
    elif dtype == torch.float32 or bad_params or module is model:
        f32 = (
            False if dtype == torch.float32 else None
        )  # already float32 (the same arithmetic), or nothing to re-run alone
    else:
        max_in, f32 = _rerun_backward(model, batch, module)
    children = [n for n, _ in module.named_children()]
    parents = {n for n, m in modules.items() if isinstance(m, torch.nn.ModuleList)}
    layer_names = [
        n for n, m in modules.items() if "." in n and n.rsplit(".", 1)[0] in parents and n.rsplit(".", 1)[1].isdigit()
    ]
    per = tr.max_abs()
    layers = [
        {
            "module": ln,
            "max_abs_input": evidence_value(i) if i is not None else None,
            "max_abs_output": evidence_value(o),
        }
        for ln, (i, o) in per.items()
    ]
    dmax = float(torch.finfo(dtype).max) if dtype.is_floating_point else None
    evidence = {
        "module": name,
        "phase": phase,
        "dtype": str(dtype).replace("torch.", ""),
        "finite_in_float32": f32,
        "max_abs_input": evidence_value(max_in) if max_in is not None else None,
        "max_abs_output": evidence_value(max_out) if max_out is not None else None,
        "dtype_max": dmax,
        "module_type": type(module).__name__,
        "layer": _layer_of(name, layer_names),
        "layers": layers,
        "loss": evidence_value(tr.loss),
        "grad_norm": evidence_value(tr.grad_norm),
    }
    if bad_params:
        evidence["nonfinite_params"] = bad_params
    if children and phase == "forward":
        evidence["children_finite"] = True  # the NaN is born in the module's own code, between its sub-modules
    if bad_params:
        cause = f"the module's own weights hold NaN/Inf ({', '.join(bad_params)}): the checkpoint was already poisoned by an earlier update"
        fix = "restart from the last checkpoint whose weights are all finite and find the step that poisoned them (step replay)"
    elif f32:
        cause = f"overflow: the module's output exceeds the {evidence['dtype']} range (max {dmax:.4g}) but is finite in float32"
        fix = "train in bfloat16 or keep this module in float32; lower the LR or clip; check the inputs' scale (max_abs_input)"
    elif phase == "backward":
        cause = "the forward pass is finite; the gradient becomes non-finite in this module's backward (a sqrt/log/division at 0, an overflow of the gradient)"
        fix = "check the module's backward-unsafe ops (eps in norms, clamp before log/sqrt); lower the loss scale or use bf16"
    else:
        cause = "a non-finite value appears in this module even in float32: an invalid operation (0/0, inf-inf, log of 0) on its inputs"
        fix = "inspect the inputs named by max_abs_input and the module's parameters; lower the LR; check the data of this batch"
    where = f"{name or type(model).__name__} ({type(module).__name__})"
    return [
        Finding(
            signature="nonfinite_origin",
            severity=Severity.CRITICAL,
            step=step,
            summary=f"the first non-finite value is born in {where}, {phase} pass",
            evidence=evidence,
            cause=cause,
            fix=fix,
            detector="replay.localize",
        )
    ]
