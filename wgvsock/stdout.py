"""Standard output that cannot be written: full (`> /dev/full`, a full disk), closed by its
reader (`| head -c1`) or not open at all (`>&-`).

Said once, where a command line starts (cli.main, daemon.main), rather than as a traceback
from whichever print met it first, or as "Exception ignored ... BrokenPipeError" when the
interpreter flushed what was left at exit. A full or missing stdout is a failure (exit 1, one
line on stderr); a reader that went away is not news to anyone (exit 141, said nothing), as
for the C tools, which SIGPIPE kills: 128 + 13 is the status a shell shows for them, and
`set -o pipefail` scripts see the same from us. SIGPIPE itself stays ignored (Python's
default): restored, it would kill a daemon without a word on a broken socket too."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

# 128 + SIGPIPE: what a shell reports for a command that SIGPIPE killed.
EXIT_BROKEN_PIPE = 141


class StdoutError(Exception):
    """Standard output could not be written; the OSError is __cause__. Not an OSError itself,
    so that no command's own `except OSError` takes it for one of the files it works on."""


class _Closed(io.TextIOBase):
    """Standard output when file descriptor 1 was not open at start (sys.stdout is None)."""

    def write(self, s: str) -> int:
        raise OSError(errno.EBADF, "not open (the command was started with it closed)")


class _Watched:
    """sys.stdout, with its write errors raised as StdoutError."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        try:
            return self.stream.write(s)
        except OSError as e:
            raise StdoutError from e

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise StdoutError from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guarded(prog: str, main: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """MAIN(*ARGS, **KWARGS) with standard output watched and flushed before it returns (or
    exits): its status, or 1 (stdout full or closed, said on stderr as PROG's) or
    EXIT_BROKEN_PIPE (its reader gone). Nested (wgvsock daemon), the outer call watches."""
    if isinstance(sys.stdout, _Watched):
        return main(*args, **kwargs)
    watched = _Watched(sys.stdout if sys.stdout is not None else _Closed())
    sys.stdout = watched  # type: ignore[assignment]
    try:
        try:
            code = main(*args, **kwargs)
        except SystemExit:  # argparse's --help and usage errors print, then exit
            watched.flush()
            raise
        watched.flush()
        return code
    except StdoutError as e:
        return _failed(prog, watched.stream, e.__cause__)
    finally:
        if sys.stdout is watched:
            sys.stdout = watched.stream


def _failed(prog: str, stream: TextIO, cause: BaseException | None) -> int:
    # What is still buffered goes to /dev/null at exit: flushed to the broken stdout again,
    # it would fail again, as "Exception ignored ..." after our word.
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    if isinstance(cause, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
    with contextlib.suppress(OSError):  # stderr may be gone too: nothing is left to tell
        print(f"{prog}: cannot write to standard output: {why}", file=sys.stderr)
    return 1
