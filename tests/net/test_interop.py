"""Interop with Debian's wireguard-go: our daemon (`-n udp`) and theirs, across a veth.

Namespace "o" runs our daemon, namespace "g" runs wireguard-go; a veth joins them. Only the
side named as initiator is given an endpoint, so only its first packet can start a handshake.
nftables counters in each namespace count the handshake messages each side puts on the wire
(UDP payloads of 148 bytes starting with type 1, and of 92 bytes starting with type 2), which
tells us which side really initiated.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from .netlab import (
    Lab,
    Namespace,
    connect_pair,
    csum_errors,
    iperf3,
    nft_counters,
    ping,
    wait_for,
)

pytestmark = [pytest.mark.root]

OURS_VETH = "192.168.78.1"
GO_VETH = "192.168.78.2"

INITIATION_UDP_LENGTH = 8 + 148
RESPONSE_UDP_LENGTH = 8 + 92

REKEY_AFTER_TIME = 120


@dataclass
class Side:
    kind: str  # "ours" or "go"
    ns: Namespace
    ifname: str
    veth_ip: str
    tun_ip: str
    port: int

    def wg_fields(self, what: str) -> list[str]:
        """`wg show IF what` for the one peer: the fields after the public key."""
        out = self.ns.wg("show", self.ifname, what).stdout.split("\n")
        lines = [line for line in out if line.strip()]
        assert len(lines) == 1, f"{self.kind}: expected one peer in {out!r}"
        return lines[0].split("\t")[1:]

    def latest_handshake(self) -> int:
        return int(self.wg_fields("latest-handshakes")[0])

    def transfer(self) -> tuple[int, int]:
        rx, tx = self.wg_fields("transfer")
        return int(rx), int(tx)

    def endpoint(self) -> str:
        return self.wg_fields("endpoints")[0]

    def handshakes_sent(self) -> tuple[int, int]:
        """(initiations, responses) this side has sent from its listen port."""
        counts = nft_counters(self.ns)
        return counts[f"init-{self.port}"], counts[f"resp-{self.port}"]


@dataclass
class Pair:
    ours: Side
    go: Side
    initiator: Side
    responder: Side

    def sides(self) -> tuple[Side, Side]:
        return self.initiator, self.responder


def _namespaces(lab: Lab) -> tuple[Namespace, Namespace]:
    o, g = lab.netns("o"), lab.netns("g")
    lab.veth(o, f"{OURS_VETH}/24", g, f"{GO_VETH}/24")
    return o, g


def _count_handshake_messages(ns: Namespace, ports: list[int]) -> None:
    """nftables counters of the WireGuard handshake messages sent from each of `ports`."""
    rules = []
    for port in ports:
        rules.append(
            f"udp sport {port} udp length {INITIATION_UDP_LENGTH} @th,64,32 0x01000000 "
            f'counter comment "init-{port}"'
        )
        rules.append(
            f"udp sport {port} udp length {RESPONSE_UDP_LENGTH} @th,64,32 0x02000000 "
            f'counter comment "resp-{port}"'
        )
    ruleset = (
        "table inet wgvtest {\n  chain out {\n"
        "    type filter hook output priority 0; policy accept;\n    "
        + "\n    ".join(rules)
        + "\n  }\n}\n"
    )
    ns.run("nft", "-f", "-", input=ruleset)


def _pair(lab: Lab, o: Namespace, g: Namespace, initiator: str, n: int = 1) -> Pair:
    """Our daemon in `o` and wireguard-go in `g`, peers of each other; only `initiator`
    ("ours" or "go") knows the other's endpoint. Tunnel addresses 10.99.n.1 (ours), .2 (go)."""
    ours = Side("ours", o, lab.ifname(f"o{n}"), OURS_VETH, f"10.99.{n}.1", 51000 + 2 * n)
    go = Side("go", g, lab.ifname(f"g{n}"), GO_VETH, f"10.99.{n}.2", 51001 + 2 * n)
    lab.start_daemon(o, ours.ifname, "udp")
    lab.start_wireguard_go(g, go.ifname)
    init, resp = (ours, go) if initiator == "ours" else (go, ours)
    connect_pair(
        lab,
        init.ns, init.ifname, f"{resp.veth_ip}:{resp.port}",
        resp.ns, resp.ifname, None,
        a_port=init.port, b_port=resp.port, a_tun=init.tun_ip, b_tun=resp.tun_ip,
    )
    # Both listen ports are really bound (wireguard-go binds when the port is set).
    for side in (ours, go):
        wait_for(
            lambda s=side: f":{s.port} " in s.ns.run("ss", "-lunH", check=False).stdout,
            10, f"{side.kind} listening on UDP {side.port}",
        )
    return Pair(ours, go, init, resp)


def _setup(lab: Lab, initiator: str) -> Pair:
    o, g = _namespaces(lab)
    pair = _pair(lab, o, g, initiator)
    for side in pair.sides():
        _count_handshake_messages(side.ns, [side.port])
    return pair


