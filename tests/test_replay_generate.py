"""Checkpoint health: `autopsy replay CHECKPOINT --generate` flags degenerate greedy output."""

from __future__ import annotations

import json

import pytest

from autopsy.replay.generate import degenerate

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.mark.parametrize(("tokens", "problem"), [
    ([], "empty"),
    ([5] * 8, "repeated_token"),
    ([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], "loop"),
    ([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], None),
    ([10, 11, 12, 13, 14, 15, 16, 17, 4, 4, 4], None),  # a short repeat at the end of a sound text is no loop
])
def test_degenerate_output_kinds(tokens, problem):
    got = degenerate(tokens)
    assert (got[0] if got else None) == problem
    if problem == "loop":
        assert got[1]["period"] == 3 and got[1]["repeats"] == 4


@pytest.fixture(scope="module")
def looping_run(tmp_path_factory):
    """A real run trained on one three-word cycle: its greedy output can only go round that cycle."""
    pytest.importorskip("transformers")
    import tinyllama

    out = tmp_path_factory.mktemp("gen") / "run"
    cycle = " ".join(["w5 w6 w7"] * (tinyllama.SEQ_LEN // 3 + 1))
    tinyllama.train(out, max_steps=20, learning_rate=1e-2, lr_scheduler_type="constant", eval_steps=None, save_steps=20,
                    report_to=(), train_texts=[cycle] * 64)
    tinyllama.make_tokenizer(save_dir=out)  # the tokenizer saved with the run
    return out


def test_a_checkpoint_whose_output_loops_is_flagged_with_its_samples(looping_run, tmp_path, capsys):
    import tinyllama
    from autopsy.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n\nw40 w41 w42\n")
    with tinyllama.math_attention():
        capsys.readouterr()
        rc = main(["replay", str(looping_run / "checkpoint-20"), "--generate", "--prompts", str(prompts), "--format", "json",
                   "--fail-on", "error"])
    rep = json.loads(capsys.readouterr().out)["runs"][0]
    assert rc == 1 and rep["config"]["tokenizer"] is True and rep["config"]["decoding"] == "greedy"
    (f,) = [f for f in rep["findings"] if f["signature"] == "degenerate_output"]
    ev = f["evidence"]
    assert ev["prompts"] == 2 and ev["degenerate"] == 2 and ev["problems"] == {"loop": 2}
    for s in ev["samples"]:
        assert s["problem"] == "loop" and s["period"] == 3
        words = s["output"].split()
        assert len(words) >= 3 * 3 and set(words[-6:]) == {"w5", "w6", "w7"}  # the trained cycle, decoded


def test_nan_logits_are_flagged_critical_and_builtin_prompts_need_no_file(tmp_path, capsys):
    import helpers.replay as S
    import tinyllama
    from autopsy.cli import main

    ck = S.make_checkpoint(tmp_path / "ck", plant="model.layers.0.mlp.up_proj.weight")
    with tinyllama.math_attention():
        rc = main(["replay", str(ck), "--generate", "--format", "json", "--fail-on", "critical"])
    rep = json.loads(capsys.readouterr().out)["runs"][0]
    by = {f["signature"]: f for f in rep["findings"]}
    assert rc == 1 and by["degenerate_output"]["severity"] == "critical"
    assert by["degenerate_output"]["evidence"]["problems"] == {"nonfinite_logits": 5}  # the five built-in prompts
    assert "weights_nonfinite" in by
    assert any("no tokenizer" in s["reason"] for s in rep["skipped"])  # this checkpoint has none: token-id prompts
