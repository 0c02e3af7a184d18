"""Replay: weight scan, batch inspection, localization, the CLI and AutopsyCallback, on real tiny Llama checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import REPO

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.usefixtures("math_attention")]  # runs a model: CPU-dependent numerics

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers.replay as S  # noqa: E402
from autopsy.cli import main  # noqa: E402

UP = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="session")
def rp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All replay checkpoints, made once: clean base, inf in up_proj, fp16 overflow, LoRA with a NaN lora_B."""
    t = tmp_path_factory.mktemp("replay")
    lora_mod = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default"
    base = S.make_checkpoint(t / "base")
    return {
        "dir": t,
        "batch": S.make_batch(t / "batch.safetensors"),
        "base": base,
        "inf": S.make_checkpoint(t / "inf", plant=f"{UP}.weight"),
        # scaled so that down_proj's output (~1e5) overflows float16 (max 65504) while its weights and inputs do not
        "fp16": S.make_checkpoint(t / "fp16", dtype=torch.float16,
                                  scale={"model.layers.0.mlp.down_proj.weight": 1e4, "model.layers.0.mlp.up_proj.weight": 3e3}),
        "lora": S.make_lora(t / "lora", base, nan_in=lora_mod),
        "lora_module": lora_mod,
    }


def _replay_json(args: list[str], capsys) -> tuple[int, dict]:
    args = [*map(str, args), "--format", "json"]
    rc = main(["replay", *args, *([] if "--fail-on" in args else ["--fail-on", "never"])])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else {}


