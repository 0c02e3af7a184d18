"""Run every benchmark in turn; each writes its own RESULTS.md beside it.

    .venv/bin/python bench/run_all.py [real tensorboard detectors replay fleet reliability console]

Benchmarks measure whole processes on this machine (medians, ratios against the peer measured in the
same run); they are never asserted in the unit tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "real": [HERE / "real" / "run.py"],
    "tensorboard": [HERE / "tensorboard" / "bench_tb.py"],
    "detectors": [HERE / "detectors" / "run.py"],
    "replay": [HERE / "replay" / "bench_localize.py"],
    "fleet": [HERE / "fleet" / "bench_fleet.py"],
    "reliability": [HERE / "reliability" / "run.py"],
    "console": [HERE / "console" / "run.py", "--no-before"],
}


def main(names: list[str]) -> int:
    failed = 0
    for name in names or list(BENCHES):
        cmd = [sys.executable, *map(str, BENCHES[name])]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        failed += subprocess.call(cmd) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
