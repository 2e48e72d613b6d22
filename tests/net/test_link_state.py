"""The interface's link state: `ip link set IF down` ends every session, as wireguard-go's and
the kernel's down do, and nothing is answered while it is down; up again, the tunnel comes
back with a new handshake.

Namespace "o" runs our daemon, "p" its peer: Debian's wireguard-go over UDP, or our daemon
over TCP (the stream transport's stand-in for vsock); a veth joins them.
"""

from __future__ import annotations

import time

import pytest

from .netlab import Lab, Namespace, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]

OURS_PORT = 51200
PEER_PORT = 51201
OURS_TUN = "10.97.0.1"
PEER_TUN = "10.97.0.2"
PEERS = {"wireguard-go": "udp", "ours": "tcp"}


def _pair(lab: Lab, peer: str) -> tuple[Namespace, Namespace, str, str]:
    o, p = lab.netns("o"), lab.netns("p")
    lab.veth(o, "192.168.81.1/24", p, "192.168.81.2/24")
    ours, theirs = lab.ifname("o"), lab.ifname("p")
    network = PEERS[peer]
    lab.start_daemon(o, ours, network, LOG_LEVEL="debug")
    if peer == "wireguard-go":
        lab.start_wireguard_go(p, theirs)
    else:
        lab.start_daemon(p, theirs, network)
    return o, p, ours, theirs


def _handshake(ifname: str) -> tuple[int, int]:
    [peer] = Lab.uapi(ifname)["peers"]
    return peer["last_handshake_time_sec"], peer["last_handshake_time_nsec"]


@pytest.mark.parametrize("peer", PEERS)
def test_down_and_up_again_ends_the_sessions(lab: Lab, peer: str) -> None:
    """Down and at once up again, faster than any look at the flags would notice: the next
    packet needs a new handshake. Before, the session went on as if nothing had happened,
    with the keys of before the down."""
    o, p, ours, theirs = _pair(lab, peer)
    connect_pair(lab, o, ours, f"192.168.81.2:{PEER_PORT}", p, theirs, None,
                 a_port=OURS_PORT, b_port=PEER_PORT, a_tun=OURS_TUN, b_tun=PEER_TUN)
    ping(o, PEER_TUN, count=1)
    first = _handshake(ours)
    assert first != (0, 0)
    # wireguard-go takes one initiation per peer in 20 ms (HandshakeInitationRate) and drops
    # the next as a flood: the new handshake must not come sooner, or the ping waits 5 s for
    # the retry. A wait on the clock, as that rule is one.
    since = time.monotonic()
    wait_for(lambda: time.monotonic() - since > 0.05, 1, "50 ms")
    downs, ups = (lab.log(ours).count(f"{ours}: link {s}") for s in ("down", "up"))
    o.run("ip", "-batch", "-", input=f"link set {ours} down\nlink set {ours} up\n")
    wait_for(lambda: lab.log(ours).count(f"{ours}: link up") > ups, 10,
             "the daemon to see the link up again")
    assert lab.log(ours).count(f"{ours}: link down; sessions ended") == downs + 1
    ping(o, PEER_TUN, count=1)
    second = _handshake(ours)
    assert second > first, (first, second)
    ping(p, OURS_TUN, count=1)  # and the peer's way in works on the new session


@pytest.mark.parametrize("peer", PEERS)
def test_a_link_that_is_down_answers_no_handshake(lab: Lab, peer: str) -> None:
    """A peer that starts a handshake while our link is down gets no response, and our
    counters do not move; once the link is up, our persistent keepalive makes the handshake
    by itself. Before, a down interface answered handshakes and kept sessions."""
    o, p, ours, theirs = _pair(lab, peer)
    connect_pair(lab, p, theirs, f"192.168.81.1:{OURS_PORT}", o, ours,
                 f"192.168.81.2:{PEER_PORT}", a_port=PEER_PORT, b_port=OURS_PORT,
                 a_tun=PEER_TUN, b_tun=OURS_TUN)
    o.ip("link", "set", ours, "down")
    wait_for(lambda: f"{ours}: link down" in lab.log(ours), 10, "the daemon to see the link down")
    o.wg("set", ours, "peer", p.wg("show", theirs, "public-key").stdout.strip(),
         "persistent-keepalive", "1")
    # The peer starts a handshake towards us: its ping cannot get through, but it asks.
    p.run("ping", "-c", "1", "-W", "1", OURS_TUN, check=False)
    wait_for(lambda: "dropped: interface is down" in lab.log(ours), 10,
             "our daemon to drop the peer's handshake")
    state = Lab.uapi(ours)
    assert state["extra"]["wgvsock_link"] == "down"
    [mine] = state["peers"]
    assert (mine["rx_bytes"], mine["tx_bytes"], mine["last_handshake_time_sec"]) == (0, 0, 0)
    # The peer's retry (5 s after its attempt) would make a handshake too. Its peer entry
    # made afresh has no handshake pending and nothing to send (no keepalive, the ping's
    # packet gone), so the one that comes can only be ours, started by the link coming up;
    # a wait shorter than the retry told them apart before, which load could make too short.
    mine_pub = o.wg("show", ours, "public-key").stdout.strip()
    p.wg("set", theirs, "peer", mine_pub, "remove")
    p.wg("set", theirs, "peer", mine_pub, "allowed-ips", f"{OURS_TUN}/32",
         "endpoint", f"192.168.81.1:{OURS_PORT}")
    o.ip("link", "set", ours, "up")
    wait_for(lambda: _handshake(ours) != (0, 0), 20, "the handshake our keepalive starts")
    assert Lab.uapi(ours)["extra"]["wgvsock_link"] == "up"
    ping(o, PEER_TUN, count=1)
    ping(p, OURS_TUN, count=1)
