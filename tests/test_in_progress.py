"""A run still being written (a Trainer mid-run) is told from a dead one and from a fresh copy of either.

Where the logs carry wall times (TensorBoard) see test_tensorboard_stream.py; here a run whose only logs are the
checkpoints' trainer_state.json (no times): file times decide, with the copy case ruled out.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import autopsy
from autopsy.runinfo import run_info


def _checkpoints(run: Path, steps: list[int], *, final: bool = False) -> list[Path]:
    files = []
    for step in steps:
        ck = run / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        hist = [{"step": s, "loss": 3.0 / s, "grad_norm": 1.0} for s in range(1, step + 1)]
        if final and step == steps[-1]:
            hist.append({"step": step, "train_runtime": 9.0, "train_loss": 1.0, "total_flos": 1.0})
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100, "log_history": hist}))
        files.append(ck / "trainer_state.json")
    return files


def _age(paths: list[Path], ages_s: list[float]) -> None:
    now = time.time()
    for p, age in zip(paths, ages_s):
        os.utime(p, (now - age, now - age))
        os.utime(p.parent, (now - age, now - age))


def test_checkpoints_saved_minutes_apart_just_now_are_a_live_run(tmp_path):
    files = _checkpoints(tmp_path / "run", [10, 20, 30])
    _age(files, [300, 180, 40])  # saved every two minutes, the last 40 s ago
    info = run_info(autopsy.load(tmp_path / "run"))
    assert info.in_progress is True
    (note,) = [n for n in info.notes if n.startswith("in progress")]
    ago = int(re.search(r"modified (\d+) s ago", note).group(1))
    assert 40 <= ago < 40 + 600  # 40 s before the test read it, plus however long the test took to get there


def test_a_fresh_copy_is_not_live(tmp_path):
    """cp, git clone, a download: every file written within the same second."""
    files = _checkpoints(tmp_path / "run", [10, 20, 30])
    _age(files, [5, 5, 5])
    assert run_info(autopsy.load(tmp_path / "run")).in_progress is False


def test_a_lock_file_beside_a_fresh_copy_makes_it_live(tmp_path):
    files = _checkpoints(tmp_path / "run", [10, 20, 30])
    _age(files, [5, 5, 5])
    (tmp_path / "run" / "tmp-checkpoint-40").mkdir()  # HF saves a checkpoint there, then renames it
    info = run_info(autopsy.load(tmp_path / "run"))
    assert info.in_progress is True and any("tmp-checkpoint-40" in n for n in info.notes)


def test_an_old_run_is_dead(tmp_path):
    files = _checkpoints(tmp_path / "run", [10, 20, 30])
    _age(files, [7200, 7000, 6800])
    assert run_info(autopsy.load(tmp_path / "run")).in_progress is False


def test_a_finished_run_is_not_in_progress(tmp_path):
    files = _checkpoints(tmp_path / "run", [10, 20, 30], final=True)
    _age(files, [300, 180, 40])
    info = run_info(autopsy.load(tmp_path / "run"))
    assert info.finished is True and info.in_progress is False
