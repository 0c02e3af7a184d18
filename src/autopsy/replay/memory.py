"""Where a replay's model goes, decided before anything is loaded: the memory it needs against what the machine has.

The need is counted from the checkpoint's safetensors headers (parameter counts, no weights read) and
:func:`autopsy.memory_estimate.estimate_training_memory` (activations, with and without gradient checkpointing) for the
recorded batch: weights in the replay's dtype (4-bit/8-bit for a quantized base), the gradients of what trains (the
adapters only for LoRA), the activations, and for step replay the optimizer's two moments. What the machine has is the
free GPU memory (``torch.cuda.mem_get_info``) and the available RAM (``/proc/meminfo``).

``--device auto`` (the default) puts the model on the GPU when it fits there (with gradient checkpointing when only
that makes it fit), else spreads it over the GPU and the RAM (``device_map``, accelerate), else the CPU; when nothing
can hold it, a one-line error says how much is needed and what there is, before loading a byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.checkpoints import safetensors_header
from autopsy.errors import InputError, UsageError

__all__ = ["Placement", "available_memory", "count_params", "plan_placement"]

GIB = float(1 << 30)
_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float64": 8.0}
_HEADROOM = 0.85  # leave room for the allocator, the kernels' workspaces and the rest of the process


def count_params(model_dir: str | os.PathLike[str]) -> int | None:
    """The number of elements in a checkpoint's safetensors files (None when it has none)."""
    total, found = 0, False
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            header, _ = safetensors_header(f)
        except Exception:
            continue
        found = True
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict):
                n = 1
                for d in v.get("shape", []):
                    n *= int(d)
                total += n
    return total if found else None


def available_memory() -> tuple[list[float], float]:
    """(free GiB of each CUDA device, available RAM GiB)."""
    gpus: list[float] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.mem_get_info(i)[0] / GIB for i in range(torch.cuda.device_count())]
    except Exception:
        gpus = []
    ram = 0.0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024 / GIB
                    break
    except OSError:
        pass
    if not ram and hasattr(os, "sysconf"):
        try:
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
        except (ValueError, OSError):
            ram = 0.0
    return gpus, ram


@dataclass
class Placement:
    """Where the model goes and how it runs."""

    device: str  # "cpu", "cuda", "cuda:N", or "auto" (device_map over GPU and RAM)
    gradient_checkpointing: bool = False
    max_memory: dict[Any, str] | None = None  # for device_map="auto"
    need_gib: dict[str, float] = field(default_factory=dict)
    have_gib: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "gradient_checkpointing": self.gradient_checkpointing}
        if self.need_gib:
            out["need_gib"] = {k: round(v, 3) for k, v in self.need_gib.items()}
            out["have_gib"] = self.have_gib
        return out


def _need(
    cfg: dict[str, Any], params: int, trainable: int | None, shape: tuple[int, int], wbytes: float, optimizer: bool
) -> dict[str, float]:
    from autopsy.memory_estimate import estimate_training_memory

    text = cfg.get("text_config") or cfg
    hidden = text.get("hidden_size") or text.get("d_model") or text.get("n_embd")
    layers = text.get("num_hidden_layers") or text.get("num_layers") or text.get("n_layer")
    vocab = text.get("vocab_size")
    train = trainable if trainable is not None else params
    gbytes = 4.0 if trainable is not None else max(wbytes, 2.0)
    out = {
        "weights": params * wbytes / GIB,
        "gradients": train * gbytes / GIB,
        "optimizer": 8.0 * train / GIB if optimizer else 0.0,
    }
    if isinstance(hidden, int) and isinstance(layers, int) and isinstance(vocab, int):
        est = estimate_training_memory(
            hidden_size=hidden,
            num_hidden_layers=layers,
            vocab_size=vocab,
            batch_size=max(shape[0], 1),
            seq_len=max(shape[1], 1),
            total_params=params,
            weight_bytes=wbytes,
        )
        out["activations"] = float(est["activations_gib"])
        out["activations_checkpointed"] = float(est["activations_checkpointed_gib"])
    else:
        out["activations"] = out["activations_checkpointed"] = 0.0
    return out


