"""YAML profiles: one file describes a parent-and-enclave pair (issue 4).

The same file is installed on the parent and baked into the enclave image, so both sides resolve
the same defaults from it. Validation here is pure — parse_profile() never looks at the host — so
every role can refuse a bad profile before it changes anything, and tests need no root. What does
depend on the host (the tunnel subnet clashing with the host's own networks, routes and rules) is
check_host() and check_host_warnings(), fed by local_networks() and local_routes(), and
check_routes() (enclave routes the host has no route for), fed by local_routes().

Errors read `FILE:LINE: KEY: reason — how to fix`. Line numbers come from the YAML node marks,
which is why the document is composed into nodes and walked by hand instead of safe_load()ed:
a plain dict has lost every line number by the time we could complain about a value.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import copy
import difflib
import hashlib
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, Literal, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..conn.framing import MAX_STREAM_MTU
from ..regular import NotRegularFile, read_regular
from ..safetext import message, prose
from .egress.names import NamePattern, NameRule, NameRuleError, looks_like_name
from .firewall import MAX_CONNECTIONS_LIMIT

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network
Kind = Literal["vsock", "unix", "tcp"]
Protocol = Literal["tcp", "udp"]
_T = TypeVar("_T")

VERSION = 1
KINDS: tuple[str, ...] = ("vsock", "unix", "tcp")
PROTOCOLS: tuple[str, ...] = ("tcp", "udp")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
# Linux accepts almost any byte in an interface name; we accept what ip(8), nft and systemd
# unit names all handle without quoting.
IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
IFNAMSIZ = 16
VSOCK_PORT_MAX = 2**32 - 2  # 2^32-1 is VMADDR_PORT_ANY, which cannot be a listening port
VSOCK_CID_MAX = 2**32 - 2  # 2^32-1 is VMADDR_CID_ANY
ENCLAVE_CID_MIN = 4  # 0..3 are hypervisor, local, host and (on Nitro) the parent
TCP_PORT_MAX = 65535
# sun_path holds 107 bytes; the sockets inside the directory need room for their own names.
UNIX_DIR_MAX = 80
PCR_HEX_LEN = 96  # SHA-384: 48 bytes
WG_KEY_LEN = 32
# Every profile transport is a stream, whose frames limit the MTU.
STREAM_MTU_MAX = MAX_STREAM_MTU
PCR_MAX_INDEX = 31
# Image, kernel and application: all zeros in a debug-mode enclave's document (PCR8, the
# signing certificate, is all zeros for an unsigned image too, so pinning that means something).
_DEBUG_PCRS = (0, 1, 2)
# A profile is a few dozen lines: parent/profile.example.yaml, every option with comments, is
# 7 KiB. PyYAML's pure-Python composer costs 5-8 us a byte on adversarial input (flow
# collections nested MAX_FLOW_DEPTH deep, thousands of keys or aliases): 15 s at the 1 MiB
# limit this was, 0.5 s here; 64 KiB still holds some 1500 parent.egress entries.
MAX_PROFILE_BYTES = 64 << 10
# A port or an index: ASCII digits only, since str.isdigit() also takes superscript two,
# which int() refuses, and Arabic-Indic or fullwidth four, which int() reads as 4 (a number
# written so is a mistake or a disguise); and few of them, since int() refuses over 4300.
_DIGITS = re.compile(r"[0-9]{1,10}")
# enclave.user: UID or UID:GID in ASCII digits, or a name as useradd takes one by default
# (Debian's and shadow's NAME_REGEX, with upper case and '.' as most systems allow; a
# trailing '$' for machine accounts), at most 32 characters. Not all digits: that is a UID.
# Any count of digits: one too many is "out of range", not "neither a name nor a UID".
_USER_IDS = re.compile(r"([0-9]+)(?::([0-9]+))?")
USER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?")
ID_MAX = 2**32 - 2

DEFAULT_INTERFACE = "wg0"
DEFAULT_MTU = 1420
# Privileged (below 1024): on the parent only root (CAP_NET_BIND_SERVICE) may bind such a vsock
# port, so while `parent up` is down an unprivileged host process cannot take its place.
DEFAULT_PORT = 820
DEFAULT_PARENT_CID = 3
DEFAULT_PARENT_V4 = IPv4Interface("10.77.0.1/30")
DEFAULT_ENCLAVE_V4 = IPv4Interface("10.77.0.2/30")
DEFAULT_CPU_COUNT = 2
# An enclave needs roughly 4x its EIF in memory; a slim Python image is a few hundred MiB.
DEFAULT_MEMORY_MIB = 1024
DEFAULT_MAX_AGE = 300
# Seconds a resolved address stays allowed after its TTL: clients cache answers a little
# longer than they should, and a connection may start just as the TTL runs out.
DEFAULT_DNS_GRACE = 60
# Connections the enclave may keep open through the parent and to it, all together: each is
# an entry in the host's conntrack table (262144 by default on a host with more than 4 GiB),
# shared with everything else on it. No limit unless the profile sets one: the kernel's count
# (nf_conncount) walks the list of counted connections for new ones, once per clock tick on
# recent kernels and for every new connection before (Linux commit d265929930e2, 2022), so
# an enclave that holds many open and keeps opening more makes the parent's CPU pay in
# proportion to the limit. Where the table is the greater worry, set a few thousand.
DEFAULT_MAX_CONNECTIONS: int | None = None
MAX_CONNECTIONS_MAX = MAX_CONNECTIONS_LIMIT
DEFAULT_METRICS_INTERVAL = 60
METRICS_INTERVAL_MIN = 10  # CloudWatch bills per request; below 60 s it stores high resolution
# CloudWatch's rules for a namespace; "AWS/" is reserved for AWS's own.
CLOUDWATCH_NAMESPACE_RE = re.compile(r"[0-9A-Za-z.\-_/#: ]{1,255}")

# Route 53 Resolver and the instance metadata service, as reached from a Nitro instance.
AWS_DNS_V4 = IPv4Address("169.254.169.253")
AWS_DNS_V6 = IPv6Address("fd00:ec2::253")
IMDS_V4 = IPv4Address("169.254.169.254")
IMDS_V6 = IPv6Address("fd00:ec2::254")
# The ECS task and EKS Pod Identity credential endpoints: like IMDS, they hand out AWS
# credentials to whoever asks from the host.
ECS_CREDENTIALS = IPv4Address("169.254.170.2")
EKS_CREDENTIALS = IPv4Address("169.254.170.23")
EKS_CREDENTIALS_V6 = IPv6Address("fd00:ec2::23")  # the Pod Identity agent listens on both
_LINK_LOCAL_V4 = IPv4Network("169.254.0.0/16")
# Always denied, whatever the profile's own deny list says, unless an allow rule names the
# endpoint explicitly: aimed inside its scope (a catch-all such as 0.0.0.0/0 or 128.0.0.0/1 is
# about "the internet" and says nothing about these) and covering its address.
CREDENTIAL_ENDPOINTS: tuple[tuple[IPAddress, IPNetwork], ...] = (
    (IMDS_V4, _LINK_LOCAL_V4),
    (IMDS_V6, IPv6Network("fd00:ec2::/32")),
    (ECS_CREDENTIALS, _LINK_LOCAL_V4),
    (EKS_CREDENTIALS, _LINK_LOCAL_V4),
    (EKS_CREDENTIALS_V6, IPv6Network("fd00:ec2::/32")),
)

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_TYPE_NAMES = {
    "tag:yaml.org,2002:null": "nothing (null)",
    "tag:yaml.org,2002:bool": "true/false",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:str": "a string",
}


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a profile. line 0 means "no line" (e.g. the file cannot be read)."""

    file: str
    line: int
    key: str
    reason: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        hint = f" — {self.hint}" if self.hint else ""
        # One line each, whatever the file holds: a quoted value with a line break or a
        # terminal escape in it is shown escaped (a profile may be someone else's file).
        return prose(f"{where}:{key} {self.reason}{hint}", 2000)


# Problems str(ProfileError) shows: a file of thousands of mistakes is no profile, and a
# screen of them says so better than every one would.
MAX_SHOWN_PROBLEMS = 50


