"""This process's mounts, from /proc/self/mountinfo (proc(5)): where each is, its file
system's type and its super options."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import NamedTuple

_ESCAPED = re.compile(r"\\([0-7]{3})")


class Mount(NamedTuple):
    point: str
    fstype: str
    options: list[str]  # the super block's (mountinfo's last field): nfs's, fuse's own


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in a path as octal escapes.
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> Iterator[Mount]:
    """Each mount this process sees, in mountinfo's order (a later one at the same point
    covers an earlier one). Raises OSError without /proc."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, fs = left.split(" "), right.split(" ")
        if len(fields) >= 5 and len(fs) >= 3:
            yield Mount(_unescape(fields[4]), fs[0], fs[2].split(","))


def mount_of(path: str) -> Mount | None:
    """The mount PATH is on: the longest mount point its real path is under, the last
    mounted there (the one on top). None without mountinfo."""
    here = os.path.realpath(path)
    best: Mount | None = None
    try:
        for m in mounts():
            if ((here == m.point or here.startswith(m.point.rstrip("/") + "/"))
                    and (best is None or len(m.point) >= len(best.point))):
                best = m
    except OSError:
        return None
    return best


def is_mount_point(path: str) -> bool:
    """Whether PATH (links followed, as a mount on it follows them) has something mounted on
    it: a file bind-mounted over it, say. False where it cannot be told."""
    real = os.path.realpath(path)
    try:
        return any(m.point == real for m in mounts())
    except OSError:
        return False
