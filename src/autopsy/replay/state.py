"""A Trainer checkpoint's training state, rebuilt for step replay: optimizer, LR scheduler, RNG.

Pickled state is read only with ``torch.load(weights_only=True)``, with an explicit allowlist of the numpy names an
RNG file holds; a file that needs anything else is not loaded, and the replay goes on without that state (saying so).
Before anything is inflated, a file's size is checked: a torch file is a zip whose records declare their size, so
the declared total is summed from the central directory (a few KB read) and a file over its cap is refused: an RNG or
scheduler file is a few KB (cap 16 MiB), an optimizer's state is at most a few copies of the trainable parameters in
float32 (cap: 4 copies + 64 MiB). A 4 MiB zip bomb that inflates to GBs is therefore never inflated.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Any

from autopsy.errors import InputError, first_line

__all__ = [
    "SMALL_STATE_CAP",
    "build_optimizer",
    "build_scheduler",
    "load_state_file",
    "optimizer_cap",
    "set_rng",
]

SMALL_STATE_CAP = 16 << 20  # rng_state.pth, scheduler.pt: real ones are 2-20 KB


def optimizer_cap(trainable_params: int) -> int:
    """The largest ``optimizer.pt`` a model of this many trainable parameters can have: Adam keeps two float32 moments
    (8 bytes a parameter); 16 bytes a parameter leaves room for a master copy, plus 64 MiB for the rest."""
    return 16 * int(trainable_params) + (64 << 20)


def _inflated_size(path: Path) -> int:
    """The bytes ``torch.load`` would inflate: the zip records' declared sizes (the file's size for a legacy file)."""
    if not zipfile.is_zipfile(path):
        return path.stat().st_size
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist())


def _numpy_allowlist() -> dict[str, Any]:
    """The only globals an RNG file may name: numpy arrays and dtypes (for ``np.random.get_state()``)."""
    import warnings

    import numpy as np

    allow: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy 2 deprecates the numpy.core alias
                m = __import__(mod, fromlist=["_reconstruct"])
            allow[f"{mod}._reconstruct"] = m._reconstruct
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)
    for name in ("UInt32DType", "Int64DType", "Float64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allow[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return allow


def load_state_file(path: Path, *, what: str, cap: int = SMALL_STATE_CAP) -> tuple[Any, str | None]:
    """``torch.load(path, weights_only=True)`` with the numpy allowlist and a size cap: (object, None) or (None, note)."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    if not path.is_file():
        return None, f"{path.name} is missing: the replay runs without the {what}"
    try:
        size = _inflated_size(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return (
            None,
            f"{path.name} is not a readable torch file ({type(exc).__name__}): the replay runs without the {what}",
        )
    if size > cap:
        return None, (
            f"{path.name} was not loaded: it inflates to {size / 2**20:.0f} MiB, over the {cap / 2**20:.0f} MiB such a "
            f"file can hold for this model (a damaged or hostile file): the replay runs without the {what}"
        )
    try:
        names = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        return (
            None,
            f"{path.name} is not a readable torch file ({type(exc).__name__}): the replay runs without the {what}",
        )
    allow = _numpy_allowlist()
    refused = sorted(n for n in names if n not in allow)
    if refused:
        return None, (
            f"{path.name} was not loaded: it references {', '.join(refused[:4])}, not on the allowlist "
            f"(only weights_only loading is done): the replay runs without the {what}"
        )
    try:
        with safe_globals(list(allow.values())):  # the dtype classes are found only while unpickling
            return torch.load(str(path), weights_only=True, map_location="cpu"), None
    except Exception as exc:
        return (
            None,
            f"{path.name} could not be loaded safely ({first_line(exc, 160)}): the replay runs without the {what}",
        )


def _decay_names(model: Any) -> set[str]:
    """The parameters HF's Trainer puts in its weight-decay group (``Trainer.get_decay_parameter_names``)."""
    import torch

    forbidden = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if not any(f.search(full.lower()) for f in forbidden):
                out.add(full)
    return out


_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


def _optimizer_class(optim_name: str | None, saved: dict[str, Any] | None) -> Any:
    import torch

    name = str(optim_name or "").lower()
    if name.startswith("adamw_torch") or name in ("adamw_hf", "adamw"):
        return torch.optim.AdamW
    for key, cls in _OPTIMIZERS.items():
        if (name == key or name.startswith(key + "_")) and not (key == "adam" and name.startswith("adamw")):
            return getattr(torch.optim, cls)
    if not name and saved is not None:  # no config: guess from the saved hyperparameters
        g = (saved.get("param_groups") or [{}])[0]
        if "betas" in g:
            return torch.optim.AdamW if g.get("decoupled_weight_decay", True) else torch.optim.Adam
        if "momentum" in g and "dampening" in g:
            return torch.optim.SGD
    if not name:
        return torch.optim.AdamW  # HF Trainer's default
    raise InputError(
        f"step replay supports torch's AdamW, Adam, SGD, Adagrad and RMSprop; this run used optim={optim_name!r}"
    )


def _state_fits(saved: dict[str, Any], params: list) -> bool:
    for i, st in saved.get("state", {}).items():
        if isinstance(i, int) and i < len(params):
            for v in st.values():
                if hasattr(v, "shape") and v.dim() > 0 and tuple(v.shape) != tuple(params[i].shape):
                    return False
    return True


def build_optimizer(
    model: Any, cfg: dict[str, Any], saved: dict[str, Any] | None, notes: list[str]
) -> tuple[Any, dict[str, Any] | None]:
    """The optimizer as HF's Trainer built it (decay / no-decay groups), and ``optimizer.pt``'s state when it fits
    (None otherwise): Trainer loads that state after the scheduler is built, and so does the caller."""
    cls = _optimizer_class(cfg.get("optim"), saved)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = _decay_names(model)
    wd = float(cfg.get("weight_decay") or 0.0)
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if n in decay], "weight_decay": wd},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": float(cfg.get("learning_rate") or 1e-3)}
    if cls.__name__.startswith("Adam"):
        kwargs.update(
            betas=(float(cfg.get("adam_beta1", 0.9)), float(cfg.get("adam_beta2", 0.999))),
            eps=float(cfg.get("adam_epsilon", 1e-8)),
        )
    if saved is not None:
        sizes = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
        if sizes != [len(g["params"]) for g in groups]:
            if sizes == [len(named)]:
                groups = [{"params": [p for _, p in named], "weight_decay": wd}]
            else:
                notes.append(
                    f"optimizer.pt holds parameter groups of sizes {sizes}, the model's trainable parameters group as "
                    f"{[len(g['params']) for g in groups]}: the replay runs with a fresh {cls.__name__} (its first steps will differ)"
                )
                saved = None
    opt = cls(groups, **kwargs)
    if saved is not None and not _state_fits(saved, [p for g in groups for p in g["params"]]):
        notes.append(
            f"optimizer.pt does not match the model's parameters (shapes differ): the replay runs with a fresh {cls.__name__}"
        )
        saved = None
    return opt, saved