class ProfileError(ValueError):
    """A profile was refused. str() lists the problems, one per line (at most
    MAX_SHOWN_PROBLEMS, then how many more there are); .problems holds every one."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems: list[Problem] = list(problems)
        shown = [str(p) for p in self.problems[:MAX_SHOWN_PROBLEMS]]
        if len(self.problems) > MAX_SHOWN_PROBLEMS:
            more = len(self.problems) - MAX_SHOWN_PROBLEMS
            shown.append(f"{self.problems[0].file}: and {more} more problems — is this the "
                         "right file? Fix the ones above first")
        super().__init__("\n".join(shown))


class _Invalid(ValueError):
    """A value that does not parse, with the reason and the fix kept apart for Problem."""

    def __init__(self, reason: str, hint: str = ""):
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason} — {hint}" if hint else reason)


# ---------------------------------------------------------------------------------------------
# The resolved profile


def _parse_ports(text: str, whole: str) -> tuple[int, int]:
    lo_text, sep, hi_text = text.partition("-")
    if not _DIGITS.fullmatch(lo_text) or (sep and not _DIGITS.fullmatch(hi_text)):
        raise _Invalid(f"bad port {text!r} in {whole!r}",
                       "write a port as 443 or a range as 8000-8999")
    lo = int(lo_text)
    hi = int(hi_text) if sep else lo
    for p in (lo, hi):
        if not 1 <= p <= TCP_PORT_MAX:
            raise _Invalid(f"port {p} in {whole!r} is out of range", "use 1..65535")
    if lo > hi:
        raise _Invalid(f"port range {text!r} in {whole!r} runs backwards",
                       f"write it as {hi}-{lo}")
    return lo, hi


def _no_scope(text: str) -> None:
    """Refuses an IPv6 scope id ("fe80::1%eth0"): ipaddress keeps it as written, and it
    would reach nft and ip(8) as part of the address; a tunnel, route or rule names none."""
    if "%" in text:
        scope = re.split(r"[/\]]", text.split("%", 1)[1], maxsplit=1)[0]
        raise _Invalid(f"{text!r} has an IPv6 scope id ({'%' + scope!r})",
                       f"drop {'%' + scope!r}: addresses here name no link")


def _parse_network(text: str, whole: str | None = None) -> IPNetwork:
    whole = text if whole is None else whole
    _no_scope(whole)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            fixed = ipaddress.ip_network(text, strict=False)
            raise _Invalid(f"{text!r} has host bits set", f"did you mean {fixed}?") from None
        if text.count(":") > 1 and re.search(r"/\d+:", text):
            raise _Invalid(f"{whole!r}: an IPv6 network with a port needs brackets",
                           "write it as [2001:db8::/32]:443 (quoted in YAML)") from None
        raise _Invalid(f"{text!r} is not an IP network",
                       "write a CIDR such as 10.0.0.0/8 or 2001:db8::/32") from None


@dataclass(frozen=True)
class Rule:
    """An egress allow/deny entry: a network, optionally a port range and a protocol.

    Written as "CIDR", "CIDR:port" or "CIDR:lo-hi", each optionally followed by "/tcp" or
    "/udp". IPv6 with a port needs brackets ("[2001:db8::/32]:443/tcp") because the colons are
    otherwise ambiguous; without a port a bare "2001:db8::/32" is fine.
    """

    network: IPNetwork
    ports: tuple[int, int] | None = None
    protocol: Protocol | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        whole = text
        s = text.strip()
        protocol: Protocol | None = None
        m = re.search(r"/([A-Za-z]+)$", s)
        if m:
            name = m.group(1).lower()
            if name == "tcp":
                protocol = "tcp"
            elif name == "udp":
                protocol = "udp"
            else:
                raise _Invalid(f"protocol {m.group(1)!r} in {whole!r} is not tcp or udp",
                               "end the rule with /tcp or /udp, or with neither for both")
            s = s[: m.start()]
        ports: tuple[int, int] | None = None
        if s.startswith("["):
            end = s.find("]")
            if end < 0:
                raise _Invalid(f"{whole!r} has '[' without ']'",
                               "write it as [2001:db8::/32]:443")
            net_text, rest = s[1:end], s[end + 1:]
            if rest:
                if not rest.startswith(":") or len(rest) == 1:
                    raise _Invalid(f"{whole!r} has something other than :PORT after ']'",
                                   "write it as [2001:db8::/32]:443")
                ports = _parse_ports(rest[1:], whole)
        elif s.count(":") == 1:
            # Exactly one colon can only be IPv4 with a port: IPv6 always has at least two.
            net_text, _, port_text = s.partition(":")
            ports = _parse_ports(port_text, whole)
        else:
            net_text = s
        return cls(_parse_network(net_text, whole), ports, protocol)

    def __str__(self) -> str:
        text = str(self.network)
        if self.ports is not None:
            lo, hi = self.ports
            port = str(lo) if lo == hi else f"{lo}-{hi}"
            text = f"[{text}]:{port}" if self.network.version == 6 else f"{text}:{port}"
        if self.protocol is not None:
            text += "/" + self.protocol
        return text


def parse_egress_entry(text: str) -> Rule | NameRule:
    """An allow/deny entry: a CIDR rule (see :class:`Rule`) or a host name rule, written the
    same way with a name in place of the CIDR (``api.stripe.com:443/tcp``, ``"*.example.com"``)."""
    s = text.strip()
    m = re.search(r"/([A-Za-z]+)$", s)
    host = s[: m.start()] if m else s
    if "[" in host or host.count(":") > 1:
        return Rule.parse(text)
    host, sep, port_text = host.partition(":")
    if not looks_like_name(host):
        return Rule.parse(text)
    try:
        pattern = NamePattern.parse(host)
    except NameRuleError as e:
        raise _Invalid(e.reason, e.hint) from None
    ports = _parse_ports(port_text, text) if sep else None
    protocol: Protocol | None = None
    if m:
        if m.group(1).lower() not in PROTOCOLS:
            raise _Invalid(f"protocol {m.group(1)!r} in {text!r} is not tcp or udp",
                           "end the rule with /tcp or /udp, or with neither for both")
        protocol = m.group(1).lower()  # type: ignore[assignment]
    return NameRule(pattern, ports, protocol)


def allows_every_address(allow: Iterable[Rule]) -> bool:
    """Whether ALLOW lets the enclave reach every address of a family, on any port."""
    return any(r.network.prefixlen == 0 and r.ports is None for r in allow)


@dataclass(frozen=True)
class Transport:
    kind: Kind = "vsock"
    port: int = DEFAULT_PORT
    control_port: int = DEFAULT_PORT + 1
    parent_cid: int = DEFAULT_PARENT_CID
    path: str = ""
    host: str | None = None


@dataclass(frozen=True)
class Egress:
    nat: bool
    interface: str | None
    allow: list[Rule]
    deny: list[Rule]
    # Host-name entries of allow/deny: the parent's DNS forwarder enforces them (egress/).
    allow_names: list[NameRule] = field(default_factory=list)
    deny_names: list[NameRule] = field(default_factory=list)
    # Where the forwarder sends queries; empty: the parent's /etc/resolv.conf.
    resolver: list[IPAddress] = field(default_factory=list)
    dns_grace: int = DEFAULT_DNS_GRACE
    # A credential endpoint an allow entry names, with that entry's ports and protocol only
    # (derived from `allow`): the parent's table accepts these and drops the rest of the
    # endpoint's traffic, after `deny` and before `allow`.
    lifted: list[Rule] = field(default_factory=list)
    # The most connections the enclave may have open through the parent and to it together;
    # a new one over it is dropped (firewall.FirewallSpec.max_connections).
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS  # None: no limit

    @property
    def uses_names(self) -> bool:
        return bool(self.allow_names or self.deny_names)

    def partly_denied(self) -> list[str]:
        """The credential endpoints an allow entry lifts for some ports or a protocol only,
        each with what reaches it ("169.254.169.254/32 (all but tcp port 80, which
        parent.egress.allow names)"): denied for the rest, though not in `deny`, which
        holds what is denied whole. One lifted whole is not among them."""
        out = []
        for network in dict.fromkeys(r.network for r in self.lifted):
            rules = [r for r in self.lifted if r.network == network]
            if any(r.ports is None and r.protocol is None for r in rules):
                continue
            reach = " or ".join(dict.fromkeys(_reach(r) for r in rules))
            out.append(f"{network} (all but {reach}, which parent.egress.allow names)")
        return out

    def effective_deny(self) -> list[str]:
        """What the enclave may not reach, as shown to the user: `deny`, the host names of
        deny, and the credential endpoints denied but for what an allow entry names."""
        return [*map(str, self.deny), *map(str, self.deny_names), *self.partly_denied()]

    @property
    def resolves_every_name(self) -> bool:
        """Whether the DNS forwarder answers names no allow entry lists: with every address
        allowed (0.0.0.0/0 or ::/0 on any port), refusing a name protects nothing, so deny
        names work as a block list."""
        return allows_every_address(self.allow)


def _reach(rule: Rule) -> str:
    """What of its network RULE lets through: "tcp port 80", "udp ports 1-9", "port 53"
    (both protocols), "tcp" (every port)."""
    if rule.ports is None:
        return str(rule.protocol)
    lo, hi = rule.ports
    port = f"port {lo}" if lo == hi else f"ports {lo}-{hi}"
    return f"{rule.protocol} {port}" if rule.protocol else port


@dataclass(frozen=True)
class Ingress:
    listen: int
    to: int
    protocol: Protocol = "tcp"


@dataclass(frozen=True)
class EnclaveLaunch:
    eif: str
    cpu_count: int = DEFAULT_CPU_COUNT
    memory_mib: int = DEFAULT_MEMORY_MIB
    cid: int | None = None
    debug: bool = False


@dataclass(frozen=True)
class CloudWatch:
    namespace: str
    interval: int = DEFAULT_METRICS_INTERVAL


@dataclass(frozen=True)
class Metrics:
    """parent.metrics: where Prometheus scrapes (host, port) and where CloudWatch gets them."""

    listen: tuple[IPAddress, int] | None = None
    cloudwatch: CloudWatch | None = None


@dataclass(frozen=True)
class ParentSide:
    addresses: list[IPInterface]
    private_key: str
    egress: Egress
    ingress: list[Ingress]
    enclave: EnclaveLaunch | None
    # The parent's WireGuard public key (base64), pinned: the enclave refuses any other parent
    # and `parent up` refuses a private key that does not match. None: not pinned.
    public_key: str | None = None
    # The only CID the control port accepts, for an enclave something else starts.
    enclave_cid: int | None = None
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class EnclaveUser:
    """enclave.user: whom `enclave up` runs CMD as. NAME is looked up in the image's
    /etc/passwd when `enclave up` runs (the parent, where the profile is also read, has other
    users); otherwise UID, and GID when given."""
    name: str | None = None
    uid: int | None = None
    gid: int | None = None

    def __str__(self) -> str:
        if self.name is not None:
            return self.name
        return f"{self.uid}" if self.gid is None else f"{self.uid}:{self.gid}"


@dataclass(frozen=True)
class EnclaveSide:
    addresses: list[IPInterface]
    dns: list[IPAddress]
    routes: list[IPNetwork]
    user: EnclaveUser | None = None


@dataclass(frozen=True)
class Attestation:
    require: bool = False
    pcrs: dict[int, str] = field(default_factory=dict)
    max_age: int = DEFAULT_MAX_AGE
    # Accept documents of debug-mode enclaves (all-zero PCRs), reported as "debug", never as
    # attested: such an enclave cannot prove which image it runs.
    allow_debug: bool = False
    # FOR TESTS ONLY: a PEM root to trust instead of AWS's, so test CAs can sign documents.
    test_root_ca: str | None = None


@dataclass(frozen=True)
class Profile:
    version: int
    name: str
    interface: str
    mtu: int
    transport: Transport
    parent: ParentSide
    enclave: EnclaveSide
    attestation: Attestation
    path: str
    # Dotted key -> line, so later checks (check_host, the roles) can point into the file too.
    # Not part of equality: the same profile written differently is still the same profile.
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    # What is valid but very likely not what the writer meant (an allow entry a deny entry
    # covers whole): `profile check` prints them, `parent up` and `reload` log them.
    warnings: list[Problem] = field(default_factory=list, compare=False, repr=False)

    def line_of(self, key: str) -> int:
        return _line_of(self.lines, key)


def _line_of(lines: Mapping[str, int], key: str) -> int:
    """The line of KEY, or of its nearest ancestor that the file spelled out."""
    while key:
        if key in lines:
            return lines[key]
        key = re.sub(r"(\[\d+\]|\.?[^.\[]+)$", "", key)
    return lines.get("", 1)


# ---------------------------------------------------------------------------------------------
# Parsing

_TOP_KEYS = ("version", "name", "interface", "mtu", "transport", "parent", "enclave",
             "attestation")
_TRANSPORT_KEYS = ("kind", "port", "control_port", "parent_cid", "path", "host")
_PARENT_KEYS = ("address", "private_key", "public_key", "egress", "ingress", "enclave",
                "enclave_cid", "metrics")
_EGRESS_KEYS = ("nat", "interface", "allow", "deny", "resolver", "dns_grace", "test_dns_grace",
                "max_connections")
_INGRESS_KEYS = ("listen", "to", "protocol")
_LAUNCH_KEYS = ("eif", "cpu_count", "memory_mib", "cid", "debug")
_ENCLAVE_KEYS = ("address", "dns", "routes", "user")
_ATTEST_KEYS = ("require", "pcrs", "max_age", "allow_debug", "test_root_ca")
_METRICS_KEYS = ("listen", "cloudwatch")
_CLOUDWATCH_KEYS = ("namespace", "interval")


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _is_null(node: Node | None) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag == _NULL_TAG)


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _TYPE_NAMES.get(node.tag, f"a value tagged {node.tag}")


def _construct(node: ScalarNode) -> Any:
    # A fresh constructor per scalar: it caches by node, and we only ever want one value out.
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


class _Parser:
    """Walks the composed YAML, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.lines: dict[str, int] = {}
        # The key each parsed egress entry was written under (by id: equal entries written
        # twice are two entries), for problems found by comparing the lists.
        self.entry_keys: dict[int, str] = {}

    # -- recording ------------------------------------------------------------------------------

    def problem(self, line: int, key: str, reason: str, hint: str = "") -> None:
        self.problems.append(Problem(self.file, line, key, reason, hint))

    def warn(self, line: int, key: str, reason: str, hint: str = "") -> None:
        self.warnings.append(Problem(self.file, line, key, reason, hint))

    def at(self, key: str) -> int:
        return _line_of(self.lines, key)

    def ok(self, *keys: str) -> bool:
        """True when nothing at or below KEYS was refused, so cross-checks on them make sense."""
        for p in self.problems:
            for k in keys:
                if p.key == k or p.key.startswith((k + ".", k + "[")):
                    return False
        return True

    # -- structure ------------------------------------------------------------------------------

    def mapping(self, node: Node | None, key: str, known: Sequence[str]) -> dict[str, Node]:
        """KEY's entries by name, null values dropped (an empty `key:` means "use the default")."""
        if _is_null(node):
            return {}
        assert node is not None
        if not isinstance(node, MappingNode):
            leaf = key.rsplit(".", 1)[-1] or "the file"
            self.problem(_line(node), key, f"expected a mapping, got {_describe(node)}",
                         f"write {leaf} as indented `key: value` lines ({', '.join(known)})")
            return {}
        out: dict[str, Node] = {}
        seen: set[str] = set()
        for knode, vnode in node.value:
            dotted_parent = f"{key}." if key else ""
            if not isinstance(knode, ScalarNode):
                self.problem(_line(knode), key or "(top level)",
                             f"a key must be a name, got {_describe(knode)}",
                             f"use one of: {', '.join(known)}")
                continue
            # The raw text, not the resolved value: `on:` or `no:` are bools to YAML 1.1 but
            # names to whoever wrote them.
            name = knode.value
            dotted = dotted_parent + name
            if name == "<<":
                self.problem(_line(knode), dotted, "YAML merge keys are not supported",
                             "write the keys out in full")
                continue
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                # Keys are only ever added: one this release does not know may be a later
                # one's (a profile written for the upgraded parent, read by an older wgvsock).
                hint = (f"did you mean '{close[0]}'?" if close
                        else f"known keys here: {', '.join(known)} (a key added by a later "
                             f"wgvsock needs that wgvsock)")
                self.problem(_line(knode), dotted, f"unknown key '{name}'", hint)
                continue
            if name in seen:
                # PyYAML silently keeps the last one; a profile that says two things is a mistake.
                self.problem(_line(knode), dotted,
                             f"given twice (first on line {self.lines[dotted]})",
                             "keep only one of them")
                continue
            seen.add(name)
            self.lines[dotted] = _line(knode)
            if not _is_null(vnode):
                out[name] = vnode
        return out

    def items(self, node: Node | None, key: str, example: str) -> list[tuple[str, Node]] | None:
        """A list as (KEY[i], node) pairs; a single scalar stands for a list of one."""
        if _is_null(node):
            return None
        assert node is not None
        if isinstance(node, ScalarNode):
            return [(key, node)]
        if not isinstance(node, SequenceNode):
            self.problem(_line(node), key, f"expected a list, got {_describe(node)}",
                         f"write it as [{example}]")
            return None
        out = []
        for i, item in enumerate(node.value):
            k = f"{key}[{i}]"
            self.lines[k] = _line(item)
            out.append((k, item))
        return out

    # -- scalars --------------------------------------------------------------------------------

    def text(self, node: Node, key: str, example: str) -> str | None:
        if not isinstance(node, ScalarNode) or _is_null(node):
            hint = f"write it as a string, e.g. {example}"
            if isinstance(node, SequenceNode) and example.startswith(("[", '"[')):
                hint = f"a value starting with '[' must be quoted in YAML, e.g. {example}"
            self.problem(_line(node), key, f"expected a string, got {_describe(node)}", hint)
            return None
        # The raw scalar, not the resolved one: a PCR of all digits or "1e5" stays text. An
        # explicit tag must still fit it (`name: !!int abc` is no name, but a mistake).
        if (getattr(node, "explicit_tag", False) and node.tag != _STR_TAG
                and self._scalar(node, key) is _FAIL):
            return None
        return node.value

    def integer(self, node: Node, key: str, lo: int, hi: int, what: str = "", *,
                above: str = "") -> int | None:
        """NODE as an integer in LO..HI; WHAT follows "out of range" in the message, ABOVE
        too for a value over HI."""
        value = self._scalar(node, key)
        if value is _FAIL:
            return None
        if (type(value) is str and node.style is None and not getattr(node, "explicit_tag", False)
                and _LEADING_ZERO.fullmatch(node.value.replace("_", ""))):
            # Written without quotes, but not octal (0820): YAML 1.1 reads it as text, and
            # "got a string" would not tell the writer what is wrong.
            raw = node.value.replace("_", "")
            meant = int(raw, 10)
            self.problem(_line(node), key,
                         f"'{node.value}' has a leading zero, which is not allowed (to YAML "
                         "it is not a number at all)",
                         f"write {meant}, not {node.value}" if lo <= meant <= hi
                         else f"write a number in {lo}..{hi} without leading zeros")
            return None
        if type(value) is not int:
            if node.style in ("'", '"'):
                self.problem(_line(node), key, f"expected an integer, got {_describe(node)}",
                             f"write a number in {lo}..{hi} without quotes")
            else:  # written plain: quotes are not what is wrong with it
                self.problem(_line(node), key, f"expected an integer, got {_describe(node)} "
                             f"('{node.value}')", f"write a whole number in {lo}..{hi}")
            return None
        # YAML 1.1 (PyYAML's) reads 0777 as octal and 443:8443 as base 60: the number
        # used would not be the one written. Hex (0x) and binary (0b) say what they are.
        raw = node.value.replace("_", "")
        if ":" in raw:
            self.problem(_line(node), key, f"'{node.value}' is {value} to YAML (numbers "
                         "between colons are base 60)",
                         f"write one number in {lo}..{hi} in decimal digits")
            return None
        if _OCTAL.fullmatch(raw):
            # Said as a rule rather than as octal, which is news to most ('00' is 0 either
            # way); YAML 1.2 tools would read 0777 as 777, so neither reading is safe.
            meant = int(raw, 10)
            octal = f" (YAML would read it as octal: {value})" if value != meant else ""
            self.problem(_line(node), key,
                         f"'{node.value}' has a leading zero, which is not allowed{octal}",
                         f"write {meant}, not {node.value}" if lo <= meant <= hi
                         else f"write a number in {lo}..{hi} without leading zeros")
            return None
        if not lo <= value <= hi:
            self.problem(_line(node), key,
                         f"{value} is out of range{what}{above if value > hi else ''}",
                         f"use {lo}..{hi}")
            return None
        return value

    def boolean(self, node: Node, key: str) -> bool | None:
        value = self._scalar(node, key)
        if value is _FAIL:
            return None
        if type(value) is not bool:
            self.problem(_line(node), key, f"expected true or false, got {_describe(node)}",
                         "write true or false without quotes")
            return None
        return value

    def _scalar(self, node: Node, key: str) -> Any:
        if not isinstance(node, ScalarNode):
            self.problem(_line(node), key, f"expected a single value, got {_describe(node)}",
                         "write a plain value after the colon")
            return _FAIL
        try:
            return _construct(node)
        except Exception as e:  # PyYAML's constructors each fail their own way: ValueError
            # (!!int 0x), KeyError (!!bool x), AttributeError (!!timestamp x)
            detail = str(e).splitlines()[0] if isinstance(e, yaml.YAMLError | ValueError) else ""
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            shown = _withheld(node.value)
            if shown is None:
                shown = f"'{node.value}'"
            else:
                detail = ""  # int()'s and the like quote the value
            self.problem(_line(node), key,
                         f"cannot read {shown} as {tag}"
                         + (f" ({detail})" if detail else ""),
                         "drop the explicit tag or fix the value"
                         if getattr(node, "explicit_tag", False) else "fix the value")
            return _FAIL

    def choice(self, node: Node, key: str, choices: Sequence[str]) -> str | None:
        value = self.text(node, key, choices[0])
        if value is None:
            return None
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(choices)}"
            self.problem(_line(node), key, f"'{value}' is not one of {', '.join(choices)}", hint)
            return None
        return value

    def parsed(self, node: Node, key: str, example: str,
               parse: Callable[[str], _T]) -> _T | None:
        """Run PARSE on the string at NODE, turning its ValueError into a Problem."""
        text = self.text(node, key, example)
        if text is None:
            return None
        try:
            return parse(text)
        except _Invalid as e:
            self.problem(_line(node), key, e.reason, e.hint)
        except ValueError:
            self.problem(_line(node), key, f"{text!r} does not parse", f"write it like {example}")
        return None

    def printable(self, node: Node, key: str, text: str) -> bool:
        """Whether TEXT has no unprintable character (see _printable); a problem if not."""
        try:
            _printable(text)
        except _Invalid as e:
            self.problem(_line(node), key, e.reason, e.hint)
            return False
        return True

    def interface(self, node: Node, key: str) -> str | None:
        name = self.text(node, key, DEFAULT_INTERFACE)
        if name is None:
            return None
        if len(name) >= IFNAMSIZ:
            self.problem(_line(node), key,
                         f"interface name '{name}' is longer than {IFNAMSIZ - 1} characters",
                         "Linux limits interface names to 15 characters; shorten it")
        elif not IFNAME_RE.fullmatch(name):
            self.problem(_line(node), key, f"'{name}' is not a valid interface name",
                         "use letters, digits, '_', '.' and '-', starting with a letter, a "
                         "digit or '_', e.g. wg0")
        elif name in ("all", "default"):
            # The kernel refuses them (EINVAL): they are the names of the per-interface
            # sysctl directories net.ipv4.conf.all and .default.
            self.problem(_line(node), key,
                         f"'{name}' is reserved: net.ipv4.conf.{name} is not an interface",
                         "choose another name, e.g. wg0")
        elif name == "lo":
            self.problem(_line(node), key, "'lo' is the loopback interface",
                         "choose another name, e.g. wg0")
        else:
            return name
        return None


_FAIL = object()
_OCTAL = re.compile(r"[-+]?0[0-7]+")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]+")


def _address(text: str) -> IPInterface:
    if "/" not in text:
        raise _Invalid(f"{text!r} has no prefix length",
                       "give the tunnel subnet too, e.g. 10.77.0.1/30")
    _no_scope(text)
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise _Invalid(f"{text!r} is not an address with a prefix",
                       "write it like 10.77.0.1/30 or fd77::1/126") from None


def _ip(text: str) -> IPAddress:
    _no_scope(text)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid(f"{text!r} is not an IP address",
                       "write it like 169.254.169.253 or fd00:ec2::253") from None


def _printable(text: str) -> None:
    """Refuses a path or name with a control or other unprintable character in it: a line
    break, a terminal escape or a NUL would reach logs, error messages, the file system
    (a directory `parent up` makes) and other programs' command lines as it is."""
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        shown = _withheld(text) or f"'{prose(text, 200)}'"
        raise _Invalid(f"{shown} contains an unprintable character "
                       f"({bad!a})", "write it without that character (in double quotes "
                       "YAML reads \\n, \\t, \\e and \\0 as control characters: use single "
                       "quotes or none)")


# A run of base64 (or hex) as long as a key's: 44 characters of base64 are a WireGuard key, 64
# hex digits one as UAPI writes it. No path, parameter name or public key has a reason to hold
# one where a private key was due.
_KEYLIKE = re.compile(r"[A-Za-z0-9+/]{40,}")


def _withheld(text: str) -> str | None:
    """What a message says in place of TEXT, a value where a private key's place is named,
    when TEXT holds what may be the key itself; None when TEXT may be quoted. These messages
    reach the terminal, the journal and CI logs: a key is never quoted, not even in part."""
    if _KEYLIKE.search(text) is None:
        return None
    return f"a value of {len(text)} characters (not shown: it may hold a key)"


_INLINE_KEY_HINT = ("the profile says where the private key is, never the key itself (the "
                    "profile goes into the enclave image): make a new key, since this one was "
                    "written where others may read it (`wg genkey > /etc/wgvsock/NAME.key`, "
                    "mode 0600), and write that file's absolute path, ssm:NAME or "
                    "secretsmanager:NAME")


