"""Log lines that the systemd journal files under their own priority.

Under a unit, stderr is a stream to journald, which takes every line at the unit's default
priority (info) unless the line starts with a syslog priority in angle brackets (`<3>` for
error: sd-daemon(3)). With the prefix, `journalctl -p err -u wgvsock-parent@NAME` lists the
parent's errors and warnings alone, and `systemctl status` shows them highlighted.

The prefix is added only when stderr *is* the journal: systemd then names that stream in
`JOURNAL_STREAM` (`DEVICE:INODE`, systemd.exec(5)). On a terminal or in a file it would be noise.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["handler", "is_journal"]

# syslog(3) priorities, as sd-daemon(3) defines the prefixes.
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6))


def is_journal(fd: int, environ: dict[str, str] | None = None) -> bool:
    """Whether `fd` is the stream systemd connected to the journal."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


# journald ends a stream's line after LineMax bytes (journald.conf(5): 48 KiB by default)
# and reads the rest for a `<N>` of its own, so a longer line is cut here first. Measured in
# UTF-8; on a stderr of another encoding backslashreplace can make a piece up to 2.5 times
# longer, which still fits.
_PIECE_BYTES = 16 * 1024


def _pieces(line: str, room: int) -> Iterator[str]:
    """`line` in pieces of at most `room` bytes of UTF-8, not cutting a character."""
    data = line.encode("utf-8", "backslashreplace")
    if len(data) <= room:
        yield line
        return
    start = 0
    while start < len(data):
        end = min(start + room, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # inside a character: back off
            end -= 1
        yield data[start:end].decode()
        start = end


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        prefix = f"<{prio}>"
        # journald ends a line at NUL as well, and takes what follows with its own prefix:
        # "ok\0<0>forged" in a warning would be an emergency. A NUL is shown escaped.
        text = text.replace("\0", "\\x00")
        # Each line is a journal entry of its own: a traceback keeps its priority throughout,
        # as does each piece of a line too long for journald.
        room = _PIECE_BYTES - len(prefix) - 1
        return "\n".join(prefix + piece for line in text.split("\n")
                         for piece in _pieces(line, room))


def handler(fmt: str, datefmt: str | None = None) -> logging.Handler:
    """A handler to stderr with format `fmt`, priority-prefixed when stderr is the journal."""
    h = logging.StreamHandler(sys.stderr)
    try:
        journal = is_journal(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a stderr with no fd (captured)
        journal = False
    cls = _JournalFormatter if journal else logging.Formatter
    h.setFormatter(cls(fmt, datefmt))
    return h
