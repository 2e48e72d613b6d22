"""The parent's state file and the host settings it records, where `parent up` and `down` run
in namespaces (test_roles.World): a parent killed at the worst moment, two parents stopping at
once, state files that are damaged or not root's, two parents on one interface.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wgvsock.services import firewall

from .daemonctl import process_gone
from .netlab import wait_for
from .test_ipv6 import DUAL_STACK_PROFILE, IPV6_ONLY_PROFILE
from .test_roles import PROFILE, UNIX_TRANSPORT, World

pytestmark = [pytest.mark.root]

PY = sys.executable

# The host settings `parent up` changes (IPv6 forwarding and accept_ra 1 -> 2: dual stack).
SETTINGS = ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
            "net/ipv6/conf/default/accept_ra"]


def settings(w: World) -> dict[str, str]:
    """The forwarding sysctls and every interface's accept_ra in the parent's namespace."""
    keys = SETTINGS + [f"net/ipv6/conf/{n}/accept_ra" for n in w.parent.run(
        "ls", "/proc/sys/net/ipv6/conf").stdout.split() if n not in ("all", "default")]
    return dict(zip(keys, w.parent.run("sysctl", "-n", *keys).stdout.split(), strict=True))


def state_file(w: World, name: str | None = None) -> Path:
    return w.lab.tmp / "state" / f"{name or w.name}.json"


# `wgvsock parent up -f` (argv[2:]) killed with SIGKILL right after it wrote the sysctl
# argv[1]: its first write of a host setting, or its last.
_KILLED_AFTER_WRITE = r"""
import os, signal, sys
from wgvsock.cli import main
from wgvsock.services import firewall

real = firewall._sysctl_write

def write(key, value, netns):
    real(key, value, netns)
    if key == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)

