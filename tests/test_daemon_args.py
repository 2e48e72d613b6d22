"""`wgvsock daemon`'s command line and environment, refused before anything starts: no
interface is made here (run_foreground and the launcher's Popen are stand-ins that record)."""

from __future__ import annotations

import grp
import os
import pwd
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wgvsock import daemon

ADMIT = "WGVSOCK_ADMIT_CIDS"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What run_foreground was called with; it starts nothing and returns 0."""
    calls: list[dict[str, Any]] = []

    def record(ifname: str, network: str, dgram: bool, ready_fd: int | None = None,
               **kwargs: Any) -> int:
        calls.append({"ifname": ifname, "network": network, "dgram": dgram,
                      "ready_fd": ready_fd, **kwargs})
        return 0

    monkeypatch.setattr(daemon, "run_foreground", record)
    monkeypatch.setattr(daemon, "setup_logging", lambda *args: None)
    for name in (daemon.ENV_DGRAM, daemon.ENV_OFFLOAD, daemon.ENV_LANES, daemon.ENV_LOG_FILE,
                 daemon.ENV_NETWORK,
                 "WGVSOCK_READY_FD", "NOTIFY_SOCKET", daemon.ENV_FOREGROUND,
                 daemon.ENV_TUN_FD, daemon.ENV_UAPI_FD, ADMIT):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a background daemon was started")

    monkeypatch.setattr(daemon.subprocess, "Popen", refuse)


@pytest.mark.parametrize(("value", "offload"), [
    ("0", False), ("false", False), ("no", False), ("OFF", False),
    ("1", True), ("true", True), ("yes", True), ("", True),
])
def test_offload_reads_the_usual_words_for_off(value, offload, started, monkeypatch):
    # Only "0" turned it off: WGVSOCK_OFFLOAD=false or =no left it on.
    monkeypatch.setenv(daemon.ENV_OFFLOAD, value)
    assert daemon.main(["-f", "-n", "unix", "wg0"]) == 0
    assert [c.get("offload") for c in started] == [offload]


@pytest.mark.parametrize(("value", "lanes"), [("0", False), ("off", False), ("1", True),
                                             ("", True)])
def test_lanes_are_on_unless_turned_off(value, lanes, started, monkeypatch):
    monkeypatch.setenv(daemon.ENV_LANES, value)
    assert daemon.main(["-f", "-n", "unix", "wg0"]) == 0
    assert [c.get("lanes") for c in started] == [lanes]


@pytest.mark.parametrize("name", [daemon.ENV_OFFLOAD, daemon.ENV_LANES, daemon.ENV_DGRAM])
@pytest.mark.parametrize("value", ["maybe", "2", "enable"])
def test_a_switch_that_is_neither_on_nor_off_is_refused(name, value, started, no_spawn,
                                                       monkeypatch, capsys):
    # WGVSOCK_DGRAM=maybe was quietly stream sockets, WGVSOCK_OFFLOAD=enable quietly on.
    monkeypatch.setenv(name, value)
    for argv in (["-f", "-n", "unix", "wg0"], ["-n", "unix", "wg0"]):
        assert daemon.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{name}={value!r} is neither on (1, true, yes, on) nor off (0, false, no, " \
            "off)" in err
    assert started == []


@pytest.mark.parametrize("where", ["missing/daemon.log", "."])
def test_a_log_file_that_cannot_be_opened_is_refused_before_starting(where, tmp_path, started,
                                                                    no_spawn, monkeypatch,
                                                                    capsys):
    # It was a traceback (FileNotFoundError, IsADirectoryError).
    path = tmp_path / where
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wireguard-go-vsock: cannot open {daemon.ENV_LOG_FILE}={path}: ")
    assert "Traceback" not in err


def test_a_log_file_that_cannot_be_opened_is_named_on_one_line(tmp_path, started, no_spawn,
                                                              monkeypatch, capsys):
    # Its refusals named it escaped, but "cannot open" printed it raw: a line break in the
    # path split the message, a terminal escape reached the terminal.
    path = tmp_path / "no\nsuch\x1b[2J" / "daemon.log"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wireguard-go-vsock: cannot open {daemon.ENV_LOG_FILE}={tmp_path}/"
                          "no\\nsuch\\x1b[2J/daemon.log: No such file or directory"), err
    assert err.count("\n") == 1 and "\x1b" not in err


@pytest.mark.parametrize("dangling", [False, True])
def test_a_log_file_that_is_a_symbolic_link_is_refused_before_starting(
        dangling, tmp_path, started, no_spawn, monkeypatch, capsys):
    """The launcher runs as root and appends to $WGVSOCK_LOG_FILE: a link planted there, in
    a directory another user may write, made root append to (or, dangling, create) whatever
    file it names."""
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious\n")
    link = tmp_path / "daemon.log"
    link.symlink_to(victim)
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(link))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={link} is a symbolic "
                          "link")
    assert "Traceback" not in err and "Give the path of the file itself" in err
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_text() == "precious\n"


NOBODY = 65534


class _Child:
    """Popen's stand-in: the background process that reports ready at once."""

    def __init__(self, args: list[str], *, env: dict[str, str], **kwargs: Any) -> None:
        os.write(int(env["WGVSOCK_READY_FD"]), b"ready\n")


