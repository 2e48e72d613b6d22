"""Where our UDP replies leave from, and IPv6 link-local endpoints (UDP against Debian's
wireguard-go, TCP between two of our daemons).

Namespace "o" runs our daemon (`-n udp`), namespace "g" runs wireguard-go; a veth joins them.

Sticky source: o's veth has a primary and a secondary address, and g reaches our daemon at the
secondary one, while o's route to g names the primary as source. g's firewall is stateful (it
takes UDP from our port only as a reply to what g sent, as NAT and strict firewalls do), so a
reply from the primary address never reaches wireguard-go. nftables counters in g count our
datagrams by source address.

Link-local: the veth carries only fe80:: addresses, and o has a second interface whose
fe80::/64 route comes first, so a message sent without its zone (scope id) leaves by the wrong
interface and is lost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from .netlab import Lab, Namespace, connect_pair, nft_counters, ping, wait_for

pytestmark = [pytest.mark.root]

OURS_PORT = 51100
GO_PORT = 51101
OURS_TUN = "10.98.0.1"
GO_TUN = "10.98.0.2"


@dataclass
class Addresses:
    family: str  # nft's: "ip" or "ip6"
    prefix: int
    primary: str  # o's address the route towards g names as source (see _sticky_lab)
    secondary: str  # o's other address, the one g sends to
    go: str

    def endpoint(self, addr: str, port: int) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


FAMILIES = {
    "ipv4": Addresses("ip", 24, "192.168.79.1", "192.168.79.11", "192.168.79.2"),
    "ipv6": Addresses("ip6", 64, "2001:db8:79::1", "2001:db8:79::11", "2001:db8:79::2"),
}


def _count_sources(g: Namespace, a: Addresses, *, strict: bool) -> None:
    """Counters in g of our daemon's datagrams by source address; with `strict`, g then
    drops those that are no reply to what it sent (conntrack), as NAT or a stateful
    firewall in front of a peer does."""
    rules = [
        f'udp sport {OURS_PORT} {a.family} saddr {a.primary} counter comment "from-primary"',
        f'udp sport {OURS_PORT} {a.family} saddr {a.secondary} counter comment "from-secondary"',
    ]
    if strict:
        rules += ["ct state established,related accept", f"udp sport {OURS_PORT} drop"]
    g.run("nft", "-f", "-", input=(
        "table inet wgvtest {\n  chain in {\n"
        "    type filter hook input priority 0; policy accept;\n    "
        + "\n    ".join(rules) + "\n  }\n}\n"
    ))


def _sticky_lab(
    lab: Lab, a: Addresses, *, strict: bool
) -> tuple[Namespace, Namespace, str, str]:
    """o and g as the module says (veth va0 in o, vb0 in g), g configured to reach us at the
    secondary address. Returns them and the two WireGuard interfaces' names."""
    o, g = lab.netns("o"), lab.netns("g")
    o.ip("link", "add", "va0", "type", "veth", "peer", "name", "vb0", "netns", g.name)
    # nodad: duplicate address detection would keep the addresses unusable for a second.
    nodad = ["nodad"] if a.family == "ip6" else []
    for ns, dev, addr in ((o, "va0", a.primary), (o, "va0", a.secondary), (g, "vb0", a.go)):
        ns.ip("addr", "add", f"{addr}/{a.prefix}", "dev", dev, *nodad)
        ns.ip("link", "set", dev, "up")
    # Which address the kernel picks is its business (IPv6: the newer of two equals): the
    # test's premise is only that it picks one, the primary, and g sends to the other.
    route = o.ip("route", "get", a.go).stdout
    if f"src {a.primary} " not in route:
        a.primary, a.secondary = a.secondary, a.primary
    assert f"src {a.primary} " in route, route
    ours, go = lab.ifname("o"), lab.ifname("g")
    lab.start_daemon(o, ours, "udp")
    lab.start_wireguard_go(g, go)
    _count_sources(g, a, strict=strict)
    # Only g knows where the other is: at o's secondary address.
    connect_pair(lab, g, go, a.endpoint(a.secondary, OURS_PORT), o, ours, None,
                 a_port=GO_PORT, b_port=OURS_PORT, a_tun=GO_TUN, b_tun=OURS_TUN)
    for ns, port in ((o, OURS_PORT), (g, GO_PORT)):
        wait_for(lambda ns=ns, port=port: f":{port} " in ns.run("ss", "-lunH").stdout,
                 10, f"a listener on UDP {port}")
    return o, g, ours, go


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_leave_from_the_address_the_peer_sent_to(lab: Lab, family: str) -> None:
    """Before: our handshake response left from the primary address, g's firewall dropped
    it, and no handshake ever completed."""
    a = dataclasses.replace(FAMILIES[family])
    o, g, ours, go = _sticky_lab(lab, a, strict=True)
    ping(g, OURS_TUN)  # the first ping waits for the handshake g starts
    ping(o, GO_TUN)
    counts = nft_counters(g)
    assert counts["from-primary"] == 0, counts
    assert counts["from-secondary"] >= 2, counts  # the response, the pings' packets
    # Where g sees us, and we see g: the sticky source is not part of what `wg` shows.
    assert g.wg("show", go, "endpoints").stdout.split() == [
        g.wg("show", go, "peers").stdout.strip(), a.endpoint(a.secondary, OURS_PORT)]
    assert o.wg("show", ours, "endpoints").stdout.split()[1] == a.endpoint(a.go, GO_PORT)


