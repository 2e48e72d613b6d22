"""The parent's nftables: egress NAT and policy for the enclave, ingress port forwarding.

One profile owns exactly one table, ``table inet wgvsock_<name>``, so that ``parent up`` can
replace it atomically and ``parent down`` can remove it without touching anyone else's rules.
:func:`render_ruleset` is pure (spec in, nft script out); :func:`apply`, :func:`remove` and
:func:`exists` run ``nft``, optionally inside a network namespace (the tests' way).

Why the chains look the way they do
-----------------------------------
* Filter chains hook at ``priority filter - 1`` with ``policy accept``. In nftables every base
  chain on a hook sees the packet and a *drop* anywhere is final, while an *accept* only ends the
  chain that issued it. So our drops hold whatever else is loaded, and running just before the
  usual priority-0 chains (Debian's empty ``inet filter``, iptables-nft's ``ip filter`` that
  Docker fills) means our counters see every enclave packet first. ``policy accept`` and the
  ``iifname``/``oifname`` guards keep our table out of the way of all other host traffic.
* The flip side: our accept cannot override someone else's drop. Docker sets the iptables
  FORWARD policy to DROP, which drops the enclave's forwarded traffic no matter what we accept;
  such a host needs ``iptables -I DOCKER-USER -i wg0 -j ACCEPT`` and ``-o wg0`` likewise (our
  chain has applied the profile's policy by then). :func:`conflicting_forward_chains` finds such
  chains so ``parent doctor`` can say so.
* From the tunnel, the source must be one of the enclave's addresses (WireGuard's allowed-IPs
  already ensure it; this is a second line). Then established flows pass, and related
  ones (ICMP errors) where they are about a connection the enclave is party to; a related
  packet about anyone else's connection (the parent host's, one the parent routes for) is
  dropped: conntrack relates an error to whatever connection it quotes, so an enclave that
  guessed a 5-tuple could otherwise end it. A packet conntrack places in no connection
  (``ct state invalid``) is dropped too: without a connection it gets no NAT, and would
  leave with the enclave's tunnel address as its source. Then deny rules drop, allow rules
  accept, and anything else is dropped: deny wins over allow. To the parent's loopback addresses
  nothing passes, established/related included (an ICMP error the enclave sends there is
  `related` to the parent's own loopback flow it quotes).
* The other way round, the enclave's addresses are a source on the tunnel only: a packet that
  claims one and comes in on any other interface (a container on docker0, which has NET_RAW;
  a neighbour routing through the parent) or from the parent host itself (a raw socket) is
  dropped before conntrack takes it in. Otherwise it would open a connection in the
  enclave's name: the answers, replies to it, would reach the enclave on any port (past
  `to_enclave`), and the enclave's own packets on it would pass as established, past the
  deny rules.
* The parent's own addresses are destinations like the CIDR entries' others: a connection
  from the enclave to the parent (input hook) goes through the same deny entries
  (``egress_deny``) and the allow CIDRs narrower than a catch-all (``parent_policy``), so the
  parent's services are reachable from the enclave only where such an entry covers them:
  ``0.0.0.0/0`` and ``::/0`` (the default) ask for the internet, not for the parent's sshd.
  Name sets never open them (see below). Only what the tunnel
  itself needs passes regardless: ICMP echo to the parent, IPv6 neighbour discovery (hop limit
  255) and MLD, and replies to connections the parent opened.
* Towards the enclave, only replies and the profile's ingress ports (after our DNAT) pass.
  That holds for the parent's own processes too (output hook): besides replies they may
  reach the enclave's ingress ports (its `to` ports, directly or through the DNAT) and ping
  it; any other connection from the parent host to the enclave is dropped.
* NAT chains use the standard priorities (``dstnat``, ``srcnat``, -100 for output). Among NAT
  chains the first one to bind a connection wins, and Docker's NAT rules only match its own
  published ports and container subnets, so the order between us and Docker does not matter.
* Ingress DNAT matches ``fib daddr type local``: only connections to the parent's own
  addresses are forwarded, never traffic the parent routes for others on the same port. The
  output hook does the same for connections the parent makes to itself, except to loopback
  (127.0.0.0/8, ::1): a packet from 127.0.0.1 cannot leave through the tunnel, so such a
  connection is refused at once rather than hanging.
* With several enclave addresses of one family, ingress goes to the first one.
* What our DNAT sends to the enclave's addresses leaves by the tunnel or not at all
  (``ingress_blocked``), checked at postrouting: after a crash (kill -9) the table
  and forwarding stay while the tunnel is gone, and the enclave's address would otherwise be
  routed like any other, out of the default route.
* Allow rules by host name (issue 14) match sets ``name<i>_v4``/``name<i>_v6``, one pair per
  rule, which the parent's DNS forwarder fills with the addresses of allowed answers, each
  with a timeout (TTL + grace). They come after the deny rules, so a name that resolves to a
  denied address (IMDS, say) stays denied. They hold on the forward path only: whoever
  answers for an allowed name chooses the addresses, so one naming the parent itself (its
  ENI or tunnel address, a broadcast address) opens nothing there. The forwarder's own port
  (53 on the parent's tunnel addresses) is open from the tunnel whenever names are used, and
  from nowhere else, loopback included (``dns_blocked``).
* With a connection limit (``max_connections``), a new connection from the enclave, through
  the parent or to it, is dropped while the enclave has that many open: each takes an entry
  in the host's conntrack table, where an idle established one lasts 5 days, and a full
  table drops the host's own new connections. One ``ct count`` rule, in a chain both paths
  jump to, keeps the list for both; the kernel drops closed connections from its count a few
  at a clock tick, so under churn it lags a little. Its list is the rule's own, so a
  replaced table counts afresh: connections open at that moment are not counted.
* Replacing the table leaves existing conntrack entries alone: an established flow that a new
  deny rule covers lives until it ends.
* A replaced table can start where the old one left off (``parent reload``, or putting back a
  flushed table): the spec may carry the counters' values and the name sets' live elements,
  which the same transaction loads, so no metric goes backwards and no allowed name's
  address is missing for a moment.
* With a log group, each drop of the enclave's traffic (a deny rule, ``blocked``, ``to
  parent``, ``connection limit``, ``spoofed``, ``forged``: a related packet about a
  connection the enclave is not party to) is preceded by a rule that logs the packet's
  headers to that nfnetlink_log group under a prefix naming the rule
  (services/egress/refusals.py reads them; for ``forged``, the headers of the packet the
  ICMP error quotes too). The log rule has no verdict and a rate limit
  of its own, so a flood costs at most LOG_RATE messages a second per rule and never
  changes what is dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

from .nflog import SNAPLEN, SNAPLEN_QUOTING

__all__ = [
    "COUNTERS",
    "DNS_PORT",
    "FORWARDING_VALUES",
    "Counter",
    "FirewallError",
    "FirewallSpec",
    "FirewallTimeout",
    "Ingress",
    "IngressLike",
    "Rule",
    "RuleLike",
    "add_to_sets",
    "apply",
    "check",
    "check_forwarding_record",
    "conflicting_forward_chains",
    "enable_forwarding",
    "exists",
    "is_forwarding_sysctl",
    "name_set",
    "read_counters",
    "refuse_router_messages",
    "remove",
    "render_ruleset",
    "restore_forwarding",
    "rule_comment",
    "rule_count",
    "set_elements",
    "table_name",
]

L4 = Literal["tcp", "udp"]
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Named counters in every table, for tests and the status dashboard (see :func:`read_counters`).
COUNTERS: tuple[str, ...] = (
    "spoofed",            # from the tunnel with a source that is not an enclave address
    "egress_denied",      # new flows from the enclave that matched a deny rule
    "egress_allowed",     # new flows from the enclave that matched an allow rule
    "egress_blocked",     # new forwarded flows from the enclave that matched no allow rule
    "local_blocked",      # new flows from the enclave to the parent itself that matched none
    "egress_limited",     # new flows from the enclave over its connection limit
    "ingress_accepted",   # new flows into the enclave through an ingress port
    "ingress_blocked",    # anything else routed towards the enclave
    "parent_blocked",     # new flows from the parent host itself to a non-ingress port
    "dns_blocked",        # to the DNS forwarder's port, not through the tunnel
    "spoofed_enclave",    # with an enclave address as source, not from the tunnel
)

#: Where the parent's DNS forwarder listens, on each of the spec's ``dns_forwarder`` addresses.
DNS_PORT = 53

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Linux refuses '/', ':' and whitespace in interface names; we also keep out anything that
# would need escaping inside an nft string (quotes, backslashes) or that nft treats as a
# wildcard ('*').
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,15}")


class FirewallError(RuntimeError):
    """nft is missing or refused a script; the message carries nft's own explanation."""


