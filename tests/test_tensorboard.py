"""The TensorBoard importer: real event files, tbparse as the oracle, damage salvage, HF layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import autopsy
from autopsy.frame import wall_seconds
from autopsy.importers import read_files
from autopsy.importers._tfrecord import crc32c_many, scan
from autopsy.importers.discover import find_runs
from autopsy.importers.tensorboard import read_event_file
from autopsy.runinfo import catalog, run_info
from autopsy.series import series
from helpers.paths import REAL_LOGS, REPO, needs_shared
from helpers.tb import HF_ARGS, HF_MODEL, loss_at, write_hf_run, write_tensor_scalars

pytest.importorskip("tbparse")
pytest.importorskip("torch")


@pytest.fixture(scope="session")
def hf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_run(tmp_path_factory.mktemp("tb") / "out" / "runs" / "Jan01_00-00-00_host", tensors=True)


def _tbparse_rows(path: Path) -> pd.DataFrame:
    import tbparse

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = tbparse.SummaryReader(str(path), pivot=False, extra_columns={"wall_time"})
        scalars, tensors = reader.scalars, reader.tensors
    t = tensors[["step", "tag", "value", "wall_time"]].copy()
    t["value"] = t["value"].map(lambda v: float(np.asarray(v).reshape(-1)[0]))
    df = pd.concat([scalars[["step", "tag", "value", "wall_time"]], t], ignore_index=True)
    return df.rename(columns={"tag": "raw_metric"})


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    cols = ["raw_metric", "step", "value", "wall_time"]
    frame = frame.assign(wall_time=wall_seconds(frame))  # autopsy's datetimes, tbparse's float seconds
    return frame[cols].astype({"raw_metric": str}).sort_values(cols[:2] + ["wall_time"], kind="stable").reset_index(drop=True)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = _rows(a), _rows(b)
    assert a["raw_metric"].tolist() == b["raw_metric"].tolist()
    assert a["step"].tolist() == b["step"].tolist()
    assert np.array_equal(a["value"].to_numpy(), b["value"].to_numpy(), equal_nan=True)  # NaN and +-inf included
    assert np.allclose(a["wall_time"].to_numpy(), b["wall_time"].to_numpy(), rtol=0, atol=1e-6)  # ns datetimes


# --- values: the fast engine against tbparse -----------------------------------------------------------


def test_fast_engine_matches_tbparse_oracle(hf_file: Path) -> None:
    fast = read_files("tensorboard", [hf_file], run="r", engine="fast")
    oracle = _tbparse_rows(hf_file)
    _same(fast, oracle)
    v = series(fast, "train/loss")
    assert np.isnan(v[17]) and v[23] == np.inf and v[40] == 0.0
    assert series(fast, "train/grad_norm")[29] == -np.inf
    assert v[0] == pytest.approx(loss_at(0), rel=1e-6)  # step 0 (no step field in the event) is read
    assert fast.loc[fast["raw_metric"] == "train/big_step", "step"].tolist() == [2**40]
    assert (wall_seconds(fast) > 1e9).all() and (wall_seconds(fast) < 1e10).all()
    assert (fast["source"] == "tensorboard").all()


def test_tbparse_engine_gives_identical_rows(hf_file: Path) -> None:
    fast = read_files("tensorboard", [hf_file], run="r", engine="fast")
    slow = read_files("tensorboard", [hf_file], run="r", engine="tbparse")
    _same(fast, slow)
    assert run_info(fast).config == run_info(slow).config


def test_scalar_tensors_of_every_encoding(tmp_path: Path) -> None:
    path, expected = write_tensor_scalars(tmp_path / "t")
    frame = read_files("tensorboard", [path], run="t")
    for tag, value in expected.items():
        got = frame.loc[frame["raw_metric"] == tag, "value"].to_numpy()
        assert len(got) == 2
        assert np.allclose(got, value, equal_nan=True, rtol=1e-6), tag
    # not compared with tbparse here: its tensor decoder raises on int tensors with tensorboard 2.21
    # (tensorflow_stub.dtypes has no int4); float tensors are compared in the first test


def test_text_summaries_become_config(hf_file: Path) -> None:
    info = run_info(read_files("tensorboard", [hf_file], run="r"))
    for key, value in HF_ARGS.items():
        assert info.config[key] == value
    assert info.config["model"]["vocab_size"] == HF_MODEL["vocab_size"]
    assert "rope_theta" not in info.config["model"]  # only the model keys worth carrying


def test_load_fills_schedule_from_args(hf_file: Path) -> None:
    info = run_info(autopsy.load(hf_file.parents[2]))
    assert (info.max_steps, info.logging_steps, info.eval_steps, info.save_steps) == (40, 1, 10, 20)
    assert info.sources == ["tensorboard"]


def test_crc_matches_google_crc32c() -> None:
    import google_crc32c

    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 50_000, dtype=np.uint8)
    lengths = np.concatenate([np.arange(0, 70), rng.integers(0, 2000, 200)]).astype(np.int64)
    starts = rng.integers(0, len(buf) - 2000, len(lengths)).astype(np.int64)
    got = crc32c_many(buf, starts, lengths, buf=buf.tobytes())
    want = [google_crc32c.value(buf[s:s + n].tobytes()) for s, n in zip(starts, lengths)]
    assert got.tolist() == want


def test_crc_word_tables_match_google_crc32c(monkeypatch: pytest.MonkeyPatch) -> None:
    import google_crc32c

    import autopsy._optional

    rng = np.random.default_rng(1)
    buf = rng.integers(0, 256, 200_000, dtype=np.uint8)
    # large groups of one length (the numpy word tables), odd and even, and a few long ranges (C or byte tables)
    lengths = np.concatenate([np.full(300, 41), np.full(300, 42), np.full(200, 0), np.full(150, 255),
                              rng.integers(256, 3000, 20)]).astype(np.int64)
    starts = rng.integers(0, len(buf) - 3000, len(lengths)).astype(np.int64)
    starts[:5] = 0  # an odd length at offset 0 cannot read the byte before it
    want = [google_crc32c.value(buf[s:s + n].tobytes()) for s, n in zip(starts, lengths)]
    assert crc32c_many(buf, starts, lengths, buf=buf.tobytes()).tolist() == want
    monkeypatch.setattr(autopsy._optional, "available", lambda name: name != "google_crc32c")
    assert crc32c_many(buf, starts, lengths).tolist() == want


def _record(data: bytes) -> bytes:
    import struct

    import google_crc32c

    def masked(c: int) -> int:
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    head = struct.pack("<Q", len(data))
    return (head + struct.pack("<I", masked(google_crc32c.value(head))) + data
            + struct.pack("<I", masked(google_crc32c.value(data))))


def _reference_scan(buf: bytes) -> tuple[list[int], list[int], int, list[str]]:
    """TFRecord framing one record at a time, as tensorboard reads it: (data starts, lengths, framed, problems)."""
    import struct

    import google_crc32c

    def masked(c: int) -> int:
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    pos, starts, lengths, problems, bad_data = 0, [], [], [], []
    framed = 0
    while pos < len(buf):
        if pos + 12 > len(buf):
            problems.append("truncated record header")
            break
        (n,) = struct.unpack_from("<Q", buf, pos)
        if masked(google_crc32c.value(buf[pos:pos + 8])) != struct.unpack_from("<I", buf, pos + 8)[0]:
            problems.append("length CRC mismatch")
            break
        if pos + 16 + n > len(buf):
            problems.append("truncated last record")
            break
        framed += 1
        data = buf[pos + 12:pos + 12 + n]
        if masked(google_crc32c.value(data)) == struct.unpack_from("<I", buf, pos + 12 + n)[0]:
            starts.append(pos + 12)
            lengths.append(n)
        else:
            bad_data.append(pos)
        pos += 16 + n
    if bad_data:
        problems.insert(0, "data CRC mismatch")
    return starts, lengths, framed, problems


@pytest.mark.parametrize("damage", ["intact", "cut", "flip_data", "flip_length", "trailing_zeros", "trailing_junk"])
def test_vectorised_framing_matches_sequential_reference(damage: str) -> None:
    """Files past the vectorised-framing threshold: zero-length records, lengths whose length CRC starts
    with a zero byte (65, 97: missed by the candidate search), and record data holding header-shaped
    bytes and whole embedded records (stray candidates), intact and damaged."""
    rng = np.random.default_rng(["intact", "cut", "flip_data", "flip_length", "trailing_zeros", "trailing_junk"].index(damage))
    parts, size = [], 0
    while size < 300_000:
        r = rng.random()
        n = 0 if r < 0.05 else int(rng.choice([65, 97])) if r < 0.15 else int(rng.integers(1, 300))
        data = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        if n > 60 and rng.random() < 0.3:
            inner = _record(b"xy") + _record(bytes(3))  # a chained pair of real records inside the data
            k = int(rng.integers(0, n - len(inner)))
            data[k:k + len(inner)] = inner
        parts.append(_record(bytes(data)))
        size += len(parts[-1])
    buf = bytearray(b"".join(parts))
    if damage == "cut":
        buf = buf[:-5]
    elif damage in ("flip_data", "flip_length"):
        rec = scan(bytes(buf))
        k = len(rec.data_start) // 2
        while rec.length[k] == 0:
            k += 1
        buf[int(rec.data_start[k]) + (0 if damage == "flip_data" else -12)] ^= 0x20
    elif damage == "trailing_zeros":
        buf += bytes(1000)
    elif damage == "trailing_junk":
        buf += bytes(range(256)) * 4
    buf = bytes(buf)
    got = scan(buf)
    starts, lengths, framed, problems = _reference_scan(buf)
    assert got.data_start.tolist() == starts and got.length.tolist() == lengths
    assert got.framed == framed
    assert [p.problem.split(":")[0].split(" in ")[0] for p in got.problems] == problems


def test_fast_decode_edge_shapes_match_tbparse(tmp_path: Path) -> None:
    """One-character and long tags (past the word matrix; past a one-byte length: protobuf), negative
    and huge steps, in a file large enough for the vectorised framing."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path))
    for step in range(3000):
        w.add_scalar("a", step * 0.5, step)
        w.add_scalar("train/" + "x" * 70, float(step), step)
        w.add_scalar("eval/" + "y" * 130, -float(step), step)
    w.add_scalar("neg", 1.0, -5)
    w.add_scalar("huge", 2.0, 2**60)
    w.close()
    path = next(tmp_path.glob("events.out.tfevents.*"))
    assert path.stat().st_size > 1 << 16
    import tbparse

    fast = read_files("tensorboard", [path], run="r", engine="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = tbparse.SummaryReader(str(path), pivot=False, extra_columns={"wall_time"}).scalars
    _same(fast, oracle.rename(columns={"tag": "raw_metric"}))
    assert fast.loc[fast["raw_metric"] == "neg", "step"].tolist() == [-5]
    assert fast.loc[fast["raw_metric"] == "huge", "step"].tolist() == [2**60]
    assert list(fast["raw_metric"].cat.categories)[:3] == ["a", "train/" + "x" * 70, "eval/" + "y" * 130]


# --- resumed runs ----------------------------------------------------------------------------------------


def test_resumed_run_two_files_supersede(tmp_path: Path) -> None:
    run_dir = tmp_path / "out" / "runs" / "Jan01_host"
    write_hf_run(run_dir, steps=range(1, 31), texts=False)
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(run_dir))  # the resumed process: from checkpoint 20, other values
    for step in range(21, 41):
        w.add_scalar("train/loss", 100.0 + step, step)
    w.close()
    frame = autopsy.load(tmp_path / "out")
    loss = series(frame, "train/loss")
    assert loss.index.tolist() == list(range(1, 41))
    assert loss[25] == 125.0 and loss[20] == pytest.approx(loss_at(20), rel=1e-6)
    old = frame[(frame["metric"] == "train/loss") & frame["superseded"]]
    assert sorted(old["step"]) == list(range(21, 31))


