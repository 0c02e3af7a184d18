"""``training_args.bin`` read without torch and without executing the pickle.

Real files are made at test time by the real writer (``torch.save(TrainingArguments)``, as HF's Trainer
does) and the values read back are compared with the object that was saved. The committed fixtures
(and any real file under ``../shared/real-logs``) are compared with a torch-based reference reader
(``torch.load(weights_only=True)`` with inert stubs: the reader this module replaced). Hostile files
(a pickle that calls ``os.system``, zip bombs, deep or self-multiplying pickles) and damaged ones
(truncated, garbage, legacy format) give ``({}, one-line note)``, never an exception.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest

from autopsy.importers import training_args as ta
from autopsy.importers.training_args import read_training_args
from helpers.paths import REAL_LOGS, RUNS

FIXTURE_FILES = sorted(RUNS.glob("*/checkpoint-*/training_args.bin"))
MiB = 2**20


# --------------------------------------------------------------------------------------------------
# helpers


def _save_args(path: Path, cls: Any = None, *, pickle_protocol: int | None = None, **kwargs: Any) -> Any:
    """Build ``cls(**kwargs)`` (TrainingArguments by default; fields this version lacks are dropped), torch.save it."""
    torch = pytest.importorskip("torch")
    if cls is None:
        cls = pytest.importorskip("transformers").TrainingArguments
    names = {f.name for f in dataclasses.fields(cls)}
    args = cls(**{k: v for k, v in kwargs.items() if k in names})
    extra = {} if pickle_protocol is None else {"pickle_protocol": pickle_protocol}
    torch.save(args, str(path), **extra)
    return args


def _expected(args: Any) -> dict[str, Any]:
    """What the reader must return for ``args``: its ``to_dict()`` (enums as values), tokens masked unless None."""
    out = args.to_dict()
    for k in out:
        if k.endswith("_token"):
            out[k] = None if getattr(args, k) is None else f"<{k.upper()}>"
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and bool never equal to int."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _diff(got: dict[str, Any], want: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (got.get(k, "<missing>"), v) for k, v in want.items() if not _same(got.get(k, "<missing>"), v)}


def _torch_zip(path: Path, pkl: bytes, *, name: str = "archive", compression: int = zipfile.ZIP_STORED) -> Path:
    """A torch-style zip (``<name>/data.pkl`` + the small records torch writes) around a crafted pickle."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(f"{name}/data.pkl", pkl)
        zf.writestr(f"{name}/byteorder", "little")
        zf.writestr(f"{name}/version", "3\n")
    return path


def _assert_refused(result: tuple[dict[str, Any], str | None], *words: str) -> str:
    config, note = result
    assert config == {}, config
    assert isinstance(note, str) and note and "\n" not in note, note
    for w in words:
        assert w in note, note
    return note


