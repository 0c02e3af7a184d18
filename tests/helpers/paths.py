"""Paths shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
RUNS = FIXTURES / "runs"
SHARED = REPO.parent / "shared"
REAL_LOGS = SHARED / "real-logs"
ISSUE_LOGS = SHARED / "issue-logs"


def needs_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not present (../shared/ is beside the repo in CI and on dev machines)")
