"""Step replay (`autopsy replay RUN --from checkpoint-N`) and AutopsyCallback's spike dump, on real Trainer runs."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.usefixtures("math_attention")]  # runs a model: CPU-dependent numerics

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from autopsy.cli import main  # noqa: E402

UP = "model.layers.1.mlp.up_proj"


def _train(out: Path, **kw):
    import tinyllama
    from autopsy.callbacks import AutopsyCallback

    cb = AutopsyCallback(stop_on="nonfinite", keep_last=10)
    tinyllama.train(out, eval_steps=None, save_steps=10, callbacks=[cb], report_to=(), save_only_model=False, **kw)
    return out, cb


@pytest.fixture(scope="session")
def decay_run(tmp_path_factory: pytest.TempPathFactory):
    """A failure the optimizer itself makes: lr * weight_decay = 5 > 2, so AdamW's decoupled decay multiplies every
    decayed weight by (1 - 5) = -4 per step; the weights grow geometrically until a gradient overflows."""
    return _train(tmp_path_factory.mktemp("decay") / "run", max_steps=40, learning_rate=1e-3, lr_scheduler_type="constant",
                  weight_decay=5000.0)


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory: pytest.TempPathFactory):
    """A fault from outside the optimizer: a callback writes an inf into up_proj after step 25."""
    return _train(tmp_path_factory.mktemp("planted") / "run", max_steps=30, plant_inf_at=25)


@pytest.fixture(scope="session")
def ga4_run(tmp_path_factory: pytest.TempPathFactory):
    """The weight-decay blow-up with gradient accumulation over 4 micro-batches of 1 row."""
    return _train(tmp_path_factory.mktemp("ga4") / "run", max_steps=40, learning_rate=1e-3, lr_scheduler_type="constant",
                  weight_decay=5000.0, gradient_accumulation_steps=4, batch_size=1)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory):
    """LoRA adapters on a local tiny base, blown up by the same decay (lr * weight_decay = 5 > 2 on the adapters)."""
    from autopsy.callbacks import AutopsyCallback
    from helpers.replay import train_lora

    out = tmp_path_factory.mktemp("lora") / "run"
    cb = AutopsyCallback(stop_on="nonfinite", keep_last=10)
    train_lora(out, max_steps=60, callbacks=[cb], learning_rate=1e-3, weight_decay=5000.0, lr_scheduler_type="constant")
    return out, cb


RUNS = ("decay_run", "planted_run", "ga4_run", "lora_run")


def _hf_log(run: Path) -> dict[int, dict]:
    """What HF's Trainer logged each step (logging_steps=1): trainer_state.json's log_history."""
    state = json.loads((run / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "grad_norm" in h}


def _hf_first_bad(run: Path) -> int:
    return next(s for s, h in sorted(_hf_log(run).items()) if not math.isfinite(float(h["grad_norm"])))


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: float(r["loss"]) for r in map(json.loads, (run / "autopsy" / "losses.jsonl").read_text().splitlines())}


def _first_bad(run: Path) -> int:
    recs = [json.loads(line) for line in (run / "autopsy" / "losses.jsonl").read_text().splitlines()]
    return next(r["step"] for r in recs if not all(math.isfinite(float(r[k])) for k in ("loss", "grad_norm")))


@pytest.mark.parametrize("kind", RUNS)
def test_callback_records_the_pre_clip_norm_hf_logs_and_stops_at_its_first_nonfinite_step(kind, request):
    """transformers calls on_pre_optimizer_step after clipping: the callback's norm is the pre-clip one HF logs."""
    run, cb = request.getfixturevalue(kind)
    hf = _hf_log(run)
    recs = {r["step"]: r for r in map(json.loads, (run / "autopsy" / "losses.jsonl").read_text().splitlines())}
    bad = _hf_first_bad(run)
    assert cb.first_bad_step == bad == max(recs)  # stopped at the step HF logged as the first non-finite norm
    if kind in ("decay_run", "ga4_run"):  # clipping fired (max_grad_norm 1.0): a clipped norm would read ~1.0
        assert any(float(h["grad_norm"]) > 10.0 for h in hf.values() if math.isfinite(float(h["grad_norm"])))
    for step, h in hf.items():
        ours, theirs = float(recs[step]["grad_norm"]), float(h["grad_norm"])
        assert ours == pytest.approx(theirs, rel=1e-5) or (math.isnan(ours) and math.isnan(theirs)) or ours == theirs
        assert float(recs[step]["loss"]) == pytest.approx(float(h["loss"]), rel=1e-5) or step == bad
    assert (run / "autopsy" / f"weights-before-step-{bad}").is_dir()
    meta = json.loads((run / "autopsy" / "run.json").read_text())
    assert meta["grad_norm"] == "pre_clip" and meta["weights_dtype"] == "float32" and meta["attn_implementation"]


