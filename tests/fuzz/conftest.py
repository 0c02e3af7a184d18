"""Fuzz tests: count the cases each property ran and print the total at the end of the session."""

from __future__ import annotations

from helpers.fuzz_counter import CASES_RUN


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if CASES_RUN:
        terminalreporter.write_sep("-", f"fuzz: {sum(CASES_RUN.values())} cases run")
        for name, n in sorted(CASES_RUN.items()):
            terminalreporter.write_line(f"  {name}: {n}")