class FirewallTimeout(FirewallError):
    """A tool (nft, iptables-legacy, sysctl, ...) hung: ran past _TOOL_TIMEOUT."""


# Seconds any one run of a tool may take.
_TOOL_TIMEOUT = 30.0


class RuleLike(Protocol):
    """What the renderer reads from an allow/deny rule (the profile's rules fit as they are)."""

    @property
    def network(self) -> IPNetwork | str: ...
    @property
    def ports(self) -> tuple[int, int] | int | None: ...
    @property
    def protocol(self) -> str | None: ...


class NameRuleLike(Protocol):
    """An allow rule by host name: its ports and protocol, and str() for its comment."""

    @property
    def ports(self) -> tuple[int, int] | None: ...
    @property
    def protocol(self) -> str | None: ...


class IngressLike(Protocol):
    @property
    def listen(self) -> int: ...
    @property
    def to(self) -> int: ...
    @property
    def protocol(self) -> str: ...


@dataclass(frozen=True)
class Rule:
    """Destination `network`, optionally only `ports` (lo, hi inclusive) and/or one `protocol`.
    Ports without a protocol mean both TCP and UDP."""

    network: IPNetwork
    ports: tuple[int, int] | None = None
    protocol: L4 | None = None


@dataclass(frozen=True)
class Ingress:
    """Connections to the parent's port `listen` are forwarded to the enclave's port `to`."""

    listen: int
    to: int
    protocol: L4 = "tcp"


@dataclass
class FirewallSpec:
    name: str
    tunnel_interface: str
    enclave_addresses: Sequence[IPAddress | str]
    egress_nat: bool = True
    #: None: masquerade out of any interface other than the tunnel.
    egress_interface: str | None = None
    allow: Sequence[RuleLike] = field(default_factory=list)
    deny: Sequence[RuleLike] = field(default_factory=list)
    ingress: Sequence[IngressLike] = field(default_factory=list)
    #: Allow rules by host name; rule i matches the sets name_set(i, 4) and name_set(i, 6).
    allow_names: Sequence[NameRuleLike] = field(default_factory=list)
    #: The parent's addresses where its DNS forwarder listens (UDP and TCP port 53).
    dns_forwarder: Sequence[IPAddress | str] = field(default_factory=list)
    #: Values the counters start from: read_counters()'s names (named counters, and each
    #: rule's by its comment). Those the new table has no counter for are left out.
    counters: Mapping[str, Counter] = field(default_factory=dict)
    #: Elements the name sets start with: (set, address, timeout in seconds), as add_to_sets.
    name_elements: Sequence[tuple[str, IPAddress | str, int]] = field(default_factory=list)
    #: The nfnetlink_log group that refused packets are logged to; None: not logged.
    log_group: int | None = None
    #: Credential endpoints an allow entry names (each rule's network one endpoint), with that
    #: entry's ports and protocol: accepted after `deny`, the rest of the endpoint dropped.
    lifted: Sequence[RuleLike] = field(default_factory=list)
    #: The credential endpoints (IMDS and the like) the profile always denies: refusals of
    #: them are logged under "credentials NETWORK" rather than the deny rule's comment, as
    #: no parent.egress.deny entry of the operator's need be behind them.
    credential_endpoints: Sequence[IPAddress | str] = field(default_factory=list)
    #: The most connections the enclave may have open through the parent and to it, together
    #: (each takes an entry in the host's conntrack table); None: no limit.
    max_connections: int | None = None


class Counter(NamedTuple):
    packets: int
    bytes: int


# -- validation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    network: IPNetwork
    ports: tuple[int, int] | None
    protocol: L4 | None


@dataclass(frozen=True)
class _Spec:
    name: str
    tunnel: str
    v4: tuple[IPv4Address, ...]
    v6: tuple[IPv6Address, ...]
    egress_nat: bool
    egress_interface: str | None
    allow: tuple[_Rule, ...]
    deny: tuple[_Rule, ...]
    ingress: tuple[Ingress, ...]
    names: tuple[tuple[str, _L4], ...]  # (comment, ports/protocol) of each allow-name rule
    dns: tuple[IPAddress, ...]
    counters: dict[str, Counter]
    elements: dict[str, dict[IPAddress, int]]  # name set -> address -> timeout
    log_group: int | None
    lifted: tuple[_Rule, ...]
    credentials: frozenset[IPAddress]
    max_connections: int | None


@dataclass(frozen=True)
class _L4:
    ports: tuple[int, int] | None
    protocol: L4 | None


