"""Interop with the Go seed, wireguard-go-vsock v0.2.5, over its TCP framing (`-n tcp` only:
its vsock mode would dial out of this VM).

Our daemon runs with segmentation offload on, so it sends its capability hello on every
connection: the seed must ignore it and get only MTU-sized packets. Then a forwarding peer
(the parent's NAT case) in the middle of three namespaces: the seed, our daemon with offload
off, and our daemon with offload on in front of a seed; bulk TCP both ways through it must
run, not stall (an unsegmented super-packet cannot leave by an MTU-1500 veth).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from wgvsock.device.tun import NATIVE_SEGMENTATION

from .netlab import Lab, Namespace, connect_pair, csum_errors, ping, wait_for

pytestmark = [pytest.mark.root]

BULK = 20 * 1024 * 1024
A_VETH, B_VETH = "192.168.79.1", "192.168.79.2"
F_VETH, T_VETH = "192.168.80.1", "192.168.80.2"
A_TUN, B_TUN = "10.99.0.1", "10.99.0.2"
F6_VETH, T6_VETH = "fd80::1", "fd80::2"
A6_TUN, B6_TUN = "fd99::1", "fd99::2"
A_PORT, B_PORT = 7001, 7002


@dataclass
class Side:
    kind: str  # "seed", "ours" or "ours-nooffload"
    ns: Namespace
    ifname: str

    def transfer(self) -> tuple[int, int]:
        """(rx, tx) bytes for the one peer, from `wg show IF transfer`."""
        lines = [x for x in self.ns.wg("show", self.ifname, "transfer").stdout.splitlines() if x]
        assert len(lines) == 1, f"{self.kind}: expected one peer in {lines!r}"
        rx, tx = lines[0].split("\t")[1:]
        return int(rx), int(tx)


def _start(lab: Lab, ns: Namespace, label: str, kind: str, seed: Path) -> Side:
    ifname = lab.ifname(label)
    if kind == "seed":
        lab.start_seed(ns, ifname, seed)
    else:
        lab.start_daemon(ns, ifname, "tcp", WGVSOCK_OFFLOAD="0" if kind.endswith("off") else "1")
    return Side(kind, ns, ifname)


def _pair(lab: Lab, seed: Path, a_kind: str, b_kind: str, listener: str) -> tuple[Side, Side]:
    """Side a (10.99.0.1) in namespace "a" and side b (10.99.0.2) in "b" across a veth; only
    `listener` ("a" or "b") has a listen port, the other dials it."""
    na, nb = lab.netns("a"), lab.netns("b")
    lab.veth(na, f"{A_VETH}/24", nb, f"{B_VETH}/24")
    a, b = _start(lab, na, "a", a_kind, seed), _start(lab, nb, "b", b_kind, seed)
    if listener == "b":
        connect_pair(lab, na, a.ifname, f"{B_VETH}:{B_PORT}", nb, b.ifname, None,
                     b_port=B_PORT, a_tun=A_TUN, b_tun=B_TUN)
    else:
        connect_pair(lab, nb, b.ifname, f"{A_VETH}:{A_PORT}", na, a.ifname, None,
                     b_port=A_PORT, a_tun=B_TUN, b_tun=A_TUN)
    return a, b


def _ping_from_dialer_first(a: Side, b: Side, listener: str) -> None:
    """Only the dialer knows an endpoint: its packet brings the tunnel up."""
    if listener == "a":
        ping(b.ns, A_TUN)
    ping(a.ns, B_TUN)
    ping(b.ns, A_TUN)


def _bulk_both_ways(server: Namespace, client: Namespace, addr: str) -> None:
    for port, args in ((5301, ("-n", "20M")), (5302, ("-n", "20M", "-R"))):
        # A port per run: a one-shot server still closing must not take the next client.
        srv = server.popen("iperf3", "-s", "-1", "-B", addr, "-p", str(port))
        listening = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        wait_for(lambda at=listening: at in server.run("ss", "-ltnH").stdout, 10, "iperf3 -s")
        # A stalled transfer (what an unsegmented super-packet causes) runs into the timeout.
        res = client.run("iperf3", "-c", addr, "-p", str(port), "-J", *args, timeout=90,
                         check=False)
        srv.wait(10)
        result = json.loads(res.stdout)
        assert "error" not in result, (args, result["error"])
        assert result["end"]["sum_sent"]["bytes"] >= BULK, args
        assert result["end"]["sum_received"]["bits_per_second"] > 1e6, args


@pytest.mark.parametrize("listener", ["seed", "ours"])
def test_ping_both_ways_and_exact_counters(lab: Lab, seed: Path, listener: str) -> None:
    ours, go = _pair(lab, seed, "ours", "seed", "b" if listener == "seed" else "a")
    dialer, accepter = (ours, go) if listener == "seed" else (go, ours)
    other = {ours.ns.name: B_TUN, go.ns.name: A_TUN}
    ping(dialer.ns, other[dialer.ns.name])
    ping(accepter.ns, other[accepter.ns.name])
    # Full-size packets (1420-byte MTU) both ways, as the seed must take them.
    ping(dialer.ns, other[dialer.ns.name], size=1392)
    ping(accepter.ns, other[accepter.ns.name], size=1392)

    def agree() -> tuple[int, int] | None:
        rx, tx = ours.transfer()
        return (rx, tx) if (tx, rx) == go.transfer() and rx and tx else None

    # Exact: every byte one side sent, the other received (our hello is not a WireGuard
    # message and counts nowhere); waited for, as a keepalive may be in flight.
    wait_for(agree, 10, "byte counters of ours and the seed to agree")
    assert "bad packet checksum" not in lab.log(go.ifname)


@pytest.mark.parametrize("listener", ["seed", "ours"])
def test_bulk_tcp_both_ways(lab: Lab, seed: Path, listener: str) -> None:
    side = "b" if listener == "seed" else "a"
    ours, go = _pair(lab, seed, "ours", "seed", side)
    _ping_from_dialer_first(ours, go, side)
    _bulk_both_ways(go.ns, ours.ns, B_TUN)
    # The seed sends no hello, so what we sent it was cut and checksummed: by us in C from
    # super-packets in a compiled build, else by our kernel. Its kernel found no bad one.
    assert csum_errors(go.ns) == 0
    want = "on" if NATIVE_SEGMENTATION else "off"
    assert lab.uapi(ours.ifname)["extra"]["wgvsock_tun_offload"] == want


# (sender kind, forwarder kind): the forwarder is side b, in the middle.
FORWARDING = {
    "through-seed": ("ours", "seed"),
    "through-ours-offload-off": ("ours", "ours-offload-off"),
    "seed-through-ours": ("seed", "ours"),
}


def _forwarding_to_t(lab: Lab, a: Side, b: Side) -> Namespace:
    """t, a third namespace behind b on a veth of MTU 1500, which b forwards a's traffic to,
    masquerading, as a parent does; a routes t's address through the tunnel."""
    t = lab.netns("t")
    lab.veth(b.ns, f"{F_VETH}/24", t, f"{T_VETH}/24")
    b.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    b.ns.run("nft", "-f", "-", input=(
        "table ip wgvnat {\n  chain post {\n    type nat hook postrouting priority 100;\n"
        f"    ip saddr {A_TUN} ip daddr {T_VETH} masquerade\n  }}\n}}\n"
    ))
    b_pub = b.ns.wg("show", b.ifname, "public-key").stdout.strip()
    a.ns.wg("set", a.ifname, "peer", b_pub, "allowed-ips", f"{B_TUN}/32,{T_VETH}/32")
    a.ns.ip("route", "add", f"{T_VETH}/32", "dev", a.ifname)
    return t


