"""The figures of one run as :class:`~autopsy.report.plots.PlotSpec` (what each shows; the renderers draw it).

Loss (train and eval, the non-finite points, the 0.0 points of a collapse, the best eval step, the chance level a
plateau finding cites), gradient norm (the clip threshold and the region above it), learning rate (the end of
warmup), the machine (each GPU's memory and utilisation, the throughput). Every finding at a step is a line on the
plots of its metric, and on every plot when it is an error or worse.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from autopsy.findings import Finding, RunReport, Severity
from autopsy.metrics import loss_metrics
from autopsy.report._chart_spec import HLine, Line, Marks, PlotSpec, Span, VLine, downsample_minmax, grad_norm_threshold
from autopsy.report._chart_spec import thin_steps as _thin
from autopsy.runinfo import warmup_end_step
from autopsy.series import metric_names, series, wall_times

__all__ = ["SERIES_COLORS", "SEV_COLOR", "build_specs"]

SEV_COLOR = {
    Severity.CRITICAL: "#b00020",
    Severity.ERROR: "#d9480f",
    Severity.WARNING: "#b08800",
    Severity.INFO: "#1c7ed6",
}
SERIES_COLORS = ("#1f5fbf", "#e8590c", "#2b8a3e", "#862e9c", "#c92a2a", "#495057")
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_BAD = "#b00020"
_CHANCE = "#7048e8"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class _Draft:
    """The pieces of one spec as they are collected."""

    def __init__(self, name: str, title: str, ylabel: str) -> None:
        self.name, self.title, self.ylabel = name, title, ylabel
        self.lines: list[Line] = []
        self.marks: list[Marks] = []
        self.vlines: list[VLine] = []
        self.hlines: list[HLine] = []
        self.spans: list[Span] = []
        self.notes: list[str] = []
        self.finite = 0
        self.steps: set[float] = set()  # two distinct finite steps are enough to draw

    def series(self, s: pd.Series, *, label: str, color: str, markers: bool = False) -> None:
        steps, v = s.index.to_numpy(), s.to_numpy(dtype=np.float64)
        ok = np.isfinite(v)
        self.finite += int(ok.sum())
        if len(self.steps) < 2 and ok.any():
            self.steps.update(float(x) for x in steps[ok][[0, -1]])
        x, y = downsample_minmax(steps, v)
        if len(x):
            self.lines.append(Line(label, x, y, color, markers=markers and len(x) <= 60))
        for mask, text, edge in (
            (np.isnan(v), "NaN", "top"),
            (np.isposinf(v), "+inf", "top"),
            (np.isneginf(v), "-inf", "bottom"),
        ):
            if mask.any():
                n = int(mask.sum())
                self.marks.append(
                    Marks(f"{label} {text} ({n} pts)", _thin(steps[mask]), None, _BAD, "x", edge, f"{label} = {text}")
                )
                self.notes.append(f"{label}: first {text} at step {int(steps[mask][0])} ({n} points)")

    def spec(self, **kw: object) -> PlotSpec:
        return PlotSpec(
            self.name, self.title, self.ylabel, tuple(self.lines), tuple(self.marks), tuple(self.vlines),
            tuple(self.hlines), tuple(self.spans), notes=tuple(self.notes), finite_points=self.finite,
            finite_steps=min(len(self.steps), 2), **kw,  # type: ignore[arg-type]
        )  # fmt: skip


def _finding_marks(d: _Draft, findings: list[Finding], metrics: set[str]) -> None:
    """A dashed line at the first step of every finding on these metrics or severe enough for any plot."""
    by_step: dict[int, list[Finding]] = {}
    for f in findings:
        if f.step is None or not (f.metric in metrics or f.severity >= Severity.ERROR):
            continue
        by_step.setdefault(int(f.step), []).append(f)
    for step in sorted(by_step):
        group = sorted(by_step[step], key=lambda f: -int(f.severity))  # stable: the report's order within a severity
        names = list(dict.fromkeys(f.signature for f in group))
        color = SEV_COLOR[group[0].severity]
        text = f"{', '.join(names)} @ {step}"
        d.vlines.append(VLine(step, text, color))
        d.notes.append(text)
        for f in group:
            if f.metric in metrics and f.step is not None and f.end_step is not None and f.end_step > f.step:
                d.spans.append(Span(f.step, f.end_step, color))


def _chance(d: _Draft, findings: list[Finding]) -> None:
    """The chance level a finding cites (a plateau at ln(4)), once per value."""
    seen: set[float] = set()
    for f in findings:
        name, value = f.evidence.get("chance_level"), f.evidence.get("chance_value")
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if name is None or not np.isfinite(v) or round(v, 6) in seen:
            continue
        seen.add(round(v, 6))
        text = f"chance: {name} = {_fmt(v)}"
        d.hlines.append(HLine(v, text, _CHANCE, style="dashdot"))
        d.notes.append(f"{text} (cited by {f.signature})")


def _loss(run: RunReport, findings: list[Finding]) -> PlotSpec | None:
    frame = run.frame
    assert frame is not None
    metrics = loss_metrics(metric_names(frame))
    if not metrics:
        return None
    d = _Draft("loss", "loss (train / eval)", "loss")
    for i, m in enumerate(metrics):
        s = series(frame, m)
        if len(s):
            d.series(s, label=m, color=SERIES_COLORS[i % len(SERIES_COLORS)], markers=m.startswith("eval/"))
    for f in findings:  # the 0.0 points of a collapse are evidence too
        if f.signature == "loss_zero_collapse" and f.metric and f.step is not None:
            s = series(frame, f.metric)
            end = f.end_step if f.end_step is not None else s.index.max()
            z = s[(s.index >= f.step) & (s.index <= end) & (s == 0.0)]
            if len(z):
                xs = _thin(z.index.to_numpy())
                d.marks.append(
                    Marks(
                        f"{f.metric} == 0.0 ({len(z)} pts)", xs, np.zeros(len(xs)), _BAD, "o", hover=f"{f.metric} = 0.0"
                    )
                )
                d.notes.append(f"{f.metric} exactly 0.0 on {len(z)} points from step {int(z.index[0])}")
    for m in metrics:
        fin = series(frame, m, finite=True)
        if m.startswith("eval/") and len(fin) >= 2:
            best = int(fin.idxmin())
            text = f"best {m} {_fmt(float(fin.loc[best]))}"
            y = np.array([float(fin.loc[best])])
            d.marks.append(Marks(f"{text} @ {best}", np.array([best]), y, "#2b8a3e", "star", hover=text))
            d.notes.append(f"{text} at step {best}")
    _chance(d, findings)
    _finding_marks(d, findings, set(metrics))
    ys = [ln.y for ln in d.lines]
    lo, hi = (
        min((float(y.min()) for y in ys if len(y)), default=0.0),
        max((float(y.max()) for y in ys if len(y)), default=0.0),
    )
    return d.spec(log_y=lo > 0 and hi / lo > 1000)  # a divergence over decades: a log axis keeps the start visible


def _grad(run: RunReport, findings: list[Finding]) -> PlotSpec | None:
    assert run.frame is not None
    s = series(run.frame, "train/grad_norm")
    if s.empty:
        return None
    d = _Draft("grad_norm", "gradient norm (pre-clip)", "grad norm")
    d.series(s, label="train/grad_norm", color=SERIES_COLORS[0])
    fin = s.to_numpy()[np.isfinite(s.to_numpy())]
    threshold, assumed = grad_norm_threshold(run)
    if threshold is not None:
        label = f"max_grad_norm = {_fmt(threshold)}" + (" (assumed: not in config)" if assumed else "")
        d.hlines.append(HLine(threshold, label, "#d9480f", shade="above"))
        if len(fin):
            d.notes.append(f"{label}; clipped on {float((fin > threshold).mean()):.0%} of finite points")
    _finding_marks(d, findings, {"train/grad_norm"})
    # many decades: a log axis keeps the baseline visible
    return d.spec(log_y=bool(len(fin) and fin.min() > 0 and fin.max() / fin.min() > 50))


def _lr(run: RunReport, findings: list[Finding]) -> PlotSpec | None:
    assert run.frame is not None
    s = series(run.frame, "train/learning_rate")
    if s.empty:
        return None
    d = _Draft("learning_rate", "learning rate", "lr")
    d.series(s, label="train/learning_rate", color=SERIES_COLORS[2])
    try:
        warm = warmup_end_step(run.info, s)
    except Exception:
        warm = None
    if warm:
        d.vlines.append(VLine(warm, f"warmup end @ {warm}", "#495057", style="dashdot", on_plot=False))
        d.notes.append(f"warmup ends at step {warm}")
    _finding_marks(d, findings, {"train/learning_rate"})
    return d.spec(y_sci=True)


_GPU_PLOTS = (
    ("memory_allocated_pct", "gpu_memory", "machine: GPU memory per rank (% of the card)", "memory %"),
    ("util_pct", "gpu_util", "machine: GPU utilisation per rank (%)", "utilisation %"),
)
_RATES = ("train/tokens_per_second", "train/tokens_per_second_per_gpu", "train/samples_per_second", "train/mfu")


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


def _machine(run: RunReport, findings: list[Finding]) -> list[PlotSpec]:
    """Each GPU's memory and utilisation (one line per rank, W&B system metrics) and the throughput."""
    frame = run.frame
    assert frame is not None
    names, out = metric_names(frame), []
    gpu = (run.info.config.get("gpu_name") if run.info is not None else None) or ""
    for key, name, title, ylabel in _GPU_PLOTS:
        ranks = sorted(
            (int(p[1]), m) for m in names if (p := m.split("."))[0] == "system/gpu" and p[1].isdigit() and p[-1] == key
        )
        if not ranks:
            continue
        d = _Draft(name, title + (f": {len(ranks)} x {gpu}" if gpu else ""), ylabel)
        for i, (rank, m) in enumerate(ranks):
            d.series(series(frame, m), label=f"GPU {rank}", color=_TAB10[i % 10])
        if key == "memory_allocated_pct":
            d.hlines.append(HLine(90.0, "90% of the card", "#d9480f"))
        _finding_marks(d, findings, {m for _, m in ranks})
        out.append(d.spec(y_range=(0.0, 103.0), y_fixed=True))
    got = _rate(frame, names)
    if got is not None:
        rate, values = got
        d = _Draft("throughput", f"machine: throughput ({rate})", rate)
        d.series(values, label=rate, color=SERIES_COLORS[0])
        for f in findings:
            if f.signature == "low_mfu" and "mfu" in f.evidence:
                d.notes.append(f"MFU {float(f.evidence['mfu']):.1%}: {f.evidence.get('formula', f.summary)}")
        _finding_marks(d, findings, {rate, "train/num_tokens", "train/iter_time", "system/gpu.0.util_pct"})
        out.append(d.spec())
    return out


def build_specs(run: RunReport) -> list[PlotSpec]:
    """The run's figures in report order, each with its own annotations (ranges are set by the caller)."""
    findings = run.sorted_findings()
    out = [p for make in (_loss, _grad, _lr) if (p := make(run, findings)) is not None]
    return out + _machine(run, findings)
