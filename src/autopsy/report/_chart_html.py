"""A :class:`~autopsy.report.plots.PlotSpec` for the HTML report: a ``figure`` holding the spec as JSON, drawn
by the inline script (:mod:`autopsy.report._chart_js`: zoom, hover values) and, until the script runs or where it
never does, the matplotlib SVG of the same spec with the notes as alt text.

The JSON is compact (numbers to 6 significant digits, the series already min-max downsampled) and cannot close
its ``<script>`` element: ``<``, ``>`` and ``&`` are written as ``\\u003c``-style escapes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import numpy as np

from autopsy.report._chart_js import CHART_JS
from autopsy.report._chart_spec import MIN_REL_SPAN, Y_PAD, PlotSpec
from autopsy.report._format import html_text

__all__ = ["CHART_CSS", "CHART_JS", "SCRIPT_HASH", "chart_data", "figure_html"]

# the Content-Security-Policy source that lets exactly this script run (no 'unsafe-inline')
SCRIPT_HASH = "'sha256-" + base64.b64encode(hashlib.sha256(CHART_JS.encode()).digest()).decode() + "'"

CHART_CSS = """
.ac-fig{margin:10px 0 14px;border:1px solid var(--line);border-radius:6px;background:#fff;padding:6px 8px 4px;min-width:0}
.ac-head{display:flex;flex-wrap:wrap;align-items:baseline;gap:2px 14px;padding:0 2px 4px}
.ac-title{font-weight:700;font-size:14px}
.ac-keys{display:flex;flex-wrap:wrap;gap:1px 12px;font-size:12px;color:var(--muted)}
.ac-key{white-space:nowrap}
.ac-key i{display:inline-block;width:16px;margin:0 4px 0 0;border-top-width:2px;vertical-align:middle}
.ac-key b{margin-right:4px;font-weight:400}
.ac-reset{margin-left:auto;font-size:12px;padding:1px 8px;border:1px solid var(--line);border-radius:4px;background:#f8f9fa;cursor:pointer}
.ac-box{position:relative;height:250px;touch-action:pan-y;user-select:none;-webkit-user-select:none;cursor:crosshair}
.ac-box svg{position:absolute;left:0;top:0;display:block;overflow:visible}
.ac-box svg text{font-size:11px;fill:#5c6670;font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
.ac-grid{stroke:#e9ecef;stroke-width:1}
.ac-axis{stroke:#adb5bd;stroke-width:1}
.ac-cross{stroke:#495057;stroke-width:1;stroke-dasharray:2 2}
.ac-labels{position:absolute;left:0;top:0;right:0;bottom:0;pointer-events:none;overflow:hidden}
.ac-lab{position:absolute;font-weight:700;font-size:11px;line-height:15px;background:#fff;border:1px solid;border-radius:3px;padding:0 3px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.ac-sel{position:absolute;display:none;background:rgba(28,126,214,.14);border:1px solid rgba(28,126,214,.55);pointer-events:none}
.ac-tip{position:absolute;display:none;z-index:2;pointer-events:none;background:rgba(255,255,255,.97);border:1px solid #ced4da;border-radius:4px;box-shadow:0 1px 5px rgba(0,0,0,.15);padding:3px 8px;font-size:12px;line-height:1.4;white-space:nowrap}
.ac-tip b{font-weight:600}.ac-tip span{color:var(--muted)}.ac-tipstep{font-weight:700}
.ac-static img{display:block;width:100%;height:auto}
.ac-fig figcaption{font-size:12.5px;color:var(--muted);padding:3px 2px 0}
.ac-skipped{font-size:13px;color:var(--muted)}
"""


def _nums(a: np.ndarray | None) -> list[float | int] | None:
    """Short JSON numbers: integers as ints (steps), the rest to 6 significant digits."""
    if a is None:
        return None
    v = np.asarray(a, dtype=np.float64)
    if v.size and np.all(v == np.round(v)) and np.all(np.abs(v) < 2**53):
        return [int(x) for x in v]
    return [float(f"{x:.6g}") for x in v]


def _num(x: float) -> float:
    return float(f"{x:.8g}")


def chart_data(spec: PlotSpec) -> dict[str, Any]:
    """The spec as the script reads it (short keys)."""
    return {
        "t": spec.title,
        "yl": spec.ylabel,
        "alt": spec.alt,
        "x": [_num(v) for v in spec.x_range],
        "y": [_num(v) for v in spec.y_range],
        "yf": spec.y_fixed,
        "log": spec.log_y,
        "sci": spec.y_sci,
        "mr": MIN_REL_SPAN,
        "pad": Y_PAD,
        "s": [{"l": ln.label, "c": ln.color, "m": ln.markers, "x": _nums(ln.x), "y": _nums(ln.y)} for ln in spec.lines],
        "k": [
            {
                "l": m.label,
                "c": m.color,
                "sh": m.shape,
                "e": m.edge,
                "hv": m.hover or m.label,
                "x": _nums(m.x),
                "y": _nums(m.y),
            }
            for m in spec.marks
        ],  # fmt: skip
        "v": [{"x": _num(v.x), "t": v.text, "c": v.color, "d": v.style, "p": v.on_plot} for v in spec.vlines],
        "h": [{"y": _num(h.y), "t": h.text, "c": h.color, "d": h.style, "sh": h.shade} for h in spec.hlines],
        "sp": [[_num(s.start), _num(s.end), s.color] for s in spec.spans],
    }


def _json(data: dict[str, Any]) -> str:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def figure_html(spec: PlotSpec, idx: int, static: Any = None) -> str:
    """One chart: ``static`` (a :class:`~autopsy.report.plots.Plot`) is the picture shown until the script draws."""
    name = html_text(spec.name)
    if static is not None:
        fallback = (
            f'<img class="plot" data-plot="{name}" src="{static.data_uri()}" alt="{html_text(spec.alt)}" '
            'width="900" height="320">'
        )
    else:
        fallback = f'<p class="muted" role="img" aria-label="{html_text(spec.alt)}">{html_text(spec.title)} (drawn by JavaScript)</p>'
    caption = f"<figcaption>{html_text('; '.join(spec.notes))}</figcaption>" if spec.notes else ""
    return (
        f'<figure class="ac-fig" id="plot-{idx}-{name}" data-plot="{name}" data-group="run-{idx}">'
        f'<div class="ac-static">{fallback}</div>'
        f'<script type="application/json" class="ac-data">{_json(chart_data(spec))}</script>'
        f"{caption}</figure>"
    )
