"""Detector bench: precision/recall per signature over a seed x noise x shape grid, the false-alarm rate on
healthy runs, and the speed of the whole suite on a 1M-step run with 10 metrics.

    .venv/bin/python bench/detectors/run.py            # writes bench/detectors/RESULTS.md
    .venv/bin/python bench/detectors/run.py --speed    # speed only

A planted signature counts as found at any severity; any other finding at warning or above that the truth
neither expects nor allows is a false positive.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from autopsy import analyze
from autopsy.findings import Severity
from autopsy.frame import make_frame
from autopsy.runinfo import RunInfo, attach_runs, run_info
from autopsy.synth import FAILURES, SHAPES, make_run

HERE = Path(__file__).resolve().parent
SEEDS = range(4)
NOISES = (0.01, 0.04, 0.08)
FAILURE_SHAPES = ("exp", "power", "slow")
LOGGING = (1, 10)


def grid() -> tuple[dict, int, int, list]:
    stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # tp, fn, fp
    healthy = loud = 0
    misses = []
    for failure in FAILURES:
        shapes = SHAPES if failure is None else FAILURE_SHAPES
        for shape, seed, noise, ls in itertools.product(shapes, SEEDS, NOISES, LOGGING):
            frame, truth = make_run(failure=failure, shape=shape, seed=seed, noise=noise, logging_steps=ls, at=0.3 + 0.1 * seed)
            fs = analyze(frame).runs[0].findings
            found = {f.signature for f in fs if f.severity >= Severity.WARNING or f.signature in truth.expected}
            if failure is None:
                healthy += 1
                if found:
                    loud += 1
                    misses.append(("healthy", shape, seed, noise, ls, sorted(found)))
                continue
            for sig in truth.expected:
                stats[sig][0 if sig in found else 1] += 1
                if sig not in found:
                    misses.append((failure, shape, seed, noise, ls, "missed " + sig))
            for sig in found - set(truth.expected) - truth.allowed:
                stats[sig][2] += 1
                misses.append((failure, shape, seed, noise, ls, "false " + sig))
    return stats, healthy, loud, misses


def speed(repeats: int = 3) -> dict[str, float]:
    n = 1_000_000
    rng = np.random.default_rng(0)
    steps = np.arange(1, n + 1)
    names = ["train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "eval/loss",
             "train/tokens_per_second", "train/memory_allocated", "train/accuracy", "eval/accuracy", "train/loss_scale"]
    t = steps / n
    vals = [2 + np.exp(-5 * t) + 0.05 * rng.normal(size=n), 0.5 + 0.1 * rng.random(n), 1e-4 * np.minimum(1, 20 * t),
            3 * t, 2.1 + np.exp(-5 * t), 5000 + rng.normal(size=n), 1e10 + rng.normal(size=n), t, t, np.full(n, 65536.0)]
    frame = make_frame(run="big", source="bench", metric=np.repeat(np.array(names, dtype=object), n),
                       step=np.tile(steps, len(names)), value=np.concatenate(vals))
    attach_runs(frame, {"big": RunInfo(name="big", config={"max_grad_norm": 1.0, "learning_rate": 1e-4}, max_steps=n)})
    times, det_times = [], collections.defaultdict(list)
    from autopsy.detectors import registered

    for _ in range(repeats):
        sub = frame.copy()
        sub.attrs = frame.attrs
        t0 = time.perf_counter()
        analyze(sub)
        times.append(time.perf_counter() - t0)
        sub = frame.copy()
        sub.attrs = frame.attrs
        for spec in registered().values():
            t1 = time.perf_counter()
            spec.run(sub, run_info(frame, "big"))
            det_times[spec.name].append(time.perf_counter() - t1)
    out = {"analyze_total_s": statistics.median(times)}
    out.update({f"detector:{k}": statistics.median(v) for k, v in det_times.items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed", action="store_true", help="speed bench only")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    lines = ["# Detector bench", "", f"python {platform.python_version()}, {platform.machine()}, `bench/detectors/run.py`", ""]
    if not args.speed:
        t0 = time.perf_counter()
        stats, healthy, loud, misses = grid()
        lines += [f"Grid: seeds {list(SEEDS)} x noise {list(NOISES)} x shapes {list(FAILURE_SHAPES)} x logging_steps {list(LOGGING)} "
                  f"per failure; healthy runs over all {len(SHAPES)} shapes ({time.perf_counter() - t0:.0f} s).", "",
                  "| signature | planted | recall | precision | false positives |", "|---|---:|---:|---:|---:|"]
        for sig, (tp, fn, fp) in sorted(stats.items()):
            rec = tp / (tp + fn) if tp + fn else float("nan")
            prec = tp / (tp + fp) if tp + fp else float("nan")
            lines.append(f"| `{sig}` | {tp + fn} | {rec:.3f} | {prec:.3f} | {fp} |")
        lines += ["", f"Healthy runs with any finding at warning or above: **{loud} / {healthy} ({loud / healthy:.1%})** (goal <= 2%).", ""]
        if misses:
            lines += ["Misses and false alarms (first 30):", ""] + [f"- {m}" for m in misses[:30]] + [""]
    sp = speed()
    lines += ["## Speed: 1M steps x 10 metrics (10M rows), median of 3", "",
              f"- `analyze()` whole suite (including analysis.py's own passes over the frame): **{sp['analyze_total_s']:.2f} s**", ""]
    lines += ["| detector | s |", "|---|---:|"] + [f"| {k.split(':', 1)[1]} | {v:.3f} |" for k, v in sorted(sp.items()) if k.startswith("detector:")]
    text = "\n".join(lines) + "\n"
    if not args.speed:
        (HERE / "RESULTS.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
