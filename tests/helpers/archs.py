"""Tiny models of eight architectures built from local configs (nothing downloaded), and the faults a test plants.

Each plant changes a real model and returns what localization must then say (module, phase, lead finding), derived
from the model it made, never from numbers seen on one machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

VOCAB = 128
ROWS, SEQ = 2, 16


def _configs() -> dict[str, tuple[Any, Any]]:
    import transformers as T

    dec = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return {
        "llama": (T.LlamaConfig(**dec, tie_word_embeddings=False), T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**dec, tie_word_embeddings=True), T.Qwen2ForCausalLM),
        "gemma2": (T.Gemma2Config(**dec, head_dim=8, final_logit_softcapping=None), T.Gemma2ForCausalLM),
        "gpt2": (T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
                              eos_token_id=3), T.GPT2LMHeadModel),
        "falcon": (T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  bos_token_id=2, eos_token_id=3), T.FalconForCausalLM),
        "mixtral": (T.MixtralConfig(**dec, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
                    T.MixtralForCausalLM),
        "t5": (T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0,
                          eos_token_id=3, decoder_start_token_id=0), T.T5ForConditionalGeneration),
        "bert": (T.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64, pad_token_id=0), T.BertForMaskedLM),
    }


ARCHS = ("llama", "qwen2", "gemma2", "gpt2", "falcon", "mixtral", "t5", "bert")


def make(arch: str, *, seed: int = 0) -> Any:
    """A freshly initialised tiny model of ``arch`` (float32, seeded)."""
    import torch

    torch.manual_seed(seed)
    cfg, cls = _configs()[arch]
    return cls(cfg)


def batch(*, seed: int = 0, masked: bool = False) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (ROWS, SEQ), generator=g)
    labels = torch.full_like(ids, -100) if masked else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def named(model: Any, module: Any) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _block0(model: Any) -> str:
    """The first block: the first child of the first ModuleList (decoder layers, encoder blocks)."""
    import torch

    return next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)) + ".0"


def _execution_order(model: Any, data: dict[str, Any]) -> list[tuple[str, Any]]:
    """Leaf modules in the order a forward pass calls them (first call each)."""
    import torch

    order: list[tuple[str, Any]] = []
    seen: set[int] = set()
    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in names if not any(True for _ in m.children())]

    def hook(mod, args, out):
        if id(mod) not in seen:
            seen.add(id(mod))
            order.append((names[mod], mod))

    hs = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(**data)
    finally:
        for h in hs:
            h.remove()
    return order


def target_linear(model: Any, data: dict[str, Any]) -> tuple[str, Any]:
    """The first module of the first block, in execution order, with a 2-D weight: the projection that reads the
    block's normalized input (q_proj, query_key_value, c_attn, query, q)."""
    prefix = _block0(model) + "."
    return next((n, m) for n, m in _execution_order(model, data)
                if n.startswith(prefix) and getattr(m, "weight", None) is not None and m.weight.dim() == 2)


@dataclass
class Expect:
    module: str
    phase: str
    lead: str
    finite_in_float32: bool | None = None


def plant_inf_weight(model: Any, data: dict[str, Any]) -> Expect:
    import torch

    name, mod = target_linear(model, data)
    with torch.no_grad():
        mod.weight.view(-1)[0] = math.inf
    return Expect(name, "forward", "nonfinite_origin")


def plant_fp16_overflow(model: Any, data: dict[str, Any]) -> Expect:
    """One output unit of the target made to reach 2x float16's max (65504) on one token under float16 autocast,
    while its weights (and inputs) stay inside float16's range; float32 weights, as in mixed-precision training."""
    import torch

    name, mod = target_linear(model, data)
    got: list = []
    h = mod.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(**data)
    h.remove()
    x = got[0]
    t = int(x.abs().sum(1).argmax())
    c = 2 * 65504.0 / float(x[t].abs().sum())
    assert c < 65504.0 / 2, "the planted weight would itself come near float16's max"
    w = mod.weight
    with torch.no_grad():
        if w.shape[1] == x.shape[1]:  # nn.Linear: (out, in)
            w[0, :] = c * torch.sign(x[t])
        else:  # GPT-2's Conv1D: (in, out)
            w[:, 0] = c * torch.sign(x[t])
    return Expect(name, "forward", "nonfinite_origin", finite_in_float32=True)


def plant_backward_fault(model: Any, data: dict[str, Any]) -> Expect:
    """The input embedding's backward breaks while its forward is finite: its output goes through
    ``out + 0 * sqrt(out - out)`` (forward: +0; backward: 0 * inf = NaN). With tied weights the embedding shares
    its weight with the LM head: the origin is still the embedding (the first module called that holds the input
    embedding's weight: T5's encoder.embed_tokens, not its 'shared' twin that the forward never calls)."""
    import torch

    weight = model.get_input_embeddings().weight
    name, emb = next((n, m) for n, m in _execution_order(model, data) if getattr(m, "weight", None) is weight)
    emb.register_forward_hook(lambda m, a, out: out + 0 * torch.sqrt(out - out))
    return Expect(name, "backward", "nonfinite_origin")


def plant_norm_overflow(model: Any, data: dict[str, Any]) -> Expect:
    """The last norm before the LM head scaled to 1e20: the LM head's input is ~1e20 and the gradients ~1e18-1e20,
    every element finite, their float32 sum of squares not; the logits (~1e19) and the loss stay finite.

    The module to name is the owner of the parameter with the largest gradient norm, computed here independently on a
    copy (each norm as max|g| * ||g / max|g|||, which cannot overflow); for a tied parameter, the owner whose use
    contributes most, measured by untying the copy."""
    import copy

    import torch

    head = model.get_output_embeddings()
    order = _execution_order(model, data)
    head_at = next(i for i, (_, m) in enumerate(order) if m is head)
    _, norm = next((n, m) for n, m in reversed(order[:head_at]) if "norm" in type(m).__name__.lower())
    with torch.no_grad():
        norm.weight.fill_(1e20)
    return Expect(_top_owner(copy.deepcopy(model), data), "backward", "grad_norm_overflow")


def _grad_norms(model: Any, data: dict[str, Any]) -> dict[str, float]:
    import torch

    model.zero_grad(set_to_none=True)
    model(**data).loss.backward()
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            top = float(p.grad.abs().max())
            out[n] = top * float(torch.linalg.vector_norm(p.grad / top)) if top > 0 else 0.0
    assert all(math.isfinite(v) for v in out.values())
    return out


def _top_owner(model: Any, data: dict[str, Any]) -> str:
    import torch

    top = max((norms := _grad_norms(model, data)), key=norms.__getitem__)
    param = dict(model.named_parameters())[top]
    owners = [(n, m) for n, m in model.named_modules() if any(p is param for p in m._parameters.values())]
    if len(owners) == 1:
        return owners[0][0]
    for _, m in owners:  # untie: each owner gets its own copy, so each use's gradient lands in its own parameter
        m.weight = torch.nn.Parameter(param.detach().clone())
    norms = _grad_norms(model, data)
    return max((n for n, _ in owners), key=lambda n: norms.get(f"{n}.weight", -1.0))


def plant_masked_labels(model: Any, data: dict[str, Any]) -> Expect:
    data["labels"] = data["labels"].new_full(data["labels"].shape, -100)
    return Expect("", "forward", "bad_batch")


PLANTS = {
    "inf_weight": plant_inf_weight,
    "fp16_overflow": plant_fp16_overflow,
    "backward_fault": plant_backward_fault,
    "norm_overflow": plant_norm_overflow,
    "masked_labels": plant_masked_labels,
}
