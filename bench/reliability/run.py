"""Reliability and speed where the user waits (issue 17): the analyze path, many runs, big inputs, hostile input.

    .venv/bin/python bench/reliability/run.py [--data /tmp/autopsy-bench-reliability] [--repeats 5] [--skip-big]

Every measurement is a fresh process on this machine, compared with its peer in the same run (medians, ratios):

- analyze path: ``autopsy analyze fixtures/runs/nan-at-31`` against ``python -c "import autopsy"``;
- many runs: a flat ``logs/`` dir of 200 and of 2,000 real event files (copies of one ``SummaryWriter`` file),
  discovery, load and analysis timed apart, and the whole CLI process: time per run should not grow with runs;
- big inputs and the hostile corpus (``fixtures/damaged/make_damaged.py``): ``autopsy analyze CASE --format json``
  under ``/usr/bin/time``: exit code, wall time, peak RSS, and whether the inputs are byte-identical afterwards;
  for the big inputs also ``load()`` alone: peak RSS growth against the frame's own size.

Writes RESULTS.md beside this script. Inputs are made once under ``--data`` and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NAN_RUN = REPO / "fixtures" / "runs" / "nan-at-31"
AUTOPSY = [sys.executable, "-m", "autopsy"]


def _run(cmd: list[str], *, timeout: float = 1800) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS in MiB) of a command, through /usr/bin/time."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    rss = int(r.stderr.strip().splitlines()[-1]) // 1024
    return r.returncode, wall, rss


# --- analyze path -------------------------------------------------------------------------------------------


def analyze_path(repeats: int) -> list[str]:
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import autopsy"': [sys.executable, "-c", "import autopsy"],
        "autopsy analyze fixtures/runs/nan-at-31": [*AUTOPSY, "analyze", str(NAN_RUN), "--format", "json"],
        "autopsy analyze ... (console report)": [*AUTOPSY, "analyze", str(NAN_RUN)],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeats):  # interleaved, so that load on the machine hits all alike
        for k, c in cmds.items():
            times[k].append(_run(c)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med['python -c "import autopsy"']
    out = ["## The analyze path", "",
           f"Whole processes, median of {repeats} fresh processes each (interleaved); ratio to `import autopsy`.", "",
           "| process | median (s) | ratio |", "|---|---:|---:|"]
    out += [f"| `{k}` | {m:.2f} | {m / base:.2f}x |" for k, m in med.items()]
    out += ["", "All times (s): " + "; ".join(f"{k}: " + ", ".join(f"{t:.2f}" for t in v) for k, v in times.items())]
    return out


# --- many runs ----------------------------------------------------------------------------------------------

_PHASES = """
import json, sys, time
t0 = time.perf_counter()
from autopsy.importers import load
from autopsy.importers.discover import find_runs
from autopsy.analysis import analyze
t1 = time.perf_counter(); runs = find_runs(sys.argv[1])
t2 = time.perf_counter(); frame = load(sys.argv[1])
t3 = time.perf_counter(); report = analyze(frame)
t4 = time.perf_counter()
print(json.dumps({"runs": len(runs), "reports": len(report.runs), "discover": t2 - t1, "load": t3 - t2, "analyze": t4 - t3}))
"""


def _flat_logs(data: Path, n: int) -> Path:
    root = data / f"flat-{n}"
    logs = root / "logs"
    if logs.is_dir() and len(list(logs.iterdir())) == n:
        return root
    seed = data / "seed-run"
    if not seed.is_dir():
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(seed))
        for s in range(1, 101):
            w.add_scalar("train/loss", 3 * math.exp(-s / 30) + 0.1, s)
            w.add_scalar("train/grad_norm", 1.0, s)
        w.close()
    f = next(seed.glob("events*"))
    shutil.rmtree(root, ignore_errors=True)
    logs.mkdir(parents=True)
    for i in range(n):
        shutil.copy(f, logs / f"events.out.tfevents.{1700000000 + i}.host.{i}.0")
    return root


def many_runs(data: Path, sizes: tuple[int, ...] = (200, 2000)) -> list[str]:
    rows = {}
    for n in sizes:
        root = _flat_logs(data, n)
        r = subprocess.run([sys.executable, "-c", _PHASES, str(root)], capture_output=True, text=True, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        got["cli"] = _run([*AUTOPSY, "analyze", str(root), "--format", "json"])[1]
        rows[n] = got
    small, big = sizes
    k = big / small
    out = ["## Many runs: one flat `logs/` dir of event files", "",
           f"Each file is one run (100 steps, 2 metrics). Linear means the {big:,}-file row takes {k:.0f}x the "
           f"{small}-file row (per run: the same).", "",
           "| files | discover (s) | load (s) | analyze (s) | whole CLI process (s) | CLI per run (ms) |",
           "|---:|---:|---:|---:|---:|---:|"]
    for n, g in rows.items():
        out.append(f"| {n:,} | {g['discover']:.2f} | {g['load']:.2f} | {g['analyze']:.2f} | {g['cli']:.1f} | "
                   f"{1000 * g['cli'] / n:.1f} |")
    b, s = rows[big], rows[small]
    out.append(f"| ratio {big:,}/{small} | {b['discover'] / s['discover']:.1f}x | {b['load'] / s['load']:.1f}x | "
               f"{b['analyze'] / s['analyze']:.1f}x | {b['cli'] / s['cli']:.1f}x | |")
    out += ["", "Before this work (issue 17): 0.7, 2.8, 11.3 s for 100, 200, 400 files and 385 s for 2,000 (quadratic)."]
    return out


# --- big inputs ---------------------------------------------------------------------------------------------


def _trainer_state_2m(data: Path, n: int = 2_000_000) -> Path:
    run = data / "trainer-state-2m"
    path = run / "trainer_state.json"
    if path.is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:  # HF's keys, one entry a line
        fh.write(f'{{\n  "best_metric": null,\n  "epoch": 1.0,\n  "global_step": {n},\n  "log_history": [\n')
        for s in range(1, n + 1):
            gn, lr, loss = 0.5 + (s % 7) / 10, 5e-5 * (1 - s / n), 2 + math.sin(s) / 10
            sep = "," if s < n else ""
            fh.write(f'    {{"epoch": {s / n:.6f}, "grad_norm": {gn:.4f}, "learning_rate": {lr:.6e}, '
                     f'"loss": {loss:.4f}, "step": {s}}}{sep}\n')
        fh.write(f'  ],\n  "logging_steps": 1,\n  "max_steps": {n},\n  "num_train_epochs": 1,\n  "save_steps": 500\n}}\n')
    return run


def _tb_4gb(data: Path, size: int = 4 << 30) -> Path:
    """A real HF run's event file, then real histogram records (a second SummaryWriter file's records) to 4 GiB."""
    run = data / "tb-4gb"
    out = run / "runs" / "x" / "events.out.tfevents.1700000000.host.1.0"
    if out.is_file() and out.stat().st_size >= size:
        return run
    hist_dir = data / "hist-seed"
    if not hist_dir.is_dir():
        import numpy as np
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(hist_dir), max_queue=1000)
        rng = np.random.default_rng(0)
        for s in range(2000):
            w.add_histogram("weights", rng.normal(size=2000), s, bins=8000)
        w.close()
    body = next(hist_dir.glob("events*")).read_bytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        fh.write(next(NAN_RUN.glob("runs/*/events*")).read_bytes())
        written = 0
        while written < size:
            fh.write(body)
            written += len(body)
    return run


def _tb_sparse(data: Path, size: int = 50 << 30) -> Path:
    run = data / "tb-50gb-sparse"
    path = run / "runs" / "x" / "events.out.tfevents.1700000000.host.1.0"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.truncate(size)
    return run


_LOAD = """
import json, sys, time
import autopsy.importers as imp
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
base = kb("VmRSS:")
t = time.perf_counter()
try:
    frame = imp.load(sys.argv[1]); rows = len(frame); mb = frame.memory_usage(deep=True).sum() / 2**20; err = ""
