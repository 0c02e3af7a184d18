"""The detector registry: each detector is a plain function registered by a decorator.

A detector takes the frame of ONE run (canonical columns) and keyword-only parameters, and returns a
list of :class:`~autopsy.findings.Finding`. It declares the metrics it needs (``requires``): when the
run lacks them, :func:`autopsy.analyze` records a visible *skip* instead of calling it.

Context about the run (config, max_steps, checkpoints) comes through the keyword ``info``
(a :class:`~autopsy.frame.RunInfo`) for detectors that declare it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["DetectorSpec", "detector", "get_detector", "registered", "unregister"]

DetectorFunc = Callable[..., list]


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector: its function, what it needs, and its parameters."""

    name: str
    func: DetectorFunc
    requires: tuple[str, ...]
    requires_any: tuple[str, ...]
    signatures: tuple[str, ...]
    tags: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)  # name -> default

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.func) or ""

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else ""

    def __call__(self, frame: Any, **kwargs: Any) -> list:
        return self.func(frame, **kwargs)


_REGISTRY: dict[str, DetectorSpec] = {}


def detector(
    *,
    requires: tuple[str, ...] = (),
    requires_any: tuple[str, ...] = (),
    signatures: tuple[str, ...] | None = None,
    tags: tuple[str, ...] = (),
    name: str | None = None,
) -> Callable[[DetectorFunc], DetectorFunc]:
    """Register a detector.

    ``requires``: metrics that must all be present; ``requires_any``: at least one must be.
    ``signatures``: the signature ids it can emit (default: its own name).
    Parameters after the frame must be keyword-only with defaults (sklearn's rule).
    """

    def wrap(func: DetectorFunc) -> DetectorFunc:
        det_name = name or func.__name__
        sig = inspect.signature(func)
        params: dict[str, Any] = {}
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if i == 0:
                continue
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"detector {det_name}: parameter {pname} must be keyword-only")
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"detector {det_name}: parameter {pname} needs a default")
            if pname != "info":
                params[pname] = p.default
        _REGISTRY[det_name] = DetectorSpec(
            name=det_name,
            func=func,
            requires=tuple(requires),
            requires_any=tuple(requires_any),
            signatures=tuple(signatures or (det_name,)),
            tags=tuple(tags),
            params=params,
        )
        return func

    return wrap


def registered() -> dict[str, DetectorSpec]:
    """All registered detectors by name (importing the built-in ones first)."""
    import autopsy.detectors  # noqa: F401  (registers the built-ins)

    return dict(_REGISTRY)


def get_detector(name: str) -> DetectorSpec:
    reg = registered()
    if name not in reg:
        from autopsy.errors import UsageError

        raise UsageError(f"unknown detector {name!r}; `autopsy detectors` lists them")
    return reg[name]


def unregister(name: str) -> None:
    """Remove a detector (for notebooks and tests that register their own)."""
    _REGISTRY.pop(name, None)
