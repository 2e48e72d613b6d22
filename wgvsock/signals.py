"""Waking a daemon's main thread from a signal handler or from another thread.

A Python signal handler runs on the main thread between two bytecodes, wherever that thread
is: inside `Event.wait` holding the event's lock, say. A handler that sets an Event (or takes
any other lock) then waits for a lock its own thread holds, and the process hangs until
SIGKILL. So the daemons' handlers only note what came, and the main thread waits on a
`Wakeup`: a pipe that `signal.set_wakeup_fd` writes to from C when any handled signal comes,
and that other threads write to with `wake()`."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading

# What asks a daemon to stop: an init's or `docker stop`'s TERM, a terminal's INT and QUIT, and
# HUP (the terminal gone).
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def note(signums: tuple[int, ...]) -> list[int]:
    """Handlers that only note which of SIGNUMS came, in order, into the list returned; for a
    process's start-up, until it installs its own. As PID 1 (a container without an init)
    a signal with no handler is dropped by the kernel, so one that came while the interpreter
    was still importing would otherwise be lost."""
    noted: list[int] = []
    for signum in signums:
        signal.signal(signum, lambda n, _frame: noted.append(n))
    return noted


class Wakeup:
    """Installs itself as the process's wakeup fd until `close()`; from the main thread."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()  # never taken by a signal handler
        self._closed = False
        self._poller = select.poll()
        self._poller.register(self._r, select.POLLIN)
        # A full pipe is a wake-up already pending (wake() takes it so): no warning for it.
        self._old = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)

    def wake(self) -> None:
        """From any thread but a signal handler: the main thread's `wait` returns."""
        with self._lock:
            if self._closed:  # a thread ending after the main thread has finished
                return
            with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
                os.write(self._w, b"\0")

    def wait(self, timeout: float | None) -> None:
        """Until a signal or a `wake()` came (since the last wait), or TIMEOUT seconds."""
        self._poller.poll(None if timeout is None else int(timeout * 1000))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 512):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._old)
        with self._lock:
            self._closed = True
            os.close(self._r)
            os.close(self._w)