def _torch_reference(path: Path) -> tuple[dict[str, Any], str | None]:
    """The torch-based reader this module replaced: ``torch.load(weights_only=True)``, allowed names as inert stubs."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    class Inert:
        qualname = "?"

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            obj = object.__new__(cls)
            obj.__dict__["_args"] = args
            return obj

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __setstate__(self, state: Any) -> None:
            if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
                state = state[0]
            if isinstance(state, dict):
                self.__dict__.update(state)

    def plain(v: Any) -> Any:
        if isinstance(v, Inert):
            args = v.__dict__["_args"]
            state = {k: x for k, x in v.__dict__.items() if k != "_args"}
            return plain(args[0]) if not state and len(args) == 1 else {k: plain(x) for k, x in state.items()}
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)

    names = get_unsafe_globals_in_checkpoint(str(path))
    assert all(n.startswith(ta.ALLOWED_PREFIXES) for n in names), names
    stubs = [(type(n.rsplit(".", 1)[-1], (Inert,), {"qualname": n}), n) for n in names]
    with safe_globals(stubs):
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
    config = {k: v for k, v in plain(obj).items() if not k.startswith("_")}
    config["_trainer_args_class"] = type(obj).qualname
    return config, None


class _System:
    """Pickles to ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def real_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training_args.bin: the committed fixture, else one written now."""
    if FIXTURE_FILES:
        return FIXTURE_FILES[-1]
    path = tmp_path_factory.mktemp("real") / "training_args.bin"
    _save_args(path, output_dir=str(path.parent), max_steps=60, report_to="none")
    return path


# --------------------------------------------------------------------------------------------------
# real files, written by the real writer


SETTINGS = {
    # warmup_ratio is gone in transformers 5 (a warmup_steps < 1 is the ratio): each version gets the field it has
    "as-asked": dict(learning_rate=3e-4, fp16=False, bf16=False, max_grad_norm=0.5, warmup_ratio=0.1, warmup_steps=0.1,
                     eval_strategy="steps", eval_steps=7, lr_scheduler_type="cosine", save_strategy="steps",
                     save_steps=14, logging_steps=3, logging_nan_inf_filter=False, per_device_train_batch_size=6,
                     gradient_accumulation_steps=4, optim="adamw_torch", weight_decay=0.01, max_steps=123,
                     num_train_epochs=2.5, report_to="none", use_cpu=True),
    "defaults": dict(report_to="none"),
    "other-enums": dict(eval_strategy="no", save_strategy="epoch", logging_strategy="epoch", optim="adafactor",
                        lr_scheduler_type="constant_with_warmup", debug="underflow_overflow", hub_token="hf_secret",
                        fsdp_config={"min_num_params": 10, "nested": {"xs": [1, 2.5, None, "s"]}}, seed=1234,
                        label_names=["labels", "mask"], report_to="none", use_cpu=True),
}


@pytest.mark.parametrize("protocol", [None, 4], ids=["torch-default-protocol", "protocol-4"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_reads_what_the_real_writer_wrote(tmp_path, setting, protocol):
    path = tmp_path / "training_args.bin"
    args = _save_args(path, output_dir=str(tmp_path), pickle_protocol=protocol, **SETTINGS[setting])
    config, note = read_training_args(path)
    assert note is None
    assert config["_trainer_args_class"] == "transformers.training_args.TrainingArguments"
    assert _diff(config, _expected(args)) == {}
    # the enums come out as their plain values, the numbers as set
    assert config["lr_scheduler_type"] == args.lr_scheduler_type.value and isinstance(config["lr_scheduler_type"], str)
    assert config["eval_strategy"] == args.eval_strategy.value and config["optim"] == args.optim.value
    if setting == "as-asked":
        assert (config["learning_rate"], config["max_grad_norm"], config["eval_steps"]) == (3e-4, 0.5, 7)
        assert config["lr_scheduler_type"] == "cosine" and config["eval_strategy"] == "steps"
        assert config["optim"] == "adamw_torch"
        assert config["fp16"] is False and config["bf16"] is False and config["logging_nan_inf_filter"] is False
        assert config.get("warmup_ratio", config["warmup_steps"]) == 0.1
    if setting == "other-enums":
        assert config["hub_token"] == "<HUB_TOKEN>" and "hf_secret" not in json.dumps(config)
        assert config["debug"] == ["underflow_overflow"] and config["save_strategy"] == "epoch"
    json.dumps(config)  # plain values only


def test_matches_the_torch_based_reader_on_a_written_file(tmp_path):
    """Every field, the non-init ones (accelerate's state, the device) included, as the replaced reader gave them."""
    pytest.importorskip("torch")
    path = tmp_path / "training_args.bin"
    _save_args(path, output_dir=str(tmp_path), **SETTINGS["as-asked"])
    got, want = read_training_args(path), _torch_reference(path)
    assert got[1] is None and _diff(got[0], want[0]) == {} and got[0].keys() == want[0].keys()
    assert got[0]["distributed_state"]["device"] == "cpu" and got[0]["distributed_state"]["distributed_type"] == "NO"


def test_trl_config(tmp_path):
    trl = pytest.importorskip("trl")
    path = tmp_path / "training_args.bin"
    args = _save_args(path, trl.SFTConfig, output_dir=str(tmp_path), learning_rate=2e-5, max_grad_norm=0.3,
                      lr_scheduler_type="cosine", report_to="none", use_cpu=True)
    config, note = read_training_args(path)
    assert note is None
    assert config["_trainer_args_class"] == f"{type(args).__module__}.{type(args).__qualname__}"
    assert config["_trainer_args_class"].startswith("trl.")
    assert _diff(config, {k: v for k, v in _expected(args).items() if not isinstance(v, dict)}) == {}


@pytest.mark.skipif(not FIXTURE_FILES, reason="no committed fixtures/runs/*/checkpoint-*/training_args.bin")
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: f"{p.parts[-3]}/{p.parts[-2]}")
def test_committed_fixtures_match_the_torch_based_reader(path):
    pytest.importorskip("torch")
    got, want = read_training_args(path), _torch_reference(path)
    assert got[1] is None and got[0].keys() == want[0].keys() and _diff(got[0], want[0]) == {}