def test_a_source_address_that_goes_away_gives_way_and_is_taken_again(lab: Lab) -> None:
    """The secondary address is removed under a working tunnel: our packets leave from the
    route's choice (wireguard-go roams to it), and once g sends to the secondary address
    again, replies come from it again."""
    a = dataclasses.replace(FAMILIES["ipv4"])
    o, g, ours, go = _sticky_lab(lab, a, strict=False)
    ping(g, OURS_TUN)
    assert nft_counters(g)["from-primary"] == 0

    o.ip("addr", "del", f"{a.secondary}/{a.prefix}", "dev", "va0")
    ping(o, GO_TUN)  # needs the fallback: the kernel refuses the removed address
    assert nft_counters(g)["from-primary"] >= 1
    assert g.wg("show", go, "endpoints").stdout.split()[1] == a.endpoint(a.primary, OURS_PORT)
    assert "sending from the address the route gives" in lab.log(ours)

    o.ip("addr", "add", f"{a.secondary}/{a.prefix}", "dev", "va0")
    g.wg("set", go, "peer", g.wg("show", go, "peers").stdout.strip(),
         "endpoint", a.endpoint(a.secondary, OURS_PORT))
    before = nft_counters(g)
    ping(g, OURS_TUN)
    ping(o, GO_TUN)
    after = nft_counters(g)
    assert after["from-primary"] == before["from-primary"], (before, after)
    assert after["from-secondary"] >= before["from-secondary"] + 6, (before, after)


# -- IPv6 link-local endpoints -----------------------------------------------------------------

OURS_LL = "fe80::1"
GO_LL = "fe80::2"


def _link_local_lab(lab: Lab, network: str = "udp"
                    ) -> tuple[Namespace, Namespace, str, str, str, str]:
    """o and g joined by a veth with link-local addresses only (no others are made:
    addrgenmode none), and in o another interface, dm0, whose fe80::/64 route comes first.
    Over udp, g runs wireguard-go; over tcp, our daemon as well."""
    o, g = lab.netns("o"), lab.netns("g")
    va, vb = "va0", "vb0"
    o.ip("link", "add", va, "type", "veth", "peer", "name", vb, "netns", g.name)
    for ns, dev, addr in ((o, va, OURS_LL), (g, vb, GO_LL)):
        ns.ip("link", "set", dev, "addrgenmode", "none")
        ns.ip("addr", "add", f"{addr}/64", "dev", dev, "nodad")
        ns.ip("link", "set", dev, "up")
    # A veth with both ends in o: this kernel may have no dummy interfaces.
    o.ip("link", "add", "dm0", "type", "veth", "peer", "name", "dm1")
    for dev in ("dm0", "dm1"):
        o.ip("link", "set", dev, "addrgenmode", "none")
        o.ip("link", "set", dev, "up")
    o.ip("addr", "add", "fe80::99/64", "dev", "dm0", "nodad")
    o.ip("-6", "route", "add", "fe80::/64", "dev", "dm0", "metric", "1")
    # The premise: without its zone, a message to g would leave by dm0.
    assert " dev dm0 " in o.ip("-6", "route", "get", GO_LL).stdout
    ours, go = lab.ifname("o"), lab.ifname("g")
    lab.start_daemon(o, ours, network)
    if network == "udp":
        lab.start_wireguard_go(g, go)
    else:
        lab.start_daemon(g, go, network)
    return o, g, va, vb, ours, go


