"""Localization on eight architectures x five planted faults: the right module, phase and lead finding in every cell.

Tiny models built from local configs (helpers/archs.py: Llama, Qwen2, Gemma2, GPT-2 and Falcon with tied weights,
Mixtral's experts, T5's encoder-decoder, BERT's MLM head), on the CPU. Each cell saves the planted model with
``save_pretrained`` and replays it as a user would (``replay(CHECKPOINT, batch=FILE)``), except the backward fault,
which is a hook on the embedding (a module whose backward breaks) and so is diagnosed on the model in memory.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.slow]

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import archs as A  # noqa: E402


@pytest.mark.parametrize("plant", sorted(A.PLANTS))
@pytest.mark.parametrize("arch", A.ARCHS)
def test_cell(arch, plant, tmp_path):
    from safetensors.torch import save_file

    from autopsy.replay import replay
    from autopsy.replay.diagnose import diagnose_model

    model = A.make(arch)
    data = A.batch()
    want = A.PLANTS[plant](model, data)
    if plant == "backward_fault":
        findings = diagnose_model(model, [data], step=7)
    else:
        model.save_pretrained(str(tmp_path / "ck"))
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp_path / "batch.safetensors"))
        report = replay(tmp_path / "ck", batch=tmp_path / "batch.safetensors",
                        dtype="float16" if plant == "fp16_overflow" else None)
        findings = report.runs[0].sorted_findings()
    lead = findings[0]
    origin = next(f for f in findings if f.signature in ("nonfinite_origin", "grad_norm_overflow"))
    assert lead.signature == want.lead, [(f.signature, f.summary) for f in findings]
    assert (origin.evidence["module"], origin.evidence["phase"]) == (want.module, want.phase)
    if want.finite_in_float32 is not None:
        assert origin.evidence["finite_in_float32"] is want.finite_in_float32
        assert origin.evidence["dtype"] == "float16"  # the autocast the replay ran in
    if plant == "inf_weight":
        assert origin.evidence["nonfinite_params"] == [f"{want.module}.weight"]
        assert "weights_nonfinite" in {f.signature for f in findings}
    if plant == "masked_labels":
        assert lead.evidence["problem"] == "all_labels_masked" and origin.evidence["explained_by"] == "bad_batch"
    if plant == "norm_overflow":
        ev = origin.evidence
        assert ev["nonfinite_grad_elements"] == 0 and isinstance(ev["max_abs_grad"], float)
        assert ev["grad_norm_float64"] ** 2 > ev["float32_max"] and ev["grad_norm_float32"] in ("Infinity", "NaN")
        assert "cannot help" in origin.fix
    if plant == "backward_fault":
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        assert (A.named(model, head) in origin.evidence.get("tied_with", [])) is tied
