"""Checkpoints: find them, scan their weights for NaN/Inf, and load them (full model or PEFT adapter).

The weight scan needs neither torch nor safetensors: a ``.safetensors`` file is an 8-byte header length, a
JSON header (name -> dtype, shape, byte offsets) and raw little-endian data, so each tensor is memory-mapped
and checked in bounded chunks through its bit pattern (an all-ones exponent is Inf or NaN, for float16,
bfloat16, float32 and float64 alike). Memory stays bounded whatever the checkpoint's size, and bfloat16,
which numpy cannot represent, is checked as well. ``pytorch_model.bin`` files are never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autopsy.errors import InputError, UnreadableError
from autopsy.frame import Damage

__all__ = [
    "WeightScan",
    "find_checkpoints",
    "is_adapter",
    "load_model",
    "model_config",
    "safetensors_header",
    "scan_weights",
]

# dtype -> (unsigned view, exponent mask): a value whose exponent bits are all ones is Inf or NaN
_EXPONENT = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_CHUNK_BYTES = 64 << 20  # bounded memory per read: 64 MiB of a tensor at a time
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class WeightScan:
    """What a scan of one checkpoint found."""

    path: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor name -> count of NaN/Inf values
    damage: list[Damage] = field(default_factory=list)
    unscanned: list[str] = field(default_factory=list)  # weight files we will not read (pickles)

    @property
    def finite(self) -> bool:
        """True when every tensor read is finite and nothing was damaged."""
        return not self.nonfinite and not self.damage


def safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UnreadableError(f"{p}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise UnreadableError(f"{p}: not a safetensors file (header length {n} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise UnreadableError(f"{p}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnreadableError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UnreadableError(f"{p}: not a safetensors file")
    return header, 8 + n


def _scan_file(path: Path, scan: WeightScan) -> None:
    try:
        header, start = safetensors_header(path)
    except UnreadableError as exc:
        scan.damage.append(Damage(file=str(path), offset=0, problem=str(exc).split(": ", 1)[-1], salvaged="nothing"))
        return
    size = path.stat().st_size
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    for name, meta in entries:
        scan.tensors += 1
        begin, end = (start + int(o) for o in meta["data_offsets"])
        if end > size:
            scan.damage.append(Damage(file=str(path), offset=begin, problem=f"tensor {name} is cut off (file ends at byte {size})",
                                      salvaged=f"{scan.tensors - 1} tensors before it"))
            return
        view = _EXPONENT.get(meta.get("dtype", ""))
        if view is None or end == begin:
            continue  # integer/bool tensors cannot be non-finite
        utype, mask = view
        itemsize = np.dtype(utype).itemsize
        count = (end - begin) // itemsize
        mm = np.memmap(path, dtype=utype, mode="r", offset=begin, shape=(count,))
        step = max(1, _CHUNK_BYTES // itemsize)
        bad = 0
        for i in range(0, count, step):  # one bounded chunk at a time (a loop over chunks, not values)
            chunk = mm[i : i + step]
            bad += int(np.count_nonzero((chunk & utype(mask)) == utype(mask)))
        del mm
        if bad:
            scan.nonfinite[name] = bad


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def scan_weights(path: str | os.PathLike[str]) -> WeightScan:
    """Scan every safetensors file of a checkpoint directory (or one file) for NaN/Inf, one tensor at a time."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such checkpoint: {p}")
    scan = WeightScan(path=str(p))
    files = _weight_files(p)
    scan.files = [str(f) for f in files]
    if p.is_dir():
        scan.unscanned = sorted(str(f) for f in p.glob("*.bin") if f.name.startswith(("pytorch_model", "adapter_model")))
    for f in files:
        _scan_file(f, scan)
    return scan


def find_checkpoints(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """``checkpoint-N`` directories of a run, by step."""
    out = {}
    root = Path(run_dir)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            out[int(m.group(1))] = child
    return dict(sorted(out.items()))


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True for a PEFT adapter directory (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


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
        raise InputError(f"base model {name!r} of the adapter is not a local model directory (nothing is downloaded); "
                         "pass --base DIR with a local copy")
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


def load_model(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None, device: Any = None, dtype: Any = None) -> Any:
    """Load a checkpoint (full model, or PEFT adapter on its local base) for replay, trainable, on ``device``.

    Nothing is downloaded (``local_files_only``). The class comes from ``config.architectures``
    (``AutoModelForCausalLM`` when it names none).
    """
    from autopsy._optional import require
    from autopsy.replay.device import pick_device, pick_dtype

    require("torch", purpose="replay a checkpoint")
    transformers = require("transformers", purpose="load a checkpoint")
    transformers.utils.logging.disable_progress_bar()
    p = Path(path)
    adapter = is_adapter(p)
    model_dir = base_model_dir(p, base) if adapter else p
    cfg = model_config(model_dir)
    device = pick_device(device)
    dtype = dtype if dtype is not None else pick_dtype(model_dir, device=device)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError (a cut file), ValueError (bad config)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableError(f"cannot load the model from {model_dir}: {type(exc).__name__}: {first}") from None
    if adapter:
        peft = require("peft", purpose="load a LoRA/PEFT adapter")
        try:
            model = peft.PeftModel.from_pretrained(model, str(p), is_trainable=True, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError, ValueError
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnreadableError(f"cannot load the adapter {p}: {type(exc).__name__}: {first}") from None
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.to(device)
