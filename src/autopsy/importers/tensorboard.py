"""TensorBoard event files (``events.out.tfevents.*``), as HF Trainer's TensorBoardCallback writes them.

Scalars come from ``simple_value`` and from scalar tensors (float/double/half/bfloat16/int, in
``tensor_content`` or the ``*_val`` fields). The ``args`` and ``model_config`` text summaries
(JSON) become the run's config; HF's old ``add_hparams`` subdirectory (``_hparams_`` plugin data)
fills keys the args text did not give. HF's end-of-run entries (``train/train_runtime``,
``train/train_loss``, ...) go to the run's summary, not its series.

Engines: ``"fast"`` (default, ``"auto"``) frames records with :mod:`autopsy.importers._tfrecord`
(every CRC verified) and decodes the common one-scalar-per-event shape with numpy, falling back
to tensorboard's protobuf ``Event`` for every other record. ``"tbparse"`` reads values with tbparse
(the reference); damage is then still reported from the framing scan.

Several files of one run are read in write order (the timestamp and index in their names), so a
resumed run's repeated steps are flagged ``superseded`` by :func:`autopsy.frame.make_frame`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy._optional import require
from autopsy.checkpoints import checkpoint_step
from autopsy.errors import UsageError
from autopsy.frame import make_frame
from autopsy.importers._base import ENGINES, Imported, ReadOptions
from autopsy.importers._tb_fast import decode_fast
from autopsy.importers.run_config import model_summary
from autopsy.metrics import canonical_metric
from autopsy.runinfo import Damage, RunInfo

__all__ = ["KIND", "PRIORITY", "claims", "read", "read_event_file", "run_roots"]

KIND = SOURCE = "tensorboard"
PRIORITY = 0  # HF's TensorBoardCallback sees every logged step, with wall times
_HPARAMS_DIR = re.compile(r"^\d{9,11}\.\d+$")  # HF's old add_hparams: <run dir>/<time.time()>/events...
# HF Trainer's final summary entry, logged once at the last step: run totals, not series
_SUMMARY_TAGS = {
    "train/train_runtime": "train_runtime",
    "train/train_samples_per_second": "train_samples_per_second",
    "train/train_steps_per_second": "train_steps_per_second",
    "train/total_flos": "total_flos",
    "train/train_loss": "train_loss",
}
_ARGS_TAGS = ("args/text_summary", "args")
_MODEL_TAGS = ("model_config/text_summary", "model_config")
_NAME = re.compile(r"tfevents\.(?P<ts>\d+)(?:\.(?P<rest>.*?))?(?:\.(?P<idx>\d+))?(?:\.v2)?$")


@dataclass
class EventFile:
    """What one event file holds: scalar rows in write order, texts, hparams, damage, notes."""

    path: Path
    tag_code: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # index into tag_names
    tag_names: list[str] = field(default_factory=list)  # distinct
    step: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    value: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    wall_time: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    texts: dict[str, str] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # value kinds not read (histograms, images, ...)
    damage: list[Damage] = field(default_factory=list)

    @property
    def tag(self) -> np.ndarray:
        """The tag of each row (object array of str)."""
        names = np.array(list(self.tag_names) + [""], dtype=object)[:-1]
        return names[self.tag_code] if len(self.tag_code) else np.empty(0, dtype=object)

    def set_tags(self, tags: Any) -> None:
        """Set the rows' tags from a sequence of str."""
        codes, uniq = pd.factorize(np.asarray(tags, dtype=object)) if len(tags) else (np.empty(0, np.int64), [])
        self.tag_code = np.asarray(codes, dtype=np.int64)
        self.tag_names = [str(u) for u in uniq]


_DT = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    14: "bf16",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}