# --- damage ----------------------------------------------------------------------------------------------


def _copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, dst_dir / src.name))


def test_truncated_last_record_is_salvaged(hf_file: Path, tmp_path: Path) -> None:
    intact = read_files("tensorboard", [hf_file], run="r")
    path = _copy(hf_file, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the crash cut the last record mid-write
    frame = read_files("tensorboard", [path], run="r")
    info = run_info(frame)
    assert len(frame) == len(intact) - 1  # every record but the cut one
    _same(frame, intact.iloc[: len(intact)].loc[lambda f: ~(f["raw_metric"] == "train/big_step")])
    (damage,) = info.damage
    assert "truncated last record" in damage.problem
    assert damage.offset == scan(data).data_start[-1] - 12
    assert damage.file == str(path)


def test_flipped_data_byte_skips_only_that_record(hf_file: Path, tmp_path: Path) -> None:
    data = bytearray(hf_file.read_bytes())
    rec = scan(bytes(data))
    k = len(rec.data_start) // 2
    data[int(rec.data_start[k]) + 3] ^= 0x40  # inside the event: the data CRC fails, the length CRC holds
    path = _copy(hf_file, tmp_path)
    path.write_bytes(bytes(data))
    intact = read_files("tensorboard", [hf_file], run="r")
    frame = read_files("tensorboard", [path], run="r")
    assert len(frame) == len(intact) - 1
    (damage,) = run_info(frame).damage
    assert "data CRC mismatch" in damage.problem and damage.offset == int(rec.data_start[k]) - 12
    for engine in ("tbparse",):  # the reference engine reads the same file without raising
        assert run_info(read_files("tensorboard", [path], run="r", engine=engine), "r").damage


def test_flipped_length_byte_keeps_everything_before(hf_file: Path, tmp_path: Path) -> None:
    data = bytearray(hf_file.read_bytes())
    rec = scan(bytes(data))
    k = len(rec.data_start) // 3
    offset = int(rec.data_start[k]) - 12
    data[offset + 9] ^= 0x01  # the length CRC: the framing after it cannot be trusted
    path = _copy(hf_file, tmp_path)
    path.write_bytes(bytes(data))
    ef = read_event_file(path)
    assert ef.records == k
    (damage,) = ef.damage
    assert damage.offset == offset and "length CRC" in damage.problem


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03", b"not an event file at all" * 10, bytes(range(256)) * 3])
def test_unreadable_files_are_damage_not_crash(tmp_path: Path, content: bytes) -> None:
    run_dir = tmp_path / "logs"
    run_dir.mkdir()
    path = run_dir / "events.out.tfevents.1700000000.host.1.0"
    path.write_bytes(content)
    frame = autopsy.load(run_dir)
    info = run_info(frame)
    assert len(frame) == 0
    assert info.damage and info.damage[0].salvaged == "nothing" and info.damage[0].file == str(path)
    report = autopsy.analyze(frame)
    assert "source_damaged" in {f.signature for r in report.runs for f in r.findings}


def test_unknown_engine_is_a_usage_error(hf_file: Path) -> None:
    with pytest.raises(autopsy.errors.UsageError, match="engine"):
        read_files("tensorboard", [hf_file], run="r", engine="rust")


# --- layouts ---------------------------------------------------------------------------------------------


def test_layouts_flat_logs_hparams_subdir_and_several_runs_dirs(hf_file: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat" / "logs"
    a = _copy(hf_file, flat)
    shutil.copy(hf_file, flat / "events.out.tfevents.1900000000.otherhost.777.0")  # another launch
    assert sorted(len(r.files["tensorboard"]) for r in find_runs(flat)) == [1, 1]  # a shared dir: one file, one run
    out = tmp_path / "out"
    for sub in ("Jan01_a", "Jan02_b"):
        _copy(hf_file, out / "runs" / sub)
    _copy(hf_file, out / "runs" / "Jan01_a" / "1624663416.6366713")  # HF's old hparams subdir
    runs = {r.name: r for r in find_runs(out)}
    assert set(runs) == {"Jan01_a", "Jan02_b"}
    assert len(runs["Jan01_a"].files["tensorboard"]) == 2
    single = tmp_path / "single"
    _copy(hf_file, single / "runs" / "Jan01_a")
    assert [r.root for r in find_runs(single)] == [single]  # HF's one runs/<date_host>: the output dir is the run
    assert a.exists()


# --- acceptance: the committed Trainer run with only its TensorBoard folder ------------------------------


@pytest.fixture(scope="module")
def tb_only_nan_run(nan_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("accept") / "nan-at-31"
    shutil.copytree(nan_run / "runs", out / "runs")
    assert not list(out.rglob("trainer_state.json"))
    return out


def test_acceptance_tensorboard_only_nan_run(tb_only_nan_run: Path) -> None:
    frame = autopsy.load(tb_only_nan_run)
    assert set(frame["source"]) == {"tensorboard"}
    found = {f.signature: f for r in autopsy.analyze(frame).runs for f in r.findings}
    assert found["nan_grad_norm"].step == 31
    assert found["loss_zero_collapse"].step == 31
    info = run_info(frame)
    assert info.max_steps == 60 and info.finished is True and "train_runtime" in info.summary


def test_acceptance_via_cli(tb_only_nan_run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "autopsy", "analyze", str(tb_only_nan_run), "--format", "json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    (run,) = report["runs"]
    steps = {f["signature"]: f["step"] for f in run["findings"]}
    assert steps["nan_grad_norm"] == 31 and steps["loss_zero_collapse"] == 31
    assert run["sources"] == ["tensorboard"]


def test_same_diagnosis_as_trainer_state(nan_run: Path, tb_only_nan_run: Path) -> None:
    ts = autopsy.load(nan_run / "trainer_state.json")
    tb = autopsy.load(tb_only_nan_run)
    for metric in ("train/loss", "train/grad_norm", "eval/loss"):
        a, b = series(ts, metric), series(tb, metric)
        assert a.index.tolist() == b.index.tolist()
        assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, equal_nan=True)  # TB stores float32


# --- every real TensorBoard file -------------------------------------------------------------------------


def _real_files() -> list[Path]:
    return sorted(REAL_LOGS.rglob("*tfevents*")) if REAL_LOGS.exists() else []


def test_every_real_event_file_loads_or_says_why() -> None:
    needs_shared(REAL_LOGS)
    files = _real_files()
    assert len(files) >= 80
    with_scalars = 0
    for path in files:
        ef = read_event_file(path)
        assert ef.records >= 1 or ef.damage, path
        for d in ef.damage:
            assert d.file == str(path) and d.problem
        with_scalars += bool(len(ef.tag))
        assert not np.isnan(ef.wall_time).any()
    assert with_scalars >= 17  # SOURCES.md: 17 files hold real loss curves


@pytest.mark.parametrize("case", ["llms-final-output-runs", "lora-roberta-agnews", "smalltalk-codegen",
                                  "healthy-data-diet", "gemma2b-finetune"])
def test_real_cases_load_and_analyze(case: str) -> None:
    needs_shared(REAL_LOGS / case)
    frame = autopsy.load(REAL_LOGS / case)
    report = autopsy.analyze(frame)
    assert not [e for r in report.runs for e in getattr(r, "errors", [])]
    tb_runs = [i for i in catalog(frame).values() if "tensorboard" in i.sources]
    assert tb_runs
    for info in tb_runs:
        rows = frame[frame["run"] == info.name]
        assert len(rows) or info.notes or info.damage, info.name  # an empty run says why


def test_real_smalltalk_layout() -> None:
    needs_shared(REAL_LOGS / "smalltalk-codegen")
    frame = autopsy.load(REAL_LOGS / "smalltalk-codegen" / "logs")
    runs = catalog(frame)
    assert len(runs) == 11
    header_only = [i for i in runs.values() if any("header only" in n for n in i.notes)]
    assert len(header_only) == 6
    long_run = runs["events.out.tfevents.1691219252.3f29ffe5407e.21810.0"]
    loss = series(frame[frame["run"] == long_run.name], "train/loss")
    assert len(loss) == 29 and loss.index.max() == 2900
    assert long_run.config["model"]["model_type"] == "codegen"


def test_real_llms_final_config_and_curves() -> None:
    needs_shared(REAL_LOGS / "llms-final-output-runs")
    frame = autopsy.load(REAL_LOGS / "llms-final-output-runs")
    name = "Dec07_12-38-05_autodl-container-257040b67c-0bc917ee"
    info = run_info(frame, name)
    assert info.config["learning_rate"] > 0 and info.config["model"]
    ev = series(frame[frame["run"] == name], "eval/loss")
    assert ev.idxmin() == 200 and ev.min() == pytest.approx(1.0518, abs=1e-3)  # SOURCES.md