def _private_key(text: str) -> str:
    if (shown := _withheld(text)) is not None and not text.startswith(
            ("/", "ssm:", "secretsmanager:")):
        raise _Invalid(f"{shown} is not an absolute path, ssm:NAME or secretsmanager:NAME",
                       _INLINE_KEY_HINT)
    _printable(text)
    for scheme in ("ssm:", "secretsmanager:"):
        if text.startswith(scheme):
            if len(text) == len(scheme):
                raise _Invalid(f"'{text}' names no parameter",
                               f"write it as {scheme}NAME")
            return text
    if not text.startswith("/"):
        raise _Invalid(f"'{text}' is not an absolute path, ssm:NAME or secretsmanager:NAME",
                       "systemd starts the parent in /, so write the full path, "
                       "e.g. /etc/wgvsock/NAME.key")
    return text


def _listen(text: str) -> tuple[IPAddress, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not _DIGITS.fullmatch(port) or not 1 <= int(port) <= TCP_PORT_MAX:
        raise _Invalid(f"{text!r} is not ADDRESS:PORT",
                       'write it like "127.0.0.1:9586" or "[::1]:9586"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise _Invalid(f"{text!r}: an IPv6 address with a port needs brackets",
                       'write it like "[::1]:9586"')
    _no_scope(host)
    try:
        return ipaddress.ip_address(host), int(port)
    except ValueError:
        raise _Invalid(f"{host!r} in {text!r} is not an IP address",
                       'listen on an address of this host, e.g. "127.0.0.1:9586"') from None


def _enclave_user(text: str) -> EnclaveUser:
    if m := _USER_IDS.fullmatch(text):
        for digits, what in zip(m.groups(), ("UID", "GID"), strict=True):
            if digits is None:
                continue
            # As for every number of a profile: YAML 1.1 reads 010 as octal (8), YAML 1.2 and
            # int() as 10, and CMD would run as whichever user the reader took it for.
            if len(digits) > 1 and digits[0] == "0":
                meant = int(digits) if len(digits) <= 11 else ID_MAX + 1
                raise _Invalid(f"{what} '{digits[:20]}' has a leading zero, which is not "
                               "allowed", f"write {meant}, not {digits}" if meant <= ID_MAX
                               else f"use 0..{ID_MAX} without leading zeros")
            # (uid_t)-1 is not an id: to setresuid() it means "leave as it is". Compared as
            # text first: int() refuses over 4300 digits.
            if len(digits) > 10 or int(digits) > ID_MAX:
                shown = digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"
                raise _Invalid(f"{what} {shown} is out of range", f"use 0..{ID_MAX}")
        uid, gid = (None if g is None else int(g) for g in m.groups())
        return EnclaveUser(uid=uid, gid=gid)
    if USER_NAME_RE.fullmatch(text):
        return EnclaveUser(name=text)
    hint = "write a user name of the image's /etc/passwd (e.g. app), or numbers: 1000 or 1000:1000"
    if ":" in text:
        hint = ("a group goes with numbers only, UID:GID (e.g. 1000:1000); a named user's "
                "groups are its own, from the image's /etc/passwd and /etc/group")
    raise _Invalid(f"{text!r} is neither a user name nor UID or UID:GID", hint)


def _namespace(text: str) -> str:
    if not CLOUDWATCH_NAMESPACE_RE.fullmatch(text):
        raise _Invalid(f"{text!r} is not a CloudWatch namespace",
                       "use 1-255 of letters, digits, space and . - _ / # :")
    if text.startswith("AWS/"):
        raise _Invalid(f"{text!r}: namespaces starting with AWS/ are AWS's own",
                       "pick your own, e.g. wgvsock")
    return text


def _public_key(text: str) -> str:
    value = text.strip()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != WG_KEY_LEN:
        # Quoted only when shorter than a key: what is wrong with a key-long value may be a
        # private key pasted here, one character off.
        shown = f"'{value}'" if len(value) < 40 else f"a value of {len(value)} characters"
        raise _Invalid(f"{shown} is not a WireGuard public key (44 characters of base64)",
                       "fill it in with `wgvsock profile pin-parent FILE`, or write the output "
                       "of `wg pubkey`")
    return base64.b64encode(raw).decode()


def _pcr_value(text: str) -> str:
    value = text.strip().lower()
    value = value.removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]*", value):
        # Said with where the value comes from: the example's placeholder lands here.
        raise _Invalid("PCR value is not hexadecimal",
                       f"write the {PCR_HEX_LEN} hex digits `nitro-cli build-enclave` or "
                       "`nitro-cli describe-eif` prints for this PCR of the image (`wgvsock "
                       "attest pcrs` turns that output into the pcrs block)")
    if len(value) != PCR_HEX_LEN:
        raise _Invalid(f"PCR value has {len(value)} hex digits, not {PCR_HEX_LEN} (SHA-384)",
                       "copy the full value from `nitro-cli describe-eif`")
    return value


def allow_names(rule: Rule, endpoint: IPAddress, scope: IPNetwork) -> bool:
    """Whether allow RULE names ENDPOINT explicitly: it covers the address and is aimed inside
    SCOPE, so 169.254.169.254/32:80/tcp or 169.254.0.0/16 do, 0.0.0.0/0 does not."""
    net = rule.network
    return (net.version == endpoint.version and endpoint in net
            and net.subnet_of(scope))  # type: ignore[arg-type]


def _other_host(iface: IPInterface) -> IPInterface | None:
    """The first usable address of IFACE's subnet other than IFACE's own."""
    for host in iface.network.hosts():
        if host != iface.ip:
            return ipaddress.ip_interface(f"{host}/{iface.network.prefixlen}")
    return None


def _usable_hosts_note(iface: IPInterface) -> str:
    other = _other_host(iface)
    return f"e.g. {other}" if other else f"widen {iface.network}"


_LIMITED_BROADCAST = IPv4Address("255.255.255.255")
# Where EC2 puts the instance's own services, IMDS, the VPC resolver, the time server and the
# credential endpoints among them: a tunnel subnet over them routes them into the tunnel.
_INSTANCE_SERVICES: dict[int, IPNetwork] = {4: _LINK_LOCAL_V4,
                                            6: IPv6Network("fd00:ec2::/32")}


