"""No long-running thread may die silently (issue 12.6).

Two tools, used together:

- `Survivor`: a loop that must outlive one bad iteration (the TUN reader, the timers, an
  accept loop) catches what it did not expect and asks `survive(exc)`. The first failure is
  logged with its traceback, later ones as one line at most every few seconds; after `limit`
  failures within `window` seconds the loop should stop trying and re-raise, because a bug
  that fires on every iteration would otherwise spin silently.
- `on_thread_death(stop)`: installs `threading.excepthook` for a daemon process, so an
  exception that ends any thread (a Survivor that gave up included) is logged with its
  traceback and stops the daemon through `stop(reason)`; the daemon then exits non-zero and
  systemd restarts it.

`NamedThread` is how the daemons start their long-lived threads: the kernel then knows each by
its name (`top -H`, `ps -L`, `/proc/PID/task/TID/comm`, perf), so an operator can tell which
one burns a CPU or hangs.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import threading
import time
import types
from collections.abc import Callable

from .safetext import error

log = logging.getLogger("wgvsock.threads")

_PR_SET_NAME = 15


def enable_stack_dumps() -> None:
    """For a daemon process: each thread's Python stack goes to stderr (the journal) on a fatal
    signal, systemd's watchdog SIGABRT included, and on SIGUSR1, which leaves the process
    running: `kill -USR1 PID` (`systemctl kill -s USR1 --kill-who=main UNIT`) shows where a
    slow or stuck daemon is without stopping it."""
    if not faulthandler.is_enabled():  # (pytest enables it for itself)
        faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
_libc: ctypes.CDLL | None = None


def set_os_thread_name(name: str) -> None:
    """Names the calling thread for the kernel (at most 15 bytes are kept); best effort."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux, or no prctl: names are a convenience
        pass


def _calls(run: Callable[[], None]) -> None:
    run()


def _frame_named(name: str) -> Callable[[Callable[[], None]], None]:
    """`_calls` under another name: its frame shows as `in NAME` in a stack dump."""
    code = _calls.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _calls.__globals__, name)


class NamedThread(threading.Thread):
    """A `threading.Thread` that gives its OS thread its name when it starts (Python 3.14
    does this itself; 3.11 does not), and runs its target under a frame named for it.

    That frame is for stack dumps (faulthandler on SIGUSR1 and the watchdog's SIGABRT, py-spy
    dump): a compiled loop (mypyc) has no Python frame of its own, so without it a dump would
    not say which loop a thread is in."""

    def run(self) -> None:
        # 15 bytes are few: the transport's "wgvsock-" prefix says nothing inside our process.
        set_os_thread_name(self.name.removeprefix("wgvsock-"))
        name = getattr(getattr(self, "_target", None), "__name__", None)
        if isinstance(name, str) and name.isidentifier():
            _frame_named(name)(super().run)
        else:
            super().run()


class Survivor:
    __slots__ = ("_count", "_limit", "_logged_at", "_suppressed", "_what", "_window",
                 "_window_start")

    def __init__(self, what: str, *, limit: int = 20, window: float = 10.0) -> None:
        self._what = what
        self._limit = limit
        self._window = window
        self._window_start = 0.0
        self._count = 0
        self._logged_at: float | None = None
        self._suppressed = 0

    def survive(self, exc: BaseException) -> bool:
        """Logs `exc`; False once it keeps happening (the caller then re-raises)."""
        now = time.monotonic()
        if now - self._window_start > self._window:
            self._window_start, self._count = now, 0
        self._count += 1
        if self._count > self._limit:
            log.error("%s: %d unexpected errors within %g s; giving up", self._what,
                      self._count, self._window)
            return False
        if self._logged_at is None:
            log.error("%s: unexpected error (carrying on)", self._what,
                      exc_info=(type(exc), exc, exc.__traceback__))
            self._logged_at = now
        elif now - self._logged_at >= 5.0:
            log.error("%s: unexpected error again: %r (%d more since the last report)",
                      self._what, exc, self._suppressed)
            self._logged_at, self._suppressed = now, 0
        else:
            self._suppressed += 1
        return True


def raised_at(exc: BaseException) -> str:
    """Where EXC was raised, " at FILE:LINE in FUNCTION" (its innermost frame), or "": for a
    line that stands in for a traceback where one per occurrence would flood the log."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f" at {os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"


def on_thread_death(stop: Callable[[str], None]) -> None:
    """Makes the death of any thread of this process log its traceback and call stop()."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if issubclass(args.exc_type, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "?"
        log.critical("thread %s died", name, exc_info=args.exc_value)
        # (safetext.error: a hook that raised on an unsayable message would leave the daemon
        # running without the thread, which is what this hook is for.)
        what = error(args.exc_value) if args.exc_value is not None else args.exc_type.__name__
        stop(f"thread {name} died: {what}")

    threading.excepthook = hook