def table_name(name: str) -> str:
    """The nft table of profile `name` (nft identifiers cannot contain '-')."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"profile name {name!r}: use 1-64 of a-z, 0-9 and '-', not leading '-'")
    return "wgvsock_" + name.replace("-", "_")


def _ifname(value: object, what: str) -> str:
    if not isinstance(value, str) or not _IFNAME_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a valid interface name")
    return value


def _unscoped(value: object, what: str) -> None:
    # ipaddress keeps an IPv6 scope id ("%eth0") as written, whatever it holds, and str()
    # puts it into the script: none belongs in a rule, so refuse rather than strip it.
    if "%" in str(value):
        raise ValueError(f"{what} {value!r} has an IPv6 scope id: a rule names no link")


def _address(value: object) -> IPAddress:
    _unscoped(value, "address")
    # Profiles may hold the enclave's address with its prefix (an ip_interface): use the host.
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value.ip
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_interface(value).ip
        except ValueError:
            pass
    raise ValueError(f"enclave address {value!r} is not an IP address")


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} {value!r} is not a port number (1-65535)")
    return value


def _protocol(value: object, what: str, *, optional: bool) -> L4 | None:
    if value is None and optional:
        return None
    if value == "tcp":
        return "tcp"
    if value == "udp":
        return "udp"
    raise ValueError(f"{what} protocol {value!r}: use tcp or udp")


def _l4_of(rule: NameRuleLike, what: str) -> _L4:
    ports = rule.ports
    span = None
    if ports is not None:
        lo, hi = ports
        span = (_port(lo, f"{what} port"), _port(hi, f"{what} port"))
        if lo > hi:
            raise ValueError(f"{what} ports {lo}-{hi}: the range is empty")
    text = str(rule)
    if not re.fullmatch(r"[A-Za-z0-9_.*:/-]{1,300}", text):
        raise ValueError(f"{what} {text!r} is not a host name rule")
    return _L4(span, _protocol(rule.protocol, what, optional=True))


def _rule(rule: RuleLike, what: str) -> _Rule:
    net = rule.network
    _unscoped(net, f"{what} network")
    try:
        network = net if isinstance(net, IPv4Network | IPv6Network) else ipaddress.ip_network(net)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} network {net!r}: {exc}") from None
    ports = rule.ports
    span: tuple[int, int] | None
    if ports is None:
        span = None
    elif isinstance(ports, int):
        span = (_port(ports, f"{what} port"),) * 2
    else:
        try:
            lo, hi = ports
        except (TypeError, ValueError):
            raise ValueError(f"{what} ports {ports!r}: use (lo, hi)") from None
        span = (_port(lo, f"{what} port"), _port(hi, f"{what} port"))
        if lo > hi:
            raise ValueError(f"{what} ports {lo}-{hi}: the range is empty")
    return _Rule(network, span, _protocol(rule.protocol, what, optional=True))


def _validated(spec: FirewallSpec) -> _Spec:
    table_name(spec.name)
    tunnel = _ifname(spec.tunnel_interface, "tunnel interface")
    egress = spec.egress_interface
    if egress is not None:
        _ifname(egress, "egress interface")
        if egress == tunnel:
            raise ValueError(f"egress interface {egress!r} is the tunnel interface")
    addrs = [_address(a) for a in spec.enclave_addresses]
    if not addrs:
        raise ValueError("no enclave address: nothing to allow or forward")
    ingress: list[Ingress] = []
    seen: set[tuple[str, int]] = set()
    for i, ing in enumerate(spec.ingress):
        what = f"ingress[{i}]"
        proto = _protocol(ing.protocol, what, optional=False)
        assert proto is not None
        item = Ingress(_port(ing.listen, f"{what} listen"), _port(ing.to, f"{what} to"), proto)
        if (proto, item.listen) in seen:
            raise ValueError(f"{what}: {proto} port {item.listen} is forwarded twice")
        seen.add((proto, item.listen))
        ingress.append(item)
    return _Spec(
        name=spec.name,
        tunnel=tunnel,
        v4=tuple(dict.fromkeys(a for a in addrs if isinstance(a, IPv4Address))),
        v6=tuple(dict.fromkeys(a for a in addrs if isinstance(a, IPv6Address))),
        egress_nat=bool(spec.egress_nat),
        egress_interface=egress,
        allow=tuple(_rule(r, f"allow[{i}]") for i, r in enumerate(spec.allow)),
        deny=tuple(_rule(r, f"deny[{i}]") for i, r in enumerate(spec.deny)),
        ingress=tuple(ingress),
        names=tuple((rule_comment(f"allow {r}"), _l4_of(r, f"allow name[{i}]"))
                    for i, r in enumerate(spec.allow_names)),
        dns=tuple(dict.fromkeys(_address(a) for a in spec.dns_forwarder)),
        counters={k: _counter(k, v) for k, v in spec.counters.items()},
        elements=_elements(spec.name_elements, len(spec.allow_names)),
        log_group=_log_group(spec.log_group),
        lifted=tuple(_rule(r, f"lifted[{i}]") for i, r in enumerate(spec.lifted)),
        credentials=frozenset(_address(a) for a in spec.credential_endpoints),
        max_connections=_max_connections(spec.max_connections),
    )


#: nft's ct count takes a 32-bit limit; no host tracks more connections than this anyway.
MAX_CONNECTIONS_LIMIT = 1 << 24


def _max_connections(value: object) -> int | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int)
            or not 1 <= value <= MAX_CONNECTIONS_LIMIT):
        raise ValueError(f"max_connections {value!r}: use 1-{MAX_CONNECTIONS_LIMIT}, or None "
                         "for no limit")
    return value


def _log_group(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"log group {value!r}: use 0-65535")
    return value


def _counter(name: object, value: object) -> Counter:
    try:
        packets, nbytes = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"counter {name!r}: {value!r} is not (packets, bytes)") from None
    for n in (packets, nbytes):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"counter {name!r}: {value!r} is not (packets, bytes)")
    return Counter(packets, nbytes)


def _elements(items: Sequence[tuple[str, IPAddress | str, int]],
              rules: int) -> dict[str, dict[IPAddress, int]]:
    out: dict[str, dict[IPAddress, int]] = {}
    for set_, addr, timeout in items:
        m = re.fullmatch(r"name(\d+)_v([46])", str(set_))
        if m is None or int(m[1]) >= rules:
            raise ValueError(f"{set_!r} is not one of this table's name sets")
        _unscoped(addr, f"set {set_} element")
        ip = ipaddress.ip_address(addr)
        if ip.version != int(m[2]):
            raise ValueError(f"address {ip} does not belong in set {set_}")
        out.setdefault(set_, {})[ip] = max(1, int(timeout))
    return out


# -- rendering ------------------------------------------------------------------------------


def _ports(span: tuple[int, int]) -> str:
    lo, hi = span
    return str(lo) if lo == hi else f"{lo}-{hi}"


# nft refuses a longer comment, and with it the whole table. A name rule's can be ~280 bytes.
COMMENT_MAX = 128
_COMMENT_HASH = 12  # hex digits of SHA-256: enough that two cut comments never meet


def rule_comment(text: str) -> str:
    """TEXT as a rule comment: itself when it fits nft's limit, else cut to fit with a hash
    of the whole, so each rule still has its own comment (read_counters() keys counters by
    it). Callers that report the rule (metrics) map it back to TEXT."""
    raw = text.encode()
    if len(raw) <= COMMENT_MAX:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:_COMMENT_HASH]
    head = raw[:COMMENT_MAX - _COMMENT_HASH - 1].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def _describe(verb: str, r: _Rule) -> str:
    # Also the rule's nft comment, which read_counters() reports its counter under.
    text = f"{verb} {r.network}"
    if r.protocol or r.ports:
        text += " " + (r.protocol or "tcp+udp")
    if r.ports:
        text += " " + _ports(r.ports)
    return text


def _match(r: _Rule | _L4, daddr: str | None = None) -> str:
    """R's match; an _L4 (a name rule) matches destination DADDR (a set reference)."""
    if isinstance(r, _L4):
        parts = [daddr or ""]
    elif r.network.prefixlen == 0:
        parts = [f"meta nfproto {'ipv4' if r.network.version == 4 else 'ipv6'}"]
    else:
        parts = [f"{'ip' if r.network.version == 4 else 'ip6'} daddr {r.network}"]
    if r.protocol and r.ports:
        parts.append(f"{r.protocol} dport {_ports(r.ports)}")
    elif r.protocol:
        parts.append(f"meta l4proto {r.protocol}")
    elif r.ports:
        parts.append(f"meta l4proto {{ tcp, udp }} th dport {_ports(r.ports)}")
    return " ".join(parts)


def _original(r: _Rule) -> str:
    """R's match on the connection's original destination (conntrack's, before any DNAT)."""
    if r.network.prefixlen == 0:
        parts = [f"meta nfproto {'ipv4' if r.network.version == 4 else 'ipv6'}"]
    else:
        parts = [f"ct original {'ip' if r.network.version == 4 else 'ip6'} daddr {r.network}"]
    if r.ports:
        proto = r.protocol or "{ tcp, udp }"
        parts.append(f"meta l4proto {proto} ct original proto-dst {_ports(r.ports)}")
    elif r.protocol:
        parts.append(f"meta l4proto {r.protocol}")
    return " ".join(parts)


def _q(text: str) -> str:
    # Everything quoted here was validated to need no escaping.
    return f'"{text}"'


def _set(name: str, kind: str, elements: Sequence[IPAddress]) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if elements:
        lines.append(f"\t\telements = {{ {', '.join(map(str, elements))} }}")
    return [*lines, "\t}"]


def name_set(index: int, version: int) -> str:
    """The set of allow-name rule INDEX's addresses of IP VERSION."""
    return f"name{index}_v{version}"


# Bounds the kernel's memory for one set; the forwarder bounds what it adds too.
NAME_SET_SIZE = 65536
# Refused packets logged per second per rule (and the burst); the kernel's limit on a log
# prefix is 127 bytes.
LOG_RATE = 20
LOG_PREFIX_MAX = 120


def _chain(name: str, body: Sequence[str], hook: str | None = None) -> list[str]:
    head = [f"\t\t{hook}"] if hook else []
    return ["", f"\tchain {name} {{", *head, *(f"\t\t{line}" for line in body), "\t}"]


