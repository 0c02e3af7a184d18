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
