"""`autopsy data`: rows that cannot train as meant, in every local dataset format, with counts and example indices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autopsy.cli import main
from helpers.paths import REPO


def _rows() -> tuple[list[dict], dict[str, list[int]]]:
    """Tokenized rows as a collator makes them, with known faults planted at known indices."""
    good = [{"input_ids": [2, 10 + i, 11 + i, 12 + i, 3], "attention_mask": [1] * 5, "labels": [-100, -100, 11 + i, 12 + i, 3]}
            for i in range(12)]
    rows = list(good)
    rows[3] = {"input_ids": [2, 40, 41, 42, 3], "attention_mask": [1] * 5, "labels": [-100] * 5}  # masked out
    rows[7] = {"input_ids": [0, 0, 0, 0, 0], "attention_mask": [0] * 5, "labels": [-100] * 5}  # empty (all padding)
    rows[9] = dict(good[1])  # a duplicate of row 1
    return rows, {"all_labels_masked": [3, 7], "empty": [7], "duplicate": [9]}


def _problems(report: dict) -> dict[str, list[int]]:
    return {f["evidence"]["problem"]: f["evidence"]["examples"] for f in report["runs"][0]["findings"] if f["signature"] == "data_issue"}


def _data_json(args: list, capsys) -> tuple[int, dict]:
    rc = main(["data", *map(str, args), "--format", "json"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk"])
def test_masked_out_empty_and_duplicate_rows_are_flagged(fmt, tmp_path, capsys):
    rows, want = _rows()
    if fmt == "jsonl":
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pa = pytest.importorskip("pyarrow")
        table = pa.Table.from_pylist(rows)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            path = tmp_path / "train.parquet"
            pq.write_table(table, str(path))
        else:  # the layout datasets' save_to_disk writes: Arrow stream files listed in state.json
            path = tmp_path / "ds"
            path.mkdir()
            with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
            (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
            (path / "dataset_info.json").write_text("{}")
    rc, rep = _data_json([path, "--fail-on", "error"], capsys)
    assert rc == 1 and _problems(rep) == want
    by = {f["evidence"]["problem"]: f for f in rep["runs"][0]["findings"] if f["signature"] == "data_issue"}
    assert by["all_labels_masked"]["evidence"]["count"] == 2 and by["all_labels_masked"]["severity"] == "error"
    (summary,) = [f for f in rep["runs"][0]["findings"] if f["signature"] == "data_summary"]
    unmasked = [sum(v != -100 for v in r["labels"]) for r in rows]
    assert summary["evidence"]["unmasked_tokens_per_row"]["min"] == min(unmasked)
    assert summary["evidence"]["unmasked_tokens_per_row"]["max"] == max(unmasked)


def test_text_rows_with_a_tokenizer_flag_truncated_completions_and_blank_rows(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    import tinyllama

    tinyllama.make_tokenizer(save_dir=tmp_path / "tok")
    long_prompt = " ".join(tinyllama.WORDS[:20])
    rows = [{"prompt": "w1 w2", "completion": "w3 w4"}, {"prompt": long_prompt, "completion": "w5 w6"},
            {"prompt": "   ", "completion": ""}, {"prompt": "w7 w8 w9", "completion": "w10 " * 12}]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    rc, rep = _data_json([path, "--tokenizer", tmp_path / "tok", "--max-length", 12, "--fail-on", "critical"], capsys)
    assert rc == 0  # data issues are errors and warnings, none critical
    got = _problems(rep)
    assert got["completion_truncated"] == [1]  # its 20-token prompt alone fills max_length
    assert got["empty"] == [2]
    assert got["too_long"] == [1, 3]


def test_a_recorded_batch_is_checked_row_by_row(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    from autopsy.replay.batch import save_batches

    ids = torch.randint(4, 100, (2, 8))
    masked = torch.full_like(ids, -100)
    path = save_batches(tmp_path / "autopsy" / "batches-step-5.safetensors",
                        {4: [{"input_ids": ids, "labels": ids.clone()}], 5: [{"input_ids": ids, "labels": masked}]})
    rc, rep = _data_json([path], capsys)
    assert _problems(rep) == {"all_labels_masked": [2, 3], "duplicate": [2, 3]}  # step 5 repeats step 4's ids


def test_data_reads_without_torch_and_bad_input_is_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"text": ""}) + "\n")
    code = ("import sys, json; from autopsy.cli import main; rc = main(['data', sys.argv[1], '--format', 'json', '--fail-on', 'never']); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    state = json.loads(proc.stderr.strip().splitlines()[-1])
    assert state == {"rc": 0, "torch": False}
    assert _problems(json.loads(proc.stdout)) == {"empty": [1]}
    proc = subprocess.run([sys.executable, "-m", "autopsy", "data", str(tmp_path / "nope.jsonl")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
