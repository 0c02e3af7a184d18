"""One Report rendered four ways: golden files on a fixed synthetic report, content checks on real runs.

Regenerate the goldens after an intended change with ``AUTOPSY_UPDATE_GOLDEN=1 pytest tests/test_report_render.py``
and read the diff.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from autopsy.report import render
from helpers.cli import run_cli
from helpers.report import HOSTILE, synthetic_report

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("AUTOPSY_UPDATE_GOLDEN") == "1"


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden {path}: run with AUTOPSY_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


@pytest.mark.parametrize(("fmt", "name", "opts"), [
    ("markdown", "report.md", {}),
    ("console", "report.txt", {"color": False, "width": 100, "verbose": True}),
    ("json", "report.json", {}),
    ("html", "report.html", {"plots": False}),
])
def test_golden(fmt, name, opts):
    report = synthetic_report(runs=2)
    text = render(report, fmt, **opts)
    assert text == render(synthetic_report(runs=2), fmt, **opts), "rendering is not deterministic"
    _check_golden(name, text)


def test_html_is_self_contained_escaped_and_has_every_section():
    html = render(synthetic_report(runs=2), "html")
    assert html == render(synthetic_report(runs=2), "html"), "plots are not deterministic"
    # no external URL anywhere: only data: images; CSP forbids fetching
    assert not re.search(r"(?:src|href)\s*=\s*[\"'](?!data:|#)", html)
    assert "http://" not in html and "https://" not in html
    # one script, ours (the charts; the CSP lets only its hash run), and the charts' JSON data blocks: none loads a URL
    scripts = re.findall(r"<script\b[^>]*>", html, re.I)
    assert scripts.count("<script>") == 1
    assert set(scripts) == {"<script>", '<script type="application/json" class="ac-data">'}
    assert "script-src 'sha256-" in html and "script-src 'unsafe-inline'" not in html
    assert "default-src 'none'" in html
    # user strings are escaped (the run name and a config key carry markup)
    assert HOSTILE not in html and "<b>odd key</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;run|1" in html
    plots = re.findall(r'<img class="plot" data-plot="(\w+)" src="data:image/svg\+xml;base64,([^"]+)"', html)
    assert [p for p, _ in plots[:3]] == ["loss", "grad_norm", "learning_rate"]
    svg = base64.b64decode(plots[0][1]).decode()
    assert svg.lstrip().startswith("<?xml") and "nan_grad_norm" in svg and "@ 31" in svg  # the loss plot is annotated
    for section in ("Summary", "Plots", "Timeline", "Findings", "Replay", "Config", "Sources read"):
        assert f">{section}</h" in html, section
    verdict = html[html.index('id="verdict-0"'):html.index('id="plot-0-loss"')]
    assert "FAILED" in verdict and "step 31" in verdict and "checkpoint-30" in verdict and "bf16" in verdict
    # replay evidence, salvage, wall time of the first bad step (1_700_000_000 + 2*31 s)
    assert "model.layers.0.mlp" in html and "forward" in html and "finite_in_float32" in html
    assert "truncated record &lt;crc&gt;" in html and "212 of 230 events" in html
    assert "2023-11-14 22:14:22 UTC (+1m00s)" in html
    # the healthy run of the comparison says so
    assert re.search(r'<a href="#run-1">healthy-run</a></td><td>healthy</td>', html)


def test_json_is_the_strict_contract():
    doc = json.loads(render(synthetic_report(), "json"), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    run = doc["runs"][0]
    assert set(run) >= {"run", "path", "sources", "config", "findings", "skipped"}
    assert run["run"] == HOSTILE
    for f in run["findings"]:
        assert set(f) >= {"signature", "severity", "step", "end_step", "metric", "summary", "evidence", "cause", "fix"}
        assert f["severity"] in ("info", "warning", "error", "critical")
    by = {f["signature"]: f for f in run["findings"]}
    assert by["nan_grad_norm"]["evidence"]["first_value"] == "NaN" and by["nan_grad_norm"]["step"] == 31
    assert by["nonfinite_origin"]["evidence"]["module"] == "model.layers.0.mlp"


def test_markdown_writes_plots_beside_it(tmp_path):
    md = render(synthetic_report(), "markdown", plots_dir=tmp_path / "r_plots")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 3 and all(link.startswith("r_plots/") for link in links)
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert HOSTILE not in md  # '<' is escaped and '|' cannot break a table
    assert "Restart:** restart from runs/" in md and "checkpoint-30 (step 30), 1 step to redo" in md


def test_nan_run_html_and_markdown_name_the_failure(nan_run, tmp_path):
    """Acceptance: the real Trainer run that went NaN after step 30, as a user runs it."""
    before = sorted(p.name for p in nan_run.rglob("*"))
    html_out, md_out = tmp_path / "report.html", tmp_path / "report.md"
    r = run_cli("analyze", nan_run, "--out", html_out)  # the extension picks html
    assert r.returncode == 1, r.stderr  # the run FAILED: exit 1, the report written all the same
    r = run_cli("analyze", nan_run, "--format", "markdown", "--out", md_out)
    assert r.returncode == 1, r.stderr
    html, md = html_out.read_text(), md_out.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'<img class="plot"[^>]* src="data:image/svg\+xml;base64,', html)) >= 2
    assert not re.search(r"(?:src|href)\s*=\s*[\"'](?!data:|#)", html) and "https://" not in html
    verdict = html[html.index('id="verdict-0"'):html.index("</div>", html.index('class="restart"'))]
    for text in (md, verdict):
        assert "nan_grad_norm" in text
        assert re.search(r"\bstep 31\b", text)
        assert "checkpoint-30" in text
    assert len(list((tmp_path / "report_plots").glob("*.png"))) >= 2
    assert sorted(p.name for p in nan_run.rglob("*")) == before, "the analysed directory was written to"
    r = run_cli("analyze", nan_run, "--format", "markdown", "--out", tmp_path / "np.md", "--no-plots")
    assert r.returncode == 1 and not (tmp_path / "np_plots").exists() and "![" not in (tmp_path / "np.md").read_text()


def test_several_runs_make_one_report_with_a_comparison(nan_run, healthy_run):
    from autopsy.analysis import analyze
    from autopsy.frame import concat_frames
    from autopsy.importers import load

    report = analyze(concat_frames([load(nan_run), load(healthy_run)]))
    html = render(report, "html", plots=False)
    md = render(report, "markdown")
    assert 'id="comparison"' in html and 'id="run-0"' in html and 'id="run-1"' in html
    for text in (html, md):
        assert "nan-at-31" in text and "healthy" in text
    row = re.search(r"\| nan-at-31 \| FAILED \| \w+ \| 31 \|", md)
    assert row, md[:800]
