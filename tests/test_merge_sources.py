"""One training logged three ways (trainer_state.json + TensorBoard + W&B) is one run: the sources
merge per metric (densest wins), the ``source`` column says where each row came from, and nothing
is counted twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autopsy.analysis import analyze
from autopsy.importers import load
from autopsy.runinfo import run_info, runs_of
from autopsy.series import series
from helpers.paths import RUNS
from helpers.wandb_runs import rows_from_log_history, write_runs

EXTRA = "train/tokens_per_second"  # a metric only the W&B run has (a user's own callback)


def _copy_nan_run(dst: Path) -> Path:
    shutil.copytree(RUNS / "nan-at-31", dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def _wandb_spec(out_dir: Path, run_id: str, *, until: int | None = None) -> dict:
    state = json.loads((RUNS / "nan-at-31" / "trainer_state.json").read_text())
    rows, summary = rows_from_log_history(state["log_history"])
    if until is not None:
        rows = [r for r in rows if r["train/global_step"] <= until]
    for r in rows:
        if "train/loss" in r:
            r[EXTRA] = 1000.0 + r["train/global_step"]
    config = {k: state[k] for k in ("max_steps", "logging_steps", "eval_steps", "save_steps")}
    return {"dir": str(out_dir), "id": run_id, "config": {**config, "learning_rate": 5e-4}, "rows": rows, "summary": summary}


@pytest.fixture(scope="module")
def three_way(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("merge")
    one = _copy_nan_run(base / "hf-out")
    two = _copy_nan_run(base / "hf-out-two-wandb")
    write_runs([_wandb_spec(one, "merge1"), _wandb_spec(two, "twoa", until=45), _wandb_spec(two, "twob")])
    return {"one": one, "two": two}


def test_three_sources_become_one_run(three_way: dict[str, Path]) -> None:
    frame = load(three_way["one"])
    assert runs_of(frame) == ["hf-out"]
    info = run_info(frame)
    assert set(info.sources) == {"trainer_state", "tensorboard", "wandb"}
    assert info.config["wandb"]["id"] == "merge1" and info.max_steps == 60
    live = frame[~frame["superseded"]]
    # no double count: each (metric, step) comes from one source only
    per_step = live.groupby(["metric", "step"])["source"].nunique()
    assert per_step.max() == 1
    # every step any source logged is there (union), from the densest source
    alone = {src: load(p) for src, p in (("trainer_state", three_way["one"] / "trainer_state.json"),)}
    ts_steps = set(series(alone["trainer_state"], "train/loss").index)
    assert ts_steps <= set(series(frame, "train/loss").index)
    assert len(series(frame, "train/loss")) == 60
    # the source column is kept: the W&B-only metric comes from W&B with its wall time
    extra = live[live["metric"] == EXTRA]
    assert len(extra) == 60 and set(extra["source"]) == {"wandb"} and extra["wall_time"].notna().all()
    assert set(live["source"]) >= {"wandb"} and set(live["source"]) & {"tensorboard", "trainer_state"}


def test_merged_run_diagnosis_counts_once(three_way: dict[str, Path]) -> None:
    report = analyze(load(three_way["one"]))
    (run,) = report.runs
    sigs = [f.signature for f in run.findings]
    assert sigs.count("nan_grad_norm") == 1 and sigs.count("loss_zero_collapse") == 1
    by_sig = {f.signature: f for f in run.findings}
    assert by_sig["nan_grad_norm"].step == 31 and by_sig["loss_zero_collapse"].step == 31
    assert by_sig["nan_grad_norm"].evidence["nonfinite_points"] == 30  # steps 31-60, not 60 or 90


def test_several_wandb_runs_stay_separate(three_way: dict[str, Path]) -> None:
    frame = load(three_way["two"])
    names = runs_of(frame)
    assert len(names) == 3 and "hf-out-two-wandb" in names  # which W&B run is the HF one is unknown
    assert set(run_info(frame, "hf-out-two-wandb").sources) == {"trainer_state", "tensorboard"}
    short = next(n for n in names if n.endswith("twoa"))
    assert series(frame[frame["run"] == short], "train/loss").index.max() == 45