def _counters_agree(pair: Pair) -> bool:
    ours_rx, ours_tx = pair.ours.transfer()
    go_rx, go_tx = pair.go.transfer()
    return ours_tx == go_rx and go_tx == ours_rx


# -- 1 and 2: handshake from either side, ping both ways ------------------------------------


@pytest.mark.parametrize("initiator", ["ours", "go"])
def test_handshake_and_ping_both_ways(lab: Lab, initiator: str) -> None:
    pair = _setup(lab, initiator)
    init, resp = pair.sides()
    assert init.handshakes_sent() == resp.handshakes_sent() == (0, 0)
    assert resp.endpoint() == "(none)"
    assert init.latest_handshake() == resp.latest_handshake() == 0

    # The initiator's first ping is staged, triggers the handshake and goes out after it.
    ping(init.ns, resp.tun_ip)
    assert init.latest_handshake() > 0
    wait_for(resp.latest_handshake, 5, f"{resp.kind} to record the handshake")
    assert init.handshakes_sent() == (1, 0), f"{init.kind} should have sent one initiation"
    assert resp.handshakes_sent() == (0, 1), f"{resp.kind} should have sent one response"
    # The responder learned where the initiator is from the initiation.
    assert resp.endpoint() == f"{init.veth_ip}:{init.port}"

    # Now the other way, on the same session: no new handshake.
    ping(resp.ns, init.tun_ip)
    assert init.handshakes_sent() == (1, 0)
    assert resp.handshakes_sent() == (0, 1)


@pytest.mark.parametrize(("initiator", "same"), [("ours", True), ("go", True), ("ours", False)])
def test_preshared_key(lab: Lab, initiator: str, same: bool) -> None:
    """The preshared key (Noise IKpsk2's psk, mixed in at the response) against wireguard-go:
    the same key on both sides makes the handshake; a different one leaves the initiator
    unable to open the response, so no session, and nothing gets through."""
    pair = _setup(lab, initiator)
    keys = [lab.tmp / "psk-ours", lab.tmp / "psk-go"]
    keys[0].write_text(pair.ours.ns.wg("genpsk").stdout)
    keys[1].write_text(keys[0].read_text() if same else pair.go.ns.wg("genpsk").stdout)
    for side, key in zip((pair.ours, pair.go), keys, strict=True):
        (peer,) = side.ns.wg("show", side.ifname, "peers").stdout.split()
        side.ns.wg("set", side.ifname, "peer", peer, "preshared-key", str(key))
        assert side.wg_fields("preshared-keys") == [key.read_text().strip()]
    init, resp = pair.sides()
    if same:
        ping(init.ns, resp.tun_ip)
        ping(resp.ns, init.tun_ip)
        assert init.latest_handshake() > 0 and resp.latest_handshake() > 0
        return
    assert ping(init.ns, resp.tun_ip, count=2, check=False).returncode != 0
    # The responder answered (it cannot tell before the response), the initiator could not
    # open that answer: no session on either side.
    wait_for(lambda: resp.handshakes_sent()[1] >= 1, 5, f"{resp.kind} to answer")
    assert init.latest_handshake() == 0


# -- 3: TCP bulk through the tunnel ----------------------------------------------------------


@pytest.mark.parametrize("direction", ["ours-to-go", "go-to-ours"])
def test_iperf3_tcp_bulk(lab: Lab, direction: str) -> None:
    pair = _setup(lab, "ours")
    ping(pair.ours.ns, pair.go.tun_ip, count=1)
    # The client always runs beside our daemon; -R makes the server (beside wireguard-go) send.
    args = ["-n", "20M"] + (["-R"] if direction == "go-to-ours" else [])
    result = iperf3(pair.go.ns, pair.ours.ns, pair.go.tun_ip, *args)
    end = result["end"]
    # The sender wrote all 20 MiB into the TCP connection through the tunnel, and the run
    # completed (iperf3 exits non-zero otherwise). iperf3 stops the receiver's count when the
    # sender has written its last byte, so what was still in flight is not in sum_received.
    sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    assert sent >= 20 * 1024 * 1024
    assert received >= 0.8 * sent, (sent, received)
    assert end["sum_received"]["bits_per_second"] > 1e6
    # Ours cuts and checksums the TUN's super-packets in C (a compiled build): every segment
    # reached wireguard-go's side checksummed.
    assert csum_errors(pair.go.ns) == csum_errors(pair.ours.ns) == 0


# -- 4: transfer counters --------------------------------------------------------------------


