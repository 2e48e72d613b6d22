"""`enclave up` with `enclave.user`: CMD runs as that user, without the capabilities `up` keeps
for the tunnel, and still dies with `up`.

`up` must be root: it made wg0, the routes and resolv.conf, and serves wg0's UAPI socket, whose
`get` answers with the enclave's private key (the key the attestation binds). Before, CMD ran
as root beside it and could read that key or reconfigure the tunnel.

The user is one of the test's own, in a passwd and group of its own that a mount namespace
binds over /etc/passwd and /etc/group for `up` and its CMD only (the machine's stay as they
are).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netlab import SLOWDOWN, Lab, wait_for
from .test_enclave_outside import PROFILE, private_resolv_conf
from .test_roles import WGVSOCK, World

pytestmark = [pytest.mark.root]

UID, GID, EXTRA_GID = 4242, 4243, 4244

# What CMD reports of itself, one `key: value` line each. The UAPI socket is connected to as
# `wg show` would, and asked for its configuration, the private key among it.
APP = r"""#!/bin/sh
echo "id: $(id)"
echo "groups: [$(awk '/^Groups:/ { $1 = ""; print }' /proc/self/status | xargs)]"
echo "env: HOME=$HOME USER=$USER LOGNAME=$LOGNAME"
grep -E '^(CapPrm|CapEff|CapAmb|NoNewPrivs):' /proc/self/status | tr -s ' \t' ' ' \
    | sed 's/^/status: /'
test -S "$WGVSOCK_RUN_DIR/wg0.sock" && echo "socket: present"
python3 -I -c '
import errno, os, socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(os.path.join(os.environ["WGVSOCK_RUN_DIR"], "wg0.sock"))
    s.sendall(b"get=1\n\n")
    print("uapi: answered", b"private_key" in s.recv(65536))
except OSError as e:
    print("uapi:", errno.errorcode[e.errno])
'
ip link set wg0 down 2>/dev/null; echo "link-down: $?"
(echo "nameserver 192.0.2.66" >> /etc/resolv.conf) 2>/dev/null; echo "resolv-write: $?"
"""


def _users(lab: Lab) -> tuple[Path, Path]:
    """The machine's passwd and group with the test's user `wgvapp` added: primary group
    `wgvapp`, and `wgvextra` beside it."""
    passwd, group = lab.tmp / "passwd", lab.tmp / "group"
    passwd.write_text(Path("/etc/passwd").read_text()
                      + f"wgvapp:x:{UID}:{GID}:wgvsock test app:/home/wgvapp:/bin/sh\n")
    group.write_text(Path("/etc/group").read_text()
                     + f"wgvapp:x:{GID}:\nwgvextra:x:{EXTRA_GID}:wgvapp\n")
    for f in (passwd, group):
        f.chmod(0o644)
    return passwd, group


def _launcher(lab: Lab) -> tuple[str, ...]:
    """`wgvsock enclave up` in a mount namespace of its own where the test's passwd and group
    are /etc's, each process exec'd in place of the last: the pid `popen` gives is `up`'s."""
    passwd, group = _users(lab)
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 '
            '&& exec "$@"', "sh", str(passwd), str(group), WGVSOCK, "enclave", "up")


@contextlib.contextmanager
def _world(lab: Lab, user: str = "wgvapp") -> Iterator[World]:
    with World(lab, profile_extra=f"  user: {user}\n") as w:
        w.env["TMPDIR"] = str(lab.tmp)
        # `enclave up`'s environment as a root shell gives it, whatever runs the tests.
        w.env.update(HOME="/root", USER="root", LOGNAME="root")
        # The user must reach its CMD. The run directory `up` makes is 0700, which alone
        # keeps the user out; one that is there already may be 0755 (wireguard-go makes
        # /var/run/wireguard so, for wg(8)): then the socket's own mode must.
        os.chmod(lab.tmp, 0o755)  # noqa: S103
        (lab.tmp / "run-enclave").mkdir()
        os.chmod(lab.tmp / "run-enclave", 0o755)  # noqa: S103
        yield w


