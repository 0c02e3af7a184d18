"""The detector registry: each detector is a plain function registered by a decorator, and checked when it is.

A detector takes the frame of ONE run (canonical columns) and keyword-only, annotated parameters with defaults
(sklearn's rule), optionally the keyword ``info`` (the run's :class:`~autopsy.runinfo.RunInfo`), and returns a list
of :class:`~autopsy.findings.Finding`. It declares the metrics it needs (``requires``: all of them;
``requires_any``: one of them) and the signature ids it may emit; when the run lacks the metrics,
:func:`autopsy.analyze` records a visible *skip* instead of calling it.

The registry is loud (sqlfluff's and pandera's rule): a duplicate name, a parameter without a default or an
annotation, a default that does not fit its annotation, a ``requires`` name that no frame can carry (``"loss"``
instead of ``train/loss``) or a signature not in the table raises :class:`~autopsy.errors.RegistrationError` at
import. At run time, :meth:`DetectorSpec.run` is the only way a detector is called: it converts and checks the
parameters against their annotations (a bad value is a :class:`~autopsy.errors.UsageError` naming the parameter and
its type), and turns a crash or a finding of an undeclared signature into a recorded error, never a silent drop.
"""

from __future__ import annotations

import fnmatch
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import pandas as pd

from autopsy.errors import RegistrationError, UsageError
from autopsy.findings import Finding
from autopsy.metrics import is_canonical
from autopsy.runinfo import RunInfo
from autopsy.signatures import SIGNATURES

__all__ = ["DetectorSpec", "Outcome", "Param", "detector", "get_detector", "registered", "unregister"]

DetectorFunc = Callable[..., list[Finding]]
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Param:
    """One parameter of a detector: its default and its annotated type, which every value is converted to."""

    name: str
    default: Any
    annotation: Any

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    def convert(self, value: Any) -> Any:
        """``value`` (a string from the command line, or a Python value) as the annotated type; ValueError if it
        does not fit."""
        return _convert(self.annotation, value)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        inner = "..." if len(args) == 2 and args[1] is Ellipsis else ", ".join(_type_name(a) for a in args)
        return f"a tuple ({_type_name(args[0]) if inner == '...' else inner}, comma-separated)"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value)
            except ValueError:
                continue
        raise ValueError(value)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin is tuple:
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in items)
        if len(items) != len(args):
            raise ValueError(value)
        return tuple(_convert(a, v) for a, v in zip(args, items))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            return float(value)
        return float(value)  # a string that is not a number raises ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    raise ValueError(value)


