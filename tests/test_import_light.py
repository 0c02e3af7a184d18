"""`import autopsy` must not import the heavy optional modules."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "wandb", "tensorboard", "tbparse", "safetensors", "peft", "accelerate", "matplotlib")


def test_import_autopsy_loads_no_heavy_module():
    code = f"import sys, json, autopsy; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_loading_a_trainer_state_run_imports_no_heavy_module(tmp_path):
    from helpers.paths import RUNS

    path = RUNS / "healthy" / "trainer_state.json"
    code = (
        f"import sys, json, autopsy; f = autopsy.load({str(path)!r}); autopsy.analyze(f); "
        "print(json.dumps([m for m in ('torch', 'transformers', 'wandb', 'tensorboard') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_api_is_sorted_and_complete():
    import autopsy

    assert autopsy.__all__ == sorted(autopsy.__all__)
    for name in ("load", "analyze", "Finding", "Severity", "Report", "__version__"):
        assert name in autopsy.__all__
        assert hasattr(autopsy, name)


def test_analyze_of_the_example_run_imports_no_torch(tmp_path):
    """``autopsy analyze fixtures/runs/nan-at-31`` as a user runs it: the run has training_args.bin (read by walking
    the pickle's opcodes), safetensors checkpoints (headers and weights scanned with numpy) and TensorBoard files;
    none of it needs torch, transformers or safetensors."""
    from helpers.paths import RUNS

    run = RUNS / "nan-at-31"
    assert (run / "checkpoint-30" / "training_args.bin").is_file() and (run / "checkpoint-30" / "model.safetensors").is_file()
    report = tmp_path / "report.json"
    code = (
        "import sys, json\n"
        "from autopsy.cli import main\n"
        f"rc = main(['analyze', {str(run)!r}, '--out', {str(report)!r}, '--fail-on', 'never'])\n"
        "print(json.dumps({'rc': rc,\n"
        "    'heavy': [m for m in ('torch', 'transformers', 'safetensors', 'peft', 'accelerate') if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"rc": 0, "heavy": []}, got
    doc = json.loads(report.read_text())
    assert "learning_rate" in doc["runs"][0]["config"]  # training_args.bin was read
    assert doc["runs"][0]["run_info"]["checkpoints"]  # and the checkpoints seen