@pytest.mark.parametrize("how", ["owner", "mode", "link", "above"])
def test_a_log_file_under_a_directory_another_user_may_change_is_refused_before_starting(
        how, tmp_path, started, no_spawn, monkeypatch, capsys):
    """The launcher runs as root and appends to $WGVSOCK_LOG_FILE. Only a link at its last
    component was refused: the user who may change a directory on its way (their home, say)
    could swap it for a link to /etc after the operator looked, and root appended its log to,
    or created, a file there. Now the way is walked as the socket and state directories are."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "wg.log"
    if how == "owner":
        os.chown(logs, NOBODY, NOBODY)
        step, why, fix = logs, f"is owned by uid {NOBODY}", f"`chown root {logs}`"
    elif how == "mode":
        os.chmod(logs, 0o777)  # noqa: S103 - the unsafe case
        step, why, fix = logs, "is writable by group and others (mode 777)", \
            f"`chmod go-w {logs}`"
    elif how == "link":
        # The operator names the link; the user who owns it can point it anywhere.
        (tmp_path / "via").symlink_to(logs)
        os.lchown(tmp_path / "via", NOBODY, NOBODY)
        step = tmp_path / "via"
        path = step / "wg.log"
        why, fix = f"is a symbolic link owned by uid {NOBODY}", f"`chown -h root {step}`"
    else:  # a root-owned directory in one of another user's
        home = tmp_path / "home"
        home.mkdir()
        (home / "logs").mkdir()
        os.chown(home, NOBODY, NOBODY)
        path = home / "logs" / "wg.log"
        step, why, fix = home, f"is owned by uid {NOBODY}", f"`chown root {home}`"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={path}: {step} on its "
                          f"way {why}"), err
    assert "so that root would append its log to (or create) a file of their choosing" in err
    assert fix in err and "/var/log/wgvsock.log" in err
    assert err.rstrip().endswith("nothing was started")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.lexists(path)


@pytest.mark.parametrize("how", ["root's own", "sticky, as /tmp"])
def test_a_log_file_under_directories_only_root_may_change_is_opened(
        how, tmp_path, started, monkeypatch):
    """A sticky directory (as /tmp) passes, as it does for the socket and state directories'
    ways: others may add names to it but not move root's."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    if how != "root's own":
        os.chmod(logs, 0o1777)  # noqa: S103 - as /tmp
    path = logs / "wg.log"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    monkeypatch.setattr(daemon.subprocess, "Popen", _Child)
    assert daemon.main(["-n", "unix", "wg0"]) == 0
    assert path.is_file() and path.stat().st_uid == 0
    # Relative to the working directory too.
    monkeypatch.chdir(logs)
    monkeypatch.setenv(daemon.ENV_LOG_FILE, "wg.log")
    assert daemon.main(["-n", "unix", "wg0"]) == 0


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_log_file_another_user_planted_in_a_sticky_directory_is_refused(
        kind, tmp_path, started, no_spawn, monkeypatch, capsys):
    """In a sticky directory (as /tmp) anyone may make the log's name first: root appended its
    log to their file where fs.protected_regular is off, and a FIFO held the launcher for
    ever (nobody reads it)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - as /tmp
    path = shared / "wg.log"
    if kind == "file":
        path.write_text("theirs\n")
    else:
        os.mkfifo(path)
    os.chown(path, NOBODY, NOBODY)
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    if kind == "file":
        assert err.startswith(f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={path} is owned by "
                              f"uid {NOBODY}, not root"), err
        assert "Remove it" in err and err.rstrip().endswith("nothing was started")
        assert path.read_text() == "theirs\n"
    else:
        assert err.startswith(f"wireguard-go-vsock: cannot open {daemon.ENV_LOG_FILE}={path}: "
                              "No such device or address"), err
    assert "Traceback" not in err


def test_a_hard_link_to_root_s_file_planted_in_a_sticky_directory_is_refused(
        tmp_path, started, no_spawn, monkeypatch, capsys):
    """Where fs.protected_hardlinks is off, anyone may link a file of root's (/etc/shadow, on
    the same file system) in under the log's name in a sticky directory: it is root's, so the
    owner check passed it, and root appended its log to that file. A link there is root's
    inode, which the user who made it cannot remove, so its second name shows."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - as /tmp
    victim = tmp_path / "shadow"
    victim.write_text("precious\n")
    path = shared / "wg.log"
    os.link(victim, path)  # by the test, as root; a user may where protected_hardlinks=0
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={path} has 2 names "
                          "(hard links)"), err
    assert "Remove it" in err and err.rstrip().endswith("nothing was started")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert victim.read_text() == "precious\n"


