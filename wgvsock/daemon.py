"""`wireguard-go-vsock` / `wgvsock daemon`: the userspace WireGuard interface daemon.

Same command line as the Go program it replaces:

    wireguard-go-vsock [-f|--foreground] [-d|--dgram] [-n|--network NET] INTERFACE-NAME

Without -f the daemon starts in a child process and this process exits 0 only once the child
reports the interface and UAPI socket ready (or non-zero with the child's reason). The child
is a fresh interpreter rather than a fork() of this one, because forking a process that may
already run threads is unsafe in Python.
"""

from __future__ import annotations

import argparse
import errno
import grp
import logging
import os
import pwd
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import __version__
from .acl import ACL_GROUP, ACL_GROUP_OBJ, ACL_USER, ACL_WRITE, read_acl
from .pathwalk import Fault, Replaceable, names, resolve, user_name
from .safetext import message, prose, quote, shell
from .stdout import guarded

if TYPE_CHECKING:
    from .conn.bind import Bind

NETWORKS = ("vsock", "tcp", "tcp4", "tcp6", "udp", "unix")
ENV_NETWORK = "WGVSOCK_NETWORK"
ENV_DGRAM = "WGVSOCK_DGRAM"
ENV_LOG_FILE = "WGVSOCK_LOG_FILE"
ENV_RUN_DIR = "WGVSOCK_RUN_DIR"
ENV_OFFLOAD = "WGVSOCK_OFFLOAD"
ENV_LANES = "WGVSOCK_LANES"
# The CIDs a vsock listener lets in: the Go program's command line has no room for it.
ENV_ADMIT_CIDS = "WGVSOCK_ADMIT_CIDS"
_ENV_READY_FD = "WGVSOCK_READY_FD"
# wireguard-go's and the seed's: "1" (nothing else) keeps them in the foreground, as -f does.
ENV_FOREGROUND = "WG_PROCESS_FOREGROUND"
# How wireguard-go and the seed hand the TUN and the UAPI socket to their background process,
# and a launcher that makes them hands them to the daemon; see passed_descriptors.
ENV_TUN_FD = "WG_TUN_FD"
ENV_UAPI_FD = "WG_UAPI_FD"
_READY = b"ready\n"

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "verbose": logging.INFO,
    "error": logging.ERROR,
    "silent": logging.CRITICAL + 10,
}

log = logging.getLogger("wgvsock")

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


class EnvError(ValueError):
    """An environment variable this program reads holds what it cannot use: exit 2."""


def switch(name: str, default: bool) -> bool:
    """The on/off environment variable NAME; DEFAULT when unset or empty."""
    value = os.environ.get(name, "")
    if not value:
        return default
    if value.lower() in _ON:
        return True
    if value.lower() in _OFF:
        return False
    raise EnvError(f"{name}={value!r} is neither on ({', '.join(_ON)}) nor off "
                   f"({', '.join(_OFF)})")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Userspace WireGuard over vsock, TCP, UDP or Unix sockets.",
        epilog=(
            f"Environment: {ENV_NETWORK} (default network, for wg-quick), {ENV_DGRAM}=1, "
            f"{ENV_FOREGROUND}=1 (as -f), LOG_LEVEL=debug|verbose|error|silent, "
            f"{ENV_LOG_FILE} (where a background daemon logs; else, with LOG_LEVEL set, to "
            "the stderr it was started with), "
            "WGVSOCK_UNIX_DIR (unix network sockets, default /var/run/wgvsock), "
            f"{ENV_OFFLOAD}=0 (no TCP super-packets: MTU-sized packets both ways, as from "
            f"wireguard-go-vsock), {ENV_LANES}=0 (no C lanes: every packet the ordinary way), "
            f"{ENV_ADMIT_CIDS}=CID,... (a vsock listener lets in "
            f"only these CIDs), {ENV_TUN_FD} (a /dev/net/tun descriptor attached to the "
            f"interface, to serve instead of making the TUN), {ENV_UAPI_FD} (a listening "
            "unix socket's descriptor, to serve instead of making the UAPI socket)."
        ),
    )
    p.add_argument("-f", "--foreground", action="store_true", help="do not fork to the background")
    p.add_argument("-d", "--dgram", action="store_true", help="datagram sockets (vsock, unix)")
    p.add_argument("-n", "--network", choices=NETWORKS, help="transport (default vsock)")
    # Not argparse's version action, which prints and exits 0 wherever the flag stands: with
    # an interface name too, the command line is a mistake (the seed answers it with usage).
    p.add_argument("--version", action="store_true",
                   help="print the version and exit (given alone)")
    p.add_argument("interface", help="interface name, e.g. wg0")
    return p


