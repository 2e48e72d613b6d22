"""Interface configuration through netlink (pyroute2): links, addresses, routes, resolv.conf.

Every function works in the caller's network namespace; the roles run inside the namespace
they configure (on Nitro there is only one).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_EEXIST = 17


class NetconfError(OSError):
    pass


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetconfError(f"interface {ifname} does not exist")
    return found[0]


_EPERM = 1


def link_up(ifname: str, mtu: int | None = None) -> None:
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            if mtu is not None:
                ipr.link("set", index=idx, mtu=mtu)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as e:
            hint = (" (configuring interfaces needs CAP_NET_ADMIN: root, or `--cap-add "
                    "NET_ADMIN` for a container)" if e.code == _EPERM else "")
            raise NetconfError(f"bringing {ifname} up{f' with MTU {mtu}' if mtu else ''}: "
                               f"{e.args[1] if len(e.args) > 1 else e}{hint}") from e


def add_addresses(ifname: str, addresses: Iterable[IPInterface]) -> None:
    """Adds each address; one that is already there is fine (so `up` can be repeated)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        for addr in addresses:
            try:
                ipr.addr(
                    "add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen
                )
            except NetlinkError as e:
                if e.code != _EEXIST:
                    raise NetconfError(f"adding {addr} to {ifname}: {e}") from e


def add_routes(ifname: str, networks: Iterable[IPNetwork], *, replace: bool = True) -> None:
    """Routes `networks` through `ifname`. A default route replaces any existing one, since
    in an enclave the tunnel is the only way out."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        for net in networks:
            family = 10 if net.version == 6 else 2
            try:
                ipr.route(
                    "replace" if replace else "add",
                    dst=str(net.network_address), dst_len=net.prefixlen, oif=idx, family=family,
                )
            except NetlinkError as e:
                raise NetconfError(f"adding route {net} via {ifname}: {e}") from e


def routed_elsewhere(ifname: str, networks: Iterable[IPNetwork]) -> dict[IPNetwork, str]:
    """Those of NETWORKS (none a default route) that this namespace's main table already
    routes through an interface other than IFNAME, each with where it goes ("dev vb1", "via
    192.0.2.1 dev eth0"): same prefix, so add_routes' replace would take that route's place,
    a connected subnet's included, and nothing would put it back."""
    wanted = {(n.version, int(n.network_address), n.prefixlen): n for n in networks}
    found: dict[IPNetwork, str] = {}
    try:
        with IPRoute() as ipr:
            own = ipr.link_lookup(ifname=ifname)
            for family in (2, 10):
                for r in ipr.get_routes(family=family, table=_MAIN_TABLE):
                    dst = r.get_attr("RTA_DST")
                    if r["type"] != _RTN_UNICAST or dst is None:
                        continue
                    v = 4 if family == 2 else 6
                    net = wanted.get((v, int(ipaddress.ip_address(dst)), r["dst_len"]))
                    oif = r.get_attr("RTA_OIF")
                    if net is None or net in found or (oif and oif in own):
                        continue
                    gateway = r.get_attr("RTA_GATEWAY")
                    links = ipr.get_links(oif) if oif else []
                    dev = (links[0].get_attr("IFLA_IFNAME") if links else None) \
                        or (f"if{oif}" if oif else "")
                    found[net] = " ".join(filter(None, (
                        f"via {gateway}" if gateway else "",
                        f"dev {dev}" if dev else "",
                        "" if oif else "(multipath)")))
    except NetlinkError as e:
        raise NetconfError(f"listing this network namespace's routes: "
                           f"{e.args[1] if len(e.args) > 1 else e}") from e
    return found


def interface_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def delete_interface(ifname: str) -> bool:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True


_RTN_LOCAL = 2


def is_local_address(addr: str) -> bool:
    """Whether the kernel delivers ADDR to this host: a route lookup of type local, as
    nftables' `fib daddr type local` asks. Not a multicast group or a broadcast address a
    socket may be bound to, nor an address bound without being the host's (IP_FREEBIND)."""
    with IPRoute() as ipr:
        try:
            answer = ipr.route("get", dst=addr)
        except NetlinkError:
            return False  # ENETUNREACH: no route at all, so not one of ours
    return any(msg["type"] == _RTN_LOCAL for msg in answer)


# Public addresses that stand for "the internet" in a route lookup (Cloudflare's resolvers).
# They are only looked up, never sent to.
_INTERNET = {4: "1.1.1.1", 6: "2606:4700::1111"}
_RTN_UNICAST = 1
_MAIN_TABLE = 254


def default_route_interface(version: int = 4) -> str | None:
    """The interface this host's own IPv4 (or IPv6) traffic to the internet leaves by, for
    egress NAT when the profile names none; None when there is no such route.

    The kernel is asked (a route lookup, which follows the ip rules) rather than the routes
    scanned: a default route in a policy-routing table (a VPN's, or the one a second ENI on
    EC2 gets) serves only the traffic its rule selects, and is not the way out."""
    with IPRoute() as ipr:
        try:
            answer = ipr.route("get", dst=_INTERNET[version])
        except NetlinkError:
            # ENETUNREACH with no route; EINVAL, EHOSTUNREACH for a blackhole or unreachable one.
            return None
        for msg in answer:
            oif = msg.get_attr("RTA_OIF")
            if msg["type"] != _RTN_UNICAST or not oif:
                continue
            # The probe address may have a route of its own (a VPN pushes one to its DNS
            # server, 1.1.1.1 often): the way out is then the default route of the table the
            # lookup chose, where there is one.
            table = msg.get_attr("RTA_TABLE") or _MAIN_TABLE
            defaults = [r for r in ipr.get_routes(family=10 if version == 6 else 2, table=table)
                        if r["dst_len"] == 0]
            if defaults:
                ways = [r.get_attr("RTA_OIF") for r in defaults
                        if r["type"] == _RTN_UNICAST and r.get_attr("RTA_OIF")]
                if not ways:
                    return None  # a blackhole or unreachable default
                if oif not in ways:
                    oif = ways[0]
            links = ipr.get_links(oif)
            if links:
                return links[0].get_attr("IFLA_IFNAME")
    return None


# Route types other than unicast, named as `ip route` names them.
_ROUTE_TYPES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
                7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}