def build_scheduler(
    opt: Any, cfg: dict[str, Any], max_steps: int | None, step: int, saved: dict[str, Any] | None, notes: list[str]
) -> Any:
    """The LR scheduler of the run (``transformers.get_scheduler``), then ``scheduler.pt``'s state or advanced to ``step``."""
    from transformers import get_scheduler

    name = cfg.get("lr_scheduler_type") or "linear"
    total = int(max_steps or cfg.get("max_steps") or 0)
    warm = cfg.get("warmup_steps") or 0
    ratio = cfg.get("warmup_ratio") or 0
    warmup = math.ceil(float(warm) * total) if 0 < float(warm) < 1 else int(warm)
    if not warmup and ratio:
        warmup = math.ceil(float(ratio) * total)
    extra = cfg.get("lr_scheduler_kwargs") if isinstance(cfg.get("lr_scheduler_kwargs"), dict) else {}
    if total <= 0 and name not in ("constant", "constant_with_warmup"):
        notes.append(
            f"the run's max_steps is unknown: the {name} schedule cannot be rebuilt; the learning rate is held constant"
        )
        return None
    try:
        sched = get_scheduler(
            name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=extra or None
        )
    except Exception as exc:
        notes.append(
            f"the LR schedule {name!r} could not be rebuilt ({type(exc).__name__}): the learning rate is held constant"
        )
        return None
    if saved is None:
        for _ in range(step):
            sched.step()
    return sched


def set_rng(state: dict[str, Any] | None) -> bool:
    """Restore a recorded RNG state (``torch_cpu`` / ``cpu``, ``torch_cuda<i>``); False when there is none."""
    import torch

    if not state:
        return False
    cpu = state.get("torch_cpu", state.get("cpu"))
    if torch.is_tensor(cpu):
        torch.set_rng_state(cpu.to("cpu", torch.uint8))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            t = state.get(f"torch_cuda{i}")
            if t is None and i == 0:
                t = state.get("cuda")
            if torch.is_tensor(t):
                torch.cuda.set_rng_state(t.to("cpu", torch.uint8), i)
    return True
