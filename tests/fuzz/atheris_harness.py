"""Coverage-guided fuzzing of the importers with atheris (libFuzzer), for long runs; not collected by pytest.

    pip install atheris            # a wheel exists for CPython 3.11 on x86-64 Linux
    python tests/fuzz/atheris_harness.py trainer_state -max_total_time=600 [CORPUS_DIR ...]
    python tests/fuzz/atheris_harness.py tensorboard -runs=100000

KIND is one of trainer_state, tensorboard, wandb, wandb_export, console, or ``all`` (the first input byte
picks the importer). Without a corpus directory, the run starts from the real NaN run's files. The property
is the one the hypothesis tests check: a canonical frame or an AutopsyError, nothing else; any other
exception is a crash that libFuzzer saves as ``crash-<sha1>`` (re-run it with the same command + the file).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "fixtures" / "damaged"))

IMPORTERS = {
    "trainer_state": ("autopsy.importers.trainer_state", "read_trainer_state", "trainer_state.json"),
    "tensorboard": ("autopsy.importers.tensorboard", "read_tensorboard", "events.out.tfevents.1.host"),
    "wandb": ("autopsy.importers.wandb", "read_wandb", "run-abcd1234.wandb"),
    "wandb_export": ("autopsy.importers.wandb", "read_wandb_export", "wandb-history.csv"),
    "console": ("autopsy.importers.console", "read_console", "train.log"),
}


def _seeds(kind: str, dest: Path) -> None:
    """Write the real NaN run's file of ``kind`` into a seed corpus directory."""
    from make_damaged import NAN_RUN

    dest.mkdir(parents=True, exist_ok=True)
    if kind in ("trainer_state", "all"):
        (dest / "trainer_state.json").write_bytes(b"\x00" * (kind == "all") + (NAN_RUN / "trainer_state.json").read_bytes())
    if kind in ("tensorboard", "all"):
        ev = next(NAN_RUN.glob("runs/*/*tfevents*")).read_bytes()
        (dest / "events").write_bytes(b"\x01" * (kind == "all") + ev)


def main() -> None:
    import atheris

    if len(sys.argv) < 2 or sys.argv[1] not in (*IMPORTERS, "all"):
        sys.exit(__doc__)
    kind = sys.argv.pop(1)
    with atheris.instrument_imports():
        from autopsy.errors import AutopsyError
        from autopsy.frame import validate_frame

        readers = {k: getattr(importlib.import_module(m), f) for k, (m, f, _) in IMPORTERS.items()
                   if importlib.util.find_spec(m) is not None}
    kinds = list(readers) if kind == "all" else [kind]
    work = Path(tempfile.mkdtemp(prefix="autopsy-atheris-"))

    def one_input(data: bytes) -> None:
        k = kinds[data[0] % len(kinds)] if kind == "all" and data else kinds[0]
        body = data[1:] if kind == "all" else data
        path = work / k / IMPORTERS[k][2]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        try:
            frame = readers[k]([path], run="fuzz")
        except AutopsyError:
            return
        validate_frame(frame)

    if not any(not a.startswith("-") for a in sys.argv[1:]):
        seeds = work / "seeds"
        _seeds(kind, seeds)
        sys.argv.append(str(seeds))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
