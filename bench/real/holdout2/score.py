"""Score an analyzer on this holdout2 set with the shared scorer's rules, unchanged.

usage: python bench/real/holdout2/score.py AUTOPSY_BIN [trainer_state] [console-logs] [--quiet]

The shared ../shared/labelled-runs/score.py finds each set as HERE/<set>/expected.json; bench/real/run.py's
score_folder points HERE at this folder (as run.py does for tests/real).
"""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("real_bench", os.path.join(HERE, "..", "run.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.score_folder(HERE, sys.argv[1:], __doc__)
