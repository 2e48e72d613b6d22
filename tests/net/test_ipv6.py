"""IPv6 end to end (issue 14 §3): a dual-stack profile, real IPv6 packets through the tunnel.

The namespaces of test_roles.World, with IPv6 added to its cable:

    enclave  wg0 10.77.0.2, fd77::2  (routes 0.0.0.0/0 and ::/0)
       │  Unix-socket stand-in for vsock
    parent   wg0 10.77.0.1, fd77::1;  va0 2001:db8:100::1/64, default via 2001:db8:100::2
       │
    internet vb0 2001:db8:100::2 (allowed), 2001:db8:200::3 (denied), fd00:ec2::254 (IMDS)

The internet's IPv6 servers listen on their IPv6 addresses only, so nothing here can pass
over IPv4 by accident. Addresses are added with `nodad`: duplicate address detection would
keep them tentative (unusable) for a second or more.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from wgvsock.device.uapi import uapi_get
from wgvsock.services import firewall

from .netlab import Lab, Namespace, run, wait_for
from .test_egress_names import query, start_dnsmasq
from .test_roles import UNIX_TRANSPORT, WGVSOCK, World

pytestmark = [pytest.mark.root]

# The parent's part every dual-stack profile here shares; each adds its egress and enclave.
DUAL_STACK_HEAD = """\
version: 1
name: {name}
interface: wg0
transport:
{transport}
parent:
  address: [10.77.0.1/30, fd77::1/126]
  private_key: {key}
"""

DUAL_STACK_PROFILE = DUAL_STACK_HEAD + """\
  egress:
    allow: [0.0.0.0/0, "::/0"]
    deny: [169.254.169.254/32, 198.51.100.3/32, "2001:db8:200::/64"]
  ingress:
    - {{listen: 8443, to: 8080, protocol: tcp}}
enclave:
  address: [10.77.0.2/30, fd77::2/126]
  dns: [198.51.100.53]
