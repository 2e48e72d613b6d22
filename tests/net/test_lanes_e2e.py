"""The lanes (device/_lane.c) end to end: two of our daemons over a stream transport with
offload on, so each side's hello offers super-packets, partial checksums and CRC 0 and the
steady state runs in the lanes. Under real traffic they must keep the protocol's rules:
cryptokey routing both ways (a source the peer is not allowed, a destination no peer is
allowed) and byte counters that agree across a new handshake made mid-transfer.

That the lanes carried the traffic is seen with strace: the send lane sends each run of
frames with send(2) (sendto, MSG_DONTWAIT), the ordinary path with sendmsg(2); the receive
lane writes each packet to the TUN with write(2), the ordinary path with writev(2). The same
look with WGVSOCK_LANES=0 sees only the ordinary calls, so the look is not vacuous.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .lanetrace import lanes_carried, traced
from .netlab import Lab, Namespace, connect_pair, csum_errors, nft_counters, ping, wait_for

pytestmark = [pytest.mark.root]

A_TUN, B_TUN = "10.99.0.1", "10.99.0.2"


class Inner:
    """The tunnel's addresses for one IP version (the lanes check each in its own way)."""

    def __init__(self, a: str, b: str, spoof: str, plen: int, strays: tuple[str, str],
                 route: str, nft: str) -> None:
        self.a, self.b, self.spoof, self.plen = a, b, spoof, plen
        self.strays, self.route, self.nft = strays, route, nft


# spoof: on a's interface, outside b's allowed IPs for a (a's address alone). strays: outside
# a's allowed IPs for b, the first inside the interface's prefix, the second by a route.
INNER = {
    "ipv4": Inner("10.99.0.1", "10.99.0.2", "10.99.1.1", 32, ("10.99.0.3", "10.99.7.7"),
                  "10.99.7.0/24", "ip"),
    "ipv6": Inner("fd99::1", "fd99::2", "fd98::1", 128, ("fd99::3", "2001:db8:7::7"),
                  "2001:db8:7::/64", "ip6"),
}


