"""Unix socket files: whether a process still answers on one, and where they may be kept.

A socket file outlives the process that bound it. Before one is replaced or removed, a
connect tells a leftover (refused: nobody listens) from a live one, whoever made it. Where
they may be kept is judged by the walk of pathwalk, as the state directory is."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from ..pathwalk import MAX_LINKS, Fault, Replaceable, names, resolve
from ..safetext import shell


def answered(path: str) -> bool:
    """Whether a process answers on the Unix socket (of any kind) at PATH. False for a
    leftover and for a path where no socket is; OSError for a path that cannot be probed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
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
            # A socket of another kind (datagram, seqpacket) is bound there, which only a
            # process holding it keeps so; a leftover file has none behind it (refused).
            if e.errno == errno.EPROTOTYPE:
                return True
            raise
        return True


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
    parts = names(path)
    last = parts.pop() if parts and parts[-1] != ".." else None
    try:
        found = resolve(parts, make=make)
    except Replaceable as e:
        raise PermissionError(_socket_words(path, e.fault, me)) from None
    if found is None:
        return
    where = found[0]
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
        if shared:
            fix = _OWN
        elif st.st_uid == 0:
            # Root's as a rule because a run as root made it: this one forgot sudo, and a
            # chown would hand root's directory to a user to fix that.
            fix = f"run as root (sudo), or {_OWN}"
        else:
            fix = f"`chown {me} {shell(path)}`, or {_OWN}"
        return f"is owned by uid {st.st_uid}, not {' or '.join(map(str, owners))}", fix
    what, chmod = (("writable by", "go-w") if listable else ("open to", "700"))
    if mode & (0o022 if listable else 0o077):
        return (f"has mode {mode:04o}, {what} other users",
                _OWN if shared else f"`chmod {chmod} {shell(path)}`, or {_OWN}")
    return "", ""


def _socket_words(path: str, fault: Fault, me: int) -> str:
    """FAULT, on the way to the socket directory PATH, as socket_dir says it."""
    step = fault.step
    if fault.kind == "links":
        return (f"refusing to keep sockets in {path}: more than {MAX_LINKS} symbolic links "
                f"on its way, at {step}")
    head = f"refusing to keep sockets in {path}: {step} above it"
    if fault.kind == "not a directory":
        return f"{head} is not a directory; {_OWN}"
    assert fault.st is not None
    why, fix = fault.said(me)
    who = "root" if me == 0 else f"root or uid {me}"
    elsewhere = f"or keep them under directories only {who} may change"
    if stat.S_ISLNK(fault.st.st_mode):  # only its owner is judged: see pathwalk._check
        return (f"{head} {why}, who could point it elsewhere; name the real directory "
                f"instead, `{fix}`, {elsewhere}")
    if fault.kind == "owner":
        return f"{head} {why}, who could swap what is in it for their own; `{fix}`, {elsewhere}"
    return (f"{head} {why}: other users could swap what is in it for their own; `{fix}`, "
            f"{elsewhere}")