def _tensor_scalar(t: Any) -> float | None:
    """The value of a one-element numeric TensorProto, or None."""
    size = 1
    for dim in t.tensor_shape.dim:
        size *= dim.size
    if size != 1 or t.dtype not in _DT:
        return None
    code = _DT[t.dtype]
    if t.tensor_content:
        raw = bytes(t.tensor_content)
        if code == "bf16":
            return float(np.frombuffer(raw[:2], dtype="<u2").astype(np.uint32).__lshift__(16).view(np.float32)[0])
        arr = np.frombuffer(raw, dtype=code)
        return float(arr[0]) if arr.size == 1 else None
    if t.dtype in (19, 14):  # half / bfloat16: the bits in half_val
        if not len(t.half_val):
            return None
        bits = int(t.half_val[0]) & 0xFFFF
        if t.dtype == 19:
            return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    for name in ("float_val", "double_val", "int_val", "int64_val", "bool_val", "uint32_val", "uint64_val"):
        vals = getattr(t, name)
        if len(vals):
            return float(vals[0])
    return None


def _hparams(content: bytes) -> dict[str, Any]:
    """The hyperparameters of an ``_hparams_/session_start_info`` (HF's old add_hparams)."""
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2

        data = plugin_data_pb2.HParamsPluginData.FromString(content)
    except Exception:
        return {}
    if not data.HasField("session_start_info"):
        return {}
    out: dict[str, Any] = {}
    for key, v in data.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        if kind == "number_value":
            num = v.number_value
            out[key] = int(num) if num.is_integer() else num
        elif kind == "string_value":
            out[key] = None if v.string_value == "None" else v.string_value
        elif kind == "bool_value":
            out[key] = v.bool_value
    return out


def _decode_protobuf(
    ef: EventFile, buf: bytes, data_start: np.ndarray, length: np.ndarray, records: np.ndarray
) -> dict[str, list]:
    """Decode the records the fast path left with tensorboard's protobuf."""
    event_pb2 = require("tensorboard.compat.proto.event_pb2", purpose="read TensorBoard event files")
    parse = event_pb2.Event.FromString
    cols: dict[str, list] = {"record": [], "tag": [], "step": [], "value": [], "wall_time": []}
    for i in records.tolist():
        s = int(data_start[i])
        try:
            event = parse(buf[s : s + int(length[i])])
        except Exception:
            ef.skipped["undecodable event"] += 1
            continue
        if not event.HasField("summary"):
            continue  # file_version, session_log, graph, ...
        for v in event.summary.value:
            kind = v.WhichOneof("value")
            plugin = v.metadata.plugin_data.plugin_name
            number: float | None = None
            if kind == "simple_value":
                number = v.simple_value
            elif kind == "tensor" and (plugin == "text" or v.tensor.dtype == 7):
                if v.tensor.string_val:
                    ef.texts[v.tag] = bytes(v.tensor.string_val[0]).decode("utf-8", errors="replace")
                continue
            elif kind == "tensor":
                number = _tensor_scalar(v.tensor)
            elif plugin == "hparams":
                if v.tag.endswith("session_start_info"):
                    ef.hparams.update(_hparams(bytes(v.metadata.plugin_data.content)))
                continue
            if number is None:
                ef.skipped[plugin or kind or "empty value"] += 1
                continue
            cols["record"].append(i)
            cols["tag"].append(v.tag)
            cols["step"].append(event.step)
            cols["value"].append(number)
            cols["wall_time"].append(event.wall_time)
    return cols


def _damage(path: Path, problems: list, kept: int) -> list[Damage]:
    """The framing problems of one file as :class:`Damage` entries."""
    out = []
    for p in problems:
        if p.records_lost is not None:
            salvaged = f"{kept} intact record(s); {p.records_lost} skipped"
        else:
            salvaged = f"{kept} record(s) before offset {p.offset}" if kept else "nothing"
        out.append(Damage(file=str(path), offset=p.offset, problem=p.problem, salvaged=salvaged))
    return out


