"""`wgvsock enclave up --profile FILE [-- CMD ARGS...]`: the enclave image's entrypoint.

Inside an enclave nothing configures networking: loopback is down and vsock to the parent is
the only channel. This brings up `lo`, makes a key that never touches disk, creates the tunnel
interface, registers the key with the parent over the control channel, waits for the first
handshake and then runs CMD as a child, passing signals on and exiting with its status.
A control connection that drops (the parent restarted) is redialled and the exchange repeated
with the same key, without disturbing CMD.

A network namespace that already has a default route is a host's or a container's, not an
enclave's: there `up` refuses before it changes anything, unless told --outside-enclave.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace

from ..conn import make_bind
from ..conn.bind import RateLimitedLog
from ..conn.stream import redial_backoff
from ..core.crypto import dh, generate_private_key, key_to_base64, public_key
from ..device import netconf
from ..device.device import Device
from ..mountinfo import is_mount_point, mount_of
from ..nodump import forbid_core_dumps
from ..safetext import error, message, shell
from ..services import firewall
from ..services.control import (
    ControlError,
    Refused,
    Throttled,
    Welcome,
    hold_connection,
    register,
)
from ..signals import STOPPING, Wakeup
from ..threads import NamedThread, on_thread_death
from . import binfmt, cmd
from .common import (
    configure,
    control_address,
    dial_control,
    parent_wg_endpoint,
    run_dir,
    wait_until,
)

log = logging.getLogger("wgvsock.enclave")

# The Nitro Enclaves driver's device, on the parent (the EC2 instance) only.
NE_DEVICE = "/dev/nitro_enclaves"
# Where `ip netns` names network namespaces (iproute2's NETNS_RUN_DIR).
NETNS_RUN_DIR = "/run/netns"
# Where `ip netns exec NS` finds files to bind over /etc's (iproute2's NETNS_ETC_DIR).
NETNS_ETC_DIR = "/etc/netns"

HANDSHAKE_TIMEOUT = 60.0
PERSISTENT_KEEPALIVE = 25
# A control connection held this long was a real registration: when it ends, register again
# at once. One that ends sooner (the parent closed it, another enclave of the profile took its
# place) waits the backoff first: each round costs an attestation and a verification.
HELD_STABLE = 10.0
# The parent's answer is not authenticated (its pinned key is public): a tunnel without a
# handshake this long after registering (WireGuard's REKEY_ATTEMPT_TIME), or whose last one is
# older than REJECT_AFTER_TIME plus that, gets a new registration, so nothing that answered on
# the control port in the parent's place can keep the enclave away from the real one.
NO_HANDSHAKE_AFTER = 90.0
HANDSHAKE_STALE_AFTER = 180.0 + 90.0
# A parent that answered but did not keep us (it refused us, another enclave of the profile
# took our place, its key is not the pinned one) is asked again as often as an absent one for
# ANSWERED_FAST_FOR (a policy fixed by `parent reload` meanwhile takes at once), then at
# doubling intervals up to ANSWERED_BACKOFF_MAX: each round costs an attestation, a
# verification and a warning on both sides, and changes nothing until someone acts.
ANSWERED_FAST_FOR = 60.0
ANSWERED_BACKOFF_MAX = 60.0
# Passed on to CMD, as tini does; TERM, INT, HUP and QUIT before CMD runs stop `up` instead.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
# How long CMD has to end after the SIGTERM a broken tunnel sends it before it gets SIGKILL
# (docker stop's default): an app that ignores SIGTERM would otherwise run on without its
# network, and `up` wait for it for ever. Counted in time the process ran, as STUCK_AFTER is.
STOP_GRACE = 10.0
# The tunnel's data path counts as stuck (Device.stalled) when its timer thread or TUN reader
# has not come round for this long; then CMD is stopped as for a dead thread. The parent has
# systemd's watchdog for this (8 s there); nothing watches an enclave, and stopping one costs
# its app and a restart, so it waits longer. Looked at every LIVENESS_EVERY seconds.
STUCK_AFTER = 30.0
LIVENESS_EVERY = 1.0
# A liveness wait that ends this much later than asked, with the process's CPU time hardly
# moved meanwhile, means the whole process did not run: frozen (docker pause, the cgroup
# freezer, SIGSTOP to all of it), or its VM paused while its clock ran on. Then every thread
# is as far behind, and the liveness thread may run first on resume: that wait is not counted
# as time the data path was stuck. Well under STUCK_AFTER, so that no freeze long enough to
# matter goes unseen; well over a late wake on a loaded machine, which judges as usual.
FROZEN_AFTER = 5.0


def netns_name() -> str | None:
    """The name `ip netns` gives the network namespace this process runs in, or None: its
    /proc/self/ns/net is the same nsfs file as one under /run/netns. An enclave's, or a
    container's, has none there."""
    try:
        ours = os.stat("/proc/self/ns/net")
        names = os.listdir(NETNS_RUN_DIR)
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join(NETNS_RUN_DIR, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            return name
    return None


class EnclaveError(Exception):
    pass


class PinMismatch(ControlError):
    """The parent's key is not the one the profile pins."""


class UnusableParentKey(ControlError):
    """The parent's key is one no parent can have: the enclave's own, or a low-order point."""


def _warn(text: str) -> None:
    """One warning of `enclave up`'s, the profile's and its own alike, said as `profile
    check` says them."""
    print(f"wgvsock enclave up: warning: {text}", file=sys.stderr, flush=True)


def _stopped(failures: list[str], signalled: list[int]) -> int:
    """`enclave up`'s status when it stopped before CMD ran: 1 after a failure, else
    128 + the signal that stopped it."""
    if failures:
        print(f"wgvsock enclave: stopped: {failures[0]}", file=sys.stderr, flush=True)
        return 1
    return 128 + (signalled[0] if signalled else signal.SIGTERM)


def _unrunnable(command: list[str],
                user: cmd.Credentials | None = None) -> tuple[int, str] | None:
    """Why CMD cannot be run, as the status a shell gives for it (127 for ENOENT, not found
    or a missing interpreter; 126 for any other failure of the exec) and what to say, or
    None. Checked before the tunnel comes up: a wrong CMD line would otherwise show only
    after the wait for the parent, a registration and an attestation, and as the status a
    parent that never answered gives. Judged as the exec helper's os.execvp and the kernel's
    execve would judge it (_execvp, _exec_refuses); with `user` (enclave.user) other than
    root, as that user finds and runs it."""
    name = command[0]
    who = user if user is not None and user.uid != 0 else None
    # (CMD itself, when named by its path, is not named again in what is said of it.)
    refused = _execvp(name, lambda path: _exec_refuses(path, who,
                                                        None if path == name else path))
    if refused is None:
        return None
    code, why = refused
    return (127 if code == errno.ENOENT else 126), f"cannot run {name}: {why}"


def _unrunnable_by(name: str, user: cmd.Credentials) -> tuple[int, str] | None:
    """_unrunnable for a USER who is not root. What root finds may not be theirs: a
    directory they may not search, a file only root may execute."""
    return _unrunnable([name], user)


class _CannotTell(Exception):
    """What the exec makes of a file cannot be told from here: it is left to the exec."""


def _execvp(name: str, judge) -> tuple[int, str] | None:
    """What the exec helper's os.execvp does with NAME, JUDGE saying what an exec of each
    file it tries fails with ((errno, what to say, "" for no such file), None when it runs
    or cannot be told). Python's execvp, not glibc's: a name with a slash is that file; else
    each directory of PATH in turn, on whatever error, and when none runs, the first error
    other than ENOENT and ENOTDIR stands, else the last one. (No shell is run for a file
    the kernel refuses as ENOEXEC, as glibc's would.)"""
    if "/" in name:
        refused = _judged(judge, name)
        if refused is None:
            return None
        code, why = refused
        return code, why or os.strerror(code)
    first: tuple[int, str] | None = None
    last = (errno.ENOENT, "")
    missing = ""  # a file there whose interpreter is not: ENOENT all the same
    for d in os.get_exec_path():
        refused = _judged(judge, os.path.join(d, name))
        if refused is None:
            return None
        last = refused
        if refused[0] in (errno.ENOENT, errno.ENOTDIR):
            missing = missing or refused[1]
        elif first is None:
            first = refused
    if first is not None:
        return first
    path = os.environ.get("PATH", os.defpath)
    return last[0], f"not found in PATH ({path})" + (f"; {missing}" if missing else "")


def _judged(judge, path: str) -> tuple[int, str] | None:
    try:
        return judge(path)
    except _CannotTell:
        return None


def _exec_refuses(path: str, user: cmd.Credentials | None,
                  subject: str | None) -> tuple[int, str] | None:
    """What an exec of PATH fails with, as (errno, what to say: "" for no such file), None
    when it runs; as execve judges it: the file (_open_refuses, SUBJECT naming it), then what
    its content makes of it (_content_refuses). _CannotTell when it cannot be told. USER None
    is root."""
    refused = _open_refuses(path, user, subject)
    if refused is not None:
        return refused
    return _content_refuses(path, user, 0)


def _open_refuses(path: str, user: cmd.Credentials | None,
                  subject: str | None) -> tuple[int, str] | None:
    """What opening PATH for an exec fails with (the kernel's open_exec: CMD, a script's
    interpreter, a program's loader, each opened with the ids of the exec), None when it
    opens: the way there, a directory or other file that is not a regular one, a noexec
    mount, the mode and ACL. SUBJECT names the file in what is said, None for CMD itself."""

    def say(text: str) -> str:
        return text if subject is None else f"{subject} {text}"

    if not path:  # (a #! line with a NUL first) the kernel looks up the working directory
        return errno.EACCES, say("is an empty name, which the kernel takes for the working "
                                 "directory, a directory")
    if user is not None:
        try:
            searched = _searched(path)
        except OSError:
            raise _CannotTell from None
        for d in searched:  # in the order the kernel walks them
            try:
                dst = os.stat(d)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    return e.errno, ""
                raise _CannotTell from None
            if not stat.S_ISDIR(dst.st_mode):
                return errno.ENOTDIR, ""
            # One whose ACL cannot be judged is passed over: one further on that refuses the
            # user refuses them whatever that one says.
            if refused := _refusal(d, dst, user):
                return errno.EACCES, (
                    f"directory {d} ({refused[0]}) is not searchable by {_who(user)}; in the "
                    f"image, {refused[1]}, or put CMD where that user can reach it")
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return e.errno, ""
        # Root may be the one kept out (no CAP_DAC_READ_SEARCH, a root-squashed mount)
        # where the user is let in: the user's exec will say.
        raise _CannotTell from None
    if stat.S_ISDIR(st.st_mode):
        return errno.EACCES, say("is a directory")
    if not stat.S_ISREG(st.st_mode):
        return errno.EACCES, say("is not a regular file")
    try:
        noexec = os.statvfs(path).f_flag & os.ST_NOEXEC
    except OSError:
        raise _CannotTell from None
    if noexec:
        mount = _mount_point(path)
        return errno.EACCES, say(
            f"is on {mount}, a file system mounted noexec, from which the kernel runs "
            f"nothing (Permission denied); in the image, put it on another file system, or "
            f"mount {mount} without noexec")
    if user is None:
        if not os.access(path, os.X_OK):
            return errno.EACCES, (
                f"not executable ({_mode(st)}); in the image, chmod +x {shell(path)}"
                if subject is None else f"{subject} ({_mode(st)}) is not executable; in the "
                f"image, chmod +x {shell(path)}")
    elif refused := _refusal(path, st, user):
        return errno.EACCES, (f"{subject or path} ({refused[0]}) is not executable by "
                              f"{_who(user)}; in the image, {refused[1]}, or give it to that "
                              "user")
    return None


def _content_refuses(path: str, user: cmd.Credentials | None,
                     depth: int) -> tuple[int, str] | None:
    """What the kernel's loaders (binfmt) make of PATH, which opens for the exec: a #!
    script's interpreter, a program for another machine or whose loader is missing, a file
    none of them takes. DEPTH: how many scripts led here."""
    buf = binfmt.head(path)
    if buf is None or (misc := binfmt.misc_takes(path, buf)):
        raise _CannotTell
    refused = _loaders_refuse(path, buf, user, depth)
    # What no loader of the kernel's own takes (ENOEXEC) is what binfmt_misc entries are
    # for: one that cannot be seen from here (a container's host's) may run it.
    if misc is None and refused is not None and refused[0] == errno.ENOEXEC:
        raise _CannotTell
    return refused


def _loaders_refuse(path: str, buf: bytes, user: cmd.Credentials | None,
                    depth: int) -> tuple[int, str] | None:
    """_content_refuses for PATH, whose first bytes are BUF, by the kernel's own loaders."""
    script = binfmt.script(buf)
    if isinstance(script, binfmt.Refused):
        return errno.ENOEXEC, (f"{path} starts with #! but {script.why}: Exec format error; "
                               "make its first line #! and the interpreter's path "
                               "(#!/bin/sh)")
    if isinstance(script, binfmt.Script):
        return _interpreter_refuses(path, script, user, depth)
    header = binfmt.elf(buf)
    if header is None:
        return errno.ENOEXEC, (
            f"{path} is neither a program (ELF) nor a script starting with #!: Exec format "
            "error (CMD is not run through a shell); make its first line #! and its "
            "interpreter's path (#!/bin/sh), or give the shell as CMD (sh FILE)")
    if (refused := binfmt.foreign(header)) is not None:
        return refused.errno, f"{path} {refused.why}"
    loader = binfmt.interpreter(path, header)
    if loader is None:
        return None
    shown = _shown(os.fsdecode(loader))
    refused = _open_refuses(os.fsdecode(loader), user, f"its loader {shown}")
    if refused is None:
        return None  # (a loader that is no ELF for this machine: ELIBBAD, the exec says)
    code, why = refused
    if code in (errno.ENOENT, errno.ENOTDIR):
        return code, (
            f"{path} is a dynamically linked program whose loader (ELF program interpreter) "
            f"{shown} is not in this image: {os.strerror(code)}; it was built for another C "
            "library (glibc, musl): build it on the image's own base, or statically, or add "
            "that C library to the image")
    return code, f"{path} is a dynamically linked program, and {why}"


def _interpreter_refuses(path: str, script: binfmt.Script, user: cmd.Credentials | None,
                         depth: int) -> tuple[int, str] | None:
    """_content_refuses for PATH, a script whose #! line is SCRIPT."""
    name = os.fsdecode(script.interpreter)
    shown = _shown(name)
    refused = _open_refuses(name, user, f"its interpreter {shown}")
    if refused is None:
        if depth + 1 > binfmt.MAX_DEPTH:
            return errno.ELOOP, (
                f"{path} is a script whose interpreter {shown} is a script too, "
                f"{binfmt.MAX_DEPTH + 1} deep: more than the kernel follows (Too many levels "
                "of symbolic links); name a program as the interpreter of one of them")
        refused = _content_refuses(name, user, depth + 1)
        if refused is None:
            return None
        code, why = refused
        return code, f"{path} is a script run by {shown} (its #! line), and {why}"
    code, why = refused
    if code not in (errno.ENOENT, errno.ENOTDIR):
        return code, f"{path} is a script, and {why}"
    if name.endswith("\r"):
        return code, (
            f"{path} has Windows (CRLF) line endings: its #! line names the interpreter "
            f"{shown}, with a carriage return at the end, which does not exist; convert the "
            f"file to Unix line endings: sed -i 's/\\r$//' {shell(path)} (or dos2unix "
            f"{shell(path)})")
    return code, (f"{path} is a script whose interpreter {shown} (its #! line) is not in "
                  f"this image: {os.strerror(code)}; install it, or change the #! line")


# What an exec's errno means for CMD, said when the exec fails where the early check could
# not tell (a file `up` may not read, a format a binfmt_misc entry takes, a 32-bit program).
_EXEC_ERRORS = {
    errno.ENOENT: "the file, or what it names to run it (a script's #! interpreter, a "
                  "dynamically linked program's loader, a binfmt_misc entry's interpreter), is "
                  "not in this image",
    errno.ENOTDIR: "a directory on its way is a file",
    errno.EACCES: "it, or its interpreter or loader, is not executable, is on a file system "
                  "mounted noexec, or is in a directory that cannot be searched",
    errno.ENOEXEC: "it is neither a program for this machine ({machine}) nor a script "
                   "starting with #!, and no binfmt_misc entry of this kernel takes it (CMD is "
                   "not run through a shell); rebuild it for {machine}, or make its first line "
                   "#! and its interpreter's path",
    errno.ELIBBAD: "its loader (ELF program interpreter) is not a loader for this machine",
    errno.ELOOP: "links, or scripts whose interpreter is a script, nested too deep",
    errno.ETXTBSY: "a process has it open for writing; let that end first",
    errno.E2BIG: "CMD's arguments and environment are too long together",
}


def _exec_failed(name: str, e: OSError) -> str:
    """What to say of CMD NAME, whose exec failed with E after the early check passed."""
    code = e.errno or 0
    hint = _EXEC_ERRORS.get(code, "").format(machine=os.uname().machine)
    return f"cannot run {name}: {e.strerror}" + (f"; {hint}" if hint else "")


# File systems that judge a user's access themselves, not by the mode bits and ACL `up`
# reads: the server (NFS, SMB, 9p, AFS: its owners and ACLs, which the client's view may not
# show, as an EFS access point's own identity or NFSv4's unmapped owners), or a FUSE file
# system's own code unless it is mounted default_permissions (the kernel then asks only
# that a file to run have some x bit).
_OWN_PERMISSIONS = frozenset({"nfs", "nfs4", "cifs", "smb3", "9p", "afs"})
_FUSE = frozenset({"fuse", "fuseblk", "virtiofs"})


def _mode_decides(path: str) -> bool:
    """Whether the kernel judges a user's access to PATH by its mode bits and ACL alone."""
    mount = mount_of(path)
    if mount is None:
        return True
    kind, options = mount.fstype, mount.options
    if kind in _FUSE or kind.startswith("fuse."):
        return "default_permissions" in options
    return kind not in _OWN_PERMISSIONS


def _shown(name: str) -> str:
    """NAME as said, what is not printable escaped (a carriage return as \\r)."""
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in name)


