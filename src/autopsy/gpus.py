"""GPUs: the peak bf16/fp16 tensor throughput of common cards, naming a card from what a run recorded, and the MFU
arithmetic.

**Peaks** are the dense (no 2:4 sparsity) bf16 tensor-core numbers of NVIDIA's datasheets and architecture
whitepapers, fp16 where the card has no bf16 (T4, V100). GeForce cards are quoted with fp32 accumulation (what
PyTorch's matmuls use): half their fp16-accumulate number.

**Naming a card**: a name W&B or ``nvidia-smi`` recorded is matched to the table (:func:`gpu_spec`). Where only
telemetry survives (W&B ``stats`` records carry memory, the power limit and clocks, not the name),
:func:`infer_gpu` names the card when exactly one entry has that memory size and that power limit; the caller
says that the name was inferred.

**MFU** (model FLOPs utilisation, Chowdhery et al. 2022, PaLM appendix B): training FLOPs per token over the
cards' peak. Per token, every weight matrix costs 2 FLOPs per parameter in the forward pass, 2 more in the
backward pass for the activation gradients (needed through every layer, frozen or not, to reach the adapters
below), and 2 more for its own weight gradient only when it trains. So a full fine-tune costs the usual 6N, a
LoRA run 4N for the frozen base plus 6 per adapter parameter (the base's weight-gradient third is skipped;
counting the base as forward-only, 2N, would undercount the backward pass that still runs through it). The input
embedding is a lookup, not a matmul: its parameters are left out. Attention's score and value products add
``12 x layers x hidden x seq_len`` per token (forward and backward). Gradient checkpointing's recomputation is
hardware work, not model work: MFU leaves it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["GPUS", "GpuSpec", "Mfu", "flops_per_token", "gpu_spec", "infer_gpu", "mfu", "parse_nvidia_smi"]


@dataclass(frozen=True)
class GpuSpec:
    """One card: its dense bf16 (fp16 where no bf16) tensor peak, memory as the driver reports it, default power
    limit and maximum SM clock (the last three name a card from telemetry)."""

    name: str
    peak_tflops: float
    dtype: str
    memory_gib: float
    power_w: float
    sm_mhz: float


# name pattern (searched in the recorded name, case-insensitive) -> spec; the first match wins, so variants first
_TABLE: tuple[tuple[str, GpuSpec], ...] = (
    (r"H200", GpuSpec("H200", 989.0, "bf16", 140.4, 700, 1980)),
    (r"H100.*NVL", GpuSpec("H100 NVL", 835.0, "bf16", 93.6, 400, 1785)),
    (r"H100.*PCIE", GpuSpec("H100 PCIe", 756.0, "bf16", 79.6, 350, 1755)),
    (r"H100", GpuSpec("H100 SXM", 989.0, "bf16", 79.6, 700, 1980)),
    (r"A100.*PCIE.*40|A100.*40.*PCIE", GpuSpec("A100 PCIe 40GB", 312.0, "bf16", 40.0, 250, 1410)),
    (r"A100.*PCIE", GpuSpec("A100 PCIe 80GB", 312.0, "bf16", 80.0, 300, 1410)),
    (r"A100.*40", GpuSpec("A100 SXM4 40GB", 312.0, "bf16", 40.0, 400, 1410)),
    (r"A100", GpuSpec("A100 SXM4 80GB", 312.0, "bf16", 80.0, 400, 1410)),
    (r"\bL4\b", GpuSpec("L4", 121.0, "bf16", 22.5, 72, 2040)),
    # AWS publishes no tensor peak for the A10G; the A10 datasheet's dense bf16 number is the usual stand-in
    (r"A10G", GpuSpec("A10G", 125.0, "bf16", 22.5, 300, 1710)),
    (r"\bA10\b", GpuSpec("A10", 125.0, "bf16", 22.5, 150, 1695)),
    (r"\bT4\b", GpuSpec("T4", 65.0, "fp16", 15.0, 70, 1590)),
    (r"V100.*PCIE", GpuSpec("V100 PCIe", 112.0, "fp16", 16.0, 250, 1380)),
    (r"V100.*32", GpuSpec("V100 SXM2 32GB", 125.0, "fp16", 32.0, 300, 1530)),
    (r"V100", GpuSpec("V100 SXM2 16GB", 125.0, "fp16", 16.0, 300, 1530)),
    (r"4090", GpuSpec("RTX 4090", 165.2, "bf16", 24.0, 450, 2520)),
    (r"3090", GpuSpec("RTX 3090", 71.0, "bf16", 24.0, 350, 1695)),
)
GPUS: dict[str, GpuSpec] = {spec.name: spec for _, spec in _TABLE}
# the driver reports a little less than the nominal size (an 80 GB H100 shows 79.6 GiB): a few percent apart
_MEMORY_TOLERANCE = 0.03
# power limits are set per board; an admin may lower them, so only a close match names a card
_POWER_TOLERANCE = 0.05


def gpu_spec(name: str | None) -> GpuSpec | None:
    """The table's entry for a recorded card name (``NVIDIA A100-SXM4-80GB``, ``Tesla T4``), or None."""
    if not name:
        return None
    for pattern, spec in _TABLE:
        if re.search(pattern, str(name), re.IGNORECASE):
            return spec
    return None


