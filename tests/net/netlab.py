"""A small lab of network namespaces, veth cables and WireGuard daemons for the root tests.

Everything a test makes is registered with the `Lab` and torn down by `Lab.close()` (the
`lab` fixture calls it even when the test fails): processes in each namespace are killed,
namespaces deleted, temporary directories removed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from wgvsock.core.crypto import generate_private_key, key_to_base64, public_key
from wgvsock.device.uapi import uapi_get
from wgvsock.ui.nslab import wait_for

VENV_BIN = Path(sys.executable).parent
DAEMON = str(VENV_BIN / "wireguard-go-vsock")
RUN_DIR = "/var/run/wireguard"
_serial = itertools.count()
# Under the test guest's emulated CPU (tests/guest) every command takes several times longer:
# there, command time limits stretch by this factor (the bounds tests assert do not).
SLOWDOWN = float(os.environ.get("WGVSOCK_TEST_SLOWDOWN") or 1)
# Put before the names of the namespaces and interfaces a lab makes (and of the profiles the
# role tests write), so that several people testing on one machine can tell theirs apart.
PREFIX = os.environ.get("WGVSOCK_LAB_PREFIX", "")


# A router advertisement (argv: interface, link-local source, prefix) to all nodes, hop limit
# 255 as ND requires: default router with high preference for 30 min, and the prefix on-link
# and autonomous. The kernel fills
# in the ICMPv6 checksum of a raw ICMPv6 socket.
SEND_RA = """\
import socket, struct, sys
ifname, source, prefix = sys.argv[1:]
index = socket.if_nametoindex(ifname)
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
s.bind((source, 0, 0, index))
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0x08, 1800, 0, 0)
pio = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                  socket.inet_pton(socket.AF_INET6, prefix))
s.sendto(ra + pio, ("ff02::1", 0, 0, index))
"""


def run(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check,
                          timeout=timeout * SLOWDOWN, **kw)


class Keys:
    def __init__(self) -> None:
        self.private = generate_private_key()
        self.public = public_key(self.private)
        self.private_b64 = key_to_base64(self.private)
        self.public_b64 = key_to_base64(self.public)
        self.private_hex = self.private.hex()
        self.public_hex = self.public.hex()


class Namespace:
    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.name, *cmd, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)
        self.lab.procs.append(p)
        return p

    def ip(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run("ip", "-n", self.name, *args, **kw)

    def wg(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("wg", *args, **kw)

    def pids(self) -> list[int]:
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


class Lab:
    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000}x{next(_serial)}"
        self.namespaces: list[Namespace] = []
        self.procs: list[subprocess.Popen] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="wgvsock-lab-"))
        os.chmod(self.tmp, 0o700)
        self.unix_dir = self.tmp / "unix"
        self._ifnames: list[str] = []
        self._count = itertools.count()

    # -- building ------------------------------------------------------------------------

    def netns(self, label: str) -> Namespace:
        name = f"{PREFIX}wgv{self.tag}{label}"
        run("ip", "netns", "add", name)
        ns = Namespace(self, name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def veth(self, a: Namespace, a_addr: str, b: Namespace, b_addr: str) -> tuple[str, str]:
        n = next(self._count)
        ia, ib = f"va{n}", f"vb{n}"
        run("ip", "link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib,
            "netns", b.name)
        for ns, ifname, addr in ((a, ia, a_addr), (b, ib, b_addr)):
            ns.ip("addr", "add", addr, "dev", ifname)
            ns.ip("link", "set", ifname, "up")
        return ia, ib

    def ifname(self, label: str) -> str:
        """A unique interface name: every daemon's UAPI socket shares /var/run/wireguard."""
        name = f"{PREFIX}wg{self.tag}{label}"[:15]
        self._ifnames.append(name)
        return name

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["WGVSOCK_UNIX_DIR"] = str(self.unix_dir)
        env.setdefault("LOG_LEVEL", "verbose")
        env.update(extra)
        return env

    def start_daemon(
        self, ns: Namespace, ifname: str, network: str, *args: str, log: str | None = None, **env
    ) -> subprocess.CompletedProcess:
        """Starts our daemon the way users do (it backgrounds itself once ready)."""
        log_path = self.tmp / f"{ifname}.log"
        res = ns.run(
            DAEMON, "-n", network, *args, ifname,
            env=self.env(WGVSOCK_LOG_FILE=str(log_path), **env), check=False,
        )
        if res.returncode != 0:
            raise AssertionError(f"daemon {ifname} failed to start: {res.stderr}")
        return res

    def log(self, ifname: str) -> str:
        p = self.tmp / f"{ifname}.log"
        return p.read_text() if p.exists() else ""

    def start_wireguard_go(self, ns: Namespace, ifname: str, log_level: str = "verbose") -> None:
        """Starts Debian's wireguard-go, which backgrounds itself. Its log goes to a file that
        `log(ifname)` reads, never to a pipe: with LOG_LEVEL set, the background child keeps
        the parent's stdout and stderr, so capturing them would wait for the child to exit."""
        env = dict(
            os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", LOG_LEVEL=log_level
        )
        log_path = self.tmp / f"{ifname}.log"
        with open(log_path, "ab") as out:
            res = subprocess.run(
                ["ip", "netns", "exec", ns.name, "wireguard-go", ifname],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=30,
                check=False,
            )
        if res.returncode != 0:
            raise AssertionError(f"wireguard-go {ifname} failed: {self.log(ifname)}")

    def start_seed(
        self, ns: Namespace, ifname: str, binary: Path, network: str = "tcp"
    ) -> None:
        """Starts the Go seed (wireguard-go-vsock). `-n vsock` only inside the test guest
        (tests/guest): on this machine it would dial out of the VM. It backgrounds itself; its
        log goes to a file for the reason given in start_wireguard_go."""
        if network == "vsock":
            from tests.guest.rig import require_guest

            require_guest()
        log_path = self.tmp / f"{ifname}.log"
        with open(log_path, "ab") as out:
            res = subprocess.run(
                ["ip", "netns", "exec", ns.name, str(binary), "-n", network, ifname],
                env=dict(os.environ, LOG_LEVEL="verbose"), stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, timeout=30, check=False,
            )
        if res.returncode != 0:
            raise AssertionError(f"the Go seed {ifname} failed: {self.log(ifname)}")

    # -- reading ------------------------------------------------------------------------

    @staticmethod
    def uapi(ifname: str) -> dict:
        # Scaled as command time limits are: in the guest a reply within 2 s is no given.
        return uapi_get(f"{RUN_DIR}/{ifname}.sock", timeout=2.0 * SLOWDOWN)

    def wait_handshake(self, ns: Namespace, ifname: str, timeout: float = 10.0) -> int:
        def done() -> int:
            out = ns.wg("show", ifname, "latest-handshakes", check=False).stdout.split()
            return int(out[1]) if len(out) >= 2 and out[1] != "0" else 0

        return wait_for(done, timeout, f"a handshake on {ifname}")

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        for ns in self.namespaces:
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
        for ns in self.namespaces:
            run("ip", "netns", "del", ns.name, check=False)
        for name in self._ifnames:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{RUN_DIR}/{name}.sock")
        shutil.rmtree(self.tmp, ignore_errors=True)


