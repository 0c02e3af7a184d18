"""Which step `autopsy replay OUTPUT_DIR` replays: the first non-finite one, from the most trusted source (torch-free)."""

from __future__ import annotations

import json
import shutil

from autopsy.replay.resolve import first_nonfinite


def _nan_step(run) -> int:
    """The first step whose grad_norm HF logged as non-finite (trainer_state.json's log_history)."""
    hist = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return next(h["step"] for h in hist if "grad_norm" in h and str(h["grad_norm"]).lower() in ("nan", "inf", "infinity"))


def test_trainer_state_then_tensorboard(nan_run, tmp_path):
    want = _nan_step(nan_run)
    got = first_nonfinite(nan_run)
    assert got["step"] == want and got["source"] == "trainer_state" and got["by_source"]["tensorboard"] == want
    run = tmp_path / "run"
    shutil.copytree(nan_run, run)
    (run / "trainer_state.json").unlink()
    for ck in run.glob("checkpoint-*"):
        shutil.rmtree(ck)
    assert first_nonfinite(run) == {"step": want, "source": "tensorboard", "by_source": {"tensorboard": want}}


def test_the_callback_log_wins_and_an_older_log_is_trusted_for_its_loss_only(tmp_path):
    run = tmp_path / "run"
    (run / "autopsy").mkdir(parents=True)
    (run / "trainer_state.json").write_text(json.dumps(
        {"global_step": 30, "log_history": [{"step": s, "loss": 1.0, "grad_norm": float("nan") if s >= 30 else 1.0} for s in range(5, 31, 5)]}))
    log = run / "autopsy" / "losses.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 1.0, "grad_norm": "inf" if s >= 27 else 0.5}) for s in range(1, 31)))
    old = first_nonfinite(run)  # no run.json: an older callback, whose grad_norm was read after clipping
    assert (old["source"], old["step"]) == ("trainer_state", 30) and old["by_source"]["autopsy"] is None
    (run / "autopsy" / "run.json").write_text(json.dumps({"grad_norm": "pre_clip"}))
    new = first_nonfinite(run)  # every step, pre-clip: it sees step 27 that logging_steps=5 did not log
    assert (new["source"], new["step"]) == ("autopsy", 27) and new["by_source"]["trainer_state"] == 30
