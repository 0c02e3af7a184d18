"""The headline bench: autopsy scored on real runs labelled from their numbers by people who did not see its output.

Two corpora, one scorer (the shared ``score.py``, its rules unchanged):

- ``../shared/labelled-runs``: trainer_state.json files and console logs from public repositories and issue threads;
- ``tests/real``: the corpus grown for this round, labelled the same way before autopsy ran on it.

Writes ``bench/real/RESULTS.md``: per-set recall and false alarms, per-signature recall, and one line per case.

    python bench/real/run.py [--autopsy .venv/bin/autopsy] [--out bench/real/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPORA = {"shared": REPO.parent / "shared" / "labelled-runs", "grown": REPO / "tests" / "real"}
SETS = ("trainer_state", "console-logs")


def _scorer(root: Path):
    spec = importlib.util.spec_from_file_location("score", CORPORA["shared"] / "score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.HERE = str(root)  # the same rules, on another corpus laid out the same way
    return mod


def score_folder(folder: str, argv: list[str], usage: str) -> None:
    """A held-out set's own score.py: ``AUTOPSY_BIN [trainer_state] [console-logs] [--quiet]`` scored with the shared
    scorer's rules, unchanged, on the sets in ``folder``."""
    args = [a for a in argv if not a.startswith("--")]
    if not args:
        sys.exit(usage)
    mod = _scorer(Path(folder))
    sets = args[1:] or list(SETS)
    print("; ".join(mod.score(args[0], s, quiet="--quiet" in argv) for s in sets))


def score_set(autopsy: str, root: Path, name: str) -> tuple[str, list[str]]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        total = _scorer(root).score(autopsy, name, quiet=False)
    return total, buf.getvalue().splitlines()


def per_signature(root: Path, name: str, lines: list[str]) -> dict[str, list[int]]:
    """signature -> [hit, needed] from the per-case lines and expected.json."""
    exp = json.loads((root / name / "expected.json").read_text())
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        m = re.match(rf"{re.escape(name)}/(\S+): (ok|MISS) found=.* missed=(\[.*\]) false=", line)
        if not m:
            continue
        e = exp[m.group(1)]
        missed = {tuple(a) for a in json.loads(m.group(3).replace("'", '"'))}
        for alts in [[s] for s in e.get("must", [])] + e.get("any_of", []):
            key = " or ".join(alts)
            out[key][1] += 1
            out[key][0] += tuple(alts) not in missed
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autopsy", default=str(REPO / ".venv" / "bin" / "autopsy"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args(argv)
    md = ["# Real-log accuracy (the headline bench)", "",
          "Each case is a real run labelled from its numbers by someone who did not look at autopsy's output "
          "(`LABELS.md` beside each set). A `must` counts when reported at warning or above; a false alarm is a "
          "`must_not` at warning or above, or anything loud on a `quiet` (healthy) case. Scorer: "
          "`../shared/labelled-runs/score.py`, unchanged. Regenerate: `python bench/real/run.py`.", ""]
    summary, details, sigs = [], [], defaultdict(lambda: [0, 0])
    for corpus, root in CORPORA.items():
        for name in SETS:
            if not (root / name / "expected.json").is_file():
                continue
            total, lines = score_set(args.autopsy, root, name)
            print(f"{corpus}: {total}", flush=True)
            summary.append(f"| {corpus} | {total.replace(': ', ' | ', 1)} |")
            details.append(f"### {corpus} / {name}")
            details.append("")
            details += [f"- `{ln}`" for ln in lines]
            details.append("")
            for k, (h, n) in per_signature(root, name, lines).items():
                sigs[k][0] += h
                sigs[k][1] += n
    md += ["| corpus | set | result |", "|---|---|---|", *summary, "", "## Recall per signature (both corpora)", "",
           "| signature | found | of |", "|---|---:|---:|"]
    md += [f"| {k} | {h} | {n} |" for k, (h, n) in sorted(sigs.items())]
    md += ["", "## Per case", "", *details]
    Path(args.out).write_text("\n".join(md) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