def test_committed_nan_run_values():
    path = RUNS / "nan-at-31" / "checkpoint-60" / "training_args.bin"
    if not path.exists():
        pytest.skip("fixture absent")
    config, note = read_training_args(path)
    assert note is None
    assert config["learning_rate"] == pytest.approx(5e-4) and config["max_steps"] == 60
    assert config["max_grad_norm"] == 1.0
    assert config["lr_scheduler_type"] == "linear" and config["eval_strategy"] == "steps" and config["eval_steps"] == 10


def test_real_logs_match_the_torch_based_reader():
    files = sorted(REAL_LOGS.rglob("training_args.bin")) if REAL_LOGS.exists() else []
    if not files:
        pytest.skip("no training_args.bin under ../shared/real-logs")
    pytest.importorskip("torch")
    for path in files:
        got, want = read_training_args(path), _torch_reference(path)
        assert got[1] is None and _diff(got[0], want[0]) == {}, path


def test_neither_import_nor_read_imports_torch(real_file):
    """The analyze path stays light: reading the file imports no torch, transformers or accelerate."""
    code = (
        "import json, sys; from pathlib import Path; "
        "from autopsy.importers.training_args import read_training_args; "
        f"config, note = read_training_args(Path({str(real_file)!r})); "
        "print(json.dumps([note, config.get('_trainer_args_class'), "
        "[m for m in ('torch', 'transformers', 'accelerate', 'safetensors') if m in sys.modules]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    note, cls, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert note is None and cls and heavy == []


def test_a_plain_dict_and_a_non_dict(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"learning_rate": 1e-3, "_private": 1, "nested": {"a": (1, 2)}}, str(tmp_path / "d.bin"))
    assert read_training_args(tmp_path / "d.bin") == (
        {"learning_rate": 1e-3, "nested": {"a": [1, 2]}, "_trainer_args_class": "dict"}, None)
    torch.save([1, 2], str(tmp_path / "l.bin"))
    _assert_refused(read_training_args(tmp_path / "l.bin"), "holds list, not TrainingArguments")


def test_emulated_value_types(tmp_path):
    """torch.device, dtypes, OrderedDict, set and protocol 2's bytes: read as plain values, nothing imported."""
    torch = pytest.importorskip("torch")
    from collections import OrderedDict

    value = {"dev": torch.device("cuda", 1), "dtype": torch.bfloat16, "alias": torch.float,
             "od": OrderedDict([("b", 1), ("a", 2)]), "s": {3}, "raw": b"\x00a"}
    torch.save(value, str(tmp_path / "v.bin"))
    config, note = read_training_args(tmp_path / "v.bin")
    assert note is None
    assert config == {"dev": "cuda:1", "dtype": "torch.bfloat16", "alias": "torch.float32", "od": {"b": 1, "a": 2},
                      "s": [3], "raw": str(b"\x00a"), "_trainer_args_class": "dict"}


