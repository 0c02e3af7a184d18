"""The TensorBoard reader in bounded windows, Keras' layout and TF2 hparams, and HF's end-of-run record.

Event files are written at test time by the real writers (torch's ``SummaryWriter``, tensorboard's
``EventFileWriter`` with its own summary functions).
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import autopsy
from autopsy.frame import wall_seconds
from autopsy.importers import _tb_events, read_files
from autopsy.importers.discover import find_runs
from autopsy.runinfo import run_info
from autopsy.series import series
from helpers.reliability import run_measured
from helpers.tb import KERAS_HPARAMS, keras_curves, write_hf_run, write_keras_run

pytest.importorskip("tensorboard")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_run(tmp_path_factory.mktemp("tbs") / "out" / "runs" / "Jan01_00-00-00_host", tensors=True)


def _rows(frame):
    return (frame["raw_metric"].astype(str).tolist(), frame["step"].tolist(), frame["value"].to_numpy(),
            wall_seconds(frame))


def _same(a, b) -> None:
    ra, rb = _rows(a), _rows(b)
    assert ra[0] == rb[0] and ra[1] == rb[1]
    assert np.array_equal(ra[2], rb[2], equal_nan=True) and np.array_equal(ra[3], rb[3])


@pytest.mark.parametrize("window", [64, 1000, 4096])
def test_small_windows_read_the_same_rows(hf_file, monkeypatch, window):
    """Windows smaller than a record (the args text, ~300 bytes) and than the file: the same rows, in order."""
    whole = read_files("tensorboard", [hf_file], run="r")
    monkeypatch.setattr(_tb_events, "WINDOW", window)
    windowed = read_files("tensorboard", [hf_file], run="r")
    _same(whole, windowed)
    assert run_info(windowed).config["max_steps"] == 40  # the args text, a record longer than small windows


def test_a_record_over_the_limit_is_skipped_and_counted(hf_file, monkeypatch):
    whole = read_files("tensorboard", [hf_file], run="r")
    monkeypatch.setattr(_tb_events, "WINDOW", 64)
    monkeypatch.setattr(_tb_events, "MAX_RECORD", 200)  # the args and model_config texts are longer
    got = read_files("tensorboard", [hf_file], run="r")
    _same(whole, got)
    info = run_info(got)
    assert "max_steps" not in info.config and not info.damage
    assert any("record over" in n and "not read" in n for n in info.notes), info.notes


def test_damage_in_a_later_window_has_its_file_offset(hf_file, tmp_path, monkeypatch):
    data = hf_file.read_bytes()
    cut = len(data) - 30  # inside the last record
    bad = tmp_path / "runs" / "x" / hf_file.name
    bad.parent.mkdir(parents=True)
    bad.write_bytes(data[:cut])
    monkeypatch.setattr(_tb_events, "WINDOW", 4096)
    (dmg,) = run_info(read_files("tensorboard", [bad], run="r")).damage
    assert dmg.problem.startswith("truncated last record") and len(data) - 200 < dmg.offset < cut


def test_zero_filled_tail_stops_reading_at_its_start(hf_file, tmp_path, monkeypatch):
    """A preallocated file: real records, then zeros. Reading stops where the zeros start, in any window."""
    data = hf_file.read_bytes()
    path = tmp_path / "runs" / "x" / hf_file.name
    path.parent.mkdir(parents=True)
    path.write_bytes(data + b"\0" * 100_000)
    monkeypatch.setattr(_tb_events, "WINDOW", 8192)
    frame = read_files("tensorboard", [path], run="r")
    (dmg,) = run_info(frame).damage
    assert dmg.offset == len(data) and "length CRC" in dmg.problem
    assert len(frame) == len(read_files("tensorboard", [hf_file], run="r"))


_MEASURE = textwrap.dedent("""
    from autopsy.importers import _tb_events, read_files
    _tb_events.WINDOW = int(sys.argv[2])
    read_files("tensorboard", [sys.argv[3]], run="warm")
    reset_peak()
    frame = read_files("tensorboard", [sys.argv[1]], run="r")
    print(peak_growth_mib(), len(frame))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_is_a_window_not_the_file(tmp_path):
    """24 MiB of histogram records read through 1 MiB windows: the peak grows by a few windows, not the file."""
    from torch.utils.tensorboard import SummaryWriter

    log = tmp_path / "big"
    w = SummaryWriter(log_dir=str(log), max_queue=1000)
    rng = np.random.default_rng(0)
    step = 0
    while sum(p.stat().st_size for p in log.glob("events*")) < 24 << 20:
        for _ in range(50):
            step += 1
            w.add_histogram("weights", rng.normal(size=1000), step, bins=4000)
            w.add_scalar("train/loss", 1.0 / step, step)
        w.flush()
    w.close()
    small = write_hf_run(tmp_path / "small")
    big = next(log.glob("events*"))
    grew_mb, rows = map(int, run_measured(_MEASURE, big, 1 << 20, small, timeout=300).split())
    assert rows == step
    assert grew_mb < 12, f"peak RSS grew {grew_mb} MB reading a {big.stat().st_size >> 20} MiB file in 1 MiB windows"


