"""Acceptance: real HF Trainer runs on the tiny local Llama (made once per session, ~15 s on 2 CPU cores)."""

from __future__ import annotations

import pytest

from autopsy import analyze
from autopsy.findings import Severity

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # runs a model: CPU-dependent numerics

@pytest.fixture(scope="session")
def trainer_runs(tmp_path_factory):
    pytest.importorskip("transformers")
    import tinyllama

    root = tmp_path_factory.mktemp("trainer-runs")
    tinyllama.train(root / "lr10", max_steps=40, learning_rate=10.0, eval_steps=20, save_steps=20)
    tinyllama.train(root / "lr1e-9", max_steps=40, learning_rate=1e-9, eval_steps=20, save_steps=20)
    # 8 random sentences, 60 epochs of 1 step: memorised; a disjoint random eval set can only get worse
    tinyllama.train(root / "memorise", train_texts=tinyllama.random_texts(8, seed=1), eval_texts=tinyllama.random_texts(16, seed=2),
                    num_train_epochs=60, learning_rate=1e-2, eval_steps=4, save_steps=20, logging_steps=2, batch_size=8, warmup_steps=4)
    return {name: analyze(root / name).runs[0] for name in ("lr10", "lr1e-9", "memorise")}


def _by(run):
    return {f.signature: f for f in run.findings}


def test_lr10_is_clip_saturation(trainer_runs):
    f = _by(trainer_runs["lr10"])["clip_saturation"]
    assert f.evidence["max_grad_norm"] == 1.0 and f.evidence["max_grad_norm_assumed"] is False  # read from training_args.bin
    assert f.evidence["median_over_threshold"] >= 10
    # 10x the threshold or more: an error while the loss does not fall, a warning while it still does
    assert f.severity == (Severity.WARNING if f.evidence["loss_falling"] else Severity.ERROR)
    assert "learning_rate=10" in f.cause  # the config audit explains it


def test_memorised_train_set_overfits(trainer_runs):
    f = _by(trainer_runs["memorise"])["overfitting"]
    assert f.severity == Severity.ERROR
    ev = f.evidence
    assert ev["best_step"] <= 12 and ev["steps_past_best"] >= 40
    assert ev["last_eval_loss"] > ev["best_eval_loss"] * 1.1
    assert ev["train_loss_at_end"] < ev["train_loss_at_best"] / 5


def test_lr_1e9_is_a_plateau_at_chance(trainer_runs):
    f = _by(trainer_runs["lr1e-9"])["plateau"]
    assert f.severity == Severity.ERROR
    assert f.evidence["chance_level"] == "ln(vocab_size)"
    assert "learning_rate=1e-09" in f.cause
    loud = {x.signature for x in trainer_runs["lr1e-9"].findings if x.severity >= Severity.WARNING}
    assert loud == {"plateau"}, loud