def _who(user: cmd.Credentials) -> str:
    who = f"enclave.user ({user.uid}:{user.gid}"
    return who + (f", groups {','.join(map(str, user.groups))})" if user.groups else ")")


def _mount_point(path: str) -> str:
    """The mount PATH is on (mountinfo.mount_of). Not the nearest directory above it on another
    device: a bind mount (systemd's NoExecPaths=, `mount --bind -o noexec`) is on the device
    of what holds it, whose mount may well not be noexec. Without mountinfo, that nearest
    directory all the same."""
    if (mount := mount_of(path)) is not None:
        return mount.point
    here = os.path.realpath(path)
    dev = os.stat(here).st_dev
    while (up := os.path.dirname(here)) != here:
        try:
            if os.stat(up).st_dev != dev:
                break
        except OSError:
            break
        here = up
    return here


def _refusal(path: str, st: os.stat_result,
             user: cmd.Credentials) -> tuple[str, str] | None:
    """If USER may not execute or search PATH: its mode, owner and ACL, and what lets the
    user in. None when they may, or its ACL cannot be read or judged. With an ACL, a chmod
    of the group's bits changes the mask, and the others' bits may not be asked: an entry
    of the user's own is, and setfacl -m works the mask out again to let it through. None
    too on a file system that judges access itself (_mode_decides): only the exec can say."""
    if not _mode_decides(path):
        return None
    entries = cmd.acl(path)
    if entries is None or cmd.permits(st, entries, user, os.X_OK) is not False:
        return None
    if entries and st.st_uid != user.uid:
        return (f"{_mode(st)}, ACL {cmd.acl_text(entries)}",
                f"setfacl -m u:{user.uid}:rx {shell(path)}")
    return _mode(st), f"chmod {_class(st, user)}+x {shell(path)}"


