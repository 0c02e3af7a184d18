"""The detector suite on real logs from public repositories (../shared/real-logs, see its SOURCES.md)."""

from __future__ import annotations

import math
import warnings

import pytest

from autopsy import analyze
from autopsy.findings import Severity
from helpers.paths import REAL_LOGS, needs_shared

LLMS = "llms-final-output-runs/output/runs/"


def _run(rel: str, *, importer: str):
    pytest.importorskip(f"autopsy.importers.{importer}")
    path = REAL_LOGS / rel
    needs_shared(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = analyze(path)
    return max(rep.runs, key=lambda r: len(r.frame) if r.frame is not None else 0)


def _loud(run):
    return {f.signature: f for f in run.findings if f.severity >= Severity.WARNING}


def test_qlora_run_overfits_after_step_200():
    run = _run(LLMS + "Dec07_12-38-05_autodl-container-257040b67c-0bc917ee", importer="tensorboard")
    f = _loud(run)["overfitting"]
    assert f.evidence["best_step"] == 200 and f.evidence["last_eval_loss"] > 1.17
    assert f.evidence["train_loss_at_end"] < f.evidence["train_loss_at_best"]


def test_ten_epochs_without_eval_is_memorisation():
    run = _run(LLMS + "Nov20_21-39-58_autodl-container-257040b67c-0bc917ee", importer="tensorboard")
    assert "epoch_boundary_drop" in _loud(run)
    assert "divergence" not in _loud(run) and "loss_spike" not in _loud(run)


@pytest.mark.parametrize("name", ["run0", "run1", "run2", "run3"])
def test_lr_5e6_does_not_learn_plateau_at_ln4(name):
    run = _run(f"lora-roberta-agnews/runs/{name}", importer="tensorboard")
    f = _loud(run)["plateau"]
    # AG News has 4 classes: the config's num_labels names the chance level ln 4
    assert f.severity == Severity.ERROR and f.evidence["chance_value"] == pytest.approx(math.log(4), rel=1e-4)


def test_lr_5e5_learns_and_is_healthy():
    run = _run("lora-roberta-agnews/runs/run4", importer="tensorboard")
    mine = {"plateau", "divergence", "loss_spike", "overfitting", "eval_flat", "exploding_gradients", "oscillation"}
    assert not set(_loud(run)) & mine, _loud(run)


def test_mid_run_checkpoint_is_not_a_failure():
    run = _run("gemma2b-finetune/results/checkpoint-22853", importer="trainer_state")
    assert not {"divergence", "plateau", "loss_spike"} & set(_loud(run))