def _read_fast(path: Path, buf: bytes) -> EventFile:
    from autopsy.importers._tfrecord import scan

    ef = EventFile(path=path)
    rec = scan(buf)
    ef.records = len(rec.data_start)
    ef.damage = _damage(path, rec.problems, ef.records)
    if not ef.records:
        return ef
    fast, rest = decode_fast(buf, rec.data_start, rec.length)
    slow = _decode_protobuf(ef, buf, rec.data_start, rec.length, rest) if len(rest) else None
    names = fast["names"]
    code = fast["code"]
    if len(set(names)) < len(names):  # two byte strings decoded to one str (invalid UTF-8 replaced)
        uniq, remap = np.unique(np.array(names, dtype=object), return_inverse=True)
        names, code = [str(u) for u in uniq], remap.reshape(-1)[code]
    if slow and slow["record"]:
        index = {name: i for i, name in enumerate(names)}
        names = list(names)
        slow_code = np.fromiter(
            (index.setdefault(t, len(index)) for t in slow["tag"]), dtype=np.int64, count=len(slow["tag"])
        )
        names.extend(list(index)[len(names) :])
        record = np.concatenate([fast["record"], np.asarray(slow["record"], dtype=np.int64)])
        order = np.argsort(record, kind="stable")  # write order; values of one event stay in order
        ef.tag_code = np.concatenate([code, slow_code])[order]
        ef.step = np.concatenate([fast["step"], np.asarray(slow["step"], dtype=np.int64)])[order]
        ef.value = np.concatenate([fast["value"], np.asarray(slow["value"], dtype=np.float64)])[order]
        ef.wall_time = np.concatenate([fast["wall_time"], np.asarray(slow["wall_time"], dtype=np.float64)])[order]
    else:
        ef.tag_code, ef.step, ef.value, ef.wall_time = code, fast["step"], fast["value"], fast["wall_time"]
    ef.tag_names = list(names)
    return ef


# --- the tbparse engine -----------------------------------------------------------------------------


