"""The machine side of a run: W&B system metrics on the step axis, the GPU in the config, the machine detectors
(memory_headroom, memory_growth per rank, rank_imbalance, input_bound, low_mfu, throughput_drop) and the MFU
arithmetic.

The W&B runs are written by the real client (``wandb.init(mode="offline")``) in one subprocess. A CPU machine has
no GPU for W&B's sampler, so the GPU samples are ``stats`` records made with wandb's own protobuf and written through
the run's own interface, at wall times the test chooses (step k is logged at LOAD + k * DT seconds, its sample a
quarter step later): each planted change sits at a known step, and every expected step below is computed from the
same functions that made the samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autopsy import analyze
from autopsy.findings import Severity
from autopsy.gpus import GPUS, flops_per_token, gpu_spec, infer_gpu, mfu, parse_nvidia_smi
from autopsy.importers import load
from autopsy.memory_estimate import estimate_from_config, param_counts
from autopsy.report.html import render_html
from autopsy.runinfo import run_info
from autopsy.series import metric_names, series
from helpers.detect import detect
from helpers.paths import REAL_LOGS, needs_shared
from helpers.wandb_runs import write_runs

N, DT, LOAD, GPUS_N = 190, 2.0, 20.0, 4
CARD = 80 * 2**30  # bytes of an A100 80GB, as NVML reports it
MACHINE = ("memory_headroom", "memory_growth", "rank_imbalance", "input_bound", "low_mfu", "throughput_drop")

# Llama-2-7B (its config.json) with a LoRA adapter of rank 16 on q_proj and v_proj (adapter_config.json)
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
SEQ = 2048


def hand_flops_per_token() -> float:
    """Training FLOPs per token of the 7B LoRA run at sequence length 2048, written out."""
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    per_layer = 2 * h * h + 2 * h * h + 3 * h * inter + 2 * h  # q,o + k,v (no GQA) + gated MLP + 2 norms
    total = layers * per_layer + 2 * vocab * h + h  # + untied input embedding and LM head + final norm
    assert total == 6_738_415_616  # Llama-2-7B's published count
    embedding = vocab * h  # the input lookup: no matmul
    adapters = layers * 16 * ((h + h) + (h + h))  # r x (in + out) on q_proj and v_proj
    # forward (2) + activation grads (2) for every matmul weight, weight grads (2) for the adapters only,
    # + attention scores and values: 12 x layers x hidden x seq_len
    return 4 * (total - embedding) + 2 * adapters + 12 * layers * h * SEQ


def rate_at_mfu(share: float, gpus: int = GPUS_N) -> float:
    """Tokens/s of the whole job that gives MFU ``share`` on ``gpus`` A100s (312 TFLOPS bf16 each)."""
    return share * gpus * 312e12 / hand_flops_per_token()


HEALTHY_RATE = rate_at_mfu(0.20)  # inside the fine-tuning range (15-25%)
CONFIG = {"max_steps": N, "logging_steps": 1, "learning_rate": 2e-4, "warmup_steps": 10, "max_grad_norm": 1.0,
          "per_device_train_batch_size": 4, "max_seq_length": SEQ, "bf16": True, "eval_strategy": "no",
          "save_steps": 50, "_name_or_path": "meta-llama/Llama-2-7b-hf", **LLAMA_7B,
          "peft_config": {"default": LORA}}

SMI = [
    "+-----------------------------------------------------------------------------------------+\n",
    "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |\n",
    "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n",
    "|=========================================+========================+======================|\n",
] + [
    f"|   {i}  NVIDIA A100-SXM4-80GB          On  |   00000000:0{i}:00.0 Off |                    0 |\n"
    f"| N/A   34C    P0             62W /  400W |       4MiB /  81920MiB |      0%      Default |\n"
    for i in range(GPUS_N)
]


def _flat(_k: int) -> float:
    return 60.0


def _climb(k: int) -> float:  # 60% until step 120, then a straight climb to 97% at the last step (the crash)
    return 60.0 if k <= 120 else 60.0 + 37.0 * (k - 120) / (N - 120)


def _drift(k: int) -> float:  # rank 2 only: 60% until step 80, then drifting up to 85%
    return 60.0 if k <= 80 else 60.0 + 25.0 * (k - 80) / (N - 80)


def _util_busy(_k: int) -> float:
    return 97.0


def _util_starved(k: int) -> float:  # the data loader stops keeping up at step 70
    return 97.0 if k < 70 else 30.0


def _jitter(k: int, rank: int) -> float:
    return 0.4 * math.sin(1.7 * k + rank)


def _spec(base: Path, run_id: str, *, mem, util, rate, jitter: bool = False, **extra) -> dict:
    """An HF-shaped 4-GPU LoRA run: one history row per step (loss, grad norm, LR, tokens seen) and the totals row
    after the last, one system sample per step a quarter step after its log, and three samples while the model
    loads (before step 1)."""
    rows, stats, tokens = [], [], 0.0
    for k in range(1, N + 1):
        tokens += rate(k) * DT
        rows.append({"train/loss": 2.0 * math.exp(-k / 80) + 1.0, "train/grad_norm": 0.8 + 0.05 * math.cos(k),
                     "train/learning_rate": 2e-4 * min(1.0, k / 10), "train/epoch": k / N, "train/global_step": k,
                     "train/num_input_tokens_seen": tokens, "_t": LOAD + k * DT})
        sample = {"_t": LOAD + (k + 0.25) * DT, "proc.memory.rssMB": 8000.0, "cpu": 30.0, "memory_percent": 20.0}
        for r in range(GPUS_N):
            pct = mem[r](k) + (_jitter(k, r) if jitter else 0.0)
            sample.update({f"gpu.{r}.memoryAllocated": pct, f"gpu.{r}.memoryAllocatedBytes": pct / 100 * CARD,
                           f"gpu.{r}.gpu": util(k), f"gpu.{r}.enforcedPowerLimitWatts": 400.0,
                           f"gpu.{r}.temp": 60.0})
        stats.append(sample)
    # HF's last row: the run's totals, after the last step (training ends here)
    rows.append({"train/train_runtime": N * DT, "train/global_step": N, "_t": LOAD + (N + 1) * DT})
    for t, pct in ((5.0, 5.0), (10.0, 20.0), (15.0, 40.0)):  # loading the model: not training yet
        stats.append({"_t": t, **{f"gpu.{r}.memoryAllocated": pct for r in range(GPUS_N)},
                      **{f"gpu.{r}.gpu": 0.0 for r in range(GPUS_N)}})
    return {"dir": str(base / run_id), "id": run_id, "config": CONFIG, "rows": rows, "stats": stats, **extra}


@pytest.fixture(scope="module")
def machine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("machine")
    flat = [_flat] * GPUS_N
    specs = [
        # the GPU named by the client itself (its metadata: x_stats_gpu_type), the run exits with code 1
        _spec(base, "oomclimb", mem=[_climb] * GPUS_N, util=_util_busy, rate=lambda k: HEALTHY_RATE, exit_code=1,
              settings={"x_disable_meta": False, "x_stats_gpu_type": "NVIDIA A100-SXM4-80GB",
                        "x_stats_gpu_count": GPUS_N}),
        # no name anywhere: inferred from the samples (80 GiB per card, 400 W limit)
        _spec(base, "drift", mem=[_flat, _flat, _drift, _flat], util=_util_busy, rate=lambda k: HEALTHY_RATE),
        # nvidia-smi's table in the captured console names the cards
        _spec(base, "starved", mem=flat, util=_util_starved,
              rate=lambda k: HEALTHY_RATE * (_util_starved(k) / 97.0), console=SMI),
        _spec(base, "healthy", mem=flat, util=_util_busy, rate=lambda k: HEALTHY_RATE, jitter=True),
    ]
    dirs = write_runs(specs, timeout=300)
    return {s["id"]: d for s, d in zip(specs, dirs)}


def _findings(run_dir: Path) -> dict[str, list]:
    report = analyze(load(run_dir))
    (run,) = report.runs
    assert [e for e in run.errors if e["detector"] in MACHINE] == []
    out: dict[str, list] = {}
    for f in run.findings:
        out.setdefault(f.signature, []).append(f)
    return out


# --- import ---------------------------------------------------------------------------------------------------


def test_system_metrics_land_on_the_training_steps(machine_runs: dict[str, Path]) -> None:
    frame = load(machine_runs["drift"])
    for r in range(GPUS_N):
        mem = series(frame, f"system/gpu.{r}.memory_allocated_pct")
        train = mem[mem.index >= 1]
        # one sample per step, a quarter step after the step's log: it lands on that step
        assert list(train.index) == list(range(1, N + 1))
        expect = [(_drift if r == 2 else _flat)(k) for k in range(1, N + 1)]
        np.testing.assert_allclose(train.to_numpy(), expect)
        assert (series(frame, f"system/gpu.{r}.util_pct").loc[1:] == 97.0).all()
        assert mem.index.min() >= 0  # loading samples before step 1 go back at most one logging interval
    assert (series(frame, "system/proc.rss_mb").loc[1:] == 8000.0).all()
    info = run_info(frame)
    assert info.config["gpu_count"] == GPUS_N and info.config["gpu_memory_gib"] == 80.0
    assert info.config["gpu_name"] == "A100 SXM4 80GB" and info.config["gpu_name_from"].startswith("inferred")
    # the other series keep their shape: system metrics are ordinary rows beside them
    assert list(series(frame, "train/loss").index) == list(range(1, N + 1))


def test_gpu_name_from_metadata_and_from_nvidia_smi(machine_runs: dict[str, Path]) -> None:
    meta = run_info(load(machine_runs["oomclimb"])).config
    assert (meta["gpu_name"], meta["gpu_count"], meta["gpu_name_from"]) == ("NVIDIA A100-SXM4-80GB", 4, "W&B metadata")
    smi = run_info(load(machine_runs["starved"])).config
    assert smi["gpu_name"] == "NVIDIA A100-SXM4-80GB" and smi["gpu_count"] == GPUS_N
    assert smi["gpu_memory_gib"] == 80.0 and smi["gpu_name_from"] == "nvidia-smi in the console"


H200_SMI = """\
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA H200                    On  |   00000000:00:06.0 Off |                    0 |
| N/A   36C    P0             78W /  700W |       0MiB / 143771MiB |      0%      Default |
"""  # verbatim from an H200 machine


def test_nvidia_smi_text() -> None:
    real = parse_nvidia_smi(H200_SMI)
    assert real == {"gpu_name": "NVIDIA H200", "gpu_count": 1, "gpu_memory_gib": round(143771 / 1024, 2)}
    # the card the table names, and the one its size and power limit would name
    assert gpu_spec(real["gpu_name"]).name == "H200" and infer_gpu(real["gpu_memory_gib"], 700.0).name == "H200"
    got = parse_nvidia_smi("".join(SMI))
    assert got == {"gpu_name": "NVIDIA A100-SXM4-80GB", "gpu_count": 4, "gpu_memory_gib": 80.0}
    listing = "GPU 0: Tesla T4 (UUID: GPU-aa)\nGPU 1: Tesla T4 (UUID: GPU-bb)\n"
    assert parse_nvidia_smi(listing) == {"gpu_name": "Tesla T4", "gpu_count": 2}
    assert parse_nvidia_smi("no gpus here") == {}


# --- detectors on the planted runs ---------------------------------------------------------------------------


def test_memory_climb_to_97_before_the_crash(machine_runs: dict[str, Path]) -> None:
    got = _findings(machine_runs["oomclimb"])
    (head,) = got["memory_headroom"]
    crossed = next(k for k in range(1, N + 1) if _climb(k) >= 90.0)
    assert head.step == crossed and head.severity == Severity.ERROR  # it reached 97% and the run exited 1
    assert head.evidence["peak_pct"] == pytest.approx(97.0) and head.evidence["crossed_step"] == crossed
    assert head.evidence["best_knob"] in head.fix  # the 7B config gives the memory estimate its knob
    (leak,) = got["memory_growth"]
    # a leak from where it rises a quarter of min_growth (20%) above where it started (60%)
    assert leak.step == next(k for k in range(1, N + 1) if _climb(k) > 60.0 * 1.05)
    assert leak.severity == Severity.WARNING and len(leak.evidence["metrics"]) == GPUS_N
    assert "rank_imbalance" not in got and "input_bound" not in got and "low_mfu" not in got


def test_one_rank_drifting(machine_runs: dict[str, Path]) -> None:
    got = _findings(machine_runs["drift"])
    (imb,) = [f for f in got["rank_imbalance"] if f.severity >= Severity.WARNING]
    gap = next(k for k in range(1, N + 1) if _drift(k) - _flat(k) > 15.0)  # 15 points from the others' median
    assert imb.step == gap and imb.metric == "system/gpu.2.memory_allocated_pct"
    assert imb.evidence["rank"] == 2 and imb.evidence["ranks"] == [0, 1, 2, 3]
    (leak,) = got["memory_growth"]  # the drifting rank, alone, also climbs
    assert leak.evidence["metrics"] == ["system/gpu.2.memory_allocated_pct"]
    assert "memory_headroom" not in got  # 85% at most


def test_starved_gpus_input_bound_low_mfu_and_throughput_drop(machine_runs: dict[str, Path]) -> None:
    got = _findings(machine_runs["starved"])
    drop = next(k for k in range(1, N + 1) if _util_starved(k) < 60.0)
    (inb,) = got["input_bound"]
    assert inb.step == drop and inb.severity == Severity.WARNING  # a step change: the smoothed series crosses there too
    assert inb.evidence["util_median"] == 30.0
    (thr,) = got["throughput_drop"]
    assert thr.step == drop and thr.metric == "train/num_tokens"  # tokens/s from num_input_tokens_seen / wall time
    (low,) = got["low_mfu"]
    # most of the run runs at the starved rate: the median tokens/s is that rate
    starved_rate = HEALTHY_RATE * 30.0 / 97.0
    expect = starved_rate * hand_flops_per_token() / (GPUS_N * 312e12)
    assert low.evidence["mfu"] == pytest.approx(expect, rel=1e-4) and low.severity == Severity.WARNING
    assert low.evidence["gpus"] == GPUS_N and "formula" in low.evidence


def test_healthy_multi_gpu_run_stays_quiet(machine_runs: dict[str, Path]) -> None:
    report = analyze(load(machine_runs["healthy"]))
    (run,) = report.runs
    loud = [(f.signature, f.summary) for f in run.findings if f.signature in MACHINE and f.severity >= Severity.INFO]
    assert loud == []
    assert {s["detector"] for s in run.skipped}.isdisjoint(MACHINE)  # each of them ran on it


def test_report_draws_the_machine(machine_runs: dict[str, Path]) -> None:
    html = render_html(analyze(load(machine_runs["oomclimb"])))
    for plot in ("gpu_memory", "gpu_util", "loss"):
        assert f'data-plot="{plot}"' in html
    assert "memory_headroom @" in html  # the finding marked on the memory plot's caption


# --- console: the OOM's numbers, memory and throughput fields --------------------------------------------------

# verbatim from torch 2.11 on an H200 (141 GB), after a loop that kept 3 GiB per step
OOM = ("Traceback (most recent call last):\n  File \"oom.py\", line 14, in <module>\n    keep.append(torch.empty("
       "int(3 * 2**30), dtype=torch.uint8, device=\"cuda\"))\ntorch.OutOfMemoryError: CUDA out of memory. Tried to "
       "allocate 3.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which 961.12 MiB is free. Including non-PyTorch "
       "memory, this process has 138.85 GiB memory in use. Of the allocated memory 138.28 GiB is allocated by PyTorch, "
       "and 0 bytes is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
       "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.\n")


def _leak_gib(k: int) -> float:  # what that loop's log printed: 3 GiB a step over a 0.99 GiB start
    return 3.0 * k - 0.013


def test_console_oom_gives_memory_headroom_with_the_numbers_and_the_knob(tmp_path: Path) -> None:
    run = tmp_path / "out"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(LLAMA_7B))
    lines = ["  per_device_train_batch_size = 8", "  max_seq_length = 4096"]
    lines += [f"{{'loss': {1.0 / k:.4f}, 'grad_norm': 1.0, 'learning_rate': 1e-05, 'memory_gib': {_leak_gib(k):.3f}, "
              f"'step': {k}}}" for k in range(1, 47)]
    (run / "train.log").write_text("\n".join(lines) + "\n" + OOM)
    frame = load(run)
    info = run_info(frame)
    (head,) = detect("memory_headroom", frame, info)
    assert head.severity == Severity.ERROR
    ev = head.evidence
    assert (ev["tried_to_allocate_gib"], ev["total_capacity_gib"], ev["already_allocated_gib"]) == (3.0, 139.8, 138.28)
    assert ev["free_gib"] == pytest.approx(961.12 / 1024, abs=1e-4)
    assert ev["short_gib"] == pytest.approx(3.0 - 961.12 / 1024, abs=1e-4)
    # the logged memory over the capacity the allocator printed: where it crossed 90% of the card
    assert head.step == next(k for k in range(1, 47) if _leak_gib(k) / 139.8 * 100 >= 90.0)
    knob = estimate_from_config(info.config, gpu_total_gib=139.8)["best_knob"]
    assert knob and ev["best_knob"] == knob and knob in head.fix


def test_console_fields_map_to_machine_metrics() -> None:
    from autopsy.importers.console import parse_console_text

    text = "".join(
        f"2024/05/07 11:45:{k:02d} - mmengine - INFO - Iter(train) [{k:3d}/100]  lr: 1.0e-04  eta: 1:00:00  "
        f"time: 2.9000  data_time: 1.9000  memory: 15266  loss: 0.69  tokens/s: 1500  mfu: 3.1\n"
        for k in range(1, 41)
    )
    got = parse_console_text(text, run="r")
    names = metric_names(got.frame)
    assert {"train/iter_time", "train/data_time", "train/memory_allocated", "train/tokens_per_second",
            "train/mfu"} <= names
    from autopsy.runinfo import attach_runs

    frame = attach_runs(got.frame, got.runs)
    (inb,) = detect("input_bound", frame, run_info(frame, "r"))
    assert inb.metric == "train/data_time" and inb.evidence["data_share"] == pytest.approx(1.9 / 2.9, rel=1e-4)
    (low,) = detect("low_mfu", frame, run_info(frame, "r"))  # the logged MFU (percent), no arithmetic needed
    assert low.evidence["mfu"] == pytest.approx(0.031) and low.severity == Severity.WARNING


# --- MFU arithmetic ----------------------------------------------------------------------------------------------


def test_mfu_of_a_7b_lora_run_on_an_a100_by_hand(tmp_path: Path) -> None:
    counts = param_counts({"model": LLAMA_7B, "adapter": LORA})
    assert counts == {"params": 6_738_415_616, "trainable": 32 * 16 * 4 * 4096, "lora": True,
                      "embedding": 32000 * 4096, "layers": 32, "hidden": 4096}
    flops, formula = flops_per_token(params=counts["params"], trainable=counts["trainable"],
                                     embedding_params=counts["embedding"], layers=32, hidden=4096, seq_len=SEQ)
    assert flops == hand_flops_per_token()
    # one A100 at 1,200 tokens/s
    got = mfu(1200.0, flops, gpu_spec("NVIDIA A100-SXM4-80GB"), gpus=1, formula=formula)
    assert got.mfu == pytest.approx(1200.0 * hand_flops_per_token() / 312e12, rel=1e-12)
    assert got.peak_tflops == 312.0 and "312" in got.formula and "12 x 32 x 4096 x 2048" in got.formula
    # the same run through the detector: an HF output dir with config.json, adapter_config.json and its console
    run = tmp_path / "lora7b"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(LLAMA_7B))
    (run / "adapter_config.json").write_text(json.dumps(LORA))
    lines = [f"  max_seq_length = {SEQ}"]
    lines += [f"{{'loss': {2.0 - k / 100}, 'learning_rate': 1e-05, 'tokens_per_second': 1200.0, 'step': {10 * k}}}"
              for k in range(1, 21)]
    (run / "train.log").write_text("\n".join(lines) + "\n")
    frame = load(run)
    info = run_info(frame)
    assert "gpu_name" not in info.config  # a console names no card: low_mfu has no peak to divide by
    assert detect("low_mfu", frame, info) == []
    info.config["gpu_name"] = "NVIDIA A100-SXM4-80GB"  # as W&B's metadata or nvidia-smi would record it
    (low,) = detect("low_mfu", frame, info)
    assert low.evidence["mfu"] == pytest.approx(got.mfu, rel=1e-4)
    assert low.severity == Severity.INFO  # 11.4%: under 15% but not under half of it


def test_gpu_table_and_inference() -> None:
    assert gpu_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM" and gpu_spec("NVIDIA H100 PCIe").peak_tflops == 756.0
    assert gpu_spec("Tesla T4").dtype == "fp16" and gpu_spec("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert gpu_spec("NVIDIA L40S") is None and gpu_spec(None) is None
    assert {"A100 SXM4 80GB", "H100 SXM", "H200", "L4", "A10G", "T4", "V100 SXM2 16GB", "RTX 3090", "RTX 4090"} <= set(GPUS)
    # 80 GiB with a 400 W limit is only the A100 SXM4; 22.5 GiB alone fits the L4, A10 and A10G
    assert infer_gpu(80.0, 400.0).name == "A100 SXM4 80GB" and infer_gpu(22.5) is None
    assert infer_gpu(22.5, 72.0).name == "L4"


# --- the real 4-GPU runs --------------------------------------------------------------------------------------


def test_tlab_runs_load_four_gpus_and_the_card() -> None:
    needs_shared(REAL_LOGS)
    tlab = REAL_LOGS / "tlab-llm-alignment" / "wandb"
    frame = load(tlab / "run-20241216_113020-wvk49vqj")
    info = run_info(frame)
    loss = series(frame, "train/loss")
    for r in range(4):
        for field in ("memory_allocated_pct", "util_pct"):
            s = series(frame, f"system/gpu.{r}.{field}")
            assert len(s) > 100 and s.index.min() >= 0 and s.index.max() <= loss.index.max() + 30
        used = series(frame, f"system/gpu.{r}.memory_allocated_bytes")
        pct = series(frame, f"system/gpu.{r}.memory_allocated_pct")
        # W&B's bytes over its percent is the card's size
        assert np.allclose(used / (pct / 100) / 2**30, 80.0, rtol=1e-3)
    assert (info.config["gpu_count"], info.config["gpu_memory_gib"]) == (4, 80.0)
    assert info.config["gpu_name"] == "A100 SXM4 80GB"  # 80 GiB at a 400 W limit: inferred, and said so
    assert "400 W" in info.config["gpu_name_from"]
    html = render_html(analyze(frame))
    assert 'data-plot="gpu_memory"' in html and 'data-plot="gpu_util"' in html
    # the per-core CPU records are read from their bytes (cpu total only): the same numbers wandb's protobuf gives
    from wandb.proto import wandb_internal_pb2 as pb

    from autopsy.importers._leveldb_log import LogStream

    totals = []
    with open(next((tlab / "run-20241216_113020-wvk49vqj").glob("*.wandb")), "rb") as fh:
        for raw in LogStream(fh):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "stats":
                totals += [float(i.value_json) for i in rec.stats.item if i.key == "cpu"]
    cpu = frame[frame["metric"] == "system/cpu_pct"]["value"].to_numpy()
    assert len(cpu) > 100 and np.isin(cpu, totals).all()
    # the killed run used one of the four cards: a note, not an imbalance
    killed = analyze(load(tlab / "run-20241216_132720-chk58nkd")).runs[0]
    notes = [f for f in killed.findings if f.signature == "rank_imbalance"]
    assert [(f.severity, f.evidence["idle_ranks"]) for f in notes] == [(Severity.INFO, [1, 2, 3])]
    assert not [f for f in killed.findings if f.signature in MACHINE and f.severity >= Severity.WARNING]


# --- the pieces ----------------------------------------------------------------------------------------------


def test_steps_from_wall_time() -> None:
    from autopsy.importers._wandb_system import steps_at

    walls = np.array([100.0, 110.0, 120.0, 130.0])  # steps 10, 20, 30, 40: one step per second
    steps = np.array([10.0, 20.0, 30.0, 40.0])
    times = np.array([50.0, 95.0, 115.0, 131.0, 200.0])
    got = steps_at(times, walls, steps, start=60.0, end=None)
    # before the start: none; before the first log: back at most one logging interval (10 steps);
    # between logs: interpolated; after the last: on at the last pace, at most one interval
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1:], [5.0, 25.0, 41.0, 50.0])
    clean = steps_at(times, walls, steps, start=60.0, end=130.0)  # a clean finish: training ended at the last row
    assert np.isnan(clean[3:]).all()
    assert np.isnan(steps_at(times, walls[:1], steps[:1], start=None, end=None)).all()  # one row: no pace


def test_allocator_plateau_is_a_note_and_a_climb_a_leak() -> None:
    from autopsy.frame import make_frame
    from autopsy.runinfo import RunInfo, attach_runs

    k = np.arange(1, 401)
    plateau = np.minimum(40.0 + 30.0 * k / 120.0, 70.0)  # rises over the first 120 steps, then holds at 70%
    leak = 40.0 + 30.0 * k / 400.0  # rises to the end
    for values, kind, severity in ((plateau, "plateau", Severity.INFO), (leak, "leak", Severity.WARNING)):
        frame = make_frame(run="r", source="wandb", metric=["train/loss"] * 400 + ["system/gpu.0.memory_allocated_pct"] * 400,
                           step=np.r_[k, k], value=np.r_[np.full(400, 1.0), values])
        attach_runs(frame, {"r": RunInfo(name="r")})
        (f,) = detect("memory_growth", frame, run_info(frame, "r"))
        assert f.evidence["kind"] == kind and f.severity == severity
