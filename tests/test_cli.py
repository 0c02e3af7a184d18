"""The CLI on real fixtures, as a user runs it: exit codes, stdout, stderr. In-process (helpers.cli.run_cli) except
two subprocess smoke tests of the installed entry point."""

import json
import os
import subprocess
import sys

import pytest

from helpers.cli import run_cli


def test_nan_run_json_contract_and_fail_on(nan_run):
    r = run_cli("analyze", nan_run, "--format", "json", "--fail-on", "error")
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
    assert run["status"] == "failed" and run["first_bad_step"] == 31
    assert doc["summary"]["runs"] == 1 and doc["summary"]["failed"] == 1


def test_a_failed_run_exits_1_by_default_and_0_with_fail_on_never(nan_run, healthy_run):
    assert run_cli("analyze", nan_run, "--format", "json").returncode == 1  # --fail-on error, like a linter
    assert run_cli("analyze", nan_run, "--format", "json", "--fail-on", "never").returncode == 0
    assert run_cli("analyze", healthy_run, "--format", "json").returncode == 0


def test_healthy_run_passes_fail_on_warning(healthy_run):
    r = run_cli("analyze", healthy_run, "--format", "json", "--fail-on", "warning")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert [f for f in doc["runs"][0]["findings"] if f["severity"] in ("warning", "error", "critical")] == []
    assert doc["runs"][0]["status"] == "healthy"


