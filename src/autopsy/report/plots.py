"""Plots of one run, described once and drawn twice: a neutral :class:`PlotSpec` per figure, rendered by matplotlib
(the Markdown report's PNGs, :func:`run_plots`, the notebook's :func:`run_figures`) and by the HTML report's inline
script (interactive zoom and hover values, :mod:`autopsy.report._chart_html`).

A spec holds what a figure shows, not how: its series (x/y arrays, downsampled), markers (non-finite points pinned
to the top edge: they are the evidence; the 0.0 points of a collapse; the best eval step), a line at every finding's
first step with its text and colour, horizontal references (the clip threshold ``max_grad_norm``, 1.0 marked as
assumed when the config has none; the chance level a plateau finding cites), spans, the x range (one run's plots
share it, so stacked plots line up), the y range (a flat curve keeps a flat look: the range spans at least a few
percent of its level) and the notes, in words, for alt text. A figure with fewer than two finite points is not
drawn (:attr:`PlotSpec.drawable`). Long series are downsampled (:func:`downsample_minmax`: min and max per pixel
column, so a one-step spike survives); the findings were computed on every point before this module sees them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autopsy.findings import RunReport
from autopsy.report._chart_build import build_specs
from autopsy.report._chart_spec import (
    MIN_REL_SPAN,
    HLine,
    Line,
    Marks,
    PlotSpec,
    Span,
    VLine,
    downsample_minmax,
    finish,
    grad_norm_threshold,
    x_range,
    y_range,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MIN_REL_SPAN",
    "HLine",
    "Line",
    "Marks",
    "Plot",
    "PlotSpec",
    "Span",
    "VLine",
    "downsample_minmax",
    "grad_norm_threshold",
    "render_plot",
    "run_figures",
    "run_plots",
    "run_specs",
    "y_range",
]


@dataclass(frozen=True)
class Plot:
    """One rendered figure: ``name`` is a stable id (``loss``, ``grad_norm``, ``learning_rate``)."""

    name: str
    title: str
    fmt: str  # "svg" or "png"
    data: bytes
    notes: tuple[str, ...] = field(default_factory=tuple)  # the annotations drawn, in words (alt text)

    @property
    def mime(self) -> str:
        return "image/svg+xml" if self.fmt == "svg" else "image/png"

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    @property
    def alt(self) -> str:
        return self.title + (": " + "; ".join(self.notes) if self.notes else "")


def run_specs(run: RunReport) -> list[PlotSpec]:
    """Every figure of one run (loss, grad norm, LR, the machine: each GPU's memory and utilisation, the
    throughput; those it logged), drawable or not, all on one x range."""
    if run.frame is None or run.frame.empty:
        return []
    specs = build_specs(run)
    x = x_range([s for s in specs if s.drawable])
    return [finish(s, x) for s in specs]


_RC: Any = {  # matplotlib's stubs type the keys as literals
    "svg.hashsalt": "autopsy",
    "svg.fonttype": "none",
    "font.size": 10,
    "axes.titlesize": 12,
    "font.family": "DejaVu Sans",
    "path.simplify": True,
}


def run_figures(run: RunReport, *, width: float = 9.0, height: float = 3.2) -> list[Figure]:
    """The annotated figures of one run as matplotlib Figures (made with ``matplotlib.figure.Figure``: no pyplot
    state, nothing shown); the notebook's ``Report.plot()``. Empty when the run logged nothing drawable."""
    import matplotlib  # Figure + savefig draw with Agg/SVG directly: no pyplot, no global backend switch

    from autopsy.report._chart_mpl import figure

    with matplotlib.rc_context(_RC):
        return [figure(s, width=width, height=height) for s in run_specs(run) if s.drawable]


def render_plot(spec: PlotSpec, *, fmt: str = "svg", width: float = 9.0, height: float = 3.2) -> Plot:
    """One spec drawn by matplotlib to ``fmt`` bytes (svg or png). Deterministic bytes."""
    import matplotlib

    from autopsy.report._chart_mpl import figure, figure_bytes

    with matplotlib.rc_context(_RC):
        data = figure_bytes(figure(spec, width=width, height=height), fmt)
    return Plot(spec.name, spec.title, fmt, data, spec.notes)


def run_plots(run: RunReport, *, fmt: str = "svg", width: float = 9.0, height: float = 3.2) -> list[Plot]:
    """The annotated plots of one run rendered to ``fmt`` bytes (svg or png); those with two finite points."""
    return [render_plot(s, fmt=fmt, width=width, height=height) for s in run_specs(run) if s.drawable]