def setup_logging(level_name: str | None, ifname: str) -> None:
    name = (level_name or "error").lower()
    level = LOG_LEVELS.get(name)
    if level is None:
        print(f"warning: LOG_LEVEL={level_name!r} is not one of {', '.join(LOG_LEVELS)}; "
              "using error", file=sys.stderr)
        level = logging.ERROR
    from .journal import handler

    # A '%' in the name (the kernel's "wg%d" template) must not be read as a format field,
    # nor a line break in it start a line of its own.
    fmt = f"%(levelname)s: ({prose(ifname, 40).replace('%', '%%')}) %(asctime)s %(message)s"
    logging.basicConfig(level=level, handlers=[handler(fmt, "%Y/%m/%d %H:%M:%S")])


def main(argv: list[str] | None = None, prog: str = "wireguard-go-vsock") -> int:
    return guarded(prog, _main, argv, prog)


def _main(argv: list[str] | None, prog: str) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--version"]:
        print(f"wgvsock {__version__}")
        return 0
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.version:
        parser.error("--version takes no interface name or other argument: run it alone")
    network = args.network or os.environ.get(ENV_NETWORK) or "vsock"
    if network not in NETWORKS:
        print(f"{prog}: {ENV_NETWORK}={network!r} is not one of {', '.join(NETWORKS)}",
              file=sys.stderr)
        return 2
    try:
        dgram = args.dgram or switch(ENV_DGRAM, False)
        offload = switch(ENV_OFFLOAD, True)
        lanes = switch(ENV_LANES, True)
        admit = admitted_cids(network, dgram)
        tun_fd, uapi_fd = passed_descriptors(args.interface)
        ready_fd = take_ready_fd()
    except EnvError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    foreground = args.foreground or os.environ.get(ENV_FOREGROUND) == "1"
    if not foreground and ready_fd is None:
        rest = argv if argv is not None else sys.argv[1:]
        # (Under the same numbers, which the variables name.)
        return spawn_background(["-m", "wgvsock.daemon", "--foreground", *rest], prog,
                                keep_stdio=True,
                                keep_fds=tuple(fd for fd in (tun_fd, uapi_fd) if fd >= 0))
    setup_logging(os.environ.get("LOG_LEVEL"), args.interface)
    if ready_fd is not None:
        follow_log()
    return run_foreground(args.interface, network, dgram, ready_fd, offload=offload,
                          lanes=lanes, prog=prog, tun_fd=tun_fd, uapi_fd=uapi_fd,
                          admit_cids=admit)


_CID_MAX = 0xFFFFFFFE  # 2^32-1 is VMADDR_CID_ANY, which no connection comes from


def admitted_cids(network: str, dgram: bool) -> frozenset[int] | None:
    """The CIDs $WGVSOCK_ADMIT_CIDS (comma-separated) lets in, None when it is unset. Raises
    EnvError for a value it cannot use, before anything is made and before the background
    process starts: a fence that is set but read as no fence would let everyone in."""
    value = os.environ.get(ENV_ADMIT_CIDS)
    if value is None:
        return None
    fix = ("give decimal CIDs (0 to 4294967294) separated by commas, e.g. "
           f"{ENV_ADMIT_CIDS}=16,17, or unset it to let in any CID")
    if not value.strip():
        # (Not "unset", as empty is for the on/off variables: a list that came out empty,
        # say from a script's unset variable, must not open the port to everyone.)
        raise EnvError(f"{ENV_ADMIT_CIDS} is set but empty; {fix}")
    cids: set[int] = set()
    for item in value.split(","):
        text = item.strip()
        # (At most 10 digits: int() of a long string is slow, and none of them is a CID.)
        if not (text.isascii() and text.isdigit() and len(text) <= 10
                and int(text) <= _CID_MAX):
            what = f"{quote(text, 40)} is not a CID" if text else "an item is empty"
            raise EnvError(f"{ENV_ADMIT_CIDS}={quote(value, 80)}: {what}; {fix}")
        cids.add(int(text))
    # Refused rather than ignored: whoever set it expects a fence, and a listener it does
    # not apply to would let in everyone who can reach it.
    if network != "vsock":
        raise EnvError(f"{ENV_ADMIT_CIDS} lets in vsock connections by CID, and network "
                       f"{network} has none: unset it (fence {network} with "
                       + ("the socket directory's permissions" if network == "unix"
                          else "a firewall") + ")")
    if dgram:
        raise EnvError(f"{ENV_ADMIT_CIDS} applies to vsock stream listeners, not to datagram "
                       "sockets (-d): unset it, or use stream sockets")
    return frozenset(cids)


