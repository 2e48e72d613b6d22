"""Unix socket files: whether a process still answers on one.

A socket file outlives the process that bound it. Before one is replaced or removed, a
connect tells a leftover (refused: nobody listens) from a live one, whoever made it."""

from __future__ import annotations

import errno
import socket


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
