"""Every detector's cases as data (sqlfluff's per-rule YAML tables): ``tests/cases/<detector>.yml``, one
parametrized test, ids ``<detector>:<case>``, so ``pytest -k <detector>`` runs that detector's table.

The format (series shorthands, RunInfo fields, expectations, synthetic and real-file cases, the step tolerance of
``expect: from_truth``) is documented in ``tests/cases/README.md``. Each case runs ONE detector through the registry
(:meth:`DetectorSpec.run`, the way analyze calls it, without analyze's post-processing), asserts it recorded no
error, and compares its findings with the expectation: every expected finding is found, and nothing else is found
(an unexpected info note is allowed only where the case says ``allow_info: true``).
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from autopsy.analysis import split_runs
from autopsy.detectors import get_detector, registered
from autopsy.findings import Finding, Severity
from autopsy.frame import make_frame
from autopsy.runinfo import Crash, LogStats, RunInfo, WeightCheck, attach_runs
from autopsy.synth import FAILURES, make_run

REPO = Path(__file__).resolve().parents[1]
CASES_DIR = Path(__file__).resolve().parent / "cases"

CASE_KEYS = {
    "series",
    "steps",
    "every",
    "wall_time",
    "raw",
    "config",
    "info",
    "params",
    "expect",
    "allow_info",
    "xfail",
    "synth",
    "tolerance",
    "file",
    "as",
    "run",
}
EXPECT_KEYS = {"signature", "step", "step_range", "severity", "metric", "end_step", "evidence"}
GENERATOR_KEYS = {"repeat", "times", "from", "to", "n", "geom", "zigzag", "sine", "period", "noise", "seed"}
RUN = "case"
# yaml.safe_load's loader, in C where libyaml is there (4x faster on these tables, same result)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- reading the tables ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    detector: str
    name: str
    spec: dict[str, Any]
    file: Path

    @property
    def id(self) -> str:
        return f"{self.detector}:{self.name}"

    @property
    def expect(self) -> Any:
        return self.spec.get("expect")

    @property
    def failing(self) -> bool:
        """A case where the detector must find something (a passing case expects nothing)."""
        return self.expect == "from_truth" or bool(self.expect)


def _load_tables() -> tuple[dict[Path, dict[str, Any]], list[Case]]:
    tables: dict[Path, dict[str, Any]] = {}
    cases: list[Case] = []
    for path in sorted(CASES_DIR.glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=SAFE_LOADER)
        tables[path] = doc
        if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
            continue  # test_tables_are_well_formed says what is wrong
        for name, spec in doc["cases"].items():
            cases.append(Case(str(doc.get("detector")), str(name), spec if isinstance(spec, dict) else {}, path))
    return tables, cases


TABLES, CASES = _load_tables()


# --- series shorthands -------------------------------------------------------------------------------------------


def _number(x: Any, where: str) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{where}: {x!r} is not a number")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)  # "nan", "inf", "-inf", and "1e-5" (YAML reads an exponent without a dot as a string)
        except ValueError:
            pass
    raise ValueError(f"{where}: {x!r} is not a number")


def _generate(g: dict[str, Any], where: str) -> list[float]:
    unknown = set(g) - GENERATOR_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown generator key(s) {sorted(unknown)}")
    if "repeat" in g:
        pattern = g["repeat"] if isinstance(g["repeat"], list) else [g["repeat"]]
        out = np.array([_number(x, where) for x in pattern] * int(g.get("times", 1)), dtype=np.float64)
    elif {"from", "to", "n"} <= set(g):
        a, b, n = _number(g["from"], where), _number(g["to"], where), int(g["n"])
        out = np.geomspace(a, b, n) if g.get("geom") else np.linspace(a, b, n)
    else:
        raise ValueError(f"{where}: a generator is {{repeat: x, times: n}} or {{from: a, to: b, n: k}}, got {g!r}")
    if g.get("zigzag"):
        out = out * (1.0 + float(g["zigzag"]) * np.where(np.arange(out.size) % 2 == 0, 1.0, -1.0))
    if g.get("sine"):
        out = out * (1.0 + float(g["sine"]) * np.sin(2.0 * np.pi * np.arange(out.size) / float(g["period"])))
    if g.get("noise"):
        rng = np.random.default_rng(int(g.get("seed", 0)))
        out = out * (1.0 + float(g["noise"]) * rng.standard_normal(out.size))
    return out.tolist()


def values(spec: Any, where: str = "values") -> list[float]:
    """A list of numbers from a table's shorthand: numbers, "nan"/"inf"/"-inf", and generators spliced in place."""
    if isinstance(spec, dict):
        return _generate(spec, where)
    if not isinstance(spec, list):
        raise ValueError(f"{where}: expected a list or a generator, got {spec!r}")
    out: list[float] = []
    for item in spec:
        if isinstance(item, dict):
            out.extend(_generate(item, where))
        else:
            out.append(_number(item, where))
    return out


