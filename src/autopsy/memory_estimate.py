"""Back-of-envelope GPU memory of a transformer training step, for an out-of-memory crash.

Terms (GiB): weights, gradients and optimizer states of the trainable parameters (all of them, or only the
adapters with LoRA), and activations with and without gradient checkpointing. Activations follow Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): per layer about ``34 * s * b * h``
bytes in 16-bit, plus ``5 * a * s^2 * b`` for the attention scores when attention is not fused (flash/SDPA
kernels keep no score matrix, so the estimate leaves that term out and says so). With checkpointing only each
layer's input (``2 * s * b * h`` bytes) is kept, plus one layer's activations during recomputation. The logits
(``b * s * V`` in 16-bit plus a float32 copy for the loss) are counted apart: with large vocabularies they often
are the peak. The numbers are estimates (within ~30%): they say which knob buys the most headroom, not the byte.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["estimate_from_config", "estimate_training_memory", "model_config", "param_counts", "seq_len_of"]

GIB = float(1 << 30)


def _params(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    vocab_size: int,
    intermediate_size: int | None,
    num_attention_heads: int | None,
    num_key_value_heads: int | None,
    tie_word_embeddings: bool,
) -> int:
    h = hidden_size
    inter = intermediate_size or 4 * h
    kv = h
    if num_attention_heads and num_key_value_heads:
        kv = h * num_key_value_heads // num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q,o + k,v + gated MLP + norms
    embed = vocab_size * h * (1 if tie_word_embeddings else 2)
    return num_hidden_layers * per_layer + embed + h


def _activations(hidden: int, layers: int, vocab: int, b: int, s: int, ckpt: bool) -> float:
    """GiB of activations of a batch of ``b`` sequences of ``s`` tokens (with checkpointing: each layer's input, one
    layer's activations while it is recomputed), plus the logits (16-bit and a float32 copy for the loss)."""
    layer = 34.0 * s * b * hidden
    logits = b * s * vocab * (2.0 + 4.0)
    if ckpt:
        return (layers * 2.0 * s * b * hidden + layer + logits) / GIB
    return (layers * layer + logits) / GIB


def _knobs(
    acts: Callable[[int, int, bool], float],
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    adapters: bool,
    weight_bytes: float,
    *,
    p_total: int,
    p_train: int,
    grads: float,
    optim: float,
    weights: float,
) -> dict[str, float]:
    """GiB each knob would save."""
    act = acts(batch_size, seq_len, gradient_checkpointing)
    knobs: dict[str, float] = {}
    if batch_size > 1:
        knobs["halve per-device batch size (double gradient_accumulation_steps)"] = act - acts(
            max(batch_size // 2, 1), seq_len, gradient_checkpointing
        )
    if seq_len > 1:
        knobs["halve the sequence length"] = act - acts(batch_size, max(seq_len // 2, 1), gradient_checkpointing)
    if not gradient_checkpointing:
        knobs["gradient_checkpointing=True"] = act - acts(batch_size, seq_len, True)
    if not adapters:
        knobs["LoRA adapters instead of full fine-tuning"] = grads + optim - (p_total * 0.01) * (4 + 12) / GIB
        knobs["8-bit optimizer (bitsandbytes AdamW8bit)"] = optim - p_train * 6.0 / GIB
    if weight_bytes > 0.5:
        knobs["4-bit base weights (QLoRA)"] = weights - p_total * 0.5 / GIB
    return knobs


def estimate_training_memory(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    tie_word_embeddings: bool = False,
    total_params: int | None = None,
    trainable_params: int | None = None,
    weight_bytes: float = 2.0,
    optimizer_bytes_per_param: float = 12.0,
    gradient_checkpointing: bool = False,
    gpu_total_gib: float | None = None,
) -> dict[str, Any]:
    """Estimate the memory of one training step, and what each knob would save.

    ``weight_bytes``: 2 for bf16/fp16 weights, 4 for float32, 0.5 for 4-bit (QLoRA).
    ``optimizer_bytes_per_param``: AdamW keeps a float32 master copy + two moments (12 bytes); 8-bit Adam ~6.
    ``trainable_params``: the adapters' parameters with LoRA (default: every parameter trains).
    """
    p_total = int(
        total_params
        or _params(
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            vocab_size=vocab_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            tie_word_embeddings=tie_word_embeddings,
        )
    )
    p_train = int(trainable_params if trainable_params is not None else p_total)
    adapters = trainable_params is not None and trainable_params < p_total
    weights = p_total * weight_bytes / GIB
    adapter_w = p_train * 2.0 / GIB if adapters else 0.0
    grads = p_train * (2.0 if not adapters else 4.0) / GIB
    optim = p_train * optimizer_bytes_per_param / GIB

    acts = functools.partial(_activations, hidden_size, num_hidden_layers, vocab_size)
    static = weights + adapter_w + grads + optim
    act = acts(batch_size, seq_len, gradient_checkpointing)
    total = static + act
    knobs = _knobs(
        acts,
        batch_size,
        seq_len,
        gradient_checkpointing,
        adapters,
        weight_bytes,
        p_total=p_total,
        p_train=p_train,
        grads=grads,
        optim=optim,
        weights=weights,
    )
    best = max(knobs, key=knobs.get) if knobs else None  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "params": p_total,
        "trainable_params": p_train,
        "weights_gib": round(weights, 2),
        "adapters_gib": round(adapter_w, 2),
        "gradients_gib": round(grads, 2),
        "optimizer_gib": round(optim, 2),
        "activations_gib": round(acts(batch_size, seq_len, False), 2),
        "activations_checkpointed_gib": round(acts(batch_size, seq_len, True), 2),
        "total_gib": round(total, 2),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "savings_gib": {k: round(v, 2) for k, v in sorted(knobs.items(), key=lambda kv: -kv[1])},
        "best_knob": best,
        "assumes": "fused attention (no score matrix), AdamW, 16-bit activations",
        **({"gpu_total_gib": gpu_total_gib} if gpu_total_gib else {}),
    }
    return out


_SEQ_KEYS = ("max_seq_length", "max_length", "cutoff_len", "sequence_len", "seq_length", "model_max_length")
# PEFT's default LoRA targets for Llama-style models when the adapter config names none
_DEFAULT_TARGETS = ("q_proj", "v_proj")
_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The model's sizes: ``config["model"]`` (config.json beside the run), else the config itself when the sizes
    sit at its top level (HF's W&B callback logs the model config and the arguments as one flat dict)."""
    need = ("hidden_size", "num_hidden_layers", "vocab_size")
    for cand in (config.get("model"), config):
        if isinstance(cand, dict) and all(isinstance(cand.get(k), int) and cand[k] > 0 for k in need):
            return cand
    return None


def seq_len_of(config: dict[str, Any]) -> int | None:
    """The training sequence length the config names (HF's generation default ``max_length=20`` is not one)."""
    for key in _SEQ_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and not (key == "max_length" and v == 20):
            return v
    return None


def _adapter(config: dict[str, Any]) -> dict[str, Any] | None:
    """The LoRA adapter's settings: adapter_config.json, HF's ``peft_config`` ({name: settings}) or flat ``lora_r``."""
    adapter = config.get("adapter")
    if isinstance(adapter, dict) and adapter.get("r"):
        return adapter
    peft = config.get("peft_config")
    if isinstance(peft, dict):
        inner = peft if peft.get("r") else next((v for v in peft.values() if isinstance(v, dict) and v.get("r")), None)
        if inner:
            return inner
    r = config.get("lora_r") or config.get("lora_rank")
    if isinstance(r, int) and r > 0:
        return {"r": r, "target_modules": config.get("lora_target_modules")}
    return None


def _lora_params(model: dict[str, Any], adapter: dict[str, Any]) -> int:
    """r x (in + out) for every targeted matrix of every layer (q/o: h->h, k/v: h->kv, MLP: h<->intermediate)."""
    h = int(model["hidden_size"])
    inter = int(model.get("intermediate_size") or 4 * h)
    kv = h
    if model.get("num_attention_heads") and model.get("num_key_value_heads"):
        kv = h * int(model["num_key_value_heads"]) // int(model["num_attention_heads"])
    dims = {"q_proj": 2 * h, "o_proj": 2 * h, "k_proj": h + kv, "v_proj": h + kv}
    dims.update({"gate_proj": h + inter, "up_proj": h + inter, "down_proj": h + inter})
    targets = adapter.get("target_modules") or _DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = _ALL_LINEAR if targets in ("all-linear", "all_linear") else (targets,)
    per_layer = sum(dims.get(str(t).rsplit(".", 1)[-1], 2 * h) for t in targets)
    return int(adapter["r"]) * per_layer * int(model["num_hidden_layers"])


def _shape(model: dict[str, Any]) -> dict[str, Any]:
    """The sizes of a model config that :func:`_params` and :func:`estimate_training_memory` take."""
    return {
        "hidden_size": model["hidden_size"],
        "num_hidden_layers": model["num_hidden_layers"],
        "vocab_size": model["vocab_size"],
        "intermediate_size": model.get("intermediate_size"),
        "num_attention_heads": model.get("num_attention_heads"),
        "num_key_value_heads": model.get("num_key_value_heads"),
        "tie_word_embeddings": bool(model.get("tie_word_embeddings", False)),
    }


def param_counts(config: dict[str, Any]) -> dict[str, Any] | None:
    """``params``, ``trainable``, ``embedding`` (the input lookup), ``layers``, ``hidden``, ``lora`` from the config:
    printed counts (PEFT's ``trainable params: X || all params: Y``) first, else the model's sizes and the adapter's
    rank and targets. None when neither is known."""
    model = model_config(config)
    adapter = _adapter(config)
    total = config.get("total_params") if isinstance(config.get("total_params"), int) else None
    trainable = config.get("trainable_params") if isinstance(config.get("trainable_params"), int) else None
    if total is None:
        if model is None:
            return None
        total = _params(**_shape(model))
    if trainable is None:
        trainable = _lora_params(model, adapter) if (adapter and model is not None) else total
    out: dict[str, Any] = {"params": int(total), "trainable": int(trainable), "lora": int(trainable) < int(total)}
    if model is not None:
        tied = bool(model.get("tie_word_embeddings", False))
        # an untied input embedding is a lookup; a tied one is also the output head's matmul
        out.update(
            embedding=0 if tied else int(model["vocab_size"]) * int(model["hidden_size"]),
            layers=int(model["num_hidden_layers"]),
            hidden=int(model["hidden_size"]),
        )
    return out


def estimate_from_config(config: dict[str, Any], *, gpu_total_gib: float | None = None) -> dict[str, Any] | None:
    """The estimate from a run's config (the model's sizes, batch size, sequence length); None when unknown."""
    model = model_config(config)
    batch = config.get("per_device_train_batch_size")
    seq = seq_len_of(config)
    if model is None or not isinstance(batch, int) or seq is None:
        return None
    dtype = str(model.get("torch_dtype") or model.get("dtype") or "")
    wb = 4.0 if "float32" in dtype and not (config.get("bf16") or config.get("fp16")) else 2.0
    counts = param_counts(config) or {}
    trainable = counts.get("trainable") if counts.get("lora") else None
    return estimate_training_memory(
        **_shape(model),
        total_params=config.get("total_params") if isinstance(config.get("total_params"), int) else None,
        trainable_params=trainable,
        weight_bytes=wb,
        batch_size=batch,
        seq_len=int(seq),
        gradient_checkpointing=bool(config.get("gradient_checkpointing")),
        gpu_total_gib=gpu_total_gib,
    )