def daemon_bind(network: str, dgram: bool, admit_cids: frozenset[int] | None = None) -> Bind:
    """The transport for -n NETWORK and -d; with ADMIT_CIDS (see admitted_cids) its listener
    lets in only those CIDs."""
    from .conn import make_bind

    bind = make_bind(network, dgram)
    if admit_cids is not None:
        # At accept, before a connection costs a reader thread or an inbound slot.
        bind.refuse_from = cid_fence(admit_cids)
        log.info("%s: letting in only CIDs %s (%s)", network, _cid_list(admit_cids),
                 ENV_ADMIT_CIDS)
    return bind


def _cid_list(cids: frozenset[int]) -> str:
    """CIDS for a log line, the first few of a long list."""
    first = sorted(cids)[:8]
    return ",".join(map(str, first)) + (",..." if len(cids) > len(first) else "")


def cid_fence(cids: frozenset[int]) -> Callable[[object], str | None]:
    """A stream bind's refuse_from that lets in only CIDS (vsock's accept() address is
    (CID, port))."""
    why = f"not in {ENV_ADMIT_CIDS}={_cid_list(cids)}"

    def refuse(addr: object) -> str | None:
        if isinstance(addr, tuple) and addr and isinstance(addr[0], int) and addr[0] in cids:
            return None
        return why

    return refuse


def passed_descriptors(ifname: str) -> tuple[int, int]:
    """The TUN and the listening UAPI socket that the process starting us made and hands
    over in WG_TUN_FD and WG_UAPI_FD, as wireguard-go's and the seed's launchers do (-1 for
    a variable unset or empty). Raises EnvError naming the variable and what its descriptor
    is instead: checked before anything is made, and before the background process starts."""
    from .device.tun import adoptable
    from .device.uapi import DEFAULT_RUN_DIR, listening_path, socket_path

    run_dir = os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR
    fds: list[int] = []
    for name, check, what in (
        (ENV_TUN_FD, lambda fd: adoptable(fd, ifname),
         f"/dev/net/tun attached to interface {quote(ifname, 40)} with IFF_TUN|IFF_NO_PI "
         "(IFF_VNET_HDR too for segmentation offload), or be unset for the daemon to "
         "create the TUN"),
        (ENV_UAPI_FD, listening_path,
         "a listening unix stream socket, or be unset for the daemon to create "
         f"{quote(socket_path(ifname, run_dir), 120)}"),
    ):
        value = os.environ.get(name, "")
        if not value:
            fds.append(-1)
            continue
        # (At most 9 digits: a C int, which the calls below want, holds any of them.)
        if not (value.isascii() and value.isdigit() and len(value) <= 9):
            why = "is not a file descriptor number"
        elif int(value) <= 2:
            # Our background process gets other ones in their place.
            why = f"is standard {('input', 'output', 'error')[int(value)]}"
        else:
            try:
                check(int(value))
            except (OSError, ValueError) as e:
                why = (e.strerror if isinstance(e, OSError) else None) or str(e)
            else:
                fds.append(int(value))
                continue
        raise EnvError(f"{name}={quote(value, 40)} {why}; it must name an open descriptor of "
                       f"{what}")
    return fds[0], fds[1]


def take_ready_fd() -> int | None:
    """The pipe a launching process waits on, when we are its background child. Raises
    EnvError when the variable names no such pipe (set by hand, or left over)."""
    value = os.environ.pop(_ENV_READY_FD, None)
    if not value:
        return None
    why = "a file descriptor number"
    # (At most 9 digits: a C int, which os.fstat wants, holds any of them.)
    if value.isascii() and value.isdigit() and len(value) <= 9 and int(value) > 2:
        try:
            if stat.S_ISFIFO(os.fstat(int(value)).st_mode):
                return int(value)
            why = "a pipe"
        except OSError:
            why = "an open file descriptor"
    raise EnvError(f"{_ENV_READY_FD}={quote(value, 40)} is not {why}: the variable is "
                   "for wgvsock's own background process, from the one that starts it; "
                   "unset it")


def _own_path_entry() -> str | None:
    """The directory this wgvsock was imported from, when only the entry the interpreter put
    first on sys.path (the working directory, for -m and -c) gave it: the background process,
    started with -P, would import another wgvsock (the installed one) or none. None when
    the rest of sys.path, which it keeps, finds this one."""
    if sys.flags.safe_path or not sys.path:
        return None
    own = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    first, *rest = (os.path.realpath(p or os.curdir) for p in sys.path)
    return own if first == own and own not in rest else None