def _steps(spec: Any, n: int, where: str, *, every: int | None = None, start: int | None = None) -> list[int]:
    if spec is not None:
        st = [int(round(x)) for x in values(spec, where)]
        if len(st) < n:
            raise ValueError(f"{where}: {len(st)} steps for {n} values")
        return st[:n]
    k = int(every or 1)
    first = int(start if start is not None else k)
    return [first + k * i for i in range(n)]


# --- building a run ----------------------------------------------------------------------------------------------


def _info(spec: dict[str, Any]) -> RunInfo:
    extra = dict(spec.get("info") or {})
    known = {f.name for f in fields(RunInfo)}
    unknown = set(extra) - known
    if unknown:
        raise ValueError(f"info: unknown RunInfo field(s) {sorted(unknown)}")
    if isinstance(extra.get("crash"), dict):
        extra["crash"] = Crash.from_dict(extra["crash"])
    if "weight_scans" in extra:
        extra["weight_scans"] = {int(k): WeightCheck(**v) for k, v in extra["weight_scans"].items()}
    if "checkpoints" in extra:
        extra["checkpoints"] = {int(k): str(v) for k, v in extra["checkpoints"].items()}
    for key in ("logs", "unread_logs"):
        if key in extra:
            extra[key] = [
                LogStats(**{**lg, "last_counter": tuple(lg["last_counter"]) if lg.get("last_counter") else None})
                for lg in extra[key]
            ]
    info = RunInfo(name=RUN, config=dict(spec.get("config") or {}), **extra)
    info.fill_from_config()  # as every importer does: the config's schedule becomes the run's
    return info


def _inline(spec: dict[str, Any]) -> tuple[pd.DataFrame, RunInfo]:
    metric: list[str] = []
    step: list[int] = []
    value: list[float] = []
    wall: list[float] = []
    raw: list[str] = []
    wt = spec.get("wall_time")
    for name, s in (spec.get("series") or {}).items():
        where = f"series.{name}"
        if isinstance(s, dict) and "values" in s:
            unknown = set(s) - {"values", "steps", "every", "start", "wall"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
            v = values(s["values"], where)
            st = _steps(s.get("steps"), len(v), where, every=s.get("every"), start=s.get("start"))
            w = values(s["wall"], where) if "wall" in s else None
        else:
            v = values(s, where)
            st = _steps(spec.get("steps"), len(v), where, every=spec.get("every"))
            w = None
        if w is None:
            w = [float(wt["start"]) + float(wt["per_step"]) * x for x in st] if wt else [math.nan] * len(v)
        metric += [name] * len(v)
        step += st
        value += v
        wall += w[: len(v)]
        raw += [str((spec.get("raw") or {}).get(name, name))] * len(v)
    frame = make_frame(
        run=RUN, source="yaml", metric=metric, step=step, value=value, wall_time=np.asarray(wall), raw_metric=raw
    )
    info = _info(spec)
    attach_runs(frame, {RUN: info})
    return frame, info


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory[str]:
    """One temporary directory for the whole session, removed when the interpreter exits."""
    return tempfile.TemporaryDirectory(prefix="autopsy-cases-")


@functools.cache
def _loaded(path: str, name: str | None, run: str | None) -> tuple[pd.DataFrame, RunInfo]:
    from autopsy.importers import load

    src = REPO / path
    if name is not None:  # a renamed file (tests/real/trainer_state/*.json): read under the name its writer gave it
        tmp = Path(_scratch().name) / src.stem
        tmp.mkdir(exist_ok=True)
        shutil.copyfile(src, tmp / name)
        src = tmp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = load(src)
    runs = list(split_runs(frame))
    if run is not None:
        runs = [(f, i) for f, i in runs if i.name == run]
        if not runs:
            raise ValueError(f"{path}: no run named {run!r}")
    return max(runs, key=lambda fi: len(fi[0]))


def build(case: Case) -> tuple[pd.DataFrame, RunInfo | None, Any]:
    """(frame, info, truth) of a case: inline series, a synthetic run, or a real file."""
    spec = case.spec
    if "synth" in spec:
        frame, truth = make_run(**spec["synth"])
        ((_, info),) = split_runs(frame)
        return frame, info, truth
    if "file" in spec:
        path = REPO / spec["file"]
        if not path.exists():
            pytest.skip(f"{spec['file']} is not present")
        frame, info = _loaded(str(spec["file"]), spec.get("as"), spec.get("run"))
        return frame, info, None
    frame, info = _inline(spec)
    return frame, info, None


# --- comparing findings ------------------------------------------------------------------------------------------


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _same(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float, np.number)) and not isinstance(got, bool):
        return got == pytest.approx(want, rel=1e-4, abs=1e-12)
    return bool(got == want)


