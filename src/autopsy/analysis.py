"""analyze(frame) -> Report: run every applicable detector on every run, collect skips and errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from autopsy.detectors._registry import DetectorSpec, registered
from autopsy.errors import UsageError
from autopsy.findings import Finding, Report, RunReport, Severity
from autopsy.frame import RunInfo, run_info, runs_of, validate_frame

__all__ = ["analyze", "analyze_run"]


def _wanted(spec: DetectorSpec, select: set[str] | None, ignore: set[str]) -> list[str] | None:
    """The signatures of ``spec`` to keep (None = skip the detector entirely)."""
    sigs = [s for s in spec.signatures if s not in ignore]
    if spec.name in ignore or not sigs:
        return None
    if select is not None:
        if spec.name in select:
            return sigs
        sigs = [s for s in sigs if s in select]
        if not sigs:
            return None
    return sigs


def _check_names(names: Iterable[str], what: str) -> None:
    from autopsy.signatures import SIGNATURES

    reg = registered()
    known = set(reg) | set(SIGNATURES) | {s for spec in reg.values() for s in spec.signatures}
    for n in names:
        if n not in known:
            raise UsageError(f"unknown signature or detector {n!r} in {what}; `autopsy detectors` lists them")


def _params_for(spec: DetectorSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Per-detector overrides: {"detector.param": v} or {"detector": {"param": v}} or {"param": v} (any detector)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and key == spec.name:
            out.update(value)
        elif "." in key:
            det, _, name = key.partition(".")
            if det == spec.name:
                out[name] = value
        elif key in spec.params:
            out[key] = value
    unknown = [k for k in out if k not in spec.params]
    if unknown:
        raise UsageError(f"detector {spec.name} has no parameter {unknown[0]!r}; it takes: {', '.join(spec.params) or 'none'}")
    return out


def _damage_findings(info: RunInfo) -> list[Finding]:
    out = []
    for d in info.damage:
        where = f" at offset {d.offset}" if d.offset is not None else ""
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


def analyze_run(
    frame: pd.DataFrame,
    info: RunInfo,
    *,
    select: set[str] | None = None,
    ignore: set[str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> RunReport:
    """Run the detectors on the frame of one run."""
    ignore = ignore or set()
    params = params or {}
    report = RunReport(run=info.name, path=info.path, sources=list(info.sources), config=dict(info.config), frame=frame, info=info)
    from autopsy.detectors._common import metric_names

    metrics = set(metric_names(frame)) if len(frame) else set()  # one pass, shared with the detectors
    findings: list[Finding] = []
    for spec in registered().values():
        sigs = _wanted(spec, select, ignore)
        if sigs is None:
            continue
        missing = [m for m in spec.requires if m not in metrics]
        if spec.requires_any and not any(m in metrics for m in spec.requires_any):
            missing.append(" or ".join(spec.requires_any))
        if missing:
            report.skipped.append({"detector": spec.name, "reason": f"no {', '.join(missing)} in this run"})
            continue
        kwargs = _params_for(spec, params)
        if "info" in spec.func.__code__.co_varnames[: spec.func.__code__.co_argcount + spec.func.__code__.co_kwonlyargcount]:
            kwargs["info"] = info
        try:
            got = spec.func(frame, **kwargs) or []
        except Exception as exc:  # noqa: BLE001 - a detector that crashes is an error entry, the others still run
            report.errors.append({"detector": spec.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for f in got:
            if f.signature not in sigs:
                continue
            f.detector = f.detector or spec.name
            f.run = info.name
            findings.append(f)
    if (select is None or "source_damaged" in select) and "source_damaged" not in ignore:
        for f in _damage_findings(info):
            f.run = info.name
            findings.append(f)
    from autopsy.postprocess import postprocess

    report.findings = postprocess(findings, frame, info)
    return report


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
    from autopsy import __version__

    if not isinstance(data, pd.DataFrame):
        from autopsy.importers import load

        data = load(data)
    frame = validate_frame(data)
    sel = set(select) if select else None
    ign = set(ignore or ())
    _check_names((sel or set()) | ign, "--select/--ignore")
    report = Report(version=__version__)
    names = _run_names(frame)
    for name in names:
        if len(names) == 1:
            # one run: no per-run mask (a 10M-row take); a shallow copy to carry this run's attrs
            sub = frame.copy(deep=False)
        else:
            sub = frame[(frame["run"] == name).to_numpy()]
        sub.attrs = {"runs": {name: run_info(frame, name)}}
        report.runs.append(analyze_run(sub, run_info(frame, name), select=sel, ignore=ign, params=params))
    return report


def _run_names(frame: pd.DataFrame) -> list[str]:
    """The run names in order of appearance, plus runs known only from metadata (as :func:`runs_of`, faster)."""
    if not len(frame):
        return runs_of(frame)
    codes, uniq = pd.factorize(frame["run"])  # keeps the order of appearance; no 10M-element tolist
    names = [str(u) for u in uniq]
    for name in frame.attrs.get("runs", {}):
        if name not in names:
            names.append(name)
    return names