def _searched(path: str) -> list[str]:
    """The directories the kernel looks a name up in on the way to PATH, each of which the
    user must be let search: from / or the working directory, a component at a time, each
    link followed from where it is, `..` going up from where a link led. As real paths,
    which a chmod in the image takes. (A relative PATH does not search the working
    directory's ancestors, but a link in it to an absolute path searches from /.)"""
    out: list[str] = []

    def walk(here: str, rest: str, links: int) -> str:
        if rest.startswith("/"):
            here = "/"
        for part in [p for p in rest.split("/") if p]:
            out.append(here)
            if part == "..":
                here = os.path.dirname(here)
            elif part != ".":
                step = os.path.join(here, part)
                if os.path.islink(step):
                    if links >= 40:  # the kernel's own limit (ELOOP)
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    step = walk(here, os.readlink(step), links + 1)
                here = step
        return here

    walk(os.getcwd(), path, 0)
    return list(dict.fromkeys(out))


def _mode(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid}"


def _class(st: os.stat_result, user: cmd.Credentials) -> str:
    """chmod's letter for the bits that apply to USER (cmd.allows)."""
    if st.st_uid == user.uid:
        return "u"
    return "g" if st.st_gid == user.gid or st.st_gid in user.groups else "o"


def _wait_child(child: subprocess.Popen) -> int:
    """CMD's wait status. As PID 1 (a container without an init), also reaps the orphans
    that are reparented to us, which nothing else would. Nothing else may reap CMD (Popen's
    poll() and send_signal() do): the loop below would then wait for every other descendant
    to end, an app's long-lived helper included, before `up` could exit."""
    if os.getpid() != 1:
        return child.wait()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # reaped elsewhere: Popen knows its status
            return child.wait()
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode


def _signal_child(child: subprocess.Popen, signum: int) -> None:
    """Sends SIGNUM to CMD without reaping it (see _wait_child). Its pid cannot have been
    reused: until we reap CMD it stays a zombie holding the pid."""
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)


