"""`wgvsock enclave up`'s CMD as an init runs it: a CMD that cannot be run, a tunnel that
breaks while CMD starts or that CMD will not stop for. Found by an adversarial review of the
entrypoint; each failed before its fix. Signals and PID 1's orphans:
tests/test_enclave_lifecycle.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from wgvsock.conn.stream import StreamBind
from wgvsock.device.device import Device
from wgvsock.roles import cmd
from wgvsock.roles import enclave as enclave_mod
from wgvsock.services.profile import EnclaveUser, load_profile
from wgvsock.ui.nslab import wait_for

PROFILE = Path(__file__).resolve().parent / "data" / "profile-unix.yaml"


@pytest.fixture
def deaths(monkeypatch) -> Iterator[list[Callable[[str], None]]]:
    """`enclave up` with no network and its tunnel up at once; yields where run_up's
    thread-death hook lands (calling it stands for a thread of the tunnel dying)."""
    hooks: list[Callable[[str], None]] = []
    monkeypatch.setattr(enclave_mod.Enclave, "start", lambda self: None)
    monkeypatch.setattr(enclave_mod.Enclave, "wait_connected", lambda self, t: None)
    monkeypatch.setattr(enclave_mod.netconf, "default_routes", list)  # as in an enclave
    # run_up installs a process-wide thread-death hook and signal handlers: keep ours.
    monkeypatch.setattr(enclave_mod, "on_thread_death", hooks.append)
    saved = {s: signal.getsignal(s) for s in enclave_mod.FORWARDED_SIGNALS}
    yield hooks
    for s, h in saved.items():
        signal.signal(s, h)


def _kill_later(pid_file: Path, after: float) -> threading.Timer:
    """Ends the CMD whose pid PID_FILE holds after AFTER seconds, so that a test of a
    `enclave up` that would wait for it for ever fails instead of hanging."""

    def kill() -> None:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)

    t = threading.Timer(after, kill)
    t.daemon = True
    t.start()
    return t


def _writes_its_pid(pid_file: Path) -> str:
    """The start of a CMD script that writes its pid to PID_FILE, whole or not at all."""
    return f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; "


def _when_cmd_runs(pid_file: Path, action: Callable[[], None]) -> None:
    """Calls ACTION, in a thread of its own, once the CMD that writes PID_FILE runs."""

    def run() -> None:
        wait_for(pid_file.exists, 10, "CMD to start")
        action()

    threading.Thread(target=run, daemon=True).start()


def _run_up(command: list[str], pid_file: Path, give_up: float) -> tuple[int, float]:
    """run_up's exit code with COMMAND and how long it took; the CMD whose pid PID_FILE
    holds is killed after GIVE_UP seconds (_kill_later)."""
    safety = _kill_later(pid_file, give_up)
    t0 = time.monotonic()
    try:
        rc = enclave_mod.run_up(load_profile(str(PROFILE)), command, timeout=5)
    finally:
        safety.cancel()
    return rc, time.monotonic() - t0


def test_a_cmd_that_ignores_sigterm_is_killed_when_the_tunnel_breaks(
        deaths, monkeypatch, tmp_path: Path, capsys) -> None:
    """Before: the tunnel broke (a thread died), CMD got SIGTERM and ignored it, and `enclave
    up` waited for it for ever: the app ran on without a network and nothing said so."""
    monkeypatch.setattr(enclave_mod, "STOP_GRACE", 0.5)
    pid = tmp_path / "pid"
    script = f"trap '' TERM; {_writes_its_pid(pid)}while :; do sleep 0.05; done"
    _when_cmd_runs(pid, lambda: deaths[0]("thread tun-reader died: RuntimeError: boom"))
    rc, elapsed = _run_up(["sh", "-c", script], pid, 20)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert elapsed < 10, f"CMD was left running {elapsed:.0f} s after the tunnel broke"
    assert "stopped: thread tun-reader died: RuntimeError: boom" in err
    assert "did not stop within 0.5 s of SIGTERM; killing it" in err


def test_a_tunnel_that_breaks_while_cmd_is_being_started_stops_it(
        deaths, monkeypatch, tmp_path: Path, capsys) -> None:
    """Before: a thread that died (or the device stopping) between the tunnel coming up and
    Popen returning found no CMD to stop; CMD then ran on without a network, `enclave up`
    waiting for it."""
    pid = tmp_path / "pid"
    real = subprocess.Popen

    class Popen(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            pid.write_text(str(self.pid))
            deaths[0]("the tunnel device stopped: interface wg0 was deleted")

    sent: list[int] = []
    real_signal_child = enclave_mod._signal_child

    def signal_child(child, signum: int) -> None:
        sent.append(signum)
        real_signal_child(child, signum)

    monkeypatch.setattr(enclave_mod.subprocess, "Popen", Popen)
    monkeypatch.setattr(enclave_mod, "_signal_child", signal_child)
    rc, elapsed = _run_up(["sleep", "30"], pid, 10)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert elapsed < 8, f"CMD ran on {elapsed:.0f} s without its tunnel"
    assert "stopped: the tunnel device stopped: interface wg0 was deleted" in err
    # Once: the main thread and the failing one both look for CMD, and a second SIGTERM
    # means "now" to many apps.
    assert sent == [signal.SIGTERM]


# `enclave up` with no network and its tunnel up at once, a grace of 3 s and freezes of 1 s
# seen; the tunnel breaks once CMD has written its pid (argv: profile, pid file, CMD script).
_GRACE_ACROSS_A_FREEZE = r"""
import sys, threading
from pathlib import Path
from wgvsock.roles import enclave
from wgvsock.services.profile import load_profile
from wgvsock.ui.nslab import wait_for
enclave.Enclave.start = lambda self: None
enclave.Enclave.wait_connected = lambda self, t: None
enclave.netconf.default_routes = list
enclave.STOP_GRACE, enclave.FROZEN_AFTER, enclave.LIVENESS_EVERY = 3.0, 1.0, 0.1
hooks = []
enclave.on_thread_death = hooks.append
def break_tunnel():
    wait_for(Path(sys.argv[2]).exists, 10, "CMD to start")
    hooks[0]("thread tun-reader died: RuntimeError: boom")
