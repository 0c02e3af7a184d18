"""The CLI on real fixtures, as a user runs it (a subprocess: exit codes, stdout, stderr)."""

import json
import subprocess
import sys

import pytest


def autopsy_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "autopsy", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_nan_run_json_contract_and_fail_on(nan_run):
    r = autopsy_cli("analyze", nan_run, "--format", "json", "--fail-on", "error")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["autopsy_version"]
    run = doc["runs"][0]
    by = {f["signature"]: f for f in run["findings"]}
    assert by["nan_grad_norm"]["step"] == 31 and by["nan_grad_norm"]["severity"] == "critical"
    assert by["loss_zero_collapse"]["step"] == 31
    assert by["nan_grad_norm"]["evidence"]["first_value"] == "NaN"
    assert by["nan_grad_norm"]["evidence"]["last_finite_step"] == 30
    assert by["nan_grad_norm"]["evidence"]["restart_checkpoint"].endswith("checkpoint-30")
    # the eval loss is NaN at the first eval after the failure
    nan_eval = [f for f in run["findings"] if f["signature"] == "nan_loss" and f["metric"] == "eval/loss"]
    assert nan_eval and nan_eval[0]["step"] == 40
    assert not [f for f in run["findings"] if f["signature"] == "nan_loss" and f["metric"] == "train/loss"]
    json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_healthy_run_passes_fail_on_warning(healthy_run):
    r = autopsy_cli("analyze", healthy_run, "--format", "json", "--fail-on", "warning")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert [f for f in doc["runs"][0]["findings"] if f["severity"] in ("warning", "error", "critical")] == []


def test_missing_path_is_one_line_exit_2(tmp_path):
    r = autopsy_cli("analyze", tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "no such file" in r.stderr


def test_usage_errors_exit_2_without_traceback(nan_run):
    for args in (["analyze"], ["analyze", nan_run, "--format", "pdf"], ["analyze", nan_run, "--fail-on", "fatal"],
                 ["analyze", nan_run, "--select", "no_such_signature"], ["analyze", nan_run, "--param", "nan_loss.x=1"]):
        r = autopsy_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip(), args


def test_select_and_ignore(nan_run):
    r = autopsy_cli("analyze", nan_run, "--format", "json", "--select", "nan_grad_norm")
    sigs = {f["signature"] for f in json.loads(r.stdout)["runs"][0]["findings"]}
    assert sigs == {"nan_grad_norm"}
    r = autopsy_cli("analyze", nan_run, "--format", "json", "--ignore", "nan_grad_norm,nan_loss")
    sigs = {f["signature"] for f in json.loads(r.stdout)["runs"][0]["findings"]}
    assert "nan_grad_norm" not in sigs and "nan_loss" not in sigs and "loss_zero_collapse" in sigs


def test_directory_of_runs_reports_each(nan_run):
    r = autopsy_cli("analyze", nan_run.parent, "--format", "json")
    names = {run["run"] for run in json.loads(r.stdout)["runs"]}
    assert {"nan-at-31", "healthy"} <= names


def test_checkpoint_dir_and_single_file(nan_run):
    r = autopsy_cli("analyze", nan_run / "checkpoint-40", "--format", "json")
    f = {x["signature"]: x for x in json.loads(r.stdout)["runs"][0]["findings"]}
    assert f["nan_grad_norm"]["step"] == 31
    r = autopsy_cli("analyze", nan_run / "trainer_state.json", "--format", "json")
    f = {x["signature"]: x for x in json.loads(r.stdout)["runs"][0]["findings"]}
    assert f["nan_grad_norm"]["step"] == 31


def test_console_report_verdict_first(nan_run):
    r = autopsy_cli("analyze", nan_run)
    assert r.returncode == 0
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert "FAILED" in "\n".join(lines[:4])
    assert "nan_grad_norm" in r.stdout and "checkpoint-30" in r.stdout


def test_out_file_and_version(nan_run, tmp_path):
    out = tmp_path / "r.json"
    r = autopsy_cli("analyze", nan_run, "--out", out)
    assert r.returncode == 0 and json.loads(out.read_text())["runs"]
    r = autopsy_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("autopsy ")


@pytest.mark.torch
@pytest.mark.slow
def test_fresh_trainer_run_end_to_end(fresh_nan_run):
    """The acceptance on a run trained now by the real HF Trainer (logging_steps=1, defaults otherwise)."""
    r = autopsy_cli("analyze", fresh_nan_run, "--format", "json", "--fail-on", "error")
    assert r.returncode == 1
    by = {f["signature"]: f for f in json.loads(r.stdout)["runs"][0]["findings"]}
    assert by["nan_grad_norm"]["step"] == 31 and by["loss_zero_collapse"]["step"] == 31
    ev = [f for f in json.loads(r.stdout)["runs"][0]["findings"] if f["signature"] == "nan_loss"]
    assert ev and ev[0]["metric"] == "eval/loss" and ev[0]["step"] == 40