def _matches(f: Finding, want: dict[str, Any]) -> bool:
    if f.signature != want["signature"]:
        return False
    if "severity" in want and f.severity != Severity.parse(want["severity"]):
        return False
    if "step" in want and f.step != want["step"]:
        return False
    if "step_range" in want:
        lo, hi = want["step_range"]
        if f.step is None or not lo <= f.step <= hi:
            return False
    if "end_step" in want and f.end_step != want["end_step"]:
        return False
    if "metric" in want and f.metric != want["metric"]:
        return False
    return "evidence" not in want or _same(f.evidence, want["evidence"])


def _show(findings: list[Finding]) -> str:
    if not findings:
        return "  (nothing)"
    return "\n".join(
        f"  {f.signature} {f.severity} step={f.step} end_step={f.end_step} metric={f.metric}: {f.summary}"
        for f in findings
    )


def _from_truth(case: Case, truth: Any) -> tuple[list[dict[str, Any]], set[str]]:
    """The truth's expected signatures of this detector, each within the step tolerance, and those it may report."""
    spec = get_detector(case.detector)
    mine = [s for s in spec.signatures if s in truth.expected]
    assert mine, f"{case.id}: the synthetic run's truth expects none of {list(spec.signatures)}: {truth.expected}"
    tol = case.spec.get("tolerance", 3 * int(truth.params["logging_steps"]))
    want = [{"signature": s, "step_range": [truth.expected[s] - tol, truth.expected[s] + tol]} for s in mine]
    return want, set(truth.expected) | set(truth.allowed)


def check(case: Case, findings: list[Finding], truth: Any) -> None:
    if case.expect == "from_truth":
        wanted, allowed = _from_truth(case, truth)
    else:
        wanted = [{"signature": case.detector, **w} for w in case.expect or []]
        allowed = set()
    left = list(findings)
    for want in wanted:
        hit = next((f for f in left if _matches(f, want)), None)
        assert hit is not None, f"{case.id}: expected {want}, the detector found:\n{_show(findings)}"
        left.remove(hit)
    loud = [f for f in left if f.severity >= Severity.WARNING and f.signature not in allowed]
    assert not loud, f"{case.id}: unexpected finding(s):\n{_show(loud)}"
    if not case.spec.get("allow_info", False):
        notes = [f for f in left if f.severity < Severity.WARNING]
        assert not notes, f"{case.id}: unexpected info note(s) (allow_info: true allows them):\n{_show(notes)}"