threading.Thread(target=break_tunnel, daemon=True).start()
sys.exit(enclave.run_up(load_profile(sys.argv[1]), ["sh", "-c", sys.argv[3]], timeout=5))
"""


def test_a_freeze_during_the_grace_after_sigterm_is_not_counted(tmp_path: Path) -> None:
    """Before: the grace between the SIGTERM a broken tunnel sends CMD and the SIGKILL was
    wall-clock time, so CMD, frozen with `up` (docker pause, a paused VM) for most of it, got
    SIGKILL right after the resume with no time left to end cleanly. Now the freeze does not
    count: CMD has what was left of its grace after the resume."""
    pid, termed = tmp_path / "pid", tmp_path / "termed"
    script = f"trap 'echo > {termed}' TERM; {_writes_its_pid(pid)}while :; do sleep 0.05; done"
    up = subprocess.Popen([sys.executable, "-c", _GRACE_ACROSS_A_FREEZE, str(PROFILE),
                           str(pid), script], stderr=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    try:
        wait_for(termed.exists, 20, "CMD's SIGTERM")
        got_term = time.monotonic()
        cmd = int(pid.read_text())
        for p in (up.pid, cmd):  # all of the container, as docker pause does
            os.kill(p, signal.SIGSTOP)
        time.sleep(2.0)  # the freeze itself: more than FROZEN_AFTER, less than the grace
        resumed = time.monotonic()
        for p in (up.pid, cmd):
            os.kill(p, signal.SIGCONT)
        _, err = up.communicate(timeout=20)
        ended = time.monotonic()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    assert up.returncode == 1, err
    assert "did not stop within 3 s of SIGTERM; killing it" in err, err
    # Wall-clock, the SIGKILL came 3 s after the SIGTERM, under a second after the resume;
    # now what is left of the 3 s after the resume (less up to 0.1 s: the wait that saw the
    # freeze is not counted whole).
    before_the_freeze = resumed - 2.0 - got_term
    assert ended - resumed > 3.0 - before_the_freeze - 0.5, (ended - resumed, before_the_freeze)


@pytest.mark.parametrize(("command", "code", "says"), [
    (["/nonexistent/app"], 127, "cannot run /nonexistent/app: No such file or directory"),
    (["no-such-app-here"], 127, "cannot run no-such-app-here: not found in PATH"),
    (["{tmp}/data.txt"], 126, "cannot run {tmp}/data.txt: not executable (mode 0644, owner "
     "{owner}); in the image, chmod +x {tmp}/data.txt"),
    (["{tmp}"], 126, "cannot run {tmp}: is a directory"),
])
def test_a_cmd_that_cannot_be_run_is_refused_before_the_tunnel_comes_up(
        command, code, says, monkeypatch, tmp_path: Path, capsys) -> None:
    """Before: the tunnel came up first (up to --timeout waiting for the parent, a
    registration and an attestation), and then `enclave up` exited 1, as it does when the
    parent never answers. Now the shell's codes, 127 (not found) and 126 (not runnable), at
    once."""
    data = tmp_path / "data.txt"
    data.write_text("not a program\n")
    data.chmod(0o644)
    command = [a.format(tmp=tmp_path) for a in command]
    says = says.format(tmp=tmp_path, owner=f"{data.stat().st_uid}:{data.stat().st_gid}")
    started: list[bool] = []
    monkeypatch.setattr(enclave_mod.Enclave, "start", lambda self: started.append(True))
    monkeypatch.setattr(enclave_mod.Enclave, "wait_connected", lambda self, t: None)
    monkeypatch.setattr(enclave_mod, "on_thread_death", lambda f: None)
    monkeypatch.setattr(enclave_mod.netconf, "default_routes", list)  # as in an enclave
    saved = {s: signal.getsignal(s) for s in enclave_mod.FORWARDED_SIGNALS}
    try:
        rc = enclave_mod.run_up(load_profile(str(PROFILE)), command, timeout=5)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert rc == code, err
    assert f"wgvsock enclave up: {says}" in err
    assert started == []


def test_on_a_host_the_default_route_is_refused_before_a_missing_cmd(monkeypatch,
                                                                     capsys) -> None:
    """Run on a host by mistake, where CMD is often not installed either: the refusal that
    matters comes first (before, `up` said 127, not found, and an operator who installed
    CMD then had the host's network taken)."""
    from wgvsock.device.netconf import DefaultRoute

    monkeypatch.setattr(enclave_mod.netconf, "default_routes",
                        lambda: [DefaultRoute(4, "default via 192.0.2.1 dev eth0")])
    monkeypatch.setattr(enclave_mod.Enclave, "start", lambda self: pytest.fail("started"))
    rc = enclave_mod.run_up(load_profile(str(PROFILE)), ["/nonexistent/app"], timeout=5)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("wgvsock enclave up: refusing to start: this network namespace "
                          "already has a default route (default via 192.0.2.1 dev eth0)")
    assert "/nonexistent/app" not in err


@pytest.mark.parametrize(("error", "code"), [
    (FileNotFoundError(2, "No such file or directory"), 127),
    (PermissionError(13, "Permission denied"), 126),
    (OSError(8, "Exec format error"), 126),
    (BlockingIOError(11, "Resource temporarily unavailable"), 1),  # fork failed: ours
])
def test_a_cmd_that_fails_to_start_after_the_check_exits_as_a_shell_would(
        deaths, monkeypatch, error, code, capsys) -> None:
    """What the check before the tunnel cannot see (a script whose interpreter is missing,
    an executable for another machine) fails in Popen: 127 or 126 too, not 1."""

    def popen(*a, **kw):
        raise error

    monkeypatch.setattr(enclave_mod.subprocess, "Popen", popen)
    rc = enclave_mod.run_up(load_profile(str(PROFILE)), ["true"], timeout=5)
    err = capsys.readouterr().err
    assert rc == code, err
    assert f"wgvsock enclave up: cannot run true: {error.strerror}" in err


class _StuckDevice:
    """Stands for the tunnel's Device: up, then its data path stuck (a TUN reader that no
    longer comes round its loop) from the moment `stuck` is set."""

    def __init__(self) -> None:
        self.stuck = threading.Event()
        self.asked_limits: list[float] = []

    def on_stop(self, hook) -> None:
        pass

    def stalled(self, now: float, limit: float = 8.0, excused=None) -> str | None:
        self.asked_limits.append(limit)
        if self.stuck.is_set():
            return (f"interface wg0: the TUN reader has not come round its loop for "
                    f"{limit + 1:.0f} s (data path stuck)")
        return None

    def close(self) -> None:
        pass


def test_a_tunnel_whose_data_path_is_stuck_stops_cmd(deaths, monkeypatch, tmp_path: Path,
                                                      capsys) -> None:
    """Before: a data path that hung (a TUN reader or timer thread stuck, not dead) was noticed
    by nothing in the enclave, where no systemd watchdog runs as on the parent: CMD ran on
    without a network for ever."""
    device = _StuckDevice()

    def start(self) -> None:
        self.device = device

    monkeypatch.setattr(enclave_mod.Enclave, "start", start)
    monkeypatch.setattr(enclave_mod, "LIVENESS_EVERY", 0.05)
    pid = tmp_path / "pid"
    _when_cmd_runs(pid, device.stuck.set)
    rc, elapsed = _run_up(["sh", "-c", f"{_writes_its_pid(pid)}exec sleep 30"], pid, 8)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert elapsed < 6, f"CMD ran on {elapsed:.0f} s on a stuck tunnel"
    assert ("stopped: the tunnel is stuck: interface wg0: the TUN reader has not come round "
            "its loop for 31 s (data path stuck)") in err
    # More patient than the parent's watchdog (8 s): stopping costs the app and the enclave.
    assert set(device.asked_limits) == {30.0}


class _Paused:
    """The liveness thread's clock and waits, and a data path, for a process that may be
    frozen (docker pause, the cgroup freezer, SIGSTOP, a paused VM whose clock ran on) and
    resumed. Each wait of the liveness thread takes the next STEPS entry: (how long it took,
    what the data path did meanwhile): "ran" (its threads came round before the liveness
    thread looked), "late" (they come round just after it looked: the liveness thread was
    scheduled first on resume), "stuck", or "hogged" (stuck, with one thread using the CPU
    all the while). Then its STOP is set."""

    def __init__(self, steps: list[tuple[float, str]]) -> None:
        self.now = 1000.0
        self.cpu = 5.0  # the process's CPU time
        self.came_round = self.now  # when the timer thread and TUN reader last did
        self.steps = list(steps)
        self.late = False
        self.asked: list[float] = []  # when the liveness thread looked

    def monotonic(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.cpu

    def wait(self, timeout: float | None = None) -> bool:
        if self.late:  # the data path runs right after the liveness thread looked
            self.came_round, self.late = self.now, False
        if not self.steps:
            return True
        took, data_path = self.steps.pop(0)
        self.now += took
        self.cpu += took if data_path == "hogged" else 0.001
        if data_path == "ran":
            self.came_round = self.now
        self.late = data_path == "late"
        return False

    def stalled(self, now: float, limit: float = 8.0, excused=None) -> str | None:
        self.asked.append(now)  # Device.stalled's judgment, on this clock
        since = self.came_round
        behind = now - since - (excused(since, now) if excused is not None else 0.0)
        if behind > limit:
            return (f"interface wg0: the TUN reader has not come round its loop for "
                    f"{behind:.0f} s (data path stuck)")
        return None


def _watch(monkeypatch, paused: _Paused) -> list[tuple[float, str]]:
    """Runs the liveness thread's loop here on PAUSED's clock; (when, why) of each failure."""
    import types

    monkeypatch.setattr(enclave_mod, "time", types.SimpleNamespace(
        monotonic=paused.monotonic, process_time=paused.process_time))
    failed: list[tuple[float, str]] = []
    enclave_mod._watch_liveness(paused, paused, lambda why: failed.append((paused.now, why)))
    return failed


def test_a_healthy_tunnel_is_not_judged_stuck_after_the_process_was_frozen(monkeypatch) -> None:
    """Before: after `docker pause` (or SIGSTOP, or the cgroup freezer) for longer than
    STUCK_AFTER, the liveness thread could run first on resume, before the timer thread and
    TUN reader had come round, see a 61 s gap and stop a healthy app."""
    paused = _Paused([(1.0, "ran")] * 5 + [(61.0, "late")] + [(1.0, "ran")] * 40)
    assert _watch(monkeypatch, paused) == []
    assert paused.asked[-1] == 1000.0 + 5 + 61 + 40  # it went on judging to the end


def test_a_data_path_stuck_after_a_freeze_is_judged_from_the_resume(monkeypatch) -> None:
    """A freeze is not counted, but gives no pass: a data path that does not come round
    after the resume is still caught, STUCK_AFTER seconds after it."""
    paused = _Paused([(1.0, "ran")] * 5 + [(61.0, "stuck")] + [(1.0, "stuck")] * 60)
    resumed = 1000.0 + 5 + 61
    failed = _watch(monkeypatch, paused)
    assert len(failed) == 1, failed
    when, why = failed[0]
    assert resumed + enclave_mod.STUCK_AFTER < when <= resumed + enclave_mod.STUCK_AFTER + 2
    assert why.startswith("the tunnel is stuck: interface wg0: the TUN reader has not come "
                          "round its loop for"), why


def test_the_stuck_figure_does_not_count_a_freeze(monkeypatch) -> None:
    """Before: a data path stuck across a freeze was judged on the time since the resume, but
    the message gave the time since it last came round, the freeze included ("for 92 s" here,
    61 of them frozen): the figure said was not the one judged."""
    paused = _Paused([(1.0, "ran")] * 5 + [(61.0, "stuck")] + [(1.0, "stuck")] * 60)
    failed = _watch(monkeypatch, paused)
    assert len(failed) == 1, failed
    assert failed[0][1] == ("the tunnel is stuck: interface wg0: the TUN reader has not come "
                            "round its loop for 31 s (data path stuck)")


def test_the_device_does_not_count_what_is_excused() -> None:
    """Device.stalled judges, and says, the time its threads were behind less what EXCUSED
    takes off (the liveness thread's freezes); the parent's watchdog excuses nothing."""
    d = tempfile.mkdtemp(prefix="wgd", dir="/tmp")
    bind = StreamBind("unix", unix_dir=d)
    try:
        dev = Device("wgstall0", bind, run_dir=os.path.join(d, "run"))
        dev._threads = [threading.current_thread()]  # as once started
        dev._ticked, dev._tun_passed = 990.0, 960.0  # the TUN reader 40 s behind at 1000
        assert dev.stalled(1000.0, 30.0) == ("interface wgstall0: the TUN reader has not come "
                                             "round its loop for 40 s (data path stuck)")
        spans: list[tuple[float, float]] = []

        def excused(since: float, now: float) -> float:
            spans.append((since, now))
            return 15.0 if since == 960.0 else 0.0

        assert dev.stalled(1000.0, 30.0, excused=excused) is None
        assert spans == [(990.0, 1000.0), (960.0, 1000.0)]
        assert dev.stalled(1006.0, 30.0, excused=excused) == (
            "interface wgstall0: the TUN reader has not come round its loop for 31 s "
            "(data path stuck)")
    finally:
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_data_path_stuck_across_many_freezes_is_judged_on_the_time_it_ran(monkeypatch) -> None:
    """Before: each freeze gave the data path a fresh STUCK_AFTER from its resume, so one that
    was stuck all along, with a freeze (docker pause, a paused VM) every 25 s, was never
    judged and CMD ran on without a network. Now the time the process ran adds up across the
    freezes: 15 s, frozen, 15 s, frozen, and the next second is one too many."""
    cycle = [(1.0, "stuck")] * 15 + [(10.0, "stuck")]
    paused = _Paused([(1.0, "ran")] * 5 + cycle * 10)
    failed = _watch(monkeypatch, paused)
    assert failed == [(1000.0 + 5 + 25 + 25 + 1,
                       "the tunnel is stuck: interface wg0: the TUN reader has not come round "
                       "its loop for 31 s (data path stuck)")], failed


def test_a_healthy_data_path_is_not_judged_stuck_however_often_it_is_frozen(
        monkeypatch) -> None:
    """Freezes, each as long as STUCK_AFTER, between short runs of a path that comes round
    just after the liveness thread looked: none of it counts."""
    made: list[enclave_mod._Freezes] = []

    class Freezes(enclave_mod._Freezes):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(enclave_mod, "_Freezes", Freezes)
    cycle = [(1.0, "late")] * 3 + [(31.0, "late")]
    paused = _Paused([(1.0, "ran")] * 5 + cycle * 50 + [(1.0, "ran")])
    assert _watch(monkeypatch, paused) == []
    assert paused.asked[-1] == 1000.0 + 5 + 34 * 50 + 1  # it went on judging to the end
    # Only the freezes of the last STUCK_AFTER seconds of running are kept, not all 50.
    assert len(made[0].spans) == 10, made[0].spans


def test_a_liveness_thread_that_wakes_somewhat_late_still_judges(monkeypatch) -> None:
    """Waits that end a little late (a loaded machine, the GIL) are no freeze: a stuck data
    path is caught STUCK_AFTER after it last came round, as without any lateness."""
    paused = _Paused([(1.0, "ran")] * 3 + [(2.5, "stuck")] * 40)
    failed = _watch(monkeypatch, paused)
    assert len(failed) == 1, failed
    stuck_since = 1000.0 + 3
    assert stuck_since + enclave_mod.STUCK_AFTER < failed[0][0] <= stuck_since + 33.0


def test_a_thread_that_holds_the_gil_for_seconds_is_no_freeze(monkeypatch) -> None:
    """Before: each wake more than FROZEN_AFTER late was taken for a freeze, so a thread
    holding the GIL for seconds at a time (a long C call) kept a stuck data path from ever
    being judged. A frozen process uses no CPU; this one uses it all."""
    paused = _Paused([(1.0, "ran")] * 3 + [(7.0, "hogged")] * 20)
    failed = _watch(monkeypatch, paused)
    assert len(failed) == 1, failed
    stuck_since = 1000.0 + 3
    assert stuck_since + enclave_mod.STUCK_AFTER < failed[0][0] <= stuck_since + 38.0


def test_stopping_does_not_warn_that_the_connection_to_the_parent_ended(monkeypatch,
                                                                        caplog) -> None:
    """Before: every clean stop (CMD ended, SIGTERM) logged "WARNING control: connection to
    the parent ended (stopped); registering again", which it did not."""
    import socket

    from wgvsock.services.control import Welcome

    e = enclave_mod.Enclave(load_profile(str(PROFILE)))

    def hold(conn, stop, check=None) -> str:
        e.stop.set()  # close() while the connection is held
        return "stopped"

    monkeypatch.setattr(enclave_mod, "dial_control", lambda t: socket.socket())
    monkeypatch.setattr(enclave_mod, "register",
                        lambda conn, pub, attest: Welcome(b"P" * 32, 51820, False))
    monkeypatch.setattr(enclave_mod, "hold_connection", hold)
    monkeypatch.setattr(e, "_apply", lambda w: None)
    with caplog.at_level("INFO", logger="wgvsock.enclave"):
        e._control_loop()
    assert "registered with the parent" in caplog.text
    assert "registering again" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_cmd_inherits_no_descriptor_and_no_ignored_or_blocked_signal_of_the_daemon(
        deaths, tmp_path: Path) -> None:
    """The daemon holds the TUN, its transport and control
    sockets and the key in memory, Python ignores SIGPIPE and SIGXFSZ; none of it may reach
    the app, which should start as from a clean exec."""
    r, w = os.pipe()
    os.set_inheritable(w, True)  # even one the daemon made inheritable by mistake
    # A mask the thread that starts CMD may have been left with: CMD starts without it.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGRTMIN})
    fds, sigs = tmp_path / "fds", tmp_path / "sigs"
    # grep reads its own status (not Python, which ignores SIGPIPE itself); ls's own
    # descriptor for the directory is the one that names it.
    script = (f"grep -E '^Sig(Blk|Ign):' /proc/self/status > {sigs}; "
              f"ls -l /proc/self/fd > {fds}")
    try:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # as in the daemon
        rc = enclave_mod.run_up(load_profile(str(PROFILE)), ["sh", "-c", script], timeout=5)
    finally:
        os.close(r)
        os.close(w)
        kept = signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert kept == before | {signal.SIGUSR1, signal.SIGRTMIN}  # ours, put back after
    assert rc == 0
    blk, ign = (int(v, 16) for v in sigs.read_text().split()[1::2])
    # Nothing blocked or ignored but glibc's own signals 32 and 33 (SIGCANCEL, SIGSETXID),
    # which glibc manages itself: a process started by posix_spawn, as make starts pytest in
    # CI, has SIGCANCEL ignored, and passes that on through fork and exec, here to grep.
    glibc = (1 << 31) | (1 << 32)
    assert blk & ~glibc == 0, hex(blk)
    assert ign & ~glibc == 0, hex(ign)
    held = dict((left.split()[-1], target) for left, target in
                (line.split(" -> ", 1) for line in fds.read_text().splitlines() if " -> " in line))
    assert {fd: target for fd, target in held.items()
            if fd not in ("0", "1", "2") and not target.startswith("/proc/")} == {}


# `enclave up` as PID 1, a SIGTERM arriving while it is still starting (loading the profile,
# importing the enclave's modules), before run_up has installed its handlers.
_EARLY_SIGNAL = r"""
import os, signal, sys
from wgvsock.roles import cli, enclave
assert os.getpid() == 1
enclave.Enclave.start = lambda self: print("tunnel started", flush=True)
enclave.Enclave.wait_connected = lambda self, t: None
real_load = cli._load
def load(path):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_load(path)
cli._load = load
sys.exit(cli.enclave_main(["up", "--profile", sys.argv[1], "--", "true"]))
"""


@pytest.mark.root
def test_as_pid_1_a_sigterm_while_starting_stops_it(tmp_path: Path) -> None:
    """Before: as PID 1 (`docker run`, `docker stop` at once) a signal without a handler is
    dropped by the kernel; one that came during the half second before run_up installed its
    handlers was lost, and the tunnel came up and CMD ran as if nothing had been asked."""
    import sys

    res = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc",
                          sys.executable, "-c", _EARLY_SIGNAL, str(PROFILE)],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 128 + signal.SIGTERM, res.stdout + res.stderr
    assert "tunnel started" not in res.stdout


def test_cmd_is_not_run_when_enclave_up_died_before_it_could_be_tied_to_it(
        tmp_path: Path) -> None:
    """The exec helper asks for the parent-death signal, then checks that its parent is still
    the `enclave up` that started it: one that died before the prctl took has handed the
    helper to another parent, and the signal would never come. Then CMD is not run at all.
    (Here the helper names a parent it does not have, as it would after such a death.)"""
    ran = tmp_path / "ran"
    r, w = os.pipe()
    try:
        res = subprocess.run([sys.executable, "-I", "-S", "-c", cmd._HELPER, str(os.getpid() + 1),
                              str(w), "", "sh", "-c", f"echo > {ran}"], pass_fds=(w,), timeout=30,
                             check=False)
    finally:
        os.close(r)
        os.close(w)
    assert res.returncode == -signal.SIGKILL
    assert not ran.exists()


def test_a_script_whose_interpreter_is_missing_exits_127(deaths, monkeypatch, tmp_path: Path,
                                                         capsys) -> None:
    """What the check before the tunnel could not tell (here: told not to look) fails at the
    exec, in the helper that starts CMD: reported through it as Popen reported it, the
    shell's 127, and what the errno means for CMD."""
    script = tmp_path / "app"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    monkeypatch.setattr(enclave_mod, "_unrunnable", lambda command, user=None: None)
    rc = enclave_mod.run_up(load_profile(str(PROFILE)), [str(script)], timeout=5)
    err = capsys.readouterr().err
    assert rc == 127, err
    assert err == (f"wgvsock enclave up: cannot run {script}: No such file or directory; the "
                   "file, or what it names to run it (a script's #! interpreter, a dynamically "
                   "linked program's loader, a binfmt_misc entry's interpreter), is not in this "
                   "image\n")


def test_cmd_starts_with_no_signal_blocked_whatever_it_is(deaths, capfd) -> None:
    """The test above sees the mask through `sh`, which clears it itself. Before: a CMD that
    does not (grep here, run directly) started with the mask of the thread that started it."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        rc = enclave_mod.run_up(load_profile(str(PROFILE)),
                                ["grep", "-E", "^SigBlk:", "/proc/self/status"], timeout=5)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert rc == 0
    [line] = [x for x in capfd.readouterr().out.splitlines() if x.startswith("SigBlk:")]
    blk = int(line.split()[1], 16)
    glibc = (1 << 31) | (1 << 32)  # as above
    assert blk & ~glibc == 0, hex(blk)



# Ctrl-C at a terminal signals the whole foreground process group, the exec helper with it;
# `enclave up` itself forwards SIGINT (to the command, once it runs) and goes on.
_CTRL_C_WHILE_STARTING = r"""
import os, signal, sys, threading
from wgvsock.roles import cmd
signal.signal(signal.SIGINT, lambda *_: None)
threading.Timer(float(sys.argv[1]), os.killpg, (0, signal.SIGINT)).start()
sys.exit(-cmd.start(["sleep", "0.2"]).wait())
"""


def test_ctrl_c_while_cmd_is_being_started_prints_no_traceback() -> None:
    """Before: a Ctrl-C in the few milliseconds the exec helper's interpreter ran raised
    KeyboardInterrupt there, and its traceback reached the terminal (about one press in four
    that fell in that time). The helper now takes SIGINT as CMD would have, by the default
    action: it ends by the signal, with no word."""
    for i in range(30):  # a press every half millisecond of the helper's life and after
        res = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_STARTING, str(i / 2000)],
                             capture_output=True, text=True, timeout=60, start_new_session=True,
                             cwd=Path(__file__).resolve().parents[1])
        assert res.returncode in (0, signal.SIGINT), res.stderr
        assert res.stderr == "", f"a press {i / 2} ms after the start"


# ---------------------------------------------------------------------------------------------
# enclave.user (the namespace tests run it whole: tests/net/test_enclave_user.py)


def _passwd(name: str, uid: int, gid: int, home: str) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", home, "/bin/sh"))


def test_a_named_user_takes_its_ids_groups_and_home_from_the_image(monkeypatch) -> None:
    monkeypatch.setattr(cmd.pwd, "getpwnam", lambda n: {
        "app": _passwd("app", 1000, 1001, "/home/app")}[n])
    monkeypatch.setattr(cmd.os, "getgrouplist", lambda n, g: [g, 27, g, 1002])
    got = cmd.credentials(EnclaveUser(name="app"))
    assert got == cmd.Credentials(1000, 1001, (1001, 27, 1002),
                                  {"HOME": "/home/app", "USER": "app", "LOGNAME": "app"})
    assert str(got) == "1000:1001:1001,27,1002"  # what the exec helper is given


def test_a_uid_alone_is_its_passwd_entry_s_user_and_uid_gid_takes_no_groups(
        monkeypatch) -> None:
    """As runc's GetExecUser: a UID alone with a passwd entry is that entry's user, with its
    group and the groups that list its name; without one, the group of the same number,
    never 0 (root's group, which docker's --user 1000 gives). UID:GID takes no
    supplementary groups. Before: a UID alone got none (tests/net/test_enclave_user.py
    shows it on a real CMD)."""
    known = {1000: _passwd("app", 1000, 50, "/home/app")}
    monkeypatch.setattr(cmd.pwd, "getpwuid", lambda u: known[u])
    monkeypatch.setattr(cmd.os, "getgrouplist",
                        lambda n, g: {"app": [g, 27, g]}[n])
    assert cmd.credentials(EnclaveUser(uid=1000)).gid == 50
    assert cmd.credentials(EnclaveUser(uid=1000)).groups == (50, 27)
    assert cmd.credentials(EnclaveUser(uid=1000, gid=1000)).groups == ()
    assert cmd.credentials(EnclaveUser(uid=4242)).gid == 4242
    assert cmd.credentials(EnclaveUser(uid=4242)).groups == ()
    assert cmd.credentials(EnclaveUser(uid=4242, gid=7)).gid == 7
    assert str(cmd.Credentials(4242, 7)) == "4242:7:"
    # Groups that cannot be listed: one line naming the entry, as for a name.
    monkeypatch.setattr(cmd.os, "getgrouplist",
                        lambda n, g: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(cmd.UserError) as e:
        cmd.credentials(EnclaveUser(uid=1000))
    assert str(e.value) == ("enclave.user: cannot list the groups of 1000 ('app'): "
                            "Input/output error")


def test_numbers_get_the_home_of_their_passwd_entry_or_slash_without_one(
        monkeypatch) -> None:
    """Before: numbers left the environment as `enclave up` had it, root's: CMD as 1000 got
    HOME=/root (which it cannot write; an app writing its cache or config under ~ failed or
    looked in root's), and USER=root. As runc does for a uid with no passwd entry, HOME=/;
    USER and LOGNAME, which would name root, go. With an entry, what a name gets."""
    known = {1000: _passwd("app", 1000, 50, "/home/app")}
    monkeypatch.setattr(cmd.pwd, "getpwuid", lambda u: known[u])
    for user in (EnclaveUser(uid=1000), EnclaveUser(uid=1000, gid=1000)):
        got = cmd.credentials(user)
        assert got.env == {"HOME": "/home/app", "USER": "app", "LOGNAME": "app"}, user
        assert got.unset == ()
    for user in (EnclaveUser(uid=4242), EnclaveUser(uid=4242, gid=4243)):
        got = cmd.credentials(user)
        assert got.env == {"HOME": "/"}, user
        assert got.unset == ("USER", "LOGNAME")


def test_a_passwd_entry_with_an_empty_home_gives_home_slash(monkeypatch) -> None:
    """Before: HOME was set to the empty field (HOME=), with which `cd` stays put and
    Python's expanduser makes ~/.cache /.cache; as login(1), and as a uid without an entry
    gets here, HOME=/."""
    monkeypatch.setattr(cmd.pwd, "getpwuid", lambda u: _passwd("app", 1000, 50, ""))
    monkeypatch.setattr(cmd.pwd, "getpwnam", lambda n: _passwd("app", 1000, 50, ""))
    monkeypatch.setattr(cmd.os, "getgrouplist", lambda n, g: [g])
    for user in (EnclaveUser(uid=1000), EnclaveUser(name="app")):
        assert cmd.credentials(user).env == {"HOME": "/", "USER": "app", "LOGNAME": "app"}


def test_an_unknown_user_is_refused_in_one_line_before_the_tunnel_comes_up(
        monkeypatch, capsys) -> None:
    started: list[bool] = []
    monkeypatch.setattr(enclave_mod.Enclave, "start", lambda self: started.append(True))
    monkeypatch.setattr(enclave_mod.netconf, "default_routes", list)  # as in an enclave
    monkeypatch.setattr(cmd.pwd, "getpwnam", lambda n: (_ for _ in ()).throw(KeyError(n)))
    profile = replace(load_profile(str(PROFILE)), enclave=replace(
        load_profile(str(PROFILE)).enclave, user=EnclaveUser(name="app")))
    rc = enclave_mod.run_up(profile, ["true"], timeout=5)
    assert rc == 1
    assert capsys.readouterr().err == (
        "wgvsock enclave up: enclave.user: there is no user 'app' in this image's /etc/passwd "
        "(add one to the image, or give UID or UID:GID numbers)\n")
    assert started == []


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory any user may search, on a path any user may search: tmp_path is under
    pytest's /tmp/pytest-of-root, which is root's only."""
    d = Path(tempfile.mkdtemp(prefix="wgvsock-user-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


def _up_as(monkeypatch, user: EnclaveUser, command: list[str]) -> tuple[int, list[bool]]:
    """run_up as USER with no tunnel, stopped where the tunnel would start: its status, and
    whether it got there ([True]) or stopped before ([])."""
    profile = replace(load_profile(str(PROFILE)), enclave=replace(
        load_profile(str(PROFILE)).enclave, user=user))
    return _up_with(monkeypatch, profile, command)


def _up_with(monkeypatch, profile, command: list[str]) -> tuple[int, list[bool]]:
    """_up_as with PROFILE as it was loaded."""
    started: list[bool] = []

    def start(self) -> None:
        started.append(True)
        raise enclave_mod.EnclaveError("stop here")

    monkeypatch.setattr(enclave_mod.Enclave, "start", start)
    monkeypatch.setattr(enclave_mod.netconf, "default_routes", list)  # as in an enclave
    return enclave_mod.run_up(profile, command, timeout=5), started


def _script(path: Path, mode: int) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_a_cmd_the_user_may_not_execute_is_refused_before_the_tunnel_comes_up(
        monkeypatch, capsys, reachable) -> None:
    """Before: the check was root's (os.access), so a CMD only root may execute passed, the
    tunnel came up, and the exec as enclave.user then failed (126) with the app never run."""
    app = _script(reachable / "app", 0o700)  # root's (the test's owner) only
    owner = app.stat()
    rc, started = _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), [str(app)])
    assert rc == 126 and started == []
    assert capsys.readouterr().err == (
        f"wgvsock enclave up: cannot run {app}: {app} (mode 0700, owner {owner.st_uid}:"
        f"{owner.st_gid}) is not executable by enclave.user (4242:4243); in the image, chmod "
        f"o+x {app}, or give it to that user\n")
    # Executable by others: it passes (the Enclave.start stand-in is reached).
    app.chmod(0o755)
    assert _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), [str(app)])[1] == [True]


