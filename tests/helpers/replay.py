"""Replay fixtures made at test time: tiny Llama checkpoints (save_pretrained, safetensors) and batch files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tinyllama


def make_batch(path: Path, *, rows: int = 2, seq: int = 16, seed: int = 0, **override: Any) -> Path:
    """A real batch from the fixture tokenizer, written as a plain safetensors batch file."""
    from safetensors.torch import save_file

    tok = tinyllama.make_tokenizer()
    enc = tok(tinyllama.structured_texts(rows, seed=seed), truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"].clone()}
    batch.update(override)
    save_file({k: v.contiguous() for k, v in batch.items()}, str(path))
    return path


def make_checkpoint(out: Path, *, plant: str | None = None, value: float = float("inf"), dtype: Any = None,
                    scale: dict[str, float] | None = None, layers: int = 2) -> Path:
    """Save a tiny Llama with ``save_pretrained``; optionally write ``value`` into tensor ``plant`` or scale tensors."""
    import torch

    model = tinyllama.make_model(seed=0, layers=layers)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, factor in (scale or {}).items():
            params[name].mul_(factor)
        if plant:
            params[plant].view(-1)[0] = value
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    return out


def make_lora(out: Path, base_dir: Path, *, nan_in: str | None = None) -> Path:
    """A LoRA adapter on the local base ``base_dir``; ``nan_in`` names a lora_B module that gets one NaN."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if nan_in:
        with torch.no_grad():
            dict(model.named_modules())[nan_in].weight.view(-1)[0] = float("nan")
    model.save_pretrained(str(out))
    return out