except Exception as exc:
    rows, mb, err = 0, 0.0, f"{type(exc).__name__}: {exc}"
print(json.dumps({"s": time.perf_counter() - t, "grew": (kb("VmHWM:") - base) / 1024, "rows": rows, "frame": mb,
                  "err": err[:200]}))
"""


def big_inputs(data: Path) -> tuple[list[str], dict[str, Path]]:
    cases = {"trainer_state.json, 2M entries": _trainer_state_2m(data), "TensorBoard, 4 GiB": _tb_4gb(data),
             "TensorBoard, 50 GiB sparse": _tb_sparse(data)}
    out = ["## Big inputs: `load()` alone", "",
           "Peak RSS growth of a fresh process over its RSS after imports, against the frame's own size.", "",
           "| input | file size | rows | load (s) | frame (MiB) | peak growth (MiB) | beyond the frame (MiB) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in cases.items():
        size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        r = subprocess.run([sys.executable, "-c", _LOAD, str(run)], capture_output=True, text=True, timeout=3600)
        g = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"err": r.stderr[-200:]}
        if g.get("err") and "rows" not in g:
            out.append(f"| {name} | {size / 2**20:,.0f} MiB | crashed: {g['err']} | | | | |")
            continue
        note = f" ({g['err']})" if g["err"] else ""
        out.append(f"| {name} | {size / 2**20:,.0f} MiB | {g['rows']:,}{note} | {g['s']:.1f} | {g['frame']:.0f} | "
                   f"{g['grew']:.0f} | {g['grew'] - g['frame']:.0f} |")
    return out, cases


# --- the hostile table --------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, str]:
    """Each file by sha256 (by size and mtime when over 64 MiB), links by target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                st = p.stat()
                big = st.st_size > 64 << 20
                out[str(p)] = f"{st.st_size}:{st.st_mtime_ns}" if big else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def hostile(data: Path, extra: dict[str, Path]) -> list[str]:
    sys.path.insert(0, str(REPO / "fixtures"))
    from damaged import make_damaged

    root = data / "hostile"
    shutil.rmtree(root, ignore_errors=True)
    cases, outside = make_damaged.build_corpus(root)
    targets = {name: (c.path, c.description) for name, c in cases.items()}
    for name, run in extra.items():
        targets[name] = (run, "big input (above)")
    out = ["## Hostile and damaged input: `autopsy analyze CASE --format json`", "",
           "The damaged corpus (`fixtures/damaged/make_damaged.py`, each case a test in "
           "`tests/test_reliability_corpus.py`) and the big inputs; exit 0 = no finding at --fail-on, 2 = a one-line "
           "error. Inputs: byte-identical before and after (files over 64 MiB by size and mtime), decoys outside "
           "included.", "",
           "| case | what | exit | time (s) | peak RSS (MiB) | inputs unchanged |", "|---|---|---:|---:|---:|---|"]
    for name, (path, what) in targets.items():
        before = _snapshot(path) | _snapshot(outside)
        rc, wall, rss = _run([*AUTOPSY, "analyze", str(path), "--format", "json"])
        same = (_snapshot(path) | _snapshot(outside)) == before
        out.append(f"| {name} | {what} | {rc} | {wall:.1f} | {rss} | {'yes' if same else 'NO'} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/tmp/autopsy-bench-reliability"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-big", action="store_true", help="leave out the 4 GiB and 192 MB inputs")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    lines = ["# Reliability and speed where the user waits (issue 17)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; shared with "
             "other work, so only ratios measured in the same run are compared.", ""]
    lines += analyze_path(args.repeats) + [""]
    lines += many_runs(args.data) + [""]
    extra: dict[str, Path] = {"2,000 flat event files": _flat_logs(args.data, 2000)}
    if not args.skip_big:
        big, cases = big_inputs(args.data)
        lines += big + [""]
        extra.update(cases)
    lines += hostile(args.data, extra) + [""]
    lines.append("Regenerate: `.venv/bin/python bench/reliability/run.py` (inputs made once under /tmp).")
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