@pytest.mark.root
def test_a_directory_the_user_may_not_search_is_refused_before_the_tunnel_comes_up(
        monkeypatch, capsys, reachable) -> None:
    """Before: root may search any directory, so an executable the user cannot reach (CMD
    itself, or found on PATH, in a directory of mode 0700) passed, the tunnel came up, and
    the exec as enclave.user failed late (126, Permission denied)."""
    private = reachable / "private"
    private.mkdir(mode=0o700)
    app = _script(private / "app", 0o755)
    monkeypatch.setenv("PATH", str(private))
    owner = private.stat()
    for command in (str(app), "app"):
        rc, started = _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), [command])
        assert rc == 126 and started == [], command
        assert capsys.readouterr().err == (
            f"wgvsock enclave up: cannot run {command}: directory {private} (mode 0700, owner "
            f"{owner.st_uid}:{owner.st_gid}) is not searchable by enclave.user (4242:4243); "
            f"in the image, chmod o+x {private}, or put CMD where that user can reach it\n")
    # The group's bit counts for a member, a supplementary group too.
    os.chown(private, 0, 4244)
    private.chmod(0o710)
    assert _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), ["app"])[1] == [], "not a member"
    monkeypatch.setattr(cmd.pwd, "getpwnam", lambda n: _passwd("app", 4242, 4243, "/"))
    monkeypatch.setattr(cmd.os, "getgrouplist", lambda n, g: [g, 4244])
    assert _up_as(monkeypatch, EnclaveUser(name="app"), ["app"])[1] == [True]