def spawn_background(python_args: list[str], prog: str, *, keep_stdio: bool = False,
                     keep_fds: tuple[int, ...] = ()) -> int:
    """Starts `python python_args...` detached and waits until it calls `report_ready` (exit
    0) or fails or dies (exit 1, printing its reason). Refused as the main process of a
    Type=notify unit. Its stdout and stderr go to $WGVSOCK_LOG_FILE, else, KEEP_STDIO and
    LOG_LEVEL set to anything but silent, stay ours (as wireguard-go's and the seed's do:
    `LOG_LEVEL=debug wireguard-go-vsock wg0` logs where it was started), else are closed, so
    that a caller capturing our output is not held up by the detached process. KEEP_FDS
    stay open in it, under the same numbers."""
    pid = str(os.getpid())
    if os.environ.get("NOTIFY_SOCKET") and pid in (os.environ.get("SYSTEMD_EXEC_PID"),
                                                   os.environ.get("WATCHDOG_PID")):
        # systemd takes READY=1 and the watchdog's pings only from the process it started,
        # which here would exit once the detached one is up: the unit would fail.
        print(f"{prog}: started by a systemd unit of Type=notify (NOTIFY_SOCKET is set), "
              "which must run it in the foreground: add -f to the unit's ExecStart",
              file=sys.stderr)
        return 1
    r, w = os.pipe()
    # Started further down (a script in a unit, a container's payload): the detached process
    # is not the one the manager waits on and must not speak for it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env[_ENV_READY_FD] = str(w)
    if (own := _own_path_entry()) is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (own, env.get("PYTHONPATH"))))
    log_file = os.environ.get(ENV_LOG_FILE)
    keep = keep_stdio and logs_to_launcher()
    try:
        out = (open(open_log(log_file), "ab") if log_file  # noqa: SIM115
               else None if keep else subprocess.DEVNULL)
    except LogPathError as e:
        print(f"{prog}: {e}; nothing was started", file=sys.stderr)
        os.close(r)
        os.close(w)
        return 1
    except OSError as e:
        print(f"{prog}: cannot open {ENV_LOG_FILE}={prose(log_file, 200)}: "
              f"{e.strerror or prose(e)} (it is where "
              "the background process logs: give a file in an existing directory, or unset "
              "it)", file=sys.stderr)
        os.close(r)
        os.close(w)
        return 1
    try:
        subprocess.Popen(
            # -P: -m would put the working directory first on sys.path, and the background
            # process would run a `wgvsock` found there (another release's checkout; as root
            # in /tmp, anyone's) rather than the one that started it.
            [sys.executable, "-P", *python_args],
            env=env,
            pass_fds=(w, *keep_fds),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    finally:
        os.close(w)
        if log_file:
            out.close()  # type: ignore[union-attr]
    with os.fdopen(r, "rb") as pipe:
        report = pipe.read()
    if report == _READY:
        return 0
    reason = report.decode(errors="replace").strip() or "the daemon exited during start-up"
    print(f"{prog}: {reason}", file=sys.stderr)
    return 1


class LogPathError(Exception):
    """$WGVSOCK_LOG_FILE is a path this process must not append to: the message says why and
    what to do."""


class LogLinkError(LogPathError):
    """$WGVSOCK_LOG_FILE is a symbolic link: the message says where it leads and what to do."""


def open_log(path: str) -> int:
    """A descriptor appending to the log file PATH, made 0600 when new (a root daemon's log is
    for its owner to open to others, if at all). The launcher runs as root: whoever could
    change a directory on the way could swap it for a link to /etc between a check and the
    open, and a link at PATH itself would name any file, so root would append to, or create,
    a file of their choosing. So every directory and link from / to PATH's directory must be
    one no user but root and us could change (pathwalk: sticky directories, as /tmp, pass,
    and PATH's own may be its group's), else LogPathError; the file is then opened in the
    directory the walk found, by a descriptor of it, so a swap after the walk cannot redirect
    the open; a link at PATH is refused (LogLinkError), not followed; and in a directory
    others may write (a sticky one, or its group's), a file there another user owns (planted,
    where fs.protected_regular is off) or with more than one name (a hard link to root's,
    where fs.protected_hardlinks is off) is refused. So is a log file anyone but its owner
    may write (_others_may_write: a 0666 one, from a `touch` under umask 0 or a chmod), where
    they would forge or erase its lines; one already there otherwise keeps its mode."""
    me = os.geteuid()
    parts = names(path)
    last = parts.pop() if parts else "."
    try:
        # The log's own directory may be writable by its group (Ubuntu's /var/log is
        # root:syslog 0775): it is held by a descriptor below, so its group can change only
        # the names in it, judged as in a sticky one. Not sticky, they could also remove a
        # hard link they made to a file of root's once it passed the count (_open_in): only
        # where the kernel keeps them from linking one they may not write. The directories
        # on the way may be their group's too (/var/log/wgvsock under Ubuntu's /var/log):
        # what the walk ends at is held by a descriptor and checked to be the one judged.
        found = resolve(parts, make=False, last_group=_hardlinks_protected(), way_group=True)
    except Replaceable as e:
        fault = e.fault
        if fault.kind == "links":
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), fault.step) from None
        if fault.kind == "not a directory":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                     fault.step) from None
        raise LogPathError(_log_path_words(path, fault, me)) from None
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    where, st = found
    # `where` has no link in it and only root or we could change any step of it: the
    # descriptor is of the directory that was judged, which the device and inode confirm.
    dir_fd = os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        held = os.fstat(dir_fd)
        if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
            raise LogPathError(f"{ENV_LOG_FILE}={prose(path, 200)}: {prose(where, 200)} "
                               "changed while it was being checked; try again")
        # Only where others may make files (a sticky directory) can a file there be a
        # plant; in a directory of root's own another owner is root's choice (logrotate's
        # `create 0640 syslog adm`).
        shared = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
        return _open_in(path, dir_fd, last, me, shared)
    finally:
        os.close(dir_fd)