"""

SERVER = "2001:db8:100::2"
DENIED = "2001:db8:200::3"
IMDS = "fd00:ec2::254"
PARENT = "2001:db8:100::1"
UDP_PORT = 5353

# A UDP echo server bound to one IPv6 address only.
UDP_ECHO = """\
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo " + data, peer)
"""

UDP_ASK = """\
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(2048)[0].decode())
"""


class World6:
    """test_roles.World with a dual-stack profile and IPv6 on the parent-internet cable."""

    def __init__(self, lab: Lab, profile: str = DUAL_STACK_PROFILE) -> None:
        w = self.w = World(lab)
        self.name = w.name
        try:
            self._set_up(lab, profile)
        except BaseException:
            w.close()  # the lab removes the rest; World also leaves a file in /etc/netns
            raise

    def _set_up(self, lab: Lab, profile: str) -> None:
        w = self.w
        w.profile.write_text(profile.format(
            name=w.name, transport=UNIX_TRANSPORT.format(sock=lab.tmp / "sock"),
            key=lab.tmp / "parent.key"))
        w.parent.ip("-6", "addr", "add", f"{PARENT}/64", "dev", "va0", "nodad")
        for addr in (f"{SERVER}/64", f"{DENIED}/64", f"{IMDS}/64"):
            w.internet.ip("-6", "addr", "add", addr, "dev", "vb0", "nodad")
        w.parent.ip("-6", "route", "add", "default", "via", SERVER)
        # Bulk data of a few MiB: TCP segmentation offload over IPv6 both ways.
        self.big = os.urandom(6 << 20)
        for d in (lab.tmp / "www", w.app):
            (d / "big6.bin").write_bytes(self.big)
        for addr in (SERVER, DENIED, IMDS):
            w.internet.popen("python3", "-m", "http.server", "-d", str(lab.tmp / "www"),
                             "-b", addr, "80")
            # The parent itself reaches each one: a block seen from the enclave is the tunnel's.
            wait_for(lambda a=addr: self.get(w.parent, f"http://[{a}]/", 1) is not None, 10,
                     f"the internet's IPv6 server on {addr}, from the parent")
        w.internet.popen(sys.executable, "-c", UDP_ECHO, SERVER, str(UDP_PORT))
        wait_for(lambda: self.udp(w.parent, SERVER) == "echo ping", 10,
                 "the internet's IPv6 UDP echo server, from the parent")

    def get(self, ns: Namespace, url: str, timeout: float = 2) -> str | None:
        # -g: the brackets of an IPv6 literal are not a curl glob.
        res = ns.run("curl", "-gs", "--max-time", str(timeout), url, check=False)
        return res.stdout if res.returncode == 0 else None

    def udp(self, ns: Namespace, addr: str, timeout: float = 1) -> str | None:
        res = ns.run(sys.executable, "-c", UDP_ASK, addr, str(UDP_PORT), str(timeout),
                     check=False)
        return res.stdout.strip() if res.returncode == 0 else None

    def fetch_big(self, ns: Namespace, url: str) -> bool:
        out = self.w.lab.tmp / f"fetched6-{ns.name}.bin"
        res = ns.run("curl", "-gs", "--max-time", "30", "-o", str(out), url, check=False,
                     timeout=45)
        return res.returncode == 0 and out.read_bytes() == self.big

    def egress6_works(self) -> bool:
        return self.get(self.w.enclave, f"http://[{SERVER}]/") == "hello from the internet\n"

    def ingress6_works(self) -> bool:
        return self.get(self.w.internet, f"http://[{PARENT}]:8443/") == "hello from the enclave\n"

    def wg0_stats(self) -> dict[str, dict[str, int]]:
        res = self.w.enclave.ip("-s", "-j", "link", "show", "dev", "wg0")
        return json.loads(res.stdout)[0]["stats64"]

    def counters(self) -> dict[str, firewall.Counter]:
        return firewall.read_counters(self.name, netns=self.w.parent.name)


def per_packet(a: dict[str, int], b: dict[str, int]) -> float:
    return (b["bytes"] - a["bytes"]) / max(b["packets"] - a["packets"], 1)


@pytest.fixture
def world6(lab: Lab):
    w = World6(lab)
    try:
        yield w
    finally:
        w.w.close()


def test_dual_stack_enclave_reaches_ipv6_internet_and_is_reached_over_ipv6(
        world6: World6) -> None:
    w = world6.w
    sysctl = ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]
    assert w.parent.run(*sysctl).stdout.strip() == "0"
    w.parent_cmd("up")
    assert w.parent.run(*sysctl).stdout.strip() == "1"
    w.start_enclave()
    wait_for(world6.egress6_works, 30, "the enclave to fetch a page from an IPv6-only server")
    # The enclave's tunnel carries both families; IPv4 still works beside IPv6.
    addrs = w.enclave.ip("-o", "addr", "show", "dev", "wg0").stdout
    assert "inet 10.77.0.2/30" in addrs and "inet6 fd77::2/126" in addrs
    assert "default dev wg0" in w.enclave.ip("-6", "route", "show").stdout
    assert w.egress_works()

    # UDP over IPv6, masqueraded: the server answered the parent's address.
    assert world6.udp(w.enclave, SERVER) == "echo ping"

    # Ingress on the parent's IPv6 address reaches the enclave's app.
    wait_for(world6.ingress6_works, 10, "the internet to reach the enclave on [2001:db8:100::1]")
    counters = world6.counters()
    assert counters["egress_allowed"].packets > 0
    assert counters["allow ::/0"].packets > 0
    assert counters["ingress_accepted"].packets > 0

    # A denied IPv6 prefix and the IPv6 metadata address are dropped at the parent (both
    # answer the parent itself: see World6).
    assert world6.get(w.enclave, f"http://[{DENIED}]/", timeout=1.5) is None
    assert world6.get(w.enclave, f"http://[{IMDS}]/", timeout=1.5) is None
    counters = world6.counters()
    assert counters["deny 2001:db8:200::/64"].packets > 0
    assert counters["deny fd00:ec2::254/128"].packets > 0
    assert world6.egress6_works()

    # Bulk IPv6 TCP both ways: super-packets (TSO) from the enclave's kernel cross the tunnel
    # and leave the parent cut to size; the parent's coalesced writes reach the enclave. The
    # enclave's wg0 counts a super-packet as one packet, so bytes per packet above the MTU
    # show that segmentation offload was at work in that direction.
    before = world6.wg0_stats()
    assert world6.fetch_big(w.enclave, f"http://[{SERVER}]/big6.bin")
    middle = world6.wg0_stats()
    assert world6.fetch_big(w.internet, f"http://[{PARENT}]:8443/big6.bin")
    after = world6.wg0_stats()
    assert per_packet(before["rx"], middle["rx"]) > 1420  # coalesced GSO writes into the TUN
    assert per_packet(middle["tx"], after["tx"]) > 1420  # TSO reads from the TUN

    # `wgvsock status` shows the IPv6 allowed IPs on both sides.
    def status(side: str) -> dict:
        res = run(WGVSOCK, "status", "--once", "--json", "--run-dir",
                  str(w.lab.tmp / f"run-{side}"), check=False)
        return json.loads(res.stdout)["interfaces"][0]["peers"][0]

    assert set(status("parent")["allowed_ips"]) == {"10.77.0.2/32", "fd77::2/128"}
    assert set(status("enclave")["allowed_ips"]) == {"0.0.0.0/0", "::/0"}
    text = run(WGVSOCK, "status", "--once", "--run-dir", str(w.lab.tmp / "run-parent"),
               env={**os.environ, "COLUMNS": "200"}, check=False).stdout
    assert "fd77::2/128" in text

    # `parent down` puts the IPv6 forwarding sysctl back.
    w.parent_cmd("down")
    assert w.parent.run(*sysctl).stdout.strip() == "0"


def test_ipv6_default_route_on_another_interface(lab: Lab) -> None:
    """The IPv4 and IPv6 default routes leave by different interfaces and the profile names
    none: the enclave's traffic of each family is masqueraded out of its own."""
    w6 = World6(lab)
    w = w6.w
    try:
        for ns in (w.parent, w.internet):  # the new cable's addresses: usable at once
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        lab.veth(w.parent, "2001:db8:300::1/64", w.internet, "2001:db8:300::2/64")
        w.parent.ip("-6", "route", "replace", "default", "via", "2001:db8:300::2", "dev", "va1")
        w.parent.ip("-6", "addr", "del", f"{PARENT}/64", "dev", "va0")
        wait_for(lambda: w6.get(w.parent, f"http://[{SERVER}]/", 1) is not None, 10,
                 "the internet over the second cable, from the parent")
        w.parent_cmd("up")
        w.start_enclave()
        wait_for(w6.egress6_works, 30, "IPv6 egress out of the IPv6 default route's interface")
        wait_for(w.egress_works, 10, "IPv4 egress out of the IPv4 default route's interface")
        assert w6.udp(w.enclave, SERVER) == "echo ping"
    finally:
        w.close()