def test_path_is_searched_as_the_user_s_exec_searches_it(
        monkeypatch, capsys, reachable) -> None:
    """A file on PATH the user may not run is passed over for the next, as the exec helper's
    execvp passes it over. Before: root's `which` found the first, only root's, and `up`
    refused a CMD the user would have run from the next directory."""
    for d in ("first", "second"):
        (reachable / d).mkdir(mode=0o755)
    _script(reachable / "first" / "app", 0o700)
    second = _script(reachable / "second" / "app", 0o755)
    monkeypatch.setenv("PATH", f"{reachable / 'first'}:{reachable / 'second'}")
    assert _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), ["app"])[1] == [True]
    # None left: the first refusal stands, and says which file.
    second.chmod(0o744)
    rc, started = _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), ["app"])
    assert rc == 126 and started == []
    assert f"cannot run app: {reachable / 'first' / 'app'} (mode 0700, " in capsys.readouterr().err
    # Nowhere: not found, as for root.
    rc, started = _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), ["nosuch"])
    assert rc == 127 and started == []
    assert capsys.readouterr().err == (
        "wgvsock enclave up: cannot run nosuch: not found in PATH "
        f"({reachable / 'first'}:{reachable / 'second'})\n")


@pytest.mark.root
def test_a_relative_cmd_through_a_link_to_an_absolute_path_is_judged_where_it_leads(
        monkeypatch, capsys, reachable) -> None:
    """A relative CMD searches from the working directory, but a link on its way to an
    absolute path searches from / again, and every directory down to its target. Before:
    only those below the working directory were judged, so `./app`, a link to a file in a
    directory of mode 0700, passed, the tunnel came up and the exec failed (126)."""
    private, work = reachable / "private", reachable / "work"
    private.mkdir(mode=0o700)
    work.mkdir(mode=0o755)
    _script(private / "app", 0o755)
    (work / "app").symlink_to(private / "app")
    monkeypatch.chdir(work)
    owner = private.stat()
    rc, started = _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), ["./app"])
    assert rc == 126 and started == []
    assert capsys.readouterr().err == (
        f"wgvsock enclave up: cannot run ./app: directory {private} (mode 0700, owner "
        f"{owner.st_uid}:{owner.st_gid}) is not searchable by enclave.user (4242:4243); "
        f"in the image, chmod o+x {private}, or put CMD where that user can reach it\n")
    # ... as the exec helper, as that user, agrees.
    with pytest.raises(PermissionError):
        cmd.start(["./app"], cmd.Credentials(4242, 4243))
    # Searchable: it passes.
    private.chmod(0o711)
    assert _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), ["./app"])[1] == [True]


def _setfacl(path: Path, spec: str) -> None:
    """PATH's ACL set to SPEC as an image's author sets it (setfacl --set; -n: the mask
    SPEC names, not one setfacl works out), and its mode with it."""
    if shutil.which("setfacl") is None:
        pytest.skip("no setfacl here (apt package acl: make apt)")
    res = subprocess.run(["setfacl", "-n", "--set", spec, str(path)], capture_output=True,
                         text=True, timeout=30)
    if "Operation not supported" in res.stderr:
        pytest.skip(f"no POSIX ACLs here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr


def _true(path: Path) -> Path:
    """An executable that exits 0 and needs no read permission to run, as a script would
    (its interpreter reads it): whether it runs is then whether the exec was let through."""
    shutil.copy("/bin/true", path)
    return path


def _runs_as(command: list[str], user: cmd.Credentials) -> bool:
    """Whether USER's exec runs COMMAND to a status 0: the exec helper's own path, which
    takes the user's ids and leaves no capability before the exec, as CMD is run. (Not
    `setpriv --reuid`: it keeps root's capabilities (PR_SET_KEEPCAPS, and the effective set
    put back) up to its exec, so CAP_DAC_OVERRIDE executes any file with an x bit for the
    user, whatever its ACL says; --inh-caps=-all and --bounding-set=-all do not clear them.)"""
    try:
        return cmd.start(command, user).wait(30) == 0
    except PermissionError:
        return False


# The user's groups: its own (4243) and a supplementary one (4244); 4245 is not theirs.
_ACL_USER = cmd.Credentials(4242, 4243, (4243, 4244))


@pytest.mark.root
@pytest.mark.parametrize(("app_acl", "dir_acl", "runs"), [
    # A named user entry, within the mask: it is the user's, whatever the others' bits say.
    ("u::rwx,u:4242:r-x,g::---,m::r-x,o::---", None, True),
    ("u::rwx,u:4242:r--,g::---,m::r-x,o::r-x", None, False),
    # A group entry of a supplementary group; the owning group's (root's) is not theirs.
    ("u::rwx,g::r--,g:4244:r-x,m::r-x,o::---", None, True),
    # Groups that match but none grants: refused, the others' bits are not asked.
    ("u::rwx,g::r-x,g:4243:r--,g:4244:r--,m::r-x,o::r-x", None, False),
    # A mask that takes x away, from a named user and from a group entry.
    ("u::rwx,u:4242:r-x,g::---,m::r--,o::---", None, False),
    ("u::rwx,g::---,g:4244:r-x,m::r--,o::r-x", None, False),
    # A mask of nothing leaves the group class's bits of the mode 0: the kernel then asks
    # the mode bits alone (acl_permission_check), and the others' let the user in.
    ("u::rwx,u:4242:r--,g::---,m::---,o::r-x", None, True),
    # A directory on the way whose ACL denies the user search, or grants it alone.
    (None, "u::rwx,u:4242:rw-,g::---,m::rwx,o::r-x", False),
    (None, "u::rwx,u:4242:--x,g::---,m::--x,o::---", True),
    (None, "u::rwx,g::---,g:4245:--x,m::--x,o::---", False),
])
def test_the_early_check_applies_an_acl_as_the_user_s_exec_does(reachable, app_acl, dir_acl,
                                                                runs) -> None:
    """The early check says what the user's exec then does, for a CMD or a directory on
    its way with an ACL. Before: anything with an ACL was left to the exec, so a CMD whose
    ACL gives the user r-- (every row the exec refuses) passed, the tunnel came up, and the
    exec failed (126) with the app never run."""
    d = reachable / "d"
    d.mkdir(mode=0o755)
    app = _true(d / "app")
    app.chmod(0o755)
    if app_acl:
        _setfacl(app, app_acl)
    if dir_acl:
        _setfacl(d, dir_acl)
    assert _runs_as([str(app)], _ACL_USER) is runs
    assert (enclave_mod._unrunnable_by(str(app), _ACL_USER) is None) is runs


@pytest.mark.root
def test_a_cmd_whose_acl_refuses_the_user_is_refused_before_the_tunnel_comes_up(
        monkeypatch, capsys, reachable) -> None:
    """Said with the ACL and the setfacl that lets the user in, which the chmod of the mode
    bits would not (o+x here changes nothing: the user's own entry is asked first). Before:
    the check passed (its ACL was left to the exec), the tunnel came up, and the exec as
    enclave.user failed (126)."""
    app = _true(reachable / "app")
    _setfacl(app, "u::rwx,u:4242:r--,g::r-x,m::r-x,o::r-x")
    rc, started = _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), [str(app)])
    assert rc == 126 and started == []
    owner = app.stat()
    assert capsys.readouterr().err == (
        f"wgvsock enclave up: cannot run {app}: {app} (mode 0755, owner {owner.st_uid}:"
        f"{owner.st_gid}, ACL u::rwx,u:4242:r--,g::r-x,m::r-x,o::r-x) is not executable by "
        f"enclave.user (4242:4243); in the image, setfacl -m u:4242:rx {app}, or give it to "
        f"that user\n")
    assert _runs_as([str(app)], cmd.Credentials(4242, 4243)) is False
    # The setfacl it says lets the user in (it works the mask out again).
    subprocess.run(["setfacl", "-m", "u:4242:rx", str(app)], check=True)
    assert _up_as(monkeypatch, EnclaveUser(uid=4242, gid=4243), [str(app)])[1] == [True]
    assert _runs_as([str(app)], cmd.Credentials(4242, 4243)) is True


@pytest.mark.parametrize(("xattr", "left"), [
    (OSError(errno.EIO, "Input/output error"), True),  # unreadable
    (struct.pack("<I", 3) + struct.pack("<HHI", 0x20, 7, 0xFFFFFFFF), True),  # version 3
    (struct.pack("<I", 2) + struct.pack("<HHI", 0x20, 7, 0xFFFFFFFF)[:5], True),  # cut short
    (struct.pack("<I", 2) + struct.pack("<HHI", 0x40, 7, 0), True),  # a tag of no kernel's
    (OSError(errno.ENODATA, "No data available"), False),  # none: the mode bits refuse
])
def test_an_acl_that_cannot_be_read_or_judged_is_left_to_the_exec(monkeypatch, reachable,
                                                                     xattr, left) -> None:
    """The early check never refuses what it cannot judge: the exec has the last word."""
    app = _true(reachable / "app")
    app.chmod(0o750)

    def getxattr(path, name, *a, **kw):
        if isinstance(xattr, OSError):
            raise xattr
        return xattr

    monkeypatch.setattr(cmd.os, "getxattr", getxattr)
    said = enclave_mod._unrunnable_by(str(app), cmd.Credentials(4242, 4243))
    assert (said is None) is left, said


def _random_acl(rng: random.Random) -> str:
    """A setfacl spec of random perms: the owner's, maybe named users (the user, another),
    the owning group's, maybe named groups (the user's two, another), a mask (always when
    there is a named entry, as setfacl requires), the others'."""
    def perm() -> str:
        return "".join(c if rng.random() < 0.5 else "-" for c in "rwx")

    entries = [f"u::{perm()}"]
    entries += [f"u:{u}:{perm()}" for u in (4242, 4246) if rng.random() < 0.4]
    entries.append(f"g::{perm()}")
    entries += [f"g:{g}:{perm()}" for g in (4243, 4244, 4245) if rng.random() < 0.3]
    if len(entries) > 2 or rng.random() < 0.3:
        entries.append(f"m::{perm()}")
    entries.append(f"o::{perm()}")
    return ",".join(entries)


@pytest.mark.root
def test_random_acls_are_judged_as_the_user_s_exec_judges_them(reachable) -> None:
    """Differential: random modes and ACLs (or none) on CMD and the directory it is in,
    random owners among the user and others, groups among the user's and others', the
    user's own groups random too; the early check must say what the user's exec does,
    every time. Seeded: a failure names its case."""
    rng = random.Random(1)
    seen = set()
    for trial in range(200):
        user = cmd.Credentials(4242, rng.choice((4243, 4244)),
                               tuple(g for g in (4243, 4244, 4245) if rng.random() < 0.5))
        d = reachable / f"d{trial}"
        d.mkdir()
        app = _true(d / "app")
        case = [str(user)]
        for p in (d, app):
            uid, gid = rng.choice((0, 4242, 4246)), rng.choice((0, 4243, 4244, 4245))
            os.chown(p, uid, gid)
            p.chmod(rng.randrange(0o1000))
            spec = _random_acl(rng) if rng.random() < 0.8 else None
            if spec:
                _setfacl(p, spec)
            case.append(f"{p.name} {uid}:{gid} {oct(p.stat().st_mode)} {spec}")
        runs = _runs_as([str(app)], user)
        said = enclave_mod._unrunnable_by(str(app), user)
        assert (said is None) is runs, f"trial {trial}: {case}: exec {runs}, check {said}"
        seen.add(runs)
    assert seen == {True, False}  # both answers came up: the cases were not all alike


