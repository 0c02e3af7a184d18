"""Score an analyzer on this holdout2 set with the shared scorer's rules, unchanged.

usage: python bench/real/holdout2/score.py AUTOPSY_BIN [trainer_state] [console-logs] [--quiet]

The shared ../shared/labelled-runs/score.py finds each set as HERE/<set>/expected.json; this wrapper loads it and
points HERE at this folder (the same trick bench/real/run.py uses for tests/real).
"""
import importlib.util
import os
import sys

HOLDOUT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HOLDOUT, "..", "..", "..", "..", "shared", "labelled-runs", "score.py")

spec = importlib.util.spec_from_file_location("score", os.path.normpath(SHARED))
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.HERE = HOLDOUT

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        sys.exit(__doc__)
    sets = args[1:] or ["trainer_state", "console-logs"]
    print("; ".join(mod.score(args[0], s, quiet="--quiet" in sys.argv) for s in sets))