firewall._sysctl_write = write
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("last", [False, True], ids=["first-write", "last-write"])
def test_a_parent_killed_while_turning_forwarding_on_is_put_back_by_down(
        world: World, last: bool) -> None:
    """Review finding: `up` wrote the forwarding sysctls and only then its state file, so a
    parent killed in between left IP forwarding (and accept_ra=2) on with no record; `down`
    exited 0 leaving them, and the next `up`, finding forwarding on, recorded nothing."""
    w = world
    w.profile.write_text(DUAL_STACK_PROFILE.format(
        name=w.name, transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock"),
        key=w.lab.tmp / "parent.key"))
    before = settings(w)
    assert before["net/ipv4/ip_forward"] == "0" and "1" in before.values()
    key = "net/ipv6/conf/all/forwarding" if last else "net/ipv6/conf/default/accept_ra"
    res = w.parent.run(PY, "-c", _KILLED_AFTER_WRITE, key, "parent", "up", "--profile",
                       str(w.profile), "-f", env=w.env_for("parent"), check=False, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    crashed = settings(w)
    assert crashed[key] != before[key]  # killed after the write: the host was changed
    down = w.parent_cmd("down")
    assert "Traceback" not in down.stderr
    assert settings(w) == before, down.stdout
    assert not state_file(w).exists()


# `wgvsock parent up -f` (argv[3:]) whose decision whether forwarding can go back waits for
# the other parent's (the file argv[2] appears once it has decided), up to 3 s: two parents
# that stop at once both decide while both still run. When the decisions take turns, as they
# must, the other only decides after this one is done, so this one waits out the 3 s.
_DECIDING_TOGETHER = r"""
import sys, time
from pathlib import Path
from wgvsock.cli import main
from wgvsock.roles import state

mine, theirs = Path(sys.argv[1]), Path(sys.argv[2])
real = state.others_running

def others_running(name):
    found = real(name)
    mine.touch()
    deadline = time.monotonic() + 3
    while not theirs.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return found

state.others_running = others_running
sys.exit(main(sys.argv[3:]))
"""


def test_two_parents_stopping_at_once_put_forwarding_back(world: World) -> None:
    """Review finding: a stopping parent left forwarding on while another parent ran, and a
    parent that was itself stopping counted as running; two stopping at once (two profiles,
    `systemctl stop` of both, a shutdown) each saw the other and both left it on for good."""
    w = world
    second = w.lab.tmp / "second.yaml"
    second.write_text(PROFILE.format(
        name=f"{w.name}b", transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock2"),
        key=w.lab.tmp / "parent2.key", parent_extra="")
        .replace("interface: wg0", "interface: wg1").replace("10.77.0.", "10.78.0.")
        .replace("listen: 8443", "listen: 8444"))
    assert settings(w)["net/ipv4/ip_forward"] == "0"
    marks = [w.lab.tmp / "decided-a", w.lab.tmp / "decided-b"]
    procs = []
    try:
        for i, (profile, name) in enumerate(((w.profile, w.name), (second, f"{w.name}b"))):
            log = open(w.lab.tmp / f"parent-{i}.log", "wb")  # noqa: SIM115 - the child's
            procs.append(w.parent.popen(
                PY, "-c", _DECIDING_TOGETHER, str(marks[i]), str(marks[1 - i]), "parent",
                "up", "--profile", str(profile), "-f", env=w.env_for("parent"), stdout=log,
                stderr=subprocess.STDOUT))
            log.close()
            proc = procs[-1]

            def recorded(name: str = name, pid: int = proc.pid) -> bool:
                try:
                    return json.loads(state_file(w, name).read_text())["pid"] == pid
                except (OSError, ValueError):
                    return False

            wait_for(recorded, 30, f"parent {name} to record its state")
        assert settings(w)["net/ipv4/ip_forward"] == "1"
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        w.parent_cmd("down", check=False)
        w.parent.run(sys.executable, "-m", "wgvsock.cli", "parent", "down", "--profile",
                     str(second), env=w.env_for("parent"), check=False, timeout=60)
    logs = "".join((w.lab.tmp / f"parent-{i}.log").read_text() for i in range(2))
    assert all(m.exists() for m in marks), logs
    assert settings(w)["net/ipv4/ip_forward"] == "0", logs
    assert [p.returncode for p in procs] == [0, 0], logs


def test_each_family_goes_back_when_the_last_parent_needing_it_stops(world: World) -> None:
    """Review finding: the host's record of what stopped parents turned on was one for both
    IP versions, so an IPv4-only parent stopping beside an IPv6-only one left IPv4
    forwarding on until that one stopped too."""
    w = world  # its profile: IPv4 only
    second = w.lab.tmp / "v6.yaml"
    second.write_text(IPV6_ONLY_PROFILE.format(
        name=f"{w.name}b", transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock2"),
        key=w.lab.tmp / "parent2.key")
        .replace("interface: wg0", "interface: wg1").replace("listen: 8443", "listen: 8444"))

    def second_cmd(what: str, check: bool = True) -> subprocess.CompletedProcess:
        res = w.parent.run(PY, "-m", "wgvsock.cli", "parent", what, "--profile", str(second),
                           env=w.env_for("parent"), check=False, timeout=60)
        assert not check or res.returncode == 0, res.stderr
        return res

    def forwarding() -> tuple[str, str]:
        s = settings(w)
        return s["net/ipv4/ip_forward"], s["net/ipv6/conf/all/forwarding"]

    assert forwarding() == ("0", "0")
    try:
        w.parent_cmd("up")
        second_cmd("up")
        assert forwarding() == ("1", "1")
        down = w.parent_cmd("down")
        assert forwarding() == ("0", "1"), down.stdout
        assert not (w.lab.tmp / "state" / "forwarding.json").exists()
        second_cmd("down")
        assert forwarding() == ("0", "0")
    finally:
        w.parent_cmd("down", check=False)
        second_cmd("down", check=False)


def _crash(w: World) -> dict:
    """`parent up`, then SIGKILL: the table, forwarding and the state file stay."""
    w.parent_cmd("up")
    state = json.loads(state_file(w).read_text())
    os.kill(state["pid"], signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{state['pid']}").exists(), 10, "the parent to die")
    assert firewall.exists(w.name, netns=w.parent.name)
    return state


def _rewrite(w: World, state: dict) -> None:
    path = state_file(w)
    path.write_text(json.dumps(state))
    path.chmod(0o600)


BAD = {
    "pid text": ({"pid": "abc"}, "pid"),
    "pid fraction": ({"pid": 1.5}, "pid"),
    "pid null": ({"pid": None}, "pid"),
    "pid huge": ({"pid": 2**70}, "pid"),
    "forwarding value": ({"forwarding": {"net/ipv4/ip_forward": 5}}, "forwarding"),
    "forwarding key": ({"forwarding": {"net/ipv4/conf/all/rp_filter": "0"}}, "forwarding"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_damaged_state_file_is_refused_and_down_removes_the_rest(
        world: World, kind: str) -> None:
    """Review finding: a state file was checked for JSON syntax only. A wrong type gave a
    traceback (os.kill of "abc", 1.5, None, 2**70) in `up` and `down`; a forwarding value
    of 5 let `up` carry on and made `down` fail; and a state file `down` could not read made
    it stop at once, leaving even the nftables table."""
    w = world
    change, field = BAD[kind]
    _rewrite(w, {**_crash(w), **change})
    path = state_file(w)
    up = w.parent_cmd("up", check=False)
    assert up.returncode == 1 and "Traceback" not in up.stderr, up.stderr
    assert str(path) in up.stderr and field in up.stderr, up.stderr
    down = w.parent_cmd("down", check=False)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert str(path) in down.stderr and field in down.stderr, down.stderr
    assert "forwarding" in down.stderr and "not restored" in down.stderr, down.stderr
    assert not firewall.exists(w.name, netns=w.parent.name), down.stdout
    assert path.exists()  # left for the operator to look at, as the message says
    path.unlink()
    w.parent.run("sysctl", "-qw", "net.ipv4.ip_forward=0")


@pytest.mark.parametrize("how", ["mode 0666", "another user's"])
def test_a_state_file_others_could_write_is_not_trusted(world: World, how: str) -> None:
    """Review finding: a state file anyone could have written was trusted, and root's
    `down` wrote whatever sysctl it named."""
    w = world
    proc = subprocess.Popen(["true"])
    proc.wait()
    path = state_file(w)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(json.dumps({"name": w.name, "pid": proc.pid, "interface": "wg0",
                                "profile": str(w.profile),
                                "forwarding": {"net/ipv4/ip_forward": "1"}}))
    if how == "mode 0666":
        path.chmod(0o666)
    else:
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
    down = w.parent_cmd("down", check=False)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert str(path) in down.stderr, down.stderr
    assert ("writable by others" if how == "mode 0666" else "owned by uid 65534") \
        in down.stderr, down.stderr
    assert settings(w)["net/ipv4/ip_forward"] == "0"
    path.unlink()


def test_a_second_parent_on_the_same_interface_says_which_runs_it(world: World) -> None:
    """Two `up` for one interface (two profiles, or one `up` twice at once): the second
    printed the TUN's raw `[Errno 16] ... interface is busy`."""
    w = world
    w.parent_cmd("up")
    other = w.lab.tmp / "other.yaml"
    other.write_text(PROFILE.format(
        name=f"{w.name}b", transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock2"),
        key=w.lab.tmp / "parent2.key", parent_extra="").replace("10.77.0.", "10.78.0."))
    res = w.parent.run(sys.executable, "-m", "wgvsock.cli", "parent", "up", "--profile",
                       str(other), env=w.env_for("parent"), check=False, timeout=60)
    assert res.returncode == 1
    assert "Errno" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "wg0" in res.stderr and f"profile {w.name}" in res.stderr, res.stderr
    assert "already" in res.stderr, res.stderr
    # The running one is untouched.
    assert w.parent_cmd("up").stdout.startswith(f"profile '{w.name}' is already up")


def test_a_profile_renamed_under_its_running_parent_is_named_by_down_and_up(
        world: World) -> None:
    """`name:` edited in the file a parent runs from, then `down` and `up` with it: `down`
    found no parent of the new name, said "left interface wg0 alone: no parent of profile
    'new' holds it" and exited 0 with the old one still running; `up` then said wg0 was taken
    by the old one's parent and to stop it "with its profile" — this very file, which `down`
    had just failed to stop it with. Both now say what happened and what to do."""
    w = world
    w.parent_cmd("up")
    pid = json.loads(state_file(w).read_text())["pid"]
    text = w.profile.read_text()
    w.profile.write_text(text.replace(f"name: {w.name}\n", f"name: {w.name}x\n"))
    said = (f"the parent running from {w.profile} is profile '{w.name}' (pid {pid}); the "
            f"file now names '{w.name}x' (line 2): a new name needs that parent stopped "
            f"first. Put the old name back, run `wgvsock parent down --profile {w.profile}`, "
            "then the new name and `up`\n")
    for cmd in ("down", "up"):
        res = w.parent_cmd(cmd, check=False)
        assert (res.returncode, res.stderr) == (1, f"wgvsock parent {cmd}: {said}")
        assert os.path.exists(f"/proc/{pid}")  # still running, and still its own
    w.profile.write_text(text)  # as said: the old name back, then `down`
    assert w.parent_cmd("down").stdout == f"stopped the parent (pid {pid})\n"


def test_a_profile_broken_under_its_running_parent_still_stops_it(world: World) -> None:
    """A typo in the file a parent runs from, then `down`: "invalid profile: ...; nothing was
    stopped or removed", exit 1, the parent still running, and the fix ("put back the file")
    needing the old text the operator may not have. The state file it left finds it now."""
    w = world
    w.parent_cmd("up")
    pid = json.loads(state_file(w).read_text())["pid"]
    w.profile.write_text(w.profile.read_text().replace("  egress:", "  egres:"))
    res = w.parent_cmd("down", check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (f"stopped the parent of profile '{w.name}' (pid {pid}), found by its "
                          f"state file {state_file(w)} (running from {w.profile}): it removed "
                          "what it had made as it stopped. Fix the profile before the next "
                          "`up`\n")
    assert res.stderr.startswith(f"invalid profile:\n{w.profile}:") and \
        "unknown key 'egres'" in res.stderr, res.stderr
    assert process_gone(pid)
    assert not state_file(w).exists()
    assert not firewall.exists(w.name, netns=w.parent.name)
    assert w.parent.run("ip", "link", "show", "wg0", check=False).returncode != 0


def test_the_doctor_names_the_running_parent(world: World) -> None:
    """`parent doctor` had no row saying whether the profile's parent runs now."""
    w = world
    w.parent_cmd("up")
    pid = json.loads(state_file(w).read_text())["pid"]
    w.env["COLUMNS"] = "1000"
    row = next(line for line in w.parent_cmd("doctor", check=False).stdout.splitlines()
               if re.match(r"│ parent +│", line))
    assert "ready" in row and f"up: pid {pid} since " in row, row
    assert f"running from {w.profile}" in row, row
    w.parent_cmd("down")
    row = next(line for line in w.parent_cmd("doctor", check=False).stdout.splitlines()
               if re.match(r"│ parent +│", line))
    assert "n/a" in row and f"not running: no state file {state_file(w)}" in row, row


def test_a_second_profile_on_the_same_wireguard_port_is_told_which_key_to_change(
        world: World) -> None:
    """A second profile copied from the first, given its own name, interface and subnet but
    the same transport: "cannot listen on port 51820: ... is in use by another process (errno
    -98, EADDRINUSE)", the UAPI's words, naming neither the profile key nor a fix (the
    control port, bound next, said both)."""
    w = world
    w.parent_cmd("up")
    other = w.lab.tmp / "other.yaml"
    other.write_text(PROFILE.format(
        name=f"{w.name}b", transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock"),
        key=w.lab.tmp / "parent2.key", parent_extra="").replace("10.77.0.", "10.78.0.")
        .replace("interface: wg0", "interface: wg1").replace("listen: 8443", "listen: 8444"))
    res = w.parent.run(sys.executable, "-m", "wgvsock.cli", "parent", "up", "--profile",
                       str(other), env=w.env_for("parent"), check=False, timeout=60)
    assert (res.returncode, res.stderr) == (1, (
        f"wgvsock parent up: profile '{w.name}b': cannot listen on the WireGuard port 51820 "
        f"(unix): {w.lab.tmp / 'sock' / '51820.sock'} is in use by another process "
        "(another profile's `parent up`?): free it, or give this profile another "
        "transport.port or transport.path\n"))
    assert w.parent_cmd("up").stdout.startswith(f"profile '{w.name}' is already up")


def test_a_link_moved_to_another_profile_starts_that_one_beside_the_first(
        world: World) -> None:
    """current.yaml a link to the first profile, its parent started from the link; the link
    then moved to a second profile (its own name, interface, subnet and socket directory) and
    `up` given that one: refused as a rename ("the parent running from second.yaml is profile
    'first' ... Put the old name back"), since the first parent's file, the link, now
    resolves to it. No file was renamed and the two run side by side: `up` refuses a renamed
    profile only where the running parent holds its interface, the clash a rename makes."""
    w = world
    link = w.lab.tmp / "current.yaml"
    link.symlink_to(w.profile)
    env = w.env_for("parent")
    wgvsock = [sys.executable, "-m", "wgvsock.cli", "parent"]
    res = w.parent.run(*wgvsock, "up", "--profile", str(link), env=env, check=False,
                       timeout=60)
    assert res.returncode == 0, res.stderr
    other = w.lab.tmp / "second.yaml"
    other.write_text(PROFILE.format(
        name=f"{w.name}b", transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock2"),
        key=w.lab.tmp / "parent2.key", parent_extra="").replace("10.77.0.", "10.78.0.")
        .replace("interface: wg0", "interface: wg1").replace("listen: 8443", "listen: 8444"))
    link.unlink()
    link.symlink_to(other)
    try:
        res = w.parent.run(*wgvsock, "up", "--profile", str(other), env=env, check=False,
                           timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(state_file(w, f"{w.name}b").read_text())["interface"] == "wg1"
        assert w.parent_cmd("up").stdout.startswith(f"profile '{w.name}' is already up")
    finally:
        w.parent.run(*wgvsock, "down", "--profile", str(other), env=env, check=False,
                     timeout=60)
