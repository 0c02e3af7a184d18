"""Fleets: many runs in one report, the same for any --jobs, and what separates the failed runs.

The fleets are written by bench/fleet/make_fleet.py (HF-shaped runs: trainer_state.json + TensorBoard events) with a
planted outcome per run; every expectation below is derived from that ground truth, never from a number seen once.
The Dask and S3 modes are in test_fleet_cluster.py, W&B projects in test_fleet_wandb.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autopsy.errors import InputError, UsageError
from autopsy.findings import RunReport
from autopsy.fleet import FleetReport, analyze_many, fleet_findings
from autopsy.fleet.output import findings_table, fleet_text, write_table
from autopsy.fleet.remote import parse_storage_options
from autopsy.fleet.tasks import Task
from autopsy.fleet.worker import DIGEST, run_task
from autopsy.report import render
from autopsy.report._format import format_wall
from autopsy.report.summary import summarize_fleet
from helpers.paths import REAL_LOGS, REPO, RUNS, needs_shared


def _generator():
    spec = importlib.util.spec_from_file_location("make_fleet", REPO / "bench" / "fleet" / "make_fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fleet"] = module  # dataclasses (and pickling) look the module up by name
    spec.loader.exec_module(module)
    return module


make_fleet = _generator()
FAILED = ("failed", "unhealthy")


@pytest.fixture(scope="module")
def lr_fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """30 runs; those with learning_rate >= LR_CUT diverge, the others are healthy."""
    root = tmp_path_factory.mktemp("fleet") / "lr"
    return root, make_fleet.write_fleet(root, runs=30, steps=300, seed=3, rule="lr")


@pytest.fixture(scope="module")
def random_fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """30 runs, each goes NaN with probability 0.3 whatever its settings."""
    root = tmp_path_factory.mktemp("fleet") / "random"
    return root, make_fleet.write_fleet(root, runs=30, steps=300, seed=5, rule="random")


@pytest.fixture(scope="module")
def lr_report(lr_fleet) -> FleetReport:
    return analyze_many([lr_fleet[0]], jobs=1)


def test_every_run_is_judged_as_planted(lr_report, lr_fleet):
    _, specs = lr_fleet
    got = {r.run: (status, lead) for r, (status, lead) in zip(lr_report.runs, lr_report.verdicts)}
    assert sorted(got) == sorted(s.name for s in specs)
    for s in specs:
        status, lead = got[s.name]
        if s.fate == "divergence":
            assert status in FAILED and lead == "divergence", (s.name, status, lead)
        else:
            assert status not in FAILED, (s.name, status, lead)


def test_fleet_findings_recover_the_planted_learning_rate_cut(lr_report, lr_fleet):
    _, specs = lr_fleet
    bad = [s for s in specs if s.fate == "divergence"]
    cut = min(s.config["learning_rate"] for s in bad)
    above = [s for s in specs if s.config["learning_rate"] >= cut]
    assert bad and len(above) < len(specs)  # the fleet has both sides
    found = lr_report.fleet_findings
    assert [f.evidence["setting"] for f in found] == ["learning_rate"], [f.summary for f in found]
    f = found[0]
    assert f.signature == "fleet_split" and f.evidence["outcome"] == "divergence"
    assert f.evidence["split"] == f"learning_rate >= {cut:.4g}"
    assert f.evidence["with"]["runs"] == len(above) and f.evidence["with"]["outcome"] == len(bad)
    assert f.evidence["without"] == {"runs": len(specs) - len(above), "outcome": 0, "rate": 0.0}
    assert f.summary == (
        f"{len(bad)} of {len(above)} runs with learning_rate >= {cut:.4g} diverged; 0 of {len(specs) - len(above)} below"
    )
    assert f.evidence["p_adjusted"] <= 0.05
    assert sorted(f.evidence["runs_with_outcome"]) == sorted(s.name for s in bad)[:20]


def test_fleet_findings_stay_silent_when_failure_is_random(random_fleet):
    root, specs = random_fleet
    report = analyze_many([root], jobs=1)
    failed = {r.run for r, (status, _) in zip(report.runs, report.verdicts) if status in FAILED}
    assert failed == {s.name for s in specs if s.fate == "nan"}  # the failures are there ...
    assert report.fleet_findings == []  # ... and nothing explains them


def _table_fleet(rng: np.random.Generator, n: int, fail: np.ndarray) -> FleetReport:
    runs, verdicts = [], []
    for i in range(n):
        config = {
            "learning_rate": float(rng.choice([1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3])),
            "warmup_ratio": float(rng.choice([0.0, 0.05, 0.1])),
            "max_steps": 1000,
            "fp16": bool(rng.random() < 0.5),
            "bf16": False,
            "per_device_train_batch_size": int(rng.choice([4, 8, 16])),
            "max_grad_norm": float(rng.choice([0.3, 1.0])),
            "dataset_size": int(rng.integers(1000, 100000)),
            "model": {"_name_or_path": str(rng.choice(["a", "b", "c"]))},
        }
        runs.append(RunReport(run=f"r{i}", config=config))
        verdicts.append(("failed", "nan_grad_norm") if fail[i] else ("healthy", None))
    return FleetReport(runs=runs, verdicts=verdicts)


def test_random_fleets_false_alarm_rate_is_within_alpha():
    """Failure independent of every setting: the corrected test reports something in at most alpha of the fleets
    (3 standard deviations of slack over 200 fleets)."""
    rng = np.random.default_rng(11)
    n_fleets, alpha = 200, 0.05
    alarms = 0
    for _ in range(n_fleets):
        n = int(rng.integers(20, 60))
        alarms += bool(fleet_findings(_table_fleet(rng, n, rng.random(n) < 0.3), alpha=alpha))
    assert alarms <= alpha * n_fleets + 3 * math.sqrt(alpha * (1 - alpha) * n_fleets)


def test_a_categorical_rule_is_named_by_its_failing_level():
    rng = np.random.default_rng(2)
    report = _table_fleet(rng, 40, np.zeros(40, dtype=bool))
    fp16 = [r.config["fp16"] for r in report.runs]
    report.verdicts = [("failed", "nan_loss") if x else ("healthy", None) for x in fp16]
    found = fleet_findings(report)
    assert found and found[0].evidence["setting"] == "precision"
    assert found[0].evidence["split"] == "precision = fp16" and found[0].evidence["outcome"] == "nonfinite"
    n_fp16 = sum(fp16)
    assert found[0].summary == f"{n_fp16} of {n_fp16} runs with precision = fp16 went NaN; 0 of {40 - n_fp16} others"


def test_too_few_runs_or_failures_is_never_a_finding():
    from autopsy.fleet.separate import _best

    # the two failing runs are alone below the cut: a side of 2 runs is never tried (min_side=3)
    assert _best("lr", "failed", [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], np.array([1, 1, 0, 0, 0, 0, 0, 0], bool), 3) is None
    rng = np.random.default_rng(4)
    fail = np.zeros(30, dtype=bool)
    fail[:2] = True
    report = _table_fleet(rng, 30, fail)
    for r in report.runs[:2]:
        r.config["learning_rate"] = 1.0  # two failures share a setting no other run has: too few to tell
    assert fleet_findings(report) == []


def test_jobs_1_and_2_give_identical_json(lr_fleet, lr_report):
    pooled = analyze_many([lr_fleet[0]], jobs=2)
    assert render(pooled, "json") == render(lr_report, "json")
    assert [r.run for r in pooled.runs] == [r.run for r in lr_report.runs]


def test_the_digest_keeps_what_every_summary_reads(nan_run, healthy_run):
    """Dropping the frames (a digest kept) changes nothing a report says: status, tables, wall times, JSON."""
    paths = [nan_run, healthy_run]
    full = analyze_many(paths, jobs=1, keep_frames=True)
    lean = analyze_many(paths, jobs=1)
    assert render(lean, "json") == render(full, "json")
    a, b = summarize_fleet(full), summarize_fleet(lean)
    assert a.rows() == b.rows() and a.count_line == b.count_line
    for x, y in zip(a.runs, b.runs):
        assert len(y.run.frame) < len(x.run.frame) and y.run.frame.attrs.get(DIGEST)
        for f in x.findings:
            for step in (f.step, f.end_step):
                assert format_wall(step, y.walls) == format_wall(step, x.walls)


def test_the_digest_on_real_logs(tmp_path):
    needs_shared(REAL_LOGS)
    root = REAL_LOGS / "healthy-data-diet"
    full, lean = analyze_many([root], jobs=1, keep_frames=True), analyze_many([root], jobs=1)
    assert render(lean, "json") == render(full, "json")
    assert summarize_fleet(lean).rows() == summarize_fleet(full).rows()


def test_json_and_html_put_the_fleet_findings_first(lr_report):
    data = json.loads(render(lr_report, "json"))
    assert list(data) == ["autopsy_version", "summary", "fleet_findings", "runs"]
    assert data["fleet_findings"][0]["signature"] == "fleet_split"
    page = render(lr_report, "html")
    first, table, curves = page.index('id="fleet-findings"'), page.index('id="comparison"'), page.index('id="curves"')
    assert first < table < curves < page.index('id="run-0"')
    assert page.count('class="mult st-') == len(lr_report.runs)
    for i, (status, _) in enumerate(lr_report.verdicts):
        assert f'<a class="mult st-{status}" href="#run-{i}"' in page
    assert "<img class=\"plot\"" not in page  # digests draw no per-run plots
    assert "http://" not in page and "https://" not in page


def test_table_has_one_row_per_finding_with_status_and_settings(lr_report, tmp_path):
    table = findings_table(lr_report)
    n_rows = sum(max(len(r.findings), 1) for r in lr_report.runs)
    assert len(table) == n_rows
    assert {"run", "status", "lead", "signature", "learning_rate", "precision", "batch_size"} <= set(table.columns)
    for path in (tmp_path / "f.parquet", tmp_path / "f.csv"):
        write_table(lr_report, path)
        back = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        assert len(back) == n_rows
        assert back["run"].tolist() == table["run"].tolist()
        assert np.allclose(back["learning_rate"].to_numpy(float), table["learning_rate"].to_numpy(float))
    with pytest.raises(UsageError):
        write_table(lr_report, tmp_path / "f.xlsx")
    assert fleet_text(lr_report).startswith("What separates the failed runs:\n")


def test_inputs_are_checked_before_any_run_is_read(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        analyze_many([RUNS / "healthy", tmp_path / "missing"], jobs=1)
    with pytest.raises(UsageError, match="unknown signature or detector"):
        analyze_many([RUNS / "healthy"], select=["not_a_detector"], jobs=1)
    with pytest.raises(UsageError, match="--jobs"):
        analyze_many([RUNS / "healthy", RUNS / "nan-at-31"], jobs=0)
    with pytest.raises(UsageError, match="JSON object"):
        parse_storage_options("[1, 2]")
    with pytest.raises(UsageError, match="JSON object"):
        parse_storage_options("{not json")
    assert parse_storage_options('{"anon": true}') == {"anon": True}


def test_a_run_that_cannot_be_read_is_one_line_in_its_own_report(tmp_path):
    (tmp_path / "trainer_state.json").write_bytes(b"\x00\xff" * 10)
    from autopsy.fleet.tasks import Job, expand

    task = expand([tmp_path]).tasks[0]
    out = run_task(task, Job())
    (report,) = out.reports
    damaged = [f for f in report.findings if f.signature == "source_damaged"]
    assert damaged and all("\n" not in f.summary for f in damaged)
    # a task whose files vanished between listing and reading: the same, not an exception
    gone = Task(index=0, source=0, name="gone", files=type(task.files)(name="gone", root=tmp_path / "gone"))
    assert run_task(gone, Job()).reports[0].run == "gone"


def test_outcomes_are_plain_data(lr_fleet):
    """What a worker returns pickles small: no frame beyond the digest."""
    import pickle

    from autopsy.fleet.tasks import Job, expand

    task = expand([lr_fleet[0]]).tasks[0]
    out = run_task(task, Job())
    blob = pickle.dumps(out)
    assert len(out.reports[0].frame) < 10
    assert len(blob) < 200_000
    assert asdict(out.curves[0])["metric"] == "train/loss"


def test_the_exact_test_is_fishers():
    """The p-value is scipy.stats.fisher_exact's (computed without importing scipy.stats on the driver)."""
    from scipy.stats import fisher_exact

    from autopsy.fleet.separate import _fisher

    rng = np.random.default_rng(0)
    for _ in range(500):
        n, m = (int(x) for x in rng.integers(1, 60, 2))
        a, b = int(rng.integers(0, n + 1)), int(rng.integers(0, m + 1))
        assert _fisher(a, n, b, m) == pytest.approx(fisher_exact([[a, n - a], [b, m - b]])[1], rel=1e-9, abs=1e-300)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autopsy", *map(str, args)], capture_output=True, text=True)