# `enclave up` as USER (argv: profile, UID:GID, CMD...) with no network and its tunnel up at once.
_UP_AS = r"""
import sys
from dataclasses import replace
from wgvsock.roles import enclave
from wgvsock.services.profile import EnclaveUser, load_profile
enclave.Enclave.start = lambda self: None
enclave.Enclave.wait_connected = lambda self, t: None
enclave.netconf.default_routes = list
p = load_profile(sys.argv[1])
uid, gid = map(int, sys.argv[2].split(":"))
p = replace(p, enclave=replace(p.enclave, user=EnclaveUser(uid=uid, gid=gid)))
sys.exit(enclave.run_up(p, sys.argv[3:], timeout=5))
"""


@pytest.mark.root
def test_a_cmd_root_may_not_look_at_is_left_to_the_user_s_exec(reachable) -> None:
    """`up` as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (a container that drops
    them; a root-squashed mount does the same) cannot look into the user's own directory of
    mode 0700. Before: lexists said no, and a CMD the user runs was refused as "No such
    file or directory" (127) before the tunnel came up."""
    home = reachable / "home"
    home.mkdir(mode=0o700)
    app = home / "app"
    app.write_text("#!/bin/sh\nexit 7\n")
    app.chmod(0o755)
    for p in (home, app):
        os.chown(p, 4242, 4243)
    res = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable,
         "-c", _UP_AS, str(PROFILE), "4242:4243", str(app)],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 7, res.stderr  # CMD's own status: it ran


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(("mode", "owner", "want", "allowed"), [
    (0o100755, (4242, 4243), os.X_OK, True),
    (0o100075, (4242, 4243), os.X_OK, False),  # the owner's bits only, whatever the rest say
    (0o100705, (1, 4243), os.X_OK, False),  # the group's only, for a member
    (0o100705, (1, 4244), os.X_OK, False),  # a supplementary group is a member too
    (0o100770, (1, 2), os.X_OK, False),  # the others'
    (0o100771, (1, 2), os.X_OK, True),
    (0o100664, (1, 4244), os.R_OK | os.W_OK, True),
    (0o100644, (1, 4244), os.R_OK | os.W_OK, False),
])
def test_the_user_s_permission_is_the_class_that_matches_it(mode, owner, want, allowed):
    assert cmd.allows(_stat(mode, *owner), cmd.Credentials(4242, 4243, (4243, 4244)),
                      want) is allowed


def test_uid_0_without_capabilities_is_no_one_special():
    """os.access as root says yes to any directory and to any file with an x bit: CMD has
    no CAP_DAC_OVERRIDE, whatever its uid."""
    assert not cmd.allows(_stat(0o040700, 1000, 1000), cmd.Credentials(0, 0), os.X_OK)
    assert cmd.allows(_stat(0o040070, 1000, 0), cmd.Credentials(0, 0), os.X_OK)


@pytest.mark.parametrize(("user", "entry", "groups", "says"), [
    (EnclaveUser(name="app"), (1000, 1000), [1000, 0],
     "warning: enclave.user app is in root's group (GID 0, as a supplementary group): CMD can "
     "read and write whatever the image leaves to group root; give the user a primary group of "
     "its own and take it out of group root in the image's /etc/passwd and /etc/group"),
    (EnclaveUser(name="app"), (1000, 0), [0],
     "warning: enclave.user app is in root's group (GID 0, as its primary group)"),
    (EnclaveUser(uid=1000), (1000, 0), [],
     "warning: enclave.user 1000 is in root's group (GID 0, as its primary group): CMD can read "
     "and write whatever the image leaves to group root; give it a group of its own: "
     "1000:GID, GID other than 0"),
    (EnclaveUser(uid=1000, gid=0), None, [], "warning: enclave.user 1000:0 is in root's group"),
])
def test_root_s_group_is_warned_of_when_enclave_up_starts(
        monkeypatch, capsys, reachable, user, entry, groups, says) -> None:
    """Before: `user: "1000:0"`, or a user whose passwd or group entries put it in group 0,
    ran CMD with group root's access to the image's files, and nothing said so. Warned of, as
    root itself is: taken, since the uid alone keeps the tunnel's key out of reach."""
    def getpw(_key):
        if entry is None:
            raise KeyError(_key)
        return _passwd("app", *entry, "/home/app")
    monkeypatch.setattr(cmd.pwd, "getpwnam", getpw)
    monkeypatch.setattr(cmd.pwd, "getpwuid", getpw)
    monkeypatch.setattr(cmd.os, "getgrouplist", lambda n, g: groups)
    app = _script(reachable / "app", 0o755)
    assert _up_as(monkeypatch, user, [str(app)])[1] == [True]
    err = capsys.readouterr().err
    assert f"wgvsock enclave up: {says}" in err, err
    assert err.count("warning") == 1, err
    # A group of its own: no word of it.
    monkeypatch.setattr(cmd.os, "getgrouplist", lambda n, g: [1000])
    _up_as(monkeypatch, EnclaveUser(uid=1000, gid=1000), [str(app)])
    assert "warning" not in capsys.readouterr().err