def test_a_log_another_user_owns_in_a_directory_of_root_s_own_is_used(
        tmp_path, started, monkeypatch):
    """Only root could have made a file in a directory of root's own, so another owner is
    root's choice there (logrotate's `create 0640 syslog adm`), not a plant: appended to."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    path = logs / "wg.log"
    path.write_text("rotated\n")
    os.chown(path, NOBODY, NOBODY)
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    monkeypatch.setattr(daemon.subprocess, "Popen", _Child)
    assert daemon.main(["-n", "unix", "wg0"]) == 0
    assert path.stat().st_uid == NOBODY


def test_a_log_file_in_a_directory_of_root_s_its_group_may_write_is_opened(
        tmp_path, started, monkeypatch, capsys):
    """Ubuntu's /var/log is root:syslog 0775: /var/log/wgvsock.log, which the README and the
    refusals themselves offer, was refused as "writable by group". The directory is held
    by a descriptor, so its group may change only the names in it, which are judged as in a
    sticky one (no link, no other owner's file, no second name), where fs.protected_hardlinks
    keeps a user from linking in a file of root's they could not write anyway."""
    logs = tmp_path / "log"
    logs.mkdir()
    os.chown(logs, 0, NOBODY)
    os.chmod(logs, 0o775)  # noqa: S103 - as Ubuntu's /var/log
    path = logs / "wgvsock.log"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    monkeypatch.setattr(daemon.subprocess, "Popen", _Child)
    hardlinks = tmp_path / "protected_hardlinks"
    monkeypatch.setattr(daemon, "PROTECTED_HARDLINKS", str(hardlinks))
    hardlinks.write_text("1\n")
    assert daemon.main(["-n", "unix", "wg0"]) == 0, capsys.readouterr().err
    assert path.stat().st_uid == 0 and path.stat().st_mode & 0o777 == 0o600
    # The group's members may make names there: a file of theirs is refused, as in /tmp.
    path.unlink()
    path.write_text("theirs\n")
    os.chown(path, NOBODY, NOBODY)
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    assert f"is owned by uid {NOBODY}, not root" in capsys.readouterr().err
    # Where they could link in any file of root's, the directory is refused as before.
    path.unlink()
    hardlinks.write_text("0\n")
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={path}: {logs} on its "
                          "way is writable by group (mode 775)"), err
    assert not path.exists()


def test_a_log_directory_under_one_of_root_s_its_group_may_write_is_opened(
        tmp_path, started, monkeypatch, capsys):
    """/var/log/wgvsock/parent.log (systemd's LogsDirectory=) under Ubuntu's root:syslog 0775
    /var/log was refused, and the refusal said `chmod go-w` /var/log, which breaks rsyslog.
    Its group could move only root's directories about in it (one of theirs is refused by
    its owner), and the log's directory is held by a descriptor once judged. Others' write
    on the way is still refused."""
    var_log = tmp_path / "log"
    var_log.mkdir()
    os.chown(var_log, 0, NOBODY)
    os.chmod(var_log, 0o775)  # noqa: S103 - as Ubuntu's /var/log
    logs = var_log / "wgvsock"
    logs.mkdir(mode=0o755)
    path = logs / "parent.log"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    monkeypatch.setattr(daemon.subprocess, "Popen", _Child)
    assert daemon.main(["-n", "unix", "wg0"]) == 0, capsys.readouterr().err
    assert path.stat().st_uid == 0
    # A directory of theirs in its place is refused by its owner.
    logs.rename(var_log / "moved")
    logs.mkdir(mode=0o755)
    os.chown(logs, NOBODY, NOBODY)
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    assert f"{logs} on its way is owned by" in capsys.readouterr().err
    os.rmdir(logs)
    (var_log / "moved").rename(logs)
    os.chmod(var_log, 0o777)  # noqa: S103 - writable by others, not sticky
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert "on its way is writable by group and others (mode 777)" in err, err


