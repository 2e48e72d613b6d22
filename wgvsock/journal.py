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


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        # Each line is a journal entry of its own: a traceback keeps its priority throughout.
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


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
