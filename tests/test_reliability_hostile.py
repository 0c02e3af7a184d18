"""Hostile input: pickles that would run code, symlinks that leave the directory, enormous files, hostile JSON.

autopsy is run on directories people download: it must never execute what it reads, never leave the
directory it was given, and keep its memory bounded whatever the size of a file.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest

from autopsy.errors import AutopsyError, InputError
from autopsy.importers import load
from autopsy.importers.discover import find_runs
from autopsy.runinfo import run_info
from autopsy.series import series
from helpers.paths import REPO
from helpers.reliability import (
    cli_inprocess,
    cli_subprocess,
    has_module,
    make_damaged,
    run_measured,
)

NAN_RUN = make_damaged.NAN_RUN
SRC = REPO / "src" / "autopsy"


# --------------------------------------------------------------------------------------------------
# pickles


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the NaN run whose training_args.bin (and *.pt/*.pth) would write ``marker`` when unpickled."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("evil")
    run = root / "run"
    shutil.copytree(NAN_RUN, run, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = root / "outside" / "PWNED"
    marker.parent.mkdir()
    for p in run.glob("checkpoint-*/training_args.bin"):
        make_damaged.write_evil_pickle(p, marker)
    for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt", "pytorch_model.bin"):
        make_damaged.write_evil_pickle(run / "checkpoint-60" / name, marker)
    return run, marker


def test_the_evil_pickle_is_live(evil_run, tmp_path):
    """Control: the payload really runs under an unsafe load (so the tests below can fail)."""
    run, _ = evil_run
    live = tmp_path / "LIVE"
    evil = tmp_path / "training_args.bin"
    make_damaged.write_evil_pickle(evil, live)
    import torch

    torch.load(str(evil), weights_only=False)  # the unsafe load autopsy must never do
    assert live.read_text() == "pwned"


def test_analyze_never_runs_training_args_pickle(evil_run):
    run, marker = evil_run
    r = cli_subprocess("analyze", run, "--format", "json")
    assert r.returncode in (0, 1), r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "the pickle in training_args.bin was executed"
    doc = json.loads(r.stdout)
    notes = doc["runs"][0]["run_info"]["notes"]
    assert any("training_args.bin" in n and "refused" in n and "builtins.exec" in n for n in notes), notes
    # the diagnosis does not depend on the config: still the NaN at 31
    assert {f["signature"]: f["step"] for f in doc["runs"][0]["findings"]}["nan_grad_norm"] == 31


def test_read_training_args_refuses_every_hostile_torch_file(evil_run):
    from autopsy.importers.training_args import read_training_args

    run, marker = evil_run
    for p in [*run.glob("checkpoint-*/training_args.bin"), *run.glob("checkpoint-60/*.p*")]:
        config, note = read_training_args(p)
        assert config == {} and note and "refused" in note, (p, note)
    assert not marker.exists()


def test_real_training_args_still_read():
    """The allowlist is not 'refuse everything': the real file's config is read."""
    pytest.importorskip("torch")
    from autopsy.importers.training_args import read_training_args

    config, note = read_training_args(NAN_RUN / "checkpoint-60" / "training_args.bin")
    assert note is None and config["learning_rate"] == pytest.approx(5e-4) and config["max_steps"] == 60


def test_replay_never_runs_pickles(evil_run, tmp_path):
    """``autopsy replay`` on a checkpoint full of hostile pickles, with a hostile 'batch': nothing runs."""
    if not has_module("autopsy.replay"):
        pytest.skip("replay not in this build yet")
    run, marker = evil_run
    ckpt = tmp_path / "checkpoint-60"
    shutil.copytree(run / "checkpoint-60", ckpt)
    shutil.copy(NAN_RUN / "checkpoint-60" / "model.safetensors", ckpt)
    rc, out, err = cli_inprocess("replay", ckpt, "--batch", ckpt / "optimizer.pt", "--format", "json", "--device", "cpu")
    assert rc in (0, 1, 2) and "Traceback" not in err and "internal error" not in err, err
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# the source never calls an unsafe loader


