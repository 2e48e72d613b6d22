"""A listening socket that one accept thread waits on, and that another thread can stop.

Neither close() nor shutdown() is a way to wake a thread blocked in accept(): close() wakes
none on any socket; shutdown() wakes none on an AF_VSOCK listener (the kernel answers ENOTCONN
for a socket not connected), and on a unix one it acts on the socket, not on our descriptor, so
a socket handed over by a launcher (WG_UAPI_FD) would refuse it, and the next daemon it hands
the socket to, for good. So the thread waits in poll() on the listener and a pipe, which
`wake()` writes. The listener and the pipe are closed once the thread no longer polls them (a
number reused meanwhile would be polled in their place): by `close()`, or by the thread as it
ends when it outlasts its owner's join (a loaded machine); else they stayed open for good, and
a vsock or TCP port bound until the process ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading


class AcceptWait:
    """The owner calls `begin()` before it starts the accept thread (and `ended()` if it could
    not start one); the thread loops on `wait()` and calls `ended()` as it ends (in a finally);
    the owner's close calls `wake()`, then `join_and_close()` (its join is bounded; the thread
    releases all as it ends if it outlasts it)."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self._r, self._w = os.pipe()
        # wake() writes holding the lock (below), so it must never block there: a full pipe
        # has woken the thread already.
        os.set_blocking(self._w, False)
        self._poller = select.poll()
        self._poller.register(listener, select.POLLIN)
        self._poller.register(self._r, select.POLLIN)
        self._lock = threading.Lock()
        self._polling = self._closing = self._released = False

    def begin(self) -> None:
        self._polling = True

    def wait(self) -> bool:
        """Until a connection waits (True) or `wake()` was called (False)."""
        return any(fd != self._r for fd, _ in self._poller.poll())

    def wake(self) -> None:
        # Under the lock, and not once released: the pipe's number may be another file's by
        # then (a second close() of the owner), which the byte would go into.
        with self._lock:
            if self._released:
                return
            with contextlib.suppress(OSError):
                os.write(self._w, b"\0")

    def ended(self) -> None:
        with self._lock:
            self._polling = False
            release = self._closing
        if release:  # close() came, and left the release to us
            self._release()

    def join_and_close(self, thread: threading.Thread, timeout: float = 2.0) -> None:
        """The owner's close, after `wake()`: waits up to `timeout` for the accept thread to
        end, but not on the thread itself (a close() from what it runs), which cannot join
        itself; then `close()`."""
        if thread.is_alive() and threading.current_thread() is not thread:
            thread.join(timeout)
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            release = not self._polling
        if release:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.listener.close()
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