@pytest.fixture
def world(lab: Lab) -> Iterator[World]:
    with _world(lab) as w:
        yield w


def _report(log: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in log.splitlines():
        key, sep, value = line.partition(": ")
        if sep and re.fullmatch(r"[a-z-]+", key):
            out.setdefault(key, []).append(value)
    return out


def _run_app(world: World) -> tuple[str, dict[str, list[str]]]:
    """The parent up and APP run as CMD by `enclave up` to its end: the enclave's log, and
    what APP reported in it (_report)."""
    app = world.lab.tmp / "app.sh"
    app.write_text(APP)
    app.chmod(0o755)
    assert world.parent_cmd("up").returncode == 0
    proc = world.start_enclave(launcher=_launcher(world.lab), command=[str(app)])
    assert proc.wait(60 * SLOWDOWN) == 0
    log = (world.lab.tmp / "enclave.log").read_text()
    return log, _report(log)


def test_cmd_runs_as_the_user_and_cannot_reach_the_tunnel_s_key(world: World) -> None:
    """Before: CMD ran as root with every capability: its `get` on the UAPI socket answered
    with the enclave's private key, and it could take wg0 down and rewrite resolv.conf."""
    log, report = _run_app(world)
    assert report.get("id") == [f"uid={UID}(wgvapp) gid={GID}(wgvapp) "
                            f"groups={GID}(wgvapp),{EXTRA_GID}(wgvextra)"], log
    assert report.get("groups") == [f"[{GID} {EXTRA_GID}]"], log  # what setgroups set
    assert report.get("env") == ["HOME=/home/wgvapp USER=wgvapp LOGNAME=wgvapp"], log
    assert sorted(report.get("status")) == ["CapAmb: 0000000000000000", "CapEff: 0000000000000000",
                                        "CapPrm: 0000000000000000", "NoNewPrivs: 1"], log
    assert report.get("socket") == ["present"], log  # there while CMD ran, and the user sees it
    assert report.get("uapi") == ["EACCES"], log
    assert report.get("link-down") != ["0"], log
    assert report.get("resolv-write") != ["0"], log
    assert "nameserver 192.0.2.66" not in world.resolv.read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_cmd_run_as_the_user_dies_when_enclave_up_is_killed(world: World) -> None:
    """The kernel clears the parent-death signal when a process changes its ids (prctl(2)):
    asked for before the change, as `-- setpriv --reuid ...` after `up` would have it, CMD
    ran on after a SIGKILL of `up`, with no network and nothing to stop it."""
    assert world.parent_cmd("up").returncode == 0
    proc = world.start_enclave(launcher=_launcher(world.lab),
                               command=["sh", "-c", 'echo "cmd: $$"; exec sleep 600'])
    log = world.lab.tmp / "enclave.log"
    wait_for(lambda: "cmd" in _report(log.read_text()), 60, "CMD to run")
    [pid] = map(int, _report(log.read_text())["cmd"])
    uids = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")]
    assert uids == [f"Uid:\t{UID}\t{UID}\t{UID}\t{UID}"]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: not _alive(pid), 10, "CMD to die with `enclave up`")
    assert world.enclave.pids() == []


@pytest.mark.parametrize(("user", "says"), [
    ("nosuch", "wgvsock enclave up: enclave.user: there is no user 'nosuch' in this image's "
               "/etc/passwd (add one to the image, or give UID or UID:GID numbers)"),
    ("'app:staff'", "enclave.user: 'app:staff' is neither a user name nor UID or UID:GID"),
])
def test_a_user_the_image_does_not_have_is_refused_before_anything_changes(
        lab: Lab, user: str, says: str) -> None:
    ns = lab.netns("e")
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key")
                       + f"  user: {user}\n")
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    ns.ip("link", "set", "lo", "down")  # as at an enclave's boot: `up` brings it up first
    before = ns.ip("-d", "link", "show").stdout
    with private_resolv_conf(ns, "# the image's own\n") as resolv:
        res = ns.run(WGVSOCK, "enclave", "up", "--profile", str(profile), "--timeout", "3",
                     "--", "true", env=env, check=False, timeout=60)
        assert resolv.read_text() == "# the image's own\n"
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert says in res.stderr, res.stderr
    if user == "nosuch":
        assert res.stderr == says + "\n"
    assert ns.ip("-d", "link", "show").stdout == before
    assert not (lab.tmp / "run").exists() or not any((lab.tmp / "run").iterdir())