def _pair(lab: Lab, network: str, lanes: str = "1", inner: Inner = INNER["ipv4"],
          ) -> tuple[Namespace, Namespace, str, str]:
    """Our daemons in a and b over `network`, offload on (the lanes need it), with `inner`'s
    tunnel addresses; no IPv6 link-local addresses (no router solicitations: whatever the
    kernels send into the tunnel is the test's)."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    for ns in (a, b):
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.addr_gen_mode=1")
    if network == "tcp":
        lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
        ep = "192.168.77.2:7002"
    else:
        ep = "127.0.0.1:7002"  # unix: host ignored, port names <unix_dir>/7002.sock
    for ns, ifname in ((a, ia), (b, ib)):
        lab.start_daemon(ns, ifname, network, WGVSOCK_OFFLOAD="1", WGVSOCK_LANES=lanes,
                         LOG_LEVEL="debug")  # (the drops and their reasons)
    ka, kb = connect_pair(lab, a, ia, ep, b, ib, None, a_port=7001, b_port=7002,
                          a_tun=inner.a, b_tun=inner.b)
    # Each allows the other's address alone (connect_pair's /32 is a /32 in IPv6 too).
    a.wg("set", ia, "peer", kb.public_b64, "allowed-ips", f"{inner.b}/{inner.plen}")
    b.wg("set", ib, "peer", ka.public_b64, "allowed-ips", f"{inner.a}/{inner.plen}")
    ping(a, inner.b)
    for ifname in (ia, ib):
        assert lab.uapi(ifname)["extra"]["wgvsock_tun_offload"] == "on", ifname
    return a, b, ia, ib


def _peer(ifname: str) -> dict:
    [peer] = Lab.uapi(ifname)["peers"]
    return peer


def _nft(ns: Namespace, ifname: str, rules: dict[str, str]) -> None:
    """A table `inet wgvtest` counting what `ns`'s kernel gets from the TUN `ifname`, before
    anything else looks at it, one rule per comment."""
    body = "".join(f'    iifname "{ifname}" {match} counter comment "{name}"\n'
                   for name, match in rules.items())
    ns.run("nft", "-f", "-", input=(
        "table inet wgvtest {\n  chain pre {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        f"{body}  }}\n}}\n"))


# (Not the whole product of networks, families and lanes on/off: each is in one case, to keep
# the suite's time. The lanes do not look at the transport's kind beyond "a stream".)
@pytest.mark.parametrize(("network", "lanes", "inner"), [
    ("tcp", "1", "ipv4"), ("unix", "1", "ipv6"), ("tcp", "0", "ipv4")])
def test_a_spoofed_inner_source_is_not_delivered(lab: Lab, network: str, lanes: str,
                                                  inner: str) -> None:
    """a's interface gets a second address, outside what b allows for a; pings from it reach
    b (a's allowed IPs for b take the destination) and b must drop them, while pings from a's
    real address, at the same time, come back. With the lanes on they carried the real
    pings both ways (strace), the spoofed ones were handed back to the ordinary path, whose
    drop reason is in b's log; with WGVSOCK_LANES=0 the same look sees no lane at all."""
    x = INNER[inner]
    a, b, ia, ib = _pair(lab, network, lanes, x)
    a.ip("addr", "add", f"{x.spoof}/{x.plen}", "dev", ia, *(["nodad"] if x.plen == 128 else []))
    _nft(b, ib, {"spoofed": f"{x.nft} saddr {x.spoof}", "real": f"{x.nft} saddr {x.a}"})
    with traced(a) as on_a, traced(b) as on_b:
        spoofed = a.popen("ping", "-c", "20", "-i", "0.05", "-W", "1", "-I", x.spoof, x.b)
        # (From a's address by name: IPv6 would pick the /128 as the source of fd99::2.)
        a.run("ping", "-c", "10", "-i", "0.2", "-W", "3", "-I", x.a, x.b)
        assert spoofed.wait(15) != 0  # no reply to any
    counts = nft_counters(b)
    assert counts["spoofed"] == 0, counts
    assert counts["real"] >= 10, counts
    assert "dropped: inner source address not allowed for this peer" in lab.log(ib)
    # (Not the lanes alone: a message after a spoofed one in the same read goes the
    # ordinary way with it, as the lane stops at the first it is not sure of.)
    if lanes == "1":
        assert lanes_carried(on_a, only=False) and lanes_carried(on_b, only=False), (
            on_a, on_b)
    else:
        assert on_a["sendto"] == on_b["sendto"] == on_a["write_tun"] == on_b["write_tun"] == 0
        assert min(on_a["sendmsg"], on_b["sendmsg"], on_b["writev_tun"]) > 0, (on_a, on_b)
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "3", "-I", x.a, x.b)  # and the tunnel works
    ping(b, x.a)


@pytest.mark.parametrize(("network", "inner"), [("tcp", "ipv6"), ("unix", "ipv4")])
def test_a_destination_the_peer_is_not_allowed_is_not_sent(lab: Lab, network: str,
                                                           inner: str) -> None:
    """Packets a's kernel routes into the tunnel for addresses outside b's allowed IPs (one
    inside the interface's /24, one through a route of its own) are read by a's send lane,
    handed back and dropped by the ordinary path: a's tx_bytes and b's rx_bytes do not move,
    b's kernel sees none of them; real pings before and after go by the lanes."""
    x = INNER[inner]
    a, b, ia, ib = _pair(lab, network, inner=x)
    a.ip("route", "add", x.route, "dev", ia)
    _nft(b, ib, {"stray": f"{x.nft} daddr {{ {', '.join(x.strays)} }}",
                 "real": f"{x.nft} daddr {x.b}"})
    with traced(a) as on_a:
        ping(a, x.b, 3)  # b's answer arms no keepalive for 10 s: the counters stay still
        before = _peer(ia)["tx_bytes"], _peer(ib)["rx_bytes"]
        for stray in x.strays:
            res = a.run("ping", "-c", "5", "-i", "0.05", "-W", "1", stray, check=False)
            assert res.returncode != 0
        assert (_peer(ia)["tx_bytes"], _peer(ib)["rx_bytes"]) == before
        wait_for(lambda: lab.log(ia).count(
            "dropped: no peer has an allowed IP for the destination") >= 10, 5,
            "a to drop the ten stray pings")
        ping(a, x.b, 3)
    assert lanes_carried(on_a), on_a
    counts = nft_counters(b)
    assert counts["stray"] == 0 and counts["real"] >= 6, counts