def _profile_with(tmp_path: Path, user: str) -> Path:
    """PROFILE with enclave.user USER and parent.enclave_cid, which the unix transport
    ignores: two warnings of the profile's."""
    text = PROFILE.read_text().replace(
        "  private_key: /run/wgvsock/e2e.key\n",
        "  private_key: /run/wgvsock/e2e.key\n  enclave_cid: 16\n").replace(
        "  routes: [0.0.0.0/0]\n", f"  routes: [0.0.0.0/0]\n  user: {user}\n")
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("user", ['"4242:0"', "root", "'0'"])
def test_enclave_up_says_the_profile_s_warnings_as_profile_check_does(
        monkeypatch, capsys, tmp_path, reachable, user) -> None:
    """Before: `profile check`, `parent up` and `parent reload` said the profile's warnings,
    `enclave up`, which reads the profile in the image, none of them: only its own of
    enclave.user. Each now once, the profile's word on root or GID 0 not said again."""
    path = _profile_with(tmp_path, user)
    profile = load_profile(str(path))
    assert sorted(w.key for w in profile.warnings) == ["enclave.user", "parent.enclave_cid"]
    app = _script(reachable / "app", 0o755)
    monkeypatch.setattr(cmd.pwd, "getpwuid", lambda u: (_ for _ in ()).throw(KeyError(u)))
    assert _up_with(monkeypatch, profile, [str(app)])[1] == [True]
    err = capsys.readouterr().err
    # (The warning lines, as `profile check` prints them with its own name before them.)
    *said, stopped = err.splitlines()
    assert said == [f"wgvsock enclave up: warning: {w}" for w in profile.warnings], err
    assert "stop here" in stopped  # (the stand-in for the tunnel)
    res = subprocess.run([sys.executable, "-m", "wgvsock.cli", "profile", "check", str(path)],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    checked = [line.split(": warning: ", 1)[1] for line in res.stderr.splitlines()]
    assert checked == [line.split(": warning: ", 1)[1] for line in said], res.stderr


def test_a_uid_alone_without_a_passwd_entry_is_told_the_gid_it_gets(
        monkeypatch, capsys, tmp_path, reachable) -> None:
    """`user: 4242` with no passwd entry in the image runs CMD as 4242:4242, where docker
    --user 4242 gives 4242:0; nothing said which. `enclave up` now says the GID in one line
    (not `profile check`, which cannot know the image's passwd: a warning there was said on
    every `parent up` and reload too), and nothing of it for a UID the image's passwd
    knows."""
    path = _profile_with(tmp_path, "4242")
    profile = load_profile(str(path))
    assert [w.key for w in profile.warnings] == ["parent.enclave_cid"]
    app = _script(reachable / "app", 0o755)
    monkeypatch.setattr(cmd.pwd, "getpwuid", lambda u: (_ for _ in ()).throw(KeyError(u)))
    assert _up_with(monkeypatch, profile, [str(app)])[1] == [True]
    said = [line for line in capsys.readouterr().err.splitlines() if "enclave.user" in line]
    assert said == ["wgvsock enclave up: warning: enclave.user 4242 has no passwd entry in this "
                    "image: CMD runs with GID 4242 (its own number; docker --user gives GID 0, "
                    "group root, instead) and no supplementary groups; write \"4242:GID\" to "
                    "choose the group"], said
    monkeypatch.setattr(cmd.pwd, "getpwuid", lambda u: _passwd("app", 4242, 50, "/home/app"))
    monkeypatch.setattr(cmd.os, "getgrouplist", lambda n, g: [g])
    assert _up_with(monkeypatch, profile, [str(app)])[1] == [True]
    assert "enclave.user" not in capsys.readouterr().err


_RUN_AS = r"""
import sys
from wgvsock.roles import cmd
from wgvsock.services.profile import EnclaveUser
user = cmd.credentials(EnclaveUser(uid=4242, gid=4243))
sys.exit(cmd.start(sys.argv[1:], user).wait())
"""


@pytest.mark.root
def test_numbers_run_cmd_with_those_ids_no_groups_and_no_capabilities() -> None:
    res = subprocess.run([sys.executable, "-c", _RUN_AS, "sh", "-c",
                          "id; grep -E '^(CapPrm|CapEff|CapAmb|NoNewPrivs):' /proc/self/status"],
                         capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[0] == "uid=4242 gid=4243 groups=4243"
    assert [line.split() for line in lines[1:-1]] == [
        ["CapPrm:", "0" * 16], ["CapEff:", "0" * 16], ["CapAmb:", "0" * 16],
        ["NoNewPrivs:", "1"]]


_RUN_AS_NO_PROC = r"""
import sys
from wgvsock.roles import cmd
from wgvsock.services.profile import EnclaveUser
user = cmd.credentials(EnclaveUser(uid=4242, gid=4243))
try:
    cmd.start(["true"], user)
except cmd.UserError as e:
    print(e)
"""


@pytest.mark.root
def test_without_proc_cmd_is_refused_in_one_line_not_a_traceback() -> None:
    """Before: the helper's check of the capabilities left (/proc/self/status) raised, and a
    traceback was all `up` got; CMD never ran, as now."""
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'umount -l /proc && exec "$@"', "sh", sys.executable, "-c", _RUN_AS_NO_PROC],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout == ("cannot run true as enclave.user: cannot check the capabilities "
                          "left (/proc/self/status: No such file or directory)\n"), res.stdout
    assert "Traceback" not in res.stderr, res.stderr


# The process that runs `enclave up`'s part: starts CMD (as the user, with argv[1] "user"),
# says CMD's pid, waits.
_UP_WITH_USER = r"""
import sys, time
from wgvsock.roles import cmd
from wgvsock.services.profile import EnclaveUser
user = cmd.credentials(EnclaveUser(uid=4242, gid=4242)) if sys.argv[1] == "user" else None
proc = cmd.start(sys.argv[2:], user)
print(proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.root
@pytest.mark.parametrize("how", ["enclave.user", "setpriv"])
def test_cmd_run_as_the_user_still_dies_with_enclave_up(how: str) -> None:
    """The kernel clears the parent-death signal when a process changes its ids: the helper
    asks for it after the change. CMD changing them itself (`-- setpriv --reuid ...`) loses
    it: shown here as what the README says of it."""
    command = ["sleep", "600"]
    if how == "setpriv":
        command = ["setpriv", "--reuid", "4242", "--regid", "4242", "--clear-groups", *command]
    up = subprocess.Popen([sys.executable, "-c", _UP_WITH_USER,
                           "user" if how == "enclave.user" else "", *command],
                          stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    pid = 0
    try:
        assert up.stdout is not None
        pid = int(up.stdout.readline())
        wait_for(lambda: _uid_of(pid) == 4242 and _comm(pid) == "sleep", 10, "CMD to run")
        up.kill()
        up.wait(10)
        died = _gone_within(pid, 5 if how == "setpriv" else 10)
        assert died == (how == "enclave.user")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _uid_of(pid: int) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return None


def _comm(pid: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether PID ended (or is a zombie) within SECONDS."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


_HELPER_NOT_ROOT = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.mark.root
def test_cmd_is_not_run_when_the_user_s_ids_cannot_be_taken(tmp_path: Path) -> None:
    """The helper runs CMD as the user or not at all: never as whoever started it. (Here a
    helper that is not root, which may not take another's ids.)"""
    ran = tmp_path / "ran"
    os.chmod(tmp_path, 0o777)  # noqa: S103 - so that a CMD run wrongly could say so
    r, w = os.pipe()
    try:
        res = subprocess.run([*_HELPER_NOT_ROOT, sys.executable, "-I", "-S", "-c", cmd._HELPER,
                              str(os.getpid()), str(w), "4242:4242:", "sh", "-c",
                              f"echo > {ran}"], pass_fds=(w,), timeout=30, check=False)
        os.close(w)
        w = -1
        report = os.read(r, 4096)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert res.returncode == 126
    assert report == b"user setgroups: Operation not permitted"
    assert not ran.exists()


# ---------------------------------------------------------------------------------------------
# What the kernel makes of CMD's content and mount, judged before the tunnel comes up: each
# case compared with a real exec through the exec helper (cmd.start), as root and as a user.

_USERS = [None, pytest.param(cmd.Credentials(4242, 4243), marks=pytest.mark.root, id="user")]


def _exec_says(command: list[str], user: cmd.Credentials | None = None) -> int | None:
    """The errno the exec helper's exec of COMMAND fails with (as USER), None when CMD ran
    (whatever its status)."""
    try:
        proc = cmd.start(command, user)
    except OSError as e:
        return e.errno
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return None


def _agrees(command: list[str], user: cmd.Credentials | None) -> tuple[int, str] | None:
    """The early check's word on COMMAND, asserted to be the exec's: None where it runs,
    else the shell's status for the exec's errno (127 for ENOENT, 126 for the others)."""
    said = enclave_mod._unrunnable(command, user)
    got = _exec_says(command, user)
    want = None if got is None else (127 if got == errno.ENOENT else 126)
    assert (said and said[0]) == want, (
        f"{command}: check {said}, exec {errno.errorcode.get(got or 0, got)}")
    return said


def _file(path: Path, content: bytes | str, mode: int = 0o755) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def _native_machine() -> int:
    return struct.unpack_from("<H", Path("/proc/self/exe").read_bytes()[:20], 18)[0]


def _elf_header(machine: int, e_type: int = 2, order: str = "<") -> bytes:
    """A 64-bit ELF header with no program headers: the kernel judges its machine and type
    before it reads any."""
    h = bytearray(64)
    h[:7] = b"\x7fELF\x02" + (b"\x01" if order == "<" else b"\x02") + b"\x01"
    struct.pack_into(order + "HHIQQQIHHHHHH", h, 16, e_type, machine, 1, 0, 0, 0, 0, 64,
                     56, 0, 64, 0, 0)
    return bytes(h)


def _other_machine() -> tuple[int, str]:
    """A machine other than this one, and its name as the check says it."""
    return (183, "aarch64") if _native_machine() != 183 else (62, "x86_64")


def _with_loader(src: str, dst: Path, loader: str) -> Path:
    """A copy of the dynamically linked SRC (this machine's /bin/true) whose program
    interpreter (PT_INTERP) is LOADER, written over the old one's bytes."""
    data = bytearray(Path(src).read_bytes())
    m = re.search(rb"/lib[^\0]*/ld-[^\0]*\.so\.[0-9]\0", data)
    if m is None:
        pytest.skip(f"{src} names no loader here (statically linked?)")
    new = loader.encode() + b"\0"
    assert len(new) <= len(m.group()), (loader, m.group())
    data[m.start():m.start() + len(new)] = new
    return _file(dst, bytes(data))


@pytest.fixture(autouse=True)
def _no_binfmt_misc_unseen(monkeypatch) -> None:
    """As in an enclave: no binfmt_misc entry this process cannot see may take what it
    execs (binfmt._misc_unseen), so that what the kernel's own loaders refuse is judged.
    True of this machine too, where none is mounted and so none registered (a test that
    registers one does it in a user namespace of its own); a subprocess judges for itself."""
    monkeypatch.setattr(enclave_mod.binfmt, "_misc_unseen", lambda: False)


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory, with a short name (a loader's path must fit where the old one was), that
    any user may search."""
    d = Path(tempfile.mkdtemp(prefix="x", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("user", _USERS)
@pytest.mark.parametrize(("line", "code", "says"), [
    ("#!/nonexistent/bash\n", 127, "{app} is a script whose interpreter /nonexistent/bash (its "
     "#! line) is not in this image: No such file or directory; install it, or change the #! "
     "line"),
    ("#!/bin/sh\r\necho hi\r\n", 127, "{app} has Windows (CRLF) line endings: its #! line names "
     "the interpreter /bin/sh\\r, with a carriage return at the end, which does not exist; "
     "convert the file to Unix line endings: sed -i 's/\\r$//' {app} (or dos2unix {app})"),
    ("#!/bin/true\r\n", 127, "has Windows (CRLF) line endings"),
    ("#! \t /bin/true  an argument\t \n", None, ""),  # blanks skipped, one argument
    ("#!/bin/true -x\r\n", None, ""),  # a \r in the argument: the interpreter's business
    ("#!/bin/true\0/nonexistent\n", None, ""),  # a NUL ends the name
    ("#!/nonexistent\0/bin/true\n", 127, "interpreter /nonexistent (its #! line)"),
    ("#!{d}\n", 126, "{app} is a script, and its interpreter {d} is a directory"),
    ("#!{d}/text\n", 126, "{app} is a script run by {d}/text (its #! line), and {d}/text is "
     "neither a program (ELF) nor a script starting with #!: Exec format error"),
    ("#!{d}/elf\n", 126, "and {d}/elf is a program for"),
    ("#!\n", 126, "{app} starts with #! but its #! line names no interpreter: Exec format error"),
    ("#!   \t\n", 126, "its #! line names no interpreter"),
    ("#!" + " " * 300, 126, "its #! line is blanks only"),
    ("#!/" + "x" * 300, 126, "its #! line is longer than 256 bytes with no end to the "
     "interpreter's name in them"),
    ("#!/bin/true " + "x" * 300, None, ""),  # only the argument is cut: no matter
    ("#!" + " " * 240 + "/bin/true", None, ""),  # no newline, and a NUL (padding) ends it
    ("#!" + " " * 244 + "/bin/true\n", None, ""),  # the newline is the 256th byte
    ("#!" + " " * 245 + "/bin/true\n", 126, "longer than 256 bytes"),  # no room for it
    ("#!" + " " * 246 + "/bin/true", 126, "longer than 256 bytes"),  # cut to /bin/tru
    ("echo hi\n", 126, "{app} is neither a program (ELF) nor a script starting with #!: Exec "
     "format error (CMD is not run through a shell); make its first line #! and its "
     "interpreter's path (#!/bin/sh), or give the shell as CMD (sh FILE)"),
    ("", 126, "is neither a program (ELF) nor a script"),
    (" #!/bin/true\n", 126, "is neither a program (ELF) nor a script"),
])
def test_a_script_is_judged_as_the_kernel_reads_its_first_line(place, user, line, code,
                                                                says) -> None:
    """Before: a script whose interpreter is missing (the kernel's ENOENT: "No such file or
    directory" of a file that is there), a CRLF script, a file with no #! line (Python's
    execvp runs no shell for it) passed the check; the tunnel came up and the exec failed
    after it. Now the status of the exec, and what to change."""
    (place / "d").mkdir(mode=0o755)
    _file(place / "d" / "text", "echo hi\n")
    _file(place / "d" / "elf", _elf_header(_other_machine()[0]))
    app = _file(place / "app", line.format(d=place / "d"))
    said = _agrees([str(app)], user)
    if code is None:
        assert said is None
    else:
        assert said is not None and said[0] == code
        assert says.format(app=app, d=place / "d") in said[1], said[1]


def test_random_first_lines_are_judged_as_the_exec_judges_them(place) -> None:
    """Differential: #! lines of random blanks, tabs, carriage returns, NULs, newlines and
    names (of interpreters there, missing, a directory, a file with no #!), long and short
    about the kernel's 256 bytes; the check must say what the exec does, every time. Seeded:
    a failure names its case."""
    (place / "d").mkdir(mode=0o755)
    _file(place / "d" / "text", "echo hi\n")
    pieces = [b" ", b"\t", b"\r", b"\0", b"\n", b"/bin/true", b"/bin/false", b"/nonexistent",
              str(place / "d").encode(), str(place / "d" / "text").encode(), b"x", b"-e"]
    rng = random.Random(2)
    seen = set()
    for trial in range(150):
        line = b"#!" + b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        if rng.random() < 0.3:  # about the end of the kernel's buffer
            line = b"#!" + b" " * rng.randrange(220, 256) + line[2:]
        app = _file(place / f"s{trial}", line)
        said = _agrees([str(app)], None)
        seen.add(said and said[0])
    assert seen == {None, 126, 127}, seen  # each answer came up


@pytest.mark.parametrize("user", _USERS)
def test_scripts_run_by_scripts_are_followed_as_deep_as_the_kernel_follows_them(
        place, user) -> None:
    """Five scripts, each the interpreter of the one before, end in a program: run. A sixth
    is one too many (ELOOP); the missing interpreter of the last, however deep, is ENOENT."""
    prev = "/bin/true"
    chain = []
    for i in range(7):
        prev = str(_file(place / f"s{i}", f"#!{prev}\n"))
        chain.append(prev)
    for depth, script in enumerate(chain, 1):
        said = _agrees([script], user)
        assert (said is None) is (depth <= 5), (depth, said)
    assert "6 deep: more than the kernel follows" in _agrees([chain[5]], user)[1]
    _file(place / "s0", "#!/nonexistent/sh\n")
    said = _agrees([chain[4]], user)
    assert said is not None and said[0] == 127
    assert said[1].endswith(f"{chain[0]} is a script whose interpreter /nonexistent/sh (its #! "
                            "line) is not in this image: No such file or directory; install "
                            "it, or change the #! line"), said[1]


@pytest.mark.parametrize("user", _USERS)
def test_an_interpreter_the_exec_may_not_run_is_named(place, user) -> None:
    """An interpreter that is there but not executable: the exec's EACCES (126), and which."""
    interp = _file(place / "interp", "#!/bin/true\n", 0o644)
    app = _file(place / "app", f"#!{interp}\n")
    said = _agrees([str(app)], user)
    assert said is not None and said[0] == 126
    assert said[1].startswith(f"cannot run {app}: {app} is a script, and its interpreter "
                              f"{interp} (mode 0644, owner 0:0) is not executable"), said[1]


@pytest.mark.parametrize("user", _USERS)
def test_a_program_for_another_machine_is_refused_naming_both(place, user) -> None:
    """Before: an image built for arm64 run on x86_64 (or the other way round: a Graviton
    instance and an Intel one) passed the check, and the exec failed after the tunnel came
    up with "Exec format error". Now at once, naming both machines and what to change."""
    machine, name = _other_machine()
    here = os.uname().machine
    app = _file(place / "app", _elf_header(machine))
    said = _agrees([str(app)], user)
    platform = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}[here]
    assert said == (126, f"cannot run {app}: {app} is a program for {name} (64-bit "
                         f"little-endian), and this machine is {here}: Exec format error; "
                         f"build the image for {here} (docker build --platform {platform}), "
                         f"or run it on an {name} instance")
    # This machine's, in the other byte order: a machine no loader here knows either.
    _file(app, _elf_header(_native_machine(), order=">"))
    # (Not "run it on an instance" of the machine it is.)
    assert _agrees([str(app)], user)[1].endswith(
        f"{app} is a program for {here} (64-bit big-endian), and this machine runs "
        f"little-endian {here} programs only: Exec format error; build it little-endian "
        f"(docker build --platform {platform})")
    # This machine's, but an object file, not a program.
    _file(app, _elf_header(_native_machine(), e_type=1))
    assert "is an ELF file a relocatable object (.o), not a program: Exec format error" in \
        _agrees([str(app)], user)[1]


def _exit_0(bits: int, machine: int, e_type: int) -> bytes:
    """The smallest program that exits 0 at once: an ELF header, one PT_LOAD of the whole
    file, and the exit system call (x86: int 0x80, eax 1; x86_64: syscall, eax 60); static,
    no PT_INTERP. BITS 32 for ELFCLASS32 (i386 with EM_386, x32 with EM_X86_64)."""
    if bits == 32:
        code = b"\xb8\x01\x00\x00\x00\x31\xdb\xcd\x80"
        base, start = 0x08048000 if e_type == 2 else 0, 52 + 32
        head = b"\x7fELF\x01\x01\x01" + bytes(9) + struct.pack(
            "<HHIIIIIHHHHHH", e_type, machine, 1, base + start, 52, 0, 0, 52, 32, 1, 0, 0, 0)
        phdr = struct.pack("<IIIIIIII", 1, 0, base, base, start + len(code),
                           start + len(code), 5, 0x1000)
    else:
        code = b"\xb8\x3c\x00\x00\x00\x31\xff\x0f\x05"
        base, start = 0x400000 if e_type == 2 else 0, 64 + 56
        head = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
            "<HHIQQQIHHHHHH", e_type, machine, 1, base + start, 64, 0, 0, 64, 56, 1, 0, 0, 0)
        phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, start + len(code),
                           start + len(code), 0x1000)
    return head + phdr + code


@pytest.mark.parametrize("user", _USERS)
@pytest.mark.parametrize(("bits", "machine", "e_type"), [
    (64, 62, 3),  # static-pie: ET_DYN with no loader
    (64, 62, 2),  # static
    (32, 3, 2),  # i386, which an x86_64 kernel runs with IA32 emulation
    (32, 62, 2),  # x32, which it runs with CONFIG_X86_X32_ABI
], ids=["static-pie", "static", "i386", "x32"])
def test_static_and_32_bit_programs_are_never_refused(place, user, bits, machine,
                                                      e_type) -> None:
    """Claims nothing tested: a program with no PT_INTERP (static, or static-pie: ET_DYN
    like a shared object) is not taken for one whose loader is missing; and a 32-bit program
    for this machine's family (i386, x32), which only the exec can tell this kernel runs, is
    left to it, never refused. Compared with a real exec where it runs."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86 programs")
    app = _file(place / "app", _exit_0(bits, machine, e_type))
    assert enclave_mod._unrunnable([str(app)], user) is None
    if _exec_says([str(app)], user) is None or bits == 64:  # runs: the exec agrees
        assert _agrees([str(app)], user) is None


@pytest.mark.parametrize("user", _USERS)
def test_a_program_whose_loader_is_missing_is_refused_naming_the_loader(place, user) -> None:
    """Before: a program linked against glibc in an image with musl's loader only (Alpine),
    or the other way round, passed the check: the exec then failed with "No such file or
    directory" for a file that is there, after the tunnel came up. Here a real copy of
    /bin/true whose PT_INTERP names a missing loader."""
    app = _with_loader("/bin/true", place / "app", "/lib/ld-musl-x86_64.so.1")
    said = _agrees([str(app)], user)
    assert said == (127, f"cannot run {app}: {app} is a dynamically linked program whose "
                         "loader (ELF program interpreter) /lib/ld-musl-x86_64.so.1 is not in "
                         "this image: No such file or directory; it was built for another C "
                         "library (glibc, musl): build it on the image's own base, or "
                         "statically, or add that C library to the image")
    # A loader that is there but that the exec may not run, or a directory: EACCES.
    (place / "d").mkdir(mode=0o755)
    _with_loader("/bin/true", app, str(place / "d"))
    assert _agrees([str(app)], user)[1].endswith(
        f"{app} is a dynamically linked program, and its loader {place / 'd'} is a directory")
    real = re.search(rb"/lib[^\0]*/ld-[^\0]*\.so\.[0-9]", Path("/bin/true").read_bytes())
    assert real is not None
    shutil.copy(real.group().decode(), place / "ld")
    (place / "ld").chmod(0o644)
    _with_loader("/bin/true", app, str(place / "ld"))
    assert "its loader " + str(place / "ld") + " (mode 0644, owner 0:0) is not executable" in \
        _agrees([str(app)], user)[1]
    (place / "ld").chmod(0o755)  # the same loader, executable: it runs
    assert _agrees([str(app)], user) is None


@pytest.mark.parametrize("user", _USERS)
def test_relative_interpreters_and_loaders_are_found_from_the_working_directory(
        monkeypatch, place, user) -> None:
    """Claims nothing tested: the kernel opens a #! line's relative interpreter, and a
    program's relative PT_INTERP, from the working directory of the exec (CMD's, `up`'s), not
    from the file's own: found there, it runs; from elsewhere, ENOENT (127)."""
    (place / "bin").mkdir(mode=0o755)
    shutil.copy("/bin/true", place / "bin" / "true")
    real = re.search(rb"/lib[^\0]*/ld-[^\0]*\.so\.[0-9]", Path("/bin/true").read_bytes())
    assert real is not None
    shutil.copy(real.group().decode(), place / "bin" / "ld")
    script = _file(place / "bin" / "script", "#!bin/true\n")
    program = _with_loader("/bin/true", place / "bin" / "program", "bin/ld")
    monkeypatch.chdir(place)
    for app in (script, program):
        assert _agrees([str(app)], user) is None, app
    monkeypatch.chdir(place / "bin")
    for app in (script, program):
        said = _agrees([str(app)], user)
        assert said is not None and said[0] == 127 and " bin/" in said[1], said


@pytest.mark.parametrize("user", _USERS)
def test_a_program_cmd_s_user_may_run_but_not_read_is_not_refused(place, user) -> None:
    """A claim nothing tested: the exec of a program (ELF) needs only the x bit, not read
    permission, which `up` (root) has to look at it: mode 0711 and 0111 run, as the exec
    says."""
    for mode in (0o711, 0o111):
        shutil.copy("/bin/true", place / "app")
        (place / "app").chmod(mode)
        assert _agrees([str(place / "app")], user) is None, oct(mode)


# Argv: the noexec mount's directory, then per line UID:GID ("" for root) and CMD: prints the
# check's word and the exec's errno for each, as JSON.
_ON_NOEXEC = r"""
import json, os, sys
from wgvsock.roles import cmd, enclave
out = []
for line in sys.argv[2:]:
    ids, _, command = line.partition(" ")
    user = cmd.Credentials(*map(int, ids.split(":"))) if ids else None
    os.environ["PATH"] = os.path.dirname(command) or sys.argv[1]
    said = enclave._unrunnable([command], user)
    try:
        cmd.start([command], user).wait(30)
        got = None
    except OSError as e:
        got = e.errno
    out.append([said, got])
print(json.dumps(out))
"""


@pytest.mark.root
def test_a_cmd_on_a_noexec_mount_is_refused(place) -> None:
    """Before: a script whose interpreter is on a file system mounted noexec (a tmpfs, a
    volume) passed the check, and so did a CMD there for enclave.user (its mode bits let the
    user in): the exec failed with EACCES after the tunnel came up. Root's own CMD there was
    refused as "not executable", which its mode said it was. A real noexec tmpfs in a mount
    namespace of its own."""
    mnt = place / "mnt"
    mnt.mkdir(mode=0o755)
    setup = (f'mount -t tmpfs -o noexec,mode=0755 tmpfs {mnt} && cp /bin/true {mnt}/app && '
             f'printf "#!{mnt}/app\\n" > {place}/script && chmod 755 {place}/script && '
             'exec "$@"')
    lines = [f"{ids} {c}" for ids in ("", "4242:4243")
             for c in (f"{mnt}/app", f"{place}/script", "app")]
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup,
                          "sh", sys.executable, "-c", _ON_NOEXEC, str(mnt), *lines],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout)
    for line, (said, got) in zip(lines, results, strict=True):
        assert got == errno.EACCES, line
        assert said is not None and said[0] == 126, (line, said)
    assert results[0][0][1] == (
        f"cannot run {mnt}/app: is on {mnt}, a file system mounted noexec, from which the "
        f"kernel runs nothing (Permission denied); in the image, put it on another file "
        f"system, or mount {mnt} without noexec")
    assert results[1][0][1] == (
        f"cannot run {place}/script: {place}/script is a script, and its interpreter "
        f"{mnt}/app is on {mnt}, a file system mounted noexec, from which the kernel runs "
        f"nothing (Permission denied); in the image, put it on another file system, or mount "
        f"{mnt} without noexec")
    assert results[2][0][1].startswith(f"cannot run app: {mnt}/app is on {mnt}, a file "
                                       "system mounted noexec")
    assert not (mnt / "app").exists()  # the mount went with its namespace


