"""The trainer_state.json importer on real Trainer output and on hand-made edge cases."""

import json
import math

import numpy as np
import pytest

import autopsy
from autopsy.frame import COLUMNS
from autopsy.importers import read_files
from autopsy.runinfo import run_info
from autopsy.series import series


def test_real_nan_run_keeps_nan_and_zero(nan_run):
    frame = autopsy.load(nan_run)
    assert list(frame.columns) == COLUMNS
    g = series(frame, "train/grad_norm")
    assert np.isfinite(g.loc[:30]).all()
    assert np.isnan(g.loc[31:]).all() and len(g.loc[31:]) == 30
    loss = series(frame, "train/loss")
    assert (loss.loc[31:] == 0.0).all() and (loss.loc[:30] > 0).all()
    ev = series(frame, "eval/loss")
    assert np.isfinite(ev.loc[:30]).all() and math.isnan(ev.loc[40])


def test_run_metadata_from_state_and_training_args(nan_run):
    frame = autopsy.load(nan_run)
    info = run_info(frame)
    assert info.max_steps == 60 and info.logging_steps == 1 and info.eval_steps == 10 and info.save_steps == 10
    assert sorted(info.checkpoints) == [10, 20, 30, 40, 50, 60]
    assert info.config["max_grad_norm"] == 1.0
    assert info.config["learning_rate"] == 5e-4
    assert info.config["logging_nan_inf_filter"] is True
    assert info.config["lr_scheduler_type"] == "linear"
    assert info.summary["train_runtime"] > 0
    assert info.config["model"]["model_type"] == "llama"


def test_checkpoint_histories_merge_without_double_counting(nan_run):
    files = sorted(nan_run.glob("**/trainer_state.json"))
    assert len(files) == 7
    frame = read_files("trainer_state", files, run="r")
    live = frame[~frame["superseded"]]
    assert not live.duplicated(["metric", "step"]).any()
    assert series(frame, "train/loss").index.max() == 60


def test_later_checkpoint_supersedes_earlier(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-4").mkdir()
    early = {"global_step": 2, "log_history": [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]}
    late = {"global_step": 4, "log_history": [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.0}]}
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(early))
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(late))
    frame = autopsy.load(tmp_path)
    s = series(frame, "train/loss")
    assert s.to_dict() == {1: 5.0, 2: 3.5, 3: 3.0, 4: 2.0}


def test_bare_nan_infinity_multi_eval_and_trl_metrics(tmp_path):
    text = (
        '{"global_step": 3, "max_steps": 10, "log_history": ['
        '{"step": 1, "loss": 0.6931, "rewards/chosen": 0.0, "logps/rejected": -12.5, "kl": 0.0},'
        '{"step": 2, "loss": NaN, "grad_norm": Infinity},'
        '{"step": 2, "eval_loss": 1.5, "eval_squad_loss": 2.5, "eval_wiki_loss": -Infinity},'
        '{"step": 3, "grad_norm": 1.0},'
        '{"loss": 0.5},'
        '{"step": 3, "train_runtime": 1.0, "train_loss": 0.9, "total_flos": 1}]}'
    )
    (tmp_path / "trainer_state.json").write_text(text)
    frame = autopsy.load(tmp_path)
    metrics = set(frame["metric"])
    assert {"train/loss", "train/grad_norm", "eval/loss", "eval/squad/loss", "eval/wiki/loss",
            "train/rewards/chosen", "train/logps/rejected", "train/kl"} <= metrics
    assert math.isnan(series(frame, "train/loss").loc[2])
    assert series(frame, "train/grad_norm").loc[2] == math.inf
    assert series(frame, "eval/wiki/loss").loc[2] == -math.inf
    # the entry without a step took the previous entry's step
    info = run_info(frame)
    assert any("no step" in n for n in info.notes)
    assert info.summary["train_loss"] == 0.9
    assert series(frame, "train/loss").loc[3] == 0.5
    assert "train/train_runtime" not in metrics


def test_cut_off_file_is_salvaged_and_reported(nan_run, tmp_path):
    data = (nan_run / "trainer_state.json").read_bytes()
    cut = data[: int(len(data) * 0.7)]
    (tmp_path / "trainer_state.json").write_bytes(cut)
    frame = autopsy.load(tmp_path)
    info = run_info(frame)
    assert len(info.damage) == 1 and info.damage[0].offset > 0
    g = series(frame, "train/grad_norm")
    assert g.index.max() > 31 and math.isnan(g.loc[31])
    report = autopsy.analyze(frame)
    sigs = {f.signature: f for f in report.findings}
    assert sigs["nan_grad_norm"].step == 31
    assert "source_damaged" in sigs


def test_resumed_run_rows_are_flagged_not_dropped(tmp_path):
    hist = [{"step": s, "loss": 10.0 - s} for s in range(1, 7)] + [{"step": s, "loss": 20.0 - s} for s in range(5, 9)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": hist}))
    frame = autopsy.load(tmp_path)
    loss = frame[frame["metric"] == "train/loss"]
    assert len(loss) == 10
    assert loss["superseded"].sum() == 2  # steps 5 and 6 of the first attempt
    assert series(frame, "train/loss").to_dict() == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0, 5: 15.0, 6: 14.0, 7: 13.0, 8: 12.0}


@pytest.mark.parametrize("payload", ["[]", '{"log_history": 5}', "", "\x00\x01garbage", '{"log_history": [1, "x", null]}'])
def test_wrong_shapes_do_not_crash(tmp_path, payload):
    (tmp_path / "trainer_state.json").write_text(payload)
    try:
        frame = autopsy.load(tmp_path)
    except autopsy.AutopsyError:
        return
    info = run_info(frame)
    assert info.damage or info.notes or frame.empty