def infer_gpu(memory_gib: float | None, power_w: float | None = None) -> GpuSpec | None:
    """The one card with this memory size (and, when known, this power limit), or None when none or several fit."""
    if not memory_gib or memory_gib <= 0:
        return None
    fits = [
        spec
        for spec in GPUS.values()
        if abs(spec.memory_gib - memory_gib) <= _MEMORY_TOLERANCE * spec.memory_gib
        and (not power_w or abs(spec.power_w - power_w) <= _POWER_TOLERANCE * spec.power_w)
    ]
    return fits[0] if len(fits) == 1 else None


_SMI_ROW = re.compile(r"\|\s*(?P<i>\d+)\s+(?P<name>[A-Za-z][\w .\-]*?)\s+(?:On|Off)\s*\|")
_SMI_MEM = re.compile(r"(?P<used>\d+)MiB\s*/\s*(?P<total>\d+)MiB")
_SMI_LIST = re.compile(r"^GPU (?P<i>\d+): (?P<name>[^(\n]+?) \(UUID", re.M)


def parse_nvidia_smi(text: str) -> dict[str, Any]:
    """``gpu_name``, ``gpu_count`` and ``gpu_memory_gib`` from ``nvidia-smi`` (its table) or ``nvidia-smi -L`` output
    in a log; empty when the text has neither."""
    names = {int(m.group("i")): m.group("name").strip() for m in _SMI_ROW.finditer(text)}
    names.update({int(m.group("i")): m.group("name").strip() for m in _SMI_LIST.finditer(text)})
    if not names:
        return {}
    out: dict[str, Any] = {"gpu_name": names[min(names)], "gpu_count": len(names)}
    totals = [int(m.group("total")) for m in _SMI_MEM.finditer(text)]
    if totals:
        out["gpu_memory_gib"] = round(max(totals) / 1024, 2)
    return out


def _sig(x: float) -> float:
    """Six significant digits: evidence a reader re-checks, not float noise."""
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class Mfu:
    """An MFU estimate and every number that went into it."""

    mfu: float  # a fraction of the peak
    tokens_per_second: float
    flops_per_token: float
    achieved_tflops: float
    peak_tflops: float  # all cards together
    gpus: int
    formula: str

    def evidence(self) -> dict[str, Any]:
        return {
            "mfu": _sig(self.mfu),
            "tokens_per_second": _sig(self.tokens_per_second),
            "flops_per_token": _sig(self.flops_per_token),
            "achieved_tflops": _sig(self.achieved_tflops),
            "peak_tflops": _sig(self.peak_tflops),
            "gpus": self.gpus,
            "formula": self.formula,
        }


def flops_per_token(
    *,
    params: int,
    trainable: int,
    embedding_params: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    seq_len: int | None = None,
) -> tuple[float, str]:
    """Training FLOPs per token and the formula with its numbers (see the module doc).

    ``params``: every parameter; ``trainable``: those that train (all of them for a full fine-tune, the adapters'
    under LoRA); ``embedding_params``: the input embedding (a lookup: left out); ``layers``, ``hidden``,
    ``seq_len``: for the attention term, left out when one is unknown.
    """
    matmul = max(params - embedding_params, 0)
    full = trainable >= params
    train_mm = matmul if full else trainable
    flops = 4.0 * matmul + 2.0 * train_mm
    text = f"4 x {matmul:.4g} (forward + activation grads) + 2 x {train_mm:.4g} (weight grads of trained params)"
    if layers and hidden and seq_len:
        attn = 12.0 * layers * hidden * seq_len
        flops += attn
        text += f" + 12 x {layers} x {hidden} x {seq_len} (attention)"
    return flops, text


def mfu(tokens_per_second: float, flops_token: float, spec: GpuSpec, *, gpus: int = 1, formula: str = "") -> Mfu:
    """Achieved FLOPs (tokens/s of all cards x FLOPs per token) over the peak of ``gpus`` cards of ``spec``."""
    achieved = tokens_per_second * flops_token
    peak = spec.peak_tflops * 1e12 * max(gpus, 1)
    text = (
        f"{tokens_per_second:.4g} tokens/s x ({formula or f'{flops_token:.4g}'}) = {achieved / 1e12:.4g} TFLOPS; "
        f"/ ({max(gpus, 1)} x {spec.peak_tflops:g} TFLOPS {spec.dtype} peak of {spec.name})"
    )
    return Mfu(
        mfu=achieved / peak,
        tokens_per_second=tokens_per_second,
        flops_per_token=flops_token,
        achieved_tflops=achieved / 1e12,
        peak_tflops=peak / 1e12,
        gpus=max(gpus, 1),
        formula=text,
    )
