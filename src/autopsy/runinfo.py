"""What is known about a run besides its series: :class:`RunInfo`, and the guesses an engineer makes from a config.

Importers fill a :class:`RunInfo` per run (the schedule, the config, checkpoints, the final summary, how the log
ended, the damage met while reading); detectors and reports read it. Everything about a run that is not a logged
value lives here, in typed fields: nothing rides in private string keys of ``config`` or ``summary``.

A loaded frame carries its runs' infos as one shared :class:`RunCatalog` (:func:`attach_runs`,
:func:`run_info`): slicing a frame never copies it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "Crash",
    "Damage",
    "LogStats",
    "RunCatalog",
    "RunInfo",
    "WeightCheck",
    "attach_runs",
    "catalog",
    "chance_levels",
    "configured_max_grad_norm",
    "is_lora",
    "rl_objective",
    "run_info",
    "runs_of",
    "trains_from_scratch",
    "warmup_end_step",
]

_SCHEDULE = ("max_steps", "logging_steps", "eval_steps", "save_steps")


@dataclass
class Damage:
    """What a reader could not read: the file, where the damage starts, and what was kept."""

    file: str
    offset: int | None
    problem: str
    salvaged: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# the OOM message's numbers, in GiB (the allocator prints them)
OOM_SIZES = ("tried_to_allocate_gib", "total_capacity_gib", "already_allocated_gib", "free_gib", "reserved_gib")


@dataclass
class Crash:
    """How a log ended when it ended badly: the kind (``oom``, ``device_assert``, ``nccl_timeout``, ``killed``,
    ``disk_full``, ``interrupted``, ``other``), the exception and its message, the OOM sizes, the last lines."""

    kind: str
    exception: str | None = None
    message: str = ""
    file: str | None = None
    line: int | None = None
    last_step: int | None = None
    tail: list[str] = field(default_factory=list)
    sizes: dict[str, float] = field(default_factory=dict)  # OOM_SIZES -> GiB
    message_cut: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Crash:
        known = {f.name for f in fields(cls)} - {"sizes"}
        return cls(**{k: v for k, v in d.items() if k in known}, sizes={k: d[k] for k in OOM_SIZES if k in d})

    def to_dict(self) -> dict[str, Any]:
        """Flat evidence: the sizes sit beside the other keys; empty values are left out."""
        out = {k: v for k, v in asdict(self).items() if k != "sizes" and v not in (None, "", [], False)}
        out.update(self.sizes)
        return out


@dataclass
class WeightCheck:
    """What the NaN/Inf scan of one checkpoint's weights found (:func:`autopsy.checkpoints.check_run_checkpoints`)."""

    path: str
    tensors: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor name -> count of NaN/Inf values
    damaged: bool = False


@dataclass
class LogStats:
    """What reading a console log found: lines, metric records, where the steps came from."""

    file: str
    lines: int
    records: int = 0
    step_axis: str = ""
    printed_start: bool = False
    overflow_messages: int = 0
    last_counter: tuple[int, int] | None = None  # the last "i of n" progress printed (i < n: stopped short)


