"""The environment wireguard-go-vsock (the Go seed, v0.2.5) reads, side by side with ours: each
case runs both programs the same way, each in a namespace of its own, with `-n tcp` only (the
seed's vsock mode would dial out of this VM), so the seed shows what a drop-in must do."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .daemonctl import link_exists, process_gone, sock_path
from .netlab import DAEMON, Lab, Namespace, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]

KINDS = ["seed", "ours"]


def _command(kind: str, seed: Path) -> str:
    return str(seed) if kind == "seed" else DAEMON


# A launcher that hands the daemon its TUN and UAPI socket, as wireguard-go hands them to its
# own background process and as one that makes the TUN for an unprivileged daemon would. argv:
# what WG_TUN_FD names, what WG_UAPI_FD names ("" leaves it unset), "exec" (become the
# daemon) or "run" (start it, exit with its status), then the daemon's command line. What:
# value:TEXT (the variable's text itself), tun:FLAGS:NAME (a TUN made with those flags),
# tun: (/dev/net/tun attached to nothing), pipe, tcp (a listening TCP socket), and unix
# sockets bound to PATH: listen:PATH, stream:PATH (not listening), dgram:PATH.
LAUNCHER = """\
import fcntl, os, socket, struct, subprocess, sys
tun, uapi, mode, *cmd = sys.argv[1:]
env = dict(os.environ)
kept = []

def make(spec):
    kind, _, arg = spec.partition(":")
    if kind == "value":
        return arg
    if kind == "tun":
        fd = os.open("/dev/net/tun", os.O_RDWR)
        if arg:
            flags, name = arg.split(":")
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), int(flags, 0)))
    elif kind == "pipe":
        fd = os.pipe()[0]
    else:
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        s = socket.socket(family, socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0) if kind == "tcp" else arg)
        if kind in ("listen", "tcp"):
            s.listen()
        fd = s.detach()
    os.set_inheritable(fd, True)
    kept.append(fd)
    return str(fd)

for var, spec in (("WG_TUN_FD", tun), ("WG_UAPI_FD", uapi)):
    if spec:
        env[var] = make(spec)
if mode == "exec":
    os.execve(cmd[0], cmd, env)
