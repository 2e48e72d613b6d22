"""Unix socket files: whether a process still answers on one, and where they may be kept.

A socket file outlives the process that bound it. Before one is replaced or removed, a
connect tells a leftover (refused: nobody listens) from a live one, whoever made it.

socket_dir's walk (every directory and link from / to a path, links followed one at a time)
is also how the state directory, the enclave image and attestation.test_root_ca are judged:
walk()."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import socket
import stat
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Fault:
    """What lets a user other than root and us change what a path names: at STEP, a directory
    or link on its way or what it names, KIND is "owner" (another user's; ST says whose),
    "mode" (others may write it, ST says how), "not a directory" (a file where the path goes
    on) or "links" (more than the kernel follows)."""

    step: str
    kind: str
    st: os.stat_result | None = None

    def said(self, me: int) -> tuple[str, str]:
        """What is wrong at STEP, as "is owned by uid N" or "is writable by group (mode 775)",
        and the command that fixes it, with ME the user who may keep it. For the owner and
        mode faults: the other two are no one's to fix by a chown or chmod."""
        assert self.st is not None
        if self.kind == "owner":
            user = user_name(me)
            if stat.S_ISLNK(self.st.st_mode):
                # chown without -h changes where the link leads, not the link.
                return (f"is a symbolic link owned by uid {self.st.st_uid}",
                        f"chown -h {user} {self.step}")
            return f"is owned by uid {self.st.st_uid}", f"chown {user} {self.step}"
        mode = self.st.st_mode
        return (f"is writable by {'group' if mode & 0o020 else 'others'} "
                f"(mode {stat.S_IMODE(mode):o})", f"chmod go-w {self.step}")


class Replaceable(PermissionError):
    """A Fault found on the way (walk): each caller words it for what it keeps there."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(f"{fault.step}: {fault.kind}")
        self.fault = fault


def user_name(uid: int) -> str:
    """UID as chown takes it: its name where the host knows one."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def keepers() -> str:
    """Whose a file that root's commands trust may be, as messages say it."""
    me = os.geteuid()
    return "root's" if me == 0 else f"root's (or uid {me}'s)"


def walk(path: str, *, make: bool = False) -> tuple[str, os.stat_result] | None:
    """Where PATH leads and the lstat of what is there, found as the kernel finds it, one
    name and one link at a time from /, so that every directory and link on the way is
    checked, each link of a chain where it is and not only where the chain ends: Replaceable
    when a user other than root and us could change one (each directory must be root's or
    ours and writable by no one else unless sticky, as /tmp is; each link root's or ours),
    or could change what PATH names (root's or ours, writable by no one else, sticky
    directories excepted). Missing directories are made 0700, MAKE, each once the one it goes
    in has passed; not MAKE, None at the first missing name."""
    me = os.geteuid()
    return _resolve(_names(path), me, make, last_any=True)


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
    parts = _names(path)
    last = parts.pop() if parts and parts[-1] != ".." else None
    try:
        found = _resolve(parts, me, make)
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


def _names(path: str) -> list[str]:
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return [p for p in full.split("/") if p not in ("", ".")]


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


def _resolve(parts: list[str], me: int, make: bool,
             last_any: bool = False) -> tuple[str, os.stat_result] | None:
    """The real path PARTS (from /) lead to and its lstat, each step checked (_check); None,
    not MAKE, at the first missing one, which MAKE makes (a directory, 0700). Links are
    followed by hand, so that every directory a link passes through is checked too. Each step
    must be a directory but the last, LAST_ANY: that may be a file."""
    here = "/"
    st = os.lstat(here)
    _check(here, st, me)
    todo = parts[::-1]
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            # Each directory above `here` was checked on the way down to it.
            here = os.path.dirname(here)
            st = os.lstat(here)
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
                raise Replaceable(Fault(step, "links"))
            # The link can only be replaced by its owner (in a sticky directory) or by whoever
            # may write `here`, which was checked: its owner is what is left to check.
            _check(step, st, me)
            target = os.readlink(step)
            if target.startswith("/"):
                here = "/"
                st = os.lstat(here)
            todo.extend(p for p in target.split("/")[::-1] if p not in ("", "."))
            continue
        _check(step, st, me, any_kind=last_any and not todo)
        here = step
    return here, st


def _check(step: str, st: os.stat_result, me: int, any_kind: bool = False) -> None:
    """Raises Replaceable when STEP, a directory or link on the way to a path (or, ANY_KIND,
    what the path names, of any kind), is one a user other than root and us could swap, or
    swap what is in it."""
    if st.st_uid not in (0, me):
        raise Replaceable(Fault(step, "owner", st))
    if stat.S_ISLNK(st.st_mode):
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and not any_kind:
        raise Replaceable(Fault(step, "not a directory", st))
    # Sticky (as /tmp): others may add entries, but only an entry's owner may move it.
    if st.st_mode & 0o022 and not (is_dir and st.st_mode & stat.S_ISVTX):
        raise Replaceable(Fault(step, "mode", st))


def _socket_words(path: str, fault: Fault, me: int) -> str:
    """FAULT, on the way to the socket directory PATH, as socket_dir says it."""
    step, st = fault.step, fault.st
    if fault.kind == "links":
        return (f"refusing to keep sockets in {path}: more than {_MAX_LINKS} symbolic links "
                f"on its way, at {step}")
    assert st is not None
    head = f"refusing to keep sockets in {path}: {step} above it"
    who = "root" if me == 0 else f"root or uid {me}"
    elsewhere = f"or keep them under directories only {who} may change"
    if fault.kind == "owner":
        if stat.S_ISLNK(st.st_mode):
            return (f"{head} is a symbolic link owned by uid {st.st_uid}, who could point it "
                    f"elsewhere; name the real directory instead, {elsewhere}")
        return (f"{head} is owned by uid {st.st_uid}, who could swap what is in it for their "
                f"own; `chown {me} {step}`, {elsewhere}")
    if fault.kind == "not a directory":
        return f"{head} is not a directory; {_OWN}"
    return (f"{head} has mode {stat.S_IMODE(st.st_mode):04o}: other users could swap what is "
            f"in it for their own; `chmod go-w {step}`, {elsewhere}")
