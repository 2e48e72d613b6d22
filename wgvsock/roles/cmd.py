"""How `enclave up` starts CMD: as its child, through a small exec helper that has the kernel
SIGKILL CMD should `up` die.

Outside Nitro (`--outside-enclave` in a container whose PID 1 is not `up`), an `up` that is
SIGKILLed (the OOM killer, `kill -9`) would leave CMD running on with no network and no
parent, and nothing to stop it. The parent-death signal (prctl PR_SET_PDEATHSIG) is SIGKILL,
not SIGTERM: nothing is left to follow a SIGTERM that CMD ignores or takes long over with the
SIGKILL `up` sends after its grace, and a container whose PID 1 dies has all its processes
SIGKILLed the same way.

The signal can only be asked for by the child itself, between fork and exec. Popen's
preexec_fn would run Python there, in the fork of a process with threads (the tunnel's),
where a lock another thread held at the fork is held for ever. The helper is a fresh
interpreter of its own instead, with no thread: it asks for the signal, checks that `up`
did not die before it did (the child of a dead parent is adopted by another, and the signal
then never comes), and execs CMD in its place, with the same pid. The kernel sends the signal
when the thread that started the helper ends: `run_up` starts it from the main thread, which
lives as long as the process. It does not reach what CMD starts itself, nor a set-user-ID CMD
(the kernel clears it at such an exec).

With enclave.user the helper also takes the user's ids before the exec. The kernel clears the
parent-death signal at every change of credentials (prctl(2)), so it is asked for after the
change, not before: what `-- setpriv --reuid ...` cannot do, since setpriv changes them after
the helper asked. It then sets no_new_privs: neither a set-user-ID program of the image (su,
mount) nor file capabilities give CMD back what the change took, and none of them can clear
the parent-death signal either. It also starts a session of its own first, as su --pty,
runuser and sudo's use_pty do: the terminal `up` may have (a root shell's) is then not CMD's
controlling one, and the user cannot type into that shell with TIOCSTI.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from ..acl import (
    ACL_GROUP,
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    AclEntry,
    read_acl,
)
from ..services.profile import EnclaveUser

# argv: `up`'s pid, the descriptor to report a failure on, the ids to take ("" for none, else
# UID:GID:GROUPS, GROUPS comma-separated), CMD and its arguments. Run with -I -S: neither
# PYTHON* variables nor site-packages of the app's image have a say in it. CMD gets the
# environment the helper is given. A failure is reported as "exec ERRNO" (the exec) or
# "user WHAT" (the change of ids; CMD is never run as anyone else).
_HELPER = r"""
import ctypes, os, signal, sys
parent, report, ids, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 38, 47, 4
def refuse(what):
    os.write(report, f"user {what}".encode())
    os._exit(126)
