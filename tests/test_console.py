"""Console logs: a real HF Trainer's printed output, format grammars, crashes, the end of a run, and speed."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from autopsy import analyze
from autopsy.frame import make_frame
from autopsy.importers import load
from autopsy.importers.console import parse_console_text
from autopsy.memory_estimate import estimate_training_memory
from autopsy.runinfo import RunInfo, attach_runs, catalog, run_info
from autopsy.series import series
from helpers.detect import detect


@pytest.fixture(scope="session")
def trainer_console(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real Trainer run (inf planted after step 30) whose stdout+stderr and HF log lines are captured to a .log."""
    import transformers

    import tinyllama

    out = tmp_path_factory.mktemp("console") / "run"
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    tlog = transformers.logging.get_logger("transformers")
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    tlog.addHandler(handler)
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            tinyllama.train(out, max_steps=40, logging_steps=2, eval_steps=20, save_steps=20, plant_inf_at=30,
                            report_to=())
    finally:
        tlog.removeHandler(handler)
        transformers.logging.set_verbosity(old)
    log = out.parent / "train.log"
    log.write_text(buf.getvalue())
    return log, out


@pytest.mark.torch
@pytest.mark.slow
def test_real_trainer_console_matches_trainer_state(trainer_console):
    log, out = trainer_console
    text = log.read_text()
    assert "{'loss': '" in text, "transformers 5.x prints values as strings"
    con = load(log)
    ts = load(out / "trainer_state.json")
    for metric in ("train/loss", "train/grad_norm", "train/learning_rate", "eval/loss"):
        a, b = series(con, metric), series(ts, metric)
        assert a.index.tolist() == b.index.tolist(), metric
        # the console prints 4 significant digits
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-3, atol=1e-12, equal_nan=True)
    info = next(iter(catalog(con).values()))
    assert info.max_steps == 40 and info.logging_steps in (None, 2) or info.max_steps == 40
    assert info.finished is True
    assert any("step" in n for n in info.notes)
    sigs = {f.signature for f in analyze(con).runs[0].findings}
    assert {"nan_grad_norm", "loss_zero_collapse"} <= sigs
    assert "abrupt_end" not in sigs and "crash" not in sigs



def _parse(text: str, *, run: str = "r"):
    got = parse_console_text(text, run=run)
    return attach_runs(got.frame, got.runs)


def test_hf_4x_dicts_wrapped_and_tqdm_carriage_returns():
    text = (" 10%|#  | 9/90 [00:01<00:10]\r 11%|#  | 10/90 [00:01<00:10]\n{'loss': 2.5, 'grad_norm': 1.5, 'learn\n"
            "ing_rate': 1e-05, 'epoch': 0.11}\n 11%|#  | 10/90 [00:01<00:10]\r 12%| | 11/90 [00:01<00:10]\r"
            " 22%|## | 20/90 [00:02<00:09]\n{'loss': 0.0, 'grad_norm': nan, 'learning_rate': 2e-05, 'epoch': 0.22}\n"
            "{'eval_loss': inf, 'eval_runtime': 1.0, 'epoch': 0.22}\n")
    frame = _parse(text, run="r")
    assert series(frame, "train/loss").to_dict() == {10: 2.5, 20: 0.0}
    assert series(frame, "train/learning_rate").to_dict() == {10: 1e-05, 20: 2e-05}
    assert np.isnan(series(frame, "train/grad_norm")[20])
    assert series(frame, "eval/loss").to_dict() == {20: np.inf}
    assert run_info(frame, "r").max_steps == 90


@pytest.mark.parametrize(
    ("line", "step", "metric", "value"),
    [
        ("Step 120, Loss: 0.97", 120, "train/loss", 0.97),
        ("epoch 3 step 120 | loss=NaN | lr=1e-4", 120, "train/loss", np.nan),
        ("120 loss: Infinity grad_norm: -inf", None, "train/grad_norm", -np.inf),
        ("2024/01/01 - mmengine - INFO - Epoch(train) [2][100/788]  lr: 1e-4  loss: 63.1", 888, "train/loss", 63.1),
        ("Epoch 0:  50%|#####| 5/10 [00:01<00:01, 3.2it/s, train_loss_step=nan.0, v_num=0]", 5, "train/loss", np.nan),
        ("| epoch 002:   10 / 100 loss=3.5, gnorm=inf, num_updates=110", 110, "train/grad_norm", np.inf),
        (" iteration      50/    1000 | lm loss: 7.1E+00 | loss scale: 65536.0 | grad norm: 2.5 |", 50, "train/loss", 7.1),
    ],
)
def test_generic_line_grammars(line, step, metric, value):
    frame = _parse(line + "\n", run="r")
    s = series(frame, metric)
    assert len(s) == 1
    if step is not None:
        assert s.index[0] == step
    np.testing.assert_equal(s.iloc[0], value)


