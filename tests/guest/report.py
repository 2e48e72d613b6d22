"""Loaded into the pytest that runs inside the guest (``-p tests.guest.report``): writes each
test's outcome, duration and failure text to a JSON file on the results share, which the host's
proxy items (tests/guest/conftest.py) turn back into ordinary test results."""

from __future__ import annotations

import json
import os

import pytest

_results: dict[str, dict[str, object]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--guest-report", default=None, help="where to write the JSON results")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0,
                                                "text": ""})
    entry["duration"] = float(entry["duration"]) + report.duration  # type: ignore[arg-type]
    if report.outcome == "passed":
        return
    if report.skipped:
        if entry["outcome"] == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
            entry.update(outcome="skipped", text=str(reason))
        return
    sections = "\n".join(f"--- {name} ---\n{content}" for name, content in report.sections)
    entry.update(outcome="failed",
                 text=f"{entry['text']}\n[{report.when}] {report.longreprtext}\n{sections}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--guest-report")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(_results, f)
        os.replace(tmp, path)
