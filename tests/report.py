"""Tests that run in another pytest process report back through this module.

That process (in the QEMU guest, tests/guest/conftest.py, or beside this one, tests/apart.py)
loads it with ``-p tests.report --report-json=FILE`` and writes each test's outcome, duration
and failure text there; here a `ResultItem` stands for each such test and turns its entry back
into an ordinary result.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

_results: dict[str, dict[str, object]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--report-json", default=None,
                     help="where to write the JSON results (the process reports to another)")


def reports_elsewhere(config: pytest.Config) -> bool:
    """True in a process whose results another reads: it runs its tests as they are."""
    try:
        return bool(config.getoption("--report-json"))
    except ValueError:  # this module was not loaded as a plugin here
        return False


def pytest_configure(config: pytest.Config) -> None:
    if reports_elsewhere(config):
        # Whoever started this run stops it with SIGINT, so that teardowns still run. A shell
        # starts background jobs with SIGINT ignored, and Python then keeps it ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    path = session.config.getoption("--report-json")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(_results, f)
        os.replace(tmp, path)


class RemoteFailure(Exception):
    pass


class ResultItem(pytest.Item):
    """Stands here for a test that runs in another pytest process: waits for its entry and
    reports it as this test's outcome. `where` names that process in every message."""

    where = "elsewhere"

    def __init__(self, *, real_nodeid: str, **kw) -> None:
        super().__init__(**kw)
        self.real_nodeid = real_nodeid

    @classmethod
    def standing_for(cls, item: pytest.Item, **kw) -> ResultItem:
        """A proxy with ITEM's markers (so -m and the ordering see it as they saw ITEM), but
        not its timeout: the proxy waits for the whole other run, whose own limits apply."""
        proxy = cls.from_parent(item.parent, name=item.name, real_nodeid=item.nodeid, **kw)
        for marker in item.iter_markers():
            if marker.name not in ("timeout", "parametrize"):
                proxy.add_marker(getattr(pytest.mark, marker.name)(*marker.args,
                                                                  **marker.kwargs))
        return proxy

    def entry(self) -> dict[str, object]:
        """This test's entry from the other run; RemoteFailure when there is none."""
        raise NotImplementedError

    def context(self) -> str:
        """What a failure report adds after the test's own text."""
        return ""

    def runtest(self) -> None:
        result = self.entry()
        if result["outcome"] == "skipped":
            pytest.skip(f"{self.where}: {result['text']}")
        if result["outcome"] == "failed":
            raise RemoteFailure(f"failed {self.where}:\n{result['text']}{self.context()}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, RemoteFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int, str]:
        return self.path, 0, f"{self.name} [{self.where}]"