# --------------------------------------------------------------------------------------------------
# hostile files


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_is_refused_and_never_run(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    pkl = pickle.dumps({"learning_rate": 1e-3, "x": _System(f"echo pwned > {marker}")}, protocol=protocol)
    note = _assert_refused(read_training_args(_torch_zip(tmp_path / "training_args.bin", pkl)), "refused", "system")
    assert "not on the allowlist" in note
    assert not marker.exists(), "the pickle was executed"


def test_the_os_system_payload_is_live(tmp_path):
    """Control: an ordinary unpickle of the same bytes does run the command (so the test above can fail)."""
    marker = tmp_path / "LIVE"
    pickle.loads(pickle.dumps(_System(f"echo pwned > {marker}"), protocol=2))  # the unsafe load autopsy never does
    assert marker.read_text().strip() == "pwned"


def _u(text: str) -> bytes:
    """BINUNICODE ``text``."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def test_hostile_names_inside_an_allowed_object_are_refused(tmp_path):
    """Refused names anywhere (here in a TrainingArguments' state, by GLOBAL and STACK_GLOBAL) refuse the file."""
    pkl = (b"\x80\x02ctransformers.training_args\nTrainingArguments\n)\x81}("  # NEWOBJ, EMPTY_DICT, MARK
           + _u("learning_rate") + b"G" + struct.pack(">d", 1e-3)
           + _u("x") + b"cbuiltins\neval\n" + _u("__import__('os')") + b"\x85R"  # builtins.eval(...)
           + _u("y") + _u("posix") + _u("system") + b"\x93" + _u("id") + b"\x85R"  # STACK_GLOBAL posix.system(...)
           + b"ub.")  # SETITEMS, BUILD, STOP
    note = _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pkl)), "refused", "builtins.eval",
                           "posix.system")
    assert "transformers" not in note


def test_names_are_never_imported(tmp_path):
    """An allowed name is a record, a refused one a refusal: neither module is imported (both do not exist)."""
    allowed = b"\x80\x02ctransformers.autopsy_never_imported\nArgs\nq\x00)\x81}(X\x01\x00\x00\x00aK\x01ub."
    config, note = read_training_args(_torch_zip(tmp_path / "ok.bin", allowed))
    assert note is None and config == {"a": 1, "_trainer_args_class": "transformers.autopsy_never_imported.Args"}
    refused = b"\x80\x02cautopsy_never_imported_either\nf\nq\x00)R."
    _assert_refused(read_training_args(_torch_zip(tmp_path / "no.bin", refused)), "autopsy_never_imported_either.f")
    assert not any(m.startswith(("transformers.autopsy_never", "autopsy_never")) for m in sys.modules)


def test_tensors_are_refused(tmp_path):
    """Tensor storage (persistent ids, torch's rebuild functions) is no config value: refused, torch or not."""
    torch = pytest.importorskip("torch")
    torch.save({"learning_rate": 1e-3, "w": torch.zeros(3)}, str(tmp_path / "t.bin"))
    _assert_refused(read_training_args(tmp_path / "t.bin"), "refused", "torch._utils._rebuild_tensor_v2",
                    "persistent id")


def test_the_hostile_fixture_writer_is_refused(tmp_path):
    """The project's own hostile writer (``exec`` via torch.save): refused and named, as the analyze tests expect."""
    pytest.importorskip("torch")
    from helpers.reliability import make_damaged

    marker = tmp_path / "PWNED"
    make_damaged.write_evil_pickle(tmp_path / "training_args.bin", marker)
    _assert_refused(read_training_args(tmp_path / "training_args.bin"), "refused", "builtins.exec")
    assert not marker.exists()


