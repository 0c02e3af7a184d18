"""Property tests over every importer: random bytes, random truncations and bit flips of real files, random JSON.

The property: an importer returns a canonical frame (``validate_frame`` accepts it) or raises an
:class:`~autopsy.errors.AutopsyError` with a one-line message; nothing else, and within a time bound.
The end-to-end property adds the analysis: ``load`` + ``analyze`` of a mutated run never crashes.
The number of cases each property ran is printed at the end of the session (conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopsy.errors import AutopsyError
from autopsy.frame import validate_frame
from autopsy.importers import read_files
from autopsy.runinfo import catalog
from helpers.fuzz_counter import CASES_RUN
from helpers.paths import SHARED
from helpers.reliability import make_damaged

NAN_RUN = make_damaged.NAN_RUN

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# importer kind -> the file name as a run dir holds it
IMPORTERS: dict[str, str] = {
    "trainer_state": "trainer_state.json",
    "tensorboard": "runs/x/events.out.tfevents.1.host",
    "wandb": "wandb/run-20240101_000000-abcd1234/run-abcd1234.wandb",
    "wandb_export": "wandb-history.csv",
    "console": "train.log",
}


def _seed(kind: str) -> bytes:
    """A real file of each kind to mutate."""
    if kind == "trainer_state":
        return (NAN_RUN / "trainer_state.json").read_bytes()
    if kind == "tensorboard":
        return next(NAN_RUN.glob("runs/*/*tfevents*")).read_bytes()
    if kind == "wandb":
        real = sorted((SHARED / "real-logs" / "korean-re-klue").glob("wandb/*/run-*.wandb"))
        if real:
            return real[0].read_bytes()
        pytest.skip("no real .wandb file under ../shared/real-logs")
    if kind == "console":
        logs = sorted((SHARED / "issue-logs").glob("*transformers*.txt"))
        if logs:
            return logs[0].read_bytes()
        return b"{'loss': 4.6, 'grad_norm': 0.9, 'learning_rate': 0.0005, 'epoch': 0.2}\n" * 30
    hist = json.loads((NAN_RUN / "trainer_state.json").read_text())["log_history"]
    df = pd.DataFrame([{"Step": e["step"], "train/loss": e.get("loss"), "train/grad_norm": e.get("grad_norm")}
                       for e in hist if "loss" in e])
    return df.to_csv(index=False).encode()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_importer(kind: str, data: bytes, workdir: Path, counter: str) -> None:
    """The property: a valid canonical frame or a one-line AutopsyError (a hang shows as the suite's timeout: no
    wall-clock bound is asserted)."""
    path = workdir / kind / IMPORTERS[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    CASES_RUN[counter] += 1
    try:
        frame = read_files(kind, [path], run="fuzz")
    except AutopsyError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
    else:
        assert isinstance(frame, pd.DataFrame)
        validate_frame(frame)
        assert "fuzz" in catalog(frame)


KINDS = list(IMPORTERS)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(kind, data, workdir):
    check_importer(kind, data, workdir, f"random_bytes[{kind}]")


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=4),
       junk=st.binary(max_size=64))
def test_truncations_and_bit_flips_of_real_files(kind, cut, flips, junk, workdir):
    """A real file cut anywhere (a crash mid-write), with a few bits flipped and junk appended."""
    seed = bytearray(_seed(kind))
    for where, bit in flips:
        seed[min(int(where * len(seed)), len(seed) - 1)] ^= 1 << bit
    data = bytes(seed[: int(cut * len(seed))]) + junk
    check_importer(kind, data, workdir, f"mutated_real_file[{kind}]")


_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, -0.0]))
_JSON = st.recursive(_JSON_SCALARS, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
                     max_leaves=30)
_KEYS = st.sampled_from(["step", "loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "train_runtime",
                         "train_loss", "rewards/chosen", "eval_acc_loss", "total_flos", ""])
_ENTRY = st.dictionaries(_KEYS, _JSON_SCALARS | _JSON, max_size=6) | _JSON
_STATE = st.fixed_dictionaries({"log_history": st.lists(_ENTRY, max_size=30) | _JSON},
                               optional={"global_step": _JSON, "max_steps": _JSON, "logging_steps": _JSON,
                                         "num_train_epochs": _JSON, "best_metric": _JSON})


@FUZZ
@given(doc=_JSON | _STATE)
def test_random_json_trainer_state(doc, workdir):
    # HF writes bare NaN/Infinity; json.dumps does the same with allow_nan (the default)
    check_importer("trainer_state", json.dumps(doc).encode(), workdir, "random_json[trainer_state]")


@FUZZ
@given(doc=_STATE, cut=st.floats(0, 1))
def test_random_trainer_state_cut_mid_write(doc, cut, workdir):
    text = json.dumps(doc, indent=2).encode()
    check_importer("trainer_state", text[: int(cut * len(text))], workdir, "random_json_cut[trainer_state]")


@settings(FUZZ, max_examples=10)
@given(which=st.sampled_from(["trainer_state.json", "checkpoint-30/trainer_state.json", "events", "checkpoint-60/config.json",
                              "checkpoint-60/training_args.bin"]),
       cut=st.floats(0, 1), flips=st.lists(st.integers(0, 10**9), max_size=3))
def test_end_to_end_mutated_run(which, cut, flips, workdir):
    """``load`` + ``analyze`` of the real NaN run with one file cut and flipped: a report or an AutopsyError."""
    from autopsy.analysis import analyze
    from autopsy.importers import load

    run = workdir / "e2e"
    if not run.exists():
        shutil.copytree(NAN_RUN, run, ignore=shutil.ignore_patterns("*.safetensors"))
    target = next(run.glob("runs/*/*tfevents*")) if which == "events" else run / which
    original = (next(NAN_RUN.glob("runs/*/*tfevents*")) if which == "events" else NAN_RUN / which).read_bytes()
    data = bytearray(original[: int(cut * len(original))])
    for f in flips:
        if data:
            data[f % len(data)] ^= 1 << (f % 8)
    target.write_bytes(bytes(data))
    CASES_RUN["end_to_end_mutated_run"] += 1
    try:
        report = analyze(load(run))
        assert report.runs
    except AutopsyError as exc:
        assert "\n" not in str(exc).strip()
    finally:
        target.write_bytes(original)


@FUZZ
@given(doc=_STATE, chunk=st.integers(1, 64), cut=st.floats(0.5, 1))
def test_trainer_state_windows_do_not_change_what_is_read(doc, chunk, cut, workdir):
    """The streamed reader cut into windows of any size reads what one window reads: rows, damage offsets, notes."""
    from autopsy.importers import _trainer_json

    text = json.dumps(doc, indent=2).encode()
    path = workdir / "windows" / "trainer_state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text[: max(1, int(cut * len(text)))])
    CASES_RUN["windows[trainer_state]"] += 1

    def read() -> tuple:
        try:
            frame = read_files("trainer_state", [path], run="w")
        except AutopsyError as exc:
            return ("error", str(exc))
        info = catalog(frame)["w"]
        rows = list(zip(frame["metric"].astype(str), frame["step"].tolist(), frame["value"].astype(str)))
        return rows, [(d.offset, d.problem) for d in info.damage], info.notes

    whole = read()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_trainer_json, "CHUNK_BYTES", chunk)
        assert read() == whole
