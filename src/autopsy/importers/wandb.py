"""Weights & Biases run directories: offline (``wandb/offline-run-*``) and synced (``wandb/run-*``).

* **Run directories** (``wandb/offline-run-<date>-<id>/run-<id>.wandb``, synced ``wandb/run-*/``):
  wandb ships no Python reader for ``.wandb`` files, so the record log is read here
  (:mod:`autopsy.importers._leveldb_log`) and each record decoded with wandb's own
  ``wandb.proto.wandb_internal_pb2.Record``: history rows, config and summary updates, the run
  record and the exit record, and the machine's ``stats`` samples and ``environment``
  (:mod:`autopsy.importers._wandb_system`: ``system/`` metrics on the step axis, the GPU into the config). A synced
  directory's ``files/config.yaml``, ``files/wandb-summary.json`` and ``files/wandb-metadata.json`` are read too
  (config values unwrapped from ``{"value": ...}``).
The public API (``wandb://``) is :mod:`autopsy.importers.wandb_api`'s, history exports
:mod:`autopsy.importers.wandb_export`'s; the three share :mod:`autopsy.importers._wandb_history`. A missing exit
record or a non-zero exit code is kept in the run info and noted: it is evidence of a crash or a kill.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopsy._optional import require
from autopsy.frame import empty_frame, make_frame, wall_seconds
from autopsy.importers._base import Imported, ReadOptions
from autopsy.importers._wandb_history import (
    SOURCE,
    history_frame,
    json_value,
    key_of,
    parse_values,
    plain_summary,
    unwrap,
)
from autopsy.importers._wandb_system import SystemCollector, machine_from_metadata
from autopsy.runinfo import Damage, RunInfo

__all__ = ["KIND", "PRIORITY", "claims", "finalize", "read", "read_wandb_file", "run_roots"]

KIND = "wandb"
PRIORITY = 1  # every logged step, with wall times; after TensorBoard on a tie
MAX_BYTES = 4 << 30  # a .wandb file of more than 4 GiB is read only up to here
RUN_DIR = re.compile(r"^(offline-)?run-\d{8}_\d{6}-\w+$")
_RUN_FILES = ("config.yaml", "wandb-summary.json", "wandb-metadata.json")
_INTERNAL_LOGS = ("debug.log", "debug-internal.log", "debug-core.log", "debug-cli.log")


def _run_dir(path: Path) -> Path | None:
    """``.../wandb/run-<date>-<id>`` or ``offline-run-...`` holding ``path``."""
    return next((p for p in path.parents if RUN_DIR.match(p.name)), None)


def claims(path: Path) -> int:
    """A run's ``.wandb`` record log, its ``files/config.yaml``, ``wandb-summary.json`` and ``wandb-metadata.json``
    (the machine); W&B's own debug logs are known (-1), so that they are never read as the training's console."""
    name, parent = path.name, path.parent
    if name.endswith(".wandb"):
        return 2
    if name in _RUN_FILES and parent.name == "files" and RUN_DIR.match(parent.parent.name):
        return 2
    if name in _INTERNAL_LOGS and (
        parent.name == "wandb" or (parent.name == "logs" and RUN_DIR.match(parent.parent.name))
    ):
        return -1
    return 0


def run_roots(files: list[Path], base: Path) -> dict[Path, Path]:
    """Every file of a W&B run belongs to its run dir."""
    out = {}
    for f in files:
        d = _run_dir(f)
        if d is not None:
            out[f] = d
    return out


def finalize(runs: dict[Path, Any]) -> None:
    """A single W&B run dir at ``<output_dir>/wandb/(offline-)run-*/`` belongs to the run at ``<output_dir>`` (the same
    training logged to trainer_state/TensorBoard and W&B): its files join that run, so the sources merge into one.
    With several W&B runs there, or TensorBoard dirs of several trainings, which one matches is unknown: they stay
    separate runs."""
    by_parent: dict[Path, list[Path]] = {}
    for root, run in runs.items():
        if KIND in run.files and RUN_DIR.match(root.name) and root.parent.name == "wandb":
            by_parent.setdefault(root.parent.parent, []).append(root)
    for out_dir, roots in by_parent.items():
        owner = runs.get(out_dir)
        if owner is None or len(roots) != 1 or not ({"trainer_state", "tensorboard"} & set(owner.files)):
            continue
        if len({p.relative_to(out_dir).parts[:2] for p in owner.files.get("tensorboard", [])}) > 1:
            continue
        for kind, paths in runs.pop(roots[0]).files.items():
            for path in paths:
                owner.add(kind, path)


# --- the .wandb record log -------------------------------------------------------------------


def read_wandb_file(path: Path, *, run: str, info: RunInfo) -> pd.DataFrame:
    """One ``.wandb`` file -> canonical frame; fills ``info`` (config, summary, exit, damage, notes)."""
    pb = require("wandb.proto.wandb_internal_pb2", purpose="read .wandb run files")
    try:
        size = path.stat().st_size
        if size == 0:
            info.damage.append(Damage(file=str(path), offset=0, problem="empty file (0 bytes)", salvaged="nothing"))
            return empty_frame()
        with open(path, "rb") as fh:
            return _read_wandb_stream(fh, path, size, pb, run=run, info=info)
    except OSError as exc:
        info.damage.append(
            Damage(file=str(path), offset=None, problem=f"cannot read: {exc.strerror or exc}", salvaged="nothing")
        )
        return empty_frame()


class _Records:
    """Folds the records of one ``.wandb`` file as they stream by: history cells, config and summary updates, the
    run and exit records, and the machine's samples (:class:`~autopsy.importers._wandb_system.SystemCollector`)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.keys: list[str] = []
        self.vals: list[str] = []
        self.stepnum: list[int] = []
        self.config: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.undecodable = 0
        self.exit_code: int | None = None
        self.has_exit = False
        self.system = SystemCollector()

    def add(self, rec: Any, raw: bytes) -> None:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = len(self.stepnum)
            hist = rec.history
            self.stepnum.append(hist.step.num if hist.HasField("step") else row)
            items = hist.item
            self.rows.extend([row] * len(items))
            self.keys.extend([i.key or ".".join(i.nested_key) for i in items])
            self.vals.extend([i.value_json for i in items])
        elif kind == "stats":
            self.system.add_stats(rec.stats, raw)
        elif kind in ("output_raw", "output"):
            self.system.add_console(getattr(rec, kind).line)
        elif kind == "config":
            _apply_updates(self.config, rec.config.update, rec.config.remove)
        elif kind == "summary":
            _apply_updates(self.summary, rec.summary.update, rec.summary.remove)
        elif kind == "run":
            self._run(rec.run)
        elif kind == "environment":
            self.system.add_environment(rec.environment)
        elif kind == "exit":
            self.has_exit = True
            self.exit_code = int(rec.exit.exit_code)

    def _run(self, r: Any) -> None:
        _apply_updates(self.config, r.config.update, r.config.remove)
        _apply_updates(self.summary, r.summary.update, r.summary.remove)
        meta = {"id": r.run_id, "project": r.project, "entity": r.entity, "name": r.display_name}
        if r.HasField("start_time"):
            meta["start_time"] = r.start_time.seconds + r.start_time.nanos / 1e9
        if r.HasField("telemetry") and r.telemetry.cli_version:
            meta["client"] = r.telemetry.cli_version
        if r.resumed:
            meta["resumed"] = True
        self.meta.update({k: v for k, v in meta.items() if v not in ("", None)})


