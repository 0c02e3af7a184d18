"""Plots of one run for the HTML and Markdown reports (matplotlib, Agg, imported inside the functions).

Each plot is annotated where a finding sits: non-finite points as markers along the top edge (they are the
evidence), zero-loss points of a collapse, a line at every finding's first step, the best eval step, the clip
threshold (``max_grad_norm``, 1.0 marked as assumed when the config has none) and the end of warmup.
Long series are downsampled for drawing only (:func:`downsample_minmax`: min and max per pixel column, so a
one-step spike survives); the findings were computed on every point before this module sees them.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from autopsy.findings import Finding, RunReport, Severity
from autopsy.metrics import loss_metrics
from autopsy.runinfo import configured_max_grad_norm, warmup_end_step
from autopsy.series import metric_names, series, wall_times

__all__ = ["Plot", "downsample_minmax", "grad_norm_threshold", "run_plots"]

# one pixel column per step at most: a 9-inch figure at 100 dpi is ~900 columns wide
_COLUMNS = 1000
_SEV_COLOR = {
    Severity.CRITICAL: "#b00020",
    Severity.ERROR: "#d9480f",
    Severity.WARNING: "#b08800",
    Severity.INFO: "#1c7ed6",
}
_SERIES_COLORS = ("#1f5fbf", "#e8590c", "#2b8a3e", "#862e9c", "#c92a2a", "#495057")


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


def downsample_minmax(x: np.ndarray, y: np.ndarray, *, columns: int = _COLUMNS) -> tuple[np.ndarray, np.ndarray]:
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


def _thin_steps(steps: np.ndarray, *, columns: int = _COLUMNS) -> np.ndarray:
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


def _fmt_num(v: float) -> str:
    return f"{v:.4g}"


class _Canvas:
    """One figure + axes with the house style; collects the annotations drawn."""

    def __init__(self, title: str, *, width: float, height: float) -> None:
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        self.ax = self.fig.add_subplot()
        self.ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
        self.ax.set_xlabel("step")
        self.ax.grid(True, color="#dee2e6", linewidth=0.6)
        self.ax.spines[["top", "right"]].set_visible(False)
        self.notes: list[str] = []
        self._top_labels = 0

    def line(self, s: pd.Series, *, label: str, color: str, marker: bool) -> None:
        x, y = downsample_minmax(s.index.to_numpy(), s.to_numpy())
        if len(x):
            self.ax.plot(
                x,
                y,
                color=color,
                linewidth=1.3,
                label=label,
                marker="o" if marker and len(x) <= 60 else None,
                markersize=3.5,
            )
        v = s.to_numpy()
        bad = ~np.isfinite(v)
        if bad.any():
            steps = s.index.to_numpy()
            for mask, text, where in (
                (np.isnan(v), "NaN", 0.97),
                (np.isposinf(v), "+inf", 0.97),
                (np.isneginf(v), "-inf", 0.03),
            ):
                if not mask.any():
                    continue
                xs = _thin_steps(steps[mask])
                # blended transform: x in data, y in axes fraction -> markers pinned to the top (bottom for -inf)
                self.ax.scatter(
                    xs,
                    np.full(len(xs), where),
                    transform=self.ax.get_xaxis_transform(),
                    marker="X",
                    s=42,
                    color="#b00020",
                    zorder=5,
                    clip_on=False,
                    label=f"{label} {text} ({int(mask.sum())} pts)",
                )
                first = int(steps[mask][0])
                self.notes.append(f"{label}: first {text} at step {first} ({int(mask.sum())} points)")

    def vline(self, step: float, text: str, color: str) -> None:
        self.ax.axvline(step, color=color, linestyle="--", linewidth=1.2, zorder=4)
        # stagger labels so several findings stay readable
        y = 0.90 - 0.13 * (self._top_labels % 4)
        self._top_labels += 1
        self.ax.annotate(
            text,
            xy=(step, y),
            xycoords=self.ax.get_xaxis_transform(),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize=9,
            color=color,
            fontweight="bold",
            va="center",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.9},
            zorder=6,
        )
        self.notes.append(text)

    def span(self, start: float, end: float, color: str) -> None:
        if end > start:
            self.ax.axvspan(start, end, color=color, alpha=0.08, zorder=0)

    def render(self, fmt: str) -> bytes:
        handles, labels = self.ax.get_legend_handles_labels()
        if handles:
            self.ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
        buf = io.BytesIO()
        if fmt == "svg":
            self.fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        else:
            self.fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        return buf.getvalue()


def _finding_marks(canvas: _Canvas, findings: list[Finding], metrics: set[str], *, max_step: float | None) -> None:
    """A dashed line at the first step of every finding on these metrics or severe enough for any plot."""
    by_step: dict[int, list[Finding]] = {}
    for f in findings:
        if f.step is None or not (f.metric in metrics or f.severity >= Severity.ERROR):
            continue
        by_step.setdefault(int(f.step), []).append(f)
    for step in sorted(by_step):
        group = sorted(
            by_step[step], key=lambda f: -int(f.severity)
        )  # stable: the report's own order within a severity
        names = list(dict.fromkeys(f.signature for f in group))
        color = _SEV_COLOR[group[0].severity]
        canvas.vline(step, f"{', '.join(names)} @ {step}", color)
        for f in group:
            if f.metric in metrics and f.step is not None and f.end_step is not None and f.end_step > f.step:
                canvas.span(f.step, f.end_step, color)


def _loss_plot(run: RunReport, findings: list[Finding], *, width: float, height: float, fmt: str) -> Plot | None:
    frame = run.frame
    metrics = loss_metrics(metric_names(frame))
    if not metrics:
        return None
    c = _Canvas("loss (train / eval)", width=width, height=height)
    c.ax.set_ylabel("loss")
    for i, m in enumerate(metrics):
        s = series(frame, m)
        if s.empty:
            continue
        c.line(s, label=m, color=_SERIES_COLORS[i % len(_SERIES_COLORS)], marker=m.startswith("eval/"))
    for f in findings:  # the 0.0 points of a collapse are evidence too
        if f.signature == "loss_zero_collapse" and f.metric and f.step is not None:
            s = series(frame, f.metric)
            end = f.end_step if f.end_step is not None else s.index.max()
            z = s[(s.index >= f.step) & (s.index <= end) & (s == 0.0)]
            if len(z):
                xs = _thin_steps(z.index.to_numpy())
                c.ax.scatter(
                    xs,
                    np.zeros(len(xs)),
                    marker="o",
                    s=22,
                    facecolors="none",
                    edgecolors="#b00020",
                    zorder=5,
                    label=f"{f.metric} == 0.0 ({len(z)} pts)",
                )
                c.notes.append(f"{f.metric} exactly 0.0 on {len(z)} points from step {int(z.index[0])}")
    for m in metrics:
        if not m.startswith("eval/"):
            continue
        s = series(frame, m)
        fin = s[np.isfinite(s.to_numpy())]
        if len(fin) >= 2:
            best = int(fin.idxmin())
            c.ax.scatter(
                [best],
                [fin.loc[best]],
                marker="*",
                s=160,
                color="#2b8a3e",
                zorder=6,
                label=f"best {m} {_fmt_num(float(fin.loc[best]))} @ {best}",
            )
            c.notes.append(f"best {m} {_fmt_num(float(fin.loc[best]))} at step {best}")
    _finding_marks(c, findings, set(metrics), max_step=None)
    return Plot("loss", "loss (train / eval)", fmt, c.render(fmt), tuple(c.notes))


def _grad_plot(run: RunReport, findings: list[Finding], *, width: float, height: float, fmt: str) -> Plot | None:
    s = series(run.frame, "train/grad_norm")
    if s.empty:
        return None
    c = _Canvas("gradient norm (pre-clip)", width=width, height=height)
    c.ax.set_ylabel("grad norm")
    c.line(s, label="train/grad_norm", color=_SERIES_COLORS[0], marker=False)
    fin = s.to_numpy()[np.isfinite(s.to_numpy())]
    threshold, assumed = grad_norm_threshold(run)
    if len(fin) and fin.min() > 0 and fin.max() / fin.min() > 50:  # many decades: a log axis keeps the baseline visible
        c.ax.set_yscale("log")
    if threshold is not None:
        label = f"max_grad_norm = {_fmt_num(threshold)}" + (" (assumed: not in config)" if assumed else "")
        c.ax.axhline(threshold, color="#d9480f", linewidth=1.2, linestyle=":", label=label)
        top = max(float(fin.max()) if len(fin) else threshold, threshold) * 1.05
        c.ax.axhspan(threshold, top, color="#d9480f", alpha=0.06, zorder=0)  # the clip region
        if len(fin):
            share = float((fin > threshold).mean())
            c.notes.append(f"{label}; clipped on {share:.0%} of finite points")
    _finding_marks(c, findings, {"train/grad_norm"}, max_step=None)
    return Plot("grad_norm", "gradient norm (pre-clip)", fmt, c.render(fmt), tuple(c.notes))


def _lr_plot(run: RunReport, findings: list[Finding], *, width: float, height: float, fmt: str) -> Plot | None:
    s = series(run.frame, "train/learning_rate")
    if s.empty:
        return None
    c = _Canvas("learning rate", width=width, height=height)
    c.ax.set_ylabel("lr")
    c.line(s, label="train/learning_rate", color=_SERIES_COLORS[2], marker=False)
    c.ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    try:
        warm = warmup_end_step(run.info, s)
    except Exception:
        warm = None
    if warm:
        c.ax.axvline(warm, color="#495057", linestyle="-.", linewidth=1.1, label=f"warmup end @ {warm}")
        c.notes.append(f"warmup ends at step {warm}")
    _finding_marks(c, findings, {"train/learning_rate"}, max_step=None)
    return Plot("learning_rate", "learning rate", fmt, c.render(fmt), tuple(c.notes))


_GPU_PLOTS = (
    ("memory_allocated_pct", "gpu_memory", "machine: GPU memory per rank (% of the card)", "memory %"),
    ("util_pct", "gpu_util", "machine: GPU utilisation per rank (%)", "utilisation %"),
)
_RATES = ("train/tokens_per_second", "train/tokens_per_second_per_gpu", "train/samples_per_second", "train/mfu")


def _steps_of(frame: pd.DataFrame, metrics: list[str]) -> list[float]:
    """The first and last step of these metrics (empty when none has a point)."""
    spans = [s.index for s in (series(frame, m) for m in metrics) if len(s)]
    return [float(min(i.min() for i in spans)), float(max(i.max() for i in spans))] if spans else []


def _rate(frame: pd.DataFrame, names: frozenset[str]) -> tuple[str, pd.Series] | None:
    """The logged throughput, else tokens/s from a cumulative token count over the wall time of its logs."""
    rate = next((m for m in _RATES if m in names), None)
    if rate is not None:
        return rate, series(frame, rate)
    if "train/num_tokens" not in names:
        return None
    s, w = series(frame, "train/num_tokens"), wall_times(frame, "train/num_tokens")
    dv, dt = np.diff(s.to_numpy()), np.diff(w.to_numpy())
    ok = dt > 0
    if not ok.any():
        return None
    return "tokens/s", pd.Series(dv[ok] / dt[ok], index=s.index[1:][ok])


def _machine_plots(run: RunReport, findings: list[Finding], *, width: float, height: float, fmt: str) -> list[Plot]:
    """The machine section: each GPU's memory and utilisation (one line per rank, W&B system metrics) and the
    throughput, on the loss plot's step range (widened to the samples' own), with the findings marked."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    frame, out = run.frame, []
    names = metric_names(frame)
    span = _steps_of(frame, loss_metrics(names))
    gpu = (run.info.config.get("gpu_name") if run.info is not None else None) or ""
    for key, name, title, ylabel in _GPU_PLOTS:
        ranks = sorted(
            (int(p[1]), m) for m in names if (p := m.split("."))[0] == "system/gpu" and p[1].isdigit() and p[-1] == key
        )
        if not ranks:
            continue
        c = _Canvas(title + (f": {len(ranks)} x {gpu}" if gpu else ""), width=width, height=height)
        c.ax.set_ylabel(ylabel)
        for i, (rank, m) in enumerate(ranks):
            c.line(series(frame, m), label=f"GPU {rank}", color=to_hex(colormaps["tab10"](i % 10)), marker=False)
        if key == "memory_allocated_pct":
            c.ax.axhline(90.0, color="#d9480f", linewidth=1.2, linestyle=":", label="90% of the card")
        c.ax.set_ylim(0, 103)
        _finding_marks(c, findings, {m for _, m in ranks}, max_step=None)
        lim = _steps_of(frame, [m for _, m in ranks]) + span
        c.ax.set_xlim(min(lim), max(lim))
        out.append(Plot(name, title, fmt, c.render(fmt), tuple(c.notes)))
    got = _rate(frame, names)
    if got is not None:
        rate, values = got
        c = _Canvas(f"machine: throughput ({rate})", width=width, height=height)
        c.line(values, label=rate, color=_SERIES_COLORS[0], marker=False)
        for f in findings:
            if f.signature == "low_mfu" and "mfu" in f.evidence:
                c.notes.append(f"MFU {float(f.evidence['mfu']):.1%}: {f.evidence.get('formula', f.summary)}")
        marked = {rate, "train/num_tokens", "train/iter_time", "system/gpu.0.util_pct"}
        _finding_marks(c, findings, marked, max_step=None)
        out.append(Plot("throughput", f"machine: throughput ({rate})", fmt, c.render(fmt), tuple(c.notes)))
    return out


def run_plots(run: RunReport, *, fmt: str = "svg", width: float = 9.0, height: float = 3.2) -> list[Plot]:
    """The annotated plots of one run (loss, grad norm, LR, and the machine: each GPU's memory and utilisation, the
    throughput; those it logged). Deterministic bytes."""
    if run.frame is None or run.frame.empty:
        return []
    import matplotlib  # Figure + savefig draw with Agg/SVG directly: no pyplot, no global backend switch

    rc: Any = {
        "svg.hashsalt": "autopsy",
        "svg.fonttype": "none",
        "font.size": 10,
        "axes.titlesize": 12,
        "font.family": "DejaVu Sans",
        "path.simplify": True,
    }
    findings = run.sorted_findings()
    out: list[Plot] = []
    with matplotlib.rc_context(rc):
        for make in (_loss_plot, _grad_plot, _lr_plot):
            p = make(run, findings, width=width, height=height, fmt=fmt)
            if p is not None:
                out.append(p)
        out += _machine_plots(run, findings, width=width, height=height, fmt=fmt)
    return out
