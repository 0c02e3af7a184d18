"""Benchmark: autopsy's fast TensorBoard reader against tbparse on an HF-shaped file of 400k scalar events.

    .venv/bin/python bench/tensorboard/bench_tb.py [--events 400000] [--repeats 5] [--data /tmp/autopsy-bench-tb]

The file is written once (real ``torch.utils.tensorboard.SummaryWriter``, HF TensorBoardCallback's shape:
args/model_config text, then train/loss, grad_norm, learning_rate, epoch every step, eval every 500 steps,
some NaN/inf) and reused. Each reader runs in its own fresh process (same interpreter and environment);
the child times only the load, after its imports, and reports its peak RSS; the parent times the whole
process. Medians over ``--repeats`` processes. Values are checked identical (NaN/inf included) before
timing. Results go to RESULTS.md beside this script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path, *, events: int, eval_every: int = 500) -> Path:
    """Write the HF-shaped run (once); returns its event file."""
    run_dir = out_dir / f"hf-{events}" / "runs" / "Jan01_00-00-00_bench-host"
    found = sorted(run_dir.glob("events.out.tfevents.*"))
    if found:
        return found[0]
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    w = SummaryWriter(log_dir=str(run_dir), max_queue=10_000, flush_secs=3600)
    w.add_text("args", json.dumps({"learning_rate": 5e-5, "max_steps": events // 4, "logging_steps": 1}, indent=2))
    w.add_text("model_config", json.dumps({"model_type": "llama", "vocab_size": 32000}, indent=2))
    n, step = 0, 0
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
    w.close()
    return sorted(run_dir.glob("events.out.tfevents.*"))[0]


def child(engine: str, path: Path, dump: Path | None) -> None:
    """One measured load in this (fresh) process."""
    import resource
    import warnings

    import numpy as np

    if engine in ("floor", "framing"):
        from autopsy.importers import _tfrecord

        t0 = time.perf_counter()
        buf = path.read_bytes()
        if engine == "floor":  # the record-splitting floor: read the file, find every record's bounds (no CRC)
            starts, _, _ = _tfrecord._boundaries(buf, np.frombuffer(buf, dtype=np.uint8))
            rows = len(starts)
        else:  # framing with every CRC verified, no decoding
            rows = len(_tfrecord.scan(buf).data_start)
        load = time.perf_counter() - t0
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"load_s": load, "rows": rows, "rss_mib": rss_mib}))
        return
    if engine == "tbparse":
        import tbparse

        warnings.simplefilter("ignore")  # tbparse's pandas deprecation warnings
        t0 = time.perf_counter()
        df = tbparse.SummaryReader(str(path), pivot=False, extra_columns={"wall_time"}).scalars
        load = time.perf_counter() - t0
        tag, step, value, wall = df["tag"].astype(str).to_numpy(), df["step"].to_numpy(), df["value"].to_numpy(), df["wall_time"].to_numpy()
    else:

        import pandas  # noqa: F401 - imports are not part of the load
        import tensorboard.compat.proto.event_pb2  # noqa: F401

        from autopsy.importers import read_files

        t0 = time.perf_counter()
        frame = read_files("tensorboard", [path], run="bench", engine=engine)
        load = time.perf_counter() - t0
        # HF's end-of-run entries go to the summary in autopsy; the bench file has none
        from autopsy.frame import wall_seconds

        wall = wall_seconds(frame)  # seconds since the epoch, as tbparse gives them
        tag, step, value = (frame["raw_metric"].astype(str).to_numpy(), frame["step"].to_numpy(),
                            frame["value"].to_numpy())
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dump is not None:
        order = np.lexsort((wall, step, tag))
        np.savez(dump, tag=tag[order].astype("U64"), step=step[order], value=value[order], wall=wall[order])
    print(json.dumps({"load_s": load, "rows": int(len(step)), "rss_mib": rss_mib}))


def run_child(engine: str, path: Path, dump: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--file", str(path)] + (["--dump", str(dump)] if dump else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path("/tmp/autopsy-bench-tb"))
    ap.add_argument("--child")
    ap.add_argument("--file", type=Path)
    ap.add_argument("--dump", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.file, args.dump)
        return
    import numpy as np

    path = generate(args.data, events=args.events)
    # identical values first (NaN/inf included)
    dumps = {e: args.data / f"dump-{e}.npz" for e in ("fast", "tbparse")}
    for e, d in dumps.items():
        run_child(e, path, d)
    a, b = np.load(dumps["fast"]), np.load(dumps["tbparse"])
    identical = all(np.array_equal(a[k], b[k], equal_nan=(k == "value")) for k in ("tag", "step", "value", "wall"))
    if not identical:
        raise SystemExit("fast and tbparse rows differ")
    results: dict[str, list[dict]] = {"fast": [], "tbparse": [], "floor": [], "framing": []}
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
        for e in results:
            results[e].append(run_child(e, path))
    med = {e: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "process_s", "rss_mib")} for e, rs in results.items()}
    rows = results["fast"][0]["rows"]
    ratio = med["tbparse"]["load_s"] / med["fast"]["load_s"]
    floor = med["fast"]["load_s"] / med["floor"]["load_s"]
    lines = [
        "# TensorBoard reader: autopsy fast engine vs tbparse",
        "",
        f"File: HF-shaped, {args.events:,} scalar events ({path.stat().st_size / 2**20:.1f} MiB), written by torch's SummaryWriter; "
        f"{rows:,} rows read by each reader, identical tags/steps/values/wall times (NaN/inf included): {identical}.",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, {args.repeats} fresh processes per reader "
        "(interleaved), medians. `load` is timed in-process after imports; `process` is the whole process "
        "(interpreter start, imports, load); peak RSS of the process.",
        "",
        "| reader | load (s) | ratio | process (s) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|",
        f"| autopsy fast (`engine=\"fast\"`, CRCs verified) | {med['fast']['load_s']:.3f} | {ratio:.1f}x | "
        f"{med['fast']['process_s']:.2f} | {med['fast']['rss_mib']:.0f} |",
        f"| tbparse `SummaryReader(...).scalars` | {med['tbparse']['load_s']:.3f} | 1.0x | "
        f"{med['tbparse']['process_s']:.2f} | {med['tbparse']['rss_mib']:.0f} |",
        "",
        "Distance to the floor (same run, same file): the record-splitting floor is reading the file and finding every "
        "record's bounds (vectorised, no CRC, no decoding); framing adds every CRC.",
        "",
        "| step | load (s) | x floor |",
        "|---|---:|---:|",
        f"| floor: read + split records | {med['floor']['load_s']:.3f} | 1.0x |",
        f"| framing: + every CRC verified | {med['framing']['load_s']:.3f} | "
        f"{med['framing']['load_s'] / med['floor']['load_s']:.1f}x |",
        f"| autopsy fast: + decode, frame | {med['fast']['load_s']:.3f} | {floor:.1f}x |",
        f"| tbparse | {med['tbparse']['load_s']:.3f} | {med['tbparse']['load_s'] / med['floor']['load_s']:.0f}x |",
        "",
        "The fast engine reads the file in 32 MiB windows (bounded memory whatever the file's size); this 20 MiB file "
        "is one window.",
        "",
        "All load times (s): fast " + ", ".join(f"{r['load_s']:.3f}" for r in results["fast"])
        + "; tbparse " + ", ".join(f"{r['load_s']:.2f}" for r in results["tbparse"]) + ".",
        "",
        "Regenerate: `.venv/bin/python bench/tensorboard/bench_tb.py` (writes the file once into /tmp).",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
