"""How the run computed, so that replay computes the same way: weights dtype, autocast, attention kernel, quantization.

Read without torch, most trusted first:

1. ``<run>/autopsy/run.json``, written by :class:`autopsy.callbacks.AutopsyCallback` at train begin: the weights'
   dtype, the autocast dtype (``fp16``/``bf16``), the attention implementation, the SDPA kernels that were enabled,
   and the bitsandbytes config of a quantized base;
2. ``training_args.bin`` of the checkpoint or the run (``fp16``/``bf16``: mixed precision, i.e. autocast over the
   weights), read by :func:`autopsy.importers.training_args.read_training_args` (never unpickled);
3. the checkpoint's ``config.json`` (``dtype``/``torch_dtype``) or the dtype of most of its weights.

``--dtype`` overrides: ``float32`` replays in full precision (weights upcast, no autocast); ``float16``/``bfloat16``
autocasts float32 weights to it (or casts half weights to it). Every pass runs in the chosen precision; the float32
re-run of the culprit (``finite_in_float32``) stays the differential.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopsy.errors import UsageError
from autopsy.recording import read_run_meta

__all__ = ["DTYPES", "Precision", "run_precision", "sdpa_context"]

DTYPES = ("float32", "float16", "bfloat16")
_HALF = ("float16", "bfloat16")
_SDPA = {"flash": "FLASH_ATTENTION", "mem_efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}


@dataclass
class Precision:
    """The precision a replay runs in (dtype names, so that this module needs no torch)."""

    weights: str | None = None  # load the weights in this dtype (None: as saved)
    autocast: str | None = None  # run every pass under torch.autocast in this dtype
    attn_implementation: str | None = None  # "eager", "sdpa", "flash_attention_2", ...
    sdpa_backends: list[str] | None = None  # the SDPA kernels the run allowed, when it restricted them
    quantization: dict[str, Any] | None = None  # the bitsandbytes config the base was loaded with
    sources: dict[str, str] = field(default_factory=dict)  # where each setting came from

    def torch_dtype(self, name: str | None) -> Any:
        import torch

        return getattr(torch, name) if name else None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": self.weights, "autocast": self.autocast}
        if self.attn_implementation:
            out["attn_implementation"] = self.attn_implementation
        if self.sdpa_backends:
            out["sdpa_backends"] = self.sdpa_backends
        if self.quantization:
            out["quantization"] = {
                k: v for k, v in self.quantization.items() if k.startswith(("load_in", "bnb_4bit_q"))
            }
        out["from"] = self.sources
        return out


def _check(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "").lower()
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(
        name, name
    )
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}: use float32, float16 or bfloat16")
    return name


def _training_args(dirs: list[Path]) -> tuple[dict[str, Any], str | None]:
    from autopsy.importers.training_args import read_training_args

    for d in dirs:
        f = d / "training_args.bin"
        if f.is_file():
            cfg, _ = read_training_args(f)
            if cfg:
                return cfg, str(f)
    return {}, None


def run_precision(
    model_dir: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
) -> Precision:
    """The precision to replay ``model_dir`` in (the base model's dir for an adapter), from what the run recorded."""
    from autopsy.replay.device import checkpoint_dtype

    override = _check(dtype)
    out = Precision()
    meta = read_run_meta(run_dir) if run_dir is not None else {}
    saved = checkpoint_dtype(Path(model_dir))
    out.weights, out.sources["weights"] = saved, "config.json" if saved else "default"
    if meta.get("weights_dtype") in DTYPES:
        out.weights, out.sources["weights"] = meta["weights_dtype"], "run.json"
    dirs = [Path(p) for p in (checkpoint, run_dir) if p is not None]
    if meta:
        out.autocast = meta.get("autocast") if meta.get("autocast") in _HALF else None
        out.sources["autocast"] = "run.json"
        out.attn_implementation = meta.get("attn_implementation") or None
        backends = meta.get("sdpa_backends")
        if isinstance(backends, dict) and not all(backends.values()):
            out.sdpa_backends = sorted(k for k, v in backends.items() if v and k in _SDPA)
        quant = meta.get("quantization")
        out.quantization = quant if isinstance(quant, dict) and quant else None
    else:
        cfg, where = _training_args(dirs)
        if cfg.get("fp16") or cfg.get("bf16"):
            out.autocast = "float16" if cfg.get("fp16") else "bfloat16"
        out.sources["autocast"] = where or "default"
    if out.autocast is not None and out.weights in _HALF:
        out.autocast = None  # half weights compute in their own dtype: autocast changes nothing
    if override is not None:
        _apply_override(out, override)
    return out


def _apply_override(out: Precision, name: str) -> None:
    out.sources["weights"] = out.sources["autocast"] = "--dtype"
    if out.quantization:
        out.sources["quantization"] = "dropped by --dtype: the base is replayed unquantized"
        out.quantization = None
    if name == "float32":
        out.weights, out.autocast = "float32", None
    elif out.weights in (None, "float32", "float64"):
        out.autocast = name
    else:
        out.weights, out.autocast = name, None


def sdpa_context(backends: list[str] | None) -> Any:
    """``torch.nn.attention.sdpa_kernel`` restricted to the kernels the run allowed (nothing when it allowed all)."""
    if not backends:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    chosen = [getattr(SDPBackend, _SDPA[b]) for b in backends if hasattr(SDPBackend, _SDPA[b])]
    return sdpa_kernel(chosen) if chosen else contextlib.nullcontext()


def recorded_backends() -> dict[str, bool]:
    """The SDPA kernels enabled right now (the callback records them at train begin)."""
    import torch

    cuda = torch.backends.cuda
    out = {}
    for key, fn in (
        ("flash", "flash_sdp_enabled"),
        ("mem_efficient", "mem_efficient_sdp_enabled"),
        ("math", "math_sdp_enabled"),
        ("cudnn", "cudnn_sdp_enabled"),
    ):
        if hasattr(cuda, fn):
            out[key] = bool(getattr(cuda, fn)())
    return out