def test_cli_jobs_table_and_console(lr_fleet, lr_report, tmp_path):
    root, _ = lr_fleet
    r = _cli("analyze", root, "--jobs", "2", "--format", "json", "--fail-on", "critical")
    assert r.returncode == 1, r.stderr  # the diverged runs are critical
    assert json.loads(r.stdout) == json.loads(render(lr_report, "json"))
    r = _cli("analyze", root, "--jobs", "2", "--out", tmp_path / "f.parquet", "--fail-on", "critical")
    assert r.returncode == 1 and r.stderr.strip() == f"table written to {tmp_path / 'f.parquet'}"
    assert pd.read_parquet(tmp_path / "f.parquet")["run"].tolist() == findings_table(lr_report)["run"].tolist()
    r = _cli("analyze", root, "--jobs", "1", "--format", "console", "--fail-on", "critical")
    assert r.stdout.startswith("What separates the failed runs:\n  " + lr_report.fleet_findings[0].summary)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "--jobs must be 1 or more"),
        (["--storage-options", "[1]"], "--storage-options must be a JSON object"),
        (["--state", "crashd"], "unknown W&B run state 'crashd'"),
        (["--since", "yesterday"], "--since takes a date"),
    ],
)
def test_cli_fleet_flags_are_one_line_errors(args, message):
    r = _cli("analyze", RUNS / "healthy", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"autopsy: error: {message}") and r.stderr.count("\n") == 1


def test_a_worker_in_another_directory_reads_relative_paths_from_the_callers(monkeypatch, tmp_path):
    import os

    from autopsy.fleet.tasks import Job, expand

    monkeypatch.chdir(RUNS.parent)
    task = expand(["runs/nan-at-31"]).tasks[0]
    here = run_task(task, Job(cwd=os.getcwd()))
    monkeypatch.chdir(tmp_path)  # a Dask worker started elsewhere
    there = run_task(task, Job(cwd=str(RUNS.parent)))
    assert there.reports[0].path == here.reports[0].path == "runs/nan-at-31"
    one, two = FleetReport(runs=here.reports), FleetReport(runs=there.reports)
    assert render(two, "json") == render(one, "json")