class DefaultRoute(NamedTuple):
    version: int  # 4 or 6
    text: str  # as `ip route` says it: "default via 192.0.2.1 dev eth0"
    # The route as netlink gave it (its header's fields and its attributes, gateways, device,
    # metric, nexthops and the rest), for put_back_route.
    netlink: Mapping[str, Any] | None = None

    def __str__(self) -> str:
        return self.text


# What the kernel sets itself and takes from no request.
_READ_ONLY_ROUTE_ATTRS = frozenset({"RTA_TABLE", "RTA_CACHEINFO"})
_ROUTE_HEADER = ("family", "dst_len", "src_len", "tos", "table", "proto", "scope", "type",
                 "flags")
# Next-hop states the kernel reports and refuses in a request (EINVAL: "can not contain DEAD or
# LINKDOWN"): a default route through a link that is down (a veth whose peer is down, a cable
# out) could not be put back.
_RTNH_F_DEAD = 1
_RTNH_F_LINKDOWN = 16
_KERNEL_NEXTHOP_FLAGS = _RTNH_F_DEAD | _RTNH_F_LINKDOWN


def default_routes() -> list[DefaultRoute]:
    """This namespace's default routes (0.0.0.0/0 and ::/0) in the main table, IPv4 first.
    The main table is the one add_routes writes: a default route there is what a default
    route of the profile replaces."""
    try:
        with IPRoute() as ipr:
            names: dict[int, str] = {}

            def dev(index: int | None) -> str:
                if not index:
                    return ""
                if index not in names:
                    links = ipr.get_links(index)
                    names[index] = (links[0].get_attr("IFLA_IFNAME") if links
                                    else None) or f"if{index}"
                return f" dev {names[index]}"

            def hop(gateway: str | None, via: dict | None, index: int | None) -> str:
                if via:  # an IPv6 gateway for an IPv4 route (RFC 5549)
                    gateway = via.get("addr")
                return (f" via {gateway}" if gateway else "") + dev(index)

            found = []
            for family in (2, 10):
                for r in ipr.get_routes(family=family, table=_MAIN_TABLE):
                    if r["dst_len"] != 0:
                        continue
                    kind = _ROUTE_TYPES.get(r["type"])
                    text = f"{kind} default" if kind else "default"
                    text += hop(r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_VIA"),
                                r.get_attr("RTA_OIF"))
                    for nh in r.get_attr("RTA_MULTIPATH") or ():
                        text += " nexthop" + hop(nh.get_attr("RTA_GATEWAY"),
                                                 nh.get_attr("RTA_VIA"), nh["oif"])
                    if metric := r.get_attr("RTA_PRIORITY"):
                        text += f" metric {metric}"
                    netlink = {key: r[key] for key in _ROUTE_HEADER}
                    netlink["flags"] &= ~_KERNEL_NEXTHOP_FLAGS
                    netlink.update((name, value) for name, value in r["attrs"]
                                   if name not in _READ_ONLY_ROUTE_ATTRS)
                    for nh in netlink.get("RTA_MULTIPATH") or ():
                        nh["flags"] &= ~_KERNEL_NEXTHOP_FLAGS
                    found.append(DefaultRoute(4 if family == 2 else 6, text, netlink))
            return found
    except NetlinkError as e:
        raise NetconfError(f"listing this network namespace's routes: "
                           f"{e.args[1] if len(e.args) > 1 else e}") from e


def put_back_route(route: DefaultRoute) -> None:
    """Adds ROUTE, one of default_routes(), again as it was: its gateways, device, metric and
    the rest. NetconfError where it cannot, one in its place already among the reasons."""
    if route.netlink is None:
        raise ValueError(f"default route {route}: not one default_routes() found")
    try:
        with IPRoute() as ipr:
            ipr.route("add", **route.netlink)
    except NetlinkError as e:
        why = e.args[1] if len(e.args) > 1 else str(e)
        if e.code == _EEXIST:
            why = "another default route of the same metric is there in its place"
        raise NetconfError(f"putting back default route {route}: {why}") from e


def write_resolv_conf(nameservers: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
                      path: str = "/etc/resolv.conf") -> None:
    text = "# written by wgvsock enclave up\n" + "".join(f"nameserver {ns}\n" for ns in nameservers)
    write_in_place(path, text.encode())


def write_in_place(path: str, data: bytes) -> None:
    """Writes in place rather than by rename: under `ip netns exec` the file is a bind mount
    of /etc/netns/NAME/resolv.conf (under docker, of the container's own), and a rename over a
    mount point fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