def render_ruleset(spec: FirewallSpec) -> str:
    """The nft script that replaces profile `spec.name`'s table in one transaction.

    Raises ValueError for a spec that cannot be rendered safely (bad name, interface, port,
    protocol; no enclave address; one ingress port forwarded twice)."""
    s = _validated(spec)
    table = table_name(s.name)
    tun = _q(s.tunnel)
    out = [
        f"# wgvsock profile {s.name}: generated by wgvsock, rewritten by `parent up`",
        # Creating the table first makes the delete valid when it did not exist; all three
        # statements are one transaction, so there is no moment without the old or new rules.
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *_set("enclave_v4", "ipv4_addr", s.v4),
        *_set("enclave_v6", "ipv6_addr", s.v6),
    ]
    for i in range(len(s.names)):
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            set_ = name_set(i, version)
            out += [f"\tset {set_} {{", f"\t\ttype {kind}",
                    "\t\tflags timeout", f"\t\tsize {NAME_SET_SIZE}"]
            if live := s.elements.get(set_):
                out.append("\t\telements = { " + ", ".join(
                    f"{ip} timeout {t}s" for ip, t in live.items()) + " }")
            out.append("\t}")
    for counter in COUNTERS:
        start = s.counters.get(counter)
        out += [f"\tcounter {counter} {{",
                *([f"\t\tpackets {start.packets} bytes {start.bytes}"] if start else []),
                "\t}"]
    counted: set[str] = set()

    def count(comment: str) -> str:
        # A comment's value goes to its first rule only: read_counters() sums rules that share
        # one (a name rule's IPv4 and IPv6 halves).
        start = s.counters.get(comment) if comment not in counted else None
        counted.add(comment)
        return f"counter packets {start.packets} bytes {start.bytes}" if start else "counter"

    def logged(match: str, prefix: str, snaplen: int = SNAPLEN) -> list[str]:
        # A rule of its own: over the limit `limit` does not match, so a verdict after it
        # would not apply either.
        if s.log_group is None:
            return []
        return [f"{match + ' ' if match else ''}limit rate {LOG_RATE}/second burst "
                f"{LOG_RATE} packets log group {s.log_group} snaplen {snaplen} "
                f"prefix {_q(prefix[:LOG_PREFIX_MAX])}"]

    def denied(r: _Rule, *, credentials: bool = False) -> list[str]:
        # Also by the destination the enclave asked for, before anyone's DNAT: ecs-init
        # redirects 169.254.170.2:80 to 127.0.0.1:51679 for every interface, and the rewritten
        # destination no longer matches the deny.
        comment = _describe("deny", r)
        # services/egress/refusals.py reads the prefix: the built-in deny of a credential
        # endpoint gets advice of its own, whatever parent.egress.deny says.
        credentials = credentials or (
            r.ports is None and r.protocol is None and r.network.num_addresses == 1
            and r.network.network_address in s.credentials)
        prefix = f"credentials {r.network}" if credentials else comment
        return [
            *logged(f"ct status dnat {_original(r)}", prefix),
            f"ct status dnat {_original(r)} counter name {_q('egress_denied')} "
            f"{count(comment)} drop comment {_q(comment)}",
            *logged(_match(r), prefix),
            f"{_match(r)} counter name {_q('egress_denied')} {count(comment)} drop "
            f"comment {_q(comment)}",
        ]

    def allowed(r: _Rule) -> str:
        return (f"{_match(r)} counter name {_q('egress_allowed')} "
                f"{count(_describe('allow', r))} accept comment {_q(_describe('allow', r))}")

    # The deny entries, then the credential endpoints an allow entry names (that entry's
    # ports and protocol only): before any allow entry, on both paths below.
    denies = [line for r in s.deny for line in denied(r)]
    for network in dict.fromkeys(r.network for r in s.lifted):
        denies += [allowed(r) for r in s.lifted if r.network == network]
        denies += denied(_Rule(network, None, None), credentials=True)
    out += _chain("egress_deny", denies)
    out += _chain("egress_policy", ["jump egress_deny", *map(allowed, s.allow)])
    # The path to the parent itself: a catch-all (0.0.0.0/0, ::/0, the default) asks for the
    # internet, not for the parent's sshd or container API, and opens none of its ports; an
    # entry narrower than that, which means the parent's network, does.
    out += _chain("parent_policy", ["jump egress_deny",
                                    *(allowed(r) for r in s.allow if r.network.prefixlen)])
    # The name sets, on the forward path only: whoever controls an allowed name's DNS decides
    # what goes into them (the parent's own addresses, broadcast), and a DNS answer must not
    # open the parent's own ports. Reached only when egress_policy neither dropped nor
    # accepted, so the deny entries still come first.
    out += _chain("egress_names", [
        f"{_match(l4, f'{fam} daddr @{name_set(i, version)}')} "
        f"counter name {_q('egress_allowed')} {count(comment)} accept comment {_q(comment)}"
        for i, (comment, l4) in enumerate(s.names)
        for fam, version in (("ip", 4), ("ip6", 6))
    ])
    # One rule counts the enclave's connections for both paths: a `ct count` without a key
    # keeps its own list of the connections that passed it, so a rule in each path would
    # allow the limit twice over. It sees new connections only (the list drops those that
    # closed or expired): counting every packet would walk the list for each.
    if s.max_connections is not None:
        out += _chain("connection_limit", [
            f"ct state new ct count over {s.max_connections} jump over_connection_limit",
        ])
        out += _chain("over_connection_limit", [
            *logged("", "connection limit"),
            f"counter name {_q('egress_limited')} drop",
        ])
    limit = ["jump connection_limit"] if s.max_connections is not None else []
    out += _chain("check_source", [
        *logged("ip saddr != @enclave_v4", "spoofed"),
        f"ip saddr != @enclave_v4 counter name {_q('spoofed')} drop",
        *logged("ip6 saddr != @enclave_v6", "spoofed"),
        f"ip6 saddr != @enclave_v6 counter name {_q('spoofed')} drop",
    ])
    # An ICMP error is `related` to whichever connection it quotes, and takes that one's
    # NAT: from the enclave it is accepted only about a connection the enclave is party to,
    # its own (original source) or one DNATed to it (reply source). Any other, which the
    # enclave could only have forged by guessing the 5-tuple, would end or mislead the
    # parent host's own connections and those of whoever it routes for; it is dropped,
    # before the policy (a catch-all allow would pass it), and logged as `forged` with the
    # packet it quotes (refusals.py offers no allow entry for it: none would make it
    # legitimate). Towards the enclave the same accept holds, as a second
    # line: the kernel already relates an error to a connection only when it is addressed
    # to that connection's end.
    replies = [
        "ct state established accept",
        *(f"ct state related ct {end} {fam} saddr @{set_} accept"
          for fam, set_ in (("ip", "enclave_v4"), ("ip6", "enclave_v6"))
          for end in ("original", "reply")),
    ]
    forged = logged("ct state related", "forged", SNAPLEN_QUOTING)
    out += _chain("from_enclave", [
        "jump check_source",
        *replies,
        *forged,
        f"ct state related counter name {_q('egress_blocked')} drop",
        # What conntrack could not place (an ICMP error quoting no connection, a TCP segment
        # in no window) has no connection, so no NAT either: a catch-all allow would pass it
        # out with the enclave's own tunnel address as its source (fd77::2, 10.77.0.2), to
        # the internet. No log rule: the drop names nothing the profile could change.
        f"ct state invalid counter name {_q('egress_blocked')} drop",
        *limit,
        "jump egress_policy",
        "jump egress_names",
        *logged("", "blocked"),
        f"counter name {_q('egress_blocked')} drop",
    ])
    out += _chain("enclave_to_parent", [
        # Link-scoped and sent from link-local or unspecified sources, so before the source
        # check. A WireGuard interface sends none of these; other tunnel stand-ins do.
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }"
        " ip6 hoplimit 255 accept",
        "ip6 saddr { ::, fe80::/10 } icmpv6 type { mld-listener-report, mld2-listener-report }"
        " accept",
        "jump check_source",
        # The parent's loopback services (its metrics page, say) are for the parent: with
        # route_localnet=1 (ECS, kube-proxy) the kernel would deliver there from the tunnel.
        # Before the established/related accept: nothing from the tunnel to loopback is ever
        # accepted, yet an ICMP error the enclave sends there, quoting one of the parent's
        # own loopback flows, is `related` to it.
        *logged("ip daddr 127.0.0.0/8", "to parent"),
        f"ip daddr 127.0.0.0/8 counter name {_q('local_blocked')} drop",
        *logged("ip6 daddr ::1", "to parent"),
        f"ip6 daddr ::1 counter name {_q('local_blocked')} drop",
        *replies,
        *forged,
        f"ct state related counter name {_q('local_blocked')} drop",
        *limit,
        "icmp type echo-request accept",
        "icmpv6 type echo-request accept",
        *([f"{'ip' if a.version == 4 else 'ip6'} daddr {a} meta l4proto {{ tcp, udp }} "
           f"th dport {DNS_PORT} counter accept comment {_q('dns forwarder')}" for a in s.dns]),
        "jump parent_policy",
        *logged("", "to parent"),
        f"counter name {_q('local_blocked')} drop",
    ])
    to_enclave = list(replies)
    # After prerouting DNAT the destination port is already `to`.
    for to, proto in dict.fromkeys((i.to, i.protocol) for i in s.ingress):
        to_enclave.append(
            f"ct status dnat {proto} dport {to} counter name {_q('ingress_accepted')} accept"
        )
    to_enclave.append(f"counter name {_q('ingress_blocked')} drop")
    out += _chain("to_enclave", to_enclave)
    parent_to_enclave = [
        *replies,
        # Link-scoped messages the kernel itself sends on the interface (no-ops on WireGuard).
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }"
        " ip6 hoplimit 255 accept",
        "icmpv6 type { mld-listener-report, mld2-listener-report } accept",
        "icmp type echo-request accept",
        "icmpv6 type echo-request accept",
    ]
    # The output NAT chain (priority -100) has already rewritten a DNATed port to `to`.
    for to, proto in dict.fromkeys((i.to, i.protocol) for i in s.ingress):
        parent_to_enclave.append(f"{proto} dport {to} accept")
    parent_to_enclave.append(f"counter name {_q('parent_blocked')} drop")
    out += _chain("parent_to_enclave", parent_to_enclave)
    out += _chain(
        "forward",
        [f"iifname {tun} jump from_enclave", f"oifname {tun} jump to_enclave"],
        "type filter hook forward priority filter - 1; policy accept;",
    )
    # Our ingress DNAT leaves by the tunnel or not at all. After a crash (kill -9) the table
    # and forwarding stay but the tunnel is gone, and the enclave's address is then routed
    # like any other: out of the default route, towards whoever answers for it there. At
    # postrouting, for forwarded connections and the parent's own alike: in the output hook
    # the interface is still the one routed to before our DNAT (lo, for the parent's own
    # address).
    strays = [
        f"oifname != {tun} {fam} daddr @{set_} ct status dnat counter name "
        f"{_q('ingress_blocked')} drop"
        for fam, set_, addrs in (("ip", "enclave_v4", s.v4), ("ip6", "enclave_v6", s.v6))
        if addrs and s.ingress
    ]
    if strays:
        out += _chain("ingress_leaves", strays,
                      "type filter hook postrouting priority filter - 1; policy accept;")
    # The forwarder listens on the tunnel addresses, but with the weak host model Linux
    # delivers to them from any interface (docker0, the VPC subnet routing them at the
    # parent), where only the forwarder's source check would stand between a spoofed enclave
    # address and its answers. Loopback too: nothing on the parent asks the forwarder, which
    # answers the enclave's addresses only. No log rule: the enclave is not the sender.
    outside = [
        f"{fam} daddr {{ {', '.join(map(str, addrs))} }} meta l4proto {{ tcp, udp }} "
        f"th dport {DNS_PORT} iifname != {tun} counter name {_q('dns_blocked')} drop"
        for fam, addrs in (("ip", [a for a in s.dns if a.version == 4]),
                           ("ip6", [a for a in s.dns if a.version == 6]))
        if addrs
    ]
    out += _chain(
        "input",
        [*outside, f"iifname {tun} jump enclave_to_parent"],
        "type filter hook input priority filter - 1; policy accept;",
    )
    # The enclave's addresses as a source from anywhere but the tunnel (see the module
    # notes). At priority raw, before conntrack: such a packet never makes an entry. No log
    # rule: the enclave is not the sender.
    out += _chain("impostor", [
        f"{fam} saddr @{set_} counter name {_q('spoofed_enclave')} drop"
        for fam, set_ in (("ip", "enclave_v4"), ("ip6", "enclave_v6"))
    ])
    out += _chain(
        "arriving",
        [f"iifname != {tun} jump impostor"],
        "type filter hook prerouting priority raw; policy accept;",
    )
    out += _chain(
        "leaving",
        ["jump impostor"],
        "type filter hook output priority raw; policy accept;",
    )
    out += _chain(
        "local_output",
        [f"oifname {tun} jump parent_to_enclave"],
        "type filter hook output priority filter - 1; policy accept;",
    )

    if s.ingress:
        pre: list[str] = []
        local: list[str] = []
        targets = [
            (fam, nfproto, addrs[0], loopback)
            for fam, nfproto, addrs, loopback in (
                ("ip", "ipv4", s.v4, "127.0.0.0/8"),
                ("ip6", "ipv6", s.v6, "::1"),
            )
            if addrs
        ]
        for ing in s.ingress:
            comment = f"comment {_q(f'ingress {ing.protocol} {ing.listen} -> {ing.to}')}"
            for fam, nfproto, addr, loopback in targets:
                dest = f"{addr}:{ing.to}" if fam == "ip" else f"[{addr}]:{ing.to}"
                action = f"{ing.protocol} dport {ing.listen} dnat {fam} to {dest} {comment}"
                pre.append(
                    f"iifname != {tun} meta nfproto {nfproto} fib daddr type local {action}"
                )
                local.append(
                    f"meta nfproto {nfproto} fib daddr type local {fam} daddr != {loopback} "
                    f"{action}"
                )
        out += _chain("prerouting", pre, "type nat hook prerouting priority dstnat; policy accept;")
        out += _chain("output", local, "type nat hook output priority -100; policy accept;")

    if s.egress_nat:
        oif = f"oifname {_q(s.egress_interface)}" if s.egress_interface else f"oifname != {tun}"
        out += _chain(
            "postrouting",
            [f"{oif} ip saddr @enclave_v4 masquerade", f"{oif} ip6 saddr @enclave_v6 masquerade"],
            "type nat hook postrouting priority srcnat; policy accept;",
        )
    out.append("}")
    return "\n".join(out) + "\n"