@pytest.mark.parametrize("initiator", ["ours", "go"])
def test_transfer_counters_agree(lab: Lab, initiator: str) -> None:
    """After a loss-free exchange our tx_bytes are their rx_bytes and the other way round.
    Both count whole WireGuard messages, handshake ones included, so this also checks that
    padding and message sizes match."""
    pair = _setup(lab, initiator)
    init, resp = pair.sides()
    ping(init.ns, resp.tun_ip)
    # Payload sizes around the 16-byte padding steps, and the largest that fits the MTU.
    for size in (0, 1, 15, 16, 17, 1000, 1420 - 28):
        ping(init.ns, resp.tun_ip, 2, size=size)
        ping(resp.ns, init.tun_ip, 2, size=size)
    # Replies may still be in flight right after ping returns: poll until both sides settle.
    wait_for(lambda: _counters_agree(pair), 5, "transfer counters to agree")
    ours_rx, ours_tx = pair.ours.transfer()
    go_rx, go_tx = pair.go.transfer()
    assert (ours_tx, ours_rx) == (go_rx, go_tx)
    # Not vacuous: the handshake and ~60 pings each way are in there.
    assert min(ours_rx, ours_tx) > 60 * 48


# -- 5: rekey after REKEY_AFTER_TIME ---------------------------------------------------------


_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_REPLY = re.compile(r"icmp_seq=(\d+) ttl=")


@pytest.mark.slow
@pytest.mark.apart
def test_rekey_after_120_seconds(lab: Lab) -> None:
    """Two tunnels at once, one where our daemon initiates and one where wireguard-go does,
    each with a 1 s ping running both ways across the REKEY_AFTER_TIME boundary. The
    session's initiator must start a second handshake when it sends data after 120 s, and the
    pings must go on through it."""
    o, g = _namespaces(lab)
    pairs = [_pair(lab, o, g, "ours", 1), _pair(lab, o, g, "go", 2)]
    for ns, kind in ((o, "ours"), (g, "go")):
        _count_handshake_messages(ns, [getattr(p, kind).port for p in pairs])

    first: dict[str, int] = {}
    for pair in pairs:
        init, resp = pair.sides()
        ping(init.ns, resp.tun_ip, count=1)
        first[init.ifname] = init.latest_handshake()
        first[resp.ifname] = wait_for(resp.latest_handshake, 5, "the first handshake")
    started = time.monotonic()

    # 126 pings at 1 s intervals last 125 s: the first handshakes are < 2 s old when they
    # start, so each initiator's 121st ping at the latest (120-121 s after its handshake)
    # crosses REKEY_AFTER_TIME and at least four pings follow the rekey.
    count = 126
    pings: list[tuple[str, subprocess.Popen]] = []
    for pair in pairs:
        for src, dst in (pair.sides(), pair.sides()[::-1]):
            label = f"{src.kind}->{dst.kind} (initiator {pair.initiator.kind})"
            proc = src.ns.popen(
                "ping", "-c", str(count), "-i", "1", "-W", "5", dst.tun_ip,
                stdout=subprocess.PIPE, text=True,
            )
            pings.append((label, proc))

    def rekeyed() -> bool:
        return all(
            side.latest_handshake() > first[side.ifname] for p in pairs for side in p.sides()
        )

    wait_for(
        rekeyed, REKEY_AFTER_TIME + 15, "a second handshake on both tunnels", max_delay=1.0
    )
    rekey_after = time.monotonic() - started

    losses: dict[str, list[int]] = {}
    for label, proc in pings:
        out, _ = proc.communicate(timeout=count + 15)
        m = _PING_SUMMARY.search(out)
        assert m, f"ping {label}: no summary in {out!r}"
        assert int(m[1]) == count, f"ping {label}: {out}"
        replied = {int(seq) for seq in _PING_REPLY.findall(out)}
        assert len(replied) == int(m[2]), f"ping {label}: {out}"
        losses[label] = sorted(set(range(1, count + 1)) - replied)

    for pair in pairs:
        init, resp = pair.sides()
        for side in (init, resp):
            second = side.latest_handshake()
            assert second - first[side.ifname] >= REKEY_AFTER_TIME - 2, (side.kind, second)
        # Exactly one new initiation, and it came from the session's initiator.
        assert init.handshakes_sent() == (2, 0), f"{init.kind} initiates both handshakes"
        assert resp.handshakes_sent() == (0, 2), f"{resp.kind} only responds"

    # A rekey needs no lost packet: the initiator sends on the old keypair until the response
    # arrives, the responder sends on it until the initiator's first packet on the new one,
    # and both keep the old one as "previous" to open packets still in flight. So we expect
    # no loss at all. One lost ping per stream is tolerated (and its icmp_seq printed) only
    # because the veth itself is not the only thing on the path: the sockets' receive queues
    # of two userspace daemons on a loaded CI host can overflow, which WireGuard, like UDP,
    # does not repair. Two losses in one stream are a bug.
    print(f"second handshakes seen {rekey_after:.1f} s after the first; lost icmp_seq {losses}")
    assert all(len(lost) <= 1 for lost in losses.values()), losses
    if not any(losses.values()):
        # Loss-free, so the byte counters still agree, second handshake included.
        for pair in pairs:
            wait_for(lambda p=pair: _counters_agree(p), 5, "transfer counters to agree")
