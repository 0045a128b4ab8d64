"""The chaos suite prints what its scenarios counted as one table at the end of the run."""

from __future__ import annotations

import pytest

from tests.chaos import ledger


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ledger.OUTCOMES:
        terminalreporter.section("Reliability (tests/chaos)")
        terminalreporter.write_line(ledger.table())
        ledger.write_report()