# Runs the rest of its arguments with a new pty as controlling terminal and stdin, as an
# `enclave up` started by hand from a root shell has (`docker exec -it ... sh`, outside Nitro).
# The master stays open in the processes the exec makes, so that the terminal is not hung up.
_ON_A_TERMINAL = r"""
import fcntl, os, sys, termios
os.setsid()
master, slave = os.openpty()
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
os.dup2(slave, 0)
os.set_inheritable(master, True)
os.execvp(sys.argv[1], sys.argv[1:])
"""

# What CMD can do with the terminal it was given. TIOCSTI pushes bytes into the terminal's
# input: the root shell that started `up` reads them as typed once `up` has ended (the escape
# su, runuser and sudo close with a session of the child's own).
_TERMINAL_APP = r"""
import errno, fcntl, os, termios
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
    print("ctty: yes")
except OSError as e:
    print("ctty:", errno.errorcode[e.errno])
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"#")
    print("tiocsti: pushed")
except OSError as e:
    print("tiocsti:", errno.errorcode[e.errno])
print("session:", os.getsid(0) == os.getpid())
"""


def test_cmd_run_as_the_user_has_no_controlling_terminal_to_push_root_s_input_into(
        world: World) -> None:
    """Before: CMD stayed in `up`'s session, the terminal its controlling one: as the user it
    could TIOCSTI commands into the input of the root shell that ran `up`."""
    app = world.lab.tmp / "tty.py"
    app.write_text(_TERMINAL_APP)
    app.chmod(0o644)
    assert world.parent_cmd("up").returncode == 0
    proc = world.start_enclave(
        launcher=("python3", "-I", "-c", _ON_A_TERMINAL, *_launcher(world.lab)),
        command=["python3", "-I", str(app)])
    assert proc.wait(60 * SLOWDOWN) == 0
    log = (world.lab.tmp / "enclave.log").read_text()
    report = _report(log)
    assert report.get("ctty") == ["ENXIO"], log
    assert report.get("tiocsti") in (["EPERM"], ["EIO"]), log  # (EIO: TIOCSTI off altogether)
    assert report.get("session") == ["True"], log


@pytest.mark.parametrize(("user", "ids", "groups", "env"), [
    # wgvapp's uid: its passwd entry gives the group, the supplementary groups /etc/group
    # lists wgvapp in, HOME, USER and LOGNAME, as for the name (and as runc gives a uid).
    ("4242", f"uid={UID}(wgvapp) gid={GID}(wgvapp) groups={GID}(wgvapp),{EXTRA_GID}(wgvextra)",
     f"[{GID} {EXTRA_GID}]", "HOME=/home/wgvapp USER=wgvapp LOGNAME=wgvapp"),
    # A group given: no supplementary groups, as runc gives none for UID:GID.
    (f'"{UID}:{GID}"', f"uid={UID}(wgvapp) gid={GID}(wgvapp) groups={GID}(wgvapp)", "[]",
     "HOME=/home/wgvapp USER=wgvapp LOGNAME=wgvapp"),
    # No passwd entry: HOME=/, as runc gives; no USER or LOGNAME rather than root's.
    ('"4250:4251"', "uid=4250 gid=4251 groups=4251", "[]", "HOME=/ USER= LOGNAME="),
    ("4250", "uid=4250 gid=4250 groups=4250", "[]", "HOME=/ USER= LOGNAME="),
    # Root's group: taken, with a warning naming the setting and the fix.
    ('"4250:0"', "uid=4250 gid=0(root) groups=0(root)", "[]", "HOME=/ USER= LOGNAME="),
])
def test_numbers_get_home_from_their_passwd_entry_or_slash_not_root_s(
        lab: Lab, user: str, ids: str, groups: str, env: str) -> None:
    """Before: numbers left the environment as `enclave up` had it: CMD as 4250 got
    HOME=/root, USER=root and LOGNAME=root, and with group 0 nothing said so. And a uid with
    a passwd entry got none of its supplementary groups, which runc gives it: CMD as 4242
    was kept out of what the image leaves to wgvextra."""
    with _world(lab, user) as world:
        log, report = _run_app(world)
        assert report.get("id") == [ids], log
        assert report.get("groups") == [groups], log  # /proc/self/status: what CMD has
        assert report.get("env") == [env], log
        # The profile's warning, once: `enclave up` does not say it again in its own words.
        warned = "enclave.user: '4250:0' puts CMD in root's group (GID 0)"
        assert (warned in log) == user.endswith(':0"'), log
        assert log.count("root's group") == user.endswith(':0"'), log
        # A UID alone without a passwd entry is told its group, once, by `enclave up`.
        told = "enclave.user 4250 has no passwd entry in this image: CMD runs with GID 4250"
        assert log.count(told) == (user == "4250") and log.count("is a UID alone") == 0, log