@pytest.mark.parametrize("kind", RUNS)
def test_replay_of_the_output_dir_replays_the_step_hf_logged(kind, request, capsys):
    run, _ = request.getfixturevalue(kind)
    bad = _hf_first_bad(run)
    rc, rep = _replay(run, capsys)
    assert rc == 0
    r = rep["runs"][0]
    assert r["config"]["step"] == bad and r["config"]["first_nonfinite"]["step"] == bad
    assert Path(r["config"]["checkpoint"]).name == f"weights-before-step-{bad}"
    others = sorted(p.name for p in (run / "autopsy").glob("batches-step-*.safetensors") if p.name != f"batches-step-{bad}.safetensors")
    assert sorted(Path(c["file"]).name for c in r["config"].get("other_candidates", [])) == others  # listed, not replayed
    assert all(c["reason"] == "spike" for c in r["config"].get("other_candidates", []))
    lead = r["findings"][0]
    assert lead["signature"] in ("nonfinite_origin", "grad_norm_overflow") and lead["step"] == bad
    assert lead["evidence"]["module"] or lead["evidence"].get("explained_by")
    if kind == "planted_run":
        assert (lead["evidence"]["module"], lead["evidence"]["phase"]) == (UP, "forward")


@pytest.mark.parametrize("kind", ["ga4_run", "lora_run"])  # decay_run: test_step_replay_reproduces_the_optimizer_made_failure
def test_step_replay_reproduces_the_step_hf_logged(kind, request, capsys):
    run, _ = request.getfixturevalue(kind)
    bad = _hf_first_bad(run)
    ck = f"checkpoint-{(bad - 1) // 10 * 10}"
    rc, rep = _step_replay(run, ck, capsys)
    assert rc == 0
    r = rep["runs"][0]
    assert r["config"]["state_loaded"] == {"optimizer": True, "scheduler": True, "rng": True} and r["skipped"] == []
    (f,) = [f for f in r["findings"] if f["signature"] in ("nonfinite_origin", "grad_norm_overflow")]
    assert f["step"] == bad and f["evidence"]["reproduced"] and f["evidence"]["first_nonfinite_step"] == bad
    orig = _losses(run)
    for t in f["evidence"]["trajectory"][:-1]:  # the replayed steps follow the original run
        assert t["loss"] == pytest.approx(orig[t["step"]], rel=1e-5)


