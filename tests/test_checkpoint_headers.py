"""The cheap header check of every checkpoint's safetensors at load: a damaged checkpoint is reported and never
recommended as the restart point. Real checkpoints from the committed Trainer runs, damaged here."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import autopsy
from autopsy.checkpoints import header_problem, restart_point
from autopsy.runinfo import run_info
from helpers.reliability import cli_inprocess

STEPS = (10, 20, 30, 40, 50, 60)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("optimizer.pt", "rng_state.pth", "scheduler.pt"))
    return dest


def _weights(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step}" / "model.safetensors"


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_every_real_checkpoint_passes(nan_run, healthy_run):
    for run in (nan_run, healthy_run):
        for s in STEPS:
            assert header_problem(_weights(run, s)) is None


def test_cut_in_half_without_a_nan_is_reported(healthy_run, tmp_path):
    """No NaN in the logs: the weight scan looks at the latest checkpoint only; the header check sees them all."""
    run = _copy(healthy_run, tmp_path / "run")
    w = _weights(run, 30)
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    info = run_info(autopsy.load(run))
    assert 30 in info.bad_checkpoints and "cut off" in info.bad_checkpoints[30]
    (dmg,) = [d for d in info.damage if d.file == str(w)]
    assert dmg.offset == len(data) // 2 and str(len(data)) in dmg.problem
    rc, out, err = cli_inprocess("analyze", run, "--format", "json")
    damaged = [f for f in json.loads(out)["runs"][0]["findings"] if f["signature"] == "source_damaged"]
    assert [f["evidence"]["file"] for f in damaged] == [str(w)]


def test_cut_checkpoint_is_never_the_restart_point(nan_run, tmp_path):
    run = _copy(nan_run, tmp_path / "run")
    w = _weights(run, 30)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    frame = autopsy.load(run)
    info = run_info(frame)
    assert restart_point(info, 31)["restart_step"] == 20
    rc, out, err = cli_inprocess("analyze", run, "--format", "json")
    nan = next(f for f in json.loads(out)["runs"][0]["findings"] if f["signature"] == "nan_grad_norm")
    assert nan["step"] == 31 and nan["evidence"]["restart_step"] == 20


def _corrupt(run: Path) -> dict[int, str]:
    """Four corrupt headers, each of another kind; returns step -> the words its problem must name."""
    header, body = _header(_weights(run, 10))
    w = _weights(run, 10)  # a header length past the end of the file
    w.write_bytes(struct.pack("<Q", 10**9) + w.read_bytes()[8:])
    w = _weights(run, 40)  # a header that is not JSON
    raw = w.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    w.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n :])
    name = next(k for k in header if k != "__metadata__")
    backwards = json.loads(json.dumps(header))
    backwards[name]["data_offsets"] = backwards[name]["data_offsets"][::-1]
    if backwards[name]["data_offsets"][0] == backwards[name]["data_offsets"][1]:
        backwards[name]["data_offsets"] = [8, 4]
    _write(_weights(run, 50), backwards, body)  # offsets that run backwards
    wrong = json.loads(json.dumps(header))
    wrong[name]["dtype"] = "F64" if wrong[name]["dtype"] != "F64" else "F16"
    _write(_weights(run, 60), wrong, body)  # a dtype that does not fit the bytes
    return {10: "header length", 40: "not JSON", 50: "backwards", 60: "bytes for a"}


def test_four_corrupt_headers_are_each_reported(nan_run, tmp_path):
    run = _copy(nan_run, tmp_path / "run")
    expected = _corrupt(run)
    info = run_info(autopsy.load(run))
    for step, words in expected.items():
        assert step in info.bad_checkpoints, (step, info.bad_checkpoints)
        problems = [d.problem for d in info.damage if d.file == str(_weights(run, step))]
        assert len(problems) == 1 and words in problems[0], (step, problems)
    assert restart_point(info, 31)["restart_step"] == 30
    rc, out, err = cli_inprocess("analyze", run, "--format", "json")
    files = {f["evidence"]["file"] for f in json.loads(out)["runs"][0]["findings"] if f["signature"] == "source_damaged"}
    assert files == {str(_weights(run, s)) for s in expected}


@pytest.mark.parametrize("extra", [b"", b"\0" * 7])
def test_trailing_bytes_are_damage(nan_run, tmp_path, extra):
    w = tmp_path / "model.safetensors"
    w.write_bytes(_weights(nan_run, 10).read_bytes() + extra)
    got = header_problem(w)
    assert (got is None) is (not extra)