def _dotted(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:
        return ""


def unsafe_calls(source: str) -> list[str]:
    """Calls that can execute what they read: pickle/dill/marshal/shelve/joblib loads, torch.load without
    ``weights_only=True``, yaml.load without a safe loader, np.load(allow_pickle=True), eval/exec/compile."""
    bad: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names]
            if mod in ("pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib") and set(names) & {
                    "load", "loads", "Unpickler", "open", "_load", "_loads"}:
                bad.append(f"line {node.lineno}: from {mod} import {', '.join(names)}")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        tail = name.rsplit(".", 1)[-1]
        head = name.rsplit(".", 1)[0] if "." in name else ""
        where = f"line {node.lineno}: {name}"
        if name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec") or head.split(".")[-1] in ("pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "_pickle") and tail in (
                "load", "loads", "Unpickler", "open") or tail == "read_pickle":
            bad.append(where)
        elif name.endswith("torch.load"):
            v = kw.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                bad.append(where + " without weights_only=True")
        elif head.split(".")[-1] == "yaml" and tail in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"):
            loader = _dotted(kw["Loader"]) if "Loader" in kw else (_dotted(node.args[1]) if len(node.args) > 1 else "")
            if tail.startswith(("unsafe", "full")) or not loader.endswith(("SafeLoader", "CSafeLoader")):
                bad.append(where + " without SafeLoader")
        elif tail == "load" and head.split(".")[-1] in ("np", "numpy"):
            v = kw.get("allow_pickle")
            if isinstance(v, ast.Constant) and v.value is True:
                bad.append(where + " with allow_pickle=True")
        elif name in ("os.system", "os.popen") or (name.startswith("subprocess.") and isinstance(kw.get("shell"), ast.Constant)
                                                    and kw["shell"].value is True):
            bad.append(where)
    return bad


def test_the_checker_catches_unsafe_calls():
    sample = textwrap.dedent("""
        import pickle, torch, yaml, numpy as np
        from pickle import loads
        pickle.load(f); torch.load(p); torch.load(p, weights_only=False); yaml.load(s); yaml.load(s, Loader=yaml.Loader)
        eval("1"); exec("x"); np.load(p, allow_pickle=True); yaml.unsafe_load(s)
        torch.load(p, weights_only=True); yaml.load(s, Loader=yaml.SafeLoader); yaml.safe_load(s); re.compile("x")
    """)
    found = unsafe_calls(sample)
    assert len(found) == 10, found
    assert not [f for f in found if f.startswith("line 6:")], found  # the safe calls are all on line 6


def test_source_tree_has_no_unsafe_loader():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for hit in unsafe_calls(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(REPO)} {hit}")
    assert not offenders, "\n".join(offenders)


# --------------------------------------------------------------------------------------------------
# symlinks


def _decoy_state(path: Path, nan_from: int = 3) -> None:
    hist = [{"step": s, "loss": 2.0, "grad_norm": float("nan") if s >= nan_from else 1.0} for s in range(1, 21)]
    path.write_text(json.dumps({"global_step": 20, "log_history": hist}))


