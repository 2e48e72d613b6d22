"""Unix socket files: whether a process still answers on one.

A socket file outlives the process that bound it. Before one is replaced or removed, a
connect tells a leftover (refused: nobody listens) from a live one, whoever made it."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


def answered(path: str) -> bool:
    """Whether a process answers on the Unix socket (stream or datagram) at PATH. False for
    a leftover and for a path where no socket is; OSError for a path that cannot be probed."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC) as probe:
            # A live listener whose backlog is full would hold a blocking connect for ever;
            # with a timeout that is an EAGAIN at once.
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            except (BlockingIOError, TimeoutError):
                return True
            except OSError as e:
                if e.errno == errno.EPROTOTYPE:  # a socket of the other kind
                    continue
                raise
            return True
    return False


def remove_stale(path: str) -> bool:
    """Removes the socket file at PATH when nobody answers on it: True when it is gone (or
    was never there), False when a process answers on it, which keeps it. FileExistsError
    when PATH is not a socket: that is never removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not removing it", path)
    if answered(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
