"""Localization cost: replay's hooked passes vs one plain forward+backward and torch.autograd.detect_anomaly.

    .venv/bin/python bench/replay/bench_localize.py --size tiny|small|1b [--device cpu|cuda] [--dtype bfloat16]
                                                    [--repeat N] [--markdown]

A Llama-shaped model is built from a config (random weights, nothing downloaded): ``tiny`` (hidden 64, 4 layers,
batch 4x64), ``small`` (hidden 256, 4 layers, batch 8x128), ``1b`` (TinyLlama's shape: hidden 2048, 22 layers, 32
heads / 4 KV heads, vocab 32000, ~1.1B parameters; batch 4x512). Measured, as medians of interleaved repeats after a
warm-up, with the peak GPU memory of each (CUDA only):

* plain: one forward+backward on a clean batch (the reference);
* hooked pass: ``autopsy.replay.trace.trace`` on the clean batch (what replay pays when nothing fails);
* detect_anomaly: one forward+backward under ``torch.autograd.detect_anomaly(check_nan=True)`` on the clean batch;
* localize: ``autopsy.replay.localize.localize`` on the same model with a fault planted, every pass it needs included:
  a forward overflow in the middle layer's MLP (up_proj x1e19, down_proj x1e20: its output passes the dtype's max),
  a backward-only fault (the embedding's output goes through ``+ 0 * sqrt(out - out)``: a NaN gradient, the worst
  case: the hooked pass, the gradient-event pass and the capture pass);
* detect_anomaly on the planted forward overflow (it raises at the first NaN it meets in the backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

SIZES = {
    "tiny": dict(hidden=64, layers=4, heads=4, kv=4, inter=128, vocab=124, rows=4, seq=64),
    "small": dict(hidden=256, layers=4, heads=4, kv=4, inter=512, vocab=124, rows=8, seq=128),
    "1b": dict(hidden=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32000, rows=4, seq=512),
}


def build(size: str, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=max(64, s["seq"]), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model.train()


def plant(model: Any) -> str:
    """Scale the middle layer's MLP so that its output passes the dtype's max while its input stays finite."""
    import torch

    k = len(model.model.layers) // 2
    mlp = model.model.layers[k].mlp
    with torch.no_grad():
        mlp.up_proj.weight.mul_(1e19)
        mlp.down_proj.weight.mul_(1e20)
    return f"model.layers.{k}.mlp.down_proj"


def timed(fn: Any, sync: Any, device: Any, models: list) -> tuple[float, float | None]:
    """(seconds, peak GPU memory above what was allocated before: the weights) of one call, with no gradients left
    over from the call before."""
    import torch

    for m in models:
        m.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t = time.perf_counter()
    fn()
    sync()
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return dt, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--tiny", action="store_true", help="same as --size tiny (a CPU check of the script)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--rows", type=int, default=None, help="override the size's batch rows")
    ap.add_argument("--seq", type=int, default=None, help="override the size's sequence length")
    a = ap.parse_args()
    import torch

    from autopsy.replay.localize import localize
    from autopsy.replay.trace import run_loss, trace

    size = "tiny" if a.tiny else a.size
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    s = dict(SIZES[size], rows=a.rows or SIZES[size]["rows"], seq=a.seq or SIZES[size]["seq"])
    t0 = time.perf_counter()
    model = build(size, dev, dtype)
    broken = build(size, dev, dtype)
    where = plant(broken)
    backward = build(size, dev, dtype)
    emb = backward.get_input_embeddings()
    emb.register_forward_hook(lambda m, args, out: out + 0 * torch.sqrt(out - out))
    built = time.perf_counter() - t0
    ids = torch.randint(4, s["vocab"], (s["rows"], s["seq"]), device=dev, generator=None)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        run_loss(model, batch).backward()

    def hooked() -> None:
        model.zero_grad(set_to_none=True)
        trace(model, batch)

    def anomaly(m: Any) -> Any:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            try:
                with torch.autograd.detect_anomaly(check_nan=True):
                    run_loss(m, batch).backward()
            except RuntimeError:
                pass  # it raises at the first NaN it meets

        return run

    found: dict[str, str] = {}

    def locate(m: Any, key: str) -> Any:
        def run() -> None:
            f = localize(m, batch)
            found[key] = f"{f[0].evidence.get('module')} ({f[0].evidence.get('phase')})"

        return run

    warnings.filterwarnings("ignore")
    fns = {
        "plain fwd+bwd (clean batch)": plain,
        "hooked pass, trace() (clean batch)": hooked,
        "detect_anomaly fwd+bwd (clean batch)": anomaly(model),
        "localize() (planted forward overflow)": locate(broken, "forward"),
        "localize() (planted backward fault)": locate(backward, "backward"),
        "detect_anomaly fwd+bwd (planted forward overflow)": anomaly(broken),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float | None] = {}
    for k, f in fns.items():  # warm-up, and the peak memory of each alone
        peaks[k] = timed(f, sync, dev, [model, broken, backward])[1]
    for _ in range(a.repeat):  # interleaved, so drift hits every variant alike
        for k, f in fns.items():
            times[k].append(timed(f, sync, dev, [model, broken, backward])[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["plain fwd+bwd (clean batch)"]
    n_params = sum(p.numel() for p in model.parameters())
    head = (f"device={torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'} torch={torch.__version__} "
            f"size={size} ({n_params / 1e6:.1f}M params, {str(dtype).replace('torch.', '')}) batch={s['rows']}x{s['seq']} "
            f"threads={a.threads} repeat={a.repeat} built_in={built:.1f}s planted={where} localized: {found}")
    print(head)
    if a.markdown:
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        print(f"\nweights: {weights:.2f} GiB per model (three on the device: clean, forward and backward fault)\n")
        print("| variant | median | x plain | peak GPU memory above the weights |\n|---|---|---|---|")
    for k, v in med.items():
        peak = f"{peaks[k]:.2f} GiB" if peaks[k] is not None else "n/a (CPU)"
        if a.markdown:
            print(f"| {k} | {v * 1e3:.1f} ms | {v / ref:.2f}x | {peak} |")
        else:
            print(f"{k:45s} median {v * 1e3:9.2f} ms   {v / ref:5.2f}x plain   peak {peak}")


if __name__ == "__main__":
    main()