if ids:
    uid, gid, groups = ids.split(":")
    uid, gid = int(uid), int(gid)
    # A session of its own, without `up`'s controlling terminal: there the user could push
    # input (TIOCSTI) that the root shell which ran `up` reads once it ends. Signals from the
    # terminal reach CMD as `up` passes them on.
    step = "setsid"
    try:
        os.setsid()
        step = "setgroups"
        os.setgroups([int(g) for g in groups.split(",") if g])
        step = "setresgid"
        os.setresgid(gid, gid, gid)
        # Ambient capabilities would survive the exec; setresuid from root to another uid
        # clears them with the rest, unless a securebit says otherwise: cleared here anyway,
        # and all of them checked below. (EINVAL: a kernel without them, before 4.3.)
        step = "clearing the ambient capabilities"
        if (libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0
                and ctypes.get_errno() != 22):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        step = "setresuid"
        os.setresuid(uid, uid, uid)
    except OSError as e:
        refuse(f"{step}: {e.strerror}")
    if uid != 0:
        try:
            with open("/proc/self/status") as f:
                kept = [line.split()[0].rstrip(":") for line in f
                        if line.startswith(("CapPrm:", "CapEff:", "CapAmb:"))
                        and int(line.split()[1], 16) != 0]
        except OSError as e:  # no /proc: nothing shows what was kept, so CMD does not run
            refuse(f"cannot check the capabilities left ({e.filename}: {e.strerror})")
        if kept:  # SECBIT_KEEP_CAPS or SECBIT_NO_SETUID_FIXUP, set by whatever started `up`
            refuse("capabilities kept after the change of user (" + ", ".join(kept) + ")")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        refuse(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
# After the change of ids, which clears it.
if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    print(f"wgvsock enclave up: {args[0]} would not be stopped should `enclave up` be killed "
          f"(prctl: {os.strerror(ctypes.get_errno())}); running it all the same",
          file=sys.stderr, flush=True)
if os.getppid() != parent:  # `enclave up` died before the prctl took: as its death would
    os.kill(os.getpid(), signal.SIGKILL)
os.set_inheritable(report, False)  # closed by the exec: `up` then knows CMD runs
# Python ignores these, and an exec would pass that on (Popen's restore_signals, for CMD);
# nor does CMD start with signals blocked. SIGINT came blocked (start): a Ctrl-C meanwhile
# ends the helper by the default action, as it would have ended CMD.
for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
    signal.signal(s, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
try:
    os.execvp(args[0], args)
except OSError as e:
    os.write(report, f"exec {e.errno or 0}".encode())
    os._exit(127)
"""


class UserError(Exception):
    """enclave.user names no one this image knows, or its ids could not be taken."""


@dataclass(frozen=True)
class Credentials:
    """What CMD runs as: the ids, and what of HOME, USER and LOGNAME to set (`env`) or take
    away (`unset`)."""
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    # False for a UID alone that the image's passwd does not know: its group is then our
    # choice (its own number), not the image's, and `enclave up` says so.
    passwd: bool = True

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}:{','.join(map(str, self.groups))}"

    @property
    def root_group(self) -> bool:
        """In group 0, primary or supplementary: what the image leaves to root's group (files
        root:root 0640 or 0660, directories 0770) is then CMD's too."""
        return self.gid == 0 or 0 in self.groups


def allows(st: os.stat_result, user: Credentials, want: int) -> bool:
    """Whether ST's mode bits grant USER what WANT asks (os.R_OK, W_OK, X_OK, or'ed), as the
    kernel reads them for a process without capabilities, as CMD is: the owner's bits for
    the owner, else the group's for a member of the file's group, else the others'. Only
    the class that matches counts: an owner whose bits say no is refused, whatever the
    others may. The same for uid 0, which without CAP_DAC_OVERRIDE is no one special.
    (os.access cannot say: it asks for the ids of this process, root.)"""
    if st.st_uid == user.uid:
        shift = 6
    elif st.st_gid == user.gid or st.st_gid in user.groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & want == want


def acl(path: str) -> list[AclEntry] | None:
    """PATH's access ACL (read_acl); None when it cannot be read or judged: only the exec
    can then say."""
    try:
        return read_acl(path)
    except OSError:
        return None


def permits(st: os.stat_result, entries: list[AclEntry], user: Credentials,
            want: int) -> bool | None:
    """allows() for a file whose access ACL is ENTRIES (acl()), as the kernel judges it for a
    process without capabilities (acl_permission_check, posix_acl_permission): the owner
    by the owner's bits; else, when the group class has a bit in the mode, by the ACL: the
    user's own entry, then the owning group's and named groups' (any of them that matches
    and grants, else refused: the others' entry is not asked then), then the others'; the
    mask bounds all but the owner's and the others'. None where the kernel fails with EIO (an
    unknown tag, no entry for the others): the exec will say."""
    if not entries or st.st_uid == user.uid or not st.st_mode & 0o070:
        # With no bit for the group class (a mask of ---) the ACL is not asked at all, and
        # a named user may be let in as one of the others.
        return allows(st, user, want)
    groups = (user.gid, *user.groups)
    found = False
    for i, (tag, perm, id_) in enumerate(entries):
        if tag == ACL_USER_OBJ:
            continue  # the owner's, judged above from the mode, which holds the same bits
        if tag == ACL_USER:
            if id_ == user.uid:
                return _masked(entries[i + 1:], perm, want)
        elif tag in (ACL_GROUP_OBJ, ACL_GROUP):
            if (st.st_gid if tag == ACL_GROUP_OBJ else id_) in groups:
                found = True
                if perm & want == want:
                    return _masked(entries[i + 1:], perm, want)
        elif tag == ACL_OTHER:
            return not found and perm & want == want
        elif tag != ACL_MASK:
            return None
    return None


def _masked(rest: list[AclEntry], perm: int, want: int) -> bool:
    # The kernel looks for the mask after the matching entry only, where a valid ACL has it.
    mask = next((p for tag, p, _ in rest if tag == ACL_MASK), 7)
    return perm & mask & want == want


def acl_text(entries: list[AclEntry]) -> str:
    """ENTRIES as setfacl takes them (u::rwx,u:1000:r-x,g::---,m::r-x,o::---)."""
    names = {ACL_USER_OBJ: "u", ACL_USER: "u", ACL_GROUP_OBJ: "g", ACL_GROUP: "g",
             ACL_MASK: "m", ACL_OTHER: "o"}
    return ",".join(
        f"{names.get(tag, hex(tag))}:{id_ if tag in (ACL_USER, ACL_GROUP) else ''}:"
        + "".join(c if perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        for tag, perm, id_ in entries)


def _passwd_env(pw: pwd.struct_passwd) -> dict[str, str]:
    # An entry with an empty home field gets /, as login(1) gives it: an empty HOME makes
    # ~/x the absolute /x for some (Python's expanduser) and nothing at all for others.
    return {"HOME": pw.pw_dir or "/", "USER": pw.pw_name, "LOGNAME": pw.pw_name}


def _groups(pw: pwd.struct_passwd, user: EnclaveUser) -> tuple[int, ...]:
    # getgrouplist: the groups of /etc/group that list the name, and the primary one first.
    try:
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError as e:
        who = f"'{user}'" if user.name is not None else f"{user} ('{pw.pw_name}')"
        raise UserError(f"enclave.user: cannot list the groups of {who}: {e.strerror}") from None
    return tuple(dict.fromkeys(groups))


def credentials(user: EnclaveUser) -> Credentials:
    """USER's ids, looked up in this image as runc's GetExecUser looks up an image's USER. A
    name, or a UID alone that has a passwd entry, is that entry's user: its uid, its primary
    group and the supplementary groups of /etc/group that list its name (initgroups'; runc
    sets these, Docker adds the primary group to them as here). A UID alone with no entry
    takes the group of the same number (not 0, as docker's --user gives: that would be
    root's group). UID:GID takes GID and no supplementary groups, as runc gives "the
    implicit form" only. HOME, USER and LOGNAME come from the passwd entry, a UID's too; a
    UID with none gets HOME=/ (as runc gives such a user) and no USER or LOGNAME: what
    `enclave up` has would be root's (/root, root). UserError if the name is unknown."""
    if user.name is not None:
        try:
            pw = pwd.getpwnam(user.name)
        except KeyError:
            raise UserError(f"enclave.user: there is no user '{user.name}' in this image's "
                            "/etc/passwd (add one to the image, or give UID or UID:GID "
                            "numbers)") from None
        return Credentials(pw.pw_uid, pw.pw_gid, _groups(pw, user), _passwd_env(pw))
    assert user.uid is not None
    try:
        pw = pwd.getpwuid(user.uid)
    except KeyError:
        return Credentials(user.uid, user.uid if user.gid is None else user.gid,
                           env={"HOME": "/"}, unset=("USER", "LOGNAME"), passwd=False)
    if user.gid is None:
        return Credentials(user.uid, pw.pw_gid, _groups(pw, user), _passwd_env(pw))
    return Credentials(user.uid, user.gid, env=_passwd_env(pw))


def start(command: list[str], user: Credentials | None = None) -> subprocess.Popen:
    """Runs COMMAND as a child that is SIGKILLed should this process die, as USER if given,
    and returns once COMMAND itself runs, so that a signal passed on to the child reaches
    COMMAND rather than the helper. Raises OSError as Popen does for a COMMAND that cannot be
    run (a script's missing interpreter: FileNotFoundError) or a child that cannot be made
    (fork failed), UserError when USER's ids could not be taken (COMMAND did not run)."""
    env = None
    if user is not None and (user.env or user.unset):
        env = {k: v for k, v in {**os.environ, **user.env}.items() if k not in user.unset}
    report_r, report_w = os.pipe()
    try:
        # A Ctrl-C reaches the helper too (the terminal signals the whole process group).
        # Taken by the interpreter's own handler, it raised KeyboardInterrupt in the helper's
        # code and printed a traceback; the helper inherits the mask and keeps it pending.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            # (Popen's defaults, stated: CMD gets none of our descriptors, the TUN and the
            # sockets among them.)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(os.getpid()), str(report_w),
                 "" if user is None else str(user), *command],
                close_fds=True, restore_signals=True, pass_fds=(report_w,), env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(report_w)
        report = b""
        while chunk := os.read(report_r, 64):  # until the exec, or the helper's end
            report += chunk
    finally:
        os.close(report_r)
    if report:
        proc.wait()
        kind, _, what = report.decode(errors="replace").partition(" ")
        if kind == "user":
            raise UserError(f"cannot run {command[0]} as enclave.user: {what}")
        code = int(what)
        raise OSError(code, os.strerror(code), command[0])
    return proc