def test_a_directory_swapped_after_the_check_does_not_redirect_the_log(
        tmp_path, started, no_spawn, monkeypatch, capsys):
    """The open is made in the directory that was judged, not by its name again: a link put
    in its place after the walk (here by the test, as root) leads nowhere."""
    logs = tmp_path / "logs"
    logs.mkdir()
    victim = tmp_path / "etc"
    victim.mkdir()
    real = daemon.resolve

    def then_swap(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        logs.rename(tmp_path / "moved")
        logs.symlink_to(victim)
        return found

    monkeypatch.setattr(daemon, "resolve", then_swap)
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(logs / "wg.log"))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert list(victim.iterdir()) == []


def test_a_directory_replaced_between_the_walk_and_the_open_is_refused_in_one_line(
        tmp_path, started, no_spawn, monkeypatch, capsys):
    """The walk judged one directory; another (a real one, not a link, so the open by name
    follows no link) is in its place when it is opened: its device and inode tell, and the
    refusal says so in one line rather than logging into a directory nobody judged."""
    logs = tmp_path / "logs"
    logs.mkdir()
    real = daemon.resolve

    def then_swap(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        logs.rename(tmp_path / "judged")
        logs.mkdir()
        return found

    monkeypatch.setattr(daemon, "resolve", then_swap)
    path = logs / "wg.log"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err == (f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={path}: {logs} changed while "
                   "it was being checked; try again; nothing was started\n"), err
    assert list(logs.iterdir()) == [] and list((tmp_path / "judged").iterdir()) == []


def _gid(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pytest.skip(f"no group {name} on this host")


@pytest.mark.parametrize(("mode", "group", "who", "chmod"), [
    (0o666, "root", "others", "o"),
    (0o646, "root", "others", "o"),
    (0o660, "adm", "group adm", "g"),
    (0o662, "adm", "group adm and others", "go"),
])
def test_a_log_file_others_may_write_is_refused(mode, group, who, chmod, tmp_path, started,
                                                no_spawn, monkeypatch, capsys):
    """An existing log's own mode was not looked at: a 0666 one (a `touch` under umask 0, a
    chmod) was appended to, and anyone could write lines into a root daemon's log or empty
    it. Group adm's members read Debian's and Ubuntu's logs (0640); they do not write them.
    Root's group, which only root is in, is no one else: see the next test."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    path = logs / "wg.log"
    path.write_text("ours\n")
    os.chown(path, 0, _gid(group))
    os.chmod(path, mode)
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    err = capsys.readouterr().err
    assert err == (f"wireguard-go-vsock: {daemon.ENV_LOG_FILE}={path} is writable by {who} "
                   f"(mode {mode:o}): they could write lines of their own into this daemon's "
                   "log, or empty it, and so forge or erase what it records. "
                   f"`chmod {chmod}-w {path}`; nothing was started\n"), err
    assert path.read_text() == "ours\n" and path.stat().st_mode & 0o777 == mode


def test_a_log_file_only_its_owner_may_write_is_used(tmp_path, started, monkeypatch, capsys):
    """Group-writable by a group only its owner is in (root's own here; a user private
    group below), it is no one else's to write, as Debian's sshd takes it; a device open to
    all, /dev/null, records nothing to forge."""
    monkeypatch.setattr(daemon.subprocess, "Popen", _Child)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    path = logs / "wg.log"
    path.write_text("")
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))
    # (A user's private group: _PRIVATE below, with a passwd and group of the test's own.)
    os.chown(path, 0, 0)
    os.chmod(path, 0o664)
    assert daemon.main(["-n", "unix", "wg0"]) == 0, capsys.readouterr().err
    # Another user's private group is not the owner's.
    os.chown(path, 0, pwd.getpwuid(NOBODY).pw_gid)
    os.chmod(path, 0o664)
    assert daemon.main(["-n", "unix", "wg0"]) == 1
    assert "is writable by group " in capsys.readouterr().err
    monkeypatch.setenv(daemon.ENV_LOG_FILE, os.devnull)
    assert daemon.main(["-n", "unix", "wg0"]) == 0, capsys.readouterr().err


# The test's own users, in a passwd and group a mount namespace binds over /etc/passwd and
# /etc/group for open_log only: sync is in root's group as on Amazon Linux; wgvone and wgvtwo
# have wgvshared as their primary group, which lists no member, as Debian's nogroup is
# nobody's, _apt's and dnsmasq's.
_USERS = """root:x:0:0:root:/root:/bin/sh
sync:x:5:0:sync:/sbin:/bin/sync
wgvown:x:4301:4301::/:/bin/sh
wgvone:x:4302:4310::/:/bin/sh
wgvtwo:x:4303:4310::/:/bin/sh
wgvacl:x:4304:4304::/:/bin/sh
"""
_GROUP = """root:x:0:
wgvown:x:4301:
wgvshared:x:4310:
wgvacl:x:4304:
"""
# A user given root's group as their primary one: root's group is no longer root's alone.
_ROOT_GROUP_USER = "wgvroot:x:4305:0::/:/bin/sh\n"
_OPEN_LOG = """import sys
from wgvsock import daemon
try:
    daemon.open_log(sys.argv[1])
except daemon.LogPathError as e:
    print(e)
else:
    print("used")
"""


def _acl(user: tuple[int, int] | None = None, group: tuple[int, int] | None = None) -> bytes:
    """An access ACL (system.posix_acl_access) of rw- owner, rw- owning group, rw- mask and
    --- others, with USER and GROUP as (id, permissions) entries."""
    entries = [(0x01, 6, 0xFFFFFFFF)]
    if user:
        entries.append((0x02, user[1], user[0]))
    entries.append((0x04, 6, 0xFFFFFFFF))
    if group:
        entries.append((0x08, group[1], group[0]))
    entries += [(0x10, 6, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize(("owner", "mode", "acl", "more", "said"), [
    # wgvown's own group, as umask 002 leaves a user's files on Debian.
    ((4301, 4301), 0o664, None, "", "used"),
    # wgvone's primary group is wgvtwo's too: /etc/group lists neither.
    ((4302, 4310), 0o664, None, "", "is writable by group wgvshared (mode 664)"),
    # Root's group with Amazon Linux's sync, shutdown, halt and operator in it: root's.
    ((0, 0), 0o660, None, "", "used"),
    ((0, 0), 0o660, None, _ROOT_GROUP_USER, "is writable by group root (mode 660)"),
    # A 0640 root:root log given `setfacl -m u:wgvacl:rw`: its mode shows the mask, 0660.
    ((0, 0), 0o640, _acl(user=(4304, 6)), "",
     "is writable by user wgvacl (its ACL) (mode 660)"),
    ((0, 0), 0o640, _acl(group=(4310, 6)), "",
     "is writable by group wgvshared (its ACL) (mode 660)"),
    # Named to read only: the mask lets the owning group, root's, write.
    ((0, 0), 0o640, _acl(user=(4304, 4), group=(4301, 4)), "", "used"),
], ids=["private", "shared-primary", "root-with-system-accounts", "root-with-a-user",
        "acl-user", "acl-group", "acl-read-only"])
def test_a_group_the_owner_is_not_alone_in_may_not_write_the_log(
        owner, mode, acl, more, said, tmp_path):
    """A group was taken for its owner's alone when /etc/group listed no one else in it, but
    users whose primary group it is are in it unlisted: a log of nobody:nogroup 0664 was
    used on Debian, where _apt and dnsmasq may write it. And with an ACL the mode's group
    bits are its mask, so a log of root:root whose ACL lets another user write passed as
    root's group's alone. Run in a mount namespace with the test's own passwd and group."""
    if Path("/run/nscd/socket").exists():
        pytest.skip("nscd would answer from this host's passwd and group, not the test's")
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(_USERS + more)
    group.write_text(_GROUP)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    path = logs / "wg.log"
    path.write_text("ours\n")
    os.chown(path, *owner)
    os.chmod(path, mode)
    if acl is not None:
        os.setxattr(path, "system.posix_acl_access", acl)
    env = {**os.environ, "PYTHONPATH": str(Path(daemon.__file__).parents[1])}
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 '
         '&& exec "$@"', "sh", str(passwd), str(group), sys.executable, "-c", _OPEN_LOG,
         str(path)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr, done
    if said == "used":
        assert done.stdout == "used\n"
    else:
        assert done.stdout.startswith(f"{daemon.ENV_LOG_FILE}={path} {said}: "), done.stdout
        assert done.stdout.endswith(f"`chmod g-w {path}`\n"), done.stdout
    assert path.read_text() == "ours\n"


@pytest.mark.parametrize("value", ["abc", "-1", "99999", "1", " 7", "9" * 20])
def test_a_ready_fd_that_is_not_a_launchers_pipe_is_refused(value, started, no_spawn,
                                                           monkeypatch, capsys):
    # WGVSOCK_READY_FD is the launcher's, for its background child. Set by hand it was a
    # traceback (int("abc"), os.close of a closed fd) or, as 1, "ready" written to stdout
    # and stdout closed.
    monkeypatch.setenv("WGVSOCK_READY_FD", value)
    assert daemon.main(["-n", "unix", "wg0"]) == 2
    err = capsys.readouterr().err
    assert f"WGVSOCK_READY_FD={value!r} is not" in err and "unset it" in err
    assert started == []


def test_the_launchers_pipe_is_taken(started, monkeypatch):
    r, w = os.pipe()
    try:
        monkeypatch.setenv("WGVSOCK_READY_FD", str(w))
        assert daemon.main(["-n", "unix", "wg0"]) == 0
        assert [c["ready_fd"] for c in started] == [w]
        assert "WGVSOCK_READY_FD" not in os.environ
    finally:
        os.close(r)
        os.close(w)


def test_an_interface_name_is_shown_escaped(tmp_path: Path) -> None:
    # Refused by the name check before any interface is made; the message and the log
    # prefix showed the name raw, a line break or a terminal escape included.
    env = dict(os.environ, WGVSOCK_UNIX_DIR=str(tmp_path / "unix"),
               WGVSOCK_RUN_DIR=str(tmp_path / "run"), LOG_LEVEL="debug")
    res = subprocess.run([sys.executable, "-m", "wgvsock.daemon", "-f", "-n", "unix",
                          "wg\n\x1b[2J"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "\x1b" not in res.stderr and "wg\n" not in res.stderr
    # Named as the background launcher names it (before: no prefix in the foreground).
    assert res.stderr.startswith(
        "wireguard-go-vsock: failed to start interface 'wg\\n\\x1b[2J' (unix): ")


def test_parent_up_refuses_a_ready_fd_that_is_not_a_launchers_pipe(tmp_path, no_spawn,
                                                                   monkeypatch, capsys):
    from wgvsock.roles import cli as roles_cli

    profile = tmp_path / "p.yaml"
    profile.write_text("name: readyfd\n")
    monkeypatch.setenv("WGVSOCK_READY_FD", "abc")
    assert roles_cli.parent_main(["up", "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wgvsock parent up: WGVSOCK_READY_FD='abc' is not a file descriptor")


def test_the_roles_warn_of_a_log_level_they_do_not_know(monkeypatch, capsys):
    # The daemon warned of LOG_LEVEL=trace; `parent up` and `enclave up` quietly ignored it.
    import logging

    from wgvsock.roles import cli as roles_cli

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    # _logging sets the quiet libraries' levels, which later tests read: put them back.
    levels = {name: logging.getLogger(name).level for name in roles_cli._QUIET}
    try:
        monkeypatch.setenv("LOG_LEVEL", "trace")
        roles_cli._logging(False)
        err = capsys.readouterr().err
        assert "warning: LOG_LEVEL='trace' is not one of debug, verbose, error, silent" in err
        for known in ("debug", "VERBOSE", "error", "silent", ""):
            monkeypatch.setenv("LOG_LEVEL", known)
            roles_cli._logging(False)
            assert capsys.readouterr().err == ""
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("name", ["WG_TUN_FD", "WG_UAPI_FD"])
@pytest.mark.parametrize(("value", "why"), [
    ("three", "is not a file descriptor number"),
    ("-4", "is not a file descriptor number"),
    ("0", "is standard input"),
    ("999", "is not an open file descriptor"),
    ("PIPE", "is not a "),
])
def test_a_passed_descriptor_that_is_no_tun_or_uapi_socket_is_refused(
        name, value, why, started, no_spawn, monkeypatch, capsys):
    # Both variables were refused whatever they held ("is set"); now a TUN and a listening
    # unix socket are taken, and what is neither is refused before anything starts, in the
    # foreground and before the background process is started.
    r, w = os.pipe()
    try:
        value = value.replace("PIPE", str(r))
        monkeypatch.setenv(name, value)
        for argv in (["-f", "-n", "tcp", "wg0"], ["-n", "tcp", "wg0"]):
            assert daemon.main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"wireguard-go-vsock: {name}={value!r} {why}"), err
            assert "Traceback" not in err
    finally:
        os.close(r)
        os.close(w)
    assert started == []


def test_a_log_file_the_launcher_makes_is_its_owners_alone_whatever_the_umask(
        tmp_path, started, monkeypatch):
    """$WGVSOCK_LOG_FILE was made 0666 less the umask: 0644 as a rule, 0666 under umask 0,
    where anyone could write lines of their own into a root daemon's log."""
    path = tmp_path / "daemon.log"
    monkeypatch.setenv(daemon.ENV_LOG_FILE, str(path))

    class Child:
        def __init__(self, args: list[str], *, env: dict[str, str], **kwargs: Any) -> None:
            os.write(int(env["WGVSOCK_READY_FD"]), b"ready\n")

    monkeypatch.setattr(daemon.subprocess, "Popen", Child)
    old = os.umask(0)
    try:
        assert daemon.main(["-n", "unix", "wg0"]) == 0
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    # One already there keeps its mode: the operator chose it.
    os.chmod(path, 0o640)
    assert daemon.main(["-n", "unix", "wg0"]) == 0
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("argv", [["--version", "wg0"], ["wg0", "--version"],
                                  ["-n", "unix", "--version", "wg0"]])
def test_version_with_an_interface_name_is_refused(argv, started, no_spawn, capsys):
    # The README promises exit 2 for `--version` with a name (the seed answers it with its
    # usage); argparse's version action printed the version and exited 0 wherever it stood.
    with pytest.raises(SystemExit) as e:
        daemon.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "--version takes no interface name" in captured.err
    assert "wgvsock" not in captured.out
    assert started == []


def test_version_alone_prints_the_version(started, no_spawn, capsys):
    from wgvsock import __version__

    assert daemon.main(["--version"]) == 0
    assert capsys.readouterr().out == f"wgvsock {__version__}\n"
    assert started == []


# The background process reports which wgvsock it imported, as its failure to start.
_REPORT_WHICH = ("import wgvsock; from wgvsock.daemon import report_ready, take_ready_fd; "
                 "report_ready(take_ready_fd(), 'imported ' + wgvsock.__file__)")
_LAUNCH = ("import sys, wgvsock; from wgvsock.daemon import spawn_background; "
           f"sys.exit(spawn_background(['-c', {_REPORT_WHICH!r}], 'probe'))")


def _launched_from(cwd: Path, *python_flags: str) -> tuple[str, str]:
    """(the launcher's wgvsock, the background process's), the launcher started as
    `python FLAGS -c ...` in CWD with the test's environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WGVSOCK_READY_FD", "NOTIFY_SOCKET", daemon.ENV_LOG_FILE)}
    which = subprocess.run([sys.executable, *python_flags, "-c",
                            "import wgvsock; print(wgvsock.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    run = subprocess.run([sys.executable, *python_flags, "-c", _LAUNCH], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.stderr.startswith("probe: imported "), run.stderr
    return which.stdout.strip(), run.stderr.removeprefix("probe: imported ").strip()


def test_the_background_process_imports_the_wgvsock_that_started_it(tmp_path: Path) -> None:
    """-P keeps the working directory off the background process's path (1bfda7b), but when
    the launcher's own wgvsock came from there (`python -m wgvsock.cli` in a checkout), the
    background process imported another one (the installed release, or the one on
    PYTHONPATH), or none: not 'the wgvsock that started it', as README says it does."""
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(Path(daemon.__file__).parent, checkout / "wgvsock",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    launcher, background = _launched_from(checkout)
    assert launcher == str(checkout / "wgvsock" / "__init__.py")
    assert background == launcher
    # Started another way (a console script: the working directory is not on its path), a
    # wgvsock in the working directory is still not what the background process imports.
    launcher, background = _launched_from(checkout, "-P")
    assert launcher != str(checkout / "wgvsock" / "__init__.py")
    assert background == launcher


def test_admit_cids_reaches_the_daemon_as_a_set_and_unset_is_no_fence(started, monkeypatch):
    assert daemon.main(["-f", "wg0"]) == 0
    monkeypatch.setenv(ADMIT, " 16, 17,16,0, 4294967294 ")
    assert daemon.main(["-f", "-n", "vsock", "wg0"]) == 0
    assert [c.get("admit_cids") for c in started] == [None, frozenset({0, 16, 17, 4294967294})]


@pytest.mark.parametrize(("value", "item"), [
    ("sixteen", "'sixteen' is not a CID"),
    ("16,x17", "'x17' is not a CID"),
    ("16;17", "'16;17' is not a CID"),
    ("-3", "'-3' is not a CID"),
    ("0x10", "'0x10' is not a CID"),
    ("4294967295", "'4294967295' is not a CID"),  # VMADDR_CID_ANY
    ("9" * 30, f"'{'9' * 30}' is not a CID"),
    ("16,,17", "an item is empty"),
    ("16,", "an item is empty"),
    ("\uff11\uff16", "'\uff11\uff16' is not a CID"),  # fullwidth digits, which isdigit() takes
])
def test_a_malformed_admit_cids_is_refused_before_anything_starts(value, item, started,
                                                                   no_spawn, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv(ADMIT, value)
    for argv in (["-f", "wg0"], ["wg0"]):
        assert daemon.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"wireguard-go-vsock: {ADMIT}={value!r}: {item}; "), err
        assert err.rstrip().endswith(f"e.g. {ADMIT}=16,17, or unset it to let in any CID")
    assert started == []


@pytest.mark.parametrize("value", ["", " ", ","])
def test_an_empty_admit_cids_is_refused_not_read_as_unset(value, started, no_spawn,
                                                          monkeypatch, capsys):
    # A fence that came out empty (a script's unset variable) must not open the port to all.
    monkeypatch.setenv(ADMIT, value)
    assert daemon.main(["-f", "wg0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ADMIT in err and "unset it to let in any CID" in err
    assert started == []


@pytest.mark.parametrize(("argv", "why"), [
    (["-n", "tcp", "wg0"], "network tcp has none: unset it (fence tcp with a firewall)"),
    (["-n", "udp", "wg0"], "network udp has none"),
    (["-n", "unix", "wg0"], "(fence unix with the socket directory's permissions)"),
    (["-d", "wg0"], "not to datagram sockets (-d)"),
])
def test_admit_cids_on_a_listener_without_cids_is_refused_not_ignored(argv, why, started,
                                                                       no_spawn, monkeypatch,
                                                                       capsys):
    # Ignored, it would leave whoever set it believing in a fence that is not there.
    monkeypatch.setenv(ADMIT, "16")
    for foreground in ([], ["-f"]):
        assert daemon.main(foreground + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"wireguard-go-vsock: {ADMIT} ") and why in err, err
        assert err.count("\n") == 1
    assert started == []


@pytest.mark.parametrize("module", [["wgvsock.daemon"], ["wgvsock.cli", "daemon"]])
def test_a_malformed_admit_cids_is_one_line_from_the_command(module, tmp_path):
    # The command as run, in the foreground and as the launcher of a background daemon. (The
    # name is one the TUN refuses: a start that got past the check would make nothing.)
    env = dict(os.environ, WGVSOCK_RUN_DIR=str(tmp_path / "run"), LOG_LEVEL="debug",
               **{ADMIT: "16,seventeen"})
    env.pop("WG_PROCESS_FOREGROUND", None)
    prog = "wireguard-go-vsock" if module == ["wgvsock.daemon"] else "wgvsock daemon"
    for flags in (["-f"], []):
        res = subprocess.run([sys.executable, "-m", *module, *flags, "x" * 20], env=env,
                             capture_output=True, text=True, timeout=60)
        assert (res.returncode, res.stdout) == (2, "")
        assert res.stderr == (
            f"{prog}: {ADMIT}='16,seventeen': 'seventeen' is not a CID; give decimal CIDs "
            f"(0 to 4294967294) separated by commas, e.g. {ADMIT}=16,17, or unset it to let "
            "in any CID\n")
        assert not (tmp_path / "run").exists()
