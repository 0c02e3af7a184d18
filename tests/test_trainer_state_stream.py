"""trainer_state.json read as a stream: non-finite numbers as strings, salvage around a deep value, what was
superseded, the end-of-run record, an empty history, and memory that does not grow with the file."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest

import autopsy
from autopsy.importers import _trainer_json, read_files
from autopsy.runinfo import run_info
from autopsy.series import series
from helpers.reliability import cli_inprocess, run_measured


def _history(nan_run: Path) -> list[dict]:
    return json.loads((nan_run / "trainer_state.json").read_text())["log_history"]


def _run(tmp_path: Path, doc: dict | str, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "trainer_state.json").write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return run


@pytest.mark.parametrize("spelling", ["NaN", "nan", " NaN ", "-nan"])
def test_nan_strings_are_nan(nan_run, tmp_path, spelling):
    hist = _history(nan_run)
    for e in hist:
        if "grad_norm" in e and not math.isfinite(e["grad_norm"]):
            e["grad_norm"] = spelling
    run = _run(tmp_path, {"global_step": 60, "max_steps": 60, "log_history": hist})
    rc, out, err = cli_inprocess("analyze", run, "--format", "json")
    steps = {f["signature"]: f["step"] for f in json.loads(out)["runs"][0]["findings"]}
    assert steps.get("nan_grad_norm") == 31, steps


def test_infinity_strings_and_numbers_as_text(tmp_path):
    hist = [{"step": 1, "loss": "4.5", "grad_norm": "inf"}, {"step": 2, "loss": "Infinity", "grad_norm": "-Infinity"},
            {"step": 3, "loss": "-inf", "grad_norm": "NaN"}, {"step": 4, "loss": "many", "grad_norm": True}]
    frame = autopsy.load(_run(tmp_path, {"log_history": hist}))
    loss, gn = series(frame, "train/loss"), series(frame, "train/grad_norm")
    assert loss.to_dict() == {1: 4.5, 2: math.inf, 3: -math.inf}  # "many" is no number
    assert gn[1] == math.inf and gn[2] == -math.inf and math.isnan(gn[3]) and 4 not in gn.index


@pytest.mark.parametrize("after", [0, 9])
def test_a_value_nested_100k_deep_keeps_what_came_before(nan_run, tmp_path, after):
    """One entry nested 100,000 deep after 50 good ones: the 50 are read (and the ones after it); damage said."""
    hist = _history(nan_run)
    good, rest = hist[:50], hist[50 : 50 + after]
    deep = '{"step": 51, "loss": ' + "[" * 100_000 + "]" * 100_000 + "}"
    body = ",\n".join([json.dumps(e) for e in good] + [deep] + [json.dumps(e) for e in rest])
    run = _run(tmp_path, '{"global_step": 60, "log_history": [\n' + body + '\n], "max_steps": 60}')
    frame = autopsy.load(run)
    info = run_info(frame)
    (dmg,) = info.damage
    assert "nested too deeply" in dmg.problem and f"{50 + after} log_history entries" in dmg.salvaged
    steps = {e["step"] for e in good + rest if "loss" in e}
    assert set(series(frame, "train/loss").index) == steps
    assert info.max_steps == 60  # the fields after log_history are read too
    report = autopsy.analyze(frame)
    assert {f.signature: f.step for f in report.findings}["nan_grad_norm"] == 31


@pytest.mark.parametrize("chunk", [97, 4096])
def test_any_chunk_size_reads_the_same(nan_run, tmp_path, monkeypatch, chunk):
    """Windows cut anywhere (inside numbers, strings, the NaN token, between entries), and entries that defeat the
    batch cut (a '}' in a string, nested dicts): the same rows as one window."""
    hist = _history(nan_run)
    hist[3]["note"] = "}, {\"step\": 999, \"loss\": 1}"
    hist[5]["nested"] = {"a": [{"b": 1}, {"c": 2}]}
    path = _run(tmp_path, {"global_step": 60, "log_history": hist, "max_steps": 60}) / "trainer_state.json"
    whole = read_files("trainer_state", [path], run="r")
    monkeypatch.setattr(_trainer_json, "CHUNK_BYTES", chunk)
    small = read_files("trainer_state", [path], run="r")
    for col in ("metric", "step"):
        assert whole[col].astype(str).tolist() == small[col].astype(str).tolist()
    assert np.array_equal(whole["value"].to_numpy(), small["value"].to_numpy(), equal_nan=True)
    assert 999 not in set(small["step"]) and run_info(small).max_steps == 60


def test_cut_mid_file_in_small_windows(nan_run, tmp_path, monkeypatch):
    text = (nan_run / "trainer_state.json").read_text()
    cut = text.index('"step": 36')
    run = _run(tmp_path, text[:cut])
    monkeypatch.setattr(_trainer_json, "CHUNK_BYTES", 101)
    frame = autopsy.load(run)
    (dmg,) = run_info(frame).damage
    assert dmg.offset <= cut and "log_history entries" in dmg.salvaged
    assert series(frame, "train/loss").index.max() == 35


def test_repeated_and_decreasing_steps_are_said(tmp_path):
    hist = [{"step": s, "loss": 10.0 - s} for s in range(1, 7)] + [{"step": s, "loss": 20.0 - s} for s in range(5, 9)]
    info = run_info(autopsy.load(_run(tmp_path, {"global_step": 8, "log_history": hist})))
    (note,) = [n for n in info.notes if "logged again" in n]
    assert "2 rows at steps 5-6" in note and "train/loss" in note


def test_a_later_file_that_rewrote_history_is_said(tmp_path):
    run = tmp_path / "run"
    for step, losses in ((4, [5.0, 4.0, 3.0, 2.0]), (6, [5.0, 4.5, 3.5, 2.5, 2.0, 1.5])):
        ck = run / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        hist = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": hist}))
    info = run_info(autopsy.load(run))
    (note,) = [n for n in info.notes if "rewrote" in n]
    assert note.startswith("trainer_state: 3 values")  # steps 2-4 differ; step 1 is the same in both


def _train_logs(n: int, *, runtime: bool) -> list[dict]:
    """HF's train logs; with include_num_input_tokens_seen=True each carries train_runtime and tokens."""
    out = []
    for s in range(1, n + 1):
        e = {"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": s / 100}
        if runtime:
            e.update(num_input_tokens_seen=512 * s, train_runtime=0.5 * s, train_tokens_per_second=1024.0)
        out.append(e)
    return out