# -- running nft ----------------------------------------------------------------------------


def _nft(
    args: Sequence[str], netns: str | None, script: str | None = None
) -> subprocess.CompletedProcess[str]:
    if shutil.which("nft") is None:
        raise FirewallError("nft not found: install nftables")
    cmd = ["nft", *args]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return _tool(cmd, script)


def _tool(cmd: Sequence[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    """CMD run to its end, with SCRIPT as its input. Raises FirewallTimeout naming it when it
    hangs: a TimeoutExpired went up from `parent doctor` as a traceback."""
    try:
        return subprocess.run(list(cmd), input=script, capture_output=True, text=True,
                              timeout=_TOOL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise FirewallTimeout(f"`{' '.join(cmd)}` did not finish within {_TOOL_TIMEOUT:g} s") \
            from None


def _load(script: str, netns: str | None, *, dry_run: bool = False) -> None:
    res = _nft(["-c", "-f", "-"] if dry_run else ["-f", "-"], netns, script)
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()
        raise FirewallError(f"nft refused the ruleset: {detail}")


def check(spec: FirewallSpec, netns: str | None = None) -> None:
    """Has the kernel validate the rendered script (``nft -c``) without changing anything."""
    _load(render_ruleset(spec), netns, dry_run=True)


def apply(spec: FirewallSpec, netns: str | None = None) -> None:
    """Installs or atomically replaces profile `spec.name`'s table."""
    _load(render_ruleset(spec), netns)


def remove(name: str, netns: str | None = None) -> None:
    """Deletes profile `name`'s table; nothing happens when it is not there."""
    table = table_name(name)
    _load(f"table inet {table} {{}}\ndelete table inet {table}\n", netns)


def _json(args: Sequence[str], netns: str | None) -> list[dict]:
    res = _nft(["-j", *args], netns)
    if res.returncode != 0:
        raise FirewallError(f"nft {' '.join(args)}: {(res.stderr or res.stdout).strip()}")
    return _items(res.stdout, args)


def _items(stdout: str, args: Sequence[str]) -> list[dict]:
    """The objects of `nft -j ARGS` output. Output of another shape (another nft's, or none
    at all) is a FirewallError naming the command, never a KeyError from deep inside a caller:
    the parent's `get`, and so `wgvsock status`, reads the counters through here."""
    try:
        doc = json.loads(stdout)
    except ValueError as e:
        raise FirewallError(f"nft -j {' '.join(args)}: output is not JSON ({e})") from None
    items = doc.get("nftables", []) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise FirewallError(f"nft -j {' '.join(args)}: output is not the JSON this version of "
                            "wgvsock knows (no \"nftables\" list)")
    return [item for item in items if isinstance(item, dict)]


def _count(c: object) -> Counter | None:
    """A counter object of nft's JSON as a Counter; None when it lacks a number."""
    if not isinstance(c, dict):
        return None
    packets, nbytes = c.get("packets"), c.get("bytes")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in (packets, nbytes)):
        return None
    return Counter(packets, nbytes)  # type: ignore[arg-type]


def add_to_sets(name: str, elements: Sequence[tuple[str, IPAddress, int]],
                netns: str | None = None) -> None:
    """Puts each (set, address, timeout in seconds) into profile `name`'s table, resetting
    the timeout of an address already there. One transaction: add, delete, add, because
    before Linux 6.x a plain `add` of an existing element keeps its old timeout."""
    table = table_name(name)
    lines = []
    for set_, addr, timeout in elements:
        if not re.fullmatch(r"name\d+_v[46]", set_):
            raise ValueError(f"{set_!r} is not a name set")
        _unscoped(addr, f"set {set_} element")
        ip = ipaddress.ip_address(addr)
        element = f"{{ {ip} timeout {max(1, int(timeout))}s }}"
        lines += [f"add element inet {table} {set_} {element}",
                  f"delete element inet {table} {set_} {{ {ip} }}",
                  f"add element inet {table} {set_} {element}"]
    if lines:
        _load("\n".join(lines) + "\n", netns)


def set_elements(name: str, set_: str, netns: str | None = None) -> dict[str, tuple[int, int]]:
    """A name set's live elements: address -> (timeout, seconds until it expires)."""
    out: dict[str, tuple[int, int]] = {}
    for item in _json(["list", "set", "inet", table_name(name), set_], netns):
        found = item.get("set")
        elems = found.get("elem", []) if isinstance(found, dict) else []
        for e in elems if isinstance(elems, list) else []:
            e = e.get("elem", e) if isinstance(e, dict) else {"val": e}
            if not isinstance(e, dict) or "val" not in e:
                continue  # of a shape this release does not know: the others still count
            timeout, expires = e.get("timeout", 0), e.get("expires", 0)
            out[str(e["val"])] = (timeout if isinstance(timeout, int) else 0,
                                  expires if isinstance(expires, int) else 0)
    return out


def exists(name: str, netns: str | None = None) -> bool:
    table = table_name(name)
    return any(
        isinstance(t := item.get("table"), dict) and t.get("family") == "inet"
        and t.get("name") == table
        for item in _json(["list", "tables"], netns)
    )


def rule_count(name: str, netns: str | None = None) -> int:
    """How many rules profile `name`'s table holds; -1 when there is no such table. `parent
    up` compares it with the count right after `apply` to notice a table someone deleted
    (`nft flush ruleset`) or emptied (`nft flush table ...`)."""
    table = table_name(name)
    # Terse (-t): without set elements, which a name rule's sets may hold by the thousand,
    # and this runs every second.
    res = _nft(["-j", "-t", "list", "table", "inet", table], netns)
    if res.returncode != 0:
        if "No such file or directory" in res.stderr:
            return -1
        raise FirewallError(f"nft list table inet {table}: {(res.stderr or res.stdout).strip()}")
    return sum(1 for item in _items(res.stdout, ["-t", "list", "table", "inet", table])
               if "rule" in item)


def read_counters(name: str, netns: str | None = None) -> dict[str, Counter]:
    """The named counters (:data:`COUNTERS`) and each allow/deny rule's own counter, under
    its comment (e.g. ``"deny 169.254.169.254/32"``). Raises FirewallError without a table."""
    table = table_name(name)
    counters: dict[str, Counter] = {}
    # An object of a shape this release does not know is left out, and only it: callers
    # show a counter that is not there as unknown ("-"), not the whole table as unreadable.
    for item in _json(["-t", "list", "table", "inet", table], netns):  # no set elements
        if "counter" in item:
            c = item["counter"]
            name_ = c.get("name") if isinstance(c, dict) else None
            if isinstance(name_, str) and (value := _count(c)) is not None:
                counters[name_] = value
        elif isinstance(rule := item.get("rule"), dict) and \
                isinstance(comment := rule.get("comment"), str):
            exprs = rule.get("expr", [])
            for expr in exprs if isinstance(exprs, list) else []:
                c = expr.get("counter") if isinstance(expr, dict) else None
                # A dict is an anonymous counter; a named one is referenced by its name.
                if isinstance(c, dict) and (value := _count(c)) is not None:
                    old = counters.get(comment, Counter(0, 0))
                    counters[comment] = Counter(old.packets + value.packets,
                                                old.bytes + value.bytes)
    return counters


def conflicting_forward_chains(netns: str | None = None, *,
                               tunnel: str | None = None) -> list[str]:
    """What else drops the enclave's forwarded traffic whatever our table accepts (see the
    module notes), each as "WHERE has policy drop" or "WHERE ends with `RULE`": other
    nftables tables' forward chains with policy drop, or whose last rule drops or rejects
    everything (firewalld's `reject with icmpx admin-prohibited`), and legacy iptables'
    FORWARD chain (its tables are its own, which nft does not list) with policy DROP or a
    last `-j DROP` or `-j REJECT`. With TUNNEL, a table that accepts all traffic in and out
    of that interface (Docker's `iptables -I DOCKER-USER -i wg0 -j ACCEPT` and `-o wg0`;
    firewalld's trusted zone) is taken as fixed; for legacy iptables, only where FORWARD's
    packets get (see _legacy_accepts_tunnel)."""
    fixed: dict[tuple[str, str], bool] = {}
    out = []
    for item in _json(["list", "chains"], netns):
        c = item.get("chain")
        if not c or c.get("hook") != "forward" or c.get("table", "").startswith("wgvsock_"):
            continue
        key, where = (c["family"], c["table"]), f"{c['family']} {c['table']} {c['name']}"
        if c.get("policy") == "drop":
            why = "has policy drop"
        elif (last := _final_drop(key, c["name"], netns)) is not None:
            why = f"ends with `{last}`"
        else:
            continue
        if tunnel is not None and key not in fixed:
            fixed[key] = _accepts_interface(key, tunnel, netns)
        if not fixed.get(key):
            out.append(f"{where} {why}")
    return out + _legacy_forward_drops(netns, tunnel)


def _acting(exprs: Sequence[dict]) -> list[dict]:
    """A rule's expressions but its counters and logs, which change nothing it does
    (iptables-nft puts a counter in every rule)."""
    return [e for e in exprs if not ({"counter", "log"} & e.keys())]


def _verdict(exprs: Sequence[dict]) -> str | None:
    """The verdict of a rule that matches every packet (nothing in it but a counter or log
    and the verdict), else None."""
    rest = _acting(exprs)
    if len(rest) != 1:
        return None
    verdict = next(iter(rest[0]))
    return verdict if verdict in ("accept", "drop", "reject") else None


def _final_drop(table: tuple[str, str], chain: str, netns: str | None) -> str | None:
    """CHAIN's last rule as nft prints it, when it drops or rejects every packet."""
    rules = [item["rule"] for item in _json(["list", "chain", *table, chain], netns)
             if "rule" in item]
    if not rules or _verdict(rules[-1].get("expr", [])) not in ("drop", "reject"):
        return None
    handle = rules[-1].get("handle")
    res = _nft(["-a", "list", "chain", *table, chain], netns)
    for line in res.stdout.splitlines():
        text, _, h = line.strip().rpartition(" # handle ")
        if h == str(handle):
            return text
    return "its last rule"


def _accepts_interface(table: tuple[str, str], ifname: str, netns: str | None) -> bool:
    """Whether TABLE accepts all traffic in and all traffic out of IFNAME where its forward
    chain's packets get: a rule with nothing in it but the interface match, a counter and the
    accept, or a jump (goto) to a chain that ends in such an accept (firewalld's zone of the
    interface, when it is `trusted`). A narrower rule lets only part of the enclave's
    traffic past the drop. The way out needs none when the table's forward chain accepts
    established and related packets and DNATed ones before anything else, as firewalld's
    does: all that is forwarded to the tunnel is replies and ingress (our DNAT)."""
    items = _json(["-t", "list", "table", *table], netns)
    rules: dict[str, list[list[dict]]] = {}
    for item in items:
        if "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"].get("expr", []))
    forward = [item["chain"]["name"] for item in items
               if item.get("chain", {}).get("hook") == "forward"]
    # Only where the forward chain's packets get counts: it, and the chains it jumps or goes
    # to with no match of its own, directly or through others (an accept elsewhere, or
    # reached for some packets only, lets none of the enclave's past the drop).
    reached: set[str] = set()
    todo = list(forward)
    while todo:
        chain = todo.pop()
        if chain in reached:
            continue
        reached.add(chain)
        for exprs in rules.get(chain, []):
            rest = _acting(exprs)
            if len(rest) == 1 and (to := rest[0].get("jump") or rest[0].get("goto")):
                todo.append(to.get("target", ""))
    seen: set[str] = set()
    for chain in reached:
        for exprs in rules.get(chain, []):
            matches = [e["match"] for e in exprs if "match" in e]
            if len(matches) != 1 or matches[0].get("op", "==") != "==" \
                    or matches[0].get("right") != ifname \
                    or (key := matches[0].get("left", {}).get("meta", {}).get("key")) \
                    not in ("iifname", "oifname"):
                continue
            rest = [e for e in _acting(exprs) if "match" not in e]
            target = (rest[0].get("jump") or rest[0].get("goto") or {}).get("target") \
                if len(rest) == 1 else None
            if _verdict(rest) == "accept" or (
                    target and rules.get(target) and _verdict(rules[target][-1]) == "accept"):
                seen.add(key)
    if "iifname" in seen and "oifname" not in seen and any(
            _replies_and_dnat_first(rules.get(name, [])) for name in forward):
        seen.add("oifname")
    return seen == {"iifname", "oifname"}