sys.exit(subprocess.run(cmd, env=env, pass_fds=kept).returncode)
"""
IFF_TUN, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x1, 0x2, 0x1000, 0x4000


def _launch(ns: Namespace, tun: str, uapi: str, mode: str, *cmd: str,
            **kw) -> subprocess.Popen:
    return ns.popen(sys.executable, "-c", LAUNCHER, tun, uapi, mode, *cmd, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_wg_process_foreground_keeps_it_in_the_foreground(lab: Lab, seed: Path,
                                                          kind: str) -> None:
    # The seed reads WG_PROCESS_FOREGROUND=1 as -f (a container's entry point, a unit of
    # Type=simple); ours forked, exited 0 at once, and a supervisor took the interface for gone.
    ns = lab.netns("f")
    ifname = lab.ifname("f")
    proc = ns.popen(_command(kind, seed), "-n", "tcp", ifname,
                    env=lab.env(WG_PROCESS_FOREGROUND="1"))
    wait_for(lambda: os.path.exists(sock_path(ifname)) or proc.poll() is not None, 30,
             f"{kind}: the UAPI socket of {ifname}")
    assert proc.poll() is None, f"{kind} left the foreground (exit {proc.returncode})"
    assert ns.pids() == [proc.pid]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not link_exists(ns, ifname)
    assert not os.path.exists(sock_path(ifname))




@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("foreground", "flags"), [
    (True, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR),
    (True, IFF_TUN | IFF_NO_PI),
    (False, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR),
], ids=["foreground-vnet", "foreground-plain", "background-vnet"])
def test_a_launchers_tun_and_uapi_socket_are_served(lab: Lab, seed: Path, kind: str,
                                                    foreground: bool, flags: int) -> None:
    # The launcher makes the TUN and the listening UAPI socket and hands both over (WG_TUN_FD,
    # WG_UAPI_FD), as wireguard-go does to its background process. Ours refused both (exit
    # 2); the seed serves them: wg(8) configures the interface through that socket and
    # traffic flows through the launcher's TUN to a peer.
    a, b = lab.netns("hLa"), lab.netns("hLb")
    lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.start_daemon(b, ib, "tcp")
    log = lab.tmp / f"{ia}.log"
    with open(log, "ab") as out:
        proc = _launch(a, f"tun:{flags:#x}:{ia}", f"listen:{sock_path(ia)}",
                       "exec" if foreground else "run",
                       _command(kind, seed), *(["-f"] if foreground else []), "-n", "tcp", ia,
                       env=lab.env(WGVSOCK_LOG_FILE=str(log)), stdin=subprocess.DEVNULL,
                       stdout=out, stderr=out)
    if not foreground:
        assert proc.wait(30) == 0, f"{kind}: {log.read_text()}"
    wait_for(lambda: a.wg("show", ia, check=False).returncode == 0 or
             (foreground and proc.poll() is not None), 30, f"{kind}: wg show {ia}")
    assert proc.poll() is None if foreground else True, f"{kind}: {log.read_text()}"
    [daemon] = a.pids()
    assert a.ip("-o", "link", "show").stdout.count(f": {ia}:") == 1
    connect_pair(lab, a, ia, "192.168.77.2:5000", b, ib, None, b_port=5000)
    ping(a, "10.99.0.2")
    assert "latest handshake" in a.wg("show", ia).stdout
    os.kill(daemon, signal.SIGTERM)
    if foreground:
        assert proc.wait(30) == 0
    wait_for(lambda: process_gone(daemon), 30, f"{kind} to exit")
    # The TUN was the launcher's, and no one holds it now.
    assert not link_exists(a, ia)
    # The seed (Go's UnixListener) unlinks the path its socket was bound to; ours leaves the
    # launcher's file to the launcher.
    assert os.path.exists(sock_path(ia)) == (kind == "ours"), kind


@pytest.mark.parametrize("kind", KINDS)
def test_removing_a_launchers_uapi_socket_file_stops_it(lab: Lab, seed: Path,
                                                        kind: str) -> None:
    # As with a socket of its own (wireguard-go's way to be told to stop): the file the
    # handed-over socket is bound to is watched.
    ns = lab.netns("hLr")
    ifname = lab.ifname("r")
    proc = _launch(ns, f"tun:{IFF_TUN | IFF_NO_PI | IFF_VNET_HDR:#x}:{ifname}",
                   f"listen:{sock_path(ifname)}", "exec", _command(kind, seed), "-f", "-n",
                   "tcp", ifname, env=lab.env(), stdin=subprocess.DEVNULL)
    wait_for(lambda: ns.wg("show", ifname, check=False).returncode == 0 or
             proc.poll() is not None, 30, f"{kind}: wg show {ifname}")
    os.unlink(sock_path(ifname))
    assert proc.wait(30) == 0
    assert not link_exists(ns, ifname)


# (variable, what the launcher hands over in it, what ours says is wrong with it). The seed
# refuses these too (exit 1), but for the three marked: it serves a TAP's Ethernet frames and a
# TUN's packet-info headers as IP packets, and another interface than the one named.
BAD = [
    ("WG_TUN_FD", "value:x", "is not a file descriptor number"),
    ("WG_TUN_FD", "value:7", "is not an open file descriptor"),
    ("WG_TUN_FD", "value:2", "is standard error"),
    ("WG_TUN_FD", "pipe", "is not a TUN device"),
    ("WG_TUN_FD", "tun:", "attached to no interface"),
    ("WG_TUN_FD", f"tun:{IFF_TAP | IFF_NO_PI:#x}:IF", "is a TAP device", "seed takes it"),
    ("WG_TUN_FD", f"tun:{IFF_TUN:#x}:IF", "without IFF_NO_PI", "seed takes it"),
    ("WG_TUN_FD", f"tun:{IFF_TUN | IFF_NO_PI:#x}:OTHER", "is the TUN of interface",
     "seed takes it"),
    ("WG_UAPI_FD", "value:-3", "is not a file descriptor number"),
    ("WG_UAPI_FD", "value:7", "is not an open file descriptor"),
    ("WG_UAPI_FD", "pipe", "is not a socket"),
    ("WG_UAPI_FD", "tcp", "is an AF_INET socket, not a unix one"),
    ("WG_UAPI_FD", "dgram:TMP/u", "is a datagram socket, not a stream one"),
    ("WG_UAPI_FD", "stream:TMP/u", "is not listening"),
]


@pytest.mark.parametrize(("kind", "name", "what", "why"), [
    pytest.param(kind, name, what, why, id=f"{name}-{what.split(':')[0]}-{i}-{kind}")
    for i, (name, what, why, *seed_takes) in enumerate(BAD)
    for kind in (["ours"] if seed_takes else KINDS)
])
def test_a_descriptor_that_cannot_be_served_is_refused(lab: Lab, seed: Path, kind: str,
                                                       name: str, what: str, why: str) -> None:
    # Ours refused both variables whatever they held; now it takes a TUN and a UAPI socket
    # handed over, and anything else is refused before anything is made, with the variable
    # and what its descriptor is instead (exit 2, as for the other variables it reads).
    ns = lab.netns("hLd")
    ifname, other = lab.ifname("d"), lab.ifname("o")
    what = what.replace("IF", ifname).replace("OTHER", other).replace("TMP", str(lab.tmp))
    log = lab.tmp / "launcher.log"
    with open(log, "ab") as out:
        proc = _launch(ns, *((what, "") if name == "WG_TUN_FD" else ("", what)), "exec",
                       _command(kind, seed), "-f", "-n", "tcp", ifname,
                       env=lab.env(LOG_LEVEL="error"), stdin=subprocess.DEVNULL,
                       stdout=out, stderr=out)
        code = proc.wait(30)
    err = log.read_text()
    assert code != 0, f"{kind} started with {name} {what}"
    assert not link_exists(ns, ifname)
    assert not os.path.exists(sock_path(ifname))
    assert ns.pids() == [] or all(process_gone(p) for p in ns.pids())
    if kind == "ours":
        assert code == 2, err
        assert err.startswith(f"wireguard-go-vsock: {name}="), err
        assert why in err and "Traceback" not in err, err


@pytest.mark.parametrize("same_name", [False, True], ids=["none-here", "another-here"])
def test_a_tun_of_another_namespace_is_refused(lab: Lab, same_name: bool) -> None:
    # The launcher makes the TUN in its namespace and starts the daemon in another. TUNGETIFF
    # names the interface all the same, so ours took it and configured that name where it
    # runs: an interface of that name there (here a veth), or none. It is now refused
    # before anything is made (exit 2), naming the variable and what to do.
    a, b = lab.netns("hMa"), lab.netns("hMb")
    ifname = lab.ifname("n")
    if same_name:
        b.ip("link", "add", ifname, "type", "veth", "peer", "name", "hMpeer")
    log = lab.tmp / "launcher.log"
    with open(log, "ab") as out:
        proc = _launch(a, f"tun:{IFF_TUN | IFF_NO_PI:#x}:{ifname}", "", "exec",
                       shutil.which("ip") or "ip", "netns", "exec", b.name, DAEMON, "-f",
                       "-n", "tcp", ifname, env=lab.env(LOG_LEVEL="error"),
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        code = proc.wait(30)
    err = log.read_text()
    assert code == 2, err
    assert err.startswith("wireguard-go-vsock: WG_TUN_FD="), err
    assert "another network namespace" in err and "Traceback" not in err, err
    assert not os.path.exists(sock_path(ifname))
    assert link_exists(b, ifname) == same_name
    assert not link_exists(a, ifname)
    assert a.pids() == [] and b.pids() == []
