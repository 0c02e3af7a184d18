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


def train_lora(out: Path, *, max_steps: int, callbacks: list, **training_args: Any) -> Any:
    """A real HF Trainer run of LoRA adapters on a tiny Llama saved first as a local base (``out/base``), so that
    the adapter checkpoints name a base that replay can load."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    base_dir = out / "base"
    tinyllama.make_model(seed=0).save_pretrained(str(base_dir))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0))
    tok = tinyllama.make_tokenizer()
    enc = tok(tinyllama.structured_texts(256, seed=0), truncation=True, max_length=tinyllama.SEQ_LEN, padding="max_length")
    rows = [{"input_ids": i, "attention_mask": a, "labels": list(i)} for i, a in zip(enc["input_ids"], enc["attention_mask"])]
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1, save_strategy="steps",
        save_steps=10, save_only_model=False, report_to=[], seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, **training_args,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))
    with tinyllama.math_attention():
        trainer.train()
    trainer.save_state()
    return trainer


def zip_bomb(path: Path, inflated: int) -> Path:
    """A valid torch file (``torch.save`` of a zero tensor of ``inflated`` bytes) re-packed with every record deflated:
    a file of a few hundred KB that declares ``inflated`` bytes."""
    import zipfile

    import torch

    plain = path.with_suffix(".plain")
    torch.save({"state": torch.zeros(inflated, dtype=torch.uint8)}, str(plain))
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            with src.open(info) as fin, dst.open(info.filename, "w", force_zip64=True) as fout:
                while chunk := fin.read(1 << 22):
                    fout.write(chunk)
    plain.unlink()
    return path
