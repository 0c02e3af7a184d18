"""Localization cost: the hooked pass of autopsy.replay.localize.trace vs one plain forward+backward and
torch.autograd.detect_anomaly, on the same batch and a 4-layer tiny Llama (CPU, or CUDA when present).

    .venv/bin/python bench/replay/bench_localize.py [--hidden 256] [--seq 128] [--rows 8] [--repeat 15]

Prints medians and ratios to plain (the goal: <= 1.3x plain, always below anomaly mode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    import tinyllama
    from autopsy.replay.device import pick_device
    from autopsy.replay.localize import run_loss, trace

    torch.set_num_threads(a.threads)
    dev = pick_device()
    model = tinyllama.make_model(hidden=a.hidden, layers=a.layers).to(dev)
    model.config.max_position_embeddings = max(64, a.seq)
    ids = torch.randint(4, model.config.vocab_size, (a.rows, a.seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain():
        model.zero_grad(set_to_none=True)
        run_loss(model, batch).backward()
        sync()

    def hooked():
        model.zero_grad(set_to_none=True)
        trace(model, batch)
        sync()

    def anomaly():
        model.zero_grad(set_to_none=True)
        with torch.autograd.detect_anomaly(check_nan=True):
            run_loss(model, batch).backward()
        sync()

    import warnings

    warnings.filterwarnings("ignore")
    fns = {"plain": plain, "localize": hooked, "detect_anomaly": anomaly}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(a.repeat):  # interleaved, so drift hits every variant alike
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={dev} torch={torch.__version__} layers={a.layers} hidden={a.hidden} batch={a.rows}x{a.seq} "
          f"threads={a.threads} repeat={a.repeat}")
    for k, v in med.items():
        print(f"{k:15s} median {v * 1e3:8.2f} ms   {v / med['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
