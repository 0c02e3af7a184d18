"""The signature ids (the contract of ``../shared/SIGNATURES.md``): new ones may be added, none renamed."""

from __future__ import annotations

__all__ = ["LOG_SIGNATURES", "REPLAY_SIGNATURES", "SIGNATURES"]

LOG_SIGNATURES: dict[str, str] = {
    "nan_loss": "the loss is NaN/Inf at some step",
    "nan_grad_norm": "the gradient norm is NaN/Inf: the update poisoned the weights",
    "loss_zero_collapse": "the loss drops to exactly 0.0 and stays",
    "loss_spike": "a short excursion far above the recent level, which recovers",
    "divergence": "the loss rises and does not come back (no NaN)",
    "exploding_gradients": "the grad norm jumps or climbs far above its post-warmup baseline",
    "vanishing_gradients": "the grad norm sits near zero while the loss is not converged",
    "clip_saturation": "pre-clip grad norm above max_grad_norm on most post-warmup steps",
    "overfitting": "eval loss rises from its minimum while train loss keeps falling",
    "eval_flat": "train loss falls, eval loss does not move",
    "plateau": "the loss barely moves from its start (or sits at a chance level)",
    "oscillation": "a sustained sawtooth after warmup, well above the noise",
    "loss_scale_collapse": "the fp16 loss scale keeps halving",
    "crash": "the log ends in a traceback or kill",
    "abrupt_end": "the run stops short of its planned steps with no final record",
    "epoch_boundary_drop": "the train loss steps down at each epoch start: memorization",
    "throughput_drop": "tokens/s halves",
    "memory_growth": "memory climbs step over step",
    "sparse_eval": "too few eval points to see overfitting in time",
    "config_risk": "a setting that makes a failure likely or hides one",
    "insufficient_data": "too few points to judge",
    "source_damaged": "a file was truncated, corrupt or unreadable",
}

REPLAY_SIGNATURES: dict[str, str] = {
    "weights_nonfinite": "the checkpoint itself holds NaN/Inf weights",
    "nonfinite_origin": "the first module whose output or gradient is non-finite while its inputs were finite",
    "bad_batch": "the batch itself is broken",
    "replay_not_reproduced": "the batch runs clean from this checkpoint",
}

SIGNATURES: dict[str, str] = {**LOG_SIGNATURES, **REPLAY_SIGNATURES}
