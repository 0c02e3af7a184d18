"""After the detectors: drop duplicates that say the same thing, order findings."""

from __future__ import annotations

import pandas as pd

from autopsy.findings import Finding
from autopsy.frame import RunInfo

__all__ = ["postprocess"]


def postprocess(findings: list[Finding], frame: pd.DataFrame, info: RunInfo) -> list[Finding]:
    """Order findings most severe first, then by step (hook for cross-finding rules)."""
    return sorted(findings, key=lambda f: (-int(f.severity), f.step if f.step is not None else 1 << 62, f.signature))