def _replay(run: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()  # a session fixture trained just now may have printed HF's logs
    rc = main(["replay", str(run), "--format", "json", "--fail-on", "never"])
    return rc, json.loads(capsys.readouterr().out)


def _step_replay(run: Path, ck: str, capsys) -> tuple[int, dict]:
    capsys.readouterr()  # a session fixture trained just now may have printed HF's logs
    rc = main(["replay", str(run), "--from", ck, "--format", "json", "--fail-on", "never"])
    return rc, json.loads(capsys.readouterr().out)


def test_step_replay_reproduces_the_optimizer_made_failure(decay_run, capsys):
    run, cb = decay_run
    bad = _first_bad(run)  # the original run's first non-finite step, from its own record
    assert cb.first_bad_step == bad and 20 < bad <= 30
    ck = f"checkpoint-{(bad - 1) // 10 * 10}"
    rc, rep = _step_replay(run, ck, capsys)
    assert rc == 0
    r = rep["runs"][0]
    assert r["config"]["state_loaded"] == {"optimizer": True, "scheduler": True, "rng": True}
    assert r["config"]["max_grad_norm"] == 1.0 and r["config"]["optimizer"] == "AdamW" and r["skipped"] == []
    (f,) = [f for f in r["findings"] if f["signature"] in ("nonfinite_origin", "grad_norm_overflow")]
    ev = f["evidence"]
    assert f["step"] == bad and ev["first_nonfinite_step"] == bad and ev["original_first_bad_step"] == bad and ev["reproduced"]
    start = int(ck.split("-")[1])
    traj = ev["trajectory"]
    assert [t["step"] for t in traj] == list(range(start + 1, bad + 1))
    assert ev["replayed_steps"] == [start + 1, bad]
    last = traj[-1]
    assert not (isinstance(last["loss"], float) and isinstance(last["grad_norm"], float))  # the step that went non-finite
    orig = _losses(run)
    for t in traj[:-1]:  # the replayed steps follow the original run
        assert t["loss"] == pytest.approx(orig[t["step"]], rel=1e-5)
    assert ev["module"] and ev["phase"] in ("forward", "backward")


def test_transient_fault_is_not_reproduced_and_the_written_tensor_is_named(planted_run, capsys):
    run, cb = planted_run
    assert cb.first_bad_step == 26
    rc, rep = _step_replay(run, "checkpoint-20", capsys)
    assert rc == 0
    r = rep["runs"][0]
    (f,) = r["findings"]
    ev = f["evidence"]
    assert f["signature"] == "replay_not_reproduced"
    assert ev["replayed_steps"] == [21, 26] and ev["first_nonfinite_step"] is None and ev["original_first_bad_step"] == 26
    assert ev["reproduced"] is False
    assert ev["original_nonfinite_weights_not_reproduced"] == [f"{UP}.weight"]
    assert isinstance(ev["loss"], float) and isinstance(ev["grad_norm"], float)
    orig = _losses(run)
    assert [t["step"] for t in ev["trajectory"]] == list(range(21, 27))
    for t in ev["trajectory"][:-1]:
        assert t["loss"] == pytest.approx(orig[t["step"]], rel=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_state_file_with_an_unknown_global_is_refused_and_replay_goes_on(planted_run, tmp_path, capsys):
    run, _ = planted_run
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoint-20", copy / "checkpoint-20")
    shutil.copytree(run / "autopsy", copy / "autopsy")
    _Evil.marker = tmp_path / "pwned"
    torch.save({"last_epoch": _Evil()}, copy / "checkpoint-20" / "scheduler.pt")
    rc, rep = _step_replay(copy, "checkpoint-20", capsys)
    assert rc == 0 and not _Evil.marker.exists()
    r = rep["runs"][0]
    assert r["config"]["state_loaded"]["scheduler"] is False
    (note,) = [s["reason"] for s in r["skipped"]]
    assert "scheduler.pt was not loaded" in note and "fresh scheduler advanced to step 20" in note
    orig = _losses(run)
    traj = r["findings"][0]["evidence"]["trajectory"]  # the rebuilt schedule gives the same learning rates
    assert all(t["loss"] == pytest.approx(orig[t["step"]], rel=1e-5) for t in traj[:-1])


def test_zip_bombs_in_the_optimizer_and_rng_files_are_refused_and_replay_goes_on(planted_run, tmp_path, capsys):
    """A few-hundred-KB optimizer.pt / rng_state.pth that would inflate past what such a file can hold for this model
    is not inflated: the replay runs without that state and says why."""
    import helpers.replay as S
    from autopsy.replay.state import SMALL_STATE_CAP, optimizer_cap

    run, _ = planted_run
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoint-20", copy / "checkpoint-20")
    shutil.copytree(run / "autopsy", copy / "autopsy")
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(copy / "checkpoint-20" / "model.safetensors")).values())
    S.zip_bomb(copy / "checkpoint-20" / "optimizer.pt", optimizer_cap(params) + (16 << 20))
    S.zip_bomb(copy / "checkpoint-20" / "rng_state.pth", SMALL_STATE_CAP + (16 << 20))
    rc, rep = _step_replay(copy, "checkpoint-20", capsys)
    assert rc == 0
    r = rep["runs"][0]
    assert r["config"]["state_loaded"] == {"optimizer": False, "scheduler": True, "rng": False}
    notes = [s["reason"] for s in r["skipped"]]
    assert any(n.startswith("optimizer.pt was not loaded: it inflates to") for n in notes)
    assert any(n.startswith("rng_state.pth was not loaded: it inflates to") for n in notes)