def connect_pair(
    lab: Lab,
    a: Namespace, ia: str, a_ep: str,
    b: Namespace, ib: str, b_ep: str | None,
    *, a_port: int | None = None, b_port: int | None = None,
    a_tun: str = "10.99.0.1", b_tun: str = "10.99.0.2", keepalive: int = 0,
) -> tuple[Keys, Keys]:
    """Configures two interfaces as each other's peer with wg(8), addresses them, sets them up.
    `a_ep` is the endpoint a dials for b; b_ep may be None (b learns a's endpoint by roaming)."""
    ka, kb = Keys(), Keys()
    for ns, ifname, keys, port, other, ep, peer_tun in (
        (a, ia, ka, a_port, kb, a_ep, b_tun),
        (b, ib, kb, b_port, ka, b_ep, a_tun),
    ):
        keyfile = lab.tmp / f"{ifname}.key"
        keyfile.write_text(keys.private_b64 + "\n")
        os.chmod(keyfile, 0o600)
        cmd = ["set", ifname, "private-key", str(keyfile)]
        if port is not None:
            cmd += ["listen-port", str(port)]
        cmd += ["peer", other.public_b64, "allowed-ips", f"{peer_tun}/32"]
        if ep is not None:
            cmd += ["endpoint", ep]
        if keepalive:
            cmd += ["persistent-keepalive", str(keepalive)]
        ns.wg(*cmd)
    for ns, ifname, addr in ((a, ia, a_tun), (b, ib, b_tun)):
        ns.ip("addr", "add", f"{addr}/24", "dev", ifname)
        ns.ip("link", "set", ifname, "up")
    return ka, kb


def nft_counters(ns: Namespace, table: str = "wgvtest") -> dict[str, int]:
    """The packet counts of the rules of a test's own `inet TABLE`, by their comments."""
    out = ns.run("nft", "-j", "list", "table", "inet", table).stdout
    counts = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
            counts[rule["comment"]] = counter["packets"]
    return counts


def ping(
    ns: Namespace, addr: str, count: int = 3, *, size: int | None = None, **kw
) -> subprocess.CompletedProcess:
    """`count` pings 0.2 s apart; fails (CalledProcessError) unless every reply came back.
    `size` is ping's -s, the ICMP payload length."""
    extra = ["-s", str(size)] if size is not None else []
    return ns.run("ping", "-c", str(count), "-i", "0.2", "-W", "3", *extra, addr, **kw)


def csum_errors(ns: Namespace) -> int:
    """Segments `ns`'s kernel received with a bad TCP checksum (and dropped), since it was
    made: a peer that cuts super-packets must checksum every segment."""
    # -s: nstat keeps no history file (/tmp/.nstat.u0, left behind by every run before).
    out = ns.run("nstat", "-asz", "TcpInCsumErrors").stdout
    [count] = [int(line.split()[1]) for line in out.splitlines()
               if line.startswith("TcpInCsumErrors")]
    return count


def iperf3(
    server: Namespace, client: Namespace, addr: str, *args: str, timeout: float = 120
) -> dict:
    """One iperf3 run: a one-shot server bound to `addr` in `server`, the client in `client`
    with `args` (e.g. "-n", "20M", "-R"). Returns the client's JSON report."""
    server.popen("iperf3", "-s", "-1", "-B", addr)
    wait_for(lambda: f"{addr}:5201" in server.run("ss", "-ltnH", check=False).stdout, 10,
             "iperf3 -s")
    res = client.run("iperf3", "-c", addr, "-J", *args, timeout=timeout)
    return json.loads(res.stdout)
