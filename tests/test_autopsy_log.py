"""The callback's true-loss log joins the run: the NaN that HF's filter logged as 0.0 is seen as NaN."""

import json

import numpy as np
import pytest

import autopsy
from autopsy.runinfo import run_info
from autopsy.series import series

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # a real Trainer run with the callback


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    pytest.importorskip("transformers")
    import tinyllama
    from autopsy.callbacks import AutopsyCallback

    out = tmp_path_factory.mktemp("cb") / "run"
    tinyllama.train(out, max_steps=40, learning_rate=5e-4, plant_inf_at=30, eval_steps=20, save_steps=10,
                    callbacks=[AutopsyCallback(keep_last=10)])
    return out


def test_true_loss_is_nan_where_hf_logged_zero(recorded_run):
    frame = autopsy.load(recorded_run)
    assert "autopsy" in run_info(frame).sources
    loss = series(frame, "train/loss")
    assert np.isfinite(loss.loc[:30]).all() and np.isnan(loss.loc[31:]).all()
    # the filtered 0.0 of trainer_state is not double-counted: one row per step
    live = frame[(frame["metric"] == "train/loss") & ~frame["superseded"]]
    assert set(live["source"]) == {"autopsy"} and not live["step"].duplicated().any()
    by = {(f.signature, f.metric): f for f in autopsy.analyze(frame).findings}
    assert by[("nan_loss", "train/loss")].step == 31
    assert by[("nan_grad_norm", "train/grad_norm")].step == 31


def test_cut_line_is_reported(recorded_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(recorded_run, copy)
    log = copy / "autopsy" / "losses.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[: len(data) - 7])
    frame = autopsy.load(copy)
    damage = [d for d in run_info(frame).damage if d.file.endswith("losses.jsonl")]
    assert damage and damage[0].offset > 0
    first = json.loads(data.split(b"\n")[0])
    assert series(frame, "train/loss").loc[first["step"]] == pytest.approx(float(first["loss"]))
