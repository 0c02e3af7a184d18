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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy.checkpoints import checkpoint_step
from autopsy.frame import make_frame, text_categories
from autopsy.importers._base import Imported, ReadOptions
from autopsy.importers._tb_events import EventFile, read_event_file
from autopsy.importers.run_config import model_summary
from autopsy.metrics import canonical_metric
from autopsy.runinfo import RunInfo

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
    - Keras' ``<log_dir>/train/`` and ``<log_dir>/validation/`` (``.v2`` files, a ``.profile-empty`` one) are
      one run, ``<log_dir>``;
    - any other dir (a flat ``logs/`` shared by several launches): one file, one run, unless the
      dir holds a single event file.
    """

    dirs = {f.parent for f in files}

    def own_dir(f: Path) -> Path:
        d = f.parent
        if _keras_side(d, dirs) is not None and d.parent != base.parent:
            return d.parent  # Keras' TensorBoard callback: <log_dir>/train and <log_dir>/validation are one run
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
    roots = set(out.values())  # a set: this loop stays linear in the number of files
    for f, root in list(out.items()):
        if root == own_dir(f) and f.parent != root and root not in roots:
            siblings = sorted(g for g in by_dir[root] if g.parent == root)
            if siblings:
                out[f] = out[siblings[0]]
    return out


def _keras_side(d: Path, dirs: set[Path] | None = None) -> str | None:
    """``"train"`` or ``"validation"`` for a dir of Keras' layout (both sides hold event files), else None."""
    if d.name not in _KERAS_SIDES:
        return None
    other = d.parent / ("validation" if d.name == "train" else "train")
    if dirs is not None:
        return d.name if other in dirs else None
    try:
        return d.name if any("tfevents" in p.name for p in other.iterdir()) else None
    except OSError:
        return None


def _tag_names(path: Path, ef: EventFile) -> tuple[list[str], dict[str, str]]:
    """The rows' raw names of one file and the canonical name of those that are not named by their tag alone:
    Keras' ``epoch_<m>`` is ``train/<m>`` in ``train/`` and ``eval/<m>`` in ``validation/``, where its raw name
    says the side (``validation/epoch_loss``)."""
    side = _keras_side(path.parent)
    if side is None:
        return ef.tag_names, {}
    prefix = "validation/" if side == "validation" else ""
    names = [prefix + t for t in ef.tag_names]
    canon = {}
    for raw, tag in zip(names, ef.tag_names):
        if tag.startswith("epoch_") and len(tag) > 6:
            canon[raw] = canonical_metric(("eval_" if prefix else "") + tag[6:], hf_flat=True)
    return names, canon


def _end_of_run(info: RunInfo, tags: list[str], code: np.ndarray, value: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The summary entries into ``info.summary``; returns which rows are series. HF logs ``train/train_loss`` and
    ``train/total_flos`` once, when train() returns: that is the final record. ``train/train_runtime`` alone proves
    nothing (with ``include_num_input_tokens_seen=True`` HF logs it with every train log)."""
    is_summary = np.array([t in _SUMMARY_TAGS for t in tags] + [False], dtype=bool)[:-1]
    if not len(code) or not is_summary.any():
        return np.ones(len(code), dtype=bool)
    summary = is_summary[code]
    final = np.array([_SUMMARY_TAGS.get(t) in ("train_loss", "total_flos") for t in tags] + [False], dtype=bool)[:-1]
    last_final = np.flatnonzero(final[code])
    if len(last_final):
        at = int(step[last_final[-1]])
        for c, v, s in zip(code[summary].tolist(), value[summary].tolist(), step[summary].tolist()):
            if s == at:
                info.summary[_SUMMARY_TAGS[tags[c]]] = v  # the last one written wins
        info.finished = True
        planned = info.config.get("max_steps")
        if isinstance(planned, int) and not isinstance(planned, bool) and 0 < at < planned:
            info.notes.append(f"tensorboard: train() returned at step {at} of max_steps {planned}")
    return ~summary


_KERAS_SIDES = ("train", "validation")


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read the event files of one run into a canonical frame (``source="tensorboard"``)."""
    info = RunInfo(name=run, sources=[SOURCE])
    codes, steps, values, walls = [], [], [], []
    names: dict[str, int] = {}  # every tag of the run -> its code
    canonical: dict[str, str] = {}  # raw names whose canonical name is not canonical_metric(raw)
    hf_args = False
    for path in sorted((Path(p) for p in paths), key=_write_order):
        ef = read_event_file(path, engine=(options or ReadOptions()).engine)
        info.files.append(str(path))
        info.damage.extend(ef.damage)
        if not ef.damage and ef.records <= 1 and not len(ef.tag_code) and not path.name.endswith(".profile-empty"):
            info.notes.append(f"{path}: header only: the writer was opened but logged nothing")
        elif not len(ef.tag_code) and not ef.damage and (ef.texts or ef.hparams):
            info.notes.append(f"{path}: no scalars (only {', '.join(sorted(ef.texts) or ['hparams'])})")
        if ef.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(ef.skipped.items()))
            info.notes.append(f"{path}: values not read as scalars: {kinds}")
        hf_args |= _apply_texts(info, ef)
        tag_names, canon = _tag_names(path, ef)
        canonical.update(canon)
        remap = np.array([names.setdefault(t, len(names)) for t in tag_names] + [0], dtype=np.int64)[:-1]
        codes.append(remap[ef.tag_code] if len(ef.tag_code) else np.empty(0, dtype=np.int64))
        steps.append(ef.step)
        values.append(ef.value)
        walls.append(ef.wall_time)
    code = np.concatenate(codes) if codes else np.empty(0, dtype=np.int64)
    step = np.concatenate(steps) if steps else np.empty(0, dtype=np.int64)
    value = np.concatenate(values) if values else np.empty(0, dtype=np.float64)
    wall = np.concatenate(walls) if walls else np.empty(0, dtype=np.float64)
    tags = list(names)
    keep = _end_of_run(info, tags, code, value, step)
    if not keep.all():
        code, step, value, wall = code[keep], step[keep], value[keep], wall[keep]
    if len(code):
        new = _first_seen(code, len(tags))  # categories in order of first appearance, none unused
        raw_names = [t for t, c in sorted(((t, int(c)) for t, c in zip(tags, new) if c >= 0), key=lambda x: x[1])]
        code = new[code]
        metric_codes, metric_names = pd.factorize(
            np.array([canonical.get(t) or canonical_metric(t) for t in raw_names] + [""], dtype=object)[:-1]
        )
        metric = pd.Categorical.from_codes(
            np.asarray(metric_codes, dtype=np.int64)[code], categories=text_categories([str(m) for m in metric_names])
        )
        raw = pd.Categorical.from_codes(code, categories=text_categories(raw_names))
    else:
        metric, raw = [], np.empty(0, dtype=object)
    frame = make_frame(run=run, source=SOURCE, metric=metric, step=step, value=value, wall_time=wall, raw_metric=raw)
    if len(frame):
        info.global_step = int(frame.loc[~frame["superseded"], "step"].max())
    if info.finished is None and hf_args and len(frame):
        info.finished = False  # HF's callback logs train_loss and total_flos when train() returns
    return Imported.one(frame, info)