def test_batches_not_recorded_since_the_checkpoint_is_one_line_error(planted_run, capsys):
    run, _ = planted_run
    rc = main(["replay", str(run), "--from", "checkpoint-10"])
    err = capsys.readouterr().err
    assert rc == 2 and "were not recorded" in err and "keep_last" in err and err.count("\n") == 1


def test_callback_dumps_the_batches_of_a_loss_spike(tmp_path):
    """A real run that memorizes one text for 40 steps, then meets a batch of random text at step 41."""
    import tinyllama
    from autopsy.callbacks import AutopsyCallback
    from autopsy.replay.batch import load_batches

    easy = tinyllama.structured_texts(1, seed=3) * 4
    weird = tinyllama.random_texts(4, seed=9)
    cb = AutopsyCallback(keep_last=4)
    trainer = tinyllama.train(tmp_path / "run", max_steps=44, learning_rate=3e-2, lr_scheduler_type="constant", eval_steps=None,
                              save_steps=None, callbacks=[cb], report_to=(), train_texts=easy * 40 + weird + easy * 4,
                              train_sampling_strategy="sequential")
    assert trainer.state.global_step == 44 and cb.first_bad_step is None  # a spike does not stop training
    assert [p.name for p in cb.dumps] == ["batches-step-41.safetensors"]
    bf = load_batches(cb.dumps[0])
    assert bf.metadata["reason"] == "spike" and bf.metadata["trigger_step"] == "41" and bf.first_bad_step is None
    assert sorted(bf.batches) == [38, 39, 40, 41] and sorted(bf.step_rng) == [38, 39, 40, 41]
    tok = tinyllama.make_tokenizer()
    want = tok(weird, truncation=True, max_length=tinyllama.SEQ_LEN, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(bf.batches[41][0]["input_ids"], want)  # the very batch that spiked
    losses = json.loads(bf.metadata["losses"])
    assert losses["41"] > 10 * losses["40"]


class _Out(dict):
    @property
    def loss(self):
        return self["loss"]


def _toy(dtype, *, scale: float, weight: float):
    class Toy(torch.nn.Module):
        """embed -> Linear -> Linear, loss = scale * sum(out): the last Linear's input gradient is scale * weight * 4."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
            with torch.no_grad():
                self.embed.weight.fill_(0.01)
                self.block[0].weight.zero_()
                self.block[0].bias.zero_()
                self.block[1].weight.fill_(weight)
                self.block[1].bias.zero_()

        def forward(self, input_ids, labels=None):  # a finite forward (all zeros), a huge gradient
            return _Out(loss=self.block(self.embed(input_ids)).float().sum() * scale)

    return Toy().to(dtype)


@pytest.mark.parametrize(("dtype", "scale", "expect"), [(torch.float16, 1000.0, True), (torch.float32, 1e36, False)])
def test_backward_origin_is_re_run_in_float32(dtype, scale, expect):
    """A gradient that overflows float16 (1000 * 100 * 4 > 65504) but not float32: finite_in_float32 is computed."""
    from autopsy.replay.localize import localize

    (f,) = localize(_toy(dtype, scale=scale, weight=100.0), {"input_ids": torch.tensor([[1, 2, 3]])})
    ev = f.evidence
    assert f.signature == "nonfinite_origin" and (ev["module"], ev["phase"]) == ("block.1", "backward")
    assert ev["dtype"] == str(dtype).replace("torch.", "") and ev["finite_in_float32"] is expect
    if dtype == torch.float16:
        assert ev["max_abs_input"] == 0.0


def test_nan_born_in_a_non_leaf_module_is_found_by_the_narrowing_pass():
    """The cheap first pass hooks leaves and blocks only; a NaN made by a container's own code needs every module."""
    from autopsy.replay.localize import localize

    class Mixer(torch.nn.Module):  # not a leaf: it owns a Linear, then does its own (broken) math
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.log(self.proj(x) * 0.0 - 1.0)  # log of -1: NaN born here, not in proj

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.mixer = Mixer()
            self.head = torch.nn.Linear(4, 4)

        def forward(self, input_ids, labels=None):
            return _Out(loss=self.head(self.mixer(self.embed(input_ids))).sum())

    (f,) = localize(Toy(), {"input_ids": torch.tensor([[1, 2, 3]])})
    assert f.signature == "nonfinite_origin"
    assert (f.evidence["module"], f.evidence["phase"], f.evidence["children_finite"]) == ("mixer", "forward", True)