def _replies_and_dnat_first(chain_rules: Sequence[Sequence[dict]]) -> bool:
    """Whether a chain starts by accepting established and related packets, and DNATed ones."""
    first = set()
    for exprs in chain_rules[:2]:
        if not any("accept" in e for e in exprs) or len(exprs) != 2:
            return False
        m = exprs[0].get("match", {})
        key = m.get("left", {}).get("ct", {}).get("key")
        right = m.get("right")
        values = set(right.get("set", [])) if isinstance(right, dict) else {right}
        first.add((key, frozenset(values)))
    return first == {("state", frozenset({"established", "related"})),
                     ("status", frozenset({"dnat"}))}


# Legacy iptables' tools, and the /proc/net file that lists the tables it has in use in the
# reader's network namespace.
_LEGACY_TOOLS = (("iptables-legacy", "ip_tables_names"), ("ip6tables-legacy", "ip6_tables_names"))


def _legacy_forward_drops(netns: str | None, tunnel: str | None) -> list[str]:
    out = []
    for tool, names in _LEGACY_TOOLS:
        # Only where legacy iptables has a filter table already: listing one that is not
        # there would make it (and load ip_tables, on a kernel with modules).
        if "filter" not in _proc_net(names, netns).split() or shutil.which(tool) is None:
            continue
        cmd = [tool, "-w", "5", "-t", "filter", "-S"]
        lines = _run(["ip", "netns", "exec", netns, *cmd] if netns else cmd).splitlines()
        if "-P FORWARD DROP" in lines:
            why = "has policy DROP"
        elif (forward := [ln for ln in lines if ln.startswith("-A FORWARD ")]) and re.fullmatch(
                r"-A FORWARD -j (DROP|REJECT( --reject-with \S+)?)", forward[-1]):
            why = f"ends with `{forward[-1]}`"
        else:
            continue
        if tunnel is not None and _legacy_accepts_tunnel(lines, tunnel):
            continue
        out.append(f"{tool} filter FORWARD {why}")
    return out


