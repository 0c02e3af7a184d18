"""Load a checkpoint for replay: a full model or a PEFT adapter on its local base, with nothing downloaded, in the
run's precision (:mod:`autopsy.replay.precision`) and where it fits (:mod:`autopsy.replay.memory`).

Finding checkpoints and scanning their weights needs no torch: :mod:`autopsy.checkpoints`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autopsy.checkpoints import is_adapter
from autopsy.errors import InputError, MissingDependencyError, UnreadableError, UsageError, first_line
from autopsy.replay.device import pick_device, pick_dtype

__all__ = ["base_model_dir", "load_model", "model_config", "quant_bits"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UnreadableError(f"{path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UnreadableError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UnreadableError(f"{path}: expected a JSON object")
    return data


def base_model_dir(adapter_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path:
    """The local base model of a PEFT adapter: ``base`` when given, else the one its config names."""
    cfg = _read_json(Path(adapter_dir) / "adapter_config.json")
    name = str(base) if base is not None else cfg.get("base_model_name_or_path")
    if not name:
        raise InputError(f"{adapter_dir}: the adapter names no base model; pass --base DIR")
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise InputError(
            f"base model {name!r} of the adapter is not a local model directory (nothing is downloaded); "
            "pass --base DIR with a local copy"
        )
    return p


def model_config(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (the base model's for an adapter)."""
    p = Path(path)
    if is_adapter(p):
        p = base_model_dir(p, base)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise InputError(f"{path}: no config.json: not a model checkpoint directory")
    return _read_json(cfg)


def quant_bits(quantization: dict[str, Any] | None) -> int | None:
    """4 or 8 for a bitsandbytes config that loads in 4/8 bits, else None."""
    if not quantization:
        return None
    if quantization.get("load_in_4bit"):
        return 4
    if quantization.get("load_in_8bit"):
        return 8
    return None


def _quantized_kwargs(transformers: Any, quantization: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's arguments for the base as the run loaded it (bitsandbytes, on the GPU)."""
    import importlib.util

    import torch

    bits = quant_bits(quantization)
    if not torch.cuda.is_available():
        raise UsageError(
            f"the run loaded the base in {bits}-bit (bitsandbytes), which needs a CUDA GPU and there is none here: "
            "replay on a GPU machine, or pass --dtype bfloat16 to replay the base unquantized (its numerics differ)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"bitsandbytes is needed to load the {bits}-bit base the run used: pip install bitsandbytes "
            "(or pass --dtype bfloat16 to replay the base unquantized)"
        )
    known = set(transformers.BitsAndBytesConfig().to_dict())
    cfg = transformers.BitsAndBytesConfig(
        **{k: v for k, v in quantization.items() if k in known and k != "quant_method"}
    )
    return {"quantization_config": cfg, "device_map": {"": 0}}


def _from_pretrained(cls: Any, model_dir: Path, kwargs: dict[str, Any], notes: list[str]) -> Any:
    try:
        return cls.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except Exception as exc:
        impl = kwargs.pop("attn_implementation", None)
        if impl is None:
            raise UnreadableError(
                f"cannot load the model from {model_dir}: {type(exc).__name__}: {first_line(exc)}"
            ) from None
        notes.append(
            f"the run's attention implementation {impl!r} is not available here ({first_line(exc, 120)}): the default is used"
        )
        return _from_pretrained(cls, model_dir, kwargs, notes)


def load_model(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    device: Any = None,
    dtype: Any = None,
    precision: Any = None,
    placement: Any = None,
    notes: list[str] | None = None,
) -> Any:
    """Load a checkpoint (full model, or PEFT adapter on its local base) for replay, trainable, in train mode.

    Nothing is downloaded (``local_files_only``). The class comes from ``config.architectures``
    (``AutoModelForCausalLM`` when it names none). ``precision`` (:class:`~autopsy.replay.precision.Precision`) gives
    the weights' dtype, the attention implementation and a quantized base; ``placement``
    (:class:`~autopsy.replay.memory.Placement`) the device (or a device map) and gradient checkpointing.
    """
    from autopsy._optional import require

    torch = require("torch", purpose="replay a checkpoint")
    transformers = require("transformers", purpose="load a checkpoint")
    transformers.utils.logging.disable_progress_bar()
    notes = notes if notes is not None else []
    p = Path(path)
    adapter = is_adapter(p)
    model_dir = base_model_dir(p, base) if adapter else p
    cfg = model_config(model_dir)
    wanted = getattr(precision, "weights", None)
    dtype = dtype if dtype is not None else getattr(torch, wanted) if wanted else pick_dtype(model_dir)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype}
    if getattr(precision, "attn_implementation", None):
        kwargs["attn_implementation"] = precision.attn_implementation
    quant = getattr(precision, "quantization", None) if adapter else None
    mapped = False
    if quant and quant_bits(quant):
        kwargs.update(_quantized_kwargs(transformers, quant))
        mapped = True
    elif placement is not None and placement.device == "auto":
        kwargs.update(device_map="auto", max_memory=placement.max_memory)
        mapped = True
    model = _from_pretrained(cls, model_dir, kwargs, notes)
    if adapter:
        peft = require("peft", purpose="load a LoRA/PEFT adapter")
        try:
            model = peft.PeftModel.from_pretrained(model, str(p), is_trainable=True, local_files_only=True)
        except Exception as exc:
            raise UnreadableError(f"cannot load the adapter {p}: {type(exc).__name__}: {first_line(exc)}") from None
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if placement is not None and placement.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # as the run trained it (dropout on); replay restores the step's RNG before each pass
    if not mapped:
        model = model.to(pick_device(placement.device if placement is not None else device))
    return model
