"""A fleet of HF-shaped runs with a known outcome each: what the fleet bench and the fleet tests analyse.

    .venv/bin/python bench/fleet/make_fleet.py OUT --runs 1000 --steps 5000 [--seed 0] [--rule mixed] [--wandb 20]

Every run is what an HF ``Trainer`` leaves in its ``output_dir``: ``trainer_state.json`` (its ``log_history``),
TensorBoard event files under ``runs/<date_host>/`` with the ``args`` and ``model_config`` texts HF's callback
writes, an ``adapter_config.json`` for LoRA runs, and for a few runs a real offline W&B run dir (written by the
real ``wandb`` client through ``tests/helpers/wandb_runs.py``). A killed run (``abrupt_end``) has no root
``trainer_state.json``: only the events up to the kill and its last ``checkpoint-N/trainer_state.json``.

The outcome of each run is planted by a rule and returned as the ground truth (``truth.json`` beside the runs):

- ``lr``: a run whose learning rate is at or above ``LR_CUT`` diverges (the loss climbs and never comes back);
  every other run is healthy. The fleet findings must recover the cut.
- ``random``: a run goes NaN with probability ``p_fail`` whatever its settings. The fleet findings must stay silent.
- ``mixed`` (the bench): the ``lr`` rule, fp16 runs go NaN with probability 0.3, 4% of the runs are killed.

Event records are framed by hand (the fixed shape HF's ``SummaryWriter`` writes, CRCs from google-crc32c); the
text events go through tensorboard's protobufs. No torch.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LR_CUT = 1e-3
_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 8e-4, 1e-3, 1.5e-3, 2e-3, 3e-3)
_MODELS = (("meta-llama/Llama-3.2-1B", "llama", 128256), ("Qwen/Qwen2.5-0.5B", "qwen2", 151936))


@dataclass
class RunSpec:
    """One run to write: its name, its settings, and what happens to it (the ground truth)."""

    name: str
    config: dict[str, Any]
    fate: str = "healthy"  # healthy, divergence, nan, abrupt_end
    fate_step: int | None = None
    lora_r: int | None = None
    wandb: bool = False
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)


def plan_fleet(
    n: int, *, steps: int, seed: int = 0, rule: str = "mixed", p_fail: float = 0.3, wandb: int = 0
) -> list[RunSpec]:
    """The runs of a fleet and their planted outcomes (see the module doc for the rules)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lr = float(rng.choice(_LRS))
        precision = str(rng.choice(["bf16", "fp16", "fp32"]))
        model_name, model_type, vocab = _MODELS[int(rng.integers(len(_MODELS)))]
        config = {
            "learning_rate": lr,
            "warmup_ratio": float(rng.choice([0.0, 0.03, 0.1])),
            "warmup_steps": 0,
            "fp16": precision == "fp16",
            "bf16": precision == "bf16",
            "per_device_train_batch_size": int(rng.choice([4, 8, 16])),
            "gradient_accumulation_steps": int(rng.choice([1, 2, 4])),
            "max_grad_norm": float(rng.choice([0.3, 1.0])),
            "lr_scheduler_type": "linear",
            "weight_decay": 0.0,
            "max_steps": steps,
            "num_train_epochs": 3.0,
            "logging_steps": 1,
            "eval_steps": max(steps // 10, 1),
            "save_steps": max(steps // 5, 1),
            "logging_nan_inf_filter": True,
            "seed": i,
        }
        spec = RunSpec(
            name=f"run-{i:04d}",
            config=config,
            lora_r=int(rng.choice([8, 16, 64])) if rng.random() < 0.5 else None,
            seed=seed * 100_003 + i,
            model={"_name_or_path": model_name, "model_type": model_type, "vocab_size": vocab, "hidden_size": 2048},
        )
        spec.fate, spec.fate_step = _fate(rule, config, rng, steps=steps, p_fail=p_fail)
        out.append(spec)
    if wandb > 0:  # spread the W&B runs over the fleet: every k-th run
        for spec in out[:: max(n // wandb, 1)][:wandb]:
            spec.wandb = True
    return out


def _fate(rule: str, config: dict[str, Any], rng: np.random.Generator, *, steps: int, p_fail: float) -> tuple:
    """What happens to a run under ``rule``: (fate, first step of it)."""
    late = int(rng.integers(int(steps * 0.35), int(steps * 0.7)))
    if rule == "random":
        return ("nan", late) if rng.random() < p_fail else ("healthy", None)
    if config["learning_rate"] >= LR_CUT:
        return "divergence", late
    if rule == "lr":
        return "healthy", None
    if config["fp16"] and rng.random() < 0.3:
        return "nan", late
    if rng.random() < 0.04:
        return "abrupt_end", late
    return "healthy", None


# --- the curves ------------------------------------------------------------------------------------


def curves(spec: RunSpec, steps: int) -> dict[str, np.ndarray]:
    """The logged series of a run, one value per step from 1 to its last logged step."""
    rng = np.random.default_rng(spec.seed)
    t = np.arange(1, steps + 1, dtype=np.float64)
    cfg = spec.config
    warm = max(int(round(cfg["warmup_ratio"] * steps)), 1)
    lr = cfg["learning_rate"] * np.minimum(1.0, t / warm) * np.clip((steps - t) / max(steps - warm, 1), 0, 1)
    start, floor = 2.6 + rng.random(), 0.9 + 0.4 * rng.random()
    loss = floor + (start - floor) * np.exp(-t / (steps / 6)) + rng.normal(0, 0.03, steps)
    grad = 1.1 + 0.15 * rng.standard_normal(steps) + 2.0 * np.exp(-t / 30)
    eval_loss = floor + 0.05 + (start - floor) * np.exp(-t / (steps / 6))
    k = spec.fate_step
    last = steps
    if spec.fate == "divergence" and k is not None:
        ramp = np.clip((t - k) / max(steps - k, 1), 0, None)
        loss = loss + 6.0 * ramp**1.2
        eval_loss = eval_loss + 6.5 * ramp**1.2
        grad = grad * (1 + 40 * ramp)
    elif spec.fate == "nan" and k is not None:
        bad = t >= k
        grad = np.where(bad, np.nan, grad)
        loss = np.where(bad, 0.0, loss)  # HF's logging_nan_inf_filter logs 0.0 for an all-NaN window
        eval_loss = np.where(bad, np.nan, eval_loss)
    elif spec.fate == "abrupt_end" and k is not None:
        last = k
    n = last
    return {
        "step": t[:n].astype(np.int64),
        "loss": np.maximum(loss[:n], 0.0),
        "grad_norm": np.abs(grad[:n]),
        "learning_rate": lr[:n],
        "epoch": (t[:n] / steps) * cfg["num_train_epochs"],
        "eval_loss": eval_loss[:n],
    }


# --- trainer_state.json ------------------------------------------------------------------------------


def _history(spec: RunSpec, c: dict[str, np.ndarray], upto: int, *, final: bool) -> list[dict[str, Any]]:
    every = spec.config["eval_steps"]
    out: list[dict[str, Any]] = []
    cols = zip(c["step"].tolist(), c["epoch"].tolist(), c["grad_norm"].tolist(), c["learning_rate"].tolist(),
               c["loss"].tolist(), c["eval_loss"].tolist())
    for step, epoch, grad, lr, loss, ev in cols:
        if step > upto:
            break
        out.append({"epoch": round(epoch, 6), "grad_norm": grad, "learning_rate": lr, "loss": round(loss, 4),
                    "step": step})
        if step % every == 0:
            out.append({"epoch": round(epoch, 6), "eval_loss": ev, "eval_runtime": 1.5, "step": step})
    if final:
        train_loss = float(np.nanmean(c["loss"]))
        out.append({"epoch": float(c["epoch"][-1]), "step": int(c["step"][-1]), "total_flos": 1.0e15,
                    "train_loss": train_loss, "train_runtime": 0.5 * upto, "train_steps_per_second": 2.0})
    return out


def write_trainer_state(path: Path, spec: RunSpec, c: dict[str, np.ndarray], upto: int, *, final: bool) -> None:
    cfg = spec.config
    state = {
        "best_metric": None, "best_model_checkpoint": None, "epoch": float(c["epoch"][min(upto, len(c["epoch"])) - 1]),
        "eval_steps": cfg["eval_steps"], "global_step": upto, "is_hyper_param_search": False,
        "is_local_process_zero": True, "is_world_process_zero": True,
        "log_history": _history(spec, c, upto, final=final), "logging_steps": cfg["logging_steps"],
        "max_steps": cfg["max_steps"], "num_train_epochs": cfg["num_train_epochs"], "save_steps": cfg["save_steps"],
        "total_flos": 1.0e15, "train_batch_size": cfg["per_device_train_batch_size"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))  # HF writes NaN as the NaN token (json.dumps allows it)


# --- TensorBoard event files ----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _masked(data: bytes) -> bytes:
    import google_crc32c

    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _frame(data: bytes) -> bytes:
    head = struct.pack("<Q", len(data))
    return head + _masked(head) + data + _masked(data)


def _scalar(tag: bytes, step: int, value: float, wall: float) -> bytes:
    """One HF-shaped scalar event: wall_time, step, summary{value{tag, simple_value}}."""
    val = b"\x0a" + _varint(len(tag)) + tag + b"\x15" + struct.pack("<f", value)
    summ = b"\x0a" + _varint(len(val)) + val
    return _frame(b"\x09" + struct.pack("<d", wall) + b"\x10" + _varint(step) + b"\x2a" + _varint(len(summ)) + summ)


def _text_events(spec: RunSpec, wall: float) -> bytes:
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    out = [_frame(event_pb2.Event(wall_time=wall, file_version="brain.Event:2").SerializeToString())]
    for tag, payload in (("args", spec.config), ("model_config", spec.model)):
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[json.dumps(payload, indent=2).encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
        )
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        value = summary_pb2.Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)
        event = event_pb2.Event(wall_time=wall, step=0, summary=summary_pb2.Summary(value=[value]))
        out.append(_frame(event.SerializeToString()))
    return b"".join(out)


def write_events(log_dir: Path, spec: RunSpec, c: dict[str, np.ndarray], *, start: float, final: bool) -> Path:
    """The events HF's TensorBoardCallback writes for the run (one event file)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"events.out.tfevents.{int(start)}.node{spec.seed % 97}.{1000 + spec.seed % 50000}.0"
    every = spec.config["eval_steps"]
    tags = [(b"train/loss", c["loss"]), (b"train/grad_norm", c["grad_norm"]),
            (b"train/learning_rate", c["learning_rate"]), (b"train/epoch", c["epoch"])]
    parts = [_text_events(spec, start)]
    columns = [v.tolist() for _, v in tags]
    names = [t for t, _ in tags]
    evals = c["eval_loss"].tolist()
    for i, step in enumerate(c["step"].tolist()):
        wall = start + 0.5 * step
        parts.extend(_scalar(names[j], step, columns[j][i], wall) for j in range(len(names)))
        if step % every == 0:
            parts.append(_scalar(b"eval/loss", step, evals[i], wall + 1.0))
            parts.append(_scalar(b"eval/runtime", step, 1.5, wall + 1.0))
    if final:
        step = int(c["step"][-1])
        wall = start + 0.5 * step + 2.0
        parts.append(_scalar(b"train/train_runtime", step, 0.5 * step, wall))
        parts.append(_scalar(b"train/train_loss", step, float(np.nanmean(c["loss"])), wall))
    path.write_bytes(b"".join(parts))
    return path


# --- one run, the fleet ------------------------------------------------------------------------------


def write_run(root: Path, spec: RunSpec, *, steps: int, start: float = 1.75e9) -> Path:
    """Write one run's ``output_dir`` under ``root``; returns it."""
    run_dir = root / spec.name
    c = curves(spec, steps)
    killed = spec.fate == "abrupt_end"
    upto = int(c["step"][-1])
    date = "May01_12-00-00"
    write_events(run_dir / "runs" / f"{date}_node{spec.seed % 97}", spec, c, start=start, final=not killed)
    if killed:
        save = spec.config["save_steps"]
        last_save = (upto // save) * save
        if last_save:
            write_trainer_state(run_dir / f"checkpoint-{last_save}" / "trainer_state.json", spec, c, last_save,
                                final=False)
    else:
        write_trainer_state(run_dir / "trainer_state.json", spec, c, upto, final=True)
    if spec.lora_r is not None:
        adapter = {"peft_type": "LORA", "r": spec.lora_r, "lora_alpha": 2 * spec.lora_r, "lora_dropout": 0.05,
                   "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": spec.model["_name_or_path"]}
        (run_dir / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    return run_dir


def wandb_spec(root: Path, spec: RunSpec, *, steps: int) -> dict[str, Any]:
    """The W&B run of ``spec`` as ``tests/helpers/wandb_runs.write_runs`` takes it (HF's WandbCallback rows)."""
    c = curves(spec, steps)
    rows: list[dict[str, Any]] = []
    every = spec.config["eval_steps"]
    for i, step in enumerate(c["step"].tolist()):
        rows.append({"train/loss": float(c["loss"][i]), "train/grad_norm": float(c["grad_norm"][i]),
                     "train/learning_rate": float(c["learning_rate"][i]), "train/epoch": float(c["epoch"][i]),
                     "train/global_step": step})
        if step % every == 0:
            rows.append({"eval/loss": float(c["eval_loss"][i]), "train/global_step": step})
    config = {**spec.config, "dataset_size": 10_000 + 37 * spec.seed % 50_000}
    return {"dir": str(root / spec.name), "id": f"w{spec.seed % 10**7:07d}", "config": config, "rows": rows,
            "exit_code": 1 if spec.fate == "abrupt_end" else 0}


def _write_chunk(args: tuple[str, list[dict[str, Any]], int]) -> int:
    root, specs, steps = args
    for d in specs:
        write_run(Path(root), RunSpec(**d), steps=steps)
    return len(specs)


def write_fleet(
    root: Path, *, runs: int, steps: int, seed: int = 0, rule: str = "mixed", p_fail: float = 0.3,
    wandb: int = 0, jobs: int = 1,
) -> list[RunSpec]:
    """Write a fleet under ``root`` (and ``truth.json`` beside it); returns the specs with their planted outcome."""
    root.mkdir(parents=True, exist_ok=True)
    specs = plan_fleet(runs, steps=steps, seed=seed, rule=rule, p_fail=p_fail, wandb=wandb)
    dicts = [asdict(s) for s in specs]
    if jobs > 1:
        chunks = [(str(root), dicts[i::jobs], steps) for i in range(jobs)]
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_write_chunk, chunks))
    else:
        _write_chunk((str(root), dicts, steps))
    wb = [wandb_spec(root, s, steps=steps) for s in specs if s.wandb]
    if wb:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
        from helpers.wandb_runs import write_runs

        write_runs(wb, timeout=max(120, 30 * len(wb)))
    (root.parent / f"{root.name}.truth.json").write_text(json.dumps([asdict(s) for s in specs], indent=1))
    return specs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rule", choices=("mixed", "lr", "random"), default="mixed")
    ap.add_argument("--wandb", type=int, default=0, help="how many runs also get an offline W&B run dir")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    specs = write_fleet(a.out, runs=a.runs, steps=a.steps, seed=a.seed, rule=a.rule, wandb=a.wandb, jobs=a.jobs)
    fates: dict[str, int] = {}
    for s in specs:
        fates[s.fate] = fates.get(s.fate, 0) + 1
    print(f"{len(specs)} runs under {a.out}: {fates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
