"""IPv6 link-local endpoints against Debian's wireguard-go.

Namespace "o" runs our daemon (`-n udp`), namespace "g" runs wireguard-go; a veth with only
fe80:: addresses joins them. o has a second interface whose fe80::/64 route comes first, so a
message sent without its zone (scope id) leaves by the wrong interface and is lost.
"""

from __future__ import annotations

import pytest

from .netlab import Lab, Namespace, connect_pair, ping

pytestmark = [pytest.mark.root]

OURS_PORT = 51100
GO_PORT = 51101
OURS_TUN = "10.98.0.1"
GO_TUN = "10.98.0.2"

OURS_LL = "fe80::1"
GO_LL = "fe80::2"


def _link_local_lab(lab: Lab) -> tuple[Namespace, Namespace, str, str, str, str]:
    """o and g joined by a veth with link-local addresses only (no others are made:
    addrgenmode none), and in o another interface, dm0, whose fe80::/64 route comes first."""
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
    lab.start_daemon(o, ours, "udp")
    lab.start_wireguard_go(g, go)
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
