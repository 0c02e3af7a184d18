"""Renderers: one Report, four ways (console, Markdown, HTML, JSON). Pure functions of the report."""

from __future__ import annotations

from typing import Any

from autopsy.errors import UsageError
from autopsy.findings import Report

__all__ = ["FORMATS", "render"]

FORMATS = ("console", "markdown", "json", "html")


def render(report: Report, fmt: str = "console", **options: Any) -> str:
    """Render ``report`` as ``fmt`` (console, markdown, json, html)."""
    if fmt == "console":
        from autopsy.report.console import render_console

        return render_console(report, **options)
    if fmt in ("markdown", "md"):
        from autopsy.report.markdown import render_markdown

        return render_markdown(report, **options)
    if fmt == "json":
        from autopsy.report.json import render_json

        return render_json(report)
    if fmt == "html":
        from autopsy.report.html import render_html

        return render_html(report, **options)
    raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
