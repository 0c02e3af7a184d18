"""The W&B importer over real files: offline runs written now by the real client, and the
``.wandb`` files of older clients (0.10 to 0.19) in ../shared/real-logs/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autopsy.errors import AutopsyError
from autopsy.frame import wall_seconds
from autopsy.importers import load, read_files
from autopsy.importers._leveldb_log import BLOCK_SIZE, read_log
from autopsy.importers.discover import find_runs
from autopsy.importers.wandb_api import from_api_run
from autopsy.runinfo import catalog, run_info
from autopsy.series import series
from helpers.paths import REAL_LOGS, needs_shared
from helpers.wandb_runs import nan151_rows, write_runs

HF_CONFIG = {"max_steps": 200, "logging_steps": 1, "eval_steps": 25, "save_steps": 50, "learning_rate": 1e-3,
             "max_grad_norm": 1.0, "logging_nan_inf_filter": True, "num_train_epochs": 1}


@pytest.fixture(scope="session")
def wb_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real offline runs: ``nan151`` (HF-shaped, grad norm NaN and loss 0.0 from global step 151,
    eval rows every 25 steps) and ``exit1`` (finished with exit code 1)."""
    base = tmp_path_factory.mktemp("wandb")
    dirs = write_runs([
        {"dir": str(base / "a"), "id": "nan151", "config": HF_CONFIG, "rows": nan151_rows(),
         "summary": {"train_runtime": 3.25, "train_loss": 1.5}},
        {"dir": str(base / "b"), "id": "exit1", "config": {"max_steps": 20},
         "rows": nan151_rows(max_steps=20, nan_from=99), "exit_code": 1},
    ])
    return {"nan151": dirs[0], "exit1": dirs[1]}


def _log_file(run_dir: Path) -> Path:
    return next(run_dir.glob("run-*.wandb"))


# --- acceptance --------------------------------------------------------------------------------