def _read_tbparse(path: Path, buf: bytes) -> EventFile:
    from autopsy.importers._tfrecord import scan

    tbparse = require("tbparse", purpose="read TensorBoard files with engine='tbparse'")
    ef = EventFile(path=path)
    rec = scan(buf)  # tbparse does not say what it could not read: the framing scan does
    ef.records = len(rec.data_start)
    ef.damage = _damage(path, rec.problems, ef.records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tbparse raises pandas deprecation warnings (Pandas4Warning)
        reader = tbparse.SummaryReader(str(path), pivot=False, extra_columns={"wall_time"})
        scalars = reader.scalars
        try:
            tensors = reader.tensors
        except AttributeError as exc:  # tbparse 0.0.9 + tensorboard 2.21: no dtypes.int4 for int tensors
            tensors = pd.DataFrame()
            ef.skipped[f"scalar tensors tbparse cannot decode ({exc})"] += 1
        text = reader.text
    parts = []
    if len(scalars):
        parts.append(scalars[["step", "tag", "value", "wall_time"]])
    if len(tensors):
        t = tensors[["step", "tag", "value", "wall_time"]].copy()
        is_scalar = t["value"].map(lambda v: np.size(v) == 1 and np.asarray(v).dtype.kind in "fiub")
        t = t[is_scalar]
        t["value"] = t["value"].map(lambda v: float(np.asarray(v).reshape(-1)[0]))
        parts.append(t)
    if parts:
        df = pd.concat(parts, ignore_index=True).sort_values(["wall_time"], kind="stable")
        ef.set_tags(df["tag"].astype(str).to_numpy(dtype=object))
        ef.step = df["step"].to_numpy(dtype=np.int64)
        ef.value = df["value"].to_numpy(dtype=np.float64)
        ef.wall_time = df["wall_time"].to_numpy(dtype=np.float64)
    for tag, value in zip(text.get("tag", []), text.get("value", [])):
        ef.texts[str(tag)] = str(value)
    return ef


# --- one file, one run ----------------------------------------------------------------------------------


def read_event_file(path: str | Path, *, engine: str = "auto") -> EventFile:
    """Read one event file; damage and unreadable files are reported in ``.damage``, never raised."""
    if engine not in ENGINES:
        raise UsageError(f"unknown TensorBoard engine {engine!r}: use one of {', '.join(ENGINES)}")
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        ef = EventFile(path=path)
        ef.damage.append(
            Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing")
        )
        return ef
    if not buf:
        ef = EventFile(path=path)
        ef.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
        return ef
    return _read_tbparse(path, buf) if engine == "tbparse" else _read_fast(path, buf)


def _write_order(path: Path) -> tuple[int, int, str]:
    """Files of one run sort by the creation timestamp and the writer index in their names."""
    m = _NAME.search(path.name)
    if not m:
        return (0, 0, str(path))
    return (int(m.group("ts")), int(m.group("idx") or 0), str(path))


def _json_text(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):  # some writers fence the JSON as markdown
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


def _apply_texts(info: RunInfo, ef: EventFile) -> bool:
    """The args/model_config texts into the config. Returns True when HF's args text was found."""
    found = False
    for tag in _ARGS_TAGS:
        if tag in ef.texts:
            data = _json_text(ef.texts[tag])
            if isinstance(data, dict):
                found = True
                for key, value in data.items():
                    info.config.setdefault(key, value)
            else:
                info.notes.append(f"{ef.path}: the '{tag}' text is not JSON; ignored")
    for tag in _MODEL_TAGS:
        if tag in ef.texts:
            data = _json_text(ef.texts[tag])
            if isinstance(data, dict):
                info.config.setdefault("model", model_summary(data))
    for key, value in ef.hparams.items():
        info.config.setdefault(key, value)
    return found


def _first_seen(codes: np.ndarray, k: int) -> np.ndarray:
    """Relabel ``codes`` (``0..k-1``) in order of first appearance, dropping labels never used.
    Returns the new code of each old label (-1: unused)."""
    first = np.full(k, len(codes), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes), dtype=np.int64)[::-1]
    used = np.flatnonzero(first < len(codes))
    new = np.full(k, -1, dtype=np.int64)
    new[used[np.argsort(first[used], kind="stable")]] = np.arange(len(used), dtype=np.int64)
    return new


def _text_index(names: list[str]) -> pd.Index:
    return pd.Index(np.asarray(names + [""], dtype=object)[:-1].astype(str))


def claims(path: Path) -> int:
    return 2 if "tfevents" in path.name else 0