def _open_in(path: str, dir_fd: int, name: str, me: int, shared: bool) -> int:
    """NAME in the directory DIR_FD, opened to append as open_log says; in a SHARED
    directory, refused when another user owns it."""
    # O_NONBLOCK: a FIFO planted in a shared directory fails at once (ENXIO) rather than
    # holding the launcher until someone reads it; it is cleared below for the file.
    flags = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
             | os.O_NONBLOCK)
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        # ELOOP is also "too many links": only a link at PATH itself is said so.
        if e.errno != errno.ELOOP:
            raise
        try:
            target = prose(os.readlink(name, dir_fd=dir_fd), 200)
        except OSError:
            raise e from None
        raise LogLinkError(
            f"{ENV_LOG_FILE}={prose(path, 200)} is a symbolic link (to {target}), "
            "which is not followed: root would append its log to whatever file the link "
            "names, chosen by whoever made it. Give the path of the file itself, or remove "
            "the link and let the daemon create the file (0600)") from None
    try:
        st = os.fstat(fd)
        if shared and st.st_uid not in (0, me):
            raise LogPathError(
                f"{ENV_LOG_FILE}={prose(path, 200)} is owned by uid {st.st_uid}, not "
                f"{_who(me)}: a file another user made there, as they may in a shared "
                "directory such as /tmp, would get this log. Remove it and let the daemon "
                "create the file (0600), or keep the log in a directory of root's own such "
                "as /var/log")
        # A second name of a file of root's, made in a shared directory where
        # fs.protected_hardlinks is off: the file is /etc/shadow, or any other of root's. Its
        # maker cannot remove it from a sticky directory (the inode is root's), so the count
        # holds there; one only its group may write is taken only with protected_hardlinks.
        if shared and st.st_nlink > 1:
            raise LogPathError(
                f"{ENV_LOG_FILE}={prose(path, 200)} has {st.st_nlink} names (hard links): "
                "another may be a file elsewhere that a user linked in here, as they may in a "
                "shared directory such as /tmp, and root would append its log to it. Remove it "
                "and let the daemon create the file (0600), or keep the log in a directory of "
                "root's own such as /var/log")
        if (why := _others_may_write(st, fd)) is not None:
            raise LogPathError(
                f"{ENV_LOG_FILE}={prose(path, 200)} is writable by {why} (mode "
                f"{stat.S_IMODE(st.st_mode):o}): they could write lines of their own into "
                "this daemon's log, or empty it, and so forge or erase what it records. "
                f"`chmod {_chmod_bits(st, why)}-w {shell(path)}`")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _others_may_write(st: os.stat_result, fd: int) -> str | None:
    """Who besides the owner may write the log file ST, open at FD, as "others", "group
    adm", "group adm and others", "user bob (its ACL)"; None when no one may. Only regular
    files: a device such as /dev/null, open to all, records nothing. As sshd's StrictModes
    (Debian's), a group only the owner is in (_private_group: a user private group; root's
    own gid 0 on Debian and Ubuntu) is no other user: a log made by a user under umask 002
    passes. Any other group is refused, adm and syslog too: Debian's and Ubuntu's text logs
    are theirs to read (0640), and those their group may write (wtmp, btmp: root:utmp) are
    records setgid programs keep, not logs."""
    if not stat.S_ISREG(st.st_mode):
        return None
    who = []
    if st.st_mode & stat.S_IWGRP:
        # With an access ACL the group bits are its mask: what the owning group, and each
        # user and group the ACL names, may do is in the ACL (a 0640 root:root log given
        # `setfacl -m u:bob:rw` shows 0660, its group root's alone, and bob writes it).
        acl = _acl_writers(st, fd)
        if acl is not None:
            who += acl
        elif not _private_group(st.st_uid, st.st_gid):
            who.append(f"group {_group_name(st.st_gid)}")
    if st.st_mode & stat.S_IWOTH:
        who.append("others")
    return " and ".join(who) or None