def _read_wandb_stream(fh: Any, path: Path, size: int, pb: Any, *, run: str, info: RunInfo) -> pd.DataFrame:
    """The records of an open ``.wandb`` file, streamed block by block (memory: the decoded history, not the file)."""
    from autopsy.importers._leveldb_log import LogStream

    try:
        log = LogStream(fh, limit=MAX_BYTES)
    except ValueError as exc:
        info.damage.append(Damage(file=str(path), offset=0, problem=str(exc), salvaged="nothing"))
        return empty_frame()
    if size > MAX_BYTES:
        info.notes.append(f"{path}: read the first {MAX_BYTES} of {size} bytes")
    Record = pb.Record
    got = _Records()
    for raw in log:
        rec = Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # google.protobuf.message.DecodeError and friends: one bad record, not the file
            got.undecodable += 1
            continue
        got.add(rec, raw)
    _note_log(info, path, log, got)
    slot = info.config.setdefault("wandb", {})
    if isinstance(slot, dict):
        slot.update(got.meta)
    for key, value in _decoded(got.config).items():
        if key != "_wandb":
            info.config.setdefault(key, unwrap(value))
    for key, value in plain_summary(_decoded(got.summary)).items():
        info.summary.setdefault(key, value)
    _note_exit(info, path, has_exit=got.has_exit, exit_code=got.exit_code)
    history = empty_frame()
    if got.rows:
        values, keep = parse_values(np.asarray(got.vals, dtype=object))
        history = history_frame(
            np.asarray(got.rows, dtype=np.int64)[keep],
            np.asarray(got.keys, dtype=object)[keep],
            values[keep],
            run=run,
            source=SOURCE,
            info=info,
            fallback_step=np.asarray(got.stepnum, dtype=np.int64),
        )
    clean_end = got.has_exit and got.exit_code == 0 and len(history) > 0
    system = got.system.frame(
        history,
        run=run,
        source=SOURCE,
        info=info,
        start=got.meta.get("start_time"),
        end=float(np.nanmax(wall_seconds(history))) if clean_end else None,
    )
    if len(system) == 0:
        return history
    if len(history) == 0:
        return system
    both = pd.concat([history, system], ignore_index=True)
    cols = ("run", "source", "metric", "step", "value", "wall_time", "raw_metric")
    return make_frame(**{c: both[c].array for c in cols})


