"""The plot spec: a renderer-neutral description of one figure (see :mod:`autopsy.report.plots`), and the rules
every renderer shares: min-max downsampling, the y range of a flat curve, one x range for a run's plots."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from autopsy.findings import RunReport
from autopsy.runinfo import configured_max_grad_norm

__all__ = [
    "COLUMNS",
    "MIN_REL_SPAN",
    "X_PAD",
    "Y_PAD",
    "HLine",
    "Line",
    "Marks",
    "PlotSpec",
    "Span",
    "VLine",
    "downsample_minmax",
    "finish",
    "grad_norm_threshold",
    "thin_steps",
    "x_range",
    "y_range",
]

# one pixel column per step at most: a 9-inch figure at 100 dpi is ~900 columns wide
COLUMNS = 1000
MIN_REL_SPAN = 0.08  # a y range spans at least 8% of the level it sits at: a flat curve looks flat
Y_PAD = 0.05  # of the y span, above and below
X_PAD = 0.015  # of the x span, left and right


@dataclass(frozen=True)
class Line:
    """One series: finite points only (the non-finite ones are :class:`Marks`)."""

    label: str
    x: np.ndarray
    y: np.ndarray
    color: str
    markers: bool = False  # a dot on every point (an eval curve of a few points)


@dataclass(frozen=True)
class Marks:
    """Points drawn as markers; ``y`` None pins them to ``edge`` ("top" or "bottom": a NaN has no height)."""

    label: str
    x: np.ndarray
    y: np.ndarray | None
    color: str
    shape: str  # "x", "o" (open circle), "star"
    edge: str = ""
    hover: str = ""  # what one of the points is, for a tooltip ("train/loss = NaN")


@dataclass(frozen=True)
class VLine:
    """A vertical line at a step; ``on_plot`` writes the text beside the line (a finding), else in the legend."""

    x: float
    text: str
    color: str
    style: str = "dashed"  # or "dashdot"
    on_plot: bool = True


@dataclass(frozen=True)
class HLine:
    """A horizontal reference (always inside the y range); ``shade="above"`` tints the region above it."""

    y: float
    text: str
    color: str
    style: str = "dotted"
    shade: str = ""


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    color: str


@dataclass(frozen=True)
class PlotSpec:
    """One figure, renderer-neutral. ``name`` is a stable id (``loss``, ``grad_norm``, ``learning_rate``, ...)."""

    name: str
    title: str
    ylabel: str = ""
    lines: tuple[Line, ...] = ()
    marks: tuple[Marks, ...] = ()
    vlines: tuple[VLine, ...] = ()
    hlines: tuple[HLine, ...] = ()
    spans: tuple[Span, ...] = ()
    x_range: tuple[float, float] = (0.0, 1.0)
    y_range: tuple[float, float] = (0.0, 1.0)
    y_fixed: bool = False  # the y range stays when zoomed (a percentage axis)
    log_y: bool = False
    y_sci: bool = False  # tick labels in e-notation (a learning rate)
    notes: tuple[str, ...] = ()
    finite_points: int = 0  # before downsampling, over every series
    finite_steps: int = 0  # distinct steps holding them (2 means "at least 2")

    @property
    def drawable(self) -> bool:
        """Finite points at two steps at least: points at one step draw an empty frame."""
        return self.finite_points >= 2 and self.finite_steps >= 2

    @property
    def alt(self) -> str:
        return self.title + (": " + "; ".join(self.notes) if self.notes else "")

    def not_drawn(self) -> str:
        """Why the figure is left out, in words (with its values, when they are few)."""
        n = self.finite_points
        said = f"{self.title}: not drawn, {n} finite point{'s' if n != 1 else ''}"
        pts = [(ln.label, float(x), float(y)) for ln in self.lines for x, y in zip(ln.x, ln.y)]
        if 0 < len(pts) <= 4 and len({x for _, x, _ in pts}) == 1:
            values = ", ".join(f"{label} {y:.4g}" for label, _, y in pts)
            said += f" ({values} at step {pts[0][1]:.0f})"
        return said


def downsample_minmax(x: np.ndarray, y: np.ndarray, *, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * columns`` points of ``(x, y)`` that draw the same picture: per column the min and the max.

    ``x`` must be sorted. Points keep their order, so a spike of one step stays a spike. Vectorised
    (one lexsort), no loop per point. Non-finite ``y`` are dropped: the caller draws them as markers.
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) <= 2 * columns:
        return x, y
    x0, x1 = float(x[0]), float(x[-1])
    span = max(x1 - x0, 1.0)
    bins = np.minimum(((x - x0) / span * columns).astype(np.int64), columns - 1)
    order = np.lexsort((y, bins))  # by column, then by value: first of a column = its min, last = its max
    sb = bins[order]
    starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
    ends = np.r_[starts[1:], len(sb)] - 1
    idx = np.unique(np.concatenate([order[starts], order[ends]]))
    return x[idx], y[idx]


def thin_steps(steps: np.ndarray, *, columns: int = COLUMNS) -> np.ndarray:
    """At most one marker per pixel column (a million NaN points draw as ~1000 markers)."""
    if len(steps) <= columns:
        return steps
    x0, x1 = float(steps.min()), float(steps.max())
    bins = ((steps - x0) / max(x1 - x0, 1.0) * columns).astype(np.int64)
    _, first = np.unique(bins, return_index=True)
    return steps[first]


def grad_norm_threshold(run: RunReport) -> tuple[float | None, bool]:
    """``(max_grad_norm, assumed)``: from the run's config, else HF's default 1.0 marked as assumed.

    A threshold of 0 or below means clipping is off: ``(None, False)``.
    """
    said, value = configured_max_grad_norm(run.info)
    return (value, False) if said else (1.0, True)


def y_range(
    values: list[np.ndarray], include: tuple[float, ...] = (), *, log: bool = False, min_rel: float = MIN_REL_SPAN
) -> tuple[float, float]:
    """The y range that shows ``values`` and the ``include`` levels: padded by :data:`Y_PAD` of the span, and at
    least ``min_rel`` of the level wide, so a plateau from 1.390 to 1.399 draws as the flat line it is rather than
    as noise blown up to the full height. On a log axis the same rule holds in decades (at least 0.3 of one)."""
    v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in values] + [np.asarray(include, dtype=float)])
    v = v[np.isfinite(v)]
    if log:
        v = np.log10(v[v > 0])
    if v.size == 0:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    level = max(abs(lo), abs(hi))
    need = 0.3 if log else (min_rel * level if level > 0 else 1.0)
    if hi - lo < need:
        mid = (lo + hi) / 2
        lo, hi = mid - need / 2, mid + need / 2
    pad = (hi - lo) * Y_PAD
    lo, hi = lo - pad, hi + pad
    return (10.0**lo, 10.0**hi) if log else (lo, hi)


def x_range(specs: list[PlotSpec]) -> tuple[float, float]:
    """One step range for all of a run's plots: every point, marker and line drawn, padded a little."""
    xs = [np.asarray(a, dtype=np.float64) for s in specs for a in [*(ln.x for ln in s.lines), *(m.x for m in s.marks)]]
    xs += [np.asarray([v.x for v in s.vlines] + [p for sp in s.spans for p in (sp.start, sp.end)]) for s in specs]
    v = np.concatenate(xs) if xs else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    pad = max((hi - lo) * X_PAD, 0.5)
    return (lo - pad, hi + pad)


def finish(spec: PlotSpec, x: tuple[float, float]) -> PlotSpec:
    """The spec with the run's shared x range and its own y range (unless fixed)."""
    if spec.y_fixed:
        return replace(spec, x_range=x)
    ys = [ln.y for ln in spec.lines] + [m.y for m in spec.marks if m.y is not None]
    yr = y_range(ys, tuple(h.y for h in spec.hlines), log=spec.log_y)
    return replace(spec, x_range=x, y_range=yr)