@pytest.mark.parametrize("listener", ["forwarder", "sender"])
@pytest.mark.parametrize("case", list(FORWARDING))
def test_bulk_tcp_forwarded_to_a_third_namespace(
    lab: Lab, seed: Path, case: str, listener: str
) -> None:
    """a -- tunnel -- b (forwards, masquerading, as a parent does) -- veth MTU 1500 -- t."""
    a_kind, b_kind = FORWARDING[case]
    side = "b" if listener == "forwarder" else "a"
    a, b = _pair(lab, seed, a_kind, b_kind, side)
    t = _forwarding_to_t(lab, a, b)
    _ping_from_dialer_first(a, b, side)
    ping(a.ns, T_VETH)
    _bulk_both_ways(t, a.ns, T_VETH)


# 65000: the pieces' segments are finer than the MTU, so they cross with their segment size;
# 1500: they are the MTU's, so the second piece (one segment) is written as a plain packet;
# for IPv6, 1520: the tunnel's MTU is the veth's, so the segments are the MTU's, as 1500 is.
@pytest.mark.parametrize("family, mtu", [("4", "65000"), ("4", "1500"), ("6", "65000"),
                                         ("6", "1520")])
def test_super_packets_cut_to_fit_a_message_leave_the_forwarder_with_good_checksums(
    lab: Lab, family: str, mtu: str
) -> None:
    """a (ours) -- tunnel MTU 65000 or 1500 -- b (ours, forwarding) -- veth MTU 1500 -- t.
    a's uploads to t are TCP super-packets of 45 segments of t's MSS (65232 bytes), longer
    than a message carries: a cuts each into two that fit, at 65000 with their segment size,
    their TCP checksums left partial (b takes CAP_PARTIAL_CSUM). b's kernel finishes each
    segment's checksum from that partial one as it forwards them to t. With the partial sum
    made wrong on purpose, t's kernel counted 290 bad checksums in one run (the uploads still
    completed, by retransmissions). At 1500 the one-segment piece goes to b's TUN as no
    segmentation job: only its NEEDS_CSUM has b's kernel finish it.

    The same with IPv6 inside the tunnel and beyond the forwarder (GSO TCPV6 super-packets):
    with the pieces' partial sums made wrong on purpose (IPv6 only), t's kernel counted 262
    and 276 bad checksums. Before, only split_tso's unit tests cut IPv6 pieces."""
    a, b = _pair(lab, Path(), "ours", "ours", "b")  # (no seed in this one)
    for side in (a, b):
        side.ns.ip("link", "set", side.ifname, "mtu", mtu)
    t, far = (_forwarding_to_t(lab, a, b), T_VETH) if family == "4" else \
        (_forwarding_to_t6(lab, a, b), T6_VETH)
    _ping_from_dialer_first(a, b, "b")
    ping(a.ns, far)
    _bulk_both_ways(t, a.ns, far)
    assert csum_errors(t) == 0
    assert csum_errors(a.ns) == 0