RA_SYSCTLS = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
              "net.ipv6.conf.default.accept_ra", "net.ipv6.conf.va0.accept_ra"]


def test_interfaces_attached_later_keep_taking_router_advertisements(world: World) -> None:
    """With IPv6 forwarding on, an interface with accept_ra=1 ignores router advertisements.
    Before, `up` moved only the interfaces present to 2: one attached later (a hot-plugged
    ENI) inherited default's 1 and never learnt its IPv6 default route. `down` puts back
    every value, also after a parent killed without `down` and a second `up`."""
    w = world
    w.profile.write_text(DUAL_STACK_PROFILE.format(
        name=w.name, transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock"),
        key=w.lab.tmp / "parent.key"))

    def values(*keys: str) -> list[str]:
        return w.parent.run("sysctl", "-n", *keys).stdout.split()

    def attach(ifname: str) -> list[str]:
        w.parent.ip("tuntap", "add", "dev", ifname, "mode", "tap")
        return values(f"net.ipv6.conf.{ifname}.forwarding", f"net.ipv6.conf.{ifname}.accept_ra")

    assert values(*RA_SYSCTLS) == ["0", "0", "1", "1"]
    w.parent_cmd("up")
    assert values(*RA_SYSCTLS) == ["1", "1", "2", "2"]
    assert attach("eni1") == ["1", "2"]
    state = json.loads((w.lab.tmp / "state" / f"{w.name}.json").read_text())
    os.kill(state["pid"], signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{state['pid']}").exists(), 10, "the parent to die")
    w.parent_cmd("up")  # finds everything on already: the first record is what counts
    assert attach("eni2") == ["1", "2"]
    w.parent_cmd("down")
    assert values(*RA_SYSCTLS) == ["0", "0", "1", "1"]


IPV6_ONLY_PROFILE = """\
version: 1
name: {name}
interface: wg0
transport:
{transport}
parent:
  address: "fd77::1/126"
  private_key: {key}
  ingress:
    - {{listen: 8443, to: 8080, protocol: tcp}}
"""


FORWARDING = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]


