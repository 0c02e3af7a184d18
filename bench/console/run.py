"""Benchmark: reading a 1M-line HF Trainer console log, against the regex floor.

    .venv/bin/python bench/console/run.py [--lines 1000000] [--repeats 3] [--data /tmp/autopsy-bench-console]
                                          [--before-ref HEAD | --before-dir DIR] [--no-before] [--out RESULTS.md]

The log is written once (:func:`generate`, HF Trainer's printed shape: the training banner, per logged step a tqdm
bar rewritten with ``\\r`` and the log dict, an evaluation bar and eval dict every ``eval_every`` steps, warnings and
checkpoint messages now and then, a NaN grad norm now and then, the final summary) and reused.

Measured, each in a fresh process (same interpreter), medians over ``--repeats``:

- floor: read the file's bytes and one compiled regex ``finditer`` over them for the dict lines (nothing decoded);
- autopsy: ``autopsy.load(path)``, timed after the imports and a warm-up load of a small log of the same shape, with
  the peak RSS growth of the process during the load (VmHWM after resetting it; ``ru_maxrss`` where that is not
  possible) and the frame's own size (``memory_usage(deep=True)``): "beyond the frame" is the growth less that;
- before: the same with the console importer of ``--before-ref`` (a git revision, read with ``git show``) or the
  modules in ``--before-dir`` swapped in, in the same run. Findings are checked identical between the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULES = ("_console_formats", "_console_crash", "console")
_BLOCKS = " ▏▎▍▌▋▊▉█"


def _bar(i: int, total: int, elapsed: float) -> str:
    """One tqdm bar as HF Trainer prints it (10 cells, unicode blocks)."""
    frac = i / total
    full, part = divmod(int(frac * 80), 8)
    cells = ("█" * full + (_BLOCKS[part] if full < 10 else "")).ljust(10)
    left = elapsed / max(i, 1) * (total - i)

    def hms(s: float) -> str:
        m, s = divmod(int(s), 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

    rate = i / elapsed if elapsed else 0.0
    return f"{int(frac * 100):3d}%|{cells}| {i}/{total} [{hms(elapsed)}<{hms(left)}, {rate:5.2f}it/s]"


def generate(path: Path, *, lines: int, eval_every: int = 2000, warn_every: int = 25_000) -> Path:
    """Write an HF-shaped console log of about ``lines`` lines (``\\n``-terminated; ``\\r`` bar rewrites inside)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # per logged step a bar line and a dict line; an eval bar, dict and checkpoint line every eval_every steps
    steps = int((lines - 8) / (2 + 3 / eval_every + 2 / warn_every))
    head = "[INFO|trainer.py:2134] 2024-05-01 10:00:00,000 >> "
    with path.open("w", encoding="utf-8") as fh:
        fh.write(f"{head}***** Running training *****\n{head}  Num examples = {steps * 8:,}\n{head}  Num Epochs = 1\n"
                 f"{head}  Instantaneous batch size per device = 8\n{head}  Total optimization steps = {steps:,}\n"
                 f"{head}  Number of trainable parameters = 124,439,808\n")
        for i in range(1, steps + 1):
            el = i / 7.3
            loss = 1.5 + 1.5 / (1 + i / 5000) + 0.05 * ((i * 7919) % 13) / 13
            gn = "nan" if i % 50_021 == 0 else f"{0.5 + ((i * 104729) % 97) / 97:.4f}"
            bar = _bar(i, steps, el)
            if i % 10 == 0:  # tqdm redrew the bar twice between two logs
                bar = f"{_bar(i - 1, steps, el - 0.1)}\r{bar}"
            fh.write(f"{bar}\n{{'loss': {round(loss, 4)}, 'grad_norm': {gn}, 'learning_rate': {5e-5 * (1 - i / steps)!r}, "
                     f"'epoch': {round(i / steps, 4)}}}\n")
            if i % eval_every == 0:
                bars = "\r".join(_bar(k, 125, k / 11.0) for k in range(0, 126, 25))
                fh.write(f"{bars}\n{{'eval_loss': {round(loss + 0.1, 4)}, 'eval_runtime': 11.36, "
                         f"'eval_samples_per_second': 88.02, 'eval_steps_per_second': 11.0, 'epoch': {round(i / steps, 4)}}}\n"
                         f"[INFO|trainer.py:3503] >> Saving model checkpoint to out/checkpoint-{i}\n")
            if i % warn_every == 0:
                fh.write("/opt/conda/lib/python3.10/site-packages/torch/utils/checkpoint.py:464: UserWarning: "
                         "torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly.\n"
                         "  warnings.warn(\n")
        fh.write(f"{{'train_runtime': {steps / 7.3:.1f}, 'train_samples_per_second': 58.4, 'train_steps_per_second': 7.3, "
                 f"'train_loss': 1.2345, 'epoch': 1.0}}\n{_bar(steps, steps, steps / 7.3)}\n")
    return path


_FLOOR = r"""
import re, sys, time
t = time.perf_counter()
data = open(sys.argv[1], "rb").read()
n = sum(1 for _ in re.finditer(rb"\{'[^{}\n]*\}", data))
print(time.perf_counter() - t, n)
"""

