"""wgvsock.sdnotify against a real AF_UNIX datagram socket standing where systemd's would be
(tests/net/test_systemd.py runs the parent under systemd itself)."""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from wgvsock.sdnotify import Notifier, Watchdog, _one_line


@pytest.fixture
def manager(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_waiting(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0)[0]


def test_environment_is_taken_so_children_do_not_inherit_it(manager) -> None:
    _, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "x"}
    n = Notifier.from_environ(env)
    assert env == {"OTHER": "x"}
    assert n.enabled and n.watchdog_interval == 5.0


def test_a_watchdog_meant_for_another_process_is_not_ours(manager) -> None:
    _, path = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000",
                               "WATCHDOG_PID": "1"})
    assert n.enabled and n.watchdog_interval is None


@pytest.mark.parametrize("usec", ["", "0", "ten", "-5"])
def test_no_or_bad_watchdog_period_means_no_watchdog(manager, usec: str, caplog) -> None:
    _, path = manager
    with caplog.at_level(logging.WARNING):
        n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec})
    assert n.watchdog_interval is None
    if usec == "ten":
        assert "ignoring WATCHDOG_USEC='ten': not a number" in caplog.text


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.send("READY=1") is False
    n.ready("x")
    n.beat(100.0, None)
    n.close()


def test_ready_status_reloading_stopping(manager) -> None:
    sock, path = manager
    n = Notifier(path)
    n.ready("wg0 up;\nwaiting")
    # A newline in the status would start an assignment of its own.
    assert received(sock) == ["READY=1", "STATUS=wg0 up; waiting"]
    n.status("wg0 up; waiting")  # unchanged: not sent again
    n.status("tunnel up")
    assert received(sock) == ["STATUS=tunnel up"]
    n.reloading()
    assert received(sock) == ["RELOADING=1"]
    n.stopping("stopping: asked")
    assert received(sock) == ["STOPPING=1", "STATUS=stopping: asked"]
    assert nothing_waiting(sock)
    n.close()


def test_abstract_socket_address() -> None:
    name = f"wgvsock-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier("@" + name)
        n.ready()
        assert received(sock) == ["READY=1"]
        n.close()
    finally:
        sock.close()


def test_watchdog_pings_at_half_the_period_and_never_while_stalled(manager, caplog) -> None:
    sock, path = manager
    n = Notifier(path, watchdog_usec=10_000_000)
    n.beat(100.0, None)
    assert received(sock) == ["WATCHDOG=1"]
    n.beat(104.9, None)
    assert nothing_waiting(sock)
    n.beat(105.0, None)
    assert received(sock) == ["WATCHDOG=1"]
    with caplog.at_level(logging.ERROR):
        for t in (110.0, 111.0, 112.0):
            n.beat(t, "the timer thread has not finished a tick for 9 s")
    assert nothing_waiting(sock)
    # Said once, with the reason, not once a second.
    assert caplog.text.count("not confirming liveness") == 1
    assert "has not finished a tick for 9 s" in caplog.text
    # Cleared: a ping at once, not at the next period.
    with caplog.at_level(logging.WARNING):
        n.beat(112.5, None)
    assert received(sock) == ["WATCHDOG=1"]
    assert "confirmed to systemd's watchdog again" in caplog.text
    n.close()


def test_a_manager_that_is_gone_is_reported_once_and_never_raises(tmp_path: Path,
                                                                  caplog) -> None:
    n = Notifier(str(tmp_path / "nobody"), watchdog_usec=2_000_000)
    with caplog.at_level(logging.WARNING):
        n.ready("x")
        n.beat(1.0, None)
        n.beat(2.0, None)
        n.stopping()
    assert caplog.text.count("cannot notify the service manager") == 1
    n.close()



def test_the_watchdog_thread_pings_while_healthy_and_stops_when_told(manager, caplog) -> None:
    sock, path = manager
    n = Notifier(path, watchdog_usec=200_000)  # a ping every 0.1 s
    health: list[str | None] = [None]
    dog = Watchdog(n, lambda now: health[0], every=0.02)
    dog.start()
    try:
        # From its own thread: nothing else here calls beat().
        assert received(sock) == ["WATCHDOG=1"]
        assert received(sock) == ["WATCHDOG=1"]
        with caplog.at_level(logging.ERROR):
            health[0] = "the main loop has not come round for 31 s"
            dog.check(1e9)  # (one look of our own, so the withholding has begun)
            sock.settimeout(0.5)
            while True:  # what was already on its way
                try:
                    sock.recv(64)
                except TimeoutError:
                    break
        assert "not confirming liveness to systemd's watchdog: the main loop has not come " \
            "round for 31 s" in caplog.text
    finally:
        dog.close()
    n.close()