def test_cli_reports_nan_at_global_step_151(wb_runs: dict[str, Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "autopsy", "analyze", str(wb_runs["nan151"]), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a FAILED run exits 1 (--fail-on error, the default)
    report = json.loads(proc.stdout)
    (run,) = report["runs"]
    assert run["sources"] == ["wandb"]
    found = {f["signature"]: f for f in run["findings"]}
    assert found["nan_grad_norm"]["step"] == 151
    assert found["loss_zero_collapse"]["step"] == 151
    assert found["nan_grad_norm"]["evidence"]["last_finite_step"] == 150


def test_x_axis_is_global_step_not_row_counter(wb_runs: dict[str, Path]) -> None:
    frame = load(wb_runs["nan151"])
    loss, grad, ev = series(frame, "train/loss"), series(frame, "train/grad_norm"), series(frame, "eval/loss")
    assert list(loss.index) == list(range(1, 201))  # W&B's _step runs to 207 (8 eval rows)
    assert list(ev.index) == list(range(25, 201, 25))
    assert grad.loc[:150].notna().all() and grad.loc[151:].isna().all()
    assert (loss.loc[151:] == 0.0).all() and (loss.loc[:150] > 0.5).all()
    assert np.isnan(ev.loc[175]) and np.isfinite(ev.loc[150])
    assert set(frame["source"]) == {"wandb"}
    # meta keys are not metrics; wall time comes from _timestamp
    assert not frame["metric"].str.startswith("_").any() and "train/global_step" not in set(frame["metric"])
    wall = wall_seconds(frame.loc[frame["metric"] == "train/loss"])
    assert np.isfinite(wall).all() and (np.diff(wall) >= 0).all() and abs(wall[0] - __import__("time").time()) < 3600


def test_run_info_config_summary_exit(wb_runs: dict[str, Path]) -> None:
    info = run_info(load(wb_runs["nan151"]))
    assert (info.max_steps, info.logging_steps, info.eval_steps, info.save_steps) == (200, 1, 25, 50)
    assert info.config["max_grad_norm"] == 1.0 and info.config["wandb"]["id"] == "nan151"
    assert info.summary["train_runtime"] == 3.25 and info.summary["train/global_step"] == 200
    assert (info.exit_code, info.finished) == (0, True) and not info.damage
    bad = run_info(load(wb_runs["exit1"]))
    assert (bad.exit_code, bad.finished) == (1, True)
    assert any("exited with code 1" in n for n in bad.notes)


def test_debug_logs_are_not_console_logs(wb_runs: dict[str, Path]) -> None:
    (run,) = find_runs(wb_runs["nan151"].parent.parent)  # the dir holding wandb/
    assert [p.name for p in run.files["wandb"]] == [_log_file(wb_runs["nan151"]).name]
    assert "console" not in run.files  # logs/debug*.log and the wandb/debug*.log links are W&B's own


# --- damage ------------------------------------------------------------------------------------


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return _log_file(dst)


def test_truncated_file_salvages_the_head(wb_runs: dict[str, Path], tmp_path: Path) -> None:
    full = load(wb_runs["nan151"])
    log = _copy_run(wb_runs["nan151"], tmp_path / "offline-run-20250101_000000-cut")
    data = log.read_bytes()
    cut = len(data) * 2 // 3 + 5  # mid-record
    log.write_bytes(data[:cut])
    frame = load(log.parent)
    info = run_info(frame)
    assert info.finished is False and info.exit_code is None  # no exit record: killed or crashed
    (dmg,) = info.damage
    assert dmg.offset is not None and 0 < dmg.offset < cut and "truncated" in dmg.problem
    loss, ref = series(frame, "train/loss"), series(full, "train/loss")
    assert 50 < len(loss) < len(ref)
    pd.testing.assert_series_equal(loss, ref.loc[loss.index])


def test_crc_flip_skips_one_block(wb_runs: dict[str, Path], tmp_path: Path) -> None:
    full = series(load(wb_runs["nan151"]), "train/loss")
    log = _copy_run(wb_runs["nan151"], tmp_path / "offline-run-20250101_000000-flip")
    data = bytearray(log.read_bytes())
    assert len(data) > 2 * BLOCK_SIZE
    data[BLOCK_SIZE + 1000] ^= 0xFF
    log.write_bytes(bytes(data))
    frame = load(log.parent)
    info = run_info(frame)
    (dmg,) = info.damage
    assert "CRC mismatch" in dmg.problem and BLOCK_SIZE <= dmg.offset < 2 * BLOCK_SIZE
    loss = series(frame, "train/loss")
    assert loss.index.max() == 200 and 0 < len(full) - len(loss) < 100  # the rest of the file still read
    assert info.finished is True  # the exit record lies after the damage
    pd.testing.assert_series_equal(loss, full.loc[loss.index])


def test_block_padded_file_reads_clean(wb_runs: dict[str, Path], tmp_path: Path) -> None:
    log = _copy_run(wb_runs["nan151"], tmp_path / "offline-run-20250101_000000-pad")
    data = log.read_bytes()
    padded = data + b"\x00" * (-len(data) % BLOCK_SIZE + BLOCK_SIZE)
    log.write_bytes(padded)
    assert read_log(padded).records == read_log(data).records
    info = run_info(load(log.parent))
    assert not info.damage and any("zero bytes of block padding" in n for n in info.notes)


@pytest.mark.parametrize("content", [b"", b"not a wandb file at all", b":W&B\x00\x00\x00" + b"\x01" * 50])
def test_unreadable_file_is_damage_not_traceback(tmp_path: Path, content: bytes) -> None:
    run = tmp_path / "wandb" / "offline-run-20250101_000000-junk"
    run.mkdir(parents=True)
    (run / "run-junk.wandb").write_bytes(content)
    frame = load(run)
    (dmg,) = run_info(frame).damage
    assert dmg.salvaged == "nothing" and dmg.file.endswith("run-junk.wandb")
    from autopsy.analysis import analyze

    assert "source_damaged" in {f.signature for r in analyze(frame).runs for f in r.findings}


# --- real files from older clients ---------------------------------------------------------------


def _real_wandb_files() -> list[Path]:
    return sorted(REAL_LOGS.rglob("*.wandb")) if REAL_LOGS.exists() else []


@pytest.mark.parametrize("path", _real_wandb_files(), ids=lambda p: p.name)
def test_every_real_wandb_file_loads_or_reports(path: Path) -> None:
    frame = read_files("wandb", [path], run="r")
    info = run_info(frame, "r")
    assert len(frame) > 0 or info.damage or info.exit_code is not None or info.notes
    for d in info.damage:
        assert d.file == str(path) and "\n" not in d.problem


def test_real_files_known_contents() -> None:
    needs_shared(REAL_LOGS)
    tlab = REAL_LOGS / "tlab-llm-alignment" / "wandb"
    done = run_info(load(tlab / "run-20241216_113020-wvk49vqj"))
    assert (done.exit_code, done.finished) == (0, True)
    assert done.config["learning_rate"] == 1e-06 and done.logging_steps == 30  # from the run record + config.yaml
    killed = load(tlab / "run-20241216_132720-chk58nkd")
    info = run_info(killed)
    assert info.finished is False and info.exit_code is None  # no exit record (KeyboardInterrupt, padded file)
    loss = series(killed[killed["source"] == "wandb"], "train/loss")  # (output.log is the console importer's)
    assert len(loss) == 27 and loss.iloc[0] == pytest.approx(0.691, abs=0.01) and loss.iloc[-1] == pytest.approx(0.020, abs=0.005)
    assert (np.diff(loss.index) == 30).all()  # steps are HF's global steps, every logging_steps=30
    assert run_info(load(tlab / "run-20241216_135818-xmayk974")).exit_code == 1
    # 0.13.5: a literal NaN in value_json is kept as NaN
    klue = load(REAL_LOGS / "korean-re-klue" / "wandb" / "run-20221125_150848-28b1fgqy")
    assert series(klue, "val_klue_re_auprc").isna().any() and run_info(klue).exit_code == 255
    # 0.10.32: old record types; 11 history rows on W&B's _step axis (227-237), no global step logged
    old = read_files("wandb", sorted((REAL_LOGS / "healthy-data-diet").rglob("*.wandb")), run="old")
    logged = old[~old["metric"].str.startswith("system/")]  # the machine's samples sit on the same steps
    assert logged["step"].min() == 227 and logged["step"].max() == 237 and run_info(old, "old").exit_code == 0
    val = series(old, "eval/accuracy")  # validation_accuracy: the classifier collapsed to the majority class
    assert list(val.index) == [229, 231, 233, 235, 237] and np.allclose(val.to_numpy(), 0.7325892857)
    empty = read_files("wandb", sorted((REAL_LOGS / "cifar-resnet-kang346").rglob("run-i38ys44d.wandb")), run="e")
    assert run_info(empty, "e").damage[0].problem == "empty file (0 bytes)"


def test_synced_dir_without_wandb_file_gives_config_and_summary() -> None:
    needs_shared(REAL_LOGS)
    frame = load(REAL_LOGS / "gemma2b-finetune" / "wandb" / "run-20241104_055320-nmrz2w6w")
    info = run_info(frame)
    assert info.config["learning_rate"] == 0.0003 and "train_runtime" in info.summary


# --- online (no network here: an object of the API's shape) ----------------------------------------


class ApiRunShape:
    """The attributes of ``wandb.apis.public.Run`` that autopsy uses; ``scan_history`` yields one dict
    per logged row holding only the keys logged in it (as the real HistoryScan does)."""

    def __init__(self, rows: list[dict], config: dict, summary: dict, state: str = "finished") -> None:
        self.id, self.name, self.state = "abc123", "fancy-run-7", state
        self.config, self.summary, self._rows = config, summary, rows
        self.page_sizes: list[int] = []

    def scan_history(self, keys=None, page_size=1000, min_step=0, max_step=None):
        self.page_sizes.append(page_size)
        for i, row in enumerate(self._rows):
            yield {"_step": i, "_runtime": 0.1 * i, "_timestamp": 1.7e9 + i, **row}


def test_from_api_run_scans_unsampled_history() -> None:
    rows = nan151_rows()
    rows[10]["train/epoch"] = "NaN"  # the API may hand non-finite values back as strings
    obj = ApiRunShape(rows, {"max_steps": {"value": 200}, "eval_steps": 25, "_wandb": {}}, {"train_runtime": 9.0, "_step": 207})
    frame = from_api_run(obj)
    info = run_info(frame)
    assert obj.page_sizes and info.name == "fancy-run-7" and info.max_steps == 200 and info.eval_steps == 25
    assert info.summary == {"train_runtime": 9.0} and info.finished is True
    grad = series(frame, "train/grad_norm")
    assert len(grad) == 200 and grad.loc[151:].isna().all() and grad.loc[:150].notna().all()
    assert list(series(frame, "eval/loss").index) == list(range(25, 201, 25))
    assert np.isnan(series(frame, "train/epoch").loc[11])


def test_unreachable_api_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(AutopsyError) as err:
        load("wandb:/ent/proj/abc123")  # as a CLI Path leaves it
    assert "ent/proj/abc123" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AutopsyError, match="wandb://entity/project/run_id"):
        load("wandb://only-two/parts")


# --- exports -----------------------------------------------------------------------------------


def test_parquet_history_export(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = nan151_rows()
    rows = [{"_step": i, "_timestamp": 1.7e9 + i, **r} for i, r in enumerate(rows)]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({k: pa.array([r.get(k) for r in rows], type=pa.float64()) for k in keys})  # absent -> null
    pq.write_table(table, tmp_path / "run-abc-history.parquet")
    frame = read_files("wandb_export", [tmp_path / "run-abc-history.parquet"], run="abc")
    grad, ev = series(frame, "train/grad_norm"), series(frame, "eval/loss")
    assert len(grad) == 200 and grad.loc[151:].isna().all() and grad.loc[:150].notna().all()
    assert list(ev.index) == list(range(25, 201, 25))  # nulls (not logged) dropped, NaN (logged) kept
    assert np.isnan(ev.loc[175])


def test_ui_csv_export_takes_plain_columns(tmp_path: Path) -> None:
    steps = np.arange(0, 50)
    loss = 2.0 - steps / 50
    csv = pd.DataFrame({"Step": steps, "run-a - train/loss": loss, "run-a - train/loss__MIN": loss - 1,
                        "run-a - train/loss__MAX": loss + 1})
    text = csv.to_csv(index=False).splitlines()
    text[11] = "10,NaN,NaN,NaN"  # a NaN the UI wrote
    text[21] = "20,,,"  # not logged at that step
    (tmp_path / "export.csv").write_text("\n".join(text) + "\n")
    frame = read_files("wandb_export", [tmp_path / "export.csv"], run="export")
    s = series(frame, "train/loss")
    assert len(s) == 49 and 20 not in s.index and np.isnan(s.loc[10])
    assert s.loc[30] == pytest.approx(2.0 - 30 / 50)  # the plain column, not __MIN/__MAX
    # several runs in one export: one run each
    csv2 = pd.DataFrame({"Step": steps, "a - train/loss": loss, "b - train/loss": loss * 2})
    csv2.to_csv(tmp_path / "two.csv", index=False)
    two = read_files("wandb_export", [tmp_path / "two.csv"], run="two")
    assert set(two["run"]) == {"a", "b"} and set(catalog(two)) >= {"a", "b"}
    # a CSV that is not a metrics export is noted, not an error
    (tmp_path / "data.csv").write_text("text,label\nhello,1\n")
    other = read_files("wandb_export", [tmp_path / "data.csv"], run="d")
    assert other.empty and "not a metrics export" in run_info(other, "d").notes[0]


# --- a real HF Trainer with report_to=["wandb"] ----------------------------------------------------


@pytest.fixture(scope="module")
def hf_wandb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real HF Trainer (tiny Llama, CPU) logging through its WandbCallback, offline; inf planted
    after step 30. In a subprocess, so that wandb's global state stays out of the test process."""
    import os

    from helpers.paths import FIXTURES

    base = tmp_path_factory.mktemp("hfwandb")
    code = ("import sys, tinyllama; tinyllama.train(sys.argv[1], max_steps=40, learning_rate=5e-4, plant_inf_at=30, "
            "eval_steps=10, save_steps=100, logging_steps=1, report_to=('wandb',))")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(base),
           "PYTHONPATH": str(FIXTURES), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(base / "out")], cwd=base, env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = (base / "wandb").glob("offline-run-*")
    return run_dir


@pytest.mark.torch
@pytest.mark.slow
def test_real_trainer_wandb_callback(hf_wandb_run: Path) -> None:
    frame = read_files("wandb", [_log_file(hf_wandb_run)], run="hf")
    info = run_info(frame, "hf")
    assert info.max_steps == 40 and info.eval_steps == 10 and info.config["logging_nan_inf_filter"] is True
    assert (info.exit_code, info.finished) == (0, True) and "train_runtime" in info.summary
    grad, loss = series(frame, "train/grad_norm"), series(frame, "train/loss")
    assert list(grad.index) == list(range(1, 41))  # global steps, although eval rows pushed _step to 44
    assert grad.loc[:30].notna().all() and grad.loc[31:].isna().all()
    assert (loss.loc[31:] == 0.0).all() and (loss.loc[:30] > 1).all()
    assert list(series(frame, "eval/loss").index) == [10, 20, 30, 40]
    from autopsy.analysis import analyze

    found = {f.signature: f.step for r in analyze(frame).runs for f in r.findings}
    assert found["nan_grad_norm"] == 31 and found["loss_zero_collapse"] == 31
