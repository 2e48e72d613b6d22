"""Whether a path names what it named when it was checked: every directory and link from / to
it, walked as the kernel walks them, links followed one at a time, each judged on whether a
user other than root and us could change it.

Root's commands trust files and directories by where they are: the socket directories
(conn.unixsock.socket_dir), the state directory, the enclave image and
attestation.test_root_ca. Each caller words a Fault for what it keeps there."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from dataclasses import dataclass

from .safetext import shell

# As the kernel's limit on links followed in one lookup (MAXSYMLINKS).
MAX_LINKS = 40


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
                        f"chown -h {user} {shell(str(self.step))}")
            return f"is owned by uid {self.st.st_uid}", f"chown {user} {shell(str(self.step))}"
        mode = self.st.st_mode
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        return (f"is writable by {who} (mode {stat.S_IMODE(mode):o})",
                f"chmod go-w {shell(str(self.step))}")


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
    return resolve(names(path), make=make, last_any=True)


def names(path: str) -> list[str]:
    """PATH's names from /, relative paths taken from the working directory."""
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return [p for p in full.split("/") if p not in ("", ".")]


def resolve(parts: list[str], *, make: bool, last_any: bool = False,
            last_group: bool = False, way_group: bool = False
            ) -> tuple[str, os.stat_result] | None:
    """The real path PARTS (from /) lead to and its lstat, each step checked (_check); None,
    not MAKE, at the first missing one, which MAKE makes (a directory, 0700). Links are
    followed by hand, so that every directory a link passes through is checked too. Each step
    must be a directory but the last, LAST_ANY: that may be a file. LAST_GROUP: the last, a
    directory, may be writable by its group, for a caller that judges the names in it.
    WAY_GROUP: so may the directories on the way to it, for a caller that then holds the
    last by a descriptor and checks it is the one judged (their group could only move root's
    and our directories about among those it may write: any other is refused by its owner)."""
    me = os.geteuid()
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
            if links > MAX_LINKS:
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
        _check(step, st, me, any_kind=last_any and not todo,
               group=last_group if not todo else way_group)
        here = step
    return here, st


def _check(step: str, st: os.stat_result, me: int, any_kind: bool = False,
           group: bool = False) -> None:
    """Raises Replaceable when STEP, a directory or link on the way to a path (or, ANY_KIND,
    what the path names, of any kind), is one a user other than root and us could swap, or
    swap what is in it (but, GROUP, by its group: a directory the caller holds)."""
    if st.st_uid not in (0, me):
        raise Replaceable(Fault(step, "owner", st))
    if stat.S_ISLNK(st.st_mode):
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and not any_kind:
        raise Replaceable(Fault(step, "not a directory", st))
    # Sticky (as /tmp): others may add entries, but only an entry's owner may move it.
    writers = 0o002 if group and is_dir else 0o022
    if st.st_mode & writers and not (is_dir and st.st_mode & stat.S_ISVTX):
        raise Replaceable(Fault(step, "mode", st))