def _chmod_bits(st: os.stat_result, why: str) -> str:
    """chmod's who for what _others_may_write found: g, o or go (g clears an ACL's mask, and
    so the write of every user and group it names)."""
    return ("g" if st.st_mode & stat.S_IWGRP and why != "others" else "") + (
        "o" if st.st_mode & stat.S_IWOTH else "")


def _acl_writers(st: os.stat_result, fd: int) -> list[str] | None:
    """Who besides the owner the access ACL of the file at FD lets write, said as
    _others_may_write says them; None without an ACL (the mode says it all). Called only
    where the mask lets write (the mode's group bits): each entry's write is then its own."""
    entries = read_acl(fd)
    if not entries:
        return None
    who = []
    for tag, perm, qualifier in entries:
        if not perm & ACL_WRITE:
            continue
        if tag == ACL_USER and qualifier != st.st_uid:
            who.append(f"user {user_name(qualifier)} (its ACL)")
        elif tag == ACL_GROUP_OBJ and not _private_group(st.st_uid, st.st_gid):
            who.append(f"group {_group_name(st.st_gid)}")
        elif tag == ACL_GROUP and not _private_group(st.st_uid, qualifier):
            who.append(f"group {_group_name(qualifier)} (its ACL)")
    return who


# Accounts below this uid are the system's (login.defs' UID_MIN on Debian, Ubuntu and Amazon
# Linux): on Amazon Linux and Fedora sync, shutdown, halt and operator have root's group as
# their primary one, accounts no one logs in to and nothing runs as.
_FIRST_USER_UID = 1000


def _private_group(uid: int, gid: int) -> bool:
    """Whether GID is UID's primary group and no other user is in it: listed as a member in
    /etc/group (one that names UID's user is still only UID's), or having it as primary
    group too, which /etc/group does not list (Debian's nogroup is nobody's, _apt's and
    dnsmasq's; Debian's sshd counts them by getpwent as here). Root's gid 0 is root's alone
    with system accounts in it, as on Amazon Linux, but not with a user given it."""
    try:
        user = pwd.getpwuid(uid)
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    if user.pw_gid != gid or any(m != user.pw_name for m in members):
        return False
    # Only for a group-writable log, which as a rule it is not: getpwall goes through every
    # NSS source (sssd lists none of its users unless told to enumerate).
    return not any(p.pw_gid == gid and p.pw_uid != uid
                   and not (gid == 0 and p.pw_uid < _FIRST_USER_UID) for p in pwd.getpwall())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# 1: a user may hard-link only a file of their own or one they may read and write.
PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"


def _hardlinks_protected() -> bool:
    try:
        with open(PROTECTED_HARDLINKS) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _who(me: int) -> str:
    return "root" if me == 0 else f"root or uid {me}"