def _legacy_accepts_tunnel(lines: Sequence[str], tunnel: str) -> bool:
    """Whether `iptables -S` LINES accept all traffic in and all out of TUNNEL where FORWARD's
    packets get: in FORWARD, or in a chain it jumps to without a match of its own, directly
    or through others (Docker's DOCKER-USER). An accept in a chain FORWARD never reaches, or
    reaches only for some packets (`-i docker0 -j CHAIN`), lets nothing of ours past."""
    jumps: dict[str, list[str]] = {}
    accepts: dict[str, set[str]] = {}
    for line in lines:
        if m := re.fullmatch(r"-A (\S+) -[jg] (\S+)", line):
            jumps.setdefault(m[1], []).append(m[2])
        elif m := re.fullmatch(rf"-A (\S+) (-[io]) {re.escape(tunnel)} -j ACCEPT", line):
            accepts.setdefault(m[1], set()).add(m[2])
    reached: set[str] = set()
    todo = ["FORWARD"]
    while todo:
        chain = todo.pop()
        if chain not in reached:
            reached.add(chain)
            todo += jumps.get(chain, [])
    return {"-i", "-o"} <= {flag for chain in reached for flag in accepts.get(chain, ())}


def _proc_net(name: str, netns: str | None) -> str:
    """/proc/net/NAME as NETNS sees it; empty when it does not exist."""
    if netns is None:
        try:
            return Path("/proc/net", name).read_text()
        except OSError:
            return ""
    res = _tool(["ip", "netns", "exec", netns, "cat", f"/proc/net/{name}"])
    return res.stdout if res.returncode == 0 else ""


# -- forwarding sysctls ---------------------------------------------------------------------

_IPV4_FORWARD = "net/ipv4/ip_forward"
_IPV6_FORWARD = "net/ipv6/conf/all/forwarding"


def _run(cmd: Sequence[str]) -> str:
    res = _tool(cmd)
    if res.returncode != 0:
        raise FirewallError(f"`{' '.join(cmd)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def _sysctl_read(keys: Sequence[str], netns: str | None) -> list[str]:
    if not keys:
        return []
    if netns is None:
        return [_proc_sys(k).read_text().strip() for k in keys]
    # /proc/sys/net shows the namespace of whoever opens it, hence sysctl run inside; the
    # slash form of the keys keeps dots in interface names (eth0.100) literal.
    values = _run(["ip", "netns", "exec", netns, "sysctl", "-n", *keys]).splitlines()
    if len(values) != len(keys):
        raise FirewallError(f"sysctl returned {len(values)} values for {len(keys)} keys")
    return values


def _sysctl_write(key: str, value: str, netns: str | None) -> None:
    if netns is None:
        _proc_sys(key).write_text(value + "\n")
    else:
        _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}"])


def _proc_sys(key: str) -> Path:
    if ".." in key.split("/"):
        raise ValueError(f"bad sysctl key {key!r}")
    return Path("/proc/sys") / key


def _conf_names(family: str, netns: str | None) -> list[str]:
    """The directories of net/FAMILY/conf: every interface, `all` and `default`."""
    if netns is None:
        return sorted(p.name for p in _proc_sys(f"net/{family}/conf").iterdir())
    return sorted(_run(["ip", "netns", "exec", netns, "ls", f"/proc/sys/net/{family}/conf"])
                  .split())


def _ipv6_interfaces(netns: str | None) -> list[str]:
    return [n for n in _conf_names("ipv6", netns) if n not in ("all", "default", "lo")]


