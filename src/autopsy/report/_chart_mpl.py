"""A :class:`~autopsy.report.plots.PlotSpec` drawn with matplotlib (``Figure`` directly: no pyplot, no backend).

Every figure of a size gets the same plot area (fixed margins in inches, the legend in a fixed column on the
right), so a run's stacked figures line up on their shared x range.
"""

from __future__ import annotations

import io
import textwrap
from typing import TYPE_CHECKING

import numpy as np

from autopsy.report._chart_spec import PlotSpec

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["figure", "figure_bytes"]

# inches around the plot area: left (tick labels + y label), right (the legend), bottom (x ticks + label), top (title)
_LEFT, _RIGHT, _BOTTOM, _TOP = 0.85, 2.35, 0.5, 0.42
_DASH = {"dashed": "--", "dashdot": "-.", "dotted": ":", "solid": "-"}
_SHAPE = {"x": "X", "o": "o", "star": "*"}
_FONT = 9


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 30)) or text


def _series(ax: Axes, spec: PlotSpec) -> None:
    for ln in spec.lines:
        ax.plot(ln.x, ln.y, color=ln.color, linewidth=1.3, label=_wrap(ln.label),
                marker="o" if ln.markers else None, markersize=3.5)  # fmt: skip
    for m in spec.marks:
        if m.y is None:  # x in data, y in axes fraction: pinned to the top (bottom for -inf)
            where = 0.97 if m.edge != "bottom" else 0.03
            ax.scatter(m.x, np.full(len(m.x), where), transform=ax.get_xaxis_transform(), marker="X", s=42,
                       color=m.color, zorder=5, clip_on=False, label=_wrap(m.label))  # fmt: skip
        elif m.shape == "o":
            ax.scatter(
                m.x, m.y, marker="o", s=22, facecolors="none", edgecolors=m.color, zorder=5, label=_wrap(m.label)
            )
        else:
            ax.scatter(m.x, m.y, marker=_SHAPE.get(m.shape, "o"), s=160 if m.shape == "star" else 30, color=m.color,
                       zorder=6, label=_wrap(m.label))  # fmt: skip


def _references(ax: Axes, spec: PlotSpec, width: float) -> None:
    lo, hi = spec.y_range
    for h in spec.hlines:
        ax.axhline(h.y, color=h.color, linewidth=1.2, linestyle=_DASH.get(h.style, ":"), label=_wrap(h.text))
        if h.shade == "above" and hi > h.y:
            ax.axhspan(h.y, hi, color=h.color, alpha=0.06, zorder=0)
    for sp in spec.spans:
        if sp.end > sp.start:
            ax.axvspan(sp.start, sp.end, color=sp.color, alpha=0.08, zorder=0)
    y = 0.92
    width_pt = ax.get_position().width * width * 72
    for v in spec.vlines:
        style = _DASH.get(v.style, "--")
        if not v.on_plot:
            ax.axvline(v.x, color=v.color, linestyle=style, linewidth=1.1, label=_wrap(v.text))
            continue
        ax.axvline(v.x, color=v.color, linestyle=style, linewidth=1.2, zorder=4)
        # beside the line on the side with more room, wrapped to fit it; staggered so several stay readable
        f = (v.x - spec.x_range[0]) / max(spec.x_range[1] - spec.x_range[0], 1e-12)
        right = f > 0.5
        chars = max(12, int(max(f, 1 - f) * width_pt / (_FONT * 0.62)) - 2)
        text = "\n".join(textwrap.wrap(v.text, chars)) or v.text
        n = text.count("\n") + 1
        if y - 0.1 * n < 0.05:
            y = 0.92
        ax.annotate(text, xy=(v.x, y), xycoords=ax.get_xaxis_transform(), xytext=(-4 if right else 4, 0),
                    textcoords="offset points", fontsize=_FONT, color=v.color, fontweight="bold", va="top",
                    ha="right" if right else "left", zorder=6,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": v.color, "alpha": 0.9})  # fmt: skip
        y -= 0.075 * n + 0.05
    ax.set_ylim(lo, hi)


def figure(spec: PlotSpec, *, width: float = 9.0, height: float = 3.2) -> Figure:
    """The spec as a matplotlib Figure with a fixed plot area (call inside the caller's rc_context)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_axes((_LEFT / width, _BOTTOM / height, 1 - (_LEFT + _RIGHT) / width, 1 - (_BOTTOM + _TOP) / height))
    ax.set_title(spec.title, loc="left", fontsize=12, fontweight="bold")
    ax.set_xlabel("step", labelpad=1)
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, color="#dee2e6", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    if spec.log_y:
        ax.set_yscale("log")
    _series(ax, spec)
    _references(ax, spec, width)
    ax.set_xlim(*spec.x_range)
    if spec.y_sci and not spec.log_y:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False, borderaxespad=0)
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """SVG or PNG bytes, deterministic (no date, no software stamp)."""
    buf = io.BytesIO()
    if fmt == "svg":
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    else:
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()
