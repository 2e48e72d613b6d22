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


# As the kernel's limit on links followed in one lookup (MAXSYMLINKS).
_MAX_LINKS = 40
_OWN = "give it a directory of its own (one that does not exist yet is made, mode 0700)"


def socket_dir(path: str, *, listable: bool = False, make: bool = True) -> None:
    """Makes PATH (mode 0700, and any missing directory above it) to keep sockets in, or
    refuses an existing one where another user could unlink a socket and bind their own in its
    place. PermissionError, in one line saying what is wrong, where, and what to do, otherwise.
    Not MAKE: only checks (`parent doctor`); what is missing would be made as it should be.

    Every directory from / down must be owned by root or by us and, unless sticky as /tmp is,
    not writable by group or others: whoever may write one could rename what is in it and put
    a tree of their own there. PATH itself must be ours (or, LISTABLE, root's) and is never a
    link. Without LISTABLE it must also be closed to group and others; with it, it may be
    readable by all (0755), as wireguard-go makes /var/run/wireguard, where wg(8) looks for
    sockets: each socket's own mode 0600 keeps others out of it."""
    me = os.geteuid()
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    parts = [p for p in full.split("/") if p not in ("", ".")]
    last = parts.pop() if parts and parts[-1] != ".." else None
    where = _resolve(path, parts, me, make)
    if where is None:
        return
    if last is not None:
        where = os.path.join(where, last)
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        if not make:
            return
        with contextlib.suppress(FileExistsError):  # a race: judged below like any other
            os.mkdir(where, 0o700)
        st = os.lstat(where)
    why, fix = _unfit(path, st, me, listable)
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
    owners = dict.fromkeys((0, me) if listable else (me,))
    if st.st_uid not in owners:
        return (f"is owned by uid {st.st_uid}, not {' or '.join(map(str, owners))}",
                _OWN if shared else f"`chown {me} {path}`, or {_OWN}")
    what, chmod = (("writable by", "go-w") if listable else ("open to", "700"))
    if mode & (0o022 if listable else 0o077):
        return (f"has mode {mode:04o}, {what} other users",
                _OWN if shared else f"`chmod {chmod} {path}`, or {_OWN}")
    return "", ""


def _resolve(path: str, parts: list[str], me: int, make: bool) -> str | None:
    """The real directory PARTS (from /) lead to, each step checked as a directory above the
    sockets must be, and missing ones made (0700); None, not MAKE, at the first missing one.
    Links are followed by hand, so that every directory a link passes through is checked
    too."""
    here = "/"
    _check_above(path, here, os.lstat(here), me)
    todo = parts[::-1]
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            # Each directory above `here` was checked on the way down to it.
            here = os.path.dirname(here)
            continue
        step = os.path.join(here, name)
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            if not make:
                return None
            with contextlib.suppress(FileExistsError):
                os.mkdir(step, 0o700)
            st = os.lstat(step)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise PermissionError(f"refusing to keep sockets in {path}: more than "
                                      f"{_MAX_LINKS} symbolic links on its way, at {step}")
            # The link can only be replaced by its owner (in a sticky directory) or by whoever
            # may write `here`, which was checked: its owner is what is left to check.
            _check_above(path, step, st, me)
            target = os.readlink(step)
            if target.startswith("/"):
                here = "/"
            todo.extend(target.split("/")[::-1])
            continue
        _check_above(path, step, st, me)
        here = step
    return here


def _check_above(path: str, step: str, st: os.stat_result, me: int) -> None:
    """Refuses STEP, a directory or link on the way to the socket directory PATH, when a user
    other than root and us could swap it or what is in it."""
    head = f"refusing to keep sockets in {path}: {step} above it"
    who = "root" if me == 0 else f"root or uid {me}"
    elsewhere = f"or keep them under directories only {who} may change"
    is_link = stat.S_ISLNK(st.st_mode)
    if st.st_uid not in (0, me):
        if is_link:
            raise PermissionError(f"{head} is a symbolic link owned by uid {st.st_uid}, who "
                                  f"could point it elsewhere; name the real directory instead, "
                                  f"{elsewhere}")
        raise PermissionError(f"{head} is owned by uid {st.st_uid}, who could swap what is in "
                              f"it for their own; `chown {me} {step}`, {elsewhere}")
    if is_link:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{head} is not a directory; {_OWN}")
    mode = stat.S_IMODE(st.st_mode)
    # Sticky (as /tmp): others may add entries, but only an entry's owner may move it.
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise PermissionError(f"{head} has mode {mode:04o}: other users could swap what is in "
                              f"it for their own; `chmod go-w {step}`, {elsewhere}")