class _Freezes:
    """The spans of CLOCK_MONOTONIC that the whole process did not run through, as one thread
    that waits a known time again and again sees them: a wait that ends more than FROZEN_AFTER
    late with the process's CPU time hardly moved meanwhile.

    A span is the whole wait, the part of it the process may have run before the freeze
    included (up to the time asked): that errs towards not counting time, never towards
    stopping an app for a freeze."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._at, self._cpu = time.monotonic(), time.process_time()

    def waited(self, asked: float) -> tuple[float, float, bool]:
        """To be called after each wait of ASKED seconds: the (start, end) of the time since
        the last call (or since this was made), and whether it was a freeze."""
        now, used = time.monotonic(), time.process_time()
        start, late, ran = self._at, now - self._at - asked, used - self._cpu
        self._at, self._cpu = now, used
        # A thread that holds the GIL for seconds at a time makes each wake as late, but the
        # process runs all along: no freeze to excuse.
        frozen = late > FROZEN_AFTER and ran < late / 2
        if frozen:
            if self.spans and self.spans[-1][1] == start:  # frozen on: one span
                self.spans[-1] = (self.spans[-1][0], now)
            else:
                self.spans.append((start, now))
        return start, now, frozen

    def within(self, since: float, now: float) -> float:
        """How much of SINCE..NOW the process was frozen through."""
        return sum(max(0.0, min(end, now) - max(start, since)) for start, end in self.spans)

    def forget(self, now: float, limit: float) -> None:
        """Drops the spans followed by more than LIMIT seconds of running time: a thread
        behind since before one of them would have been judged stuck on LIMIT already."""
        self.spans = [(start, end) for start, end in self.spans
                      if now - end - self.within(end, now) <= limit]


def _watch_liveness(device: Device, stop: threading.Event, fail) -> None:
    """Calls FAIL(reason) once DEVICE's data path has been stuck for STUCK_AFTER seconds of
    the time the process ran, unless STOP is set first. Freezes are not counted, however many
    come between: a path stuck before a freeze and after it is judged on both parts.

    Measured on CLOCK_MONOTONIC, the device's own clock: its gaps are what `stalled` reads, and
    any gap in it that the process did not run through shows here as a late wake. It stops
    during a system suspend, so a suspended machine shows nothing to excuse; CLOCK_BOOTTIME,
    which runs on, would make every suspend look like a stuck data path."""
    freezes = _Freezes()
    while not stop.wait(LIVENESS_EVERY):
        start, now, frozen = freezes.waited(LIVENESS_EVERY)
        if frozen:
            log.info("the process did not run for %.0f s (frozen or paused); that time is not "
                     "counted against the tunnel's data path", now - start - LIVENESS_EVERY)
        if (why := device.stalled(now, STUCK_AFTER, excused=freezes.within)) is not None:
            fail(f"the tunnel is stuck: {why}")
            return
        freezes.forget(now, STUCK_AFTER)


def _kill_after_grace(proc: subprocess.Popen, name: str, ended: threading.Event) -> None:
    """SIGKILL to CMD (PROC, run as NAME) once the process has run for STOP_GRACE seconds
    since its SIGTERM, unless ENDED is set first.

    A freeze (docker pause, a paused VM) is not counted: CMD, in the same container or VM, was
    frozen with us, and on wall-clock time would get SIGKILL at the resume, without the time
    to end cleanly that SIGTERM promised. Where only this process was stopped, CMD gets that
    much longer, which it has had anyway: nothing could kill it meanwhile."""
    freezes = _Freezes()
    ran = 0.0
    while ran < STOP_GRACE:
        step = min(LIVENESS_EVERY, STOP_GRACE - ran)
        if ended.wait(step):
            return
        start, now, frozen = freezes.waited(step)
        if not frozen:
            ran += now - start
    if proc.returncode is None:
        print(f"wgvsock enclave: {name} did not stop within {STOP_GRACE:g} s of SIGTERM; "
              "killing it", file=sys.stderr, flush=True)
        _signal_child(proc, signal.SIGKILL)


def attester():
    """The NSM-backed attestation function, where this enclave has /dev/nsm. Registering
    without attestation because an import broke (an app image that replaced cbor2 or
    cryptography) would make the parent refuse us for a reason that points elsewhere: an
    enclave with the device says why it cannot attest."""
    try:
        from ..attestation import nsm_attester
    except ImportError as e:
        # (attestation.nsm's DEVICE_ENV and NSM_DEVICE: that module is what failed to load.)
        device = os.environ.get("WGVSOCK_NSM_DEVICE") or "/dev/nsm"
        if os.path.exists(device):
            raise EnclaveError(f"{device} is here but attestation cannot be loaded: {e} "
                               "(does the image replace cbor2 or cryptography?)") from None
        return None
    return nsm_attester()


class Enclave:
    def __init__(self, profile, *, resolv_conf: str = "/etc/resolv.conf",
                 outside_enclave: bool = False) -> None:
        self.profile = profile
        self.resolv_conf = resolv_conf
        # Run where a default route is already (a container tried with `docker run`), as asked:
        # the default routes the profile's replace and resolv.conf are then put back at the end.
        self.outside_enclave = outside_enclave
        # The namespace's default routes before the profile's were added, for close().
        self._defaults_before: list[netconf.DefaultRoute] = []
        # (the file written, its content before or None when there was none), to put back.
        self._resolv_before: tuple[str, bytes | None] | None = None
        self.key = generate_private_key()
        self.public_key = public_key(self.key)
        self.device: Device | None = None
        self.stop = threading.Event()
        # Stopping signals that came before CMD ran, noted by `run_up`'s handler, which may
        # not set `stop` itself (wgvsock.signals says why): waiting for the parent ends.
        self.signalled: list[int] = []
        self.registered = threading.Event()
        self.parent_key: bytes | None = None
        self.registrations = 0
        # Why the last exchange with the parent failed once it answered (a refusal, "parent
        # refused this enclave: REASON", or a broken exchange), for wait_connected's error.
        # None until then, and again after each registration.
        self.last_failure: str | None = None
        # The last dial's error while the parent has not answered (ECONNRESET: nobody listens
        # on that vsock port; ENODEV: no transport reaches that CID), for the same message.
        self.last_dial_error: OSError | None = None
        # Where the parent's welcome said its WireGuard port is, as an operator reads it: the
        # enclave sends there whatever its own profile's transport.port says.
        self.parent_wg_address: str | None = None
        self._unix_dir: str | None = None
        self._thread: threading.Thread | None = None
        self._attest = None

    def refuse_a_host(self) -> list[netconf.DefaultRoute]:
        """Raises EnclaveError where a default route is already, unless outside_enclave;
        returns the default routes there are (none but with outside_enclave).

        Run on a host by mistake (an EC2 parent, where wgvsock is installed too), `start`
        would take its default route and resolv.conf, and with them its SSH session and its
        own traffic. An enclave has only lo until then. Refused too on a Nitro parent
        (NE_DEVICE) unless outside_enclave, and, with enclave.dns, where resolv.conf is the
        machine's own file in a namespace of `ip netns`'s (_shared_resolv_conf)."""
        defaults = netconf.default_routes()
        ours = f" dev {self.profile.interface}"
        if defaults and all(d.text.endswith(ours) or f"{ours} " in d.text for d in defaults):
            # Ours: another `enclave up` runs here already. Not a host's, as said below.
            raise EnclaveError(self._taken())
        if defaults and not self.outside_enclave:
            raise EnclaveError(self._not_an_enclave(defaults))
        if os.path.exists(NE_DEVICE) and not self.outside_enclave:
            # The parent's side of Nitro Enclaves: an enclave has /dev/nsm, never this. Caught
            # where the default route is not: a namespace with no name (`unshare -n`, a unit's
            # PrivateNetwork=) on the parent, whose /etc/resolv.conf would be the parent's.
            raise EnclaveError(
                f"refusing to start: this machine has {NE_DEVICE}, the device an EC2 parent "
                "runs its enclaves with: it is the parent, not an enclave (which has only "
                "/dev/nsm). Here `enclave up` would put its routes and name servers in place "
                "of the parent's own; on the parent run `wgvsock parent up`. To try the image "
                "here all the same, pass --outside-enclave.")
        if self.profile.enclave.dns and (name := self._shared_resolv_conf()) is not None:
            own = os.path.join(NETNS_ETC_DIR, name, "resolv.conf")
            if not os.path.exists(own):
                fix = (f"Give the namespace one of its own (mkdir -p "
                       f"{shell(os.path.join(NETNS_ETC_DIR, name))} and "
                       f"write {own}, which `ip netns exec` puts over {self.resolv_conf})")
            elif os.path.islink(self.resolv_conf) and not os.path.exists(self.resolv_conf):
                # `ip netns exec` binds over what the link points to, and said it failed.
                fix = (f"{own} is there, but {self.resolv_conf} is a link to "
                       f"{os.readlink(self.resolv_conf)}, which does not exist, so `ip netns "
                       "exec` could not put it over that: make the link's target exist")
            else:
                # nsenter --net, or systemd's NetworkNamespacePath=: no /etc/netns bind.
                fix = (f"{own} is there, but only `ip netns exec {name}` puts it over "
                       f"{self.resolv_conf}, and this process was not started by it (nsenter "
                       f"or NetworkNamespacePath= do not): start `enclave up` with `ip netns "
                       f"exec {shell(name)}`")
            raise EnclaveError(
                f"refusing to start: this process runs in network namespace {name!r} (`ip "
                f"netns exec {name}`), but {self.resolv_conf} here is the machine's own: "
                "writing the profile's enclave.dns there would change the DNS of the whole "
                f"machine, and for good should `enclave up` be killed. {fix}, or leave "
                "enclave.dns out of the profile.")
        return defaults

    def _shared_resolv_conf(self) -> str | None:
        """The name of the network namespace `ip netns` put this process in, when
        resolv.conf is not a mount of its own there, else None. `ip netns exec NS` binds
        /etc/netns/NS/resolv.conf over it only when that file exists; without one, a namespace
        made on a host (no default route, so refuse_a_host's first check passes) shares the
        host's /etc/resolv.conf. An enclave's namespace, or a container's, has no name under
        /run/netns (and docker mounts the container's own resolv.conf)."""
        name = netns_name()
        if name is None or is_mount_point(self.resolv_conf):
            return None
        return name

    def _taken(self) -> str:
        name = self.profile.interface
        return (f"interface {name} is taken: another `wgvsock enclave up` (or another "
                f"WireGuard program) already runs it in this network namespace. One `enclave "
                f"up` serves an enclave, as the image's CMD: stop that one first, or give the "
                f"profile another `interface`")

    def start(self) -> None:
        p = self.profile
        defaults = self.refuse_a_host()  # before anything changes
        self._attest = attester()
        netconf.link_up("lo")
        t = p.transport
        if t.kind == "unix":
            # Our own listener is never dialled (the parent answers over our connection), but
            # the transport wants a directory; keep it out of the parent's.
            self._unix_dir = tempfile.mkdtemp(prefix="wgvsock-enclave-")
        try:
            bind = make_bind(t.kind, False, unix_dir=self._unix_dir)
            self.device = Device(p.interface, bind, mtu=p.mtu, run_dir=run_dir())
            try:
                self.device.start()
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                raise EnclaveError(self._taken()) from None
            self.device.extra_status = {"wgvsock_profile": p.name, "wgvsock_role": "enclave"}
            self._refuse_router_messages()
            configure(self.device, private_key=self.key)
            netconf.add_addresses(p.interface, p.enclave.addresses)
            netconf.link_up(p.interface, p.mtu)
            self._defaults_before = defaults  # (should adding ours fail part-way, too)
            netconf.add_routes(p.interface, self._routes_to_add())
            if defaults:
                self._say_what_became_of(defaults)
            if p.enclave.dns:
                # A namespace of `ip netns`'s is no enclave either: its resolv.conf is the
                # /etc/netns file the refusal above asked for, which its other commands read.
                if self.outside_enclave or netns_name() is not None:
                    self._keep_resolv_conf()
                netconf.write_resolv_conf(p.enclave.dns, self.resolv_conf)
        except BaseException:
            self.close()
            raise
        self._thread = NamedThread(target=self._control_loop, name="control", daemon=True)
        self._thread.start()

    def _not_an_enclave(self, defaults: list[netconf.DefaultRoute]) -> str:
        """Why `up` refuses to start in a namespace with DEFAULTS, and what to do."""
        p = self.profile
        routes = self._routes()
        one = len(defaults) == 1
        found = "; ".join(map(str, defaults))
        # A default route of the profile takes the place of the namespace's of its family.
        taken = {r.version for r in routes if r.prefixlen == 0}
        replaced = [d for d in defaults if d.version in taken]
        gone = (" (until `enclave up` ends, and for good should it be killed: then it would "
                "not be put back)")
        if len(replaced) == len(defaults):
            change = (f"replace {'it' if one else 'them'} with a default route through "
                      f"{p.interface}{gone}")
        elif replaced:
            families = " and ".join(sorted({f"IPv{d.version}" for d in replaced}))
            change = (f"replace the {families} one with a default route through "
                      f"{p.interface}{gone}")
        else:
            change = (f"route {', '.join(map(str, routes))} through {p.interface} beside "
                      f"{'it' if one else 'them'}")
        if p.enclave.dns:
            change += f" and overwrite {self.resolv_conf}"
        return (f"refusing to start: this network namespace already has "
                f"{'a default route' if one else 'default routes'} ({found}): it looks like a "
                "host or a container, not an enclave, which has only lo until `enclave up` "
                f"runs. Here `enclave up` would {change}, cutting this machine's own traffic "
                "off, an SSH session to it included. `enclave up` is the enclave image's "
                "entrypoint; to run it here all the same (the image tried in a throwaway "
                "container with `docker run`), pass --outside-enclave.")

    def _say_what_became_of(self, defaults: list[netconf.DefaultRoute]) -> None:
        """Logs, under --outside-enclave, which of the namespace's DEFAULTS the profile's routes
        replaced (put back by close()) and which are still there."""
        name = self.profile.interface
        try:
            now = {str(d) for d in netconf.default_routes()}
        except OSError as e:
            log.warning("--outside-enclave: cannot tell which of this network namespace's "
                        "default routes (%s) the routes through %s replaced: %s",
                        "; ".join(map(str, defaults)), name, e)
            return
        for d in defaults:
            if str(d) in now:
                log.info("--outside-enclave: this network namespace's default route (%s) "
                         "stays, beside the routes through %s", d, name)
            else:
                log.warning("--outside-enclave: replaced this network namespace's default route "
                            "(%s) with one through %s until `enclave up` ends", d, name)

    def _put_back_default_routes(self) -> None:
        """Adds again the namespace's default routes that the profile's replaced, once the
        tunnel's interface, and with it the routes through it, is gone."""
        before, self._defaults_before = self._defaults_before, []
        if not before:
            return
        try:
            now = {str(d) for d in netconf.default_routes()}
        except OSError as e:
            log.warning("cannot put back this network namespace's default routes (%s): %s",
                        "; ".join(map(str, before)), e)
            return
        for d in before:
            if str(d) in now:  # one the profile's routes left beside them
                continue
            try:
                netconf.put_back_route(d)
            except OSError as e:
                log.warning("cannot put back this network namespace's default route as it was "
                            "before `enclave up`: %s", e)
            else:
                log.info("put back this network namespace's default route (%s)", d)

    def _keep_resolv_conf(self) -> None:
        """Notes what resolv.conf holds before it is written, for close() to put back."""
        path = os.path.realpath(self.resolv_conf)  # what writing it follows a symlink to
        try:
            with open(path, "rb") as f:
                self._resolv_before = (path, f.read())
        except FileNotFoundError:
            self._resolv_before = (path, None)

    def _put_back_resolv_conf(self) -> None:
        kept, self._resolv_before = self._resolv_before, None
        if kept is None:
            return
        path, content = kept
        try:
            if content is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                netconf.write_in_place(path, content)
        except OSError as e:
            log.warning("cannot put %s back as it was before `enclave up`: %s",
                        self.resolv_conf, e.strerror or e)
            return
        log.info("put %s back as it was before `enclave up`", self.resolv_conf)

    def _refuse_router_messages(self) -> None:
        """Keeps the parent from configuring our routing: before the link is up, the tunnel's
        accept_ra, autoconf and accept_redirects go to 0, so a router advertisement from the
        parent (its link-local source is inside ::/0, which the parent's peer is allowed) gives
        no address, default route or hop limit, and a redirect no route. EnclaveError where
        they cannot be set, unless outside an enclave, where it only warns."""
        name = self.profile.interface
        try:
            firewall.refuse_router_messages(name)
        except OSError as e:
            # The sysctl's file and the errno's name: "/proc/sys/net/ipv6/conf/wg0/accept_ra:
            # Read-only file system (EROFS)".
            why = f"{e.filename}: " if e.filename else ""
            why += e.strerror or str(e)
            if e.errno:
                why += f" ({errno.errorcode.get(e.errno, e.errno)})"
            if self.outside_enclave:
                # A container's read-only /proc/sys (`docker run` without --privileged): the
                # image tried outside an enclave, where the rest still works.
                log.warning("%s: cannot refuse router advertisements and redirects from the "
                            "parent (setting its accept_ra, autoconf and accept_redirects to "
                            "0: %s); the parent could set its routes", name, why)
                return
            # In an enclave the parent is not trusted: going on would let it route our
            # traffic, with a log line as the only trace. An enclave's /proc/sys is writable.
            raise EnclaveError(
                f"{name}: cannot refuse router advertisements and redirects from the parent: "
                f"setting its accept_ra, autoconf and accept_redirects to 0 failed: {why}. "
                "Without that the parent could give this enclave addresses and routes, a "
                "default route among them, so `enclave up` stops here. An enclave's /proc/sys "
                "is writable; a container's is read-only without --privileged: to try the "
                "image in a throwaway container, pass --outside-enclave, which warns and goes "
                "on.") from None

    def _routes(self) -> list:
        p = self.profile
        routes = list(p.enclave.routes)
        for a in p.parent.addresses:
            if not any(a.ip in r for r in routes):
                routes.append(a.network)
        return routes

    def _routes_to_add(self) -> list:
        """_routes() but those this namespace already routes elsewhere by the same prefix (a
        default route excepted, which the profile's replaces), said in the log. There the
        replace took the route's place: for the subnet of the link to the parent (the tcp
        stand-in, --outside-enclave in a container) that sent the transport itself into the
        tunnel, which never came up, and nothing put the route back. In an enclave only the
        tunnel has routes, so this keeps nothing."""
        p = self.profile
        routes = self._routes()
        kept = netconf.routed_elsewhere(p.interface, [r for r in routes if r.prefixlen])
        for net, where in kept.items():
            log.warning("enclave.routes: %s is routed %s in this network namespace already (a "
                        "connected subnet, or a route of its own): that route stays, so "
                        "traffic for %s does not go through %s here. In an enclave no other "
                        "interface has routes; off Nitro, leave %s out of enclave.routes if "
                        "that link is the way to the parent", net, where, net, p.interface,
                        net)
        return [r for r in routes if r not in kept]

    def _allowed_ips(self) -> list:
        return [(r, True) for r in self._routes()]

    def _check_pin(self, welcome: Welcome) -> None:
        """Refuses a parent whose key is not the pinned one, or is one no parent can have,
        before anything is installed.

        Whatever answers on the control port would otherwise be believed: while `parent up`
        is down, another process on the host could bind the port and offer its own key. Ours
        (sent back to us) would replace the parent's peer with none, since the device drops a
        peer with its own key; a low-order point gives no handshake (X25519 with it is all
        zeros). Both are refused whether or not a key is pinned."""
        offered = key_to_base64(welcome.parent_public_key)
        if welcome.parent_public_key == self.public_key:
            raise UnusableParentKey(
                f"refusing the parent: it offered this enclave's own public key {offered} as "
                "its own (whatever answers on the control port is not the parent)")
        if dh(self.key, welcome.parent_public_key) is None:
            raise UnusableParentKey(
                f"refusing the parent: it offered a low-order point as its public key "
                f"({offered}), with which no WireGuard handshake can be made (whatever "
                "answers on the control port is not the parent)")
        pinned = self.profile.parent.public_key
        if pinned is not None and offered != pinned:
            raise PinMismatch(
                f"refusing the parent: it offered public key {offered}, but the profile pins "
                f"parent.public_key {pinned} (another process on the control port, or a "
                "rotated parent key without a rebuilt image)")

    def _apply(self, welcome: Welcome) -> None:
        assert self.device is not None
        t = self.profile.transport
        if t.kind != "vsock" and welcome.wg_port > 0xFFFF:  # vsock ports are 32-bit
            raise ControlError(f"welcome: wg_port {welcome.wg_port} is no {t.kind} port")
        key = welcome.parent_public_key
        # The endpoint is given as an object: its Unix form is a path outside our unix_dir,
        # which the transport's text parser would not accept.
        endpoint = parent_wg_endpoint(t, welcome.wg_port)
        self.parent_wg_address = control_address(replace(t, control_port=welcome.wg_port))
        if key == self.parent_key and self.device.connect_peer(key, endpoint):
            # Same parent key (the control connection dropped, or the parent restarted with
            # its key file): the peer is kept and just handshakes again — a restarted parent
            # has forgotten our session. (Gone, it is installed again below.)
            return
        # Forgotten first: should what follows fail part-way (the old peer gone, the new one
        # not connected), the next welcome builds the peer again rather than take the
        # shortcut above to one that may not exist.
        self.parent_key = None
        configure(self.device, replace_peers=True, peers=[{
            "public_key": key,
            "endpoint": None,
            "persistent_keepalive": PERSISTENT_KEEPALIVE,
            "replace_allowed_ips": True,
            "allowed_ips": self._allowed_ips(),
        }])
        if not self.device.connect_peer(key, endpoint):
            raise ControlError("the parent's peer was removed as it was being installed (a "
                               "`wg set` meanwhile?); registering again")
        self.parent_key = key

    def _control_loop(self) -> None:
        t = self.profile.transport
        # The same range as the WireGuard connection's redials: 1 s at most on vsock and Unix,
        # so a parent that was away for minutes is found again within a second of returning.
        backoff_min, backoff_max = redial_backoff(t.kind)
        delay, answered_delay = backoff_min, backoff_max
        answered_since: float | None = None  # when the parent's answers stopped keeping us
        attest = self._attest
        # Whatever answers on the control port decides how often an attempt fails (each
        # within a second of the last, for the first minute): one warning for each would let
        # it fill the enclave's log. Made here, on the loop's clock.
        say = RateLimitedLog(10.0, logger=log, burst=5, clock=lambda: time.monotonic())
        # Registrations too: one that the other side ends at once can be repeated as often.
        say_registered = RateLimitedLog(10.0, logger=log, burst=5,
                                        clock=lambda: time.monotonic())

        def pause(answered: bool = False, at_least: float = 0.0) -> None:
            """Waits before the next try: up to backoff_max, and once the parent has answered
            without keeping us for ANSWERED_FAST_FOR, up to ANSWERED_BACKOFF_MAX; AT_LEAST
            seconds in any case."""
            nonlocal delay, answered_delay, answered_since
            if answered and answered_since is None:
                answered_since = time.monotonic()
            slow = answered and time.monotonic() - answered_since >= ANSWERED_FAST_FOR
            wait = answered_delay if slow else delay
            # Jitter keeps many enclaves from redialling a restarted parent in lockstep.
            self.stop.wait(max(at_least, random.uniform(wait / 2, wait)))  # noqa: S311 - jitter
            if slow:
                answered_delay = min(answered_delay * 2, ANSWERED_BACKOFF_MAX)
            else:
                delay = min(delay * 2, backoff_max)

        while not self.stop.is_set():
            try:
                conn = dial_control(t)
            except OSError as e:
                self.last_dial_error = e
                # Once per outage at info: a parent away for minutes is redialled every second.
                level = logging.INFO if delay == backoff_min else logging.DEBUG
                # How often, not "backoff": an operator waiting on the parent wants to know
                # how soon a parent that comes back is found.
                log.log(level, "control: parent not answering (%s); retrying, at most %g s "
                        "apart", e, backoff_max)
                pause()
                continue
            try:
                # Before the exchange: _apply starts the handshake, which may complete at once.
                since = time.monotonic()
                welcome = register(conn, self.public_key, attest)
                self._check_pin(welcome)
                self._apply(welcome)
                self.registrations += 1
                self.last_failure = None
                self.registered.set()
                # Its word, not a fact: the welcome is not authenticated.
                say_registered(logging.INFO, "control: registered with the parent (the parent "
                               "says attestation: %s)", welcome.state)
                reason = hold_connection(conn, self.stop,
                                         check=lambda at=since: self._tunnel_ok(at))
                if self.stop.is_set():  # `up` is ending: nothing ended on the parent's side
                    break
                say(logging.WARNING, "control: connection to the parent ended (%s); "
                    "registering again", reason)
                if time.monotonic() - since >= HELD_STABLE:
                    delay, answered_delay, answered_since = backoff_min, backoff_max, None
                else:  # (another enclave of the profile may have taken our place)
                    pause(answered=True)
            except (PinMismatch, UnusableParentKey) as e:  # not the parent's port, it seems
                self.last_failure = str(e)
                say(logging.WARNING, "control: %s", e)
                pause(answered=True)
            except Throttled as e:
                # We registered too often for the parent (its limit per enclave, met by quick
                # retries after refusals): it said when it listens again. Bounded, as whatever
                # answers on the control port may have said it. The refusal before this one,
                # if any, stays the reason wait_connected gives: "too often" hides the cause.
                if self.last_failure is None:
                    self.last_failure = str(e)
                say(logging.WARNING, "control: %s", e)
                pause(answered=True, at_least=min(e.retry_after, ANSWERED_BACKOFF_MAX))
            except Refused as e:
                # Retried too, less and less often: the parent's policy may be changed.
                self.last_failure = str(e)
                say(logging.WARNING, "control: %s", e)
                pause(answered=True)
            except (ControlError, OSError) as e:
                self.last_failure = str(e)
                say(logging.WARNING, "control: %s", e)
                pause()
            except Exception as e:  # a bug here must not end re-registration for good
                self.last_failure = f"internal error: {error(e)}"
                say(logging.ERROR, "control: unexpected error", exc_info=True)
                pause()
            finally:
                conn.close()

    def _tunnel_ok(self, registered_at: float) -> str | None:
        """None while the tunnel a registration at REGISTERED_AT set up works, else why not."""
        if self.device is None or self.parent_key is None:
            return None
        last = self.device.last_handshake(self.parent_key)
        now = time.monotonic()
        if last is None or last < registered_at:
            if now - registered_at >= NO_HANDSHAKE_AFTER:
                return f"no WireGuard handshake {NO_HANDSHAKE_AFTER:.0f} s after registering"
        elif now - last >= HANDSHAKE_STALE_AFTER:
            return f"no WireGuard handshake for {now - last:.0f} s"
        return None

    def wait_connected(self, timeout: float) -> None:
        """Blocks until the first handshake with the parent, at most TIMEOUT seconds in all;
        EnclaveError on timeout. Returns at once when stopped (see `stop`)."""
        deadline = time.monotonic() + timeout
        if not wait_until(self.registered.is_set, timeout, self.stopping):
            if self.stopping():
                return
            if self.last_failure is not None:
                raise EnclaveError(f"could not register with the parent within {timeout:.0f} s:"
                                   f" {self.last_failure}")
            raise EnclaveError(self._no_answer(timeout))

        def handshaken() -> bool:
            assert self.device is not None
            # None again while a later welcome replaces the peer.
            key = self.parent_key
            return key is not None and self.device.last_handshake(key) is not None

        if not wait_until(handshaken, deadline - time.monotonic(), self.stopping):
            if self.stopping():
                return
            # Not the profile's port: the enclave uses the one the parent's welcome names.
            raise EnclaveError(f"registered, but no WireGuard handshake with the parent within "
                               f"{timeout:.0f} s: its WireGuard port ({self.parent_wg_address}, "
                               "as its welcome named it) did not answer (over TCP, a firewall "
                               "that passes the control port but not that one; otherwise the "
                               "parent's log says why its data path did not)")

    def _no_answer(self, timeout: float) -> str:
        """Why wait_connected gave up on a parent that never answered: where it was sought,
        what the last dial said, and what to check."""
        t = self.profile.transport
        where = control_address(t)
        err = self.last_dial_error
        said = f": {err.strerror or err}" if err is not None else ""
        hint = "is `wgvsock parent up` running with the same profile?"
        if t.kind == "vsock" and err is not None and err.errno == errno.ENODEV:
            # The dial's own words say that no transport reaches the CID (bind.py).
            hint = "is transport.parent_cid the parent's CID (3 on Nitro)?"
        return (f"no answer from the parent's control port ({where}) within {timeout:.0f} s"
                f"{said} ({hint})")

    def stopping(self) -> bool:
        return self.stop.is_set() or bool(self.signalled)

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self.device is not None:
            self.device.close()
            self.device = None
        if self._unix_dir:
            shutil.rmtree(self._unix_dir, ignore_errors=True)
        self._put_back_default_routes()
        self._put_back_resolv_conf()


def _reason(e: BaseException) -> str:
    """E in one line for the console: an OSError that carries its own words (the TUN's "does
    not exist: the kernel has no TUN support ...") without Python's "[Errno 2] " before them;
    one naming a file keeps the name."""
    if isinstance(e, OSError) and isinstance(e.strerror, str) and e.strerror \
            and e.filename is None:
        return e.strerror
    return message(e)


def run_up(profile, command: list[str], *, timeout: float = HANDSHAKE_TIMEOUT,
           signalled: list[int] | None = None, outside_enclave: bool = False) -> int:
    """SIGNALLED: the stopping signals that came before this was called (signals.note).
    OUTSIDE_ENCLAVE: start even where a default route is already (Enclave.start)."""
    forbid_core_dumps()  # before the key is made
    enclave = Enclave(profile, outside_enclave=outside_enclave)
    try:
        # First: on a host by mistake, CMD may be missing too, and the refusal matters more.
        enclave.refuse_a_host()
    except (EnclaveError, OSError) as e:
        print(f"wgvsock enclave up: {e}", file=sys.stderr, flush=True)
        return 1
    # The profile's own, as `profile check` and `parent up` print them: `enclave up` is
    # where an image's profile is read, and its console may be all anyone looks at.
    bare = profile.enclave.user is not None and profile.enclave.user.name is None \
        and profile.enclave.user.gid is None and profile.enclave.user.uid != 0
    for w in profile.warnings:
        _warn(str(w))
    user: cmd.Credentials | None = None
    if profile.enclave.user is not None:
        # Here, in the image, not in `profile check`: the parent has other users. Without a
        # CMD too, so that an image whose CMD is added later does not fail only then.
        try:
            user = cmd.credentials(profile.enclave.user)
        except cmd.UserError as e:
            print(f"wgvsock enclave up: {e}", file=sys.stderr, flush=True)
            return 1
        if bare and not user.passwd:
            _warn(f"enclave.user {profile.enclave.user} has no passwd entry in this image: "
                  f"CMD runs with GID {user.gid} (its own number; docker --user gives GID 0, "
                  f"group root, instead) and no supplementary groups; write "
                  f"\"{user.uid}:GID\" to choose the group")
        elif not bare and any(w.key == "enclave.user" for w in profile.warnings):
            pass  # the profile said it (root, or GID 0 given), just above: not said twice
        elif user.uid == 0:
            _warn(f"enclave.user {profile.enclave.user} is root: CMD runs with every "
                  "capability, as without the key")
        elif user.root_group:
            # Known here only: the groups of a name, or of a UID alone, are the image's.
            how = ("as its primary group" if user.gid == 0 else "as a supplementary group")
            fix = (f"give it a group of its own: {user.uid}:GID, GID other than 0"
                   if profile.enclave.user.name is None
                   else "give the user a primary group of its own and take it out of group "
                   "root in the image's /etc/passwd and /etc/group")
            _warn(f"enclave.user {profile.enclave.user} is in root's group (GID 0, {how}): CMD "
                  f"can read and write whatever the image leaves to group root; {fix}")
    if command and (unrunnable := _unrunnable(command, user)) is not None:
        code, why = unrunnable
        print(f"wgvsock enclave up: {why}", file=sys.stderr, flush=True)
        return code
    child: subprocess.Popen | None = None
    starting = False  # CMD is being started: it may run before cmd.start returns
    started_with: list[int] = []  # signals taken meanwhile, for CMD
    wakeup = Wakeup()

    def on_signal(signum: int, _frame: object) -> None:
        # Takes no lock (wgvsock.signals): os.kill and list.append take none.
        if child is not None:
            _signal_child(child, signum)
        elif starting:
            started_with.append(signum)
        elif signum in STOPPING:
            enclave.signalled.append(signum)  # passed on to CMD once it runs

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, on_signal)
    # (Complete now: the handlers that noted them are replaced.)
    enclave.signalled.extend(signalled or ())
    failures: list[str] = []
    # Taken by the main thread to publish CMD and by a failing thread to look for it, so
    # that CMD is stopped exactly once whichever comes first. Never by a signal handler.
    cmd_lock = threading.Lock()
    cmd_ended = threading.Event()  # ends the grace stop_cmd gives

    def stop_cmd(proc: subprocess.Popen) -> None:
        """SIGTERM to CMD after a failure, and SIGKILL if it has not ended STOP_GRACE
        seconds later."""
        _signal_child(proc, signal.SIGTERM)
        NamedThread(target=_kill_after_grace, args=(proc, command[0], cmd_ended),
                    name="cmd-killer", daemon=True).start()

    def on_death(reason: str) -> None:
        # A dead thread would leave the tunnel half working: stop, so the command ends and
        # the enclave (or whatever supervises it) starts afresh.
        with cmd_lock:
            first = not failures
            failures.append(reason)
            proc = child
        enclave.stop.set()
        wakeup.wake()
        if first and proc is not None:
            stop_cmd(proc)

    on_thread_death(on_death)
    try:
        if enclave.stopping():  # asked to stop while starting: bring nothing up
            return _stopped(failures, enclave.signalled)
        enclave.start()
        if (device := enclave.device) is not None:
            # It stops by itself when its interface or UAPI socket is removed or its TUN
            # fails: CMD must not go on without a network. (Not on our own close.)
            device.on_stop(lambda: on_death(f"the tunnel device stopped: {device.stop_reason}"))
            # A thread that hangs rather than dies: what systemd's watchdog sees on the parent.
            NamedThread(target=_watch_liveness, args=(device, enclave.stop, on_death),
                        name="liveness", daemon=True).start()
        enclave.wait_connected(timeout)
        if enclave.stopping():
            return _stopped(failures, enclave.signalled)
        log.info("tunnel up")
        print(f"wgvsock enclave: tunnel to the parent is up on {profile.interface}", flush=True)
        if not command:
            while not enclave.stopping():
                wakeup.wait(None)
            if failures:
                print(f"wgvsock enclave: stopped: {failures[0]}", file=sys.stderr, flush=True)
                return 1
            return 0
        starting = True
        try:
            # From this (the main) thread: CMD gets SIGKILL when the thread that started it
            # ends (wgvsock.roles.cmd).
            proc = cmd.start(command, user)
        except cmd.UserError as e:  # not run as root in its place
            print(f"wgvsock enclave up: {e}", file=sys.stderr, flush=True)
            return 1
        except OSError as e:  # what _unrunnable could not tell, or what changed since
            print(f"wgvsock enclave up: {_exec_failed(command[0], e)}", file=sys.stderr,
                  flush=True)
            if isinstance(e, FileNotFoundError):
                return 127
            # No process to run it in (fork failed) is ours, not CMD's: no shell's code.
            return 1 if e.errno in (errno.EAGAIN, errno.ENOMEM) else 126
        with cmd_lock:
            child = proc
            # The tunnel broke while CMD was being started: on_death found no CMD to stop.
            broke = bool(failures)
        # Passed on, and no more: once CMD runs, its own handling of a signal decides (an app
        # that reloads on SIGHUP goes on, and so does the tunnel). Those taken from here on
        # go to it at once.
        for signum in (*enclave.signalled, *started_with):
            _signal_child(proc, signum)
        if broke:
            stop_cmd(proc)
        code = _wait_child(proc)
        if failures:
            print(f"wgvsock enclave: stopped: {failures[0]}", file=sys.stderr, flush=True)
            return 1
        return code if code >= 0 else 128 - code
    except (EnclaveError, OSError, ValueError) as e:
        print(f"wgvsock enclave up: {_reason(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        cmd_ended.set()
        enclave.close()
        wakeup.close()