_LOAD = r"""
import json, resource, sys, time
before_dir = sys.argv[3]
if before_dir:  # the console importer of another revision, in place of this tree's
    import importlib.util
    for name in ("_console_formats", "_console_crash", "console"):
        full = f"autopsy.importers.{name}"
        spec = importlib.util.spec_from_file_location(full, f"{before_dir}/{name}.py")
        mod = importlib.util.module_from_spec(spec); sys.modules[full] = mod; spec.loader.exec_module(mod)
import autopsy
from autopsy import analyze
from autopsy.runinfo import run_info
autopsy.load(sys.argv[2])  # warm-up: lazy imports are not counted

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
try:
    open("/proc/self/clear_refs", "w").write("5")
    base, peak = kb("VmRSS:"), lambda: kb("VmHWM:")
except OSError:
    base, peak = 0, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
frame = autopsy.load(sys.argv[1])
seconds = time.perf_counter() - t
grew = (peak() - base) / 1024
info = run_info(frame)
findings = sorted((f.signature, f.severity, f.step) for f in analyze(frame).runs[0].findings)
print(json.dumps({"seconds": seconds, "grew_mb": grew, "frame_mb": frame.memory_usage(deep=True).sum() / 2**20,
                  "rows": len(frame), "findings": [list(map(str, f)) for f in findings],
                  "max_steps": info.max_steps, "finished": info.finished}))
"""


def _run(code: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return r.stdout.strip().splitlines()[-1]


def _before_dir(ref: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        src = subprocess.run(["git", "show", f"{ref}:src/autopsy/importers/{name}.py"], capture_output=True,
                             text=True, cwd=REPO, check=True).stdout
        (dest / f"{name}.py").write_text(src)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "autopsy-bench-console")
    ap.add_argument("--before-ref", default="HEAD")
    ap.add_argument("--before-dir", type=Path)
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    big = generate(args.data / f"hf-{args.lines}.log", lines=args.lines)
    small = generate(args.data / "hf-2000.log", lines=2000)
    engines = {"autopsy": ""}
    if not args.no_before:
        before = args.before_dir or _before_dir(args.before_ref, args.data / f"before-{args.before_ref}")
        engines = {"before": str(before), "autopsy": ""}
    floor: list[float] = []
    runs: dict[str, list[dict]] = {k: [] for k in engines}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows every reader alike
        floor.append(float(_run(_FLOOR, str(big)).split()[0]))
        for name, where in engines.items():
            runs[name].append(json.loads(_run(_LOAD, str(big), str(small), where)))
            print(name, runs[name][-1]["seconds"], runs[name][-1]["grew_mb"], file=sys.stderr)
    n_lines = sum(1 for _ in big.open("rb"))
    mb = big.stat().st_size / 2**20
    f = statistics.median(floor)
    rows = []
    for name, rs in runs.items():
        s = statistics.median(r["seconds"] for r in rs)
        grew = statistics.median(r["grew_mb"] for r in rs)
        rows.append((name, s, s / f, grew, rs[0]["frame_mb"], rs[0]["rows"]))
    same = len({json.dumps([r["findings"], r["max_steps"], r["finished"]]) for rs in runs.values() for r in rs}) == 1
    label = {"before": f"before (console importer of {args.before_dir or args.before_ref})", "autopsy": "autopsy (this tree)"}
    text = [
        "# Console log: 1M-line HF Trainer log vs the regex floor",
        "",
        f"File: {n_lines:,} lines (`\\n`; each bar line holds `\\r` rewrites), {mb:.1f} MiB, written by `generate` "
        f"(HF Trainer's shape: banner, tqdm bar + log dict per step, eval bar + dict every 2,000 steps, warnings).",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}, "
        f"{args.repeats} fresh processes per reader (interleaved), medians. Floor: read the bytes + one compiled "
        "`re.finditer` over them for the dict lines. Load timed in-process after imports and a warm-up load; "
        "peak RSS growth during the load (VmHWM reset before it); beyond the frame = growth - the frame's own size.",
        "",
        "| reader | lines | file (MiB) | floor (s) | load (s) | x floor | peak RSS growth (MiB) | frame (MiB) | beyond the frame (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s, ratio, grew, fmb, _nrows in rows:
        text.append(f"| {label[name]} | {n_lines:,} | {mb:.1f} | {f:.3f} | {s:.2f} | {ratio:.1f}x | {grew:.0f} | "
                    f"{fmb:.0f} | {grew - fmb:.0f} |")
    text += [
        "",
        f"Rows read: {rows[-1][5]:,}; findings, max_steps and finished identical across readers and runs: {same}.",
        f"All floor times (s): {', '.join(f'{x:.3f}' for x in floor)}; "
        + "; ".join(k + " " + ", ".join(f"{r['seconds']:.2f}" for r in rs) for k, rs in runs.items()) + ".",
        "",
        "Regenerate: `.venv/bin/python bench/console/run.py` (writes the log once into /tmp; `--before-ref REV` picks the "
        "revision whose console importer is the baseline).",
        "",
    ]
    args.out.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
