"""Call detectors the way analyze does: through the registry (:meth:`DetectorSpec.run`), never the bare function."""

from __future__ import annotations

from typing import Any

import pandas as pd

from autopsy.detectors import get_detector
from autopsy.findings import Finding
from autopsy.runinfo import RunInfo


def detect(name: str, frame: pd.DataFrame, info: RunInfo | None = None, **params: Any) -> list[Finding]:
    """The findings of detector ``name`` on one run's frame; a detector error fails the test."""
    outcome = get_detector(name).run(frame, info, params)
    assert not outcome.errors, outcome.errors
    return outcome.findings