def test_missing_path_is_one_line_exit_2(tmp_path):
    r = run_cli("analyze", tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "no such file" in r.stderr


def test_a_path_with_a_newline_is_still_one_line(tmp_path):
    odd = tmp_path / "a\nb"
    r = run_cli("analyze", odd)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "a\\nb" in r.stderr


@pytest.mark.parametrize(
    "args",
    [["analyze"], ["analyze", "{run}", "--format", "pdf"], ["analyze", "{run}", "--fail-on", "fatal"],
     ["analyze", "{run}", "--select", "no_such_signature"], ["analyze", "{run}", "--param", "nan_loss.x=1"],
     ["analyze", "{run}", "--param", "clip_saturation.share=abc"], ["analyze", "{run}", "--engine", "slow"],
     ["analyze", "{run}", "--out", "{tmp}/r.pdf"]],
    ids=lambda a: " ".join(a[2:]) or "no path",
)
def test_usage_errors_exit_2_without_traceback_before_any_work(nan_run, tmp_path, args):
    r = run_cli(*[a.format(run=nan_run, tmp=tmp_path) for a in args])
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip() and r.stdout == "", args
    assert not (tmp_path / "r.pdf").exists()


def test_a_bad_param_value_names_the_parameter_and_its_type(nan_run):
    r = run_cli("analyze", nan_run, "--param", "clip_saturation.share=abc")
    assert "clip_saturation.share" in r.stderr and "float" in r.stderr


def test_help_with_h(nan_run):
    r = run_cli("analyze", "-h")
    assert r.returncode == 0 and "--fail-on" in r.stdout and "--summary" in r.stdout


def test_select_and_ignore(nan_run):
    r = run_cli("analyze", nan_run, "--format", "json", "--select", "nan_grad_norm")
    sigs = {f["signature"] for f in json.loads(r.stdout)["runs"][0]["findings"]}
    assert sigs == {"nan_grad_norm"}
    r = run_cli("analyze", nan_run, "--format", "json", "--ignore", "nan_grad_norm,nan_loss")
    sigs = {f["signature"] for f in json.loads(r.stdout)["runs"][0]["findings"]}
    assert "nan_grad_norm" not in sigs and "nan_loss" not in sigs and "loss_zero_collapse" in sigs


def test_directory_of_runs_reports_each(nan_run):
    r = run_cli("analyze", nan_run.parent, "--format", "json")
    doc = json.loads(r.stdout)
    names = {run["run"] for run in doc["runs"]}
    assert {"nan-at-31", "healthy"} <= names
    assert doc["summary"]["runs"] == len(doc["runs"]) == sum(v for k, v in doc["summary"].items() if k != "runs")


def test_checkpoint_dir_and_single_file(nan_run):
    r = run_cli("analyze", nan_run / "checkpoint-40", "--format", "json")
    f = {x["signature"]: x for x in json.loads(r.stdout)["runs"][0]["findings"]}
    assert f["nan_grad_norm"]["step"] == 31
    r = run_cli("analyze", nan_run / "trainer_state.json", "--format", "json")
    f = {x["signature"]: x for x in json.loads(r.stdout)["runs"][0]["findings"]}
    assert f["nan_grad_norm"]["step"] == 31


def test_console_at_80_columns_is_short_and_names_what_matters(nan_run):
    """The acceptance: at 80 columns, at most 30 lines, none wider, naming the finding, the first bad step and the
    restart checkpoint; -v adds the evidence."""
    r = run_cli("analyze", nan_run, columns=80)
    lines = r.stdout.splitlines()
    assert len(lines) <= 30 and max(len(ln) for ln in lines) <= 80, r.stdout
    text = " ".join(r.stdout.split())
    assert "FAILED" in "\n".join(lines[:3]) and "nan_grad_norm at step 31" in text
    assert "first bad step 31" in text and "checkpoint-30" in text
    assert "last_finite_step" not in text  # evidence only with -v
    v = run_cli("analyze", nan_run, "-v", columns=80)
    assert "last_finite_step: 30" in v.stdout and max(len(ln) for ln in v.stdout.splitlines()) <= 80


def test_console_follows_columns(nan_run):
    wide = run_cli("analyze", nan_run, columns=132).stdout.splitlines()
    assert max(len(ln) for ln in wide) > 80 and max(len(ln) for ln in wide) <= 132


def test_several_runs_end_with_the_summary_table_and_the_count_line(nan_run):
    r = run_cli("analyze", nan_run.parent, columns=100)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    names = {p.name for p in nan_run.parent.iterdir() if p.is_dir()}
    assert lines[-1].startswith(f"{len(names)} runs: ")
    table = lines[-1 - len(names):-1]
    assert {ln.split()[0] for ln in table} == names
    only = run_cli("analyze", nan_run.parent, "--summary", columns=100)
    assert only.stdout.splitlines()[0].split()[:2] == ["run", "verdict"]  # nothing but the table and the count
    assert only.stdout.strip().splitlines()[-1] == lines[-1]


def test_out_file_and_version(nan_run, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("analyze", nan_run, "--out", out, "--fail-on", "never")
    assert r.returncode == 0 and json.loads(out.read_text())["runs"]
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("autopsy ")


def test_out_inside_the_run_directory_is_refused(nan_run):
    before = sorted(p.name for p in nan_run.iterdir())
    r = run_cli("analyze", nan_run, "--out", nan_run / "report.html")
    assert r.returncode == 2 and "never writes into a run directory" in r.stderr
    assert sorted(p.name for p in nan_run.iterdir()) == before


def test_a_file_that_is_not_a_training_log_is_exit_2(tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("groceries: milk, eggs\nremember the meeting at 3\n")
    r = run_cli("analyze", note)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "not a training log" in r.stderr


def test_an_empty_log_history_is_a_report_that_cannot_judge(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 0, "log_history": []}))
    r = run_cli("analyze", run, "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["runs"][0]["status"] == "no_data" and "cannot judge" in doc["runs"][0]["verdict"]
    assert {f["signature"] for f in doc["runs"][0]["findings"]} == {"insufficient_data"}


def test_smoke_the_entry_point_in_a_subprocess(nan_run):
    """The installed `python -m autopsy` as a shell runs it: exit 1 on the failed run, the verdict first."""
    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "autopsy", "analyze", str(nan_run)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 1 and "FAILED" in r.stdout.splitlines()[1] and r.stderr == ""


def test_smoke_broken_pipe_is_quiet(nan_run):
    """`autopsy analyze ... | head -1`: no traceback when the reader leaves."""
    r = subprocess.run(f"{sys.executable} -m autopsy analyze {nan_run.parent} --details -v | head -1", shell=True,
                       capture_output=True, text=True)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


@pytest.mark.torch
@pytest.mark.slow
def test_fresh_trainer_run_end_to_end(fresh_nan_run):
    """The acceptance on a run trained now by the real HF Trainer (logging_steps=1, defaults otherwise)."""
    r = run_cli("analyze", fresh_nan_run, "--format", "json", "--fail-on", "error")
    assert r.returncode == 1
    by = {f["signature"]: f for f in json.loads(r.stdout)["runs"][0]["findings"]}
    assert by["nan_grad_norm"]["step"] == 31 and by["loss_zero_collapse"]["step"] == 31
    ev = [f for f in json.loads(r.stdout)["runs"][0]["findings"] if f["signature"] == "nan_loss"]
    assert ev and ev[0]["metric"] == "eval/loss" and ev[0]["step"] == 40


def test_the_demo_commands_succeed(tmp_path):
    """`make demo` is the main job on a fresh machine: each of its commands (read from the Makefile) exits 0 on the
    bundled failed run, and writes its report."""
    from helpers.paths import REPO

    make = (REPO / "Makefile").read_text()
    demo = next(line for line in make.splitlines() if line.startswith("DEMO :="))
    run = next(line for line in make.splitlines() if line.startswith("DEMO_RUN :="))
    args = demo.split("analyze", 1)[1].replace("$(DEMO_RUN)", run.split(":=")[1].strip()).split()
    for out in (None, "report.html", "report.md", "report.json"):
        extra = ["--out", str(tmp_path / out)] if out else []
        r = run_cli("analyze", *args, *extra, cwd=REPO)
        assert r.returncode == 0, (out, r.stderr)
        assert (tmp_path / out).stat().st_size > 0 if out else "FAILED" in r.stdout