def test_symlinked_trainer_state_outside_is_ignored(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _decoy_state(outside / "trainer_state.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").symlink_to(outside / "trainer_state.json")
    with pytest.raises(InputError):  # the only file leads outside: nothing to read
        find_runs(run)
    rc, out, err = cli_inprocess("analyze", run, "--format", "json")
    assert rc == 2 and "nothing autopsy can read" in err and err.count("\n") == 1


def test_symlink_inside_the_directory_is_followed(tmp_path):
    """The guard is about leaving the directory, not about links: a link to a file inside is read."""
    run = tmp_path / "run"
    (run / "real").mkdir(parents=True)
    _decoy_state(run / "real" / "trainer_state.json", nan_from=7)
    (run / "link").mkdir()
    (run / "link" / "trainer_state.json").symlink_to(run / "real" / "trainer_state.json")
    frame = load(run)
    assert len(frame) and frame["step"].max() == 20


def test_symlink_loops_terminate(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(NAN_RUN, run, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*tfevents*"))
    (run / "self").symlink_to(run, target_is_directory=True)
    (run / "a").symlink_to(run / "b")
    (run / "b").symlink_to(run / "a")  # a -> b -> a: resolving it loops
    (run / "checkpoint-10" / "parent").symlink_to("..", target_is_directory=True)
    rc, out, err = cli_inprocess("analyze", run, "--format", "json", "--fail-on", "never")  # returns: no loop
    assert rc == 0, err
    steps = {f["signature"]: f["step"] for f in json.loads(out)["runs"][0]["findings"]}
    assert steps["nan_grad_norm"] == 31


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_special_files_do_not_hang(tmp_path):
    """A FIFO named like a log (reading it would block forever) and device files."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(NAN_RUN / "trainer_state.json", run)
    os.mkfifo(run / "train.log")
    os.mkfifo(run / "events.out.tfevents.1.host")
    r = cli_subprocess("analyze", run, "--format", "json", "--fail-on", "never", timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    for dev in ("/dev/zero", "/dev/null", str(run / "train.log")):
        if os.path.exists(dev):
            rc, out, err = cli_inprocess("analyze", dev, "--format", "json")
            assert rc == 2 and err.count("\n") == 1, (dev, err)


# --------------------------------------------------------------------------------------------------
# enormous files: streamed, bounded memory

_BIG = 32 << 20  # 32 MiB sparse (all zeros): cheap to make, and a reader that slurps it shows in its RSS
_MEASURE = textwrap.dedent("""
    import time
    import autopsy.importers as imp
    from autopsy.errors import AutopsyError
    try:  # warm up: the same kind of file, 4 KiB, so that lazy imports are not counted
        imp.load(sys.argv[2])
    except AutopsyError:
        pass
    reset_peak()
    t = time.monotonic()
    try:
        frame = imp.load(sys.argv[1]); what = f"frame of {len(frame)} rows"
    except AutopsyError as exc:
        what = f"AutopsyError: {exc}"
    print(peak_growth_mib(), round(time.monotonic() - t, 2), what)
""")
_BIG_FILES = {
    "trainer_state": "trainer_state.json",
    "tensorboard": "runs/x/events.out.tfevents.1.host",
    "wandb": "wandb/run-20240101_000000-abcd1234/run-abcd1234.wandb",
    "console": "train.log",
    "wandb_export": "wandb-history.csv",
}
_IMPORTER_MODULE = {"trainer_state": "autopsy.importers.trainer_state", "tensorboard": "autopsy.importers.tensorboard",
                    "wandb": "autopsy.importers.wandb", "console": "autopsy.importers.console",
                    "wandb_export": "autopsy.importers.wandb"}


def _peak_growth(big: Path, small: Path) -> tuple[int, float, str]:
    """Peak RSS growth (MB) of ``autopsy.load(big)`` in a fresh process, after a warm-up load of ``small``."""
    grew_mb, seconds, what = run_measured(_MEASURE, big, small).split(" ", 2)
    return int(grew_mb), float(seconds), what.strip()


@pytest.mark.parametrize("kind", list(_BIG_FILES))
def test_enormous_file_bounded_memory(kind, tmp_path):
    if not has_module(_IMPORTER_MODULE[kind]):
        pytest.skip(f"{_IMPORTER_MODULE[kind]} not in this build yet")
    for run, size in (("small", 4096), ("run", _BIG)):
        path = tmp_path / run / _BIG_FILES[kind]
        path.parent.mkdir(parents=True)
        with path.open("wb") as fh:
            fh.truncate(size)
    grew_mb, seconds, what = _peak_growth(tmp_path / "run", tmp_path / "small")
    print(f"{kind}: +{grew_mb} MB peak RSS, {seconds} s for a {_BIG >> 20} MiB file: {what[:120]}")
    # bounded: at most about one copy of the file (the vectorised readers map or read it whole, and decode once);
    # a reader that copies it into per-byte arrays or Python objects shows 4x-10x
    assert grew_mb < 2 * (_BIG >> 20), f"{kind}: peak RSS grew {grew_mb} MB reading a {_BIG >> 20} MiB file"


def _wandb_log(path: Path, blocks: int) -> None:
    """A valid ``.wandb`` file of ``blocks`` 32 KiB blocks: each holds one history row (step, loss) and a
    console-output record that fills the block, as a chatty run writes them."""
    import zlib

    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    from autopsy.importers._leveldb_log import BLOCK_SIZE, FILE_HEADER

    def chunk(payload: bytes) -> bytes:
        return struct.pack("<IHB", zlib.crc32(payload, zlib.crc32(b"\x01")), len(payload), 1) + payload

    path.parent.mkdir(parents=True)
    with path.open("wb") as fh:
        fh.write(FILE_HEADER)
        pos = len(FILE_HEADER)
        for i in range(blocks):
            rec = pb.Record()
            for key, value in (("train/global_step", i + 1), ("train/loss", 2.0 - i / blocks)):
                item = rec.history.item.add()
                item.key, item.value_json = key, json.dumps(value)
            data = chunk(rec.SerializeToString())
            room = BLOCK_SIZE - pos % BLOCK_SIZE - len(data) - 7 - 16  # 16: the filler record's own framing
            filler = pb.Record()
            filler.output_raw.line = "x" * max(room, 0)
            data += chunk(filler.SerializeToString())
            data += b"\x00" * (-(pos + len(data)) % BLOCK_SIZE)  # zero padding to the block's end
            fh.write(data)
            pos += len(data)


def test_wandb_log_is_streamed(tmp_path):
    """A valid 64 MiB ``.wandb`` file costs its decoded history, not its size: read block by block."""
    run_dir = "wandb/offline-run-20240101_000000-abcd1234/run-abcd1234.wandb"
    _wandb_log(tmp_path / "small" / run_dir, 2)
    _wandb_log(tmp_path / "run" / run_dir, 2048)
    assert (tmp_path / "run" / run_dir).stat().st_size == 64 << 20
    grew_mb, seconds, what = _peak_growth(tmp_path / "run", tmp_path / "small")
    print(f"wandb 64 MiB: +{grew_mb} MB peak RSS, {seconds} s: {what[:120]}")
    assert what.startswith("frame of 2048 rows"), what
    assert grew_mb < 16, f"peak RSS grew {grew_mb} MB reading a 64 MiB .wandb file"


def test_csv_export_skips_an_absurd_line_in_bounded_memory(tmp_path):
    """A W&B CSV export with a 48 MiB line of junk in its middle: the rows around it are read, the line is
    skipped as damage, and pandas never holds it."""
    rows = "".join(f"{s},{2.0 - s / 1000}\n" for s in range(1000))
    for run, junk in (("small", 10), ("run", 48 << 20)):
        path = tmp_path / run / "wandb-history.csv"
        path.parent.mkdir()
        with path.open("w") as fh:
            fh.write("Step,run-a - train/loss\n" + rows)
            fh.write("1000," + "7" * junk + "\n")
            fh.write("".join(f"{s},{2.0 - s / 1000}\n" for s in range(1001, 2001)))
    grew_mb, seconds, what = _peak_growth(tmp_path / "run", tmp_path / "small")
    print(f"csv with a 48 MiB line: +{grew_mb} MB peak RSS, {seconds} s: {what[:120]}")
    assert grew_mb < 16, f"peak RSS grew {grew_mb} MB reading a CSV with a 48 MiB line"
    frame = load(tmp_path / "run")
    (dmg,) = run_info(frame).damage
    assert "over 4 MiB" in dmg.problem and dmg.offset == len("Step,run-a - train/loss\n" + rows)
    loss = series(frame, "train/loss")
    assert len(loss) == 2000 and 1000 not in loss.index  # the rows before and after it


def test_console_log_of_binary_junk_is_read_in_bounded_memory(tmp_path):
    """64 MiB of binary junk (NUL, control and non-UTF-8 bytes) before a few real HF log lines: decoded and
    cleaned chunk by chunk, so the junk never sits in memory beside its decoded copy."""
    lines = "".join(f"{{'loss': {2.0 - s / 10}, 'grad_norm': 1.0, 'learning_rate': 1e-4, 'epoch': {s / 10}}}\n" for s in range(1, 6))
    for run, junk in (("small", 4096), ("run", 64 << 20)):
        path = tmp_path / run / "train.log"
        path.parent.mkdir()
        with path.open("wb") as fh:
            fh.write(b"\x00\xff\x01\x7f" * (junk // 4) + b"\n" + lines.encode())
    grew_mb, seconds, what = _peak_growth(tmp_path / "run", tmp_path / "small")
    print(f"console 64 MiB of junk: +{grew_mb} MB peak RSS, {seconds} s: {what[:120]}")
    assert what.startswith("frame of 20 rows"), what
    assert grew_mb < 32, f"peak RSS grew {grew_mb} MB reading a 64 MiB console log of junk"


# --------------------------------------------------------------------------------------------------
# hostile JSON


def _state(tmp_path: Path, doc: object | str | bytes) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    data = doc if isinstance(doc, bytes) else (doc if isinstance(doc, str) else json.dumps(doc)).encode()
    (run / "trainer_state.json").write_bytes(data)
    return run


def _load_or_error(run: Path):
    try:
        return load(run)
    except AutopsyError as exc:
        assert "\n" not in str(exc)
        return exc


@pytest.mark.parametrize("depth", [1_000, 100_000, 1_000_000])
def test_deeply_nested_json(tmp_path, depth):
    for doc in ("[" * depth + "]" * depth, '{"log_history": ' + "[" * depth, '{"a":' * depth + "1" + "}" * depth):
        got = _load_or_error(_state(tmp_path, doc))
        if not isinstance(got, AutopsyError):
            assert run_info(got).damage or run_info(got).notes


def test_huge_json_is_read_vectorised(tmp_path):
    n = 100_000
    steps = np.arange(1, n + 1)
    hist = [{"step": int(s), "loss": 1.0 + 1.0 / s, "grad_norm": 0.5, "learning_rate": 1e-4} for s in steps]
    run = _state(tmp_path, {"global_step": n, "max_steps": n, "log_history": hist})
    frame = load(run)  # its speed is measured in bench/reliability (no wall-clock assert in a test)
    assert len(series(frame, "train/loss")) == n


def test_extreme_numbers_and_hostile_steps(tmp_path):
    hist = json.loads((NAN_RUN / "trainer_state.json").read_text())["log_history"]
    hist = hist + [
        {"step": 61, "loss": 1e308, "grad_norm": 5.0},
        {"step": 62, "loss": 2.0, "grad_norm": 1e309},  # overflows to inf when parsed
        {"step": -5, "loss": 1.0}, {"step": 62.5, "loss": 1.0}, {"step": 1e30, "loss": 1.0}, {"step": 2**70, "loss": 1.0},
        {"step": "63", "loss": "4.5"}, {"step": 64, "loss": [1], "grad_norm": {"x": 1}, "learning_rate": True},
        [1, 2], "entry", None, 3, {},
    ]
    text = json.dumps({"global_step": 64, "max_steps": 60, "log_history": hist}).replace("1e+309", "1e309")
    frame = load(_state(tmp_path, text))
    loss, gn = series(frame, "train/loss"), series(frame, "train/grad_norm")
    assert loss[61] == 1e308 and math.isinf(gn[62])
    assert loss[63] == 4.5
    assert frame["step"].min() >= 0 and frame["step"].max() <= 64
    notes = " ".join(run_info(frame).notes)
    assert "4 log_history entries dropped" in notes
    # a stray negative step is not a 'resume' that hides the real history
    assert gn.loc[:60].isna().sum() == 30
    rc, out, err = cli_inprocess("analyze", tmp_path / "run", "--format", "json")
    nan = [f for f in json.loads(out)["runs"][0]["findings"] if f["signature"] == "nan_grad_norm"]
    assert nan and nan[0]["step"] == 31


@pytest.mark.parametrize("doc", [
    [], {}, 1e309, "string", None, True, {"log_history": None}, {"log_history": {"step": 1}}, {"log_history": "x"},
    {"log_history": [None, 1, "a", [1]]}, {"log_history": [{"step": None}]}, {"log_history": [{"loss": 1.0}]},
    {"log_history": [{"step": {"a": 1}, "loss": 1.0}]}, {"global_step": {"a": 1}, "log_history": [{"step": 1, "loss": 1}]},
    {"log_history": [{"step": 1, "loss": 1}], "max_steps": "many", "logging_steps": [1], "num_train_epochs": "3"},
], ids=lambda d: json.dumps(d)[:40])
def test_wrong_json_shapes(tmp_path, doc):
    text = json.dumps(doc)
    got = _load_or_error(_state(tmp_path, text))
    if not isinstance(got, AutopsyError):
        from autopsy.analysis import analyze

        analyze(got)  # and the analysis of whatever was read does not crash either


def test_non_utf8_bytes(tmp_path):
    data = (NAN_RUN / "trainer_state.json").read_bytes()
    data = b"\xef\xbb\xbf" + data.replace(b'"trial_name": null', b'"trial_name": "\xff\xfe\x80"', 1)
    frame = load(_state(tmp_path, data))
    assert series(frame, "train/grad_norm").isna().idxmax() == 31
    assert not run_info(frame).damage
