"""Replay in the run's precision and where the model fits; bounded state files; bad flags fail before torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import REPO

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.usefixtures("math_attention")]

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers.replay as S  # noqa: E402
from autopsy.cli import main  # noqa: E402


def _no_torch(args: list[str]) -> tuple[int, str, bool]:
    """Run the CLI in a fresh process: (exit code, stderr, whether torch was imported)."""
    code = ("import sys; from autopsy.cli import main; rc = main(sys.argv[1:]); "
            "sys.stdout.write('torch' if 'torch' in sys.modules else 'no-torch'); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    return proc.returncode, proc.stderr, proc.stdout.endswith("torch") and not proc.stdout.endswith("no-torch")


@pytest.mark.parametrize(("args", "says"), [
    (["replay", "/nope"], "no such file or directory"),
    (["replay", ".", "--dtype", "fp8"], "unknown --dtype"),
    (["replay", ".", "--device", "tpu"], "unknown device"),
    (["replay", ".", "--generate", "--batch", "pyproject.toml"], "--generate"),
    (["replay", ".", "--from", "checkpoint-999"], "no such checkpoint"),
])
def test_a_bad_path_or_flag_is_one_line_before_torch_is_imported(args, says):
    rc, err, imported = _no_torch(args)
    assert rc == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not imported


def _training_args(dir: Path, **flags) -> None:
    from transformers import TrainingArguments

    torch.save(TrainingArguments(output_dir=str(dir), use_cpu=True, report_to=[], **flags), str(dir / "training_args.bin"))


def test_an_fp16_mixed_precision_overflow_is_replayed_in_the_runs_autocast(tmp_path, capsys):
    """fp32 weights, fp16=True in training_args.bin: the overflow happens under autocast, and replay reproduces it
    there without being told (the float32 differential says it is an overflow)."""
    from helpers import archs as A

    model = A.make("llama")
    data = A.batch()
    want = A.plant_fp16_overflow(model, data)
    ck = tmp_path / "run" / "checkpoint-10"
    model.save_pretrained(str(ck))
    _training_args(ck, fp16=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp_path / "b.safetensors"))
    capsys.readouterr()  # what making TrainingArguments printed
    rc = main(["replay", str(ck), "--batch", str(tmp_path / "b.safetensors"), "--format", "json", "--fail-on", "never"])
    rep = json.loads(capsys.readouterr().out)["runs"][0]
    assert rep["config"]["precision"]["autocast"] == "float16" and rep["config"]["dtype"] == "float32"
    assert rep["config"]["precision"]["from"]["autocast"].endswith("training_args.bin")
    ev = rep["findings"][0]["evidence"]
    assert (ev["module"], ev["phase"], ev["dtype"], ev["finite_in_float32"]) == (want.module, "forward", "float16", True)
    rc = main(["replay", str(ck), "--batch", str(tmp_path / "b.safetensors"), "--format", "json", "--dtype", "float32",
               "--fail-on", "warning"])
    rep = json.loads(capsys.readouterr().out)["runs"][0]
    assert rc == 0 and rep["config"]["precision"]["autocast"] is None
    assert [f["signature"] for f in rep["findings"]] == ["replay_not_reproduced"]  # float32 alone: it does not overflow


def test_precision_comes_from_run_json_first_then_training_args_then_config(tmp_path):
    from autopsy.recording import write_run_meta
    from autopsy.replay.precision import run_precision

    ck = S.make_checkpoint(tmp_path / "run" / "checkpoint-5", dtype=torch.bfloat16)
    assert (run_precision(ck).weights, run_precision(ck).autocast) == ("bfloat16", None)
    _training_args(tmp_path / "run", bf16=True)
    fp32 = S.make_checkpoint(tmp_path / "run" / "checkpoint-6")
    p = run_precision(fp32, run_dir=tmp_path / "run", checkpoint=fp32)
    assert (p.weights, p.autocast) == ("float32", "bfloat16")
    write_run_meta(tmp_path / "run", {"weights_dtype": "float32", "autocast": None, "attn_implementation": "eager",
                                      "sdpa_backends": {"flash": False, "mem_efficient": False, "math": True}})
    p = run_precision(fp32, run_dir=tmp_path / "run", checkpoint=fp32)
    assert (p.autocast, p.attn_implementation, p.sdpa_backends) == (None, "eager", ["math"])
    assert run_precision(fp32, run_dir=tmp_path / "run", dtype="bf16").autocast == "bfloat16"
    assert run_precision(ck, dtype="float32").weights == "float32"


def test_the_recorded_attention_implementation_is_the_one_loaded(tmp_path):
    from autopsy.replay.checkpoint import load_model
    from autopsy.replay.precision import Precision

    ck = S.make_checkpoint(tmp_path / "ck")
    model = load_model(ck, device="cpu", precision=Precision(weights="float32", attn_implementation="eager"))
    assert model.config._attn_implementation == "eager" and model.training


def test_placement_is_decided_before_loading_from_the_headers_and_the_machine(tmp_path):
    from autopsy.errors import InputError
    from autopsy.replay.checkpoint import model_config
    from autopsy.replay.memory import count_params, plan_placement

    ck = S.make_checkpoint(tmp_path / "ck")
    n = sum(p.numel() for p in S.tinyllama.make_model().parameters())
    assert count_params(ck) == n
    cfg = model_config(ck)
    kw = dict(requested="auto", batch_shape=(64, 4096), weights_dtype="float32")  # activations of a long batch dominate
    assert plan_placement(ck, cfg, available=([], 8.0), **kw).device == "cpu"
    assert plan_placement(ck, cfg, available=([8.0], 8.0), **kw).device == "cuda"
    need = plan_placement(ck, cfg, available=([8.0], 8.0), **kw).need_gib
    tight = need["weights"] + need["gradients"] + (need["activations"] + need["activations_checkpointed"]) / 2
    place = plan_placement(ck, cfg, available=([tight / 0.85], 8.0), **kw)
    assert place.device == "cuda" and place.gradient_checkpointing  # fits only with checkpointing
    spread = plan_placement(ck, cfg, available=([need["weights"] / 4], 8.0), **kw)
    assert spread.device == "auto" and spread.max_memory and spread.gradient_checkpointing  # GPU + RAM
    with pytest.raises(InputError, match=r"needs about .* GiB .* RAM available") as err:
        plan_placement(ck, cfg, available=([], need["weights"] / 4), **kw)
    assert "\n" not in str(err.value)


def test_a_quantized_base_without_a_gpu_is_one_line_with_the_fix(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from autopsy.recording import write_run_meta

    base = S.make_checkpoint(tmp_path / "base")
    run = tmp_path / "run"
    S.make_lora(run / "checkpoint-5", base)
    write_run_meta(run, {"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "quant_method": "bitsandbytes"}})
    b = S.make_batch(tmp_path / "b.safetensors")
    capsys.readouterr()
    rc = main(["replay", str(run / "checkpoint-5"), "--batch", str(b)])
    err = capsys.readouterr().err
    assert rc == 2 and "4-bit" in err and "CUDA GPU" in err and "--dtype bfloat16" in err and err.count("\n") == 1
    rc = main(["replay", str(run / "checkpoint-5"), "--batch", str(b), "--dtype", "bfloat16", "--format", "json",
               "--fail-on", "never"])
    rep = json.loads(capsys.readouterr().out)["runs"][0]
    assert rc == 0 and "dropped by --dtype" in rep["config"]["precision"]["from"]["quantization"]


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt"])
def test_a_state_file_that_inflates_past_its_cap_is_refused_without_inflating_it(name, tmp_path):
    from autopsy.replay.state import SMALL_STATE_CAP, load_state_file, optimizer_cap

    cap = SMALL_STATE_CAP if name == "rng_state.pth" else optimizer_cap(10_000)
    bomb = S.zip_bomb(tmp_path / name, cap + (16 << 20))
    assert bomb.stat().st_size < cap / 20  # small on disk, big when inflated
    obj, note = load_state_file(bomb, what="state", cap=cap)
    assert obj is None and "inflates to" in note and "not loaded" in note
    ok = tmp_path / "ok.pt"
    torch.save({"x": torch.ones(3)}, str(ok))
    obj, note = load_state_file(ok, what="state", cap=cap)
    assert note is None and torch.equal(obj["x"], torch.ones(3))


@pytest.mark.parametrize("where", ["embedding", "inside_a_checkpointed_layer"])
def test_localization_holds_under_gradient_checkpointing(where):
    """Real-size replays run with gradient checkpointing (non-reentrant): the forward is recomputed inside the
    backward, and the hooks still see the first pass's calls and the gradients of its outputs."""
    from autopsy.replay.diagnose import diagnose_model
    from helpers import archs as A

    model = A.make("llama")
    data = A.batch()
    if where == "embedding":
        want = A.plant_backward_fault(model, data).module
    else:
        want = "model.layers.0.mlp.down_proj"
        mod = dict(model.named_modules())[want]
        mod.register_forward_hook(lambda m, a, out: out + 0 * torch.sqrt(out - out))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    origin = next(f for f in diagnose_model(model, [data]) if f.signature == "nonfinite_origin")
    assert (origin.evidence["module"], origin.evidence["phase"]) == (want, "backward")