# Receives one TCP connection on (argv[1], argv[2]) and prints how many bytes came.
_RECEIVE = """\
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
c, _ = s.accept()
n = 0
while data := c.recv(1 << 16):
    n += len(data)
print(n, flush=True)
"""

# Connects to (argv[1], argv[2]) and sends argv[3] bytes, says "sent" and waits for a line on
# stdin, then sends argv[4] bytes more and closes.
_SEND = """\
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"w" * int(sys.argv[3]))
print("sent", flush=True)
sys.stdin.readline()
s.sendall(b"s" * int(sys.argv[4]))
s.close()
"""


def _pid_of(ns: Namespace, ifname: str) -> int:
    """The daemon in `ns` that serves `ifname`."""
    [pid] = [p for p in ns.pids()
             if ifname.encode() in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
    return pid


def _tun_reads(ns: Namespace, ifname: str) -> int:
    """Packets the kernel gave the TUN `ifname` to read (its tx count)."""
    [link] = json.loads(ns.ip("-s", "-j", "link", "show", ifname).stdout)
    return link["stats64"]["tx"]["packets"]


def _forwarding_to_t6(lab: Lab, a: Side, b: Side) -> Namespace:
    """_forwarding_to_t for IPv6: the veth to t carries IPv6 only, and b masquerades a's
    IPv6 address to t. Its MTU is 1520, so t's MSS (1448) is the IPv4 test's and a's
    super-packets to t are as long (45 segments, 65232 bytes, with IPv6's longer header):
    at 1500 they would be 64332, which a message carries whole. (`nodad`: duplicate address
    detection would keep the addresses unusable for a second or more.)"""
    t = lab.netns("t")
    vb, vt = lab.veth(b.ns, f"{F6_VETH}/64", t, f"{T6_VETH}/64")
    b.ns.ip("link", "set", vb, "mtu", "1520")
    t.ip("link", "set", vt, "mtu", "1520")
    for side, addr in ((a, A6_TUN), (b, B6_TUN)):
        side.ns.ip("-6", "addr", "add", f"{addr}/64", "dev", side.ifname, "nodad")
    for ns, ifname, addr in ((b.ns, vb, F6_VETH), (t, vt, T6_VETH)):
        ns.ip("-6", "addr", "del", f"{addr}/64", "dev", ifname)
        ns.ip("-6", "addr", "add", f"{addr}/64", "dev", ifname, "nodad")
    b.ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    b.ns.run("nft", "-f", "-", input=(
        "table ip6 wgvnat {\n  chain post {\n    type nat hook postrouting priority 100;\n"
        f"    ip6 saddr {A6_TUN} ip6 daddr {T6_VETH} masquerade\n  }}\n}}\n"
    ))
    a_pub = a.ns.wg("show", a.ifname, "public-key").stdout.strip()
    b_pub = b.ns.wg("show", b.ifname, "public-key").stdout.strip()
    a.ns.wg("set", a.ifname, "peer", b_pub, "allowed-ips",
            f"{B_TUN}/32,{B6_TUN}/128,{T6_VETH}/128")
    b.ns.wg("set", b.ifname, "peer", a_pub, "allowed-ips", f"{A_TUN}/32,{A6_TUN}/128")
    a.ns.ip("-6", "route", "add", f"{T6_VETH}/128", "dev", a.ifname)
    return t


def test_packets_staged_for_an_offload_peer_reach_the_seed_that_replaced_it_intact(
    lab: Lab, seed: Path
) -> None:
    """a (ours) dials b (ours, offload on); b freezes and a's link goes down and up, so a has
    no session but still b's connection, whose hello offered super-packets and partial
    checksums: what a reads meanwhile is staged until a handshake. b dies, the seed takes
    its place (same key and port), and the handshake a's retry makes with it flushes the
    staged packets to the seed, which writes them to its TUN as they are. Before, they kept
    the form chosen for b: the seed's kernel counted 3 or 4 bad TCP checksums a run (the
    transfer still completed, by retransmissions)."""
    a, b = _pair(lab, seed, "ours", "ours", "b")
    _ping_from_dialer_first(a, b, "b")
    receiver = b.ns.popen(sys.executable, "-c", _RECEIVE, B_TUN, "5303",
                          stdout=subprocess.PIPE, text=True)
    wait_for(lambda: f"{B_TUN}:5303" in b.ns.run("ss", "-ltnH").stdout, 10, "the receiver")
    sender = a.ns.popen(sys.executable, "-c", _SEND, B_TUN, "5303", str(4 << 20),
                        str(1 << 20), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sender.stdout is not None and sender.stdin is not None
    assert sender.stdout.readline() == "sent\n"
    assert lab.uapi(a.ifname)["extra"]["wgvsock_tun_offload"] == "on"

    b_pid = _pid_of(b.ns, b.ifname)
    os.kill(b_pid, signal.SIGSTOP)
    a.ns.ip("link", "set", a.ifname, "down")
    a.ns.ip("link", "set", a.ifname, "up")
    before = _tun_reads(a.ns, a.ifname)
    sender.stdin.write("go\n")
    sender.stdin.flush()
    # The first window and a retransmission or two, read by a and staged.
    wait_for(lambda: _tun_reads(a.ns, a.ifname) >= before + 3, 10, "a to read the upload")
    os.kill(b_pid, signal.SIGKILL)
    wait_for(lambda: b.ifname not in b.ns.ip("-br", "link").stdout, 10, "b's TUN to go")

    go = lab.ifname("g")
    lab.start_seed(b.ns, go, seed)
    a_pub = a.ns.wg("show", a.ifname, "public-key").stdout.strip()
    b.ns.wg("set", go, "private-key", str(lab.tmp / f"{b.ifname}.key"), "listen-port",
            str(B_PORT), "peer", a_pub, "allowed-ips", f"{A_TUN}/32")
    b.ns.ip("addr", "add", f"{B_TUN}/24", "dev", go)
    b.ns.ip("link", "set", go, "up")

    # (TCP retransmits what the seed's kernel refused, so the upload completes either way.)
    out, _ = receiver.communicate(timeout=90)
    assert int(out) == (4 << 20) + (1 << 20)
    assert sender.wait(10) == 0
    assert csum_errors(b.ns) == 0
