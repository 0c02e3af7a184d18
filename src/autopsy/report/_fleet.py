"""The pieces of a fleet's HTML page (a report of :mod:`autopsy.fleet`): what separates the failed runs (first on
the page) and the small multiples of every run's loss curve, coloured by status, each a link to its run's section.

They read a report's ``fleet_findings`` and ``curves`` (each with ``steps``, ``values`` and ``nonfinite_step``);
a plain :class:`~autopsy.findings.Report` has neither and gets neither piece. Inline SVG: no script, no fetch.
"""

from __future__ import annotations

from typing import Any

from autopsy.findings import Report
from autopsy.report._format import html_text, html_value
from autopsy.report.summary import FleetSummary

__all__ = ["FLEET_CSS", "fleet_findings_html", "small_multiples_html"]


FLEET_CSS = """
.multiples{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px}
.mult{display:block;border:1px solid var(--line);border-radius:4px;padding:4px;color:var(--fg);text-decoration:none;background:#fff}
.mult span{display:block;font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.mult svg{display:block;width:100%;height:auto}.mult polyline{fill:none;stroke-width:1.3}
.st-failed{--st:var(--crit)}.st-unhealthy{--st:var(--err)}.st-worth_a_look{--st:var(--warn)}.st-healthy{--st:var(--ok)}
.st-no_data{--st:var(--muted)}.mult polyline,.mult line{stroke:var(--st)}.mult{border-top:4px solid var(--st)}
"""
_MULT_W, _MULT_H = 160, 60


def fleet_findings_html(report: Report) -> list[str]:
    """What separates the failed runs of a fleet (autopsy.fleet): first on the page."""
    found = list(getattr(report, "fleet_findings", None) or [])
    if not found:
        return []
    out = ['<section class="run" id="fleet-findings"><h2>What separates the failed runs</h2>']
    for j, f in enumerate(found):
        rows = "".join(
            f"<tr><th class='mono'>{html_text(k)}</th><td class='mono'>{html_value(v)}</td></tr>"
            for k, v in f.evidence.items()
        )
        out.append(
            f'<article class="finding sev-{str(f.severity)}" id="fleet-finding-{j}" '
            f'data-signature="{html_text(f.signature)}"><div class="summary">{html_text(f.summary)}</div>'
            f"<div><b>Cause:</b> {html_text(f.cause)}</div><div><b>Fix:</b> {html_text(f.fix)}</div>"
            f"<details><summary>evidence</summary><table>{rows}</table></details></article>"
        )
    out.append("</section>")
    return out


def _sparkline(curve: Any) -> str:
    """One run's thinned loss curve as an inline SVG polyline (and a dashed line where it went non-finite)."""
    steps, values = curve.steps, curve.values
    lo_s, hi_s = (int(steps[0]), int(steps[-1])) if len(steps) else (0, 1)
    if curve.nonfinite_step is not None:
        hi_s = max(hi_s, int(curve.nonfinite_step))
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    span_s, span_v = max(hi_s - lo_s, 1), (hi - lo) or 1.0

    def x(s: float) -> float:
        return 2 + (s - lo_s) / span_s * (_MULT_W - 4)

    pts = " ".join(f"{x(s):.1f},{_MULT_H - 2 - (v - lo) / span_v * (_MULT_H - 4):.1f}" for s, v in zip(steps, values))
    out = f'<svg viewBox="0 0 {_MULT_W} {_MULT_H}" role="img"><polyline points="{pts}"/>'
    if curve.nonfinite_step is not None:
        nx = x(curve.nonfinite_step)
        out += f'<line x1="{nx:.1f}" y1="0" x2="{nx:.1f}" y2="{_MULT_H}" stroke-dasharray="3 2"/>'
    return out + "</svg>"


def small_multiples_html(report: Report, fleet: FleetSummary) -> list[str]:
    """Every run's loss curve, small, coloured by its status, each a link to the run's section."""
    curves = list(getattr(report, "curves", None) or [])
    if len(curves) != len(fleet.runs):
        return []
    out = [
        '<section class="run" id="curves"><h2>Loss curves</h2><p class="muted">each run\'s first loss metric '
        "(the min and max of each stretch of steps), coloured by status; a dashed line where it went NaN</p>"
        '<div class="multiples">'
    ]
    for i, (sm, curve) in enumerate(zip(fleet.runs, curves)):
        pic = _sparkline(curve) if curve is not None else '<p class="muted">no loss logged</p>'
        out.append(
            f'<a class="mult st-{html_text(sm.status)}" href="#run-{i}" title="{html_text(sm.run.run)}: {html_text(sm.word)}">{pic}'
            f"<span>{html_text(sm.run.run)}</span></a>"
        )
    out.append("</div></section>")
    return out