# Address space no one routes on the internet (RFC 6890's registries, not globally reachable):
# a tunnel subnet inside one of these takes no one else's traffic. Shared space (RFC 6598's
# 100.64.0.0/10) and 240.0.0.0/4 are in, as tunnels commonly use them.
_NOT_PUBLIC: dict[int, tuple[IPNetwork, ...]] = {
    4: tuple(IPv4Network(n) for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4")),
    6: tuple(IPv6Network(n) for n in (
        "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001:db8::/32", "fc00::/7",
        "fe80::/10")),
}


def _public(net: IPNetwork) -> bool:
    """Whether NET holds globally routable addresses (is not all inside one block of
    _NOT_PUBLIC)."""
    return not any(net.subnet_of(b) for b in _NOT_PUBLIC[net.version]  # type: ignore[arg-type]
                   if b.version == net.version)


def _not_for_a_tunnel(ip: IPAddress) -> str | None:
    """Why IP cannot be an end of the tunnel, or None when it can. The enclave's address is
    also the one source the parent accepts from it (its allowed IP and the table's), so this
    is what keeps link-local sources, the ones router advertisements and redirects need to
    be believed, out of the tunnel."""
    v4 = ip.version == 4
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ("IPv4-mapped (::ffff:0:0/96), which stands for an IPv4 address inside one host "
                "and is never sent on a link")
    if ip.is_link_local and v4:
        return ("link-local (169.254.0.0/16), where EC2's metadata service, DNS resolver and "
                "credential endpoints are")
    if ip.is_link_local:
        return ("link-local (fe80::/10): from such an address the enclave could send the "
                "parent router advertisements and redirects")
    if ip.is_multicast:
        return f"multicast ({'224.0.0.0/4' if v4 else 'ff00::/8'}), a group and not one host"
    if ip.is_loopback:
        return f"loopback ({'127.0.0.0/8' if v4 else '::1'}), which never leaves a host"
    if ip.is_unspecified:
        return "the unspecified address, which names no host"
    if ip == _LIMITED_BROADCAST:
        return "the limited broadcast address, which names every host on a link"
    return None


def _not_a_server(ip: IPAddress) -> str | None:
    """Why nothing can be asked at IP (a resolver, the parent over TCP), or None."""
    if ip.is_unspecified:
        return "the unspecified address, which names no host (to a client, its own)"
    if ip.is_multicast:
        return "a multicast address, a group and not one host"
    if ip == _LIMITED_BROADCAST:
        return "the limited broadcast address, which names every host on a link"
    return None


def _in_tunnel(ip: IPAddress, parent: Sequence[IPInterface], enclave: Sequence[IPInterface]
               ) -> tuple[IPNetwork, str] | None:
    """The tunnel subnet IP is in and which end it is ("parent", "enclave" or "" for
    neither, where no host is), or None outside the tunnel."""
    for a in parent:
        if a.version == ip.version and ip in a.network:
            if ip == a.ip:
                return a.network, "parent"
            if any(ip == e.ip for e in enclave):
                return a.network, "enclave"
            return a.network, ""
    return None


def resolver_in_tunnel(r: IPAddress, parent: Sequence[IPInterface],
                       enclave: Sequence[IPInterface]) -> str | None:
    """Why the parent's DNS forwarder must not ask R, an address in the tunnel subnet
    (parent.egress.resolver, or a nameserver line of the parent's /etc/resolv.conf), or None
    outside it. A loopback resolver (systemd-resolved's 127.0.0.53) is fine: the forwarder
    runs on the parent and asks from there; the enclave never gets these resolvers, only the
    forwarder's address."""
    if (where := _in_tunnel(r, parent, enclave)) is not None:
        net, end = where
        why = {"enclave": "the enclave's own address: the forwarder must not ask "
               "the enclave, whose answers would decide which addresses "
               "parent.egress opens to it",
               "parent": "the parent's own, where the forwarder listens: it would "
               "ask itself, and it answers only the enclave"}.get(
                   end, "no host there: the tunnel has two ends")
        return f"{r} is in the tunnel subnet {net}, {why}"
    return None


def resolver_unusable(r: IPAddress, parent: Sequence[IPInterface],
                      enclave: Sequence[IPInterface]) -> str | None:
    """Why the parent's DNS forwarder must not ask R, a nameserver line of the parent's
    /etc/resolv.conf, or None: what parent.egress.resolver may not name either. Unspecified
    (the kernel sends to loopback, whose answer dnspython drops as from another address: a
    2 s timeout per query), multicast (dnspython takes an answer from any host in the group,
    and these answers open addresses to the enclave), limited broadcast, or in the tunnel."""
    if (why := _not_a_server(r)) is not None:
        return f"{r} is {why}"
    return resolver_in_tunnel(r, parent, enclave)


def _tunnel_example(side: str, version: int) -> IPInterface:
    if version == 4:
        return DEFAULT_PARENT_V4 if side == "parent" else DEFAULT_ENCLAVE_V4
    return IPv6Interface("fd77::1/126" if side == "parent" else "fd77::2/126")


class _Builder(_Parser):
    """The profile's schema: what each key means, its default and how it relates to the rest."""

    def build(self, root: Node, path: str) -> Profile | None:
        self.lines[""] = _line(root)
        top = self.mapping(root, "", _TOP_KEYS)
        if not isinstance(root, MappingNode):
            return None

        version = VERSION
        if "version" in top:
            v = self.integer(top["version"], "version", 0, 2**31)
            if v is not None and v > VERSION:
                # Another number would not make this wgvsock read it as its writer meant.
                self.problem(_line(top["version"]), "version",
                             f"version {v} is a later wgvsock's profile format",
                             f"this wgvsock reads version {VERSION}: upgrade it to the release "
                             f"the profile was written for (for the enclave, build its image "
                             f"with that release)")
            elif v is not None and v != VERSION:
                self.problem(_line(top["version"]), "version", f"version {v} is not supported",
                             f"this wgvsock reads version {VERSION}; write version: {VERSION}")
        name = "profile"
        if "name" not in top:
            self.problem(self.at("name"), "name", "missing",
                         "add e.g. `name: payments`; it names the nftables table, "
                         "state files and systemd instance")
        else:
            text = self.text(top["name"], "name", "payments")
            if text is not None:
                if text == "forwarding":
                    # The host's record of its forwarding settings is forwarding.json, in
                    # the directory where each profile's state is NAME.json.
                    self.problem(_line(top["name"]), "name", "'forwarding' is reserved",
                                 "the parent keeps the host's forwarding settings under that "
                                 "name; choose another, e.g. payments")
                elif NAME_RE.fullmatch(text):
                    name = text
                else:
                    self.problem(_line(top["name"]), "name", f"'{text}' is not a valid name",
                                 "use 1-31 of a-z, 0-9 and '-', starting with a letter or "
                                 "digit (it names an nftables table and files)")

        interface = DEFAULT_INTERFACE
        if "interface" in top:
            interface = self.interface(top["interface"], "interface") or DEFAULT_INTERFACE

        transport = self.transport(top.get("transport"), name)
        parent_map = self.mapping(top.get("parent"), "parent", _PARENT_KEYS)
        enclave_map = self.mapping(top.get("enclave"), "enclave", _ENCLAVE_KEYS)
        parent_addrs, enclave_addrs = self.addresses(parent_map, enclave_map)
        parent = self.parent(parent_map, name, parent_addrs, enclave_addrs, transport)
        if transport.host is not None and self.ok("transport.host"):
            where = _in_tunnel(ipaddress.ip_address(transport.host), parent_addrs,
                               enclave_addrs)
            if where is not None:
                self.problem(self.at("transport.host"), "transport.host",
                             f"{transport.host} is inside the tunnel subnet {where[0]}, which "
                             "the enclave reaches only once the tunnel is up, and the enclave "
                             "dials this address to bring it up",
                             "give the parent's address on the network the enclave shares "
                             "with it, outside the tunnel")
        if parent.egress.interface == interface:
            # The firewall would refuse it only at `parent up`: masquerading the enclave's
            # traffic back into the tunnel sends it nowhere.
            self.problem(self.at("parent.egress.interface"), "parent.egress.interface",
                         f"'{interface}' is the tunnel interface (interface: {interface})",
                         "name the interface the enclave's traffic leaves the host by, e.g. "
                         "ens5, or remove the key to use the default route's")
        enclave = self.enclave(enclave_map, enclave_addrs, parent_addrs,
                               parent.egress.uses_names)
        attestation = self.attestation(top.get("attestation"), parent.enclave)
        enclave_cid = self.enclave_cid(parent_map, parent.enclave, transport.kind)

        mtu = DEFAULT_MTU
        if "mtu" in top:
            # Every transport is a stream: its range is the one to name in any hint (it said
            # 576..65535, and refused 65504 on).
            m = self.integer(top["mtu"], "mtu", 576, STREAM_MTU_MAX,
                             above=f" for the {transport.kind} stream transport: a frame holds "
                             "65535 bytes and WireGuard adds 32")
            if m is not None:
                mtu = m
        if any(a.version == 6 for a in [*parent_addrs, *enclave_addrs]) and mtu < 1280:
            self.problem(self.at("mtu"), "mtu", f"{mtu} is below 1280, the IPv6 minimum",
                         "use at least 1280, or drop the IPv6 addresses")

        if self.problems:
            return None
        return Profile(version, name, interface, mtu, transport,
                       ParentSide(parent_addrs, parent.private_key, parent.egress,
                                  parent.ingress, parent.enclave, parent.public_key,
                                  metrics=parent.metrics, enclave_cid=enclave_cid),
                       enclave, attestation, path, dict(self.lines), list(self.warnings))

    # -- transport -------------------------------------------------------------------------------

    def transport(self, node: Node | None, name: str) -> Transport:
        m = self.mapping(node, "transport", _TRANSPORT_KEYS)
        kind: Kind = "vsock"
        if "kind" in m:
            k = self.choice(m["kind"], "transport.kind", KINDS)
            if k is not None:
                kind = k  # type: ignore[assignment]
        hi = VSOCK_PORT_MAX if kind == "vsock" else TCP_PORT_MAX
        what = " for a vsock port" if kind == "vsock" else f" for a {kind} port"
        port = DEFAULT_PORT
        if "port" in m:
            port = self.integer(m["port"], "transport.port", 1, hi, what) or DEFAULT_PORT
        control = port + 1
        if "control_port" in m:
            c = self.integer(m["control_port"], "transport.control_port", 1, hi, what)
            control = c if c is not None else control
            if c is not None and c == port:
                self.problem(_line(m["control_port"]), "transport.control_port",
                             f"control_port equals port ({port})",
                             "use a different port, e.g. port + 1 (the default)")
        elif control > hi and self.ok("transport.port"):
            self.problem(self.at("transport.port"), "transport.control_port",
                         f"the default control_port (port + 1 = {control}) is out of range",
                         "set transport.control_port explicitly, or lower transport.port")
        cid = DEFAULT_PARENT_CID
        if "parent_cid" in m:
            c = self.integer(m["parent_cid"], "transport.parent_cid", 1, VSOCK_CID_MAX)
            cid = c if c is not None else cid
        path = f"/run/wgvsock/{name}"
        if "path" in m:
            p = self.text(m["path"], "transport.path", path)
            if p is not None and self.printable(m["path"], "transport.path", p):
                if not p.startswith("/"):
                    self.problem(_line(m["path"]), "transport.path",
                                 f"'{p}' is not an absolute path",
                                 f"write the full directory, e.g. /run/wgvsock/{name}")
                elif len(p.encode()) > UNIX_DIR_MAX:
                    self.problem(_line(m["path"]), "transport.path",
                                 f"path is longer than {UNIX_DIR_MAX} bytes",
                                 "Unix socket names are limited to 107 bytes; use a shorter "
                                 "directory such as /run/wgvsock/NAME")
                else:
                    path = p.rstrip("/") or "/"
        host: str | None = None
        if "host" in m:
            h = self.parsed(m["host"], "transport.host", "192.0.2.1", _ip)
            if h is not None and (why := _not_a_server(h)) is not None:
                self.problem(_line(m["host"]), "transport.host", f"{h} is {why}",
                             "give the parent's IP address as the enclave sees it, "
                             "e.g. host: 192.0.2.1")
                h = None
            host = str(h) if h is not None else None
        if kind == "tcp" and host is None and self.ok("transport.host"):
            self.problem(self.at("transport.host") if "host" in m else self.at("transport"),
                         "transport.host", "required when transport.kind is tcp",
                         "give the parent's IP address as the enclave sees it, "
                         "e.g. host: 192.0.2.1 (the enclave has no DNS before the tunnel)")
        return Transport(kind, port, control, cid, path, host)

    # -- addresses -------------------------------------------------------------------------------

    def address_list(self, m: Mapping[str, Node], key: str
                     ) -> list[tuple[str, IPInterface]] | None:
        """KEY's addresses, each with the key it was written under (for error lines)."""
        items = self.items(m.get("address"), key, "10.77.0.1/30")
        if items is None:
            return None
        if not items:
            self.problem(self.at(key), key, "no address given",
                         "give at least one, e.g. 10.77.0.1/30")
            return None
        out: list[tuple[str, IPInterface]] = []
        seen: dict[int, str] = {}
        for k, node in items:
            a = self.parsed(node, k, "10.77.0.1/30", _address)
            if a is None:
                continue
            if a.version in seen:
                self.problem(_line(node), k, f"a second IPv{a.version} address "
                             f"(the first is {seen[a.version]})",
                             "the tunnel is point to point: give one IPv4 and/or one IPv6")
                continue
            seen[a.version] = k
            limit = 31 if a.version == 4 else 127
            if a.network.prefixlen > limit:
                self.problem(_line(node), k,
                             f"prefix /{a.network.prefixlen} leaves no room for the other side",
                             f"use /{limit} or wider, e.g. /30 for IPv4 or /126 for IPv6")
                continue
            if a.network.prefixlen == 0:
                # check_host's overlap, true on every host: refused here, before `up` has
                # changed anything, and by `profile check` without --host.
                self.problem(_line(node), k, f"tunnel subnet {a.network} overlaps every "
                             f"network of this host (it is every IPv{a.version} address)",
                             "pick a subnet this host does not use, e.g. "
                             f"{_tunnel_example(key.split('.')[0], a.version)}")
                continue
            if a.version == 4 and a.network.prefixlen <= 30 and a.ip in (
                    a.network.network_address, a.network.broadcast_address):
                which = "network" if a.ip == a.network.network_address else "broadcast"
                self.problem(_line(node), k, f"{a.ip} is the {which} address of {a.network}",
                             f"use a host address, {_usable_hosts_note(a)}")
                continue
            out.append((k, a))
        return out

    def addresses(self, parent: Mapping[str, Node], enclave: Mapping[str, Node]
                  ) -> tuple[list[IPInterface], list[IPInterface]]:
        pk = self.address_list(parent, "parent.address")
        ek = self.address_list(enclave, "enclave.address")
        p, e = self.paired(pk, ek)
        if not self.ok("parent.address", "enclave.address"):
            return p, e
        # Said at the address the file gives for the subnet: the parent's, or the enclave's
        # when the parent's is left out (derived from it).
        written = {a.version: k for k, a in [*(ek or []), *(pk or [])]}
        for a in p:
            services = _INSTANCE_SERVICES[a.version]
            if a.network.overlaps(services):  # type: ignore[arg-type]
                k = written.get(a.version, "parent.address")
                side = k.split(".")[0]
                self.problem(self.at(k), k,
                             f"tunnel subnet {a.network} overlaps {services}, where EC2 "
                             "answers the instance (IMDS, the VPC's DNS resolver, the time "
                             "server, the ECS and EKS credential endpoints): the tunnel's route "
                             "would take the host's and the enclave's traffic for them",
                             f"use a subnet outside {services}, e.g. "
                             f"{_tunnel_example(side, a.version).network}")
            elif _public(a.network):
                # A warning, not a refusal: the range may be the operator's own, unused
                # anywhere else.
                k = written.get(a.version, "parent.address")
                private = "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16" if a.version == 4 \
                    else "fd00::/8"
                self.warn(self.at(k), k,
                          f"tunnel subnet {a.network} is public (globally routable) address "
                          f"space: the tunnel's route on the parent takes all traffic for "
                          f"{a.network}, so the parent and the enclave reach the tunnel "
                          "instead of the internet's hosts at those addresses",
                          f"use a private subnet ({private}), e.g. "
                          f"{_tunnel_example(k.split('.')[0], a.version).network}: the parent "
                          "masquerades the tunnel, so it never needs to be routable; keep "
                          f"{a.network} only if it is yours and used nowhere else")
        for k, a in ek or []:
            pa = next((x for x in p if x.version == a.version), None)
            if (a.version == 6 and pa is not None and a.network.prefixlen <= 126
                    and a.ip == a.network.network_address):
                # Linux joins it on every interface of a forwarding host (not for /127,
                # RFC 6164), and `parent up` turns forwarding on.
                self.problem(self.at(k), k,
                             f"{a.ip} is the subnet-router anycast address of {a.network}, "
                             "which the parent, forwarding, takes for its own: packets for "
                             "the enclave would be delivered to the parent, never into the "
                             "tunnel",
                             f"pick another address in {a.network}, {_usable_hosts_note(pa)}")
        return p, e

    def paired(self, pk: list[tuple[str, IPInterface]] | None,
               ek: list[tuple[str, IPInterface]] | None
               ) -> tuple[list[IPInterface], list[IPInterface]]:
        """Both sides' addresses, one side's derived from the other's when left out."""
        p = None if pk is None else [a for _, a in pk]
        e = None if ek is None else [a for _, a in ek]
        self.tunnel_ends(pk or [], ek or [])
        if not self.ok("parent.address", "enclave.address"):
            return p or [], e or []
        # One side may be left out: it then takes the next address of the other side's subnet,
        # which is what makes "parent.address: 10.9.0.1/30" alone a complete profile.
        if p is None and e is None:
            return [DEFAULT_PARENT_V4], [DEFAULT_ENCLAVE_V4]
        if p is None:
            assert ek is not None
            return self.derived(ek, "parent"), [a for _, a in ek]
        if e is None:
            assert pk is not None
            return p, self.derived(pk, "enclave")
        assert pk is not None and ek is not None
        for v in (4, 6):
            pv = [a for a in p if a.version == v]
            ev = [(k, a) for k, a in ek if a.version == v]
            if pv and not ev:
                self.problem(self.at("enclave.address"), "enclave.address",
                             f"parent.address has an IPv{v} address but the enclave has none",
                             f"add {_other_host(pv[0])} to enclave.address")
            if ev and not pv:
                self.problem(self.at("enclave.address"), "enclave.address",
                             f"the enclave has an IPv{v} address but parent.address has none",
                             f"add {_other_host(ev[0][1])} to parent.address")
            if not (pv and ev):
                continue
            pa, (key, ea) = pv[0], ev[0]
            line = self.at(key)
            if ea.network.prefixlen != pa.network.prefixlen:
                self.problem(line, key, f"prefix /{ea.network.prefixlen} differs from "
                             f"parent.address's /{pa.network.prefixlen}",
                             f"both ends share one subnet: use {ea.ip}/{pa.network.prefixlen}")
            elif ea.ip not in pa.network:
                self.problem(line, key,
                             f"{ea.ip} is outside the tunnel subnet {pa.network} of "
                             "parent.address",
                             f"pick an address in {pa.network}, {_usable_hosts_note(pa)}")
            elif ea.ip == pa.ip:
                self.problem(line, key, f"{ea.ip} is the parent's own address",
                             f"pick another address in {pa.network}, {_usable_hosts_note(pa)}")
        return p, e

    def tunnel_ends(self, pk: list[tuple[str, IPInterface]],
                    ek: list[tuple[str, IPInterface]]) -> None:
        """Refuses the written addresses no tunnel end can have (see _not_for_a_tunnel)."""
        usable = {a.version: a for _, a in pk if _not_for_a_tunnel(a.ip) is None}
        for side, items in (("parent", pk), ("enclave", ek)):
            for k, a in items:
                why = _not_for_a_tunnel(a.ip)
                if why is None:
                    continue
                pa = usable.get(a.version)
                if side == "enclave" and pa is not None:
                    hint = (f"use an address in parent.address's subnet {pa.network}, "
                            f"{_usable_hosts_note(pa)}")
                else:
                    kind = "a private" if a.version == 4 else "a unique local (fd00::/8)"
                    hint = f"use {kind} address, e.g. {_tunnel_example(side, a.version)}"
                    if side == "parent" and any(x.version == a.version for _, x in ek):
                        hint += " (and move enclave.address with it)"
                self.problem(self.at(k), k, f"{a} is {why}", hint)

    def derived(self, given: list[tuple[str, IPInterface]], side: str) -> list[IPInterface]:
        """SIDE's addresses when the profile leaves them out: the first other host of each of
        the other side's subnets, which need not be usable (fec0::1/9 gives fe80::1)."""
        out = []
        for k, a in given:
            x = _other_host(a)
            if x is None:
                continue
            why = _not_for_a_tunnel(x.ip)
            if why is not None:
                self.problem(self.at(k), k,
                             f"{side}.address is left out, so the {side} takes {x}, the first "
                             f"other host of {a.network}, and {x.ip} is {why}",
                             f"give {side}.address, or use a subnet such as "
                             f"{_tunnel_example('parent', a.version).network}")
                continue
            out.append(x)
        return out

    # -- parent ----------------------------------------------------------------------------------

    def parent(self, m: Mapping[str, Node], name: str, parent_addrs: list[IPInterface],
               enclave_addrs: list[IPInterface], transport: Transport) -> _ParentParts:
        private_key = f"/etc/wgvsock/{name}.key"
        if "private_key" in m:
            k = self.parsed(m["private_key"], "parent.private_key", private_key, _private_key)
            private_key = k if k is not None else private_key
        public_key = None
        if "public_key" in m:
            public_key = self.parsed(m["public_key"], "parent.public_key",
                                     "the output of `wg pubkey`", _public_key)
        egress = self.egress(m.get("egress"), parent_addrs, enclave_addrs)
        ingress = self.ingress(m.get("ingress"), transport)
        launch = self.launch(m.get("enclave"))
        metrics = self.metrics(m.get("metrics"))
        where = (_in_tunnel(metrics.listen[0], parent_addrs, enclave_addrs)
                 if metrics.listen is not None else None)
        if where is not None and where[1] != "parent":
            # `up` would make the tunnel, the table and forwarding, then fail binding it.
            key = "parent.metrics.listen"
            self.problem(self.at(key), key, f"{metrics.listen[0]} is in the tunnel subnet "  # type: ignore[index]
                         f"{where[0]} but not the parent's address there, so the parent "
                         "cannot listen on it",
                         "listen on an address of the parent, e.g. 127.0.0.1")
        if (metrics.listen is not None and transport.kind == "tcp"
                and metrics.listen[1] in (transport.port, transport.control_port)):
            # The tunnel's stream listens on every address: `up` would find the port "taken
            # by another process" and try it again for ever.
            key = "parent.metrics.listen"
            which = "port" if metrics.listen[1] == transport.port else "control_port"
            self.problem(self.at(key), key, f"port {metrics.listen[1]} is transport.{which}, "
                         "which the tcp stand-in listens on itself",
                         "choose another port for the metrics")
        if metrics.listen is not None and not metrics.listen[0].is_loopback:
            # Ingress DNATs its port on every address of the host but loopback, the host's
            # own connections included: the scrapes would reach the enclave, which could
            # answer them with numbers of its choosing.
            for i, ing in enumerate(ingress):
                if ing.protocol == "tcp" and ing.listen == metrics.listen[1]:
                    key = "parent.metrics.listen"
                    self.problem(self.at(key), key,
                                 f"port {ing.listen} is parent.ingress[{i}]'s listen port, "
                                 "which is forwarded to the enclave on every address of the "
                                 "host but loopback: scrapes would reach the enclave",
                                 "choose another port, or listen on 127.0.0.1")
                    break
        return _ParentParts(private_key, public_key, egress, ingress, launch, metrics)

    def enclave_cid(self, m: Mapping[str, Node], launch: EnclaveLaunch | None,
                    kind: str) -> int | None:
        if _is_null(m.get("enclave_cid")):
            return None
        key = "parent.enclave_cid"
        cid = self.integer(m["enclave_cid"], key, ENCLAVE_CID_MIN, VSOCK_CID_MAX,
                           " (enclave CIDs start at 4)")
        if launch is not None:
            self.problem(_line(m["enclave_cid"]), key,
                         "set together with parent.enclave, which starts the enclave itself",
                         "drop parent.enclave_cid; give parent.enclave.cid to fix the CID")
            return None
        if cid is not None and kind != "vsock":
            # A warning, not a refusal: the same profile may move between the stand-in and
            # vsock; but whoever reads it must not think the control port is fenced by it.
            fence = ("the socket directory's permissions (transport.path)" if kind == "unix"
                     else "who can reach transport.port and control_port on the network")
            self.warn(_line(m["enclave_cid"]), key,
                      f"ignored with transport.kind {kind}: a CID exists on vsock only, so "
                      f"the control and WireGuard ports take any peer, and {fence} decide "
                      "who connects",
                      "remove parent.enclave_cid, or use transport.kind vsock for it to "
                      "apply")
        return cid

    def rules(self, m: Mapping[str, Node], key: str, *,
              name_ports: bool = True) -> tuple[list[Rule], list[NameRule]] | None:
        """KEY's entries, CIDRs and host names apart. Without NAME_PORTS a name may have no
        port or protocol: a denied name's queries are refused whatever the port, so one
        written there would promise a narrower deny than the one in force."""
        items = self.items(m.get(key.rsplit(".", 1)[-1]), key, "10.0.0.0/8:443/tcp")
        if items is None:
            return None
        out: list[Rule] = []
        names: list[NameRule] = []
        for k, node in items:
            r = self.parsed(node, k, '"[2001:db8::/32]:443/tcp" or api.example.com:443/tcp',
                            parse_egress_entry)
            if isinstance(r, NameRule):
                if not name_ports and (r.ports is not None or r.protocol is not None):
                    self.problem(_line(node), k,
                                 f"'{r}': a port or protocol on a denied host "
                                 "name is not honoured (its DNS queries are refused, whatever "
                                 "the port)",
                                 f"write just the name, {r.pattern}, or deny its addresses "
                                 "as a CIDR with the port")
                    continue
                names.append(r)
                self.entry_keys[id(r)] = k
            elif r is not None:
                out.append(r)
                self.entry_keys[id(r)] = k
        return out, names

    def dead_allows(self, allow: list[Rule], deny: list[Rule], names_allowed: list[NameRule],
                    names_denied: list[NameRule]) -> None:
        """Warns of each allow entry a deny entry covers whole (network, ports and protocol,
        or name): deny is checked first, so it can never let anything through. Not refused:
        "deny wins" is the rule, and a profile that says it twice (an IMDS allow beside an
        explicit IMDS deny, `deny: [0.0.0.0/0]` under the default allow) does what it says. A
        deny that covers part of one is a carve-out, which is what deny is for."""
        by_net: dict[IPNetwork, list[Rule]] = {}
        for d in deny:
            by_net.setdefault(d.network, []).append(d)
        # Only the prefix lengths deny has: a long allow list against a long deny list stays
        # linear (every supernet of every entry would be 33 or 129 lookups each).
        lengths = sorted({(d.network.version, d.network.prefixlen) for d in deny})
        for a in allow:
            net = a.network
            covering = (d for v, n in lengths if v == net.version and n <= net.prefixlen
                        for d in by_net.get(net.supernet(new_prefix=n), ()))
            for d in covering:
                if ((d.protocol is None or d.protocol == a.protocol)
                        and (d.ports is None or (a.ports is not None and d.ports[0]
                                                 <= a.ports[0] and a.ports[1] <= d.ports[1]))):
                    self.never_allowed(a, d)
                    break
        # "*.example.com" is every name below example.com, not example.com itself: it covers
        # the names and wildcards below, and itself.
        denied = {(dn.pattern.labels, dn.pattern.wildcard): dn for dn in reversed(names_denied)}
        for an in names_allowed:
            labels = an.pattern.labels
            found = denied.get((labels, an.pattern.wildcard))
            for n in range(1, len(labels)):
                found = found or denied.get((labels[n:], True))
            if found is not None:
                self.never_allowed(an, found)

    def never_allowed(self, a: Rule | NameRule, d: Rule | NameRule) -> None:
        dk = self.entry_keys[id(d)]
        if id(a) not in self.entry_keys:  # allow left to its default
            self.warn(self.at(dk), dk, f"'{d}' denies all that the default allow entry {a} "
                      "lets through: no egress to that family at all",
                      "if that is meant, say it with allow (allow: [] allows nothing)")
            return
        k = self.entry_keys[id(a)]
        self.warn(self.at(k), k, f"'{a}' is never allowed: {dk} ('{d}') denies all of it, "
                  "and deny is checked first",
                  "drop it from parent.egress.allow, or narrow the deny entry")

    def egress(self, node: Node | None, parent_addrs: list[IPInterface],
               enclave_addrs: list[IPInterface]) -> Egress:
        m = self.mapping(node, "parent.egress", _EGRESS_KEYS)
        nat = True
        if "nat" in m:
            b = self.boolean(m["nat"], "parent.egress.nat")
            nat = b if b is not None else nat
        interface = None
        if "interface" in m:
            interface = self.interface(m["interface"], "parent.egress.interface")
        versions = {a.version for a in enclave_addrs} or {4}
        names_allowed: list[NameRule] = []
        if "allow" not in m and "parent.egress.allow" in self.lines:
            # `allow:` with every entry commented out: null would mean the default, which
            # allows everything — the opposite of what emptying the list looks like.
            self.problem(self.lines["parent.egress.allow"], "parent.egress.allow",
                         "is empty (null), which would mean the default: everything",
                         "write [] to allow nothing, or remove the key for the default")
        parsed = self.rules(m, "parent.egress.allow")
        if parsed is None:
            allow = [Rule(ipaddress.ip_network("0.0.0.0/0" if v == 4 else "::/0"))
                     for v in sorted(versions)]
        else:
            allow, names_allowed = parsed
        deny, names_denied = (self.rules(m, "parent.egress.deny", name_ports=False)
                              or ([], []))
        self.dead_allows(allow, deny, names_allowed, names_denied)
        if names_denied and not names_allowed and not allows_every_address(allow):
            self.problem(self.at("parent.egress.deny"), "parent.egress.deny",
                         "host names here with none in parent.egress.allow and no allow "
                         "entry for every address: the DNS forwarder would refuse every query",
                         "add the names the enclave may resolve to parent.egress.allow, or "
                         "allow 0.0.0.0/0 to resolve every name not denied")
        # Added to whatever deny the profile writes (`deny: []` included): these endpoints hand
        # out the instance role's credentials, and through `ssm:` key sources the parent's own
        # WireGuard key. Only an allow rule that names one lifts it.
        lifted: list[Rule] = []
        for endpoint, scope in CREDENTIAL_ENDPOINTS:
            rule = Rule(ipaddress.ip_network(endpoint))
            if rule in deny:
                continue
            naming = [r for r in allow if allow_names(r, endpoint, scope)]
            if not naming:
                deny.append(rule)
            for r in naming:  # the endpoint, only with the naming entry's ports and protocol
                exception = Rule(rule.network, r.ports, r.protocol)
                if exception not in lifted:
                    lifted.append(exception)
        resolver: list[IPAddress] = []
        for k, rnode in self.items(m.get("resolver"), "parent.egress.resolver",
                                   "10.0.0.2") or []:
            r = self.parsed(rnode, k, "10.0.0.2", _ip)
            if r is None:
                continue
            fix = ("name a resolver outside the tunnel, e.g. 169.254.169.253 (the VPC's), or "
                   "leave resolver out to use the nameserver lines of /etc/resolv.conf")
            if (why := _not_a_server(r)) is not None:
                self.problem(_line(rnode), k, f"{r} is {why}", fix)
                continue
            if (why := resolver_in_tunnel(r, parent_addrs, enclave_addrs)) is not None:
                self.problem(_line(rnode), k, why, fix)
                continue
            resolver.append(r)
        grace = DEFAULT_DNS_GRACE
        if "dns_grace" in m:
            grace = self.integer(m["dns_grace"], "parent.egress.dns_grace", DEFAULT_DNS_GRACE,
                                 7 * 86400) or grace
        if "test_dns_grace" in m:
            # FOR TESTS ONLY: a grace below the minimum, so a test can watch an address expire.
            g = self.integer(m["test_dns_grace"], "parent.egress.test_dns_grace", 0, 7 * 86400)
            grace = g if g is not None else grace
        max_connections = DEFAULT_MAX_CONNECTIONS
        if "max_connections" in m:
            n = self.integer(m["max_connections"], "parent.egress.max_connections", 1,
                             MAX_CONNECTIONS_MAX)
            max_connections = n if n is not None else max_connections
        return Egress(nat, interface, allow, deny, names_allowed, names_denied, resolver, grace,
                      lifted, max_connections)

    def ingress(self, node: Node | None, transport: Transport) -> list[Ingress]:
        items = self.items(node, "parent.ingress", "{listen: 8443, to: 443, protocol: tcp}")
        out: list[Ingress] = []
        seen: dict[tuple[int, str], str] = {}
        for k, item in items or []:
            if isinstance(item, ScalarNode):
                self.problem(_line(item), k, f"expected a mapping, got {_describe(item)}",
                             "write it as {listen: 8443, to: 443, protocol: tcp}")
                continue
            m = self.mapping(item, k, _INGRESS_KEYS)
            if not isinstance(item, MappingNode):
                continue
            if "listen" not in m:
                self.problem(_line(item), f"{k}.listen", "missing",
                             "give the parent port to forward, e.g. listen: 8443")
                continue
            listen = self.integer(m["listen"], f"{k}.listen", 1, TCP_PORT_MAX)
            to = listen
            if "to" in m:
                to = self.integer(m["to"], f"{k}.to", 1, TCP_PORT_MAX)
            protocol: str | None = "tcp"
            if "protocol" in m:
                protocol = self.choice(m["protocol"], f"{k}.protocol", PROTOCOLS)
            if listen is None or to is None or protocol is None:
                continue
            if (listen, protocol) in seen:
                self.problem(_line(m["listen"]), f"{k}.listen",
                             f"listen port {listen}/{protocol} is already used by "
                             f"{seen[listen, protocol]}", "use each listen port once")
                continue
            if (transport.kind == "tcp" and protocol == "tcp"
                    and listen in (transport.port, transport.control_port)):
                self.problem(_line(m["listen"]), f"{k}.listen",
                             f"listen port {listen}/tcp is the transport's own port",
                             "choose another listen port")
                continue
            seen[listen, protocol] = k
            out.append(Ingress(listen, to, protocol))  # type: ignore[arg-type]
        return out

    def launch(self, node: Node | None) -> EnclaveLaunch | None:
        if _is_null(node):
            return None
        key = "parent.enclave"
        m = self.mapping(node, key, _LAUNCH_KEYS)
        if not isinstance(node, MappingNode):
            return None
        eif = ""
        if "eif" not in m:
            self.problem(self.at(key), f"{key}.eif", "missing",
                         "give the enclave image, e.g. eif: /opt/wgvsock/app.eif")
        else:
            e = self.text(m["eif"], f"{key}.eif", "/opt/wgvsock/app.eif")
            if e is not None and self.printable(m["eif"], f"{key}.eif", e):
                if not e.endswith(".eif"):
                    self.problem(_line(m["eif"]), f"{key}.eif",
                                 f"'{e}' does not end in .eif",
                                 "name the file nitro-cli build-enclave wrote, e.g. app.eif")
                elif not e.startswith("/"):
                    self.problem(_line(m["eif"]), f"{key}.eif", f"'{e}' is not an absolute path",
                                 "systemd starts the parent in /, so write the full path")
                else:
                    eif = e
        cpus = DEFAULT_CPU_COUNT
        if "cpu_count" in m:
            cpus = self.integer(m["cpu_count"], f"{key}.cpu_count", 1, 1024) or cpus
        memory = DEFAULT_MEMORY_MIB
        if "memory_mib" in m:
            memory = self.integer(m["memory_mib"], f"{key}.memory_mib", 64, 2**31) or memory
        cid = None
        if "cid" in m:
            cid = self.integer(m["cid"], f"{key}.cid", ENCLAVE_CID_MIN, VSOCK_CID_MAX,
                               " (enclave CIDs start at 4)")
        debug = False
        if "debug" in m:
            debug = bool(self.boolean(m["debug"], f"{key}.debug"))
        return EnclaveLaunch(eif, cpus, memory, cid, debug)

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self, node: Node | None) -> Metrics:
        key = "parent.metrics"
        m = self.mapping(node, key, _METRICS_KEYS)
        listen = None
        if "listen" in m:
            listen = self.parsed(m["listen"], f"{key}.listen", '"127.0.0.1:9586"', _listen)
        cloudwatch = None
        c = self.mapping(m.get("cloudwatch"), f"{key}.cloudwatch", _CLOUDWATCH_KEYS)
        if isinstance(m.get("cloudwatch"), MappingNode):
            namespace = None
            if "namespace" not in c:
                self.problem(self.at(f"{key}.cloudwatch"), f"{key}.cloudwatch.namespace",
                             "missing", "name the CloudWatch namespace, e.g. namespace: wgvsock")
            else:
                namespace = self.parsed(c["namespace"], f"{key}.cloudwatch.namespace",
                                        "wgvsock", _namespace)
            interval = DEFAULT_METRICS_INTERVAL
            if "interval" in c:
                interval = self.integer(c["interval"], f"{key}.cloudwatch.interval",
                                        METRICS_INTERVAL_MIN, 86400, " (seconds)") or interval
            if namespace is not None:
                cloudwatch = CloudWatch(namespace, interval)
        return Metrics(listen, cloudwatch)

    # -- enclave ---------------------------------------------------------------------------------

    def enclave(self, m: Mapping[str, Node], addrs: list[IPInterface],
                parent_addrs: list[IPInterface], names: bool) -> EnclaveSide:
        versions = {a.version for a in addrs}
        dns: list[IPAddress] = []
        dns_keys: list[str] = []
        # `parent`: the parent's DNS forwarder, on its tunnel addresses (see egress/).
        forwarder = [a.ip for a in parent_addrs if a.version in versions]
        items = self.items(m.get("dns"), "enclave.dns", "169.254.169.253")
        if items is None and names:
            dns = forwarder
            dns_keys = ["enclave.dns"] * len(forwarder)
        elif items is None:
            dns = [AWS_DNS_V4 if 4 in versions or not versions else AWS_DNS_V6]
            dns_keys = ["enclave.dns"]
        else:
            for k, node in items:
                if isinstance(node, ScalarNode) and node.value == "parent":
                    if not names:
                        self.problem(_line(node), k, "the parent's DNS forwarder answers only "
                                     "for host names in parent.egress.allow, and it has none",
                                     "add host names to parent.egress.allow, or give an IP "
                                     "resolver such as 169.254.169.253")
                    dns += forwarder
                    dns_keys += [k] * len(forwarder)
                    continue
                d = self.parsed(node, k, "169.254.169.253 or parent", _ip)
                if d is None:
                    continue
                why = _not_a_server(d)
                if why is None and d.version == 6 and d.is_link_local:
                    why = ("link-local (fe80::/10), which means nothing without the link, and "
                           "neither the profile nor the tunnel can name one")
                if why is not None:
                    self.problem(_line(node), k, f"{d} is {why}",
                                 "give a resolver the enclave can reach, such as "
                                 "169.254.169.253, or `parent` for the parent's DNS forwarder")
                    continue
                where = _in_tunnel(d, parent_addrs, addrs)
                if where is not None and not where[1]:
                    # Either end may answer (the parent's forwarder, a resolver the enclave
                    # runs itself); elsewhere in the subnet nothing does.
                    self.problem(_line(node), k, f"{d} is in the tunnel subnet {where[0]}, "
                                 "but at neither end of it: no host there answers",
                                 "write `parent` for the parent's DNS forwarder, or give a "
                                 "resolver such as 169.254.169.253")
                    continue
                dns.append(d)
                dns_keys.append(k)
            if names and not any(d in forwarder for d in dns) and self.ok("enclave.dns"):
                self.problem(self.at("enclave.dns"), "enclave.dns",
                             "parent.egress names host names, which only the parent's DNS "
                             "forwarder can let through", "write `dns: parent` (the default "
                             "when host names are used)")
        routes: list[IPNetwork] = []
        items = self.items(m.get("routes"), "enclave.routes", "0.0.0.0/0")
        if items is None:
            routes = [ipaddress.ip_network("0.0.0.0/0" if v == 4 else "::/0")
                      for v in sorted(versions or {4})]
        else:
            for k, node in items:
                r = self.parsed(node, k, "0.0.0.0/0", _parse_network)
                if r is None:
                    continue
                if versions and r.version not in versions:
                    self.problem(_line(node), k, f"an IPv{r.version} route, but the enclave "
                                 f"has no IPv{r.version} address",
                                 f"add an IPv{r.version} address to both sides, or drop it")
                    continue
                routes.append(r)
        if self.ok("enclave.routes"):
            # resolv.conf is useless if the enclave has no route to the resolver.
            reachable = [*routes, *(a.network for a in addrs)]
            for k, d in zip(dns_keys, dns, strict=True):
                if not any(d.version == n.version and d in n for n in reachable):
                    self.problem(self.at(k), k,
                                 f"{d} is not reachable: no enclave route covers it",
                                 "add a route for it to enclave.routes")
        user = None
        if not _is_null(m.get("user")):
            node = m["user"]
            # The raw text (self.text): `user: 1000:1000` unquoted is base 60 to YAML 1.1.
            user = self.parsed(node, "enclave.user", "app", _enclave_user)
            if user is not None and (user.uid == 0 or user.name == "root"):
                self.warn(_line(node), "enclave.user",
                          f"'{user}' is root: CMD runs as root, as without the key, keeping "
                          "every capability and the means to read the tunnel's private key "
                          "(through wg0's UAPI socket) and to change wg0, the routes and DNS",
                          "name a user without privileges, or remove the key")
            elif user is not None and user.gid == 0:
                # Taken, as root is: the uid alone keeps the tunnel's key out of reach. A
                # name's groups are the image's, which `enclave up` warns of.
                self.warn(_line(node), "enclave.user",
                          f"'{user}' puts CMD in root's group (GID 0): it can read, and write, "
                          "whatever the image leaves to group root (root:root files of mode "
                          "0640 or 0660, directories of mode 0770)",
                          f"give it a group of its own, e.g. {user.uid}:{user.uid}")
        return EnclaveSide(addrs, dns, routes, user)

    # -- attestation -----------------------------------------------------------------------------

    def attestation(self, node: Node | None, launch: EnclaveLaunch | None) -> Attestation:
        m = self.mapping(node, "attestation", _ATTEST_KEYS)
        require = False
        if "require" in m:
            require = bool(self.boolean(m["require"], "attestation.require"))
        max_age = DEFAULT_MAX_AGE
        if "max_age" in m:
            max_age = self.integer(m["max_age"], "attestation.max_age", 1, 2**31) or max_age
        allow_debug = False
        if "allow_debug" in m:
            allow_debug = bool(self.boolean(m["allow_debug"], "attestation.allow_debug"))
        test_root_ca = None
        if "test_root_ca" in m:
            node, key = m["test_root_ca"], "attestation.test_root_ca"
            path = self.text(node, key, "/srv/tests/test-root.pem")
            if path is None or not self.printable(node, key, path):
                pass
            elif not path.startswith("/"):
                self.problem(_line(node), key, f"'{path}' is not an absolute path",
                             "give the full path of the test CA's root PEM (tests only)")
            else:
                test_root_ca = path
        pcrs: dict[int, str] = {}
        pnode = m.get("pcrs")
        if pnode is not None and not isinstance(pnode, MappingNode):
            self.problem(_line(pnode), "attestation.pcrs",
                         f"expected a mapping, got {_describe(pnode)}",
                         "write index: hex lines, e.g. `0: 3f5a...` under pcrs:")
        elif pnode is not None:
            assert isinstance(pnode, MappingNode)
            for knode, vnode in pnode.value:
                raw = knode.value if isinstance(knode, ScalarNode) else ""
                key = f"attestation.pcrs.{raw}" if raw else "attestation.pcrs"
                index = raw.removeprefix("PCR").removeprefix("pcr")
                if not _DIGITS.fullmatch(index) or not 0 <= int(index) <= PCR_MAX_INDEX:
                    self.problem(_line(knode), key, f"'{raw}' is not a PCR index",
                                 f"use 0..{PCR_MAX_INDEX} (nitro-cli prints PCR0, PCR1, "
                                 "PCR2, PCR8)")
                    continue
                i = int(index)
                if i in pcrs:
                    self.problem(_line(knode), key, f"PCR{i} given twice",
                                 "keep only one value")
                    continue
                self.lines[key] = _line(knode)
                value = self.parsed(vnode, key, "96 hex digits", _pcr_value)
                if value is not None and i in _DEBUG_PCRS and not value.strip("0"):
                    self.problem(_line(vnode), key, f"PCR{i} all zeros is what a debug-mode "
                                 "enclave reports, never an image's measurement: pinned, it "
                                 "lets no enclave be attested",
                                 "pin the value `nitro-cli describe-eif` prints, or leave it out "
                                 "(attestation.allow_debug admits debug-mode enclaves)")
                    continue
                if value is not None:
                    pcrs[i] = value
            pcrs = dict(sorted(pcrs.items()))
        if require and 0 not in pcrs and self.ok("attestation.pcrs"):
            # Without PCR0 any genuine enclave, running any image in any account, would count
            # as attested.
            self.problem(self.at("attestation.pcrs"), "attestation.pcrs",
                         "attestation.require is true but PCR0 (the image) is not pinned",
                         "add `0: HEX` under pcrs (`wgvsock attest pcrs` prints it from "
                         "nitro-cli's output)")
        if launch is not None and launch.debug and not allow_debug:
            self.problem(self.at("parent.enclave.debug"), "parent.enclave.debug",
                         "a debug-mode enclave reports all-zero PCRs and is refused",
                         "set attestation.allow_debug: true while debugging, or debug: false")
        return Attestation(require, pcrs, max_age, allow_debug, test_root_ca)