def test_a_liveness_check_that_raises_withholds_the_ping(manager, caplog) -> None:
    sock, path = manager
    n = Notifier(path, watchdog_usec=10_000_000)

    def broken(now: float) -> str | None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR):
        Watchdog(n, broken).check(100.0)
    assert nothing_waiting(sock)
    assert "the liveness check failed: RuntimeError('boom')" in caplog.text
    n.close()


@pytest.mark.parametrize("usec", [1_000_000, 300_000])
def test_a_short_watchdog_period_is_checked_often_enough_to_ping_in_time(
        manager, usec: int) -> None:
    # Checked each second, a 1 s WatchdogSec got a ping only each second: late by jitter.
    sock, path = manager
    n = Notifier(path, watchdog_usec=usec)
    dog = Watchdog(n, lambda now: None)
    assert dog.every <= usec / 4e6
    pings = []
    now = 100.0
    for _ in range(40):  # the thread's looks, `every` apart, without its sleeping
        dog.check(now)
        if not nothing_waiting(sock):
            assert received(sock) == ["WATCHDOG=1"]
            pings.append(now)
        now += dog.every
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert gaps and max(gaps) < 0.8 * usec / 1e6
    n.close()
    # A long period is still looked at each second (a stall is noticed and logged soon).
    assert Watchdog(Notifier(path, watchdog_usec=30_000_000), lambda now: None).every == 1.0


def test_status_text_has_no_nul_and_is_capped(manager) -> None:
    # systemd ignores a notification with a NUL inside or one over 4 KiB, READY=1 with it.
    assert _one_line("ok\0READY=1\r\nnext") == "ok\\x00READY=1 next"
    long = _one_line("é" * 10 * 1024)
    assert long.endswith("…") and 900 < len(long.encode()) <= 1024
    assert set(long[:-1]) == {"é"}
    sock, path = manager
    n = Notifier(path)
    n.ready("\0" + "x" * 10 * 1024)
    data = sock.recv(65536)
    assert b"\0" not in data and len(data) < 2048
    assert data.split(b"\n")[0] == b"READY=1"
    n.close()


def test_without_a_watchdog_period_no_thread_is_started(manager) -> None:
    _, path = manager
    dog = Watchdog(Notifier(path), lambda now: None)
    dog.start()
    assert dog._thread is None
    dog.close()


def test_detaching_is_refused_as_the_main_process_of_a_type_notify_unit(
        manager, tmp_path: Path) -> None:
    """systemd takes notifications only from the process it started, which would exit once
    the detached one is up: the unit would fail after its start timeout, without a reason.
    (`parent up` shares the launcher; tests/net/test_systemd.py runs it in a unit without -f.)
    systemd names that process in SYSTEMD_EXEC_PID (and WATCHDOG_PID)."""
    sock, path = manager
    # Were the refusal gone, the detached daemon would fail at once here (an interface name
    # longer than the kernel's 15 bytes), leaving nothing behind.
    env = dict(os.environ, NOTIFY_SOCKET=path, WGVSOCK_UNIX_DIR=str(tmp_path))
    res = subprocess.run(
        ["sh", "-c", 'SYSTEMD_EXEC_PID=$$ exec "$@"', "-", sys.executable, "-m",
         "wgvsock.daemon", "-n", "unix", "wgnotify-name-too-long"],
        env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "started by a systemd unit of Type=notify (NOTIFY_SOCKET is set), which must run " \
        "it in the foreground: add -f to the unit's ExecStart" in res.stderr
    assert "Traceback" not in res.stderr
    assert nothing_waiting(sock)


def test_a_launcher_started_further_down_detaches_without_the_managers_socket(
        manager, tmp_path: Path) -> None:
    """A script in a unit, or a container's payload, that runs `wgvsock daemon wg0`: not the
    unit's main process, so it detaches as ever, and the detached process does not speak to
    the manager (its failure here would otherwise have sent STATUS=)."""
    sock, path = manager
    env = dict(os.environ, NOTIFY_SOCKET=path, WGVSOCK_UNIX_DIR=str(tmp_path),
               SYSTEMD_EXEC_PID="1")
    res = subprocess.run([sys.executable, "-m", "wgvsock.daemon", "-n", "unix",
                          "wgnotify-name-too-long"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "interface name 'wgnotify-name-too-long' must be 1-15 bytes" in res.stderr
    assert "Type=notify" not in res.stderr
    # The detached process may still be on its way out: give it a second to say anything.
    sock.settimeout(1)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
