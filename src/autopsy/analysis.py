"""analyze(frame) -> Report: run every applicable detector on every run, collect skips and errors.

The selection (``select``/``ignore``) and the parameters are checked against the registry before any run is
touched, so a typo is a one-line :class:`~autopsy.errors.UsageError`, never a half-made report.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from autopsy._version import __version__
from autopsy.detectors import DetectorSpec, registered
from autopsy.errors import UsageError
from autopsy.findings import Finding, Report, RunReport, Severity
from autopsy.frame import validate_frame
from autopsy.postprocess import postprocess
from autopsy.runinfo import RunInfo, catalog, runs_of
from autopsy.series import metric_names
from autopsy.signatures import SIGNATURES

__all__ = ["Plan", "analyze", "analyze_run", "make_plan", "split_runs"]


@dataclass(frozen=True)
class Plan:
    """Which detectors run, which of their signatures are kept, and with which parameters (checked)."""

    detectors: tuple[tuple[DetectorSpec, tuple[str, ...], dict[str, Any]], ...]
    keep_damage: bool = True


def _wanted(spec: DetectorSpec, select: set[str] | None, ignore: set[str]) -> tuple[str, ...] | None:
    """The signatures of ``spec`` to keep (None = skip the detector entirely)."""
    sigs = [s for s in spec.signatures if s not in ignore]
    if spec.name in ignore or not sigs:
        return None
    if select is not None and spec.name not in select:
        sigs = [s for s in sigs if s in select]
    return tuple(sigs) or None


def _split_params(params: Mapping[str, Any], reg: Mapping[str, DetectorSpec]) -> dict[str, dict[str, Any]]:
    """``{"detector.param": v}``, ``{"detector": {"param": v}}`` or ``{"param": v}`` (every detector that has it),
    checked against the registry and converted to the parameters' annotated types."""
    raw: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and key in reg:
            raw.setdefault(key, {}).update(value)
        elif "." in key:
            det, _, name = key.partition(".")
            if det not in reg:
                raise UsageError(f"unknown detector {det!r} in parameter {key!r}; `autopsy detectors` lists them")
            raw.setdefault(det, {})[name] = value
        else:
            owners = [spec.name for spec in reg.values() if key in spec.params]
            if not owners:
                raise UsageError(f"no detector has a parameter {key!r}; name it as DETECTOR.PARAM")
            for det in owners:
                raw.setdefault(det, {})[key] = value
    return {det: reg[det].check_params(values) for det, values in raw.items()}


def make_plan(
    select: Iterable[str] | None = None, ignore: Iterable[str] | None = None, params: Mapping[str, Any] | None = None
) -> Plan:
    """Check the selection and parameters against the registry; a :class:`UsageError` names what is wrong."""
    reg = registered()
    sel = set(select) if select else None
    ign = set(ignore or ())
    known = set(reg) | set(SIGNATURES)
    for name in (sel or set()) | ign:
        if name not in known:
            raise UsageError(
                f"unknown signature or detector {name!r} in --select/--ignore; `autopsy detectors` lists them"
            )
    checked = _split_params(params or {}, reg)
    chosen = []
    for spec in reg.values():
        sigs = _wanted(spec, sel, ign)
        if sigs is not None:
            chosen.append((spec, sigs, checked.get(spec.name, {})))
    keep_damage = (sel is None or "source_damaged" in sel) and "source_damaged" not in ign
    return Plan(detectors=tuple(chosen), keep_damage=keep_damage)


def _damage_findings(info: RunInfo) -> list[Finding]:
    out = []
    for d in info.damage:
        where = f" at offset {d.offset}" if d.offset is not None and f"offset {d.offset}" not in d.problem else ""
        out.append(
            Finding(
                signature="source_damaged",
                severity=Severity.WARNING,
                summary=f"{os.path.basename(d.file)}: {d.problem}{where}; salvaged {d.salvaged or 'nothing'}",
                evidence={"file": d.file, "offset": d.offset, "problem": d.problem, "salvaged": d.salvaged},
                cause="the file was cut off or corrupted (a crash or kill mid-write, a partial copy)",
                fix="the diagnosis uses what was read; recover the file from the job's storage if the lost part matters",
                detector="importer",
            )
        )
    return out


def analyze_run(frame: pd.DataFrame, info: RunInfo, plan: Plan | None = None) -> RunReport:
    """Run the planned detectors on the frame of one run."""
    plan = plan or make_plan()
    report = RunReport(
        run=info.name, path=info.path, sources=list(info.sources), config=dict(info.config), frame=frame, info=info
    )
    metrics = metric_names(frame)
    findings: list[Finding] = []
    for spec, sigs, params in plan.detectors:
        missing = spec.missing(metrics)
        if missing:
            report.skipped.append({"detector": spec.name, "reason": f"no {', '.join(missing)} in this run"})
            continue
        outcome = spec.run(frame, info, params)
        report.errors.extend({"detector": spec.name, "error": e} for e in outcome.errors)
        findings.extend(f for f in outcome.findings if f.signature in sigs)
    if plan.keep_damage:
        findings.extend(_damage_findings(info))
    for f in findings:
        f.run = info.name
    report.findings = postprocess(findings)
    return report


def split_runs(frame: pd.DataFrame) -> Iterator[tuple[pd.DataFrame, RunInfo]]:
    """Each run of a frame with its :class:`RunInfo`, in order of appearance; one grouping pass for all runs."""
    cat = catalog(frame)
    names = runs_of(frame)
    if len(names) == 1:
        yield frame, cat.get(names[0]) or RunInfo(name=names[0])  # no per-run take of a 10M-row frame
        return
    positions = frame.groupby("run", observed=True, sort=False).indices if len(frame) else {}
    for name in names:
        pos = positions.get(name)
        sub = frame.take(pos) if pos is not None else frame.iloc[np.empty(0, dtype=np.int64)]
        yield sub, cat.get(name) or RunInfo(name=name)


def analyze(
    data: pd.DataFrame | str | os.PathLike[str],
    *,
    select: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Report:
    """Diagnose every run of a frame (or of a path, loaded with :func:`autopsy.load`).

    ``select``/``ignore`` take signature ids or detector names; ``params`` overrides detector
    parameters (``{"clip_saturation.share": 0.7}``).
    """
    plan = make_plan(select, ignore, params)
    if not isinstance(data, pd.DataFrame):
        from autopsy.importers import load

        data = load(data)
    frame = validate_frame(data)
    return Report(runs=[analyze_run(sub, info, plan) for sub, info in split_runs(frame)], version=__version__)