# A FUSE file system of one directory holding one file, app, a copy of a program, served
# from /dev/fuse by the few requests a lookup, a stat and an exec make; mounted with
# allow_other, and default_permissions when asked. Argv: the mount point, the program, the
# directory's mode and the file's (octal), "default_permissions" or "", then the check's
# user as UID:GID. Prints the check's word and the exec's errno, as JSON.
_ON_FUSE = r"""
import ctypes, errno, json, os, struct, sys, threading
from wgvsock.roles import cmd, enclave
target, source, dmode, fmode, extra, ids = sys.argv[1:7]
data = open(source, "rb").read()
fd = os.open("/dev/fuse", os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other{',' + extra if extra else ''}"
if libc.mount(b"wgvsock-test", target.encode(), b"fuse.wgvsock-test", 0, opts.encode()) != 0:
    sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
ATTR = "<QQQQQQIIIIIIIIII"  # fuse_attr
def attr(node):
    if node == 1:
        return struct.pack(ATTR, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40000 | int(dmode, 8), 2, 0, 0, 0,
                           4096, 0)
    return struct.pack(ATTR, 2, len(data), (len(data) + 511) // 512, 0, 0, 0, 0, 0, 0,
                       0o100000 | int(fmode, 8), 1, 0, 0, 0, 4096, 0)
def serve():
    while True:
        try:
            req = os.read(fd, 1 << 20)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.ENOENT):
                continue
            return  # unmounted
        length, op, unique, node = struct.unpack_from("<IIQQ", req)
        body, err, out = req[40:length], 0, b""
        if op == 26:  # INIT: protocol 7.31, no options
            out = struct.pack("<IIIIHHIIHHII", 7, 31, 0, 0, 0, 0, 4096, 1, 0, 0, 0, 0) + bytes(24)
        elif op == 1:  # LOOKUP
            if node == 1 and body.split(b"\0", 1)[0] == b"app":
                out = struct.pack("<QQQQII", 2, 0, 1, 1, 0, 0) + attr(2)
            else:
                err = errno.ENOENT
        elif op == 3:  # GETATTR
            out = struct.pack("<QII", 1, 0, 0) + attr(node)
        elif op == 14:  # OPEN
            out = struct.pack("<QII", 0, 0, 0)
        elif op == 15:  # READ
            _, offset, size = struct.unpack_from("<QQI", body)
            out = data[offset:offset + size]
        elif op == 17:  # STATFS
            out = struct.pack("<QQQQQIIII", 0, 0, 0, 0, 0, 4096, 255, 4096, 0) + bytes(24)
        elif op in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no answer
            continue
        elif op not in (18, 25, 34):  # RELEASE, FLUSH, ACCESS: done
            err = errno.ENOSYS  # (xattrs among them: no ACL, no file capabilities)
        with __import__("contextlib").suppress(OSError):
            os.write(fd, struct.pack("<IiQ", 16 + len(out), -err, unique) + out)
threading.Thread(target=serve, daemon=True).start()
user = cmd.Credentials(*map(int, ids.split(":")))
app = os.path.join(target, "app")
said = enclave._unrunnable([app], user)
try:
    cmd.start([app], user).wait(30)
    got = None
except OSError as e:
    got = e.errno
libc.umount2(target.encode(), 2)
print(json.dumps([said, got]))
"""