def plan_placement(
    model_dir: str | os.PathLike[str],
    cfg: dict[str, Any],
    *,
    requested: str | None,
    batch_shape: tuple[int, int],
    weights_dtype: str | None,
    quant_bits: int | None = None,
    adapter_dir: str | os.PathLike[str] | None = None,
    optimizer: bool = False,
    available: tuple[list[float], float] | None = None,
) -> Placement:
    """Decide where the model goes (see the module doc); ``available`` overrides the machine's (GPU GiB list, RAM)."""
    params = count_params(model_dir)
    if params is None:
        return Placement(device=_plain(requested))
    wbytes = 0.5 if quant_bits == 4 else 1.0 if quant_bits == 8 else _BYTES.get(weights_dtype or "float32", 4.0)
    trainable = count_params(adapter_dir) if adapter_dir is not None else None
    need = _need(cfg, params, trainable, batch_shape, wbytes, optimizer)
    static = need["weights"] + need["gradients"] + need["optimizer"]
    full, ckpt = static + need["activations"], static + need["activations_checkpointed"]
    gpus, ram = available if available is not None else available_memory()
    if quant_bits and not gpus:
        raise UsageError(
            f"the run loaded the base in {quant_bits}-bit (bitsandbytes), which needs a CUDA GPU and there is none here: "
            "replay on a GPU machine, or pass --dtype bfloat16 to replay the base unquantized (its numerics differ)"
        )
    have = {"gpu_free": round(gpus[0], 2) if gpus else 0.0, "ram_available": round(ram, 2)}
    want = (requested or "auto").lower()
    place = _decide(want, gpus, ram, full, ckpt, quant_bits)
    if place is None:
        where = f"{have['gpu_free']:.1f} GiB free on the GPU and " if gpus else "no GPU and "
        raise InputError(
            f"this replay needs about {ckpt:.1f} GiB (weights {need['weights']:.1f}, gradients {need['gradients']:.1f}, "
            f"activations {need['activations_checkpointed']:.1f} with gradient checkpointing"
            + (f", optimizer {need['optimizer']:.1f}" if optimizer else "")
            + f"); this machine has {where}{ram:.1f} GiB of RAM available: replay on a machine with more memory"
            + (" or pass --device auto" if want not in ("auto",) and gpus else "")
            + (" (a QLoRA run's 4-bit base needs a CUDA GPU)" if quant_bits else "")
        )
    place.need_gib, place.have_gib = need, have
    return place


def _plain(requested: str | None) -> str:
    want = (requested or "auto").lower()
    if want != "auto":
        return want
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _decide(
    want: str, gpus: list[float], ram: float, full: float, ckpt: float, quant_bits: int | None
) -> Placement | None:
    gpu = gpus[0] * _HEADROOM if gpus else 0.0
    host = ram * _HEADROOM
    if want.startswith("cuda") or (want == "auto" and gpus):
        if not gpus:
            raise UsageError(f"--device {want} was asked but no CUDA device is available here; use --device cpu")
        if full <= gpu:
            return Placement(device=want if want != "auto" else "cuda")
        if ckpt <= gpu:
            return Placement(device=want if want != "auto" else "cuda", gradient_checkpointing=True)
        if want == "auto" and ckpt <= gpu + host:
            mem = {0: f"{int(gpu * 1024)}MiB", "cpu": f"{int(host * 1024)}MiB"}
            return Placement(device="auto", gradient_checkpointing=True, max_memory=mem)
        return None
    if quant_bits:
        return None  # bitsandbytes' 4/8-bit layers run on CUDA only
    if full <= host:
        return Placement(device=want if want != "auto" else "cpu")
    if ckpt <= host:
        return Placement(device=want if want != "auto" else "cpu", gradient_checkpointing=True)
    return None
