"""wgvsock.threads: a loop survives a passing fault, gives up on a persistent one, and a
dying thread stops the daemon with its reason (issue 12.6)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.unsayable import Unsayable
from wgvsock.threads import NamedThread, Survivor, on_thread_death


def test_survivor_logs_the_traceback_once_then_gives_up(caplog: pytest.LogCaptureFixture):
    survivor = Survivor("loop", limit=3)
    answers = []
    for i in range(5):
        try:
            raise RuntimeError(f"fault {i}")
        except RuntimeError as e:
            answers.append(survivor.survive(e))
    assert answers == [True, True, True, False, False]
    assert caplog.text.count("Traceback") == 1
    assert "loop: unexpected error (carrying on)" in caplog.text
    assert "giving up" in caplog.text


def test_a_dying_thread_stops_the_daemon_with_its_reason(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored afterwards
    reasons: list[str] = []
    on_thread_death(reasons.append)

    def boom() -> None:
        raise KeyError("lost")

    t = threading.Thread(target=boom, name="worker")
    t.start()
    t.join()
    assert reasons == ["thread worker died: KeyError: 'lost'"]
    assert "thread worker died" in caplog.text and "Traceback" in caplog.text


def test_a_thread_dying_of_an_exception_that_cannot_be_said_still_stops_the_daemon(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Before: the hook made the stop reason with str() of the exception, which raised again
    inside the hook, so stop() was never called: the daemon ran on without the thread."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored afterwards
    reasons: list[str] = []
    on_thread_death(reasons.append)

    def boom() -> None:
        raise Unsayable

    t = threading.Thread(target=boom, name="worker")
    t.start()
    t.join()
    assert reasons == ["thread worker died: Unsayable (its message cannot be shown: "
                       "ValueError)"]


def test_named_threads_carry_their_name_to_the_kernel() -> None:
    seen: list[str] = []

    def run() -> None:
        tid = threading.get_native_id()
        seen.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())

    for name in ("wg0-timers-and-more", "wgvsock-tcp-read-tcp:1.2.3.4"):
        t = NamedThread(target=run, name=name)
        t.start()
        t.join()
    # The kernel keeps 15 bytes; the transport's common prefix is left out.
    assert seen == ["wg0-timers-and-", "tcp-read-tcp:1."]
