"""Write an HF-shaped TensorBoard event file of N scalar events with the real SummaryWriter."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def generate(out_dir: Path, *, events: int = 400_000, eval_every: int = 500) -> Path:
    """HF TensorBoardCallback's shape: args/model_config text, then per step train/loss, grad_norm,
    learning_rate, epoch; eval/loss, eval/runtime every ``eval_every`` steps. Some NaN/inf planted."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = out_dir / "runs" / "Jan01_00-00-00_bench-host"
    run_dir.mkdir(parents=True, exist_ok=True)
    w = SummaryWriter(log_dir=str(run_dir), max_queue=10_000, flush_secs=3600)
    w.add_text("args", json.dumps({"learning_rate": 5e-5, "max_steps": events // 4, "logging_steps": 1}, indent=2))
    w.add_text("model_config", json.dumps({"model_type": "llama", "vocab_size": 32000}, indent=2))
    n = 0
    step = 0
    while n < events:
        step += 1
        loss = 3.0 * math.exp(-step / 20_000) + 0.01 * math.sin(step)
        gn = 1.0 + 0.1 * math.cos(step)
        if step % 10_007 == 0:
            loss, gn = float("nan"), float("inf")
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/grad_norm", gn, step)
        w.add_scalar("train/learning_rate", 5e-5 * (1 - step / (events // 4 + 1)), step)
        w.add_scalar("train/epoch", step / 1000, step)
        n += 4
        if step % eval_every == 0 and n + 2 <= events:
            w.add_scalar("eval/loss", loss + 0.1, step)
            w.add_scalar("eval/runtime", 12.5, step)
            n += 2
    w.flush()
    w.close()
    return run_dir


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]), events=int(sys.argv[2]) if len(sys.argv) > 2 else 400_000))