@dataclass(frozen=True)
class _ParentParts:
    private_key: str
    public_key: str | None
    egress: Egress
    ingress: list[Ingress]
    enclave: EnclaveLaunch | None
    metrics: Metrics = field(default_factory=Metrics)


def _yaml_problem(file: str, e: yaml.YAMLError) -> Problem:
    problem_mark = getattr(e, "problem_mark", None)
    context_mark = getattr(e, "context_mark", None)
    mark = problem_mark or context_mark
    line = mark.line + 1 if mark is not None else 0
    reason = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    if context and problem_mark is not None and context_mark is not None:
        reason = f"{reason} ({context} on line {context_mark.line + 1})"
    hint = "fix the YAML syntax"
    if "'\\t'" in reason:
        hint = "indent with spaces, not tabs"
    elif any(s in reason for s in ("':'", "'['", "<scalar>", "flow node")):
        hint = ("quote values that start with '[' or ':' or contain ': ', "
                'e.g. "::/0" or "[2001:db8::/32]:443/tcp"')
    return Problem(file, line, "", f"not valid YAML: {reason}", hint)


# PyYAML's scanner spends time on every open '[' or '{' for each token, so a line of them costs
# the square of its length (a 1 MiB file of "[[[..]]]" takes minutes). A profile needs 4 levels
# at most, written wholly in flow style or as JSON: {parent: {metrics: {cloudwatch: {...}}}},
# {parent: {ingress: [{...}]}}; twice that leaves room. At 32, 64 KiB of "[[[a]]]," inside 28
# levels took over 2 s to parse; at 8 the worst found takes 0.5 s, as a flat list of 64 KiB
# does (MAX_PROFILE_BYTES' bound).
MAX_FLOW_DEPTH = 8
PROFILE_FLOW_DEPTH = 4