_FINAL = {"train_runtime": 30.0, "train_samples_per_second": 2.0, "train_steps_per_second": 1.0, "total_flos": 1e12,
          "train_loss": 1.2}


def test_train_runtime_in_every_log_does_not_finish_a_crashed_run(tmp_path):
    doc = {"global_step": 40, "max_steps": 100, "log_history": _train_logs(40, runtime=True)}
    info = run_info(autopsy.load(_run(tmp_path, doc)))
    assert info.finished is not True and "train_runtime" not in info.summary


def test_the_final_record_at_the_end_finishes_the_run(tmp_path):
    hist = _train_logs(100, runtime=True) + [{"step": 100, "epoch": 1.0, **_FINAL}]
    info = run_info(autopsy.load(_run(tmp_path, {"global_step": 100, "max_steps": 100, "log_history": hist})))
    assert info.finished is True and info.summary == _FINAL


def test_an_eval_after_the_final_record_is_still_the_end(tmp_path):
    hist = _train_logs(10, runtime=False) + [{"step": 10, **_FINAL}, {"step": 10, "eval_loss": 1.5}]
    info = run_info(autopsy.load(_run(tmp_path, {"global_step": 10, "max_steps": 10, "log_history": hist})))
    assert info.finished is True and info.summary["train_loss"] == 1.2


def test_a_final_record_followed_by_train_logs_is_no_end(tmp_path):
    """A run that finished at step 10, was resumed with a larger max_steps and died at 15."""
    hist = _train_logs(10, runtime=False) + [{"step": 10, **_FINAL}] + _train_logs(15, runtime=False)[10:]
    info = run_info(autopsy.load(_run(tmp_path, {"global_step": 15, "max_steps": 30, "log_history": hist})))
    assert info.finished is not True and not info.summary
    assert any("followed by more train logs" in n for n in info.notes)


@pytest.mark.parametrize(("stop", "finished"), [(False, False), (True, True), (None, True)])
def test_a_final_record_short_of_max_steps(tmp_path, stop, finished):
    """train() returned at step 20 of 200: cut short unless a callback asked for the stop (early stopping)."""
    doc = {"global_step": 20, "max_steps": 200, "log_history": _train_logs(20, runtime=False) + [{"step": 20, **_FINAL}]}
    if stop is not None:
        doc["stateful_callbacks"] = {"TrainerControl": {"args": {"should_training_stop": stop}, "attributes": {}}}
    info = run_info(autopsy.load(_run(tmp_path, doc)))
    assert info.finished is finished and info.summary["train_loss"] == 1.2
    assert any("20 of max_steps 200" in n for n in info.notes)


def test_empty_log_history_is_insufficient_data_not_an_error(tmp_path):
    run = _run(tmp_path, {"global_step": 0, "max_steps": 500, "log_history": [], "logging_steps": 10})
    frame = autopsy.load(run)
    assert frame.empty and run_info(frame).max_steps == 500
    rc, out, err = cli_inprocess("analyze", run, "--format", "json", "--fail-on", "never")
    assert rc == 0, err
    assert "insufficient_data" in {f["signature"] for f in json.loads(out)["runs"][0]["findings"]}


_MEASURE = textwrap.dedent("""
    from autopsy.importers import read_files
    read_files("trainer_state", [sys.argv[2]], run="warm")
    reset_peak()
    frame = read_files("trainer_state", [sys.argv[1]], run="r")
    print(peak_growth_mib(), len(frame), frame.memory_usage(deep=True).sum() // 2**20)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_file(tmp_path):
    """A 300k-entry file (~43 MB, HF's indent=2): parsed whole it cost 18-23x the file in Python objects (issue 17:
    3.6 GB for 192 MB); streamed, the peak is the rows, the frame built from them (a few transient copies of its
    columns) and one window of text: a small multiple of the frame, not of the file."""
    n = 300_000
    hist = [{"epoch": s / n, "grad_norm": 0.5, "learning_rate": 1e-4, "loss": 2.0 + 1.0 / s, "step": s} for s in range(1, n + 1)]
    big = _run(tmp_path, {"global_step": n, "log_history": hist, "max_steps": n}) / "trainer_state.json"
    small = _run(tmp_path, {"log_history": hist[:10]}, "small") / "trainer_state.json"
    grew_mb, rows, frame_mb = map(int, run_measured(_MEASURE, big, small, timeout=300).split())
    assert rows == 4 * n
    file_mb = big.stat().st_size >> 20
    assert grew_mb < 5 * frame_mb + 32, f"peak RSS grew {grew_mb} MB reading a {file_mb} MB file (frame: {frame_mb} MB)"
    assert grew_mb < 4 * file_mb  # the whole-file parse: 18x and more
