"""The cheap first pass of localization: one hooked forward (+ backward) with per-module finite checks on the device.

A forward hook reduces each floating input and output of a module to its float32 sum, a 0-dim tensor kept **on the
device** (a sum is non-finite whenever any element is NaN/Inf, and a float32 sum is the cheapest reduction there is:
about 6x cheaper on the CPU than max |x|); the blocks (children of a ``ModuleList``: the decoder layers) also record
max |input| and |output|. Nothing is read back until the forward is over: the scalars are stacked and copied to the
host once. The backward runs only when the forward was finite (a non-finite forward is localized without it), and
the gradient norm is computed in float32 the way ``clip_grad_norm_`` computes it, with one more host sync.

``scope="leaves"`` hooks the leaf modules and the blocks only (the fixed cost of a hook is per module); ``"all"``
hooks every module (the narrowing pass, when a NaN is born in a non-leaf's own code).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Trace", "grad_norm", "module_inputs", "module_outputs", "precision", "run_loss", "trace"]

# keyword inputs that are not activations: masks, positions, caches, the token count HF passes for the loss
_SKIP_KW = ("mask", "position_ids", "position_embeddings", "cache_position", "past_key", "num_items")


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


def module_inputs(args: tuple, kwargs: dict) -> list:
    """The floating activations a module was called with (masks, positions and caches left out)."""
    out: list = []
    _tensors(args, out)
    for k, v in kwargs.items():
        if not any(s in k for s in _SKIP_KW):
            _tensors(v, out)
    return out


def module_outputs(output: Any) -> list:
    """The floating tensors a module returned (a ModelOutput's fields in order)."""
    if hasattr(output, "to_tuple") and not isinstance(output, tuple):
        output = [output[k] for k in output.keys()]
    return _tensors(output, [])


def precision(device: Any, autocast: Any) -> Any:
    """``torch.autocast`` in ``autocast`` (a torch dtype) on ``device``'s type, or nothing when None."""
    import torch

    if autocast is None:
        return contextlib.nullcontext()
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return torch.autocast(device_type=kind, dtype=autocast)


def run_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Call the model on ``batch`` and return its loss as a float32 scalar (labels default to the input ids)."""
    kwargs = dict(batch)
    if "labels" not in kwargs and "input_ids" in kwargs:
        kwargs["labels"] = kwargs["input_ids"]
    out = model(**kwargs)
    loss = out.loss if hasattr(out, "loss") else out[0] if isinstance(out, (tuple, list)) else out
    if loss is None:
        raise ValueError("the model returned no loss for this batch")
    return loss.float().sum() if loss.dim() else loss.float()


def forward_backward(model: Any, batch: dict[str, Any], autocast: Any, state: dict[str, bool]) -> None:
    """The loss of ``batch`` under the run's precision, then its backward when it has a gradient; ``state["forward"]``
    turns False between the two, so that hooks can tell the passes apart."""
    import torch

    with torch.enable_grad():
        with precision(device_of(model), autocast):
            loss = run_loss(model, batch)
        state["forward"] = False
        if loss.requires_grad:
            loss.backward()


def grad_norm(params: list, device: Any) -> Any:
    """The gradient norm as ``clip_grad_norm_`` computes it (each tensor's norm in its own dtype, then the norm of
    those), as a 0-dim float32 tensor on ``device``; zero when no parameter has a gradient."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norms = [torch.linalg.vector_norm(g.detach()).float().to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


@dataclass
class Trace:
    """The host-side result of the hooked pass."""

    loss: float
    grad_norm: float
    forward: list[tuple[str, float | None, float]] = field(default_factory=list)  # (module, sum of inputs, of outputs)
    layers: list[tuple[str, float | None, float]] = field(default_factory=list)  # (block, max|input|, max|output|)
    backward_ran: bool = True

    def forward_origin(self) -> tuple[str, float | None, float] | None:
        """The first module, in execution order, whose output is non-finite while its inputs were finite."""
        for row in self.forward:
            _, i, o = row
            if not math.isfinite(o) and (i is None or math.isfinite(i)):
                return row  # the row itself: the caller compares it with first_nonfinite() by identity
        return None

    def first_nonfinite(self) -> tuple[str, float | None, float] | None:
        return next((r for r in self.forward if not math.isfinite(r[2])), None)

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


def hooked_modules(model: Any, scope: str) -> tuple[dict[Any, str], set[Any]]:
    """The modules a pass hooks (``{module: name}``) and the blocks among them."""
    import torch

    names: dict[Any, str] = {}
    for n, m in model.named_modules():
        names.setdefault(m, n)
    blocks = {c for m in names if isinstance(m, torch.nn.ModuleList) for c in m.children()}
    if scope == "leaves":
        names = {m: n for m, n in names.items() if m in blocks or not any(True for _ in m.children())}
    return names, blocks


class _Recorder:
    """The forward hook of a trace: device-side sums per call, max |x| per block, nothing read back."""

    def __init__(self, names: dict[Any, str], blocks: set[Any]) -> None:
        self.names, self.blocks = names, blocks
        self.cache: dict[int, tuple[Any, int, Any]] = {}  # id -> (tensor, version, its sum): outputs are next inputs
        self.fwd: list[tuple[str, Any, Any]] = []
        self.lay: list[tuple[str, Any, Any]] = []
        self.done = False  # set when the forward is over (recomputation under checkpointing is not recorded)

    def stat(self, ts: list) -> Any:
        import torch

        vals = []
        for t in ts:
            hit = self.cache.get(id(t))
            if hit is None or hit[0] is not t or hit[1] != t._version:  # in-place ops bump the version
                hit = (t, t._version, torch.sum(t.detach(), dtype=torch.float32))
                self.cache[id(t)] = hit
            vals.append(hit[2])
        return vals[0] if len(vals) == 1 else torch.stack([v.to(vals[0].device) for v in vals]).sum()

    @staticmethod
    def maxabs(ts: list) -> Any:
        import torch

        vals = [torch.linalg.vector_norm(t.detach(), ord=math.inf, dtype=torch.float32) for t in ts]
        return torch.stack([v.to(vals[0].device) for v in vals]).amax()

    def __call__(self, mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self.done:
            return
        ins, outs = module_inputs(args, kwargs), module_outputs(output)
        if not outs:
            return
        name = self.names.get(mod, type(mod).__name__)
        self.fwd.append((name, self.stat(ins) if ins else None, self.stat(outs)))
        if mod in self.blocks:
            self.lay.append((name, self.maxabs(ins) if ins else None, self.maxabs(outs)))


def _host(
    loss: Any, groups: list[list[tuple[str, Any, Any]]]
) -> tuple[float, list[list[tuple[str, float | None, float]]]]:
    """The loss and every recorded (input, output) pair, read back in one host sync."""
    import torch

    nan = torch.full((), math.nan, device=loss.device)
    flat = [loss.detach().float()] + [v for rows in groups for _, i, o in rows for v in (nan if i is None else i, o)]
    vals = torch.stack([v.to(loss.device) for v in flat]).cpu().tolist()
    out, k = [], 1
    for rows in groups:
        out.append(
            [(n, None if i is None else vals[k + 2 * j], vals[k + 2 * j + 1]) for j, (n, i, _) in enumerate(rows)]
        )
        k += 2 * len(rows)
    return vals[0], out


def trace(
    model: Any, batch: dict[str, Any], *, backward: bool = True, scope: str = "leaves", autocast: Any = None
) -> Trace:
    """One forward (+ backward, when the forward is finite) with per-module finite checks kept on the device."""
    import torch

    names, blocks = hooked_modules(model, scope)
    rec = _Recorder(names, blocks)
    handles = [m.register_forward_hook(rec, with_kwargs=True) for m in names]
    ran = False
    try:
        with torch.enable_grad():
            with precision(device_of(model), autocast):
                loss = run_loss(model, batch)
            rec.done = True
            loss_v, (fwd, lay) = _host(loss, [rec.fwd, rec.lay])
            forward_ok = math.isfinite(loss_v) and all(math.isfinite(o) for _, _, o in fwd)
            if backward and forward_ok and loss.requires_grad:
                loss.backward()
                ran = True
    finally:
        for h in handles:
            h.remove()
        rec.cache.clear()
    gnorm = float(grad_norm(list(model.parameters()), loss.device)) if ran else math.nan
    return Trace(loss=loss_v, grad_norm=gnorm, forward=fwd, layers=lay, backward_ran=ran)


def device_of(model: Any) -> Any:
    """The device of the model's first parameter (the CPU for a model without any)."""
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