def _by_sig(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in report["runs"][0]["findings"]:
        out.setdefault(f["signature"], []).append(f)
    return out


def test_inf_weight_localized_to_up_proj_by_the_cli(rp):
    """Acceptance 1, as a user runs it: `python -m autopsy replay CK --batch B --format json`."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "autopsy", "replay", str(rp["inf"]), "--batch", str(rp["batch"]), "--format", "json",
                           "--fail-on", "critical"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a critical finding reached --fail-on
    sigs = _by_sig(json.loads(proc.stdout))
    origin = sigs["nonfinite_origin"][0]["evidence"]
    assert origin["module"] == UP and origin["phase"] == "forward"
    assert origin["nonfinite_params"] == [f"{UP}.weight"]
    assert math.isfinite(origin["max_abs_input"])
    assert sigs["weights_nonfinite"][0]["evidence"]["tensors"] == [f"{UP}.weight"]
    assert sigs["weights_nonfinite"][0]["evidence"]["count"] == 1
    assert "Traceback" not in proc.stderr


def test_fp16_overflow_is_finite_in_float32(rp, capsys):
    rc, rep = _replay_json([rp["fp16"], "--batch", rp["batch"]], capsys)
    assert rc == 0
    sigs = _by_sig(rep)
    assert "weights_nonfinite" not in sigs  # the weights are finite: the overflow is in the activations
    ev = sigs["nonfinite_origin"][0]["evidence"]
    assert ev["module"] == "model.layers.0.mlp.down_proj"
    assert (ev["phase"], ev["dtype"], ev["finite_in_float32"]) == ("forward", "float16", True)
    assert ev["max_abs_input"] < 65504 and ev["max_abs_output"] == "Infinity" and ev["dtype_max"] == 65504.0
    assert ev["layer"] == "model.layers.0"
    assert rep["runs"][0]["config"]["dtype"] == "float16"


def test_lora_nan_localized_to_the_adapter_module(rp, capsys):
    rc, rep = _replay_json([rp["lora"], "--batch", rp["batch"], "--base", rp["base"]], capsys)
    sigs = _by_sig(rep)
    ev = sigs["nonfinite_origin"][0]["evidence"]
    assert ev["module"] == rp["lora_module"] and ev["phase"] == "forward"
    assert rep["runs"][0]["config"]["adapter"] is True
    assert any("lora_B" in t for t in sigs["weights_nonfinite"][0]["evidence"]["tensors"])


def test_clean_checkpoint_is_not_reproduced_with_the_true_loss(rp, capsys):
    from autopsy.replay.batch import load_batches
    from autopsy.replay.checkpoint import load_model

    rc, rep = _replay_json([rp["base"], "--batch", rp["batch"], "--fail-on", "warning"], capsys)
    assert rc == 0
    (f,) = rep["runs"][0]["findings"]
    assert f["signature"] == "replay_not_reproduced"
    model = load_model(rp["base"], device="cpu")
    batch = load_batches(rp["batch"]).pick()[1][0]
    loss = model(**batch).loss
    loss.backward()
    gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert f["evidence"]["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert f["evidence"]["grad_norm"] == pytest.approx(float(gnorm), rel=1e-4)


def test_adapter_base_that_is_not_local_is_one_line_error(rp, tmp_path, capsys):
    ad = tmp_path / "ad"
    ad.mkdir()
    for f in rp["lora"].iterdir():
        (ad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    rc = main(["replay", str(ad), "--batch", str(rp["batch"])])
    err = capsys.readouterr().err
    assert rc == 2 and "not a local model directory" in err and err.count("\n") == 1


@pytest.mark.parametrize("case", ["all_labels_masked", "token_id_out_of_range", "sequence_too_long", "nonfinite_input", "empty_rows"])
def test_bad_batch_names_the_rows(case):
    from autopsy.replay.batch import inspect_batch

    ids = torch.randint(4, 100, (3, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    rows = [1]
    if case == "all_labels_masked":
        batch["labels"][:] = -100
        rows = [0, 1, 2]
    elif case == "token_id_out_of_range":
        batch["input_ids"][1, 5] = 124
    elif case == "sequence_too_long":
        ids = torch.randint(4, 100, (3, 80))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        batch["attention_mask"][[0, 2], 40:] = 0  # only row 1 really uses more than 64 positions
    elif case == "nonfinite_input":
        batch["inputs_embeds"] = torch.zeros(3, 16, 8)
        batch["inputs_embeds"][1, 3, 2] = float("nan")
    elif case == "empty_rows":
        batch["attention_mask"][1] = 0
    found = inspect_batch(batch, vocab_size=124, max_positions=64)
    assert [f.evidence["problem"] for f in found] == [case]
    assert found[0].evidence["rows"] == rows


def test_clean_batch_has_no_bad_batch():
    from autopsy.replay.batch import inspect_batch

    ids = torch.randint(4, 100, (3, 16))
    assert inspect_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, vocab_size=124, max_positions=64) == []


def test_out_of_range_batch_skips_localization_and_fails_on_critical(rp, tmp_path, capsys):
    b = S.make_batch(tmp_path / "oor.safetensors")
    from safetensors.torch import load_file, save_file

    t = load_file(str(b))
    t["input_ids"][0, 3] = 5000
    save_file(t, str(b))
    rc = main(["replay", str(rp["base"]), "--batch", str(b), "--format", "json", "--fail-on", "critical"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert [f["signature"] for f in rep["runs"][0]["findings"]] == ["bad_batch"]
    assert rep["runs"][0]["findings"][0]["evidence"]["rows"] == [0]


def test_backward_origin_is_the_module_whose_gradient_breaks():
    from autopsy.replay.localize import localize

    class Sqrt(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x * 0.0)  # finite (0) forward, 0 * inf = NaN gradient

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), Sqrt(), torch.nn.Linear(4, 4))

        def forward(self, input_ids, labels=None):
            out = self.block(self.embed(input_ids))
            return {"loss": out.pow(2).mean() + self.block[0].weight.sum() * 0}

    class Out(dict):
        @property
        def loss(self):
            return self["loss"]

    toy = Toy()
    real = toy.forward
    toy.forward = lambda **kw: Out(real(**kw))
    (f,) = localize(toy, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert f.signature == "nonfinite_origin"
    assert (f.evidence["module"], f.evidence["phase"]) == ("block.1", "backward")


def test_weight_scan_reads_bf16_and_reports_a_cut_file(rp, tmp_path):
    from autopsy.checkpoints import scan_weights

    ck = S.make_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16, plant="model.layers.0.self_attn.k_proj.weight", value=float("nan"))
    scan = scan_weights(ck)
    assert scan.nonfinite == {"model.layers.0.self_attn.k_proj.weight": 1}
    assert scan_weights(rp["base"]).finite
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (rp["base"] / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    scan = scan_weights(cut)
    assert not scan.finite and scan.damage and "cut off" in scan.damage[0].problem


def test_device_and_dtype_come_from_the_machine_and_checkpoint(rp):
    from autopsy.replay.device import pick_device, pick_dtype

    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype(rp["fp16"]) == torch.float16
    assert pick_dtype(rp["base"]) == torch.float32


def test_weights_detector_names_last_finite_checkpoint(nan_run):
    from autopsy import analyze

    (f,) = analyze(nan_run, select=["weights_nonfinite"]).findings
    assert f.step == 40  # the first checkpoint after the NaN at step 31
    assert f.evidence["first_bad_step"] == 31
    assert Path(f.evidence["last_finite_checkpoint"]).name == "checkpoint-30"
    assert f.evidence["count"] > 0


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory):
    """A real Trainer run with AutopsyCallback(stop_on='nonfinite') and an inf planted after step 20."""
    import tinyllama
    from autopsy.callbacks import AutopsyCallback

    out = tmp_path_factory.mktemp("recorded") / "run"
    cb = AutopsyCallback(stop_on="nonfinite", keep_last=4)
    trainer = tinyllama.train(out, max_steps=30, plant_inf_at=20, eval_steps=None, save_steps=10, callbacks=[cb], report_to=())
    return out, cb, trainer


def test_callback_records_the_failure_and_stops(recorded_run):
    from autopsy.replay.batch import load_batches

    out, cb, trainer = recorded_run
    assert cb.first_bad_step == 21 and trainer.state.global_step == 21  # stopped at the first non-finite step
    bf = load_batches(out / "autopsy" / "batches-step-21.safetensors")
    assert bf.first_bad_step == 21 and sorted(bf.batches) == [18, 19, 20, 21]
    assert set(bf.batches[21][0]) >= {"input_ids", "attention_mask", "labels"}
    assert bf.rng["torch_cpu"].dtype == torch.uint8
    losses = [json.loads(line) for line in (out / "autopsy" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == list(range(1, 22))
    assert losses[-1]["loss"] == "nan" and all(isinstance(r["loss"], float) for r in losses[:-1])  # the true loss HF logs as 0.0


def test_run_dir_alone_is_replayed(recorded_run, capsys):
    out, _, _ = recorded_run
    rc, rep = _replay_json([out], capsys)
    assert rc == 0
    run = rep["runs"][0]
    assert run["config"]["step"] == 21 and Path(run["config"]["checkpoint"]).name == "weights-before-step-21"
    sigs = _by_sig(rep)
    ev = sigs["nonfinite_origin"][0]["evidence"]
    assert (ev["module"], ev["phase"]) == (UP, "forward")
    assert Path(ev["restart_from"]).name == "checkpoint-20"
    assert sigs["weights_nonfinite"][0]["evidence"]["tensors"] == [f"{UP}.weight"]


def test_replay_never_writes_into_the_analysed_dir(rp, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in rp["inf"].iterdir())
    main(["replay", str(rp["inf"]), "--batch", str(rp["batch"]), "--format", "markdown"])
    assert "nonfinite_origin" in capsys.readouterr().out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in rp["inf"].iterdir()) == before


class _Out(dict):
    @property
    def loss(self):
        return self["loss"]


def test_an_x_squared_overflow_in_a_layernorm_is_explained_as_one():
    """Finite inputs of 1e20 into a LayerNorm: its variance (x**2) overflows float32, even re-run in float32."""
    from autopsy.replay.localize import localize

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.up = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8)
            self.norm, self.head = torch.nn.LayerNorm(8), torch.nn.Linear(8, 10)
            with torch.no_grad():
                self.up.weight.mul_(1e20)

        def forward(self, input_ids, labels=None):
            h = self.head(self.norm(self.up(self.embed(input_ids))))
            return _Out(loss=torch.nn.functional.cross_entropy(h.view(-1, 10), input_ids.view(-1)))

    torch.manual_seed(0)
    (f,) = localize(Toy(), {"input_ids": torch.tensor([[1, 2, 3]])})
    ev = f.evidence
    assert (ev["module"], ev["phase"], ev["finite_in_float32"]) == ("norm", "forward", False)
    assert ev["max_abs_input"] ** 2 > ev["dtype_max"] and "square exceeds" in f.cause and "0/0" not in f.cause


def test_a_nan_embedding_row_names_the_tokens_of_the_batch_it_hits():
    import tinyllama
    from autopsy.replay.localize import localize

    model = tinyllama.make_model(seed=0)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 3] = float("nan")
        model.model.embed_tokens.weight[100, 0] = float("nan")  # a row this batch does not use
    (f,) = localize(model, {"input_ids": ids, "labels": ids})
    assert f.evidence["module"] == "model.embed_tokens" and f.evidence["tokens"] == [7]


def test_the_tensor_a_lora_update_wrote_is_named_by_its_saved_name(rp):
    """Adapter files name tensors without the adapter's name (lora_B.weight, not lora_B.default.weight)."""
    from autopsy.replay.checkpoint import load_model
    from autopsy.replay.step import _compare_weights

    model = load_model(rp["lora"], base=rp["base"], device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.nan_to_num_(0.0)
    saved = rp["lora_module"].replace(".default", "") + ".weight"
    assert _compare_weights(model, rp["lora"]) == [saved]


def test_replay_of_a_run_picks_the_nonfinite_step_over_earlier_spike_dumps(tmp_path):
    """resolve() is torch-free: the first non-finite step of the callback's log, its batch file, the spikes listed."""
    from autopsy.replay.batch import save_batches
    from autopsy.replay.resolve import resolve

    run = tmp_path / "run"
    ids = torch.randint(4, 100, (2, 8))
    for step, reason in ((6, "spike"), (12, "nonfinite"), (9, "spike")):
        save_batches(run / "autopsy" / f"batches-step-{step}.safetensors", {s: [{"input_ids": ids + s}] for s in range(step - 2, step + 1)},
                     metadata={"reason": reason, "trigger_step": str(step), "first_bad_step": str(step) if reason == "nonfinite" else ""})
    (run / "autopsy" / "run.json").write_text(json.dumps({"grad_norm": "pre_clip"}))
    (run / "autopsy" / "losses.jsonl").write_text("\n".join(
        json.dumps({"step": s, "loss": 2.0, "grad_norm": "inf" if s == 12 else 1.0}) for s in range(1, 13)))
    S.make_checkpoint(run / "checkpoint-10")
    t = resolve(run)
    assert (t.step, t.batch.name, t.checkpoint.name) == (12, "batches-step-12.safetensors", "checkpoint-10")
    assert t.first_bad["by_source"] == {"autopsy": 12}
    assert sorted(c["trigger_step"] for c in t.candidates) == [6, 9] and {c["reason"] for c in t.candidates} == {"spike"}
    assert "is 1 step before the failing step 12" in t.notes[0]  # the weights after step 10; step 12 saw 11's
    (run / "autopsy" / "batches-step-12.safetensors").unlink()
    with pytest.raises(Exception, match="no recorded batch holds it") as err:
        resolve(run)
    assert "\n" not in str(err.value)