class _TooDeep(yaml.scanner.ScannerError):
    pass


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # An alias is the anchored node itself, marks and all: a problem with the value the
        # alias stands for would point at the anchor's line. A shallow copy with the alias's
        # marks points at the line that used it (and costs the same for an alias bomb).
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            node = copy.copy(super().compose_node(parent, index))
            node.start_mark, node.end_mark = event.start_mark, event.end_mark
            return node
        return super().compose_node(parent, index)

    def compose_scalar_node(self, anchor: str | None) -> ScalarNode:
        # Whether the tag was written (`!!int abc`) or guessed from the value (2024-02-30 is a
        # date to YAML 1.1): only a written one must fit a value read as text.
        tag = self.peek_event().tag
        node = super().compose_scalar_node(anchor)
        node.explicit_tag = tag not in (None, "!")  # type: ignore[attr-defined]
        return node

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_FLOW_DEPTH:
            raise _TooDeep(None, None, None, self.get_mark())
        super().fetch_flow_collection_start(TokenClass)


# A wg-quick or wireguard-go configuration: INI sections, which YAML reads as a flow list and
# then fails on, hinting at quoting.
_WG_CONF = re.compile(r"(?:[ \t]*(?:#.*)?\n)*[ \t]*\[(?:Interface|Peer)\][ \t]*(?:#.*)?$",
                      re.IGNORECASE | re.MULTILINE)


