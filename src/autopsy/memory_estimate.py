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

from typing import Any

__all__ = ["estimate_training_memory", "estimate_from_config"]

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

    def acts(b: int, s: int, ckpt: bool) -> float:
        layer = 34.0 * s * b * hidden_size
        logits = b * s * vocab_size * (2.0 + 4.0)
        if ckpt:
            return (num_hidden_layers * 2.0 * s * b * hidden_size + layer + logits) / GIB
        return (num_hidden_layers * layer + logits) / GIB

    static = weights + adapter_w + grads + optim
    act = acts(batch_size, seq_len, gradient_checkpointing)
    total = static + act
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
    }
    if gpu_total_gib:
        out["gpu_total_gib"] = gpu_total_gib
    return out


def estimate_from_config(config: dict[str, Any], *, gpu_total_gib: float | None = None) -> dict[str, Any] | None:
    """The estimate from a run's config (``config["model"]`` sizes, batch size, sequence length); None when unknown."""
    model = config.get("model") or {}
    need = ("hidden_size", "num_hidden_layers", "vocab_size")
    if not all(isinstance(model.get(k), int) for k in need):
        return None
    batch = config.get("per_device_train_batch_size")
    seq = next(
        (
            config[k]
            for k in ("max_seq_length", "max_length", "cutoff_len", "sequence_len", "seq_length", "model_max_length")
            if isinstance(config.get(k), int) and config[k] > 0
        ),
        None,
    )
    if not isinstance(batch, int) or seq is None:
        return None
    dtype = str(model.get("torch_dtype") or model.get("dtype") or "")
    wb = 4.0 if "float32" in dtype and not (config.get("bf16") or config.get("fp16")) else 2.0
    adapter = config.get("adapter") or {}
    trainable = config.get("trainable_params") if isinstance(config.get("trainable_params"), int) else None
    if trainable is None and adapter.get("r"):
        # LoRA on the attention projections: r * (in + out) per targeted matrix, 4 per layer by default
        n_targets = len(adapter.get("target_modules") or [None] * 4)
        trainable = int(adapter["r"]) * 2 * model["hidden_size"] * n_targets * model["num_hidden_layers"]
    return estimate_training_memory(
        hidden_size=model["hidden_size"],
        num_hidden_layers=model["num_hidden_layers"],
        vocab_size=model["vocab_size"],
        intermediate_size=model.get("intermediate_size"),
        num_attention_heads=model.get("num_attention_heads"),
        num_key_value_heads=model.get("num_key_value_heads"),
        tie_word_embeddings=bool(model.get("tie_word_embeddings", False)),
        total_params=config.get("total_params") if isinstance(config.get("total_params"), int) else None,
        trainable_params=trainable,
        weight_bytes=wb,
        batch_size=batch,
        seq_len=int(seq),
        gradient_checkpointing=bool(config.get("gradient_checkpointing")),
        gpu_total_gib=gpu_total_gib,
    )