def _log_path_words(path: str, fault: Fault, me: int) -> str:
    """FAULT, a directory or link on the way to the log file PATH, as open_log says it."""
    assert fault.st is not None
    why, fix = fault.said(me)
    step = prose(fault.step, 200)
    head = f"{ENV_LOG_FILE}={prose(path, 200)}: {step} on its way {why}"
    # A process not root's can be made to spoil only files it may write: its own, not /etc's.
    harm = ("so that root would append its log to (or create) a file of their choosing, such "
            "as one in /etc" if me == 0 else f"so that this process (uid {me}) would append "
            "its log to (or create) a file of their choosing, such as one of its own")
    elsewhere = f"keep the log under directories only {_who(me)} may change" + (
        ", such as /var/log/wgvsock.log" if me == 0 else "")
    if stat.S_ISLNK(fault.st.st_mode):  # only its owner is judged: see pathwalk._check
        return (f"{head}, who could point it elsewhere, {harm}: give the real directory "
                f"instead, `{fix}`, or {elsewhere}")
    if fault.kind == "owner":
        # As a rule someone's home: chown would take it from them.
        return (f"{head}, who could swap it for a link elsewhere, {harm}: {elsewhere}, "
                f"or, if {step} is meant to be {user_name(me)}'s, `{fix}`")
    return (f"{head}: other users could swap what is in it for a link elsewhere, {harm}: "
            f"`{fix}`, or {elsewhere}")


# How often, at most, a record looks for a rotated log file: a stat of its name then, and
# between two looks only a clock read per record.
LOG_CHECK_EVERY = 1.0
# How often the same refusal to reopen a rotated log is said again, at most.
LOG_REFUSAL_EVERY = 3600.0


class LogFollower(logging.Filter):
    """Keeps a background process's log (its stdout and stderr, FDS) on the file named
    $WGVSOCK_LOG_FILE when logrotate moves it away: logrotate renames the file, then makes
    a new one (`create`) or not, and later compresses or removes the old one, where the
    process would go on appending to a file no one reads, and then to none. A filter on the
    log's handlers, so that it looks only when a record is written, at most every
    LOG_CHECK_EVERY seconds: when the path no longer names the file written to (the file
    renamed, or a directory on its way: /var/log/wgvsock moved to /var/log/wgvsock.old), the
    file is opened again as open_log opens it at start (the path walked and checked afresh,
    not opened by its name; made 0600 when missing) and put in place of FDS. A file that
    open refuses (another's, or writable by others, or a link at the path), or cannot make
    (its directory gone), is not used: the old file keeps the log, and the reason is logged
    there, once and again every LOG_REFUSAL_EVERY seconds while it lasts. `copytruncate`
    needs nothing: the file is appended to (O_APPEND), so the next line goes where the
    truncation left the end, with no hole before it. No postrotate signal either way."""

    def __init__(self, path: str, fds: tuple[int, ...] = (1, 2), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.path = path
        self.fds = fds
        self._clock = clock
        self._lock = threading.Lock()
        # The first look may come at once: the file may have been rotated between the
        # launcher's open and this process's start.
        self._due = clock()
        self._said: tuple[str, float] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self._clock() >= self._due:
            why = self.check()
            if why is not None:
                # Through the logger, in the log's own format, to the file still written;
                # this filter passes it, the next look not being due.
                logging.getLogger("wgvsock").error("%s", why)
        return True

    def check(self) -> str | None:
        """Reopens the log when its path names another file, or none; what to say when that
        was refused and not said lately, else None."""
        with self._lock:
            now = self._clock()
            if now < self._due:
                return None
            self._due = now + LOG_CHECK_EVERY
            try:
                held = os.fstat(self.fds[-1])
                # By the path, not in a directory held from the start: a directory on the
                # way renamed keeps the name in it naming the file written to, which no one
                # then looks for at the path. Only a comparison: what is opened instead is
                # walked and checked afresh by _reopen.
                try:
                    named = os.stat(self.path, follow_symlinks=False)
                except OSError:
                    named = None
                if named is not None and (named.st_dev, named.st_ino) == (
                        held.st_dev, held.st_ino):
                    # (Led back to it: a refusal said before is over, and one that comes
                    # again is new, to be said.)
                    self._said = None
                    return None
                self._reopen()
            except (LogPathError, OSError) as e:
                if isinstance(e, LogPathError):
                    why = (f"{ENV_LOG_FILE}={prose(self.path, 200)} was rotated, but the "
                           f"file now there is not used; this log goes on in the old one: {e}")
                elif isinstance(e, FileNotFoundError):
                    # open_log makes the file: what is missing is a directory on the way.
                    why = (f"cannot reopen {ENV_LOG_FILE}={prose(self.path, 200)} after "
                           "rotation: a directory on its way no longer exists (renamed or "
                           "removed); this log goes on in the old file until it is there "
                           "again")
                else:
                    why = (f"cannot reopen {ENV_LOG_FILE}={prose(self.path, 200)} after "
                           f"rotation: {e.strerror or prose(e)}; this log goes on in the old "
                           "file")
                if (self._said is not None and self._said[0] == why
                        and now - self._said[1] < LOG_REFUSAL_EVERY):
                    return None
                self._said = (why, now)
                return why
            self._said = None
            return None

    def _reopen(self) -> None:
        fd = open_log(self.path)
        try:
            for target in self.fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)