def run_roots(files: list[Path], base: Path) -> dict[Path, Path]:
    """The run each event file belongs to (TensorBoard layouts).

    - ``<run dir>/<unix time>/events...`` (HF's old hparams subdir) belongs to ``<run dir>``;
    - HF's ``<output_dir>/runs/<date_host>/``: the run is ``<output_dir>`` when ``runs/`` holds one
      such dir, else each ``runs/<x>`` dir is a run of its own (several launches, or custom
      ``logging_dir`` names such as ``runs/run0..4``); the files of one dir are one run, read in
      write order (a resumed or restarted writer);
    - a ``checkpoint-N/`` dir belongs to the output dir above it;
    - any other dir (a flat ``logs/`` shared by several launches): one file, one run, unless the
      dir holds a single event file.
    """

    def own_dir(f: Path) -> Path:
        d = f.parent
        return d.parent if _HPARAMS_DIR.match(d.name) and d != base else d

    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(own_dir(f), []).append(f)
    per_runs_dir: dict[Path, int] = {}
    for d in by_dir:
        if d.parent.name == "runs" and d.parent != base and d.parent.parent.is_relative_to(base):
            per_runs_dir[d.parent] = per_runs_dir.get(d.parent, 0) + 1
    out: dict[Path, Path] = {}
    for d, group in by_dir.items():
        if checkpoint_step(d.name) is not None:
            root = d.parent if d != base else d
            out.update({f: root for f in group})
        elif d.parent in per_runs_dir:
            root = d.parent.parent if per_runs_dir[d.parent] == 1 else d
            out.update({f: root for f in group})
        elif len([f for f in group if f.parent == d]) > 1:
            out.update({f: (f if f.parent == d else own_dir(f)) for f in group})
        else:
            out.update({f: d for f in group})
    # an hparams subdir file whose dir was split per file joins the first file of that dir
    for f, root in list(out.items()):
        if root == own_dir(f) and f.parent != root and root not in out.values():
            siblings = sorted(g for g in by_dir[root] if g.parent == root)
            if siblings:
                out[f] = out[siblings[0]]
    return out


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read the event files of one run into a canonical frame (``source="tensorboard"``)."""
    info = RunInfo(name=run, sources=[SOURCE])
    codes, steps, values, walls = [], [], [], []
    names: dict[str, int] = {}  # every tag of the run -> its code
    hf_args = False
    for path in sorted((Path(p) for p in paths), key=_write_order):
        ef = read_event_file(path, engine=(options or ReadOptions()).engine)
        info.files.append(str(path))
        info.damage.extend(ef.damage)
        if not ef.damage and ef.records <= 1 and not len(ef.tag_code):
            info.notes.append(f"{path}: header only: the writer was opened but logged nothing")
        elif not len(ef.tag_code) and not ef.damage and (ef.texts or ef.hparams):
            info.notes.append(f"{path}: no scalars (only {', '.join(sorted(ef.texts) or ['hparams'])})")
        if ef.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(ef.skipped.items()))
            info.notes.append(f"{path}: values not read as scalars: {kinds}")
        hf_args |= _apply_texts(info, ef)
        remap = np.array([names.setdefault(t, len(names)) for t in ef.tag_names] + [0], dtype=np.int64)[:-1]
        codes.append(remap[ef.tag_code] if len(ef.tag_code) else np.empty(0, dtype=np.int64))
        steps.append(ef.step)
        values.append(ef.value)
        walls.append(ef.wall_time)
    code = np.concatenate(codes) if codes else np.empty(0, dtype=np.int64)
    step = np.concatenate(steps) if steps else np.empty(0, dtype=np.int64)
    value = np.concatenate(values) if values else np.empty(0, dtype=np.float64)
    wall = np.concatenate(walls) if walls else np.empty(0, dtype=np.float64)
    tags = list(names)
    is_summary = np.array([t in _SUMMARY_TAGS for t in tags] + [False], dtype=bool)[:-1]
    if len(code) and is_summary.any():
        summary = is_summary[code]
        if summary.any():
            for c, v in zip(code[summary].tolist(), value[summary].tolist()):
                info.summary[_SUMMARY_TAGS[tags[c]]] = v  # the last one written wins
            keep = ~summary
            code, step, value, wall = code[keep], step[keep], value[keep], wall[keep]
    if len(code):
        new = _first_seen(code, len(tags))  # categories in order of first appearance, none unused
        raw_names = [t for t, c in sorted(((t, int(c)) for t, c in zip(tags, new) if c >= 0), key=lambda x: x[1])]
        code = new[code]
        metric_codes, metric_names = pd.factorize(
            np.array([canonical_metric(t) for t in raw_names] + [""], dtype=object)[:-1]
        )
        metric = pd.Categorical.from_codes(
            np.asarray(metric_codes, dtype=np.int64)[code], categories=_text_index([str(m) for m in metric_names])
        )
        raw = pd.Categorical.from_codes(code, categories=_text_index(raw_names))
    else:
        metric, raw = [], np.empty(0, dtype=object)
    frame = make_frame(run=run, source=SOURCE, metric=metric, step=step, value=value, wall_time=wall, raw_metric=raw)
    if len(frame):
        info.global_step = int(frame.loc[~frame["superseded"], "step"].max())
    if "train_runtime" in info.summary:
        info.finished = True
    elif hf_args and len(frame):
        info.finished = False  # HF's callback logs train_runtime when train() returns
    return Imported.one(frame, info)
