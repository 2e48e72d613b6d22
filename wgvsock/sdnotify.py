"""systemd's notification protocol (sd_notify(3)), for daemons run by a `Type=notify` unit.

The service manager passes a datagram socket in `NOTIFY_SOCKET` and, with `WatchdogSec=`,
the watchdog period in `WATCHDOG_USEC` (and the process meant in `WATCHDOG_PID`). Each
message is one datagram of newline-separated `KEY=VALUE` assignments. The protocol is a few
lines and has no other user here, so it is spoken directly rather than through libsystemd.

Readiness matters because units ordered after ours start once we say READY=1, not when our
process exists; the watchdog matters because a thread that hangs (a deadlock, a stuck system
call) stops the data path without ending the process, which nothing else would notice. The
caller decides what "alive" means (`Watchdog`'s `health`) and the pings come from a thread of
their own, so a main loop that is merely busy (a slow nft in a reload) is not taken for dead.

Without `NOTIFY_SOCKET` every call does nothing. A failed send is logged once and otherwise
ignored: being managed by systemd is never a reason for the daemon to stop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping

from .threads import NamedThread

__all__ = ["Notifier", "Watchdog"]

log = logging.getLogger("wgvsock.sdnotify")

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Talks to the service manager named by `address` (a path, or `@name` for an abstract
    socket); `watchdog_usec` is WATCHDOG_USEC, None without a watchdog."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._target: str | bytes | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace (a NUL byte to the kernel).
            self._target = ("\0" + address[1:]).encode() if address[0] == "@" else address
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()  # the watchdog's thread sends too
        self._failed = False
        # systemd asks for a ping at least every WATCHDOG_USEC and recommends half of it.
        self.watchdog_interval: float | None = (
            watchdog_usec / 2e6 if watchdog_usec and self._target is not None else None)
        self._next_ping = 0.0
        self._status: str | None = None
        self._withheld = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier the environment describes, taking its variables out of it (as
        sd_notify's `unset_environment`): the programs we run (nitro-cli, an enclave's app)
        must not talk to our service manager as if they were us."""
        env = os.environ if environ is None else environ
        address, usec, pid = (env.pop(name, None) for name in _ENV)
        watchdog: int | None = None
        if usec and (not pid or pid == str(os.getpid())):  # another process's watchdog
            try:
                watchdog = int(usec)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%.40r: not a number of microseconds", usec)
        return cls(address or None, watchdog if watchdog and watchdog > 0 else None)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *assignments: str) -> bool:
        """Sends one message of KEY=VALUE `assignments`; False if it could not be sent."""
        if self._target is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with self._sock_lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock = self._sock
            sock.sendto(data, self._target)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager at NOTIFY_SOCKET=%s (%s); "
                            "carrying on without it", self.address, e.strerror or e)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete."""
        fields = ["READY=1"]
        if status is not None:
            self._status = _one_line(status)
            fields.append("STATUS=" + self._status)
        self.send(*fields)

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *(["STATUS=" + _one_line(status)] if status is not None else []))

    def status(self, text: str) -> None:
        """Shown by `systemctl status`; sent only when it changed."""
        text = _one_line(text)
        if text != self._status:
            self._status = text
            self.send("STATUS=" + text)

    def beat(self, now: float, stalled: str | None) -> None:
        """Called often (every second or so) with the monotonic time and whether the daemon is
        stuck: pings the watchdog when one is due, unless `stalled` says why not. A stall is
        logged once, when first seen; pings resume when it clears."""
        if self.watchdog_interval is None:
            return
        if stalled is not None:
            if not self._withheld:
                self._withheld = True
                log.error("not confirming liveness to systemd's watchdog: %s (systemd stops "
                          "and restarts us if this lasts; the stack of each thread is then "
                          "written to the log)", stalled)
            return
        if self._withheld:
            self._withheld = False
            log.warning("liveness confirmed to systemd's watchdog again")
            self._next_ping = 0.0
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def close(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Pings systemd's watchdog from a thread of its own, each `every` seconds asking
    `health(now)` (monotonic) whether the daemon is well: None, or why not. The daemon's own
    loops report to `health` through timestamps (Device.stalled, the parent's main loop), so
    the watchdog fires on a thread that hangs, not on one that is slow for a while. Does
    nothing without a watchdog period. `every` defaults to a second, or half the ping
    interval when that is shorter."""

    def __init__(self, notifier: Notifier, health: Callable[[float], str | None],
                 every: float | None = None) -> None:
        self.notifier = notifier
        self.health = health
        if every is None:
            # A ping goes out at the first look after it is due, so pings can be up to the
            # ping interval (half of WatchdogSec) plus `every` apart: with a fixed second,
            # WatchdogSec=1 got one a second, late by any jitter. Half the interval keeps
            # them within three quarters of WatchdogSec.
            interval = notifier.watchdog_interval
            every = min(1.0, interval / 2) if interval is not None else 1.0
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.notifier.watchdog_interval is None:
            return
        self._thread = NamedThread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def check(self, now: float) -> None:
        """One look: pings, or withholds the ping (logging why, once)."""
        try:
            stalled = self.health(now)
        except Exception as e:  # a broken check is no proof of life
            stalled = f"the liveness check failed: {e!r}"
        self.notifier.beat(now, stalled)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.check(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


# STATUS= at most this many bytes of UTF-8. systemd drops a whole notification larger than its
# buffer (4 KiB), and READY=1 or STOPPING=1 sent with the status would be lost with it.
_STATUS_MAX = 1024


def _one_line(text: str) -> str:
    # A newline (or a CR: systemd splits on both) would start another assignment; systemd
    # ignores a whole message with a NUL in it, so a NUL is shown escaped.
    text = " ".join(text.replace("\0", "\\x00").split())
    data = text.encode("utf-8", "replace")
    if len(data) <= _STATUS_MAX:
        return text
    ellipsis = "\u2026"
    # "ignore" drops the character the cut went through.
    return data[:_STATUS_MAX - len(ellipsis.encode())].decode("utf-8", "ignore") + ellipsis