def _bomb(path: Path, inflated: int, *, declare: int | None = None) -> Path:
    """A torch zip whose data.pkl is ``inflated`` bytes of zeros, deflated (streamed: never held in memory).

    ``declare``: lie about the record's size in both the local and the central header.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=False) as w:
            block = b"\0" * MiB
            for _ in range(inflated // MiB):
                w.write(block)
        zf.writestr("archive/version", "3\n")
    if declare is not None:
        raw = bytearray(path.read_bytes())
        local = raw.index(b"PK\x03\x04")
        central = raw.index(b"PK\x01\x02")
        name = b"archive/data.pkl"
        assert raw[local + 30:local + 30 + len(name)] == name and raw[central + 46:central + 46 + len(name)] == name
        struct.pack_into("<I", raw, local + 22, declare)
        struct.pack_into("<I", raw, central + 24, declare)
        path.write_bytes(bytes(raw))
    return path


def test_zip_bomb_refused_by_its_declared_size_without_inflating(tmp_path, monkeypatch):
    path = _bomb(tmp_path / "training_args.bin", 64 * MiB)
    assert path.stat().st_size < MiB
    opened: list[Any] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or real_open(self, *a, **k))
    _assert_refused(read_training_args(path), "refused", "declares 67,108,864 bytes")
    assert opened == []  # refused on the declared size: the member was never opened, so never inflated


def test_zip_bomb_that_lies_about_its_size_is_never_inflated_past_the_cap(tmp_path, monkeypatch):
    """The header says 512 KiB, the stream inflates to 64 MiB: at most the (patched, 1 MiB) cap is inflated."""
    monkeypatch.setattr(ta, "MAX_PICKLE_BYTES", MiB)
    path = _bomb(tmp_path / "training_args.bin", 64 * MiB, declare=MiB // 2)
    tracemalloc.start()
    try:
        result = read_training_args(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_refused(result)
    assert peak < 8 * MiB, peak  # the cap held: far less than the 64 MiB the stream inflates to


def test_pickle_over_the_cap_is_refused(tmp_path, monkeypatch):
    """An honest record one byte over the (patched) cap: refused on its declared size."""
    monkeypatch.setattr(ta, "MAX_PICKLE_BYTES", 1000)
    pkl = pickle.dumps({"x": "y" * 1000}, protocol=2)
    _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pkl)), "refused", "cap 1,000")


def test_oversized_file_is_not_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(ta, "MAX_FILE_BYTES", 100)
    _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pickle.dumps({}, protocol=2))), "too large")


def test_opcode_cap(real_file, monkeypatch):
    monkeypatch.setattr(ta, "MAX_OPCODES", 50)
    _assert_refused(read_training_args(real_file), "refused", "more than 50 pickle opcodes")


def test_deep_nesting_is_refused(tmp_path):
    value: Any = 1
    for _ in range(ta.MAX_DEPTH + 5):
        value = [value]
    pkl = pickle.dumps({"x": value}, protocol=2)
    _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pkl)), "refused", "nested deeper")


def test_very_deep_pickle_neither_recurses_nor_crashes(tmp_path):
    """50,000 nested lists built by opcodes (no recursion in the walk), refused by the depth cap."""
    pkl = b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b"."  # EMPTY_LIST x N, APPEND x N-1
    _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pkl)), "refused", "nested deeper")


def test_shared_references_cannot_multiply(tmp_path):
    """A few KB of memo references that would expand to 200**5 values: refused at once, not expanded."""
    value: Any = [0]
    for _ in range(5):
        value = [value] * 200
    pkl = pickle.dumps({"learning_rate": 1e-3, "x": value}, protocol=2)
    assert len(pkl) < 10_000
    _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pkl)), "refused", "values")


def test_nested_containers_keep_their_first_items(tmp_path):
    pkl = pickle.dumps({"xs": list(range(1000)), "d": {str(i): i for i in range(1000)}}, protocol=2)
    config, note = read_training_args(_torch_zip(tmp_path / "t.bin", pkl))
    assert note is None and config["xs"] == list(range(ta.MAX_ITEMS)) and len(config["d"]) == ta.MAX_ITEMS


@pytest.mark.parametrize("pkl", [
    b"\x80\x02\x8a\xff" + b"\x01" * 255 + b".",  # LONG1 of 2,040 bits: no config value
    b"\x80\x02(K\x01K\x02.",  # STOP with a MARK open: the top is an int, not TrainingArguments
    b"\x80\x02K\x01K\x02e.",  # APPENDS without a MARK
    b"\x80\x02}K\x01s.",  # SETITEM on a short stack
    b"\x80\x02}]K\x01s.",  # a list as a dict key
    b"\x80\x02h\x05.",  # memo read before it was written
    b"\x80\x02K\x01}b.",  # BUILD on an int
    b"\x80\x02K\x01)R.",  # REDUCE of an int
    b"\x80\x05\x97.",  # NEXT_BUFFER (out-of-band data)
    b"\x80\x02\xff.",  # not an opcode
    b"\x80\x02.",  # STOP on an empty stack
], ids=["huge-int", "open-mark", "appends-no-mark", "setitem-short", "list-key", "memo-unset", "build-int",
        "reduce-int", "next-buffer", "bad-opcode", "empty-stack"])
def test_malformed_pickles(tmp_path, pkl):
    _assert_refused(read_training_args(_torch_zip(tmp_path / "t.bin", pkl)))


# --------------------------------------------------------------------------------------------------
# damaged and foreign files


def test_truncated_file_at_many_cut_points(real_file, tmp_path):
    data = real_file.read_bytes()
    cuts = sorted({0, 1, 2, 4, 10, 30, 100, len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 22,
                   len(data) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(data[:cut])
        _assert_refused(read_training_args(path))


def test_truncated_pickle_in_a_valid_zip(real_file, tmp_path):
    with zipfile.ZipFile(real_file) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        pkl = zf.read(name)
    for cut in (0, 1, 2, 3, 50, len(pkl) // 2, len(pkl) - 2, len(pkl) - 1):
        _assert_refused(read_training_args(_torch_zip(tmp_path / f"p{cut}.bin", pkl[:cut])))


def test_bit_flips_never_raise(real_file, tmp_path):
    import random

    data = real_file.read_bytes()
    with zipfile.ZipFile(real_file) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    rng = random.Random(0)
    for i in range(200):
        blob = bytearray(pkl if i % 2 else data)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        path = _torch_zip(tmp_path / "f.bin", bytes(blob)) if i % 2 else tmp_path / "f.bin"
        if not i % 2:
            path.write_bytes(bytes(blob))
        config, note = read_training_args(path)
        assert isinstance(config, dict) and (note is None or (config == {} and "\n" not in note))
        json.dumps(config)


@pytest.mark.parametrize("blob", [b"", b"garbage" * 100, b"PK\x03\x04" + b"\0" * 100, os.urandom(4096),
                                  pickle.dumps({"learning_rate": 1.0}, protocol=2)],
                         ids=["empty", "text", "zip-head-only", "random", "bare-pickle"])
def test_garbage(tmp_path, blob):
    path = tmp_path / "training_args.bin"
    path.write_bytes(blob)
    _assert_refused(read_training_args(path))


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "t.bin", "w") as zf:
        zf.writestr("archive/other.pkl", b"\x80\x02}.")
    _assert_refused(read_training_args(tmp_path / "t.bin"), "data.pkl")


def test_legacy_torch_format(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "training_args.bin"
    torch.save({"learning_rate": 1e-3}, str(path), _use_new_zipfile_serialization=False)
    _assert_refused(read_training_args(path), "legacy torch format: not read")


def test_missing_file_and_directory(tmp_path):
    _assert_refused(read_training_args(tmp_path / "absent.bin"), "could not be opened")
    _assert_refused(read_training_args(tmp_path), "could not be opened")


def test_in_memory_zip_writer_matches_torch_layout(real_file):
    """The crafted files above use the layout of the real one: ``<name>/data.pkl`` at the top."""
    with zipfile.ZipFile(real_file) as zf:
        names = zf.namelist()
    assert any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names), names
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}.")
    assert zipfile.ZipFile(buf).namelist() == ["archive/data.pkl"]
