"""Runs each test marked ``apart`` in a pytest process of its own, beside this one.

A few tests wait minutes on the clock with little CPU: the 3-minute soak, the rekey after
120 s, the parent away for 40 s. One after another they held the suite for six minutes in which
the machine was mostly idle. So, when other tests run too, each such test is replaced here by a
proxy item and runs in a pytest process started as this session's tests begin, at the same
priority, while this one runs the rest: the soak thus runs while the quiet tests do, as it
did before. The proxies come last and report each test's own outcome (tests/report.py). A run
of only ``apart`` tests runs them here, as usual.

Beside each other and the rest is safe for these: each builds its own namespaces, interfaces
and files, and checks only its own processes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.report import RemoteFailure, ResultItem, reports_elsewhere

# A run beside: longer than its test's own limit, which pytest-timeout keeps there.
APART_TIMEOUT = 900.0
STOP_GRACE = 60.0  # for an interrupted run's teardowns (its namespaces, daemons) to finish


class ApartRunner:
    """One pytest process beside this one, for one test."""

    def __init__(self, nodeid: str, rootdir: Path) -> None:
        self.nodeid = nodeid
        self.rootdir = rootdir
        self.results: dict[str, dict[str, object]] = {}
        self.error: str | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._done = False

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="wgvsock-apart-"))
        (self._dir / "tmp").mkdir()
        cmd = [
            # Interrupted from this process's death too: SIGINT, so its teardowns still run.
            "setpriv", "--pdeathsig", "INT",
            sys.executable, "-m", "pytest", "-p", "tests.report",
            f"--report-json={self._dir / 'results.json'}",
            f"--basetemp={self._dir / 'tmp'}",  # never another session's numbered directory
            "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rA", self.nodeid,
        ]
        self._started = time.monotonic()
        try:
            with open(self._dir / "output", "wb") as out:
                self._proc = subprocess.Popen(cmd, cwd=self.rootdir, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=subprocess.STDOUT)
        except OSError as e:  # its proxy says so; the session goes on
            self.error = f"it could not be started: {e}"
            self._done = True

    def output(self) -> str:
        if self._dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._dir / "output").read_text(errors="replace")
        return ""

    def wait(self) -> None:
        """Waits for the run (once); then `results` or `error` say how it went."""
        if self._done:
            return
        self._done = True
        assert self._proc is not None and self._dir is not None
        try:
            code = self._proc.wait(max(1.0, self._started + APART_TIMEOUT - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._interrupt()
            self.error = f"the run beside did not end within {APART_TIMEOUT:g} s"
            return
        try:
            self.results = json.loads((self._dir / "results.json").read_text())
        except (OSError, ValueError) as e:
            self.error = f"it wrote no results (exit code {code}): {e}"

    def _interrupt(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Interrupts a run still going (the session ended early: Ctrl-C, -x) and removes its
        files."""
        self._interrupt()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class ApartItem(ResultItem):
    where = "in the pytest process beside this one"

    def __init__(self, *, runner: ApartRunner, **kw) -> None:
        super().__init__(**kw)
        self.runner = runner

    def entry(self) -> dict[str, object]:
        self.runner.wait()
        if self.runner.error is not None:
            raise RemoteFailure(f"no run beside: {self.runner.error}\n--- its output ---\n"
                                + self.runner.output()[-5000:])
        result = self.runner.results.get(self.real_nodeid)
        if result is None:
            raise RemoteFailure("no result for this test from the run beside\n"
                                "--- its output ---\n" + self.runner.output()[-5000:])
        return result


_RUNNERS = pytest.StashKey[list[ApartRunner]]()


# After -m, -k and --deselect have chosen (they run as ordinary hooks), and after the guest's
# ordering: the proxies go last.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if reports_elsewhere(config) or config.option.collectonly:
        return
    apart = [item for item in items
             if item.get_closest_marker("apart") and not isinstance(item, ResultItem)]
    if not apart or len(apart) == len(items):
        return  # nothing to run beside
    # Skipped here (no root, say) they would only be skipped there too.
    apart = [item for item in apart if not item.get_closest_marker("skip")]
    if not apart:
        return
    runners, proxies = [], []
    for item in apart:
        runner = ApartRunner(item.nodeid, config.rootpath)
        proxy = ApartItem.standing_for(item, runner=runner)
        proxy.add_marker(pytest.mark.timeout(APART_TIMEOUT + STOP_GRACE + 60))
        runners.append(runner)
        proxies.append(proxy)
    config.stash[_RUNNERS] = runners
    chosen = {id(item) for item in apart}
    items[:] = [item for item in items if id(item) not in chosen] + proxies


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session):
    for runner in session.config.stash.get(_RUNNERS, []):
        runner.start()
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    for runner in session.config.stash.get(_RUNNERS, []):
        runner.stop()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    runners = [r for r in config.stash.get(_RUNNERS, []) if r.results]
    if not runners:
        return
    terminalreporter.section("beside this run")
    terminalreporter.write_line(f"{len(runners)} tests, each in a pytest process of its own")
    for runner in runners:
        for nodeid, result in runner.results.items():
            terminalreporter.write_line(f"  {result['duration']:6.1f} s  "
                                        f"{result['outcome']:7}  {nodeid}")