def enable_forwarding(netns: str | None = None, *, ipv4: bool = True, ipv6: bool = False,
                      record: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Turns on forwarding of the families asked for (`ipv4`, `ipv6`: those the tunnel has
    addresses of; a family it has none of is left as it is, since turning it on would make the
    host a router for traffic no enclave sends); returns the values it replaced, in
    the order it changed them, for :func:`restore_forwarding`. Before each write, RECORD (if
    given) gets every value to be replaced so far, the ones about to be written included: a
    caller that keeps it on disk (the parent's state file) then never has a changed setting
    without its old value, whenever it is killed. A recorded value not written yet is the
    value in place, which restoring it leaves as it is.

    With IPv6 forwarding on, the kernel ignores router advertisements on interfaces whose
    accept_ra is 1 — on EC2 that would make the host lose its IPv6 default route — so when
    this call is what turns it on, those interfaces go to accept_ra=2 (accept even when
    forwarding) first, and so does `default`, which interfaces that come later (a hot-plugged
    ENI) start from; it goes first, so that an interface appearing meanwhile either inherits
    2 or is in the list read after. The host then takes advertisements exactly where it took
    them before.

    With IPv6 forwarding on already, the host routes and its admin has set accept_ra as
    wanted: none is changed. Moving them to 2 there let a container (a bridge's or veth's
    far end, NET_RAW is enough) give the host a default route with one advertisement.
    Only 1s are changed: the tunnel, which :func:`refuse_router_messages` has set to 0
    before, stays at 0."""
    prev: dict[str, str] = {}

    def change(found: dict[str, str], value: str, also: dict[str, str] | None = None) -> None:
        # ALSO: values the writes change as a side effect, recorded with them.
        if not found:
            return
        prev.update(also or {})
        prev.update(found)
        if record is not None:
            record(dict(prev))
        for key in found:
            _sysctl_write(key, value, netns)

    def ones(names: Sequence[str]) -> dict[str, str]:
        # Only what a record may hold (is_forwarding_sysctl), or it could not be read back.
        keys = [k for n in names if is_forwarding_sysctl(k := f"net/ipv6/conf/{n}/accept_ra")]
        return {k: v for k, v in zip(keys, _sysctl_read(keys, netns), strict=True) if v == "1"}

    if ipv6 and _sysctl_read([_IPV6_FORWARD], netns) != ["1"]:
        change(ones(["default"]), "2")
        change(ones(_ipv6_interfaces(netns)), "2")
    keys = [*([_IPV4_FORWARD] if ipv4 else []), *([_IPV6_FORWARD] if ipv6 else [])]
    found = {k: v for k, v in zip(keys, _sysctl_read(keys, netns), strict=True) if v != "1"}
    # Writing a family's global forwarding sets every interface's, and `default`'s, to the
    # same value, and so does putting it back: those that differ from it now are recorded
    # too, for restore_forwarding to put back after the global.
    own: dict[str, str] = {}
    for key, old in found.items():
        family = "ipv4" if key == _IPV4_FORWARD else "ipv6"
        names = [k for n in _conf_names(family, netns)
                 if is_forwarding_sysctl(k := f"net/{family}/conf/{n}/forwarding")]
        own.update({k: v for k, v in zip(names, _sysctl_read(names, netns), strict=True)
                    if v != old and v in FORWARDING_VALUES})
    change(found, "1", own)
    return prev


_ACCEPT_RA_RE = re.compile(r"net/ipv6/conf/([^/]+)/accept_ra")
_FORWARDING_RE = re.compile(r"net/(ipv[46])/conf/([^/]+)/forwarding")
_KERNEL_IFNAME_RE = re.compile(r"[^/:\x00-\x20\x7f]+")
# What enable_forwarding may have replaced: sysctls that hold one of these.
FORWARDING_VALUES = ("0", "1", "2")


def is_forwarding_sysctl(key: object) -> bool:
    """Whether KEY is one :func:`enable_forwarding` changes (and so one a record of its old
    values may name): IPv4 and IPv6 forwarding, accept_ra of `default` or an interface, and
    the forwarding of `default` or an interface (which the global one's write sets)."""
    if not isinstance(key, str):
        return False
    if key in (_IPV4_FORWARD, _IPV6_FORWARD):
        return True
    if m := _FORWARDING_RE.fullmatch(key):
        return m.group(2) != "all" and _kernel_ifname(m.group(2))
    m = _ACCEPT_RA_RE.fullmatch(key)
    return bool(m) and m.group(1) not in ("all", "lo") and _kernel_ifname(m.group(1))


def _kernel_ifname(name: str) -> bool:
    # Any name the kernel takes for an interface (dev_valid_name: no '/', ':' or white
    # space, at most 15 bytes), which cannot climb out of net/*/conf: `#`, `~` or a
    # non-ASCII name refused here made the record unreadable and forwarding never restored.
    return name not in (".", "..") and _KERNEL_IFNAME_RE.fullmatch(name) is not None \
        and len(name.encode(errors="surrogateescape")) < 16


def check_forwarding_record(prev: object) -> dict[str, str]:
    """PREV as a record of forwarding values to put back, or ValueError saying what in it is
    not one (a key enable_forwarding never writes, a value not 0, 1 or 2)."""
    if not isinstance(prev, Mapping):
        raise ValueError(f"not a mapping of sysctl to value: {type(prev).__name__}")
    for key, value in prev.items():
        if not is_forwarding_sysctl(key):
            raise ValueError(f"{key!r} is not a forwarding sysctl wgvsock changes")
        if not isinstance(value, str) or value not in FORWARDING_VALUES:
            raise ValueError(f"{key}: {value!r} is not one of "
                             + ", ".join(f'"{v}"' for v in FORWARDING_VALUES))
    return dict(prev)


def restore_forwarding(prev: Mapping[str, str], netns: str | None = None) -> None:
    """Puts back what :func:`enable_forwarding` changed (forwarding off before accept_ra).

    A global forwarding that is no longer the 1 written is left, and so is every
    interface's forwarding of that family: someone set it since, which set theirs, and
    their values stand. Otherwise the global goes back (which sets every interface's to
    it), then each interface's forwarding that differed from it.

    An interface that is gone by now (the profile's own tunnel, a detached ENI) is skipped:
    its accept_ra went with it. So is an accept_ra that is no longer the 2 written: someone
    set it since, and their value stands (a parent's tunnel, whose 0 must never become 1
    again while it is up, or a record an older wgvsock left with a tunnel in it)."""
    check_forwarding_record(prev)  # raises ValueError before anything is written
    restored = set()
    for key, value in prev.items():
        if key in (_IPV4_FORWARD, _IPV6_FORWARD) and _sysctl_get(key, netns) == "1":
            _sysctl_write(key, value, netns)
            restored.add("ipv4" if key == _IPV4_FORWARD else "ipv6")
    for key, value in prev.items():
        if (m := _FORWARDING_RE.fullmatch(key)) and m.group(2) != "all" \
                and m.group(1) in restored \
                and _sysctl_get(key, netns) is not None:  # None: the interface is gone
            _sysctl_write(key, value, netns)
    present: set[str] | None = None
    for key, value in reversed(list(prev.items())):
        if key in (_IPV4_FORWARD, _IPV6_FORWARD) or _FORWARDING_RE.fullmatch(key):
            continue
        if (m := _ACCEPT_RA_RE.fullmatch(key)) and m.group(1) != "default":
            if present is None:
                present = set(_ipv6_interfaces(netns))
            if m.group(1) not in present:
                continue
        if m and _sysctl_get(key, netns) not in (None, "2"):
            continue
        _sysctl_write(key, value, netns)


# What the tunnel must never take from the other side: router advertisements (a default
# route, a prefix and an address, an MTU, a hop limit) and redirects (a route to anywhere
# through the other side). On the parent, the enclave's allowed IPs are never link-local
# (services/profile.py), so neither can arrive; these are what make the kernel ignore them if
# one ever did. The enclave, which does not trust the parent, sets them on its own tunnel,
# whose allowed IPs for the parent (its routes, ::/0 by default) take link-local sources.
# autoconf too: no address from an advertised prefix, should accept_ra become 1 again.
_TUNNEL_SYSCTLS = ("net/ipv6/conf/{}/accept_ra", "net/ipv6/conf/{}/autoconf",
                   "net/ipv6/conf/{}/accept_redirects", "net/ipv4/conf/{}/accept_redirects")


def refuse_router_messages(ifname: str, netns: str | None = None) -> list[str]:
    """Sets accept_ra, autoconf and accept_redirects of IFNAME (the tunnel) to 0; returns the
    keys that were not 0 already. Both roles call it on their tunnel. A key that does not
    exist is skipped: without IPv6 on the interface (an MTU below 1280, IPv6 disabled)
    nothing reads advertisements, and when IPv6 comes back the interface starts from
    `default`, which is why the parent calls this again."""
    # "all" and "default" name no interface (the kernel refuses them) but sysctl directories
    # of their own: `default` is what every later interface starts from.
    if not _IFNAME_RE.fullmatch(ifname) or ifname in (".", "..", "all", "default"):
        raise ValueError(f"bad interface name {ifname!r}")
    changed = []
    for key in (k.format(ifname) for k in _TUNNEL_SYSCTLS):
        value = _sysctl_get(key, netns)
        if value is not None and value != "0":
            _sysctl_write(key, "0", netns)
            changed.append(key)
    return changed


def _sysctl_get(key: str, netns: str | None) -> str | None:
    """KEY's value, or None when it does not exist."""
    if netns is None:
        try:
            return _proc_sys(key).read_text().strip()
        except FileNotFoundError:
            return None
    # -e: an unknown key prints nothing instead of failing.
    return _run(["ip", "netns", "exec", netns, "sysctl", "-n", "-e", key]).strip() or None