# --- the tests ---------------------------------------------------------------------------------------------------


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(reason=str(case.spec["xfail"]), strict=True)] if case.spec.get("xfail") else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case(case: Case) -> None:
    frame, info, truth = build(case)
    outcome = get_detector(case.detector).run(frame, info, case.spec.get("params") or {})
    assert not outcome.errors, f"{case.id}: the detector recorded errors: {outcome.errors}"
    check(case, outcome.findings, truth)


def test_tables_are_well_formed() -> None:
    reg = registered()
    problems = []
    for path, doc in TABLES.items():
        if not isinstance(doc, dict) or set(doc) != {"detector", "cases"} or not isinstance(doc["cases"], dict):
            problems.append(f"{path.name}: a table is {{detector: <name>, cases: {{...}}}}")
            continue
        if doc["detector"] not in reg:
            problems.append(f"{path.name}: names {doc['detector']!r}, which is not a registered detector")
        elif path.stem != doc["detector"]:
            problems.append(f"{path.name}: the file of detector {doc['detector']} is {doc['detector']}.yml")
    for case in CASES:
        spec = case.spec
        where = case.id
        unknown = set(spec) - CASE_KEYS
        if unknown:
            problems.append(f"{where}: unknown key(s) {sorted(unknown)}")
        kinds = [k for k in ("series", "synth", "file") if k in spec]
        if len(kinds) != 1:
            problems.append(f"{where}: give exactly one of series, synth, file (got {kinds or 'none'})")
        expect = spec.get("expect", "missing")
        if expect == "from_truth":
            if "synth" not in spec:
                problems.append(f"{where}: expect: from_truth needs a synth run")
            continue
        if not isinstance(expect, list):
            problems.append(f"{where}: expect is a list of findings, [] or from_truth")
            continue
        for want in expect:
            if not isinstance(want, dict) or set(want) - EXPECT_KEYS:
                problems.append(f"{where}: an expectation takes only {sorted(EXPECT_KEYS)}: {want!r}")
                continue
            if case.detector in reg and want.get("signature", case.detector) not in reg[case.detector].signatures:
                problems.append(f"{where}: {case.detector} does not emit {want.get('signature')!r}")
            if "series" in spec and "step" not in want and "step_range" not in want:
                problems.append(f"{where}: an inline case states the step (exact, or null) or a step_range")
    assert not problems, "\n".join(problems)


def test_every_detector_has_a_table_with_failing_and_passing_cases() -> None:
    """A new detector without cases fails here, loudly; so does a table for a detector that is gone."""
    reg = registered()
    named = {doc.get("detector") for doc in TABLES.values() if isinstance(doc, dict)}
    assert not named - set(reg), f"tables for unregistered detectors: {sorted(named - set(reg))}"
    problems = []
    for name in sorted(reg):
        mine = [c for c in CASES if c.detector == name and not c.spec.get("xfail")]
        failing = sum(c.failing for c in mine)
        passing = sum(c.expect == [] for c in mine)
        if not (CASES_DIR / f"{name}.yml").exists():
            problems.append(f"{name}: no tests/cases/{name}.yml")
        elif failing < 2 or passing < 2:
            problems.append(f"{name}: {failing} failing and {passing} passing case(s) (not xfail); at least 2 of each")
    assert not problems, "\n".join(problems)


def test_detectors_with_a_synthetic_failure_have_a_synthetic_case() -> None:
    planted: set[str] = set()
    for failure in FAILURES:
        if failure is not None:
            planted |= set(make_run(failure=failure, steps=200, logging_steps=5)[1].expected)
    reg = registered()
    missing = [
        name
        for name in sorted(reg)
        if set(reg[name].signatures) & planted
        and not any(c.detector == name and c.spec.get("expect") == "from_truth" for c in CASES)
    ]
    assert not missing, f"detectors whose failure synth plants, without an `expect: from_truth` case: {missing}"


def test_k_selects_one_detector() -> None:
    """``pytest -k <detector>`` must run that detector's cases only: no case name holds another detector's name."""
    names = set(registered())
    clash = [c.id for c in CASES for other in names if other != c.detector and other in c.name]
    assert not clash, f"case names that `-k <other detector>` would also select: {clash}"