def test_binary_and_non_utf8_bytes_are_skipped(tmp_path):
    p = tmp_path / "train.log"
    p.write_bytes(b"\xff\xfe garbage \x00\x01\n{'loss': 1.5, 'epoch': 0.1}\n\x80\x81{'loss': 1.25, 'epoch': 0.2}\n")
    frame = load(p)
    assert series(frame, "train/loss").tolist() == [1.5, 1.25]
    info = next(iter(catalog(frame).values()))
    assert any("not UTF-8" in n for n in info.notes)


def test_unknown_format_is_insufficient_data_not_a_crash(tmp_path):
    p = tmp_path / "notes.log"
    p.write_text("hello world\nnothing to see here\n")
    run = analyze(p).runs[0]
    assert run.findings and {f.signature for f in run.findings} == {"insufficient_data"}
    assert any("notes.log" in f.summary for f in run.findings)


_CRASHES = {
    "oom": ("Traceback (most recent call last):\n  File \"t.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory. "
            "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.50 GiB is free. Of the "
            "allocated memory 70.00 GiB is allocated by PyTorch, and 3.00 GiB is reserved by PyTorch but unallocated.",
            "torch.OutOfMemoryError"),
    "device_assert": ("../aten/src/ATen/native/cuda/Loss.cu:250: nll_loss_forward_reduce_cuda_kernel_2d: block: "
                      "[0,0,0] Assertion `t >= 0 && t < n_classes` failed.\nRuntimeError: CUDA error: device-side "
                      "assert triggered", "RuntimeError"),
    "nccl_timeout": ("[rank1]:[E ProcessGroupNCCL.cpp:607] [Rank 1] Watchdog caught collective operation timeout: "
                     "WorkNCCL(SeqNum=5, OpType=ALLREDUCE, Timeout(ms)=600000) ran for 600045 milliseconds", None),
    "killed": ("/var/spool/slurmd/job123/slurm_script: line 12: 4242 Killed  python train.py", None),
    "disk_full": ("Traceback (most recent call last):\nOSError: [Errno 28] No space left on device", "OSError"),
    "interrupted": ("Traceback (most recent call last):\n  File \"t.py\", line 3, in <module>\nKeyboardInterrupt",
                    "KeyboardInterrupt"),
    "other": ("Traceback (most recent call last):\n  File \"t.py\", line 3, in <module>\nValueError: bad shape (3, 4)",
              "ValueError"),
}


@pytest.mark.parametrize("kind", sorted(_CRASHES))
def test_crash_kinds(kind):
    tail, exc = _CRASHES[kind]
    text = "***** Running training *****\n  Total optimization steps = 100\n" + "".join(
        f"{{'loss': {2 - i / 10}, 'grad_norm': 1.0, 'epoch': {i / 100}, 'step': {i}}}\n" for i in range(1, 6)) + tail
    frame = _parse(text, run="r")
    info = run_info(frame, "r")
    found = detect("crash", frame, info)
    assert len(found) == 1 and found[0].evidence["kind"] == kind
    assert found[0].step == 5 and found[0].cause and found[0].fix
    assert found[0].evidence.get("exception") == exc
    ends = detect("abrupt_end", frame, info)
    assert (len(ends) == 1) == (kind != "interrupted")
    if kind == "oom":
        ev = found[0].evidence
        assert (ev["tried_to_allocate_gib"], ev["total_capacity_gib"], ev["free_gib"]) == (2.0, 79.15, 1.5)


