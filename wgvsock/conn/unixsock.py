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


_OWN = "give it a directory of its own (one that does not exist yet is made, mode 0700)"


def socket_dir(path: str, *, listable: bool = False) -> None:
    """Makes PATH (mode 0700) to keep sockets in, or refuses an existing one where another
    user could unlink a socket and bind their own in its place. PermissionError, in one line
    saying what is wrong, where, and what to do, otherwise.

    PATH must be ours (or, LISTABLE, root's) and is never a link. Without LISTABLE it must
    also be closed to group and others; with it, it may be readable by all (0755), as
    wireguard-go makes /var/run/wireguard, where wg(8) looks for sockets: each socket's own
    mode 0600 keeps others out of it."""
    with contextlib.suppress(FileExistsError):  # not a directory: said below
        os.makedirs(path, mode=0o700, exist_ok=True)
    why, fix = _unfit(path, os.lstat(path), os.geteuid(), listable)
    if why:
        raise PermissionError(f"refusing to keep sockets in {path}: it {why}; {fix}")


def _unfit(path: str, st: os.stat_result, me: int, listable: bool) -> tuple[str, str]:
    """What is wrong with the socket directory itself, and the fix; ("", "") if nothing."""
    # A shared directory (sticky, as /tmp) must stay as it is: only _OWN fixes that.
    shared = bool(st.st_mode & stat.S_ISVTX)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        # Whoever can change the link can move the sockets.
        return "is a symbolic link", f"name the real directory instead, or {_OWN}"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory", _OWN
    if listable:
        if st.st_uid not in (0, me):
            owners = "0" if me == 0 else f"0 or {me}"
            return (f"is owned by uid {st.st_uid}, not {owners}",
                    _OWN if shared else f"`chown {me} {path}`, or {_OWN}")
        if mode & 0o022:
            return (f"has mode {mode:04o}, writable by other users",
                    _OWN if shared else f"`chmod go-w {path}`, or {_OWN}")
        return "", ""
    if st.st_uid != me:
        return (f"is owned by uid {st.st_uid}, not {me}",
                _OWN if shared else f"`chown {me} {path}`, or {_OWN}")
    if mode & 0o077:
        return (f"has mode {mode:04o}, open to other users",
                _OWN if shared else f"`chmod 700 {path}`, or {_OWN}")
    return "", ""
