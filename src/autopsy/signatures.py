"""The signature ids: one table, the contract of ``docs/SIGNATURES.md``. New ids may be added, none renamed.

Everything that is known about a signature as such is here: its one-line meaning, whether logs or replay find it,
its rank when findings tie (root causes lead their symptoms), and its part in the cross-finding rules (the
non-finite group, and the precursors folded into it). The registry, the ordering of findings, the postprocessing
rules and the renderers all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LOG_SIGNATURES",
    "NONFINITE",
    "PRECURSORS",
    "REPLAY_SIGNATURES",
    "SIGNATURES",
    "Signature",
    "define_signature",
    "lead_rank",
]


@dataclass(frozen=True)
class Signature:
    """One failure signature.

    ``kind``: ``"log"`` (found in the logs by ``analyze``), ``"replay"`` (found by reloading a checkpoint) or
    ``"fleet"`` (found across the runs of a fleet: ``autopsy.fleet``).
    ``lead``: among findings of the same severity and step, the lower rank leads the report (the root of the
    failure before its symptoms: a NaN grad norm explains the 0.0 loss HF's NaN filter logs at the same step).
    ``nonfinite``: a non-finite event in the logs; ``precursor``: a finding at or before the first non-finite
    event is folded into it as its precursor (``autopsy.postprocess``).
    """

    id: str
    summary: str
    kind: str = "log"
    lead: int = 100
    nonfinite: bool = False
    precursor: bool = False


_TABLE = (
    Signature("nan_loss", "the loss is NaN/Inf at some step", lead=6, nonfinite=True),
    Signature("nan_grad_norm", "the gradient norm is NaN/Inf: the update poisoned the weights", lead=5, nonfinite=True),
    Signature("loss_zero_collapse", "the loss drops to exactly 0.0 and stays", lead=7, nonfinite=True),
    Signature("loss_spike", "a short excursion far above the recent level, which recovers"),
    Signature("divergence", "the loss rises and does not come back (no NaN)", lead=8, precursor=True),
    Signature(
        "exploding_gradients",
        "the grad norm jumps or climbs far above its post-warmup baseline",
        lead=10,
        precursor=True,
    ),
    Signature("vanishing_gradients", "the grad norm sits near zero while the loss is not converged"),
    Signature("clip_saturation", "pre-clip grad norm above max_grad_norm on most post-warmup steps"),
    Signature("overfitting", "eval loss rises from its minimum while train loss keeps falling"),
    Signature("eval_flat", "train loss falls, eval loss does not move"),
    Signature("plateau", "the loss barely moves from its start (or sits at a chance level)"),
    Signature("oscillation", "a sustained sawtooth after warmup, well above the noise"),
    Signature("loss_scale_collapse", "the fp16 loss scale keeps halving", lead=9),
    Signature("crash", "the log ends in a traceback or kill", lead=4),
    Signature("abrupt_end", "the run stops short of its planned steps with no final record"),
    Signature("epoch_boundary_drop", "the train loss steps down at each epoch start: memorization"),
    Signature("throughput_drop", "tokens/s halves"),
    Signature("memory_growth", "memory climbs step over step"),
    Signature("memory_headroom", "GPU memory above 90% of the card, or an out-of-memory crash with its numbers"),
    Signature("rank_imbalance", "one GPU's memory or utilisation diverges from the other ranks'"),
    Signature("input_bound", "the GPUs wait for data: low utilisation or a data loader that takes most of each step"),
    Signature("low_mfu", "model FLOPs utilisation far below the usual range for the kind of run"),
    Signature("sparse_eval", "too few eval points to see overfitting in time"),
    Signature("config_risk", "a setting that makes a failure likely or hides one"),
    Signature("insufficient_data", "too few points to judge"),
    Signature("source_damaged", "a file was truncated, corrupt or unreadable"),
    Signature("weights_nonfinite", "the checkpoint itself holds NaN/Inf weights", kind="replay", lead=2),
    Signature(
        "nonfinite_origin",
        "the first module whose output or gradient is non-finite while its inputs were finite",
        kind="replay",
        lead=1,
    ),
    Signature("bad_batch", "the batch itself is broken", kind="replay", lead=0),
    Signature(
        "grad_norm_overflow",
        "every gradient element is finite but the float32 gradient norm overflows",
        kind="replay",
        lead=1,
    ),
    Signature("replay_not_reproduced", "the batch runs clean from this checkpoint", kind="replay"),
    Signature(
        "degenerate_output",
        "a checkpoint's greedy generations are empty, loop or come from NaN logits",
        kind="replay",
        lead=3,
    ),
    Signature("generation_ok", "a checkpoint's greedy generations look sound", kind="replay"),
    # found by a side door (no logs needed), like replay: the report treats both alike
    Signature("data_issue", "the dataset holds rows that cannot train as meant", kind="replay", lead=3),
    Signature("data_summary", "a dataset's size, token lengths and trained-on tokens per row", kind="replay"),
    # across the runs of a fleet (autopsy.fleet): about the fleet, never one run
    Signature("fleet_split", "a setting splits the fleet: the failed runs gather on one side of it", kind="fleet"),
)

SIGNATURES: dict[str, Signature] = {s.id: s for s in _TABLE}
LOG_SIGNATURES: dict[str, str] = {s.id: s.summary for s in _TABLE if s.kind == "log"}
REPLAY_SIGNATURES: dict[str, str] = {s.id: s.summary for s in _TABLE if s.kind == "replay"}
NONFINITE: frozenset[str] = frozenset(s.id for s in _TABLE if s.nonfinite)
PRECURSORS: frozenset[str] = frozenset(s.id for s in _TABLE if s.precursor)


def lead_rank(signature: str) -> int:
    """The signature's rank among tied findings (lower leads); unknown ids rank last."""
    sig = SIGNATURES.get(signature)
    return sig.lead if sig is not None else 1000


def define_signature(id: str, summary: str) -> Signature:
    """Add a signature of your own (a notebook's detector) to the table; defining the same id again with the same
    summary is a no-op, with another summary an error. The built-in ids are the contract of docs/SIGNATURES.md."""
    from autopsy.errors import RegistrationError

    known = SIGNATURES.get(id)
    if known is not None:
        if known.summary != summary:
            raise RegistrationError(f"signature {id!r} is already defined as {known.summary!r}")
        return known
    sig = Signature(id, summary)
    SIGNATURES[id] = sig
    LOG_SIGNATURES[id] = summary
    return sig