@pytest.mark.parametrize("families", ["ipv6", "ipv4", "dual"])
def test_up_turns_on_forwarding_only_for_the_tunnel_s_families(world: World,
                                                                families: str) -> None:
    """Review finding: `parent up` of an IPv6-only profile turned on IPv4 forwarding too,
    making the host a router for IPv4 that nothing of wgvsock's needed. Each family goes on
    only when the tunnel has an address of it, and `down` puts back what went on."""
    w = world
    profile = {"ipv6": IPV6_ONLY_PROFILE, "dual": DUAL_STACK_PROFILE}.get(families)
    if profile is not None:  # "ipv4": World's own profile
        w.profile.write_text(profile.format(
            name=w.name, transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock"),
            key=w.lab.tmp / "parent.key"))

    def values() -> list[str]:
        return w.parent.run("sysctl", "-n", *FORWARDING).stdout.split()

    assert values() == ["0", "0"]
    w.parent_cmd("up")
    assert values() == {"ipv6": ["0", "1"], "ipv4": ["1", "0"], "dual": ["1", "1"]}[families]
    state = json.loads((w.lab.tmp / "state" / f"{w.name}.json").read_text())
    recorded = {k.split("/")[1] for k in state["forwarding"]
                if k in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")}
    assert recorded == ({"ipv4", "ipv6"} if families == "dual" else {families})
    w.parent_cmd("down")
    assert values() == ["0", "0"]


def test_downloads_the_parent_forwards_cross_the_tunnel_whole(lab: Lab) -> None:
    """A download from the internet to the enclave at tunnel MTU 9000: the internet's TCP
    sends super-packets of up to 64 KiB (45 segments of 1428 bytes: 64332), which the parent
    forwards into its TUN. Before, the TUN's gso_max_size of 65000 made the parent's kernel
    cut every one above it into segments before the daemon read them, and each crossed as a
    message of its own: what the enclave's wg0 received per byte fetched was 1.07. Now they
    are read whole and cut into super-packets that fit a message, with their segment size."""
    w6 = World6(lab, DUAL_STACK_PROFILE.replace("interface: wg0\n", "interface: wg0\nmtu: 9000\n"))
    w = w6.w
    try:
        w.parent_cmd("up")
        w.start_enclave()
        wait_for(w6.egress6_works, 30, "the enclave's IPv6 egress")
        uapi = str(lab.tmp / "run-enclave" / "wg0.sock")

        def received() -> int:
            return sum(p["rx_bytes"] for p in uapi_get(uapi)["peers"])

        before = received()
        assert w6.fetch_big(w.enclave, f"http://[{SERVER}]/big6.bin")
        assert (received() - before) / len(w6.big) < 1.03
    finally:
        w.close()


def test_ipv6_only_tunnel(lab: Lab) -> None:
    """An enclave with an IPv6 address only: the defaults (enclave address, ::/0, allow ::/0,
    the IPv6 resolver) make a working tunnel, and IPv4 goes nowhere."""
    w6 = World6(lab, IPV6_ONLY_PROFILE)
    w = w6.w
    try:
        w.parent_cmd("up")
        w.start_enclave()
        wait_for(w6.egress6_works, 30, "IPv6 egress from an IPv6-only enclave")
        wait_for(w6.ingress6_works, 10, "IPv6 ingress to an IPv6-only enclave")
        assert "nameserver fd00:ec2::253" in w.resolv.read_text()
        assert "inet " not in w.enclave.ip("-o", "addr", "show", "dev", "wg0").stdout
        assert w.curl(w.enclave, "http://198.51.100.2/", timeout=1) is None
        assert w6.get(w.enclave, f"http://[{IMDS}]/", timeout=1.5) is None
    finally:
        w.close()


def test_profile_check_host_explains_a_missing_ipv6_route(world6: World6) -> None:
    w = world6.w
    check = [WGVSOCK, "profile", "check", "--host", str(w.profile)]
    assert w.parent.run(*check, check=False).returncode == 0
    w.parent.ip("-6", "route", "del", "default")
    res = w.parent.run(*check, check=False)
    assert res.returncode == 1
    assert "enclave.routes" in res.stderr and "::/0" in res.stderr
    assert "no IPv6 default route" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # `parent up` warns the same way but starts: IPv4 works, and IPv6 will once the host
    # has its route.
    res = w.parent_cmd("up")
    assert "warning" in res.stderr and "no IPv6 default route" in res.stderr, res.stderr
    w.start_enclave()
    wait_for(w.egress_works, 30, "IPv4 egress while the host has no IPv6 route")


NAMES6_PROFILE = DUAL_STACK_HEAD + """\
  egress:
    allow: [ok6.test, both.test]
    resolver: 198.51.100.53
enclave:
  address: [10.77.0.2/30, fd77::2/126]
"""


def test_egress_by_name_over_ipv6(lab: Lab) -> None:
    """Names allow IPv6 as they allow IPv4: the parent's forwarder puts an allowed name's AAAA
    answers into the rule's IPv6 set, the enclave reaches that address over the tunnel, and an
    address no allowed answer gave stays blocked."""
    w6 = World6(lab, NAMES6_PROFILE)
    w = w6.w
    try:
        start_dnsmasq(lab, w.internet, (
            f"--host-record=ok6.test,{SERVER}",  # AAAA only
            f"--host-record=both.test,198.51.100.2,{SERVER}",
            f"--host-record=other6.test,{DENIED}",
        ))
        w.parent_cmd("up")
        w.start_enclave()
        wait_for(lambda: "nameserver 10.77.0.1" in w.resolv.read_text(), 30,
                 "the enclave to write resolv.conf")
        e = w.enclave
        # Nothing resolved yet: the allowed name's address is blocked by number.
        assert w6.get(e, f"http://[{SERVER}]/", timeout=1.5) is None
        # The AAAA answer through the forwarder, then a connection by name over IPv6.
        assert query(e, "ok6.test", "AAAA") == {"rcode": "NOERROR", "addresses": [SERVER]}
        v6 = firewall.set_elements(w.name, firewall.name_set(0, 6), netns=w.parent.name)
        assert SERVER in v6, v6
        assert firewall.set_elements(w.name, firewall.name_set(0, 4), netns=w.parent.name) == {}
        assert w6.get(e, "http://ok6.test/") == "hello from the internet\n"
        # A name with both families fills both of its sets.
        assert query(e, "both.test", "A")["addresses"] == ["198.51.100.2"]
        assert query(e, "both.test", "AAAA", proto="tcp")["addresses"] == [SERVER]
        assert "198.51.100.2" in firewall.set_elements(w.name, firewall.name_set(1, 4),
                                                       netns=w.parent.name)
        assert SERVER in firewall.set_elements(w.name, firewall.name_set(1, 6),
                                               netns=w.parent.name)
        # A name no rule allows: refused, and its address stays blocked (and counted).
        before = w6.counters()["egress_blocked"].packets
        assert query(e, "other6.test", "AAAA") == {"rcode": "REFUSED", "addresses": []}
        assert w6.get(e, f"http://[{DENIED}]/", timeout=1.5) is None
        assert w6.counters()["egress_blocked"].packets > before
        assert w6.counters()["allow ok6.test"].packets > 0
    finally:
        w.close()


# A TCP sink that answers how many bytes it took, and a client that sends N bytes to it.
TCP_SINK = """\
import socket, sys
s = socket.socket(socket.AF_INET6)  # and IPv4, mapped
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 9000))
s.listen()
while True:
    c, _ = s.accept()
    n = 0
    while data := c.recv(65536):
        n += len(data)
    c.sendall(str(n).encode())
    c.close()
"""

TCP_SEND = """\
import socket, sys
c = socket.create_connection((sys.argv[1], 9000), timeout=float(sys.argv[3]))
c.sendall(b"x" * int(sys.argv[2]))
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode())
"""

FAR = "2001:db8:400::2"
FAR4 = "203.0.113.2"


def received(w: World) -> int:
    """Bytes the parent's wg0 received from its peers so far (WireGuard messages, all told)."""
    return sum(p["rx_bytes"] for p in uapi_get(str(w.parent_uapi()))["peers"])

def test_path_mtu_discovery_through_the_tunnel(world6: World6) -> None:
    """A bulk upload from the enclave to a host behind a 1280-byte link: the internet's router
    sends "packet too big" to the parent's address, the parent's NAT hands it to the enclave,
    whose kernel then sends smaller segments (and TSO super-packets of them). Before, the
    enclave's super-packets crossed the tunnel without their segment size and the parent cut
    them at the tunnel's MTU again: every one too big for the path, the upload stalled.
    IPv4 likewise, with ICMP "fragmentation needed" (TCP sets DF). Then the super-packets
    cut finer than the tunnel's MTU must still cross whole, with their segment size."""
    w, lab = world6.w, world6.w.lab
    far = lab.netns("f")
    for ns in (w.internet, far):
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    w.internet.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
    router_side, far_side = lab.veth(w.internet, "2001:db8:400::1/64", far, f"{FAR}/64")
    w.internet.ip("addr", "add", "203.0.113.1/24", "dev", router_side)
    far.ip("addr", "add", f"{FAR4}/24", "dev", far_side)
    far.ip("-6", "route", "add", "default", "via", "2001:db8:400::1")
    far.ip("route", "add", "default", "via", "203.0.113.1")
    far.popen(sys.executable, "-c", TCP_SINK)

    def send(ns: Namespace, n: int, timeout: float, to: str = FAR) -> str | None:
        res = ns.run(sys.executable, "-c", TCP_SEND, to, str(n), str(timeout), check=False,
                     timeout=timeout + 30)
        return res.stdout.strip() if res.returncode == 0 else None

    for to in (FAR, FAR4):
        wait_for(lambda t=to: send(w.parent, 10, 2, t) == "10", 10,
                 f"the far host's sink on {to}, from the parent")
    w.parent_cmd("up")
    w.start_enclave()
    wait_for(world6.egress6_works, 30, "the enclave's IPv6 egress")
    w.internet.ip("link", "set", router_side, "mtu", "1280")
    n = 4 << 20
    assert send(w.enclave, n, 60) == str(n)
    # The enclave learnt the path's MTU from the router's ICMPv6 error.
    assert "mtu 1280" in w.enclave.ip("-6", "route", "get", FAR).stdout
    assert send(w.enclave, n, 60, FAR4) == str(n)
    assert "mtu 1280" in w.enclave.ip("route", "get", FAR4).stdout
    # Now the path's MTU is known: the enclave's super-packets of 1208/1228-byte segments
    # cross the tunnel whole, with their segment size (CAP_SEGMENT_SIZE), and the parent's
    # kernel cuts them. What the parent's wg0 received per byte sent shows it: 1.002 for
    # both families. Before, they crossed one segment per message, each with its own IP and
    # TCP headers and 32 bytes of WireGuard: 1.086 (IPv6) and 1.069 (IPv4).
    for to in (FAR, FAR4):
        before = received(w)
        assert send(w.enclave, n, 60, to) == str(n)
        assert (received(w) - before) / n < 1.04, to


# Prints the source, type and code of each ICMPv6 message that reaches this namespace.
ICMP6_SINK = """\
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
while True:
    data, peer = s.recvfrom(4096)
    print(peer[0], data[0], data[1], flush=True)
"""

# An ICMPv6 port unreachable from argv[1] to argv[2], quoting a UDP packet argv[2] never
# sent: no connection has it, so conntrack relates it to nothing (ct state invalid).
FORGE_UNREACHABLE = """\
import socket, struct, sys
src, dst = (socket.inet_pton(socket.AF_INET6, a) for a in sys.argv[1:3])
udp = struct.pack("!HHHH", 40000, 9999, 8, 0)
quoted = struct.pack("!IHBB", 0x60000000, len(udp), 17, 64) + dst + src + udp
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.sendto(struct.pack("!BBHI", 1, 4, 0, 0) + quoted, (sys.argv[2], 0))
"""


def test_packets_conntrack_cannot_place_do_not_leave_unnatted(world6: World6) -> None:
    """A packet from the enclave that conntrack relates to no connection (ct state invalid:
    here an ICMPv6 error quoting a flow that never was) gets no NAT. Before, `allow ::/0`
    passed it, and it reached the internet from fd77::2, the enclave's own tunnel address.
    Now it is dropped and counted as blocked; a ping, which conntrack tracks, still goes."""
    w = world6.w
    out = w.lab.tmp / "icmp6-sink.txt"
    with out.open("w") as f:
        w.internet.popen(sys.executable, "-c", ICMP6_SINK, stdout=f)
    w.parent_cmd("up")
    w.start_enclave()
    wait_for(world6.egress6_works, 30, "the enclave's IPv6 egress")
    # The sink is up once it has seen a ping's echo request (type 128), masqueraded.
    wait_for(lambda: w.enclave.run("ping", "-6", "-c1", "-W1", SERVER, check=False)
             .returncode == 0 and f"{PARENT} 128 0" in out.read_text(), 10,
             "the internet's ICMPv6 sink to see the enclave's ping")
    before = world6.counters()["egress_blocked"].packets
    for _ in range(3):
        w.enclave.run(sys.executable, "-c", FORGE_UNREACHABLE, "fd77::2", SERVER)
    # A ping after them, through the same path: when its request is seen, so would they be.
    assert w.enclave.run("ping", "-6", "-c1", "-W5", SERVER, check=False).returncode == 0
    wait_for(lambda: out.read_text().count(f"{PARENT} 128 0") >= 2, 10,
             "the internet's ICMPv6 sink to see the second ping")
    seen = out.read_text().splitlines()
    assert not [line for line in seen if line.split()[1] == "1"], seen
    assert not [line for line in seen if line.startswith("fd77:")], seen
    assert world6.counters()["egress_blocked"].packets >= before + 3
