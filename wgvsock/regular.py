"""Reading a file the user names (a profile, a private key, a root certificate, an attestation
document): a regular file only, and at most so many bytes of it.

Anything else there is a mistake that reads badly: a FIFO blocks the open until someone
writes to it (as a rule, for ever), /dev/zero never ends, /dev/null reads as an empty file,
and a directory fails only at the read. What the path names is judged before it is opened
(opening a device can do something: rewind a tape, take a terminal), opened O_NONBLOCK (a FIFO
put there in between does not block the open) and judged again by fstat on what was opened."""

from __future__ import annotations

import os
import stat

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a regular file"),
)


def kind(mode: int) -> str:
    """What a file of MODE (st_mode) is, as "a directory" or "a FIFO (named pipe)"."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


class NotRegularFile(OSError):
    """The path names no regular file: strerror says what it is instead."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        super().__init__(None, f"is {kind(mode)}, not a regular file", os.fspath(path))
        self.mode = mode


def read_regular(path: str | os.PathLike[str], most: int) -> bytes:
    """At most MOST bytes of the regular file PATH (links followed). Raises NotRegularFile
    when PATH names anything else, or the OSError of the stat, open or read."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        return f.read(most)