@pytest.mark.parametrize("initiator", ["ours", "go"])
def test_a_link_local_endpoint_keeps_its_zone(lab: Lab, initiator: str) -> None:
    """Before: the zone was lost when sending to a configured [fe80::2%va0] endpoint (Python
    sets the scope id to 0 unless given) and was never read from a received message's
    source, so our messages left by dm0 and no handshake completed."""
    o, g, va, vb, ours, go = _link_local_lab(lab)
    ours_at, go_at = f"[{OURS_LL}%{vb}]:{OURS_PORT}", f"[{GO_LL}%{va}]:{GO_PORT}"
    if initiator == "ours":
        connect_pair(lab, o, ours, go_at, g, go, None, a_port=OURS_PORT, b_port=GO_PORT,
                     a_tun=OURS_TUN, b_tun=GO_TUN)
        ping(o, GO_TUN)
        ping(g, OURS_TUN)
    else:
        connect_pair(lab, g, go, ours_at, o, ours, None, a_port=GO_PORT, b_port=OURS_PORT,
                     a_tun=GO_TUN, b_tun=OURS_TUN)
        ping(g, OURS_TUN)
        ping(o, GO_TUN)
    # wg(8) prints the zone by name; our UAPI gives it as the index, which wg resolves.
    assert o.wg("show", ours, "endpoints").stdout.split()[1] == go_at
    index = int(o.run("cat", f"/sys/class/net/{va}/ifindex").stdout)
    [peer] = Lab.uapi(ours)["peers"]
    assert peer["endpoint"] == f"[{GO_LL}%{index}]:{GO_PORT}"
    assert peer["extra"]["wgvsock_endpoint"] == go_at


@pytest.mark.parametrize("dialer", ["o", "g"])
def test_a_link_local_stream_peer_is_dialled_on_its_zone(lab: Lab, dialer: str) -> None:
    """Over TCP the dialler connected to (address, port), so the zone was lost and the kernel
    refused the connect (EINVAL: a link-local address needs an interface); the accepting side
    dropped the zone of the connection's source too."""
    o, g, va, vb, ours, theirs = _link_local_lab(lab, "tcp")
    if dialer == "o":
        connect_pair(lab, o, ours, f"[{GO_LL}%{va}]:{GO_PORT}", g, theirs, None,
                     a_port=OURS_PORT, b_port=GO_PORT, a_tun=OURS_TUN, b_tun=GO_TUN)
        listener, at, dev = g, theirs, vb
    else:
        connect_pair(lab, g, theirs, f"[{OURS_LL}%{vb}]:{OURS_PORT}", o, ours, None,
                     a_port=GO_PORT, b_port=OURS_PORT, a_tun=GO_TUN, b_tun=OURS_TUN)
        listener, at, dev = o, ours, va
    # The dialler first: the listener has no endpoint until it is dialled.
    if dialer == "o":
        ping(o, GO_TUN)
        ping(g, OURS_TUN)
    else:
        ping(g, OURS_TUN)
        ping(o, GO_TUN)
    # The accepting side knows the connection's source with its zone.
    peer_ll = OURS_LL if dialer == "o" else GO_LL
    index = int(listener.run("cat", f"/sys/class/net/{dev}/ifindex").stdout)
    [peer] = Lab.uapi(at)["peers"]
    assert peer["endpoint"].startswith(f"[{peer_ll}%{index}]:"), peer["endpoint"]
