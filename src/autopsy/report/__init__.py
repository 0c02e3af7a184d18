"""Renderers: one Report, four ways (console, Markdown, HTML, JSON). Pure functions of the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autopsy.errors import UsageError
from autopsy.findings import Report

__all__ = ["EXTENSIONS", "FORMATS", "format_for", "render"]

FORMATS = ("console", "markdown", "json", "html")
EXTENSIONS = {
    ".json": "json",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".txt": "console",
}


def format_for(path: str | os.PathLike[str]) -> str:
    """The report format a file's extension names (a clear error for any other)."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise UsageError(f"{path}: unknown extension {suffix or '(none)'!r}; use .html, .md, .json or .txt")
    return EXTENSIONS[suffix]


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