@pytest.mark.parametrize("network", ["tcp"])
def test_counters_agree_after_a_new_handshake_mid_transfer(lab: Lab, network: str) -> None:
    """Bulk TCP both ways through the lanes; mid-transfer the peers are removed and set anew
    on both sides (b first, without an endpoint, then a with one: nothing is sent before a's
    new handshake), so the transfer goes on over a new session that starts every counter
    at 0. Once the traffic stops, each side's tx_bytes is exactly the other's rx_bytes, the
    transfer moved bulk both ways after the handshake, and the lanes carry traffic still."""
    a, b, ia, ib = _pair(lab, network)
    a_pub, b_pub = (ns.wg("show", i, "public-key").stdout.strip() for ns, i in ((a, ia), (b, ib)))
    ep = _peer(ia)["endpoint"]
    b.popen("iperf3", "-s", "-1", "-B", B_TUN)
    wait_for(lambda: f"{B_TUN}:5201" in b.run("ss", "-ltnH", check=False).stdout, 10,
             "iperf3 -s")
    client = a.popen("iperf3", "-c", B_TUN, "-J", "--bidir", "-t", "5",
                     stdout=subprocess.PIPE, text=True)
    first = _peer(ia)["last_handshake_time_sec"], _peer(ia)["last_handshake_time_nsec"]
    wait_for(lambda: min(_peer(ia)["rx_bytes"], _peer(ia)["tx_bytes"]) > 20 << 20, 5,
             "bulk both ways")
    b.wg("set", ib, "peer", a_pub, "remove")
    a.wg("set", ia, "peer", b_pub, "remove")
    b.wg("set", ib, "peer", a_pub, "allowed-ips", f"{A_TUN}/32")
    a.wg("set", ia, "peer", b_pub, "allowed-ips", f"{B_TUN}/32", "endpoint", ep)
    out, _ = client.communicate(timeout=30)
    result = json.loads(out)
    assert "error" not in result, result["error"]
    moved = [s["receiver"]["bytes"] for s in result["end"]["streams"]]
    assert len(moved) == 2 and min(moved) > 20 << 20, moved
    assert csum_errors(a) == csum_errors(b) == 0  # every segment arrived whole

    def agree() -> tuple[int, int] | None:
        pa, pb = _peer(ia), _peer(ib)
        if (pa["tx_bytes"], pa["rx_bytes"]) == (pb["rx_bytes"], pb["tx_bytes"]):
            return pa["tx_bytes"], pa["rx_bytes"]
        return None

    tx, rx = wait_for(agree, 5, "the transfer counters to agree")
    # The new session carried bulk both ways (its counters began at 0 with its handshake).
    assert min(tx, rx) > 10 << 20, (tx, rx)
    second = _peer(ia)["last_handshake_time_sec"], _peer(ia)["last_handshake_time_nsec"]
    assert second > first
    with traced(a) as on_a, traced(b) as on_b:
        ping(a, B_TUN, 3)
        ping(b, A_TUN, 3)
    assert lanes_carried(on_a), on_a
    assert lanes_carried(on_b), on_b
    wait_for(agree, 5, "the transfer counters to agree after the pings")