def test_oom_with_model_config_gets_memory_estimate():
    text = "{'loss': 2.0, 'step': 1}\nRuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB\n"
    frame = _parse(text, run="r")
    info = run_info(frame, "r")
    info.config.update(model={"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000,
                              "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32},
                       per_device_train_batch_size=8, max_seq_length=4096)
    f = detect("crash", frame, info)[0]
    est = f.evidence["memory_estimate"]
    assert 6.0e9 < est["params"] < 7.5e9  # Llama-2-7B
    assert est["activations_checkpointed_gib"] < est["activations_gib"]
    assert est["best_knob"] in f.fix


def test_memory_estimate_knobs_are_consistent():
    full = estimate_training_memory(hidden_size=2048, num_hidden_layers=16, vocab_size=128256, batch_size=4,
                                    seq_len=2048)
    lora = estimate_training_memory(hidden_size=2048, num_hidden_layers=16, vocab_size=128256, batch_size=4,
                                    seq_len=2048, trainable_params=5_000_000)
    assert lora["optimizer_gib"] < full["optimizer_gib"] / 50
    halved = estimate_training_memory(hidden_size=2048, num_hidden_layers=16, vocab_size=128256, batch_size=2,
                                      seq_len=2048)
    saved = full["savings_gib"]["halve per-device batch size (double gradient_accumulation_steps)"]
    assert abs((full["total_gib"] - halved["total_gib"]) - saved) < 0.05


def _scale_frame(values, overflow=False):
    steps = list(range(1, len(values) + 1))
    metric = ["train/loss_scale"] * len(values) + (["train/overflow"] * len(values) if overflow else [])
    return make_frame(run="r", source="console", metric=metric, step=steps * (2 if overflow else 1),
                      value=list(values) + ([1.0] * len(values) if overflow else []))


@pytest.mark.parametrize(
    ("values", "overflow", "fires"),
    [
        ([2.0**16 / 2**k for k in range(16)], False, True),  # halves to 2
        ([1.0] * 5, True, True),  # pinned at the floor, every step overflows
        ([2.0**32 / 2**k for k in range(7)], True, False),  # the initial search from 2**32
        ([2.0] * 6, False, False),  # low but stable (fairseq)
        ([1.0] * 4, False, False),  # bf16 runs print 1.0
        ([65536, 2, 4, 8, 65536], False, False),  # dipped and recovered
    ],
)
def test_loss_scale_collapse(values, overflow, fires):
    assert bool(detect("loss_scale_collapse", _scale_frame(values, overflow))) is fires


def test_abrupt_end_needs_a_seen_start_or_a_crash():
    steps = list(range(1, 11))
    frame = make_frame(run="r", source="console", metric="train/loss", step=steps, value=[1.0] * 10)
    assert not detect("abrupt_end", frame, RunInfo(name="r", max_steps=100))  # an excerpt: nothing known about its end
    got = detect("abrupt_end", frame, RunInfo(name="r", max_steps=100, finished=False))
    assert got and got[0].step == 10 and got[0].evidence["share_done"] == 0.1
    assert not detect("abrupt_end", frame, RunInfo(name="r", max_steps=10, finished=False))
    assert not detect("abrupt_end", frame, RunInfo(name="r", max_steps=100, finished=True))


def test_committed_runs_do_not_cry_wolf(healthy_run, nan_run):
    for path in (healthy_run, nan_run):
        sigs = {f.signature for f in analyze(path).runs[0].findings}
        assert not sigs & {"abrupt_end", "crash", "loss_scale_collapse"}, (path, sigs)


def test_cli_json_on_a_log(tmp_path):
    p = tmp_path / "slurm-1.out"
    p.write_text("{'loss': 1.0, 'step': 1}\n{'loss': 0.9, 'step': 2}\nKilled\n")
    r = subprocess.run([sys.executable, "-m", "autopsy", "analyze", str(p), "--format", "json"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # a killed run is a failed one: --fail-on error by default
    run = json.loads(r.stdout)["runs"][0]
    kinds = {f["signature"]: f["evidence"].get("kind") for f in run["findings"]}
    assert kinds.get("crash") == "killed" and "abrupt_end" in kinds


def test_100k_line_log_parses_fast(tmp_path):
    """50,000 bar + dict pairs read whole (the time is printed; speed is measured in bench/, never asserted)."""
    text = "".join(f" {i // 500}%|#| {i - 1}/50000 [00:{i % 60:02d}<01:00, 9.1it/s]\r {i // 500}%|#| {i}/50000 "
                   f"[00:{i % 60:02d}<01:00, 9.1it/s]\n{{'loss': {1 + 1 / i:.4f}, 'grad_norm': 0.5, "
                   f"'learning_rate': 1e-05, 'epoch': {i / 1e5}}}\n" for i in range(1, 50001))
    p = tmp_path / "big.log"
    p.write_text(text)
    t0 = time.perf_counter()
    frame = load(p)
    elapsed = time.perf_counter() - t0
    print(f"\n{len(p.read_text().splitlines())} lines parsed in {elapsed:.2f} s")
    assert len(series(frame, "train/loss")) == 50000