@dataclass
class Outcome:
    """What one detector call gave: its findings, and the errors recorded instead of raised."""

    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector: its function, what it needs, its signatures and its parameters."""

    name: str
    func: DetectorFunc
    requires: tuple[str, ...]
    requires_any: tuple[str, ...]
    signatures: tuple[str, ...]
    tags: tuple[str, ...]
    params: dict[str, Param] = field(default_factory=dict)
    takes_info: bool = False

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.func) or ""

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else ""

    def missing(self, metrics: frozenset[str] | set[str]) -> list[str]:
        """The metrics this detector needs that ``metrics`` lacks (empty: it can run). A name may be a pattern:
        ``eval/*/loss`` is any named eval set's loss."""
        out = [m for m in self.requires if not _present(m, metrics)]
        if self.requires_any and not any(_present(m, metrics) for m in self.requires_any):
            out.append(" or ".join(self.requires_any))
        return out

    def check_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` converted to their annotated types; a :class:`UsageError` naming the parameter when one is
        unknown or does not fit."""
        out: dict[str, Any] = {}
        for key, value in (params or {}).items():
            param = self.params.get(key)
            if param is None:
                raise UsageError(
                    f"detector {self.name} has no parameter {key!r}; it takes: {', '.join(self.params) or 'none'}"
                )
            try:
                out[key] = param.convert(value)
            except (ValueError, TypeError):
                raise UsageError(f"{self.name}.{key}={value!r}: {key} takes {param.type_name}") from None
        return out

    def run(self, frame: pd.DataFrame, info: RunInfo | None = None, params: Mapping[str, Any] | None = None) -> Outcome:
        """Call the detector on one run's frame: the only way a detector is called.

        Parameters are checked first (a bad one raises :class:`UsageError`: it is the caller's mistake). A crash
        of the detector, or a finding whose signature it did not declare, is recorded in ``Outcome.errors``; the
        declared findings are kept.
        """
        kwargs = self.check_params(params)
        if self.takes_info:
            kwargs["info"] = info
        try:
            got = list(self.func(frame, **kwargs) or [])
        except Exception as exc:
            return Outcome(errors=[f"{type(exc).__name__}: {exc}"])
        outcome = Outcome()
        for f in got:
            if not isinstance(f, Finding):
                outcome.errors.append(f"returned {type(f).__name__}, not a Finding")
            elif f.signature not in self.signatures:
                outcome.errors.append(
                    f"emitted {f.signature!r}, which it does not declare (signatures={list(self.signatures)})"
                )
            else:
                f.detector = f.detector or self.name
                outcome.findings.append(f)
        return outcome


def _present(name: str, metrics: frozenset[str] | set[str]) -> bool:
    if "*" not in name:
        return name in metrics
    return any(fnmatch.fnmatchcase(m, name) for m in metrics)


_REGISTRY: dict[str, DetectorSpec] = {}


def _params_of(name: str, func: DetectorFunc) -> tuple[dict[str, Param], bool]:
    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise RegistrationError(f"detector {name}: cannot resolve its annotations ({exc})") from None
    params: dict[str, Param] = {}
    takes_info = False
    for i, (pname, p) in enumerate(sig.parameters.items()):
        if i == 0:
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise RegistrationError(f"detector {name}: parameter {pname} must be keyword-only")
        if p.default is inspect.Parameter.empty:
            raise RegistrationError(f"detector {name}: parameter {pname} needs a default")
        if pname == "info":
            takes_info = True
            continue
        if pname not in hints:
            raise RegistrationError(f"detector {name}: parameter {pname} needs a type annotation")
        param = Param(pname, p.default, hints[pname])
        try:
            if param.convert(p.default) != p.default:
                raise ValueError(p.default)
        except (ValueError, TypeError):
            raise RegistrationError(
                f"detector {name}: the default {pname}={p.default!r} is not {param.type_name}"
            ) from None
        params[pname] = param
    return params, takes_info


def detector(
    *,
    requires: tuple[str, ...] = (),
    requires_any: tuple[str, ...] = (),
    signatures: tuple[str, ...] | None = None,
    tags: tuple[str, ...] = (),
    name: str | None = None,
    replace: bool = False,
) -> Callable[[DetectorFunc], DetectorFunc]:
    """Register a detector.

    ``requires``: canonical metrics that must all be present; ``requires_any``: at least one must be.
    ``signatures``: the signature ids it can emit (default: its own name), each in the signature table.
    ``replace=True`` replaces a detector of the same name (a notebook cell run twice); otherwise a duplicate raises.
    """

    def wrap(func: DetectorFunc) -> DetectorFunc:
        det_name = name or func.__name__
        if det_name in _REGISTRY and not replace:
            raise RegistrationError(f"detector {det_name!r} is registered twice (pass replace=True to replace it)")
        sigs = tuple(signatures or (det_name,))
        unknown = [s for s in sigs if s not in SIGNATURES]
        if unknown:
            raise RegistrationError(
                f"detector {det_name}: unknown signature(s) {', '.join(unknown)}: define them first "
                "with autopsy.signatures.define_signature(id, summary)"
            )
        bad = [m for m in (*requires, *requires_any) if not is_canonical(m.replace("*", "x"))]
        if bad:
            raise RegistrationError(
                f"detector {det_name}: requires {', '.join(map(repr, bad))}, which no frame carries: "
                "use canonical names (train/loss, train/grad_norm, eval/loss; see autopsy.metrics)"
            )
        params, takes_info = _params_of(det_name, func)
        _REGISTRY[det_name] = DetectorSpec(
            name=det_name,
            func=func,
            requires=tuple(requires),
            requires_any=tuple(requires_any),
            signatures=sigs,
            tags=tuple(tags),
            params=params,
            takes_info=takes_info,
        )
        return func

    return wrap


def registered() -> dict[str, DetectorSpec]:
    """All registered detectors by name (the built-in ones are registered when ``autopsy.detectors`` is imported,
    which importing this module does first)."""
    return dict(_REGISTRY)


def get_detector(name: str) -> DetectorSpec:
    reg = registered()
    if name not in reg:
        raise UsageError(f"unknown detector {name!r}; `autopsy detectors` lists them")
    return reg[name]


def unregister(name: str) -> None:
    """Remove a detector (for notebooks and tests that register their own)."""
    _REGISTRY.pop(name, None)
