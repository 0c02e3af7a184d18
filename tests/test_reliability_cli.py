"""Read-only and never-a-traceback: autopsy leaves the analysed directory byte-identical whatever it renders, and
every failure is one line on stderr with exit code 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import shutil

import pytest

from autopsy.errors import AutopsyError
from helpers.reliability import (
    cli_inprocess,
    cli_subprocess,
    has_module,
    make_damaged,
    snapshot,
)

NAN_RUN = make_damaged.NAN_RUN
FORMATS = ["json", "markdown", "console"] + (["html"] if has_module("autopsy.report.html") else [])


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory):
    """A copy of the NaN run with every source the build reads (trainer_state, TensorBoard, a console log)."""
    root = tmp_path_factory.mktemp("readonly")
    run = root / "nan-at-31"
    shutil.copytree(NAN_RUN, run)
    (run / "train.log").write_text("step 31 loss nan\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory.\n")
    return run


@pytest.mark.parametrize("fmt", FORMATS)
def test_analyze_leaves_inputs_identical(run_copy, tmp_path, fmt):
    before = snapshot(run_copy)
    rc, out, err = cli_inprocess("analyze", run_copy, "--format", fmt, "--verbose" if fmt == "console" else "--no-plots",
                                 "--fail-on", "never")
    assert rc == 0 and out.strip(), err
    rc, _, err = cli_inprocess("analyze", run_copy, "--format", fmt, "--out", tmp_path / f"report.{fmt}", "--fail-on",
                               "never")
    assert rc == 0 and (tmp_path / f"report.{fmt}").stat().st_size > 0, err
    assert snapshot(run_copy) == before


def test_cli_in_the_run_directory_writes_nothing_there(run_copy, tmp_path):
    """As a user runs it from inside the run dir (a program that writes to its cwd would show here)."""
    before = snapshot(run_copy)
    r = cli_subprocess("analyze", ".", "--format", "markdown", "--out", tmp_path / "r.md", "--fail-on", "never",
                       cwd=run_copy)
    assert r.returncode == 0, r.stderr
    assert snapshot(run_copy) == before
    assert (tmp_path / "r.md").read_text().strip()


def test_python_api_leaves_inputs_identical(run_copy):
    import autopsy
    from autopsy.report import render

    before = snapshot(run_copy)
    report = autopsy.analyze(run_copy)
    for fmt in FORMATS:
        render(report, fmt)
    assert snapshot(run_copy) == before


def test_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    r = cli_subprocess("analyze", empty)
    assert r.returncode == 2 and r.stderr.startswith("autopsy: error:") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and not r.stdout
    r = cli_subprocess("--debug", "analyze", empty)
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "InputError" in r.stderr


def test_unreadable_inputs_are_autopsy_errors(tmp_path):
    """In-process: the paths a user can get wrong raise an AutopsyError subclass (never another exception)."""
    import autopsy

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.md").write_text("nothing here")
    for path in (tmp_path / "missing", junk, "/dev/null"):
        with pytest.raises(AutopsyError) as info:
            autopsy.analyze(path)
        assert info.value.exit_code == 2 and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096, b"\xff\xfe garbage \x80", b"{", b"[" * 50_000, b"null"])
def test_a_run_of_one_bad_file_exits_0_or_2_in_one_line(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_bytes(content)
    rc, out, err = cli_inprocess("analyze", run, "--format", "json")
    assert rc in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if rc == 2:
        assert err.count("\n") == 1
    else:
        damaged = [f for f in json.loads(out)["runs"][0]["findings"] if f["signature"] == "source_damaged"]
        assert damaged and damaged[0]["evidence"]["file"].endswith("trainer_state.json")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_replay_of_a_checkpoint_without_its_weights_is_one_line(tmp_path, damage):
    if not has_module("autopsy.replay"):
        pytest.skip("replay not in this build yet")
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-60"
    shutil.copytree(NAN_RUN / "checkpoint-60", ckpt)
    weights = ckpt / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    ids = torch.randint(0, 100, (2, 8))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, str(tmp_path / "batch.safetensors"))
    before = snapshot(ckpt)
    rc, out, err = cli_inprocess("replay", ckpt, "--batch", tmp_path / "batch.safetensors", "--device", "cpu", "--format", "json")
    assert snapshot(ckpt) == before
    assert rc == 2 and err.startswith("autopsy: error:") and err.count("\n") == 1, err
