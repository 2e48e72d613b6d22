"""Runs the tests marked ``guest`` inside one throw-away QEMU guest (tests/guest/rig.py).

On this machine each such test is replaced by a proxy item, and the guest is booted once for
all of them, where pytest runs the real tests as root; each proxy then reports its own test's
outcome from the guest, with the guest's output when it failed. Inside the guest
(``rig.in_guest()``) the tests run as they are.

The guest takes minutes of this machine's CPU (TCG), and the host tests leave much of it idle
(they wait on timers, timeouts and their peers: 30-50 % of the machine on average). So the
guest boots in the background as the session starts, at nice 19, and the host tests run beside
it (they keep the CPU they ask for; the guest gets what they leave): first the ``quiet`` ones,
which mostly wait (watchdog timeouts, freezes, refused probes),
then the rest; the proxies come last and wait for what is left of the guest run, if anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.report import RemoteFailure, ResultItem
from wgvsock.conn.bind import Bind

from . import rig

# The whole guest run, and each test in it: beside the host tests it gets only the CPU they
# leave, at times for minutes.
GUEST_TIMEOUT = 1800.0
GUEST_TEST_TIMEOUT = 900
SLOWDOWN = 4  # command time limits in the guest (tests/net/netlab.py): TCG is 15-65x slower
BESIDE_NICE = 19  # QEMU's nice value while host tests run beside it
CARRIED_ENV = ("PYTHONPATH", "WGVSOCK_SHARED")


class GuestRunner:
    """Boots the guest once (in the background) and keeps its results for every proxy."""

    def __init__(self, nodeids: list[str]) -> None:
        self.nodeids = nodeids
        self.run: rig.GuestRun | None = None
        self.results: dict[str, dict[str, object]] = {}
        self.error: str | None = None
        self.beside = 0  # how many host tests run beside the guest
        self._guest: rig.Guest | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self, *, beside: bool = False) -> None:
        """Boots the guest unless it was; BESIDE: at a low priority, beside host tests."""
        with self._lock:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._boot, args=(BESIDE_NICE if beside else 0,),
                    # Not "wgvsock-...": test_binds counts threads so named as a bind's.
                    name="guest-runner", daemon=True)
                self._thread.start()

    def result_for(self, nodeid: str) -> dict[str, object] | None:
        self.start()
        assert self._thread is not None
        self._thread.join()
        return self.results.get(nodeid)

    def stop(self) -> None:
        """Kills a guest still running (the session ends early: Ctrl-C, -x, a crash)."""
        with self._lock:
            self._stopped = True
            guest, thread = self._guest, self._thread
        if guest is not None:
            guest.kill()
        if thread is not None:
            thread.join(30)

    def _boot(self, nice: int) -> None:
        share = Path(tempfile.mkdtemp(prefix="wgvsock-guest-"))
        report = f"{rig.GUEST_SHARE}/results.json"
        # The venv's interpreter (a link to the real binary, never a pyenv shim, which takes
        # seconds to start under TCG), so the tests find the venv's console scripts beside it.
        python = sys.executable
        venv = Path(sys.executable).parent.parent
        # The guest's PID 1 starts with an empty environment: what picks the code under test
        # (PYTHONPATH, for a worktree beside the checkout the venv was installed from) is
        # carried in, or the guest's daemons would run the venv's checkout.
        carried = "".join(f" {name}={shlex.quote(os.environ[name])}"
                          for name in CARRIED_ENV if os.environ.get(name))
        command = (
            f"export VIRTUAL_ENV={shlex.quote(str(venv))} "
            f"PATH={shlex.quote(str(venv / 'bin'))}:$PATH PYTHONDONTWRITEBYTECODE=1 "
            f"WGVSOCK_TEST_SLOWDOWN={SLOWDOWN:g}{carried}\n"
            # Reads the daemon's modules over 9p once, so the first test's daemon starts as
            # quickly as the others.
            f"{shlex.quote(python)} -c 'import wgvsock.daemon, wgvsock.roles.cli'\n"
            f"{shlex.quote(python)} -m pytest -p tests.report --report-json={report} "
            f"-p no:cacheprovider -o addopts= -o timeout={GUEST_TEST_TIMEOUT} -q -rA "
            + " ".join(shlex.quote(n) for n in self.nodeids)
        )
        try:
            guest = rig.start(command, share=share, nice=nice)
        except (rig.GuestError, OSError, subprocess.SubprocessError) as exc:
            self.error = str(exc)
            return
        with self._lock:
            self._guest = guest
            if self._stopped:
                guest.kill()
        try:
            self.run = guest.finish(GUEST_TIMEOUT)
            with contextlib.suppress(OSError, ValueError):  # no results: each proxy says so
                self.results = json.loads((share / "results.json").read_text())
        except Exception as exc:  # a thread's error would reach no proxy otherwise
            self.error = f"collecting its results failed: {type(exc).__name__}: {exc}"
        finally:
            # The run keeps what a report needs (output, console); the share is throw-away.
            shutil.rmtree(share, ignore_errors=True)


class GuestItem(ResultItem):
    """Stands for one guest test on this machine."""

    where = "in the QEMU guest"

    def __init__(self, *, runner: GuestRunner, **kw) -> None:
        super().__init__(**kw)
        self.runner = runner

    def entry(self) -> dict[str, object]:
        result = self.runner.result_for(self.real_nodeid)
        if self.runner.error is not None:
            raise RemoteFailure(f"no guest run: {self.runner.error}")
        run = self.runner.run
        assert run is not None
        if result is None:
            raise RemoteFailure("no result from the guest for this test\n" + run.explain())
        return result

    def context(self) -> str:
        assert self.runner.run is not None
        return ("\n--- guest console (tail) ---\n"
                + "\n".join(self.runner.run.console.splitlines()[-40:]))


@pytest.fixture
def binds() -> Iterator[list[Bind]]:
    """The transports a guest test opened, closed after it whatever its end."""
    made: list[Bind] = []
    yield made
    for b in made:
        b.close()


# After -m, -k and --deselect have chosen (they run as ordinary hooks): a guest that no
# chosen test needs is not booted.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if rig.in_guest() or os.geteuid() != 0:
        return  # in the guest the tests run as they are; without root they are skipped
    nodeids = [item.nodeid for item in items if item.get_closest_marker("guest")]
    if not nodeids:
        return
    runner = GuestRunner(nodeids)
    config.stash[_RUNNER] = runner
    for i, item in enumerate(items):
        if item.get_closest_marker("guest"):
            proxy = GuestItem.standing_for(item, runner=runner)
            proxy.add_marker(pytest.mark.timeout(GUEST_TIMEOUT + 60))
            items[i] = proxy
    # The host tests beside the guest, the quiet ones first (they leave it the most CPU while it
    # boots), then the proxies; each group in its collected order.
    proxies = [item for item in items if isinstance(item, GuestItem)]
    quiet = [item for item in items
             if not isinstance(item, GuestItem) and item.get_closest_marker("quiet")]
    rest = [item for item in items
            if not isinstance(item, GuestItem) and not item.get_closest_marker("quiet")]
    items[:] = quiet + rest + proxies
    runner.beside = len(quiet) + len(rest)


_RUNNER = pytest.StashKey[GuestRunner]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    # The guard for every real guest test: they connect AF_VSOCK, which only the guest may.
    if item.get_closest_marker("guest") and not isinstance(item, GuestItem):
        rig.require_guest()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session):
    # A session-wide hook: pytest_runtest_setup here would see only tests/guest's own items.
    runner = session.config.stash.get(_RUNNER, None)
    if runner is not None and runner.beside and not session.config.option.collectonly:
        runner.start(beside=True)
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    runner = session.config.stash.get(_RUNNER, None)
    if runner is not None:
        runner.stop()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    runner = config.stash.get(_RUNNER, None)
    if runner is None or runner.run is None:
        return
    run = runner.run
    terminalreporter.section("QEMU guest")
    terminalreporter.write_line(f"boot to command: {run.boot_seconds:.1f} s; whole guest run: "
                                f"{run.seconds:.1f} s; exit code {run.returncode}")
    if runner.beside:
        terminalreporter.write_line(f"booted at nice {BESIDE_NICE} beside {runner.beside} host "
                                    "tests")
    for nodeid, result in runner.results.items():
        terminalreporter.write_line(f"  {result['duration']:6.1f} s  {result['outcome']:7}  "
                                    f"{nodeid}")
