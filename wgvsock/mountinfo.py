"""This process's mounts, from /proc/self/mountinfo (proc(5)): where each is and its type."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

_ESCAPED = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in a path as octal escapes.
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> Iterator[tuple[str, str]]:
    """(mount point, file system type) of each mount this process sees, in mountinfo's order
    (a later one at the same point covers an earlier one). Raises OSError without /proc."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split(" ")
            if len(fields) > 4 and right:
                yield _unescape(fields[4]), right.split(" ", 1)[0]


def is_mount_point(path: str) -> bool:
    """Whether PATH (links followed, as a mount on it follows them) has something mounted on
    it: a file bind-mounted over it, say. False where it cannot be told."""
    real = os.path.realpath(path)
    try:
        return any(point == real for point, _ in mounts())
    except OSError:
        return False