@dataclass
class RunInfo:
    """What is known about a run besides its series."""

    name: str
    path: str = ""
    sources: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None
    logging_steps: int | None = None
    eval_steps: int | None = None
    save_steps: int | None = None
    num_train_epochs: float | None = None
    global_step: int | None = None
    best_checkpoint: str | None = None
    best_metric: float | None = None
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> directory
    bad_checkpoints: dict[int, str] = field(default_factory=dict)  # step -> why it must not be restarted from
    weight_scans: dict[int, WeightCheck] = field(default_factory=dict)  # step -> what the NaN/Inf scan found
    summary: dict[str, Any] = field(default_factory=dict)  # the final summary record (train_runtime, train_loss, ...)
    damage: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things skipped while reading, one line each
    exit_code: int | None = None  # when the source records the process' exit (W&B)
    finished: bool | None = None  # True: a final record; False: the source saw the start and no end; None: unknown
    in_progress: bool = False  # still being written: no final record, logged or modified minutes ago (see a note)
    crash: Crash | None = None  # how the log ended, when it ended in a traceback or a kill
    trainer_class: str | None = None  # DPOTrainer, GRPOTrainer, ... when a source names it
    logs: list[LogStats] = field(default_factory=list)  # console logs read
    unread_logs: list[LogStats] = field(default_factory=list)  # console logs with no line autopsy reads
    loss_scale_at_minimum: bool = False  # a scaler said its scale is already at its minimum

    def merge(self, other: RunInfo) -> None:
        """Fold what ``other`` knows into this one (first known value wins, lists are joined)."""
        for name in (
            "max_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "num_train_epochs",
            "best_checkpoint",
            "best_metric",
            "exit_code",
            "finished",
            "crash",
            "trainer_class",
        ):
            if getattr(self, name) is None and getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        if other.global_step is not None:
            self.global_step = max(self.global_step or 0, other.global_step)
        self.sources.extend(s for s in other.sources if s not in self.sources)
        self.files.extend(f for f in other.files if f not in self.files)
        for key, value in other.config.items():
            self.config.setdefault(key, value)
        self.checkpoints.update(other.checkpoints)
        self.bad_checkpoints.update(other.bad_checkpoints)
        self.weight_scans.update(other.weight_scans)
        for key, value in other.summary.items():
            self.summary.setdefault(key, value)
        self.damage.extend(other.damage)
        self.notes.extend(other.notes)
        self.logs.extend(other.logs)
        self.unread_logs.extend(other.unread_logs)
        self.loss_scale_at_minimum |= other.loss_scale_at_minimum
        self.in_progress |= other.in_progress
        if not self.path:
            self.path = other.path

    def config_value(self, *names: str, default: Any = None) -> Any:
        """The first of ``names`` present in the config (``None`` values count as absent)."""
        for name in names:
            value = self.config.get(name)
            if value is not None:
                return value
        return default

    def fill_from_config(self) -> None:
        """Fill the schedule fields (max_steps, logging/eval/save steps, epochs) from the config where no source
        said them: the one place a config's schedule becomes the run's."""
        for key in _SCHEDULE:
            v = self.config.get(key)
            if getattr(self, key) is None and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                setattr(self, key, int(v))
        ep = self.config.get("num_train_epochs")
        if self.num_train_epochs is None and isinstance(ep, (int, float)) and not isinstance(ep, bool) and ep > 0:
            self.num_train_epochs = float(ep)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoints"] = {str(k): v for k, v in sorted(self.checkpoints.items())}
        out["bad_checkpoints"] = {str(k): v for k, v in sorted(self.bad_checkpoints.items())}
        out["weight_scans"] = {str(k): v for k, v in sorted(out["weight_scans"].items())}
        return out


# --- runs carried by a frame ------------------------------------------------------------------------

_ATTR = "autopsy.runs"


class RunCatalog(dict[str, "RunInfo"]):
    """Run name -> :class:`RunInfo`, shared by a frame and every slice of it.

    pandas deep-copies ``DataFrame.attrs`` on every operation; the catalog copies as itself, so taking one run
    out of a frame of 2,000 costs nothing (metadata about the runs is not data of the slice).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> RunCatalog:
        return self

    def __copy__(self) -> RunCatalog:
        return self


def attach_runs(frame: pd.DataFrame, runs: Mapping[str, RunInfo]) -> pd.DataFrame:
    """Attach ``runs`` to ``frame`` (in place; returns it) so that :func:`run_info` finds them."""
    frame.attrs[_ATTR] = RunCatalog(runs)
    return frame


def catalog(frame: pd.DataFrame) -> RunCatalog:
    """The frame's run catalog (an empty one attached when the frame has none)."""
    cat = frame.attrs.get(_ATTR)
    if not isinstance(cat, RunCatalog):
        cat = RunCatalog()
        frame.attrs[_ATTR] = cat
    return cat


def runs_of(frame: pd.DataFrame) -> list[str]:
    """The run names of a frame in order of appearance, then the runs known only from metadata (no rows)."""
    names = [str(u) for u in pd.unique(frame["run"])] if len(frame) else []
    seen = set(names)
    names += [n for n in catalog(frame) if n not in seen]
    return names


def run_info(frame: pd.DataFrame, run: str | None = None) -> RunInfo:
    """The :class:`RunInfo` of ``run`` (the only run when ``None``); a bare one for a run the frame does not know."""
    from autopsy.errors import FrameError

    cat = catalog(frame)
    if run is None:
        names = runs_of(frame)
        if len(names) > 1:
            raise FrameError(f"the frame holds {len(names)} runs; name one of: {', '.join(names[:10])}")
        run = names[0] if names else "run"
    info = cat.get(run)
    if info is None:
        info = cat[run] = RunInfo(name=run)
    return info


# --- what an engineer reads from a config ------------------------------------------------------------

# metric names that only preference / RL trainers (TRL's DPO, GRPO, PPO, KTO, ORPO) log
_RL_MARKERS = (
    "rewards/",
    "logps/",
    "logits/",
    "/kl",
    "kl",
    "reward",
    "completion_length",
    "completions/",
    "objective/",
)
_RL_TRAINERS = ("dpo", "grpo", "ppo", "kto", "orpo", "rloo", "cpo", "simpo")