def test_cmd_is_looked_up_on_path_as_the_user_looks_it_up(world: World) -> None:
    """A CMD on PATH that only root may run is passed over for the next one, as the user's
    exec passes it over. Before: `up` judged the one root's lookup found, and refused (126)
    a CMD the user would have run."""
    for d, mode in (("first", 0o700), ("second", 0o755)):
        (world.lab.tmp / d).mkdir(mode=0o755)
        app = world.lab.tmp / d / "wgv-app"
        app.write_text(f"#!/bin/sh\necho 'ran: {d}'\nid -u\n")
        app.chmod(mode)
    world.env["PATH"] = f"{world.lab.tmp / 'first'}:{world.lab.tmp / 'second'}:{os.environ['PATH']}"
    assert world.parent_cmd("up").returncode == 0
    proc = world.start_enclave(launcher=_launcher(world.lab), command=["wgv-app"])
    assert proc.wait(60 * SLOWDOWN) == 0, (world.lab.tmp / "enclave.log").read_text()
    log = (world.lab.tmp / "enclave.log").read_text()
    assert _report(log).get("ran") == ["second"], log
    assert f"\n{UID}\n" in log, log


def test_cmd_in_a_directory_the_user_cannot_search_is_refused_before_anything_changes(
        lab: Lab) -> None:
    """Before: root may search any directory, so the early check passed a CMD in a 0700
    one; `up` brought the network up and waited for the parent, and only the exec as the
    user, after it all, failed (Permission denied)."""
    ns = lab.netns("e")
    os.chmod(lab.tmp, 0o755)  # noqa: S103
    private = lab.tmp / "private"
    private.mkdir(mode=0o700)
    app = private / "app.sh"
    app.write_text("#!/bin/sh\n")
    app.chmod(0o755)
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key")
                       + "  user: wgvapp\n")
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    ns.ip("link", "set", "lo", "down")  # as at an enclave's boot: `up` brings it up first
    before = ns.ip("-d", "link", "show").stdout
    with private_resolv_conf(ns, "# the image's own\n") as resolv:
        res = ns.run(*_launcher(lab), "--profile", str(profile), "--timeout", "3",
                     "--", str(app), env=env, check=False, timeout=60)
        assert resolv.read_text() == "# the image's own\n"
    owner = private.stat()
    assert res.returncode == 126, res.stderr
    assert res.stderr == (
        f"wgvsock enclave up: cannot run {app}: directory {private} (mode 0700, owner "
        f"{owner.st_uid}:{owner.st_gid}) is not searchable by enclave.user ({UID}:{GID}, groups "
        f"{GID},{EXTRA_GID}); in the image, chmod o+x {private}, or put CMD where that user can "
        "reach it\n")
    assert ns.ip("-d", "link", "show").stdout == before