def parse_profile(text: str, path: str = "<string>") -> Profile:
    """Parse and validate a profile, filling in every default. Raises ProfileError."""
    if m := _WG_CONF.match(text):
        raise ProfileError([Problem(
            path, text.count("\n", 0, m.end()) + 1, "",
            "this is a WireGuard configuration (wg-quick's [Interface] and [Peer]), not a "
            "wgvsock profile",
            "write a profile in YAML, starting from parent/profile.example.yaml: `parent up` "
            "and `enclave up` make the interface, the keys and the peer from it")])
    try:
        root = yaml.compose(text, Loader=_Loader)
    except _TooDeep as e:
        # Valid YAML, so neither "not valid YAML" nor "fix the YAML syntax".
        raise ProfileError([Problem(
            path, e.problem_mark.line + 1 if e.problem_mark else 0, "",
            f"[...] or {{...}} nested more than {MAX_FLOW_DEPTH} deep, where a profile "
            f"goes {PROFILE_FLOW_DEPTH} deep at most",
            "write the settings as indented `key: value` lines; is this the right file?")]
        ) from None
    except yaml.YAMLError as e:
        raise ProfileError([_yaml_problem(path, e)]) from None
    except RecursionError:
        # PyYAML's composer recurses once per nesting level: "[[[[..." would crash it.
        raise ProfileError([Problem(path, 1, "", "nested too deeply for a profile",
                                    "a profile is a few levels of keys; is this the right file?")]
                           ) from None
    if root is None:
        raise ProfileError([Problem(path, 1, "", "the profile is empty",
                                    "start from parent/profile.example.yaml")])
    builder = _Builder(path)
    profile = builder.build(root, path)
    if profile is None:
        assert builder.problems
        raise ProfileError(sorted(builder.problems, key=lambda p: p.line))
    return profile


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and parse the profile at PATH. Every failure, I/O included, is a ProfileError."""
    return load_profile_digest(path)[0]


def load_profile_digest(path: str | os.PathLike[str]) -> tuple[Profile, str]:
    """load_profile, and the SHA-256 of the bytes it parsed (so `parent reload` can tell
    which version of a file the parent applied)."""
    data, text = _read_profile(path)
    return parse_profile(text, str(path)), hashlib.sha256(data).hexdigest()


def name_in(path: str | os.PathLike[str]) -> str | None:
    """The `name:` of the profile at PATH when the file is one load_profile refuses but that
    still says a valid name (a typo elsewhere): what `parent down` finds a running parent by.
    None when it says none."""
    try:
        root = yaml.compose(_read_profile(path)[1], Loader=_Loader)
    except (ProfileError, yaml.YAMLError, RecursionError):
        return None
    if not isinstance(root, MappingNode):
        return None
    for key, value in root.value:
        if key.value == "name" and isinstance(value, ScalarNode):
            text = value.value
            return text if NAME_RE.fullmatch(text) and text != "forwarding" else None
    return None


def _read_profile(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes of the profile at PATH and their text. Every failure is a ProfileError."""
    name = str(path)
    try:
        data = read_regular(path, MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError([Problem(name, 0, "", "no such file",
                                    "check the path (see parent/profile.example.yaml)")]) from None
    except PermissionError:
        raise ProfileError([Problem(name, 0, "", "permission denied",
                                    "run as a user that can read it, or fix its mode")]) from None
    except NotRegularFile as e:
        raise ProfileError([Problem(name, 0, "", e.strerror,
                                    "a profile must be a regular file: give the path of its "
                                    "YAML")]) from None
    except OSError as e:
        raise ProfileError([Problem(name, 0, "", f"cannot read: {e.strerror or e}",
                                    "check the path")]) from None
    if len(data) > MAX_PROFILE_BYTES:
        try:  # read_regular stopped one byte over the limit
            size = f"{os.stat(path).st_size} bytes"
        except OSError:
            size = "over that"
        raise ProfileError([Problem(
            name, 0, "", f"{size}, larger than the {MAX_PROFILE_BYTES >> 10} KiB a profile may "
            "be (not parsed)",
            f"a profile is a few dozen lines (parent/profile.example.yaml, every option with "
            f"its comments, is 7 KiB): is this the right file? If so, cut comments or merge "
            f"parent.egress entries to bring it under {MAX_PROFILE_BYTES >> 10} KiB")])
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ProfileError([Problem(name, line, "", "not UTF-8 text",
                                    "save the profile as UTF-8")]) from None


# ---------------------------------------------------------------------------------------------
# Host checks


def _free_subnet(prefixlen: int, version: int, taken: Iterable[IPNetwork]) -> IPNetwork | None:
    pools = (["10.77.0.0/16", "10.99.0.0/16", "172.30.0.0/16", "192.168.77.0/24"] if version == 4
             else ["fd77:7767:7673::/48"])
    taken = list(taken)
    for pool_text in pools:
        pool = ipaddress.ip_network(pool_text)
        if prefixlen < pool.prefixlen:
            continue
        for i, net in enumerate(pool.subnets(new_prefix=prefixlen)):
            if i >= 4096:
                break
            if not any(net.version == t.version and net.overlaps(t) for t in taken):  # type: ignore[arg-type]
                return net
    return None


def check_host(profile: Profile, host_networks: Iterable[IPNetwork],
               host_routes: Iterable[IPNetwork] | Mapping[IPNetwork, str] = ()
               ) -> list[Problem]:
    """Problems with PROFILE on a host whose own networks are HOST_NETWORKS and whose routes
    go to HOST_ROUTES (local_routes(); given as its mapping, a problem names where the route
    goes).

    A tunnel subnet that overlaps a network the parent already has would make the kernel route
    the enclave's traffic (or the host's) the wrong way, so it is refused before anything is set.
    So does one that overlaps a route of the host (a VPC peering, VPN or Transit Gateway route
    through its gateway, with no address of the host in it; a route to the enclave's address
    through a docker bridge or another parent's tunnel): the more specific of the two takes
    the other's traffic. Default routes are left out: every subnet is inside them.

    Given HostRoutes, also a blackhole, unreachable or prohibit route inside the tunnel subnet
    (the tunnel would come up with the enclave's address dropped), and an `ip rule` ahead of
    the main table's, where the tunnel's route goes, that sends all traffic for the enclave's
    address elsewhere (to another table's route, or drops it; a goto that jumps past main;
    `not from 10.0.0.0/8`, which takes the parent's own connections and all from elsewhere).
    check_host_warnings() says the rest (_rules_against says how rules are judged).
    """
    return _host_clashes(profile, host_networks, host_routes)[0]


def check_host_warnings(profile: Profile,
                        host_routes: Iterable[IPNetwork] | Mapping[IPNetwork, str] = ()
                        ) -> list[Problem]:
    """What `parent up`, `parent doctor` and `profile check --host` warn of, with HOST_ROUTES
    as local_routes() gives them: a tunnel subnet inside a route that drops traffic (an
    operator's `unreachable 10.0.0.0/8`), which the tunnel's more specific route then carries
    for that range after all; and an `ip rule` ahead of the main table's that sends some of
    the tunnel's traffic elsewhere, as one that selects by a mark or an interface too, or by
    the source (`from 10.77.0.0/30` takes the parent's own traffic to the enclave, and the
    enclave's egress, which may be what the operator meant), or only the subnet's addresses
    other than the enclave's."""
    return _host_clashes(profile, (), host_routes)[1]


def _host_clashes(profile: Profile, host_networks: Iterable[IPNetwork],
                  host_routes: Iterable[IPNetwork] | Mapping[IPNetwork, str]
                  ) -> tuple[list[Problem], list[Problem]]:
    host_networks = list(host_networks)
    where = dict(host_routes) if isinstance(host_routes, Mapping) else {}
    routes = [r for r in host_routes if r.prefixlen > 0 and r not in host_networks]
    extra = host_routes if isinstance(host_routes, HostRoutes) else HostRoutes()
    dropping = [n for n in extra.dropping if n.prefixlen > 0]
    taken = [*host_networks, *routes]
    problems: list[Problem] = []
    warnings: list[Problem] = []
    addrs = profile.parent.addresses
    for i, iface in enumerate(addrs):
        tunnel = iface.network
        key = "parent.address" if len(addrs) == 1 else f"parent.address[{i}]"
        # Refused (else a warning)?, what, whether another subnet would do, how else to fix.
        clashes: list[tuple[bool, str, bool, str]] = []
        for net in taken:
            if net.version != tunnel.version or not tunnel.overlaps(net):  # type: ignore[arg-type]
                continue
            what = ("a network of this host" if net in host_networks
                    else "where a route of this host goes")
            if net not in host_networks and where.get(net):
                what += f" ({where[net]})"
            clashes.append((True, f"tunnel subnet {tunnel} overlaps {net}, {what}", True, ""))
        for net in dropping:
            if net.version != tunnel.version or not tunnel.overlaps(net):  # type: ignore[arg-type]
                continue
            kind = extra.dropping[net]
            if net.subnet_of(tunnel):  # type: ignore[arg-type]
                clashes.append((True, f"tunnel subnet {tunnel} overlaps {net}, where a route "
                                f"of this host drops traffic ({kind})", True,
                                f", or delete that route if nothing needs it: `ip route del "
                                f"{kind} {net}`"))
            else:
                clashes.append((False, f"tunnel subnet {tunnel} is inside {net}, where a route "
                                f"of this host drops traffic ({kind}): the tunnel's route, more "
                                f"specific, takes {tunnel} out of it", True, ""))
        need = [a.ip for a in profile.enclave.addresses if a.ip in tunnel] or [
            next(h for h in (tunnel.network_address + 1, tunnel.network_address)
                 if h != iface.ip)]
        policy = _rules_against(tunnel, extra, need, profile.interface, iface.ip)
        for against in policy:
            # Not ahead of the local table's rule (Cilium's and VRF hosts' come later): the
            # parent's own address in the subnet would be routed out of the tunnel.
            rule = against.rule
            fix = (f"have the main table looked up first for it: `ip rule add pref "
                   f"{rule.priority - 1} to {tunnel} lookup main` (lost at reboot: add it to "
                   f"the host's network config too)"
                   if rule.priority > extra.local_first.get(tunnel.version, 0) else "")
            clashes.append((against.refused,
                            f"tunnel subnet {tunnel}: ip rule `{rule.text}` comes before the "
                            f"main table, where the tunnel's route goes, and {against.sends}",
                            not against.everywhere,
                            f", or {fix}" if fix and not against.everywhere else fix))
        if not clashes:
            continue
        # The suggestion keeps clear of what would clash with it again.
        avoid = [*taken, *dropping, *(n for t in policy
                                     for n in (*(() if t.rule.invert
                                                 else (t.rule.src, t.rule.dst)), *t.hits)
                                     if n is not None and n.prefixlen)]
        free = _free_subnet(tunnel.prefixlen, tunnel.version, avoid)
        for refused, reason, pick, fix in clashes:
            hint = fix
            if pick:
                hint = (f"pick a subnet this host does not use, e.g. {free}" if free
                        else "pick a subnet this host does not use")
                hint += f" (and move enclave.address with it){fix}"
            (problems if refused else warnings).append(
                Problem(profile.path, profile.line_of(key), key, reason, hint))
    return problems, warnings


@dataclass(frozen=True)
class _Taken:
    """What an ip rule does to the tunnel's traffic, for _host_clashes."""

    rule: IPRule  # the rule to name (a goto that jumped past main, not where it landed)
    sends: str  # what it does, as "sends traffic for it to table 7's route default (...)"
    hits: list[IPNetwork]  # the routes that take it
    refused: bool  # takes all the traffic for the enclave's address, not only some
    everywhere: bool  # would take it whatever the subnet (no other subnet would do)


def _rules_against(tunnel: IPNetwork, host: HostRoutes, need: Sequence[IPAddress],
                   interface: str, own: IPAddress) -> list[_Taken]:
    """The rules that route traffic for TUNNEL elsewhere than the main table (where its
    route goes, through INTERFACE), as the kernel walks them: in priority order, a goto
    jumping ahead, until a rule has main looked up for all of it.

    What the tunnel needs is the traffic to NEED, the enclave's addresses (the peer's allowed
    ips): a rule that takes all of that is refused; one that takes only some (by a mark, an
    interface, the parent's own source, OWN), or only the subnet's other addresses, is warned of.
    A rule's table routes an address by its most specific route there (one through INTERFACE
    reaches the tunnel, as main's does); none, a throw route, or one the rule's
    suppress_prefixlength or suppress_ifgroup has the lookup ignore passes it on to the next
    rule (so does main's: wg-quick's `lookup main suppress_prefixlength 0`).
    A rule that selects only what an earlier one with main looked up did (same mark,
    interface...; no narrower source) gets nothing of it: Tailscale's `fwmark 0x80000/0xff0000
    unreachable` after its `fwmark 0x80000/0xff0000 lookup main`. With `not`, a rule takes
    what fails any of its selectors: `not from 10.0.0.0/8` all but that source (the parent's
    own connections, looked up from 0.0.0.0, among it; `not from 0.0.0.0/8` takes them when
    looked up again from OWN), `not fwmark 0x10/0x10` all unmarked traffic, `not iif wg0` (the
    tunnel's own) all of it, `not to 10.77.0.0/16` none of it. Without `not`, a mark that
    unmarked traffic passes (`fwmark 0/0xff`) selects all ordinary traffic."""
    rules = [r for r in host.rules if r.version == tunnel.version]
    found: dict[int, _Taken] = {}  # by the named rule's place in RULES, refusals kept
    # The rules reached that took nothing of NEED: whether partly, and MAINS there.
    passed: dict[int, tuple[bool, list[IPRule]]] = {}

    def take(named: IPRule, taken: _Taken) -> None:
        key = rules.index(named)
        if key not in found or (taken.refused and not found[key].refused):
            found[key] = taken

    def main_takes(rule: IPRule, addr: IPAddress, mains: list[IPRule]) -> bool:
        return (rule.table == _TABLE_MAIN and _selects(rule, addr, own, mains)[0] == "all"
                and not _suppressed(rule, tunnel.prefixlen, host.groups.get(interface, 0)))

    def walk(addr: IPAddress, i: int, partial: bool, via: IPRule | None,
             mains: list[IPRule]) -> None:
        while i < len(rules):
            rule = rules[i]
            i += 1
            kind, whose = _selects(rule, addr, own, mains)
            if kind is None:
                passed.setdefault(i - 1, (partial, list(mains)))
                continue
            partly = partial or kind == "some"
            if rule.goto is not None:
                # Its target is the first rule at that priority (local_routes() leaves out a
                # goto to none): where that is a nop or the local table's, left out here, the
                # walk goes on from the next rule kept, as the kernel's does from it. The
                # kernel takes no goto backwards, so none loops.
                target = next((k for k in range(i, len(rules)) if rules[k].priority >= rule.goto),
                              len(rules))
                # Named itself where it jumps over a rule that would have main looked up.
                jumped = via or (rule if any(main_takes(r, addr, mains)
                                             for r in rules[i:target]) else None)
                if kind == "all":
                    i, via = target, jumped
                else:
                    walk(addr, target, True, jumped, list(mains))
                continue
            if rule.table == _TABLE_MAIN:
                if not _suppressed(rule, tunnel.prefixlen, host.groups.get(interface, 0)):
                    if kind == "all":
                        return
                    if (not rule.invert and (rule.match or not rule.some)
                            and not any(m.startswith("?") for m in rule.match)):
                        mains.append(rule)
                continue
            if rule.drop:
                sends, hits = f"drops {whose} ({rule.drop})", []
            else:
                route = _lookup(host, rule, addr)
                if route is None:
                    passed.setdefault(i - 1, (partial, list(mains)))
                    continue
                if _through(route[1], interface):  # this table reaches the tunnel too
                    if kind == "all":
                        return
                    continue
                sends, hits = f"sends {whose} to {_route_text(rule, *route)}", [route[0]]
            everywhere = (rule.dst is None and (rule.invert or rule.src is None)
                          and (not hits or any(n.prefixlen == 0 for n in hits)))
            if via is not None:
                sends = f"jumps past it to `{rule.text}`, which {sends}"
            take(via or rule, _Taken(via or rule, sends, hits, not partly,
                                     everywhere and via is None))
            if kind == "all":
                return
        if via is not None:
            take(via, _Taken(via, "jumps past it to where no table routes traffic for it", [],
                             not partial, False))

    for addr in need:
        walk(addr, 0, False, None, [])
    # The rest of the subnet: traffic for it that nothing needs, but the operator may.
    enclave = " or ".join(str(a) for a in need)
    for i, (partial, mains) in passed.items():
        rule = rules[i]
        if i in found or rule.invert or rule.goto is not None or rule.table == _TABLE_MAIN:
            continue
        if rule.dst is not None and not rule.dst.overlaps(tunnel):  # type: ignore[arg-type]
            continue
        part = (rule.dst if rule.dst is not None and rule.dst.subnet_of(tunnel)  # type: ignore[arg-type]
                else tunnel)
        for addr in _samples(part, host.tables.get(rule.table, ()), need):
            kind = _selects(rule, addr, own, mains)[0]
            if kind is None:
                continue
            some = "some " if partial or kind == "some" else ""
            if rule.drop:
                found[i] = _Taken(rule, f"drops {some}traffic for {part} of it (not the "
                                        f"enclave's {enclave}) ({rule.drop})", [], False, False)
                break
            route = _lookup(host, rule, addr)
            if route is None or _through(route[1], interface):
                continue
            shown = (max((part, route[0]), key=lambda n: n.prefixlen)
                     if route[0].subnet_of(tunnel) else part)  # type: ignore[arg-type]
            found[i] = _Taken(rule, f"sends {some}traffic for {shown} of it (not the enclave's "
                                    f"{enclave}) to {_route_text(rule, *route)}", [route[0]],
                              False, False)
            break
    return [found[k] for k in sorted(found)]


def _selects(rule: IPRule, addr: IPAddress, own: IPAddress, mains: list[IPRule]
             ) -> tuple[str | None, str]:
    """Whether RULE matches "all" the traffic for ADDR, "some" or None, and what it takes as
    a phrase; OWN, the parent's address in the subnet; MAINS, the rules with main looked up
    for some of it before."""
    src = rule.src if rule.src is not None and rule.src.prefixlen else None
    if rule.invert:  # matches what fails any of its selectors
        if rule.dst is not None and addr not in rule.dst:
            return "all", "traffic for it"
        # A connect() is routed twice: from 0.0.0.0, then from the source that gave, OWN.
        if src is not None and (ipaddress.ip_address(0 if addr.version == 4 else "::") not in src
                                or own not in src):
            return "all", f"traffic for it from all but {src} (the parent's own connections too)"
        if rule.misses:
            return "all", f"traffic for it but what has {rule.misses}"
        if src is None and not rule.match:
            return None, ""  # `not to 10.77.0.0/16`, `not from all`: it all passes them
        return "some", "some traffic for it"
    if rule.dst is not None and addr not in rule.dst:
        return None, ""
    # The parent's own connections to the enclave leave from OWN (the tunnel route's source):
    # a source without it takes none of them, as `from 10.77.0.2` (the enclave's egress out
    # of a chosen interface) or a secondary ENI's `from 172.31.5.9` (amazon-ec2-net-utils').
    if src is not None and own not in src:
        return None, ""
    if any(m.match <= rule.match and (m.src is None or (
            src is not None and src.subnet_of(m.src))) for m in mains):  # type: ignore[arg-type]
        return None, ""
    if rule.some:
        return "some", "some traffic for it"
    if src is None and rule.passes:
        return "all", f"traffic for it (unmarked traffic matches {rule.passes})"
    if src is not None:
        return "some", f"traffic for it from {src} (the parent's own)"
    return "all", "traffic for it"


def _suppressed(rule: IPRule, prefixlen: int, group: int) -> bool:
    """Whether RULE's lookup ignores a route of PREFIXLEN through a device in GROUP."""
    return ((rule.suppress is not None and prefixlen <= rule.suppress)
            or (rule.ifgroup is not None and group == rule.ifgroup))


def _lookup(host: HostRoutes, rule: IPRule, addr: IPAddress) -> tuple[IPNetwork, str] | None:
    """The route RULE's table gives ADDR, None where the lookup goes on to the next rule."""
    routes = [(n, w) for n, w in host.tables.get(rule.table, ())
              if n.version == addr.version and addr in n]
    if not routes:
        return None
    net, where = max(routes, key=lambda r: r[0].prefixlen)
    if where == "throw":
        return None
    if where not in _DROPS.values():
        dev = re.search(r"\bdev (\S+)", where)
        if _suppressed(rule, net.prefixlen, host.groups.get(dev[1], 0) if dev else 0):
            return None
    return net, where


def _through(where: str, interface: str) -> bool:
    """Whether a route going WHERE ("via 10.77.0.2 dev wg0") goes through INTERFACE."""
    return re.search(rf"\bdev {re.escape(interface)}$", where) is not None


def _samples(part: IPNetwork, table: Iterable[tuple[IPNetwork, str]],
             skip: Sequence[IPAddress]) -> list[IPAddress]:
    """Addresses of PART, but SKIP, that stand for where TABLE's routes send all of it: its
    first and each route's first inside it."""
    found = [part.network_address, *(max(n.network_address, part.network_address)
                                     for n, _ in table if n.version == part.version
                                     and n.overlaps(part))]  # type: ignore[arg-type]
    return [a for a in dict.fromkeys(found) if a not in skip]


def _route_text(rule: IPRule, net: IPNetwork, to: str) -> str:
    shown = "default" if net.prefixlen == 0 else str(net)
    return (f"table {rule.table}'s {to} route {shown}, which drops it" if to in _DROPS.values()
            else f"table {rule.table}'s route {shown} ({to})")


def check_routes(profile: Profile, host_routes: Iterable[IPNetwork]) -> list[Problem]:
    """Problems with PROFILE's enclave.routes on a host whose routes go to HOST_ROUTES.

    The parent forwards whatever the enclave sends through the tunnel, so a prefix that the
    host itself has no route for (typically ::/0 on an instance without IPv6) is a dead end:
    the enclave's connections there fail with no clue why. The tunnel's own subnets need no
    host route.
    """
    host_routes = list(host_routes)
    tunnels = [a.network for a in profile.parent.addresses]
    problems = []
    for i, route in enumerate(profile.enclave.routes):
        v = route.version
        if any(route.subnet_of(n) for n in [*tunnels, *host_routes]  # type: ignore[arg-type]
               if n.version == v):
            continue
        if route.prefixlen == 0:
            reason = (f"{route} sends the enclave's IPv{v} traffic to the parent, but this host "
                      f"has no IPv{v} default route")
            hint = ("give the instance IPv6 (an IPv6 CIDR on its subnet and an IPv6 address "
                    "on its network interface; the route then comes by router advertisement)"
                    if v == 6 else "give this host a default route")
            hint += f", or leave {route} out of enclave.routes"
        else:
            reason = (f"{route} sends the enclave's traffic for it to the parent, but this host "
                      f"has no route to {route}")
            hint = f"add a route to {route} on this host, or leave it out of enclave.routes"
        problems.append(Problem(profile.path, profile.line_of(f"enclave.routes[{i}]"),
                                "enclave.routes", reason, hint))
    return problems


# Route types and rule actions as `ip route` and `ip rule` name them; tables and flags.
_RTN_UNICAST, _RTN_THROW = 1, 9
_DROPS = {6: "blackhole", 7: "unreachable", 8: "prohibit"}
_FR_ACT_TO_TBL, _FR_ACT_GOTO = 1, 2
_TABLE_MAIN, _TABLE_LOCAL = 254, 255
_TABLE_NAMES = {253: "default", 254: "main"}
_FIB_RULE_INVERT, _FIB_RULE_UNRESOLVED = 2, 4
_FIB_RULE_IIF_DETACHED, _FIB_RULE_OIF_DETACHED = 8, 16
_NO_SUPPRESS = 0xFFFFFFFF
# What a rule may select packets by besides their source and destination: a mark, an
# interface, a user, a protocol or port, a TOS (in the header), a VRF, a tunnel id. A rule
# with one matches only some of the packets from its source to its destination.
_SELECTORS = ("FRA_FWMARK", "FRA_FWMASK", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_UID_RANGE",
              "FRA_IP_PROTO", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE", "FRA_L3MDEV", "FRA_TUN_ID")


@dataclass(frozen=True)
class IPRule:
    """An `ip rule` other than the local table's (see HostRoutes)."""

    version: int
    priority: int
    src: IPNetwork | None  # None: from all
    dst: IPNetwork | None
    table: int  # 0 for a rule that drops what it matches itself
    drop: str | None  # "blackhole", "unreachable" or "prohibit" for such a rule
    some: bool  # selects by more than source and destination (a mark, an interface, `not`)
    suppress: int | None  # suppress_prefixlength
    text: str  # as `ip rule` shows it (its mark and interfaces; "..." for other selectors)
    invert: bool = False  # `not`: matches what its selectors, ends included, do not
    # Its selectors other than the ends, as "FRA_FWMARK=524288", to tell whether an earlier
    # rule matches all this one does; empty for one with none (or whose are not known).
    match: frozenset[str] = frozenset()
    goto: int | None = None  # the priority a `goto` rule jumps to (its table 0)
    ifgroup: int | None = None  # suppress_ifgroup
    # A selector other than the ends that all ordinary traffic (unmarked, not sent by a
    # socket bound to a device) fails, as `ip rule` shows it: with `not`, it takes all that.
    misses: str | None = None
    # A mark selector that unmarked traffic passes (`fwmark 0/0xff`), as `ip rule` shows it:
    # without `not`, the rule takes all ordinary traffic as if it had no mark selector.
    passes: str | None = None


class HostRoutes(dict[IPNetwork, str]):
    """What local_routes() found. As a mapping, the destinations of this namespace's unicast
    routes in the main table, each with where the first route to it goes, as before. Besides,
    what else decides where the tunnel's traffic goes, for check_host: DROPPING, the main
    table's blackhole, unreachable and prohibit routes, each with its type; RULES, the `ip
    rule`s of both families by priority, the local table's left out (every host has it first,
    and its routes are the host's own addresses, found by local_networks()); TABLES, the
    routes of each other table a rule looks up, as (destination, where it goes or its type),
    those through the tunnel's interface among them;
    LOCAL_FIRST, the priority of the local table's rule by IP version where it is not 0;
    GROUPS, each interface's group (suppress_ifgroup) where it is not 0."""

    def __init__(self, routes: Mapping[IPNetwork, str] = (), *,  # type: ignore[assignment]
                 dropping: Mapping[IPNetwork, str] | None = None, rules: Sequence[IPRule] = (),
                 tables: Mapping[int, Sequence[tuple[IPNetwork, str]]] | None = None,
                 local_first: Mapping[int, int] | None = None,
                 groups: Mapping[str, int] | None = None) -> None:
        super().__init__(routes)
        self.groups = dict(groups or {})
        self.dropping = dict(dropping or {})
        self.rules = sorted(rules, key=lambda r: r.priority)
        self.tables = {t: list(rs) for t, rs in (tables or {}).items()}
        self.local_first = dict(local_first or {})


def local_routes(exclude_interface: str | None = None) -> HostRoutes:
    """This namespace's routes and rules as HostRoutes says, from one dump of each: routes
    through loopback or EXCLUDE_INTERFACE (the profile's own tunnel, and a crashed parent's
    went with it) left out. A unicast route names where it goes as `ip route` says it ("via
    192.0.2.1 dev eth0", "dev docker0"): a clash names the interface, so the operator can
    tell whose route it is."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = list(ipr.get_links())
        names = {link["index"]: link.get("IFLA_IFNAME") or f"if{link['index']}"
                 for link in links}
        groups = {names[link["index"]]: link.get("IFLA_GROUP") for link in links
                  if link.get("IFLA_GROUP")}
        skip = {index for index, name in names.items() if name in ("lo", exclude_interface)}
        rules = []
        local_first: dict[int, int] = {}
        for msg in ipr.get_rules(family=0):
            if msg["family"] not in (2, 10):
                continue
            table = msg.get("FRA_TABLE") or msg["table"]
            if table == _TABLE_LOCAL:
                local_first.setdefault(4 if msg["family"] == 2 else 6,
                                       msg.get("FRA_PRIORITY") or 0)
            if (table == _TABLE_LOCAL or msg["action"] not in (_FR_ACT_TO_TBL, _FR_ACT_GOTO,
                                                               *_DROPS)
                    or msg["flags"] & _FIB_RULE_UNRESOLVED):
                continue  # the local table, nop and a goto to no rule, which the walk skips
            goto = msg.get("FRA_GOTO") if msg["action"] == _FR_ACT_GOTO else None
            priority = msg.get("FRA_PRIORITY") or 0
            invert = bool(msg["flags"] & _FIB_RULE_INVERT)
            if (exclude_interface and msg.get("FRA_IIFNAME") == exclude_interface
                    and not invert and priority > local_first.get(
                        4 if msg["family"] == 2 else 6, 0)):
                # What the tunnel brings for its own subnet is for the parent's address, which
                # the local table takes first: such a rule routes the enclave's egress only.
                continue
            ends = {}
            for side in ("src", "dst"):
                addr = msg.get(f"FRA_{side.upper()}")
                ends[side] = (ipaddress.ip_network(f"{addr}/{msg[f'{side}_len']}", strict=False)
                              if addr is not None else None)
            # Attributes newer than pyroute2 (FRA_DSCP, FRA_FLOWLABEL) come as UNKNOWN: the
            # kernel sends them only set, so they select too, by what is not known.
            unknown = [f"?{a[1].get('header', {}).get('type')}" if isinstance(a[1], dict)
                       else "?" for a in msg["attrs"] if a[0] == "UNKNOWN"]
            mark, mask = msg.get("FRA_FWMARK"), msg.get("FRA_FWMASK")
            # The kernel matches (packet's mark ^ MARK) & MASK == 0: unmarked traffic passes a
            # mark with no bit in its mask (`fwmark 0/0xff`, all but what has one of those).
            unmarked = not (mark or 0) & (0xFFFFFFFF if mask is None else mask)
            some = (invert or bool(msg["tos"]) or bool(unknown)
                    or any(msg.get(a) for a in _SELECTORS
                           if not (unmarked and a in ("FRA_FWMARK", "FRA_FWMASK"))))
            drop = _DROPS.get(msg["action"])
            suppress = msg.get("FRA_SUPPRESS_PREFIXLEN")
            suppress = None if suppress in (None, _NO_SUPPRESS) else suppress
            ifgroup = msg.get("FRA_SUPPRESS_IFGROUP")
            ifgroup = None if ifgroup in (None, _NO_SUPPRESS) else ifgroup
            # As C's %#x, which `ip rule` uses: 0, not 0x0.
            marked = ((f"fwmark {mark:#x}" if mark else "fwmark 0")
                      + (f"/{mask:#x}" if mask not in (None, 0xFFFFFFFF) else "")
                      if mark or mask else "")
            iif = f"iif {msg.get('FRA_IIFNAME')}" if msg.get("FRA_IIFNAME") else ""
            oif = f"oif {msg.get('FRA_OIFNAME')}" if msg.get("FRA_OIFNAME") else ""
            # Unmarked traffic fails a mark with bits set; nothing for the enclave's address
            # comes in by the tunnel (iif lo is the parent's own); only what a socket bound to
            # that device sends has an oif (forwarded traffic has none).
            misses = (marked if not unmarked
                      else iif if exclude_interface
                      and msg.get("FRA_IIFNAME") == exclude_interface
                      else oif or None)
            shown = {"FRA_FWMARK", "FRA_FWMASK", "FRA_IIFNAME", "FRA_OIFNAME"}
            text = " ".join(filter(None, (
                f"{priority}:", "not" if invert else "", f"from {ends['src'] or 'all'}",
                f"to {ends['dst']}" if ends["dst"] else "", marked,
                # As `ip rule` marks one for an interface this namespace lacks.
                iif + (" [detached]" if iif and msg["flags"] & _FIB_RULE_IIF_DETACHED else ""),
                oif + (" [detached]" if oif and msg["flags"] & _FIB_RULE_OIF_DETACHED else ""),
                "..." if msg["tos"] or unknown
                or any(msg.get(a) for a in _SELECTORS if a not in shown)
                else "",
                drop or (f"goto {goto}" if goto is not None
                         else f"lookup {_TABLE_NAMES.get(table, table)}"),
                f"suppress_prefixlength {suppress}" if suppress is not None else "",
                f"suppress_ifgroup {'default' if ifgroup == 0 else ifgroup}"
                if ifgroup is not None else "")))
            rules.append(IPRule(4 if msg["family"] == 2 else 6, priority, ends["src"],
                              ends["dst"], 0 if drop or goto is not None else table, drop,
                              some, suppress, text, invert, frozenset(
                                  [f"{a}={msg.get(a)}" for a in _SELECTORS if msg.get(a)]
                                  + ([f"tos={msg['tos']}"] if msg["tos"] else []) + unknown),
                              goto, ifgroup, misses,
                              marked if unmarked and marked and not invert else None))
        looked_up = {r.table for r in rules if r.table and r.table != _TABLE_MAIN}
        nets = HostRoutes(rules=rules, local_first=local_first, groups=groups)
        for msg in ipr.get_routes():
            if msg["family"] not in (2, 10):
                continue
            table = msg.get("RTA_TABLE") or msg["table"]
            kind = msg["type"]
            if not (kind in (_RTN_UNICAST, *_DROPS) if table == _TABLE_MAIN
                    else table in looked_up and kind in (_RTN_UNICAST, _RTN_THROW, *_DROPS)):
                continue
            oif = msg.get("RTA_OIF")
            # Another table's route through the tunnel is kept: a rule looking it up reaches
            # the tunnel as main's route does (_rules_against).
            if kind == _RTN_UNICAST and oif in skip and (table == _TABLE_MAIN
                                                         or names.get(oif) == "lo"):
                continue
            dst = msg.get("RTA_DST")
            net: IPNetwork
            if dst is None:  # a default route carries no destination
                net = IPv4Network((0, 0)) if msg["family"] == 2 else IPv6Network((0, 0))
            else:
                net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
            if kind == _RTN_UNICAST:
                gateway = msg.get("RTA_GATEWAY")
                where = " ".join(filter(None, (
                    f"via {gateway}" if gateway else "",
                    f"dev {names.get(oif, f'if{oif}')}" if oif else "multipath")))
            else:
                where = "throw" if kind == _RTN_THROW else _DROPS[kind]
            if table != _TABLE_MAIN:
                nets.tables.setdefault(table, []).append((net, where))
            elif kind != _RTN_UNICAST:
                nets.dropping.setdefault(net, where)
            elif net not in nets:
                nets[net] = where
    return nets


def local_networks(exclude_interface: str | None = None) -> list[IPNetwork]:
    """The networks of this namespace's addresses, minus loopback and EXCLUDE_INTERFACE.

    The profile's own interface is left out so that `check --host` on a running parent does not
    find its own tunnel. IPv6 link-local networks are left out too: every interface has
    fe80::/64 and they are scoped to their link, so they clash with nothing.
    """
    from pyroute2 import IPRoute

    iff_loopback = 0x8
    nets: list[IPNetwork] = []
    with IPRoute() as ipr:
        skip = {link["index"] for link in ipr.get_links()
                if link["flags"] & iff_loopback
                or link.get("IFLA_IFNAME") in ("lo", exclude_interface)}
        for msg in ipr.get_addr():
            if msg["index"] in skip:
                continue
            # IFA_ADDRESS is the prefix side on point-to-point links, which is what routes use.
            addr = msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL")
            if not addr:
                continue
            net = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}").network
            if net.version == 6 and net.is_link_local:
                continue
            if net not in nets:
                nets.append(net)
    return nets


# ---------------------------------------------------------------------------------------------
# Dumping and the CLI


def _listen_text(listen: tuple[IPAddress, int] | None) -> str | None:
    if listen is None:
        return None
    host, port = listen
    return f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"


def _to_data(profile: Profile) -> dict[str, Any]:
    t, p, e, a = profile.transport, profile.parent, profile.enclave, profile.attestation
    launch = None
    if p.enclave is not None:
        launch = {"eif": p.enclave.eif, "cpu_count": p.enclave.cpu_count,
                  "memory_mib": p.enclave.memory_mib, "cid": p.enclave.cid,
                  "debug": p.enclave.debug}
    return {
        "version": profile.version,
        "name": profile.name,
        "interface": profile.interface,
        "mtu": profile.mtu,
        "transport": {"kind": t.kind, "port": t.port, "control_port": t.control_port,
                      "parent_cid": t.parent_cid, "path": t.path, "host": t.host},
        "parent": {
            "address": [str(x) for x in p.addresses],
            "private_key": p.private_key,
            "public_key": p.public_key,
            "egress": {"nat": p.egress.nat, "interface": p.egress.interface,
                       "allow": [str(r) for r in [*p.egress.allow, *p.egress.allow_names]],
                       "deny": [str(r) for r in [*p.egress.deny, *p.egress.deny_names]],
                       **({"max_connections": p.egress.max_connections}
                          if p.egress.max_connections is not None else {}),
                       **({"resolver": [str(x) for x in p.egress.resolver]}
                          if p.egress.resolver else {}),
                       **({"test_dns_grace": p.egress.dns_grace} if p.egress.uses_names
                          and p.egress.dns_grace < DEFAULT_DNS_GRACE else
                          {"dns_grace": p.egress.dns_grace} if p.egress.uses_names else {})},
            "ingress": [{"listen": i.listen, "to": i.to, "protocol": i.protocol}
                        for i in p.ingress],
            "enclave": launch,
            "enclave_cid": p.enclave_cid,
            "metrics": {
                "listen": _listen_text(p.metrics.listen),
                "cloudwatch": None if p.metrics.cloudwatch is None else {
                    "namespace": p.metrics.cloudwatch.namespace,
                    "interval": p.metrics.cloudwatch.interval},
            },
        },
        "enclave": {"address": [str(x) for x in e.addresses], "dns": [str(x) for x in e.dns],
                    "routes": [str(x) for x in e.routes],
                    "user": None if e.user is None else str(e.user)},
        "attestation": {"require": a.require, "pcrs": dict(a.pcrs), "max_age": a.max_age,
                        "allow_debug": a.allow_debug, "test_root_ca": a.test_root_ca},
    }


def changed_keys(old: Profile, new: Profile) -> list[str]:
    """The dotted keys (`parent.egress.allow`, `attestation.pcrs.0`) whose resolved values
    differ between OLD and NEW; a list counts as one value."""

    def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(_to_data(old)), flat(_to_data(new))
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k, _MISSING) != b.get(k, _MISSING)]


_MISSING = object()


def dump_profile(profile: Profile) -> str:
    """PROFILE as YAML with every default spelled out; parse_profile() reads it back equal."""
    body = yaml.safe_dump(_to_data(profile), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=100)
    # Not in deny, where it would read back as denied whole: said here instead.
    partly = "".join(f"#   {p}\n" for p in profile.parent.egress.partly_denied())
    if partly:
        partly = "# denied too, but for what an allow rule names:\n" + partly
    return (f"# {profile.path}, resolved: every default that applies filled in (the egress\n"
            "# resolver and connection limit appear when set, the DNS grace with name rules)\n"
            "# parent.egress.deny is the effective list: the metadata and credential endpoints\n"
            "# (IMDS, ECS, EKS) are always in it unless an allow rule names them, and then only\n"
            "# that rule's ports and protocol reach the endpoint\n"
            f"{partly}{body}")


def main_check(argv: Sequence[str], prog: str = "wgvsock profile check") -> int:
    """`wgvsock profile check FILE [--host]`: 0 and the resolved profile, or 1 and problems."""
    ap = argparse.ArgumentParser(
        prog=prog, description="Validate a profile and print it with every default filled in.")
    ap.add_argument("file", help="the profile (YAML)")
    ap.add_argument("--host", action="store_true",
                    help="also check the tunnel subnet against this host's own networks, routes "
                    "and ip rules, as `parent up` does, and that this host has routes for "
                    "enclave.routes; warn of a parent.private_key another user could replace")
    try:
        args = ap.parse_args(list(argv))
    except SystemExit as e:  # argparse has already printed usage; keep our int contract
        return e.code if isinstance(e.code, int) else 2
    try:
        profile = load_profile(args.file)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 1
    if args.host:
        try:
            networks = local_networks(profile.interface)
            routes = local_routes(profile.interface)
        except Exception as e:  # netlink failures come in many types; none deserves a traceback
            print(f"{prog}: cannot list this host's networks: {message(e)}", file=sys.stderr)
            return 1
        problems = check_host(profile, networks, routes) + check_routes(profile, routes)
        if problems:
            for p in problems:
                print(p, file=sys.stderr)
            return 1
        for w in check_host_warnings(profile, routes):
            print(f"{prog}: warning: {w}", file=sys.stderr)
        # Judged as the user running this, who should be the one `parent up` runs as (root).
        from ..roles.parent import key_path_warning

        if key_warning := key_path_warning(profile.parent.private_key):
            print(f"{prog}: warning: {key_warning}", file=sys.stderr)
    for w in profile.warnings:
        print(f"{prog}: warning: {w}", file=sys.stderr)
    if profile.attestation.test_root_ca:
        print(f"{prog}: warning: attestation.test_root_ca is set: the parent trusts "
              f"{profile.attestation.test_root_ca} instead of AWS's root (for tests only)",
              file=sys.stderr)
    sys.stdout.write(dump_profile(profile))
    return 0


# ---------------------------------------------------------------------------------------------
# Pinning the parent's key


def set_parent_public_key(text: str, key: str, path: str = "<string>") -> str:
    """TEXT with parent.public_key set to KEY, everything else (comments, order, layout) kept.

    The YAML is edited as text at the node marks rather than dumped again, which would lose the
    comments that make a profile readable. The result is parsed back to prove the edit.
    """
    try:
        key = _public_key(key)
    except _Invalid as e:
        raise ProfileError([Problem(path, 0, "parent.public_key", e.reason, e.hint)]) from None
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None and not isinstance(root, MappingNode):
        raise ProfileError([Problem(path, 1, "", "the profile is not a mapping",
                                    "start from parent/profile.example.yaml")])
    entries = {k.value: (k, v) for k, v in root.value} if root is not None else {}
    if "parent" not in entries:
        if root is not None and root.flow_style:
            raise ProfileError([Problem(path, 1, "parent", "cannot add parent: to a flow "
                                        "mapping", f"add `parent: {{public_key: {key}}}`")])
        sep = "" if not text or text.endswith("\n") else "\n"
        new = f"{text}{sep}parent:\n  public_key: {key}\n"
    else:
        knode, parent = entries["parent"]
        if isinstance(parent, MappingNode):
            children = {k.value: (k, v) for k, v in parent.value}
            if "public_key" in children:
                pk_key, pk_value = children["public_key"]
                start = text.index(":", pk_key.end_mark.index) + 1
                end = max(pk_value.end_mark.index, start)
                new = f"{text[:start]} {key}{text[end:]}"
            elif parent.flow_style:
                at = parent.start_mark.index + 1
                rest = ", " if parent.value else ""
                new = f"{text[:at]}public_key: {key}{rest}{text[at:]}"
            else:
                # A line of its own, after private_key when there is one, indented like the rest.
                first = parent.value[0][0]
                indent = " " * first.start_mark.column
                after = children.get("private_key", parent.value[0])[1].end_mark.index
                line_end = text.find("\n", after)
                at = len(text) if line_end < 0 else line_end + 1
                if "private_key" not in children:
                    at = text.rfind("\n", 0, first.start_mark.index) + 1
                nl = "" if at == 0 or text[at - 1] == "\n" else "\n"
                new = f"{text[:at]}{nl}{indent}public_key: {key}\n{text[at:]}"
        elif _is_null(parent):
            start = text.index(":", knode.end_mark.index) + 1
            end = max(parent.end_mark.index, start)
            new = f"{text[:start]} {{public_key: {key}}}{text[end:]}"
        else:
            raise ProfileError([Problem(path, _line(parent), "parent",
                                        f"expected a mapping, got {_describe(parent)}",
                                        "write parent as indented `key: value` lines")])
    try:
        written = parse_profile(new, path).parent.public_key
    except ProfileError:
        written = None
    if written != key:
        raise ProfileError([Problem(path, 0, "parent.public_key",
                                    "could not place the key without disturbing the file",
                                    f"add `public_key: {key}` under parent: by hand")])
    return new


def main_pin_parent(argv: Sequence[str], prog: str = "wgvsock profile pin-parent") -> int:
    """`wgvsock profile pin-parent FILE [--key-file F | --public-key B64]`: write the parent's
    public key into the profile as parent.public_key, so the enclave refuses any other parent."""
    ap = argparse.ArgumentParser(
        prog=prog, description="Pin the parent's WireGuard public key in a profile "
        "(parent.public_key). The key comes from the profile's own parent.private_key unless "
        "--key-file or --public-key says otherwise. Rebuild the enclave image afterwards.")
    ap.add_argument("file", help="the profile (YAML); edited in place, comments kept")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--key-file", metavar="F",
                     help="the parent's private key: a file, ssm:NAME or secretsmanager:NAME")
    src.add_argument("--public-key", metavar="B64", help="the parent's public key itself")
    try:
        args = ap.parse_args(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        # One read for the check and the edit: the file cannot change (or turn into a FIFO)
        # between them. Line ends as a text-mode read gives them, which the write keeps.
        _, text = _read_profile(args.file)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        profile = parse_profile(text, args.file)
        if args.public_key is not None:
            try:
                key = _public_key(args.public_key)
            except _Invalid as e:
                # Not _Invalid's hint, which sends the writer of a profile to this command.
                print(f"{prog}: --public-key: {e.reason}: give the parent's public key, as "
                      "`wgvsock pubkey < KEYFILE` prints it, or --key-file KEYFILE",
                      file=sys.stderr)
                return 2
        else:
            from ..core.crypto import key_to_base64, public_key
            from ..roles.parent import RoleError, load_parent_key

            try:
                private = load_parent_key(args.key_file or profile.parent.private_key,
                                          create=False)
            except RoleError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                return 1
            key = key_to_base64(public_key(private))
        new = set_parent_public_key(text, key, args.file)
    except ProfileError as e:
        print(e, file=sys.stderr)
        return 1
    if new != text:
        # Through a symlink to the file itself: replacing the link would leave the profile it
        # names (the one the image is built from, as a rule) unpinned.
        target = os.path.realpath(args.file)
        tmp: str | None = None
        try:
            st = os.stat(target)
            # A new file of a name no one could foresee (O_EXCL: no link followed). The
            # directory may be a user's, under sudo: a fixed name there was a link they
            # could plant to a file of root's, which the chown below then gave them.
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.",
                                       suffix=".pin-parent.tmp",
                                       dir=os.path.dirname(target))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    # Run with sudo on a user's file (README's Quick start), the new one would
                    # be root's, and the user's next edit refused. Unprivileged, it cannot be
                    # helped.
                    with contextlib.suppress(PermissionError):
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
                os.fchmod(f.fileno(), st.st_mode & 0o777)
                f.write(new)
            os.replace(tmp, target)
            tmp = None
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            where = f"{target} (what {args.file} links to)" if os.path.islink(args.file) \
                else args.file
            print(f"{prog}: cannot write {where}: {e.strerror or e}", file=sys.stderr)
            return 1
    # A pin that was there is said: it may be the key of the parent the images built so far
    # run with (--key-file of a test key given to a production profile, say), and those images
    # keep refusing any other.
    old = profile.parent.public_key
    print(f"{args.file}: parent.public_key: {key}"
          + (" (already pinned)" if new == text else
             f" (replaced the earlier pin {old}, which images built before still hold)"
             if old else ""))
    print("rebuild the enclave image so the pin is part of it (and of its PCRs)")
    return 0