@pytest.mark.parametrize("options", ["", "default_permissions"])
@pytest.mark.root
def test_a_fuse_file_system_s_own_permission_is_left_to_the_exec(place, options) -> None:
    """Before: on a file system that judges access itself, the mode bits `up` reads were
    taken for the kernel's word: a FUSE file system mounted without default_permissions
    (sshfs, s3fs, a FUSE volume), where the kernel lets anyone search a directory and run
    a file with any x bit, NFS, whose server judges (an EFS access point's own identity,
    NFSv4 owners shown as nobody), SMB or 9p. A directory and a file of root's, 0700 both,
    were refused for enclave.user, whose exec ran the file. Now such a file system's
    refusals are left to the exec; with default_permissions the kernel reads the mode bits,
    and so does the check (both refuse). A FUSE file system served here, in a mount
    namespace of its own."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = place / "fuse"
    mnt.mkdir(mode=0o755)
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", _ON_FUSE, str(mnt), "/bin/true", "700", "700", options,
                          "4242:4243"],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    said, got = json.loads(res.stdout)
    if options:
        assert got == errno.EACCES
        assert said == [126, (f"cannot run {mnt}/app: directory {mnt} (mode 0700, owner 0:0) "
                              "is not searchable by enclave.user (4242:4243); in the image, "
                              f"chmod o+x {mnt}, or put CMD where that user can reach it")]
    else:
        assert (said, got) == (None, None)

@pytest.mark.root
def test_a_noexec_bind_mount_is_named_not_the_file_system_under_it(place) -> None:
    """Before: a directory bind-mounted noexec on its own file system (systemd's
    NoExecPaths=; `mount --bind D D` then `mount -o remount,bind,noexec D`) was said to be on
    the mount of that file system (/ here), and "mount / without noexec" given as the fix,
    which / already is: the nearest directory above the file on another device was taken for
    its mount. Now the mount it is on, from mountinfo (a name with a blank, which mountinfo
    escapes, too)."""
    dirs = [place / "mnt", place / "a mount"]
    setup = ""
    for d in dirs:
        d.mkdir(mode=0o755)
        shutil.copy("/bin/true", d / "app")
        setup += f"mount --bind '{d}' '{d}' && mount -o remount,bind,noexec '{d}' && "
    lines = [f" {d}/app" for d in dirs]
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          setup + 'exec "$@"', "sh", sys.executable, "-c", _ON_NOEXEC,
                          str(place), *lines],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    for d, (said, got) in zip(dirs, json.loads(res.stdout), strict=True):
        assert got == errno.EACCES, d
        assert said == [126, (
            f"cannot run {d}/app: is on {d}, a file system mounted noexec, from which the "
            f"kernel runs nothing (Permission denied); in the image, put it on another file "
            f"system, or mount {d} without noexec")], said


@pytest.mark.parametrize("user", _USERS)
def test_path_is_searched_as_python_s_execvp_searches_it(monkeypatch, place, user) -> None:
    """os.execvp tries every directory of PATH, on any error, and when none runs raises the
    first error other than ENOENT and ENOTDIR, else the last one; it runs no shell for a
    file the kernel refuses (ENOEXEC), as glibc's execvp would. The check says what it
    does, file by file. Before: root's check asked shutil.which (the first file with an x
    bit), so a program for another machine first on PATH passed where the exec failed
    (ENOEXEC), and a directory named like CMD, or a PATH whose last entry is a file, gave
    "not found" (127) where the exec fails with EACCES or ENOTDIR (126)."""
    a, b = place / "a", place / "b"
    for d in (a, b):
        d.mkdir(mode=0o755)
    monkeypatch.setenv("PATH", f"{a}:{b}")
    machine, _ = _other_machine()
    _file(a / "app", _elf_header(machine))
    _file(b / "app", "#!/bin/true\n")
    assert _agrees(["app"], user) is None  # the second runs
    (b / "app").unlink()
    said = _agrees(["app"], user)  # the first's ENOEXEC stands
    assert said is not None and said[1].startswith(f"cannot run app: {a / 'app'} is a program "
                                                   "for"), said
    # A missing interpreter is ENOENT, passed over without being kept: a later EACCES stands.
    _file(a / "app", "#!/nonexistent/sh\n")
    _file(b / "app", "#!/bin/true\n", 0o644)
    said = _agrees(["app"], user)
    assert said is not None and said[0] == 126 and str(b / "app") in said[1], said
    # ... and with nothing else, the last ENOENT: not found, the script said too.
    (b / "app").unlink()
    assert _agrees(["app"], user) == (127, (
        f"cannot run app: not found in PATH ({a}:{b}); {a / 'app'} is a script whose "
        "interpreter /nonexistent/sh (its #! line) is not in this image: No such file or "
        "directory; install it, or change the #! line"))
    # A directory named like CMD: EACCES, kept.
    (a / "app").unlink()
    (a / "app").mkdir()
    assert _agrees(["app"], user) == (126, f"cannot run app: {a / 'app'} is a directory")
    # A file as the last directory of PATH: ENOTDIR is the last error, and the exec's.
    (a / "app").rmdir()
    monkeypatch.setenv("PATH", f"{a}:{_file(place / 'f', '')}")
    assert _agrees(["app"], user) == (126, f"cannot run app: not found in PATH ({a}:"
                                           f"{place / 'f'})")


def test_a_format_a_binfmt_misc_entry_takes_is_left_to_the_exec(monkeypatch, place) -> None:
    """binfmt_misc (qemu-user-static, Docker's emulation) runs what the kernel's own loaders
    refuse: a file one of its enabled entries takes, by magic under its mask or by extension,
    is left to the exec. (Entries as binfmt_misc lists them, in a directory standing for its
    mount: registering one would change this whole machine.)"""
    machine, _ = _other_machine()
    app = _file(place / "app", _elf_header(machine))
    text = _file(place / "app.txt", "hello\n")
    misc = place / "misc"
    misc.mkdir()
    (misc / "status").write_text("enabled\n")
    (misc / "register").write_text("")
    monkeypatch.setattr(enclave_mod.binfmt, "_misc_dir", lambda: str(misc))
    assert enclave_mod._unrunnable([str(app)]) is not None  # no entries
    magic = _elf_header(machine)[:20]
    mask = b"\xff" * 7 + b"\x00" + b"\xff" * 8 + b"\xfe\xff\xff\xff"
    (misc / "qemu-other").write_text(
        f"enabled\ninterpreter /usr/bin/qemu-static\nflags: F\noffset 0\n"
        f"magic {magic.hex()}\nmask {mask.hex()}\n")
    (misc / "txt").write_text("disabled\ninterpreter /usr/bin/cat\nflags: \nextension .txt\n")
    assert enclave_mod._unrunnable([str(app)]) is None
    assert enclave_mod._unrunnable([str(text)]) is not None  # its entry is disabled
    (misc / "txt").write_text("enabled\ninterpreter /usr/bin/cat\nflags: \nextension .txt\n")
    assert enclave_mod._unrunnable([str(text)]) is None
    (misc / "status").write_text("disabled\n")  # binfmt_misc as a whole
    assert enclave_mod._unrunnable([str(app)]) is not None
    assert enclave_mod._unrunnable([str(text)]) is not None


def _in_a_user_namespace_with_a_binfmt_misc_entry(place: Path, magic: bytes, mask: bytes,
                                                  lines: list[str]) -> list:
    """_ON_NOEXEC's [check, exec] for each of LINES, run in a user namespace of its own whose
    binfmt_misc (one per user namespace since Linux 6.7) has an entry for MAGIC under MASK,
    run by /bin/true, and in a mount namespace where that binfmt_misc is not mounted: as a
    container sees none of its host's mounts while the host's entries run its programs. The
    entry is the namespace's alone and goes with it: nothing of this machine's changes."""
    misc = place / "misc"
    misc.mkdir()
    magic_, mask_ = ("".join(f"\\x{b:02x}" for b in bs) for bs in (magic, mask))
    register = f":wgvsock-test:M::{magic_}:{mask_}:/bin/true:"
    setup = ('mount -t binfmt_misc binfmt_misc "$0" || exit 77; printf %s "$1" > "$0/register"'
             ' || exit 78; shift; unshare --mount --propagation private sh -c '
             '\'umount "$0" && exec "$@"\' "$@"')
    res = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "sh",
         "-c", setup, str(misc), register, str(misc), sys.executable, "-c", _ON_NOEXEC,
         str(place), *lines],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    if res.returncode == 77:
        pytest.skip(f"binfmt_misc cannot be mounted in a user namespace here: {res.stderr}")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_format_an_unseen_binfmt_misc_entry_takes_is_left_to_the_exec(place) -> None:
    """Before: in a container, where the host's binfmt_misc is not mounted, a program for
    another machine was refused (126) as no entry there could take it; but the host's
    entries (qemu-user-static's, Docker Desktop's qemu or Rosetta) take it all the same, and
    the exec runs it: an app that would have run was stopped. Now, with binfmt_misc in the
    kernel and not mounted where `up` can see it, what only a binfmt_misc entry could run
    (the kernel's ENOEXEC) is left to the exec; a missing interpreter is still said."""
    machine, _ = _other_machine()
    app = _file(place / "app", _elf_header(machine))
    script = _file(place / "script", "#!/nonexistent/sh\n")
    mask = b"\xff" * 7 + b"\x00" + b"\xff" * 8 + b"\xfe\xff\xff\xff"
    ran, missing = _in_a_user_namespace_with_a_binfmt_misc_entry(
        place, _elf_header(machine)[:20], mask, [f" {app}", f" {script}"])
    assert ran == [None, None], ran  # the exec ran it, through the entry it cannot see
    said, got = missing
    assert got == errno.ENOENT and said is not None and said[0] == 127, missing


# Names a command the check suggests would take apart unquoted: a blank (two files), a quote
# (an unclosed string), a `;` and a $(...) (another command run).
_AWKWARD = ["my app", "it's", "a;touch b", "$(touch b)"]


def _run_fix(said: str, before: str, after: str | None, where: Path) -> None:
    """Runs, with sh in WHERE, the command SAID gives between BEFORE and AFTER (its end)."""
    fix = said.split(before, 1)[1]
    fix = fix.split(after, 1)[0] if after else fix
    subprocess.run(["sh", "-c", fix], cwd=where, check=True, timeout=30)


@pytest.mark.parametrize("name", _AWKWARD)
def test_the_fixes_the_check_gives_fix_that_file_whatever_its_name(place, name) -> None:
    """The sed -i and chmod +x it said named the path unquoted: for "my app", `chmod +x
    /tmp/x/my app` was a chmod of /tmp/x/my and ./app; for "it's" the shell waited for the
    quote to close; "a;touch b" ran touch. Each, run as given, now fixes that file alone."""
    app = _file(place / name, "#!/bin/sh\r\necho hi\r\n")
    said = _agrees([str(app)], None)
    assert said is not None and "Windows (CRLF) line endings" in said[1], said
    _run_fix(said[1], "convert the file to Unix line endings: ", " (or dos2unix ", place)
    assert app.read_bytes() == b"#!/bin/sh\necho hi\n"
    app.chmod(0o644)
    said = _agrees([str(app)], None)
    assert said is not None and said[1].endswith(f"in the image, chmod +x {shlex.quote(str(app))}")
    _run_fix(said[1], "in the image, ", None, place)
    assert _agrees([str(app)], None) is None
    assert os.listdir(place) == [name]  # nothing else made or changed


@pytest.mark.root
@pytest.mark.parametrize("name", _AWKWARD)
def test_the_fix_for_a_cmd_the_user_may_not_run_fixes_that_file_whatever_its_name(
        place, name) -> None:
    user = cmd.Credentials(4242, 4243)
    app = _true(place / name)
    app.chmod(0o744)
    said = _agrees([str(app)], user)
    assert said is not None and "is not executable by enclave.user" in said[1], said
    _run_fix(said[1], "in the image, ", ", or give it to that user", place)
    assert _agrees([str(app)], user) is None
    assert os.listdir(place) == [name]


@pytest.mark.parametrize("how", ["crlf", "elf"])
@pytest.mark.root
def test_enclave_up_refuses_such_a_cmd_in_one_line_before_any_tunnel(place, how) -> None:
    """The real `wgvsock enclave up`, in a network namespace of its own and without
    CAP_NET_ADMIN: had it gone on to bring the tunnel up, it would have failed at `lo`
    (test_enclave_lifecycle's "bringing lo up: Operation not permitted"), status 1."""
    if how == "crlf":
        app = _file(place / "app", "#!/bin/sh\r\necho hi\r\n")
        want = (127, f"wgvsock enclave up: cannot run {app}: {app} has Windows (CRLF) line "
                     "endings: its #! line names the interpreter /bin/sh\\r, with a carriage "
                     "return at the end, which does not exist; convert the file to Unix line "
                     f"endings: sed -i 's/\\r$//' {app} (or dos2unix {app})\n")
    else:
        app = _file(place / "app", _elf_header(_other_machine()[0]))
        want = (126, None)
    # In a user namespace with a binfmt_misc of its own mounted, and no entry in it: else the
    # check could not tell that no unseen entry takes the program for another machine.
    (place / "misc").mkdir()
    res = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "sh",
         "-c", 'mount -t binfmt_misc binfmt_misc "$0" || exit 77; exec "$@"', str(place / "misc"),
         "unshare", "--net", "setpriv", "--bounding-set", "-net_admin", "--inh-caps",
         "-net_admin", sys.executable, "-m", "wgvsock.cli", "enclave", "up", "--profile",
         str(PROFILE), "--timeout", "5", "--", str(app)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    if res.returncode == 77:
        pytest.skip(f"binfmt_misc cannot be mounted in a user namespace here: {res.stderr}")
    assert res.returncode == want[0], res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "Exec format error" in res.stderr if want[1] is None else res.stderr == want[1]
    assert res.stdout == ""


def test_the_exec_s_own_failure_says_what_its_errno_means(deaths, monkeypatch, place,
                                                           capsys) -> None:
    """What the check leaves to the exec (a file `up` may not read, a format a binfmt_misc
    entry of a host hidden from a container was thought to take) fails there: said with
    what the errno means for CMD, not the bare strerror. (The check told not to look.)"""
    monkeypatch.setattr(enclave_mod, "_unrunnable", lambda command, user=None: None)
    app = _file(place / "app", _elf_header(_other_machine()[0]))
    rc = enclave_mod.run_up(load_profile(str(PROFILE)), [str(app)], timeout=5)
    here = os.uname().machine
    assert rc == 126
    assert capsys.readouterr().err == (
        f"wgvsock enclave up: cannot run {app}: Exec format error; it is neither a program for "
        f"this machine ({here}) nor a script starting with #!, and no binfmt_misc entry of "
        "this kernel takes it (CMD is not run through a shell); rebuild it for "
        f"{here}, or make its first line #! and its interpreter's path\n")