def follow_log() -> LogFollower | None:
    """In a background process that logs to $WGVSOCK_LOG_FILE (its stdout and stderr, as
    spawn_background made them), a LogFollower on the root logger's handlers."""
    path = os.environ.get(ENV_LOG_FILE)
    if not path:
        return None
    follower = LogFollower(path)
    for h in logging.getLogger().handlers:
        h.addFilter(follower)
    return follower


def logs_to_launcher() -> bool:
    """Whether a background daemon logs to the stdout and stderr of the command that started
    it: with LOG_LEVEL set to anything but silent and no $WGVSOCK_LOG_FILE, as wireguard-go's
    and the seed's do."""
    level = os.environ.get("LOG_LEVEL", "")
    return bool(level) and level.lower() != "silent" and not os.environ.get(ENV_LOG_FILE)


def report_ready(ready_fd: int | None, failure: str | None = None) -> None:
    """Tells the launching process we are ready, or why we failed."""
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, _READY if failure is None else failure.encode() + b"\n")
    except OSError:
        pass  # the launcher is gone (Ctrl-C while it waited): we run on regardless
    finally:
        os.close(ready_fd)


def run_foreground(ifname: str, network: str, dgram: bool, ready_fd: int | None = None, *,
                   offload: bool = True, lanes: bool = True, prog: str = "wireguard-go-vsock",
                   tun_fd: int = -1,
                   uapi_fd: int = -1, admit_cids: frozenset[int] | None = None) -> int:
    from .device.device import Device
    from .device.uapi import DEFAULT_RUN_DIR
    from .nodump import forbid_core_dumps
    from .sdnotify import Notifier, Watchdog
    from .signals import Wakeup
    from .threads import enable_stack_dumps, on_thread_death

    # Under a Type=notify unit (with -f): READY=1 once the interface and its UAPI socket
    # exist, the watchdog while the timer thread ticks, every thread's stack on SIGABRT.
    notifier = Notifier.from_environ()
    enable_stack_dumps()
    forbid_core_dumps()  # before any key comes in
    # The handler only notes the signal; the loop below acts on it (wgvsock.signals). Set
    # before the start, which makes the UAPI socket: a SIGTERM sent as soon as it appears
    # must stop us cleanly, not kill us with the interface half made.
    received: list[int] = []
    wakeup = Wakeup()
    signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        bind = daemon_bind(network, dgram, admit_cids)
        device = Device(
            ifname, bind, run_dir=os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR,
            offload=offload, lanes=lanes, tun_fd=tun_fd, uapi_fd=uapi_fd,
        )
        device.start()
    except (OSError, ValueError) as e:
        # An OSError's own words without Python's "[Errno 19]" in front: the transport's
        # (TransportUnavailable) and the TUN's already name the errno where it helps.
        said = e.strerror if isinstance(e, OSError) and e.strerror else message(e)
        reason = (f"failed to start interface {quote(ifname, 40)} "
                  f"({network}{', dgram' if dgram else ''}): {said}")
        if ready_fd is None:
            # In the foreground logging goes to stderr too: say it once, at any LOG_LEVEL,
            # named as the launcher names it.
            print(f"{prog}: {reason}", file=sys.stderr)
        else:
            if not logs_to_launcher():  # there the launcher says it, once
                log.error("%s", reason)
            report_ready(ready_fd, reason)
        notifier.status(reason)
        wakeup.close()
        return 1

    on_thread_death(device.fail)
    device.on_stop(wakeup.wake)  # by itself too: its interface went, a thread died
    watchdog = Watchdog(notifier, device.stalled)
    try:
        report_ready(ready_fd)
        up = f"interface {device.ifname} up ({network}, port {device.port})"
        notifier.ready(up)
        watchdog.start()
        while not device.wait(0):
            if received:
                device.stop(f"received {signal.Signals(received[0]).name}")
                break
            stalled = device.stalled(time.monotonic())
            notifier.status(f"stuck: {stalled}" if stalled else up)
            wakeup.wait(1.0)
    finally:
        wakeup.close()
        watchdog.close()
        notifier.stopping(f"stopping: {device.stop_reason}" if device.stop_reason else None)
        device.close()
        notifier.close()
    if device.failed:
        log.error("%s: stopped: %s", ifname, device.stop_reason)
        return 1
    log.info("%s: stopped (%s)", ifname, device.stop_reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