# --- Keras' layout, TF2 hparams --------------------------------------------------------------------------


def test_keras_train_and_validation_dirs_are_one_run(tmp_path):
    write_keras_run(tmp_path / "logs" / "fit", epochs=8)
    (run,) = find_runs(tmp_path / "logs")
    assert run.name == "fit" and len(run.files["tensorboard"]) == 3
    frame = autopsy.load(tmp_path / "logs")
    curves = keras_curves(8)
    assert series(frame, "train/loss").tolist() == pytest.approx(curves["train"]["epoch_loss"])
    assert series(frame, "eval/loss").tolist() == pytest.approx(curves["validation"]["epoch_loss"])
    assert series(frame, "eval/accuracy").tolist() == pytest.approx(curves["validation"]["epoch_accuracy"])
    assert series(frame, "train/accuracy").index.tolist() == list(range(8))
    info = run_info(frame)
    assert {k: info.config[k] for k in KERAS_HPARAMS} == KERAS_HPARAMS  # TF2 hp.hparams as config
    assert not any("header only" in n for n in info.notes)  # the profiler's empty file is no news
    report = autopsy.analyze(frame)
    assert "overfitting" in {f.signature for f in report.findings}  # validation loss turns up from epoch 4


def test_tf2_hparams_alone_are_config(tmp_path):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    w = EventFileWriter(str(tmp_path / "run"))
    w.add_event(event_pb2.Event(wall_time=1.7e9, step=0, summary=hp.hparams_pb({"lr": 0.5, "layers": 3})))
    for s in range(5):
        w.add_event(event_pb2.Event(wall_time=1.7e9 + s, step=s, summary=scalar_pb("loss", 1.0 / (s + 1))))
    w.close()
    frame = autopsy.load(tmp_path / "run")
    assert run_info(frame).config["lr"] == 0.5 and run_info(frame).config["layers"] == 3
    assert len(series(frame, "train/loss")) == 5


# --- end of run ------------------------------------------------------------------------------------------


def _hf_tb(log_dir: Path, *, steps: int, runtime_every_log: bool, final: bool, max_steps: int) -> Path:
    """HF's TensorBoardCallback as it logs: args text, train logs (with train_runtime on each when
    include_num_input_tokens_seen=True), and the final summary logs when train() returns."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(log_dir))
    w.add_text("args", json.dumps({"max_steps": max_steps, "include_num_input_tokens_seen": runtime_every_log}))
    for s in range(1, steps + 1):
        w.add_scalar("train/loss", 2.0 / s, s)
        if runtime_every_log:
            w.add_scalar("train/train_runtime", 0.5 * s, s)
            w.add_scalar("train/num_input_tokens_seen", 512 * s, s)
    if final:
        for tag, v in (("train_runtime", 0.5 * steps), ("train_loss", 1.1), ("total_flos", 1e12)):
            w.add_scalar(f"train/{tag}", v, steps)
    w.close()
    return log_dir


@pytest.mark.parametrize("final", [False, True])
def test_train_runtime_in_every_log_is_no_end(tmp_path, final):
    frame = autopsy.load(_hf_tb(tmp_path / "run", steps=20, runtime_every_log=True, final=final, max_steps=20))
    info = run_info(frame)
    assert info.finished is final
    assert ("train_loss" in info.summary) is final and ("train_runtime" in info.summary) is final
    assert "train/train_runtime" not in set(frame["metric"])  # run totals, never a series


def test_crashed_run_with_runtime_in_every_log_is_an_abrupt_end_candidate(tmp_path):
    frame = autopsy.load(_hf_tb(tmp_path / "run", steps=12, runtime_every_log=True, final=False, max_steps=100))
    info = run_info(frame)
    assert info.finished is False and info.max_steps == 100 and not info.summary


def test_in_progress_from_the_wall_time_of_the_last_point(tmp_path):
    """Written now (SummaryWriter stamps the current time): a live run. The same file logged two hours ago (as a
    copy of an old run has it, whatever its mtime): not live."""
    from torch.utils.tensorboard import SummaryWriter

    live = _hf_tb(tmp_path / "live", steps=10, runtime_every_log=False, final=False, max_steps=100)
    assert run_info(autopsy.load(live)).in_progress is True
    old = tmp_path / "old"
    w = SummaryWriter(log_dir=str(old))
    w.add_text("args", json.dumps({"max_steps": 100}))
    for s in range(1, 11):
        w.add_scalar("train/loss", 2.0 / s, s, walltime=time.time() - 7200 + s)
    w.close()
    info = run_info(autopsy.load(old))
    assert info.in_progress is False and info.finished is False
    done = _hf_tb(tmp_path / "done", steps=10, runtime_every_log=False, final=True, max_steps=10)
    assert run_info(autopsy.load(done)).in_progress is False
    assert math.isfinite(run_info(autopsy.load(done)).summary["train_loss"])
