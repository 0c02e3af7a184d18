"""Report -> one self-contained HTML file: readable offline, attachable to a ticket; or its body for a notebook.

No external URL at all: CSS inline, the charts drawn by our own inline script from JSON in the page (zoom, hover
values; :mod:`autopsy.report._chart_html`), each carrying a static SVG of the same figure until the script runs
(or where it never does). A Content-Security-Policy meta tag forbids the page to fetch anything and lets only that
script run (by its hash). Every string that comes from the data (run names, metric names, paths, config values,
evidence) is escaped. The first screen answers: did the run fail, where, why, what to do, and which checkpoint to
restart from. Readable from 800 px wide up: tables wrap, none scrolls sideways. Pure and deterministic: the same
report gives the same bytes.

:func:`render_html_body` is the report without the page around it (no ``<html>``/``<head>``): one ``<div
class="autopsy">`` with its own scoped ``<style>`` and ``<script>``, for a Jupyter output cell.
"""

from __future__ import annotations

import json
import re

from autopsy.findings import Finding, Report, RunReport, Severity
from autopsy.report._fleet import FLEET_CSS, fleet_findings_html, small_multiples_html
from autopsy.report._format import format_wall, html_text, html_value, replay_evidence, step_range
from autopsy.report.summary import FleetSummary, RunSummary, display_path, summarize_fleet

