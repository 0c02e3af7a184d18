"""How many cases each fuzz property ran (printed by conftest.py at the end of the session)."""

from collections import Counter

CASES_RUN: Counter[str] = Counter()