def _note_log(info: RunInfo, path: Path, log: Any, got: _Records) -> None:
    """What reading the record log skipped or assumed: undecodable records, damaged blocks, a padded tail, an unknown
    log version."""
    info.notes.extend(f"{path.name}: {note}" for note in getattr(log, "notes", []))
    if got.undecodable:
        info.notes.append(
            f"{path}: {got.undecodable} of {log.n_records} records could not be decoded by this wandb's protobuf; "
            "skipped"
        )
    if log.problems:
        first = log.problems[0][0]
        problems = "; ".join(f"{p} at offset {o}" for o, p in log.problems[:5])
        more = f" (+{len(log.problems) - 5} more)" if len(log.problems) > 5 else ""
        info.damage.append(
            Damage(
                file=str(path),
                offset=first,
                problem=problems + more,
                salvaged=f"{log.n_records} records ({len(got.stepnum)} history rows) read; "
                f"{log.skipped_bytes} bytes skipped",
            )
        )
    if log.padded_tail:
        info.notes.append(
            f"{path}: ends in {log.padded_tail} zero bytes of block padding (the writer was stopped mid-block)"
        )


def _apply_updates(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any] = ()) -> None:
    """Fold config/summary updates; values stay JSON text until the end (:func:`_decoded`): a run's
    summary is rewritten at every step, and only its last value of each key matters."""
    target.update({i.key or ".".join(i.nested_key): i.value_json for i in updates})
    for item in removes:
        target.pop(key_of(item), None)


def _decoded(raw: dict[str, str]) -> dict[str, Any]:
    return {key: json_value(text) for key, text in raw.items()}


def _note_exit(info: RunInfo, path: Path, *, has_exit: bool, exit_code: int | None) -> None:
    if has_exit:
        info.exit_code = exit_code
        info.finished = True
        if exit_code:
            info.notes.append(f"{path.name}: the process exited with code {exit_code} (a crash or an interrupt)")
    else:
        info.finished = False
        info.notes.append(
            f"{path.name}: no exit record: the process was killed or crashed before finishing the W&B run"
        )


def _read_run_files(files_dir: Path, info: RunInfo) -> None:
    """A synced run dir's ``files/config.yaml`` and ``files/wandb-summary.json``."""
    cfg_path = files_dir / "config.yaml"
    if cfg_path.is_file():
        yaml = require("yaml", purpose="read W&B config.yaml")
        try:
            data = (
                yaml.safe_load(cfg_path.read_text(encoding="utf-8", errors="replace"))
                if cfg_path.stat().st_size < (16 << 20)
                else None
            )
        except (OSError, yaml.YAMLError) as exc:
            info.damage.append(
                Damage(
                    file=str(cfg_path),
                    offset=None,
                    problem=f"unreadable YAML: {str(exc).splitlines()[0]}",
                    salvaged="nothing",
                )
            )
            data = None
        if isinstance(data, dict):
            for key, value in data.items():
                if str(key) not in ("_wandb", "wandb_version"):
                    info.config.setdefault(str(key), unwrap(value))
        info.files.append(str(cfg_path))
    if (files_dir / "wandb-metadata.json").is_file():
        machine_from_metadata(files_dir / "wandb-metadata.json", info)
    sum_path = files_dir / "wandb-summary.json"
    if sum_path.is_file():
        try:
            data = (
                json.loads(sum_path.read_text(encoding="utf-8", errors="replace"))
                if sum_path.stat().st_size < (16 << 20)
                else None
            )
        except (OSError, ValueError, RecursionError) as exc:
            info.damage.append(
                Damage(file=str(sum_path), offset=None, problem=f"unreadable JSON: {exc}", salvaged="nothing")
            )
            data = None
        if isinstance(data, dict):
            # the summary file is the final state: it wins over the record log's updates
            info.summary.update(plain_summary(data))
        info.files.append(str(sum_path))


def read(paths: list[Path], *, run: str, options: ReadOptions | None = None) -> Imported:
    """Read a W&B run directory's files (``run-<id>.wandb``, ``files/config.yaml``,
    ``files/wandb-summary.json``) into one canonical frame (``source="wandb"``).

    Damage is salvaged and reported per file in ``RunInfo.damage``; a file from an older client
    whose records this wandb cannot decode is noted, never raised.
    """
    paths = [Path(p) for p in paths]
    info = RunInfo(name=run, sources=[SOURCE])
    frames = []
    logs = sorted(p for p in paths if p.suffix == ".wandb")
    for path in logs:
        info.files.append(str(path))
        frames.append(read_wandb_file(path, run=run, info=info))
    dirs = {p.parent / "files" for p in logs} | {p.parent for p in paths if p.parent.name == "files"}
    for files_dir in sorted(dirs):
        _read_run_files(files_dir, info)
    if not logs:
        info.notes.append("W&B run directory without a .wandb file: config and summary only, no history")
    info.fill_from_config()
    frames = [f for f in frames if len(f)]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else empty_frame())
    if len(frames) > 1:
        frame = make_frame(
            **{c: frame[c].array for c in ("run", "source", "metric", "step", "value", "wall_time", "raw_metric")}
        )
    return Imported.one(frame, info)