def rl_objective(info: RunInfo | None, metrics: Iterable[str] = ()) -> bool:
    """True when the run optimises an RL / preference objective (its loss is not a likelihood: DPO starts at ln 2,
    GRPO/PPO losses sit near 0 or go negative), from the metrics it logs or the trainer that ran it."""
    if any(marker in str(m).lower() for m in metrics for marker in _RL_MARKERS):
        return True
    if info is not None:
        name = str(info.trainer_class or info.config.get("trainer_class") or "").lower()
        return any(k in name for k in _RL_TRAINERS)
    return False


def warmup_end_step(info: RunInfo | None, lr: pd.Series | None = None) -> int | None:
    """The step where warmup ends: ``warmup_steps`` or ``warmup_ratio`` x max_steps from the config, else the peak
    of the logged learning-rate curve when it rises from well below that peak (0: no warmup; None: unknown)."""
    if info is not None:
        try:
            ws = info.config_value("warmup_steps")
            if ws is not None and int(ws) > 0:
                return int(ws)
            ratio = info.config_value("warmup_ratio")
            if ratio is not None and float(ratio) > 0 and info.max_steps:
                return int(math.ceil(float(ratio) * int(info.max_steps)))
        except (TypeError, ValueError):
            pass
    if lr is None or len(lr) < 3:
        return None
    v = lr.to_numpy(dtype=float)
    if not (np.isfinite(v).all() and v.max() > 0):
        return None
    peak = int(np.argmax(v))
    # a warmup is a rise from well below the peak; a constant or decaying LR has none
    return int(lr.index[peak]) if peak > 0 and v[0] < 0.5 * v[peak] else 0


def configured_max_grad_norm(info: RunInfo | None) -> tuple[bool, float | None]:
    """``(said, value)``: whether the config sets max_grad_norm, and the threshold (None: clipping is off)."""
    if info is None or "max_grad_norm" not in info.config:
        return False, None
    try:
        value = float(info.config["max_grad_norm"])
    except (TypeError, ValueError):
        return True, None
    return True, (value if value > 0 and math.isfinite(value) else None)


def chance_levels(info: RunInfo | None) -> dict[str, float]:
    """Losses of a model that learned nothing: ln(num_labels) for a classifier, ln(vocab_size) for an LM."""
    out: dict[str, float] = {}
    if info is None:
        return out
    cfg = info.config
    model: dict[str, Any] = cfg["model"] if isinstance(cfg.get("model"), dict) else {}
    labels = cfg.get("num_labels") or model.get("num_labels")
    id2label = cfg.get("id2label") or model.get("id2label")
    if not labels and isinstance(id2label, dict) and len(id2label) > 1:
        labels = len(id2label)
    vocab = cfg.get("vocab_size") or model.get("vocab_size")
    try:
        if labels and int(labels) > 1:
            out["ln(num_labels)"] = math.log(int(labels))
        if vocab and int(vocab) > 1 and not labels:
            out["ln(vocab_size)"] = math.log(int(vocab))
    except (TypeError, ValueError):
        pass
    return out


_ADAPTER_KEYS = {"adapter", "peft_config", "lora_r", "lora_alpha", "lora_config", "use_peft", "lora_rank"}


def is_lora(info: RunInfo | None) -> bool:
    """True when the config describes an adapter (PEFT/LoRA) fine-tune."""
    if info is None:
        return False
    keys = {str(k).lower() for k in info.config}
    return bool(keys & _ADAPTER_KEYS) or any(k.startswith(("lora_", "peft")) for k in keys)


def trains_from_scratch(info: RunInfo | None) -> bool | None:
    """True when the run trains a model from scratch, False for a fine-tune, None when the config cannot tell.

    A fine-tune names a pretrained model (``model_name_or_path``, ``base_model_name_or_path``, an adapter, an HF
    ``_name_or_path`` that is a hub id); a run whose config says ``from_scratch``/``init_from: scratch`` or that
    carries no model name but its own architecture hyper-parameters (a ResNet at LR 0.1) trains from scratch.
    Fine-tuning LR ranges are quoted only to fine-tunes.
    """
    if info is None or not info.config:
        return None
    cfg = info.config
    if is_lora(info):
        return False
    for key in ("from_scratch", "train_from_scratch"):
        if isinstance(cfg.get(key), bool):
            return bool(cfg[key])
    if str(cfg.get("init_from", "")).lower() == "scratch":
        return True
    for key in (
        "model_name_or_path",
        "base_model_name_or_path",
        "pretrained_model_name_or_path",
        "base_model",
        "model_id",
        "hub_model_id",
    ):
        if cfg.get(key):
            return False
    model = cfg.get("model")
    if isinstance(model, dict) and model.get("_name_or_path"):
        return False
    if info.trainer_class or "per_device_train_batch_size" in cfg:
        return False  # HF Trainer / TRL: fine-tunes in all but rare cases
    return None