__all__ = ["CSP", "render_html", "render_html_body"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_ROOT = ".autopsy"

_CSS = """
:root{--crit:#b00020;--err:#d9480f;--warn:#b08800;--info:#1c7ed6;--ok:#2b8a3e;--fg:#1b1e21;--muted:#5c6670;--line:#dee2e6}
:root{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:#f4f5f7;text-align:left}
*{box-sizing:border-box}
main{max-width:1180px;margin:0 auto;padding:16px 20px 40px}
header.top{display:flex;flex-wrap:wrap;gap:0 16px;justify-content:space-between;align-items:baseline;border-bottom:1px solid var(--line);margin-bottom:12px}
header.top h1{font-size:20px;margin:8px 0}
.muted{color:var(--muted)}
section.run{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:18px 0;min-width:0;overflow-wrap:break-word}
li,p{overflow-wrap:anywhere}
h2{font-size:22px;margin:0 0 4px;overflow-wrap:anywhere}
h3{font-size:17px;margin:22px 0 8px;border-bottom:1px solid var(--line);padding-bottom:3px}
.verdict{border-left:10px solid var(--ok);background:#ebfbee;padding:12px 16px;border-radius:6px}
.verdict.sev-critical{border-color:var(--crit);background:#fff0f1}
.verdict.sev-error{border-color:var(--err);background:#fff4e6}
.verdict.sev-warning{border-color:var(--warn);background:#fff9db}
.verdict .status{font-size:26px;font-weight:800;letter-spacing:.02em}
.verdict.sev-critical .status{color:var(--crit)}.verdict.sev-error .status{color:var(--err)}
.verdict.sev-warning .status{color:var(--warn)}.verdict.sev-ok .status{color:var(--ok)}
.verdict .line{font-size:17px;font-weight:600;margin:4px 0 10px}
.verdict dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 14px;margin:0}
.verdict dt{font-weight:700}.verdict dd{margin:0;overflow-wrap:anywhere}
.restart{font-weight:700}
.chip{display:inline-block;border-radius:4px;padding:0 6px;margin:2px 4px 2px 0;font:600 13px ui-monospace,Menlo,Consolas,monospace;color:#fff}
.sev-bg-critical{background:var(--crit)}.sev-bg-error{background:var(--err)}.sev-bg-warning{background:var(--warn)}.sev-bg-info{background:var(--info)}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f1f3f5;font-weight:700}
td.mono{overflow-wrap:anywhere}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.finding{border:1px solid var(--line);border-left:6px solid var(--info);border-radius:6px;padding:8px 12px;margin:10px 0;overflow-wrap:anywhere}
.finding.sev-critical{border-left-color:var(--crit)}.finding.sev-error{border-left-color:var(--err)}
.finding.sev-warning{border-left-color:var(--warn)}
.finding h4{margin:0 0 4px;font-size:15px}
.finding .summary{font-weight:600}
.finding table{font-size:13px;width:auto;min-width:40%}
table.timeline{table-layout:auto}
table.timeline td.sig{min-width:10.5em}
table.timeline td.sig>code{display:block}
table.timeline td.sig .chip{font-size:11px;padding:0 4px}
table.timeline td.sig .metric{display:block;color:var(--muted);font-size:12px}
table.timeline td.summary{min-width:15em;width:45%}
td.wall{font-size:13px;min-width:9.5em}
td.span{min-width:70px;width:12%}
.bar{position:relative;height:12px;background:#f1f3f5;border-radius:3px;margin-top:4px;overflow:hidden}
.bar span{position:absolute;top:0;bottom:0;border-radius:3px;min-width:3px}
table.compare th,table.compare td{padding:4px 6px}
table.compare td.name{min-width:11em;max-width:24em}
table.compare td.name a{display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:3;line-clamp:3;overflow:hidden}
table.compare td.path{overflow-wrap:anywhere;min-width:7em}
pre{white-space:pre-wrap;overflow-wrap:anywhere}
details{margin:6px 0}
summary{cursor:pointer;color:var(--muted)}
.damage{color:var(--err)}
"""
_PAGE_CSS = "body{margin:0;background:#f4f5f7}"


def _verdict(sm: RunSummary, idx: int) -> list[str]:
    top = sm.lead
    cls = str(top.severity) if top is not None else "ok"
    line = sm.verdict[len(sm.word) + 2 :] if top is not None else sm.verdict
    out = [
        f'<div class="verdict sev-{cls}" id="verdict-{idx}">',
        f'<div class="status">{html_text(sm.word)}</div>',
        f'<div class="line">{html_text(line)}</div>',
        "<dl>",
    ]
    if top is not None:
        where = f"step {top.step}" if top.step is not None else "the whole run"
        if sm.last_step is not None:
            where += (
                f" (run logged up to step {sm.last_step}"
                + (f" of {sm.max_steps} planned" if sm.max_steps else "")
                + ")"
            )
        wall = format_wall(top.step, sm.walls)
        if wall:
            where += f", {wall}"
        out += [
            f"<dt>Where</dt><dd>{html_text(where)}</dd>",
            f"<dt>Why</dt><dd>{html_text(top.cause or top.summary)}</dd>",
        ]
        if top.fix:
            out.append(f"<dt>What to do</dt><dd>{html_text(top.fix)}</dd>")
        if sm.restart:
            out.append(f'<dt>Restart</dt><dd class="restart">{html_text(sm.restart)}</dd>')
    else:
        out.append(f"<dt>Steps</dt><dd>{html_text(sm.last_step if sm.last_step is not None else 'unknown')}</dd>")
    out.append("</dl>")
    shown = [f for f in sm.findings if f.severity >= Severity.WARNING]
    if shown:
        chips = "".join(
            f'<span class="chip sev-bg-{str(f.severity)}">{html_text(f.signature)}'
            f"{'' if f.step is None else ' @ ' + str(f.step)}</span>"
            for f in shown
        )
        out.append(f'<div class="chips">{chips}</div>')
    out.append("</div>")
    return out


def _plots(run: RunReport, idx: int, static: bool) -> list[str]:
    """The run's charts (one shared x axis); a figure without finite points at two steps is said in words."""
    try:
        from autopsy.report._chart_html import figure_html
        from autopsy.report.plots import render_plot, run_specs

        specs = run_specs(run)
        figs = [figure_html(s, idx, render_plot(s) if static else None) for s in specs if s.drawable]
    except Exception as exc:
        return [
            "<h3>Plots</h3>",
            f'<p class="damage">plots unavailable: {html_text(type(exc).__name__)}: {html_text(exc)}</p>',
        ]
    if not specs:
        return []
    skipped = [f'<p class="ac-skipped">{html_text(s.not_drawn())}</p>' for s in specs if not s.drawable]
    return ["<h3>Plots</h3>", *figs, *skipped]


def _timeline(sm: RunSummary, idx: int) -> list[str]:
    """The findings in the order they happened; the lead's summary is the verdict's."""
    findings = sm.timeline
    if not findings:
        return []
    walls = sm.walls
    last = sm.last_step or max((f.end_step or f.step or 0) for f in findings) or 1
    has_wall = not walls.empty
    out = [
        "<h3>Timeline</h3>",
        '<table class="timeline"><thead><tr><th>step</th>'
        + ("<th>wall time</th>" if has_wall else "")
        + "<th>finding</th><th>summary</th><th>span</th></tr></thead><tbody>",
    ]
    for f in findings:
        bar = ""
        if f.step is not None and last > 0:
            left = min(max(f.step / last, 0.0), 1.0) * 100
            end = f.end_step if f.end_step is not None else f.step
            width = max(min(end / last, 1.0) * 100 - left, 0.0)
            bar = (
                f'<div class="bar"><span class="sev-bg-{str(f.severity)}" '
                f'style="left:{left:.1f}%;width:{width:.1f}%"></span></div>'
            )
        wall = f'<td class="wall">{html_text(format_wall(f.step, walls))}</td>' if has_wall else ""
        sev = str(f.severity)
        metric = f'<code class="metric">{_wbr(f.metric)}</code>' if f.metric else ""
        summary = f'<a href="#verdict-{idx}">the verdict</a>' if f is sm.lead else html_text(f.summary)
        out.append(
            f'<tr class="sev-{sev}"><td class="num">{html_text(step_range(f))}</td>{wall}'
            f'<td class="sig"><span class="chip sev-bg-{sev}">{html_text(f.severity)}</span> <code>{_wbr(f.signature)}</code>'
            f'{metric}</td><td class="summary">{summary}</td><td class="span">{bar}</td></tr>'
        )
    out.append("</tbody></table>")
    return out


def _finding(sm: RunSummary, f: Finding, idx: int, j: int) -> list[str]:
    """One finding's card: its heading, the cause and fix not said yet (the lead's are in the verdict, a finding of
    the lead's own event shares them), and its evidence. Its summary is the timeline's row."""
    sev = str(f.severity)
    where = f" at step {step_range(f)}" if f.step is not None else ""
    out = [
        f'<article class="finding sev-{sev}" id="finding-{idx}-{j}" data-signature="{html_text(f.signature)}">',
        f'<h4><span class="chip sev-bg-{sev}">{html_text(f.severity)}</span><code>{html_text(f.signature)}</code>{html_text(where)}'
        + (f' <span class="muted">on <code>{html_text(f.metric)}</code></span>' if f.metric else "")
        + "</h4>",
    ]
    cause, fix = sm.advice_of(f)
    if cause:
        out.append(f"<div><b>Cause:</b> {html_text(cause)}</div>")
    if fix:
        out.append(f"<div><b>Fix:</b> {html_text(fix)}</div>")
    if f.evidence:
        rows = "".join(
            f"<tr><th class='mono'>{_wbr(k)}</th><td class='mono'>{html_value(v)}</td></tr>"
            for k, v in f.evidence.items()
        )
        out.append(
            f'<details class="evidence"><summary>evidence ({len(f.evidence)} values)</summary><table>{rows}</table>'
            "</details>"
        )
    out.append("</article>")
    return out


def _replay(sm: RunSummary) -> list[str]:
    found = sm.replay
    if not found:
        return []
    out = [
        "<h3>Replay</h3>",
        '<table class="replay evidence"><thead><tr><th>signature</th><th>step</th><th>evidence</th></tr></thead><tbody>',
    ]
    for f in found:
        ev = "<br>".join(f"<b>{html_text(k)}</b>: <code>{html_value(v)}</code>" for k, v in replay_evidence(f).items())
        out.append(
            f"<tr><td><code>{html_text(f.signature)}</code></td><td class='num'>{html_text(step_range(f))}</td><td>{ev}</td></tr>"
        )
    out.append("</tbody></table>")
    return out


def _config(sm: RunSummary) -> list[str]:
    cfg = sm.config
    full = sm.run.config or {}
    if not cfg and not full:
        return ["<h3>Config</h3>", '<p class="muted">no config found in the logs</p>']
    out = ["<h3>Config</h3>"]
    if cfg:
        out.append(
            "<table>"
            + "".join(
                f"<tr><th class='mono'>{_wbr(k)}</th><td class='mono'>{html_value(v)}</td></tr>" for k, v in cfg.items()
            )
            + "</table>"
        )
    if full:
        from autopsy.report.json import strict

        text = json.dumps(strict(full), indent=1, sort_keys=True, allow_nan=False)
        out.append(
            f"<details><summary>full config ({len(full)} keys)</summary><pre class='mono'>{html_text(text)}</pre></details>"
        )
    return out


def _sources(run: RunReport) -> list[str]:
    out = [
        "<h3>Sources read</h3>",
        "<table>",
        f"<tr><th>path</th><td class='mono'>{html_text(display_path(run.path))}</td></tr>",
        f"<tr><th>sources</th><td>{html_text(', '.join(run.sources) or 'none')}</td></tr>",
    ]
    info = run.info
    files = list(getattr(info, "files", []) or []) if info is not None else []
    if files:
        items = "<br>".join(html_text(f) for f in files[:50]) + (
            f"<br>... {len(files) - 50} more" if len(files) > 50 else ""
        )
        out.append(f"<tr><th>files</th><td class='mono'>{items}</td></tr>")
    checkpoints = dict(getattr(info, "checkpoints", {}) or {}) if info is not None else {}
    if checkpoints:
        out.append(
            f"<tr><th>checkpoints</th><td class='mono'>{html_text(', '.join(str(s) for s in sorted(checkpoints)))}</td></tr>"
        )
    out.append("</table>")
    damage = list(getattr(info, "damage", []) or []) if info is not None else []
    if damage:
        out.append(
            "<p class='damage'><b>Damaged input (salvaged what could be read):</b></p><table><thead><tr><th>file</th>"
            "<th>offset</th><th>problem</th><th>salvaged</th></tr></thead><tbody>"
        )
        out += [
            f"<tr><td class='mono'>{html_text(d.file)}</td><td class='num'>{html_text('' if d.offset is None else d.offset)}</td>"
            f"<td>{html_text(d.problem)}</td><td>{html_text(d.salvaged)}</td></tr>"
            for d in damage
        ]
        out.append("</tbody></table>")
    notes = list(getattr(info, "notes", []) or []) if info is not None else []
    if notes:
        out.append(
            "<p><b>Skipped while reading:</b></p><ul>" + "".join(f"<li>{html_text(n)}</li>" for n in notes) + "</ul>"
        )
    if run.skipped:  # one line per reason: "no train/grad_norm in this run" said once for all its detectors
        by_reason: dict[str, list[str]] = {}
        for sk in run.skipped:
            by_reason.setdefault(str(sk.get("reason", "")), []).append(str(sk.get("detector", "")))
        out.append(
            f'<details class="skipped"><summary>detectors skipped ({len(run.skipped)})</summary><ul>'
            + "".join(
                f"<li>{', '.join(f'<code>{html_text(d)}</code>' for d in names)}: {html_text(reason)}</li>"
                for reason, names in by_reason.items()
            )
            + "</ul></details>"
        )
    if run.errors:
        out.append(
            "<p class='damage'><b>Detector errors:</b></p><ul>"
            + "".join(
                f"<li><code>{html_text(x.get('detector', ''))}</code>: {html_text(x.get('error', ''))}</li>"
                for x in run.errors
            )
            + "</ul>"
        )
    return out


def _wbr(text: str) -> str:
    """Escaped, with a line-break opportunity after each ``/``, ``_``, ``.`` and a ``-`` before a digit (where a
    browser would not break by itself), so a long run name or path wraps at its parts, not at every letter."""
    return re.sub(r"([/_.]|-(?=\d))(?=.)", r"\1<wbr>", html_text(text))


def _comparison(fleet: FleetSummary) -> list[str]:
    rows = fleet.rows()
    cols = list(rows[0])
    out = [
        f'<section class="run" id="comparison"><h2>Summary</h2><p>{html_text(fleet.count_line)}</p><table class="compare">'
        "<thead><tr>" + "".join(f"<th>{html_text(c)}</th>" for c in cols) + "</tr></thead><tbody>"
    ]
    for i, r in enumerate(rows):
        cells = [f'<td class="name" title="{html_text(r["run"])}"><a href="#run-{i}">{_wbr(r["run"])}</a></td>']
        cells += [
            f'<td class="path">{_wbr(r[c])}</td>' if c in ("restart", "lead") else f"<td>{html_text(r[c])}</td>"
            for c in cols[1:]
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></section>")
    return out


def _scope(css: str, root: str = _ROOT) -> str:
    """Every rule of ``css`` (flat rules, no @-blocks) limited to ``root``: ``:root`` and ``body`` become ``root``
    itself, so the report's style cannot leak into a notebook around it."""
    out = []
    for sel, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        parts = [p.strip() for p in sel.split(",")]
        out.append(",".join(root if p in (":root", "body") else f"{root} {p}" for p in parts) + "{" + body + "}")
    return "\n".join(out)


def _body(report: Report, *, plots: bool, static: bool) -> tuple[str, str, bool]:
    """``(scoped css, inner html, has charts)`` of the report."""
    from autopsy.report._chart_html import CHART_CSS

    body: list[str] = [
        '<header class="top"><h1>autopsy report</h1>',
        f'<span class="muted">autopsy {html_text(report.version)} · {len(report.runs)} run(s)</span></header>',
    ]
    if not report.runs:
        body.append('<p class="muted">no run found</p>')
    fleet = summarize_fleet(report)
    body += fleet_findings_html(report)
    if len(report.runs) > 1:
        body += _comparison(fleet)
        body += small_multiples_html(report, fleet)
    plots = plots and not getattr(report, "frames_dropped", False)  # a fleet's runs keep a digest, not their series
    css = _CSS + CHART_CSS + (FLEET_CSS if hasattr(report, "fleet_findings") else "")
    for i, sm in enumerate(fleet.runs):
        run = sm.run
        body.append(f'<section class="run" id="run-{i}"><h2>{html_text(run.run)}</h2>')
        body += _verdict(sm, i)
        if plots:
            body += _plots(run, i, static)
        body += _timeline(sm, i)
        if sm.findings:
            body.append("<h3>Findings</h3>")
            for j, f in enumerate(sm.findings):
                body += _finding(sm, f, i, j)
        body += _replay(sm)
        body += ['<div class="config">', *_config(sm), "</div>", '<div class="sources">', *_sources(run), "</div>"]
        body.append("</section>")
    inner = "\n".join(body)
    return _scope(css), inner, 'class="ac-fig"' in inner


def render_html_body(report: Report, *, plots: bool = True, static_plots: bool = True) -> str:
    """The report without the page around it: one ``<div class="autopsy">`` with its own scoped ``<style>`` and,
    when it has charts, the charting ``<script>`` (a notebook's ``_repr_html_``). ``static_plots=False`` leaves
    out the SVG each chart shows before (or without) the script: smaller and faster, blank where scripts are off."""
    from autopsy.report._chart_html import CHART_JS

    css, inner, charts = _body(report, plots=plots, static=static_plots)
    script = f"<script>{CHART_JS}</script>\n" if charts else ""
    return f'<div class="autopsy">\n<style>{css}</style>\n<main>\n{inner}\n</main>\n{script}</div>\n'


def render_html(report: Report, *, plots: bool = True, title: str | None = None, static_plots: bool = True) -> str:
    """The report as one self-contained HTML page (``plots=False`` leaves the figures out)."""
    from autopsy.report._chart_html import CHART_JS, SCRIPT_HASH

    names = ", ".join(r.run for r in report.runs) or "no run"
    worst = report.worst
    head_status = (
        "FAILED"
        if worst == Severity.CRITICAL
        else ("problems found" if worst is not None and worst >= Severity.WARNING else "healthy")
    )
    page_title = title or f"autopsy: {head_status}: {names}"
    css, inner, charts = _body(report, plots=plots, static=static_plots)
    csp = CSP + (f"; script-src {SCRIPT_HASH}" if charts else "")
    script = f"<script>{CHART_JS}</script>\n" if charts else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html_text(page_title)}</title>\n<style>{_PAGE_CSS}\n{css}</style>\n</head>\n"
        f'<body><div class="autopsy"><main>\n{inner}\n</main>\n{script}</div></body></html>\n'
    )
