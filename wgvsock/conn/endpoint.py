"""Transport endpoints: parsing what users and the UAPI give us, printing what `wg` can read.

An :class:`Endpoint` is a plain, hashable record (a named tuple). The binds use it as a
dictionary key for their connections, so two endpoints are equal exactly when replies to one
may go to the other.

``conn_id`` is non-zero only for an inbound stream connection. Such a connection may have no
usable address (an unnamed Unix socket) or an address that cannot be dialled back (the peer's
ephemeral port), so the endpoint names the connection itself; a bind never dials it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_UNIX_DIR",
    "INET_NETWORKS",
    "NETWORKS",
    "VMADDR_CID_ANY",
    "VMADDR_PORT_ANY",
    "Endpoint",
    "default_unix_dir",
    "display_endpoint",
    "format_endpoint",
    "inet_host",
    "inet_sockaddr",
    "parse_endpoint",
    "unix_endpoint_from_path",
    "unix_port_path",
    "without_source",
]

DEFAULT_UNIX_DIR: Final = "/var/run/wgvsock"
UNIX_DIR_ENV: Final = "WGVSOCK_UNIX_DIR"

INET_NETWORKS: Final = frozenset({"tcp", "tcp4", "tcp6", "udp"})
NETWORKS: Final = frozenset({"vsock", "unix"}) | INET_NETWORKS

VMADDR_CID_ANY: Final = 0xFFFFFFFF
VMADDR_PORT_ANY: Final = 0xFFFFFFFF
_U32_MAX: Final = 0xFFFFFFFF

# sun_path is 108 bytes including the terminating NUL.
_UNIX_PATH_MAX: Final = 107

# The Go release's names for the well-known CIDs (see vsock(7)).
_VSOCK_NAMED_CIDS: Final = {"hypervisor(0)": 0, "local(1)": 1, "host(2)": 2}
_VSOCK_VM_RE: Final = re.compile(r"vm\(([0-9]{1,10})\)")
_DIGITS_RE: Final = re.compile(r"[0-9]{1,10}")
_PORT_FILE_RE: Final = re.compile(r"([0-9]{1,5})\.(sock|dgram)")


# A named tuple, not a dataclass: every message sent looks its connection up by endpoint, and a
# tuple hashes in C, where a dataclass calls its generated __hash__ in Python.
class Endpoint(NamedTuple):
    kind: str  # "vsock" | "inet" | "unix"
    # vsock: CID; inet: IP literal, an IPv6 zone always as its interface index (fe80::1%2);
    # unix: socket path ("" when unnamed)
    host: str | int
    port: int  # unix: the port number when the path is <unix_dir>/<port>.sock|.dgram, else 0
    conn_id: int = 0
    # inet over UDP: our local address a message from the peer arrived at, "" when not known
    # (a configured endpoint). Replies leave from it (wireguard-go's and the kernel's "sticky
    # source"): on a host with several addresses the route's choice may be another one, which
    # a peer behind NAT or a strict firewall drops. Part of equality, as in the kernel's
    # endpoint_eq: a message arriving at another of our addresses moves the peer's endpoint.
    src: str = ""


def default_unix_dir() -> str:
    return os.environ.get(UNIX_DIR_ENV) or DEFAULT_UNIX_DIR


def _unix_dir(unix_dir: str | None) -> str:
    return os.path.abspath(unix_dir or default_unix_dir())


def unix_port_path(unix_dir: str | None, port: int, dgram: bool) -> str:
    """The socket file that stands for a numeric port in the Unix transport."""
    return os.path.join(_unix_dir(unix_dir), f"{port}.dgram" if dgram else f"{port}.sock")


def unix_endpoint_from_path(
    path: str, unix_dir: str | None = None, dgram: bool = False
) -> Endpoint:
    """An endpoint for a socket path; a port-socket of ``unix_dir`` keeps its port number.

    The port is what lets :func:`format_endpoint` print ``127.0.0.1:PORT`` for `wg`, and what
    lets that printed form parse back to the same socket.
    """
    if not path:
        return Endpoint("unix", "", 0)
    path = os.path.normpath(path)
    head, tail = os.path.split(path)
    port = 0
    m = _PORT_FILE_RE.fullmatch(tail)
    if m and head == _unix_dir(unix_dir) and (m.group(2) == "dgram") == dgram:
        number = int(m.group(1))
        if 0 < number <= 0xFFFF and tail == f"{number}.{m.group(2)}":
            port = number
    return Endpoint("unix", path, port)


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"invalid endpoint {text!r}: expected [IPV6]:PORT")
        return text[1:close], text[close + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"invalid endpoint {text!r}: expected HOST:PORT")
    if ":" in host:
        raise ValueError(f"invalid endpoint {text!r}: an IPv6 address must be written [ADDR]:PORT")
    return host, port


def _parse_port(text: str, endpoint: str, maximum: int) -> int:
    if not _DIGITS_RE.fullmatch(text):
        raise ValueError(f"invalid endpoint {endpoint!r}: port {text!r} is not a number")
    port = int(text)
    if port == 0 or port > maximum:
        raise ValueError(f"invalid endpoint {endpoint!r}: port {port} is out of range 1-{maximum}")
    return port


def _parse_vsock(text: str) -> Endpoint:
    if text.startswith("vsock://"):
        host, port_text = _split_host_port(text[len("vsock://") :])
        if not _DIGITS_RE.fullmatch(host):
            raise ValueError(f"invalid endpoint {text!r}: CID {host!r} is not a number")
        cid = int(host)
    else:
        host, port_text = _split_host_port(text)
        if host in _VSOCK_NAMED_CIDS:
            cid = _VSOCK_NAMED_CIDS[host]
        elif m := _VSOCK_VM_RE.fullmatch(host):
            cid = int(m.group(1))
            if cid < 3:
                raise ValueError(f"invalid endpoint {text!r}: vm(N) needs N >= 3")
        elif _DIGITS_RE.fullmatch(host):
            # A bare number is a CID; getaddrinfo reads "16" as 0.0.0.16, so `wg` agrees.
            cid = int(host)
        else:
            try:
                cid = int(ipaddress.IPv4Address(host))
            except ValueError:
                raise ValueError(
                    f"invalid vsock endpoint {text!r}: expected vsock://CID:PORT, "
                    "A.B.C.D:PORT (CID as IPv4), host(2):PORT, vm(N):PORT, local(1):PORT "
                    "or hypervisor(0):PORT"
                ) from None
    if cid > _U32_MAX:
        raise ValueError(f"invalid endpoint {text!r}: CID {cid} does not fit in 32 bits")
    if cid == VMADDR_CID_ANY:
        raise ValueError(f"invalid endpoint {text!r}: VMADDR_CID_ANY is not a destination")
    if _DIGITS_RE.fullmatch(port_text) and int(port_text) == VMADDR_PORT_ANY:
        raise ValueError(f"invalid endpoint {text!r}: VMADDR_PORT_ANY is not a destination")
    # The range said is the one taken: VMADDR_PORT_ANY (2^32-1) is refused above.
    port = _parse_port(port_text, text, VMADDR_PORT_ANY - 1)
    return Endpoint("vsock", cid, port)


def _resolve(host: str, network: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    family = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}.get(network, socket.AF_UNSPEC)
    kind = socket.SOCK_DGRAM if network == "udp" else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host, None, family, kind)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"invalid endpoint {text!r}: cannot resolve {host!r}: {exc}") from None
    if not infos:
        raise ValueError(f"invalid endpoint {text!r}: {host!r} has no address")
    sockaddr = infos[0][4]
    if len(sockaddr) == 4 and sockaddr[3]:  # a name for a link-local address keeps its zone
        return ipaddress.ip_address(f"{sockaddr[0].partition('%')[0]}%{sockaddr[3]}")
    return ipaddress.ip_address(sockaddr[0])


def _inet_aton_reads(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


def _parse_inet(text: str, network: str) -> Endpoint:
    host, port_text = _split_host_port(text)
    port = _parse_port(port_text, text, 0xFFFF)
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        if text.startswith("["):
            raise ValueError(
                f"invalid endpoint {text!r}: {host!r} is not an IPv6 address"
            ) from None
        if _inet_aton_reads(host):
            # glibc's resolver would read 010.0.0.1 as 8.0.0.1 (octal) and 127.1 as 127.0.0.1:
            # a peer silently elsewhere. Go (the seed, wireguard-go) refuses these forms.
            raise ValueError(
                f"invalid endpoint {text!r}: {host!r} is not an IPv4 address as A.B.C.D "
                "(four decimal numbers 0-255 without leading zeros)"
            ) from None
        ip = _resolve(host, network, text)
    if text.startswith("[") and ip.version != 6:
        raise ValueError(f"invalid endpoint {text!r}: brackets are for IPv6 addresses")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; one spelling per peer.
        ip = ip.ipv4_mapped
    if network == "tcp4" and ip.version != 4:
        raise ValueError(f"invalid endpoint {text!r}: network tcp4 needs an IPv4 address")
    if network == "tcp6" and ip.version != 6:
        raise ValueError(f"invalid endpoint {text!r}: network tcp6 needs an IPv6 address")
    scope = getattr(ip, "scope_id", None)
    if scope is None:
        return Endpoint("inet", str(ip), port)
    index = _scope_index(scope)
    if index is None:
        raise ValueError(f"invalid endpoint {text!r}: no interface {scope!r} on this host "
                         "(give the zone as an existing interface's name or index)")
    # One spelling per zone, the index, as a received message's source has it: a name and its
    # index would otherwise be two endpoints, and the index is what sending needs.
    return Endpoint("inet", f"{ipaddress.IPv6Address(int(ip))}%{index}", port)


def _scope_index(scope: str) -> int | None:
    """The index of the interface an IPv6 zone names (``eth0`` or ``2``); None if there is no
    such interface."""
    try:
        if _DIGITS_RE.fullmatch(scope):
            index = int(scope)
            socket.if_indextoname(index)
            return index
        return socket.if_nametoindex(scope)
    except (OSError, OverflowError, ValueError):
        return None


def without_source(ep: Endpoint) -> Endpoint:
    """EP with no sticky source: replies to it leave from the address the route gives."""
    return ep._replace(src="") if ep.src else ep


def inet_host(address: str, scope_id: int = 0) -> str:
    """An endpoint's host for a socket address's (address, scope id): an IPv4 peer of a
    dual-stack socket as IPv4, a zone as its index."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    if scope_id:
        return f"{address.partition('%')[0]}%{scope_id}"
    return address


def inet_sockaddr(ep: Endpoint, ipv6: bool) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address a socket of family AF_INET6 (`ipv6`) or AF_INET takes for an inet endpoint;
    ValueError if an AF_INET socket cannot reach it. A zone goes in the scope id, which Python
    sets to 0 unless given, whatever the address text says."""
    host = str(ep.host)
    if not ipv6:
        if ":" in host:
            raise ValueError(f"{display_endpoint(ep)} is IPv6; this socket is IPv4 only")
        return (host, ep.port)
    if ":" not in host:
        return ("::ffff:" + host, ep.port)  # IPv4 peer through the dual-stack socket
    address, _, zone = host.partition("%")
    if not zone:
        return (address, ep.port, 0, 0)
    index = int(zone) if _DIGITS_RE.fullmatch(zone) else _scope_index(zone)
    return (address, ep.port, 0, index or 0)


def _parse_unix(text: str, unix_dir: str | None, dgram: bool) -> Endpoint:
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"invalid endpoint {text!r}: expected unix:/absolute/path")
        if "\0" in path:
            raise ValueError(f"invalid endpoint {text!r}: NUL in path")
        ep = unix_endpoint_from_path(path, unix_dir, dgram)
    else:
        # HOST:PORT stands for a port-socket in unix_dir, so `wg set ... endpoint` works too.
        _host, port_text = _split_host_port(text)
        port = _parse_port(port_text, text, 0xFFFF)
        ep = Endpoint("unix", unix_port_path(unix_dir, port, dgram), port)
    if len(os.fsencode(str(ep.host))) > _UNIX_PATH_MAX:
        raise ValueError(
            f"invalid endpoint {text!r}: socket path longer than {_UNIX_PATH_MAX} bytes"
        )
    return ep


def parse_endpoint(
    text: str, network: str, unix_dir: str | None = None, *, dgram: bool = False
) -> Endpoint:
    """Parse an endpoint for ``network``; raise ValueError saying what is wrong.

    ``dgram`` matters only for network unix: it picks ``<PORT>.dgram`` over ``<PORT>.sock``.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid endpoint {text!r}: not a string")
    s = text.strip()
    if not s:
        raise ValueError("empty endpoint")
    if network == "vsock":
        return _parse_vsock(s)
    if network in INET_NETWORKS:
        return _parse_inet(s, network)
    if network == "unix":
        return _parse_unix(s, unix_dir, dgram)
    raise ValueError(f"unknown network {network!r} (expected one of {', '.join(sorted(NETWORKS))})")


def _cid_as_ipv4(cid: int) -> str:
    return f"{(cid >> 24) & 0xFF}.{(cid >> 16) & 0xFF}.{(cid >> 8) & 0xFF}.{cid & 0xFF}"


def format_endpoint(ep: Endpoint) -> str | None:
    """The ``endpoint=`` value for UAPI ``get``, or None to leave it out.

    `wg` runs every endpoint through getaddrinfo and fails the whole `wg show` on one it cannot
    read, so only IPv4/IPv6 literals with a 16-bit port come out of here.
    """
    if ep.kind == "vsock":
        if not 0 < ep.port <= 0xFFFF:
            return None
        return f"{_cid_as_ipv4(int(ep.host))}:{ep.port}"
    if ep.kind == "inet":
        host = str(ep.host)
        address, sep, zone = host.partition("%")
        if sep and not _DIGITS_RE.fullmatch(zone):
            # A zone as its index (what endpoints hold): wg resolves names too, and one whose
            # interface is gone since would fail it (wg 1.0.20210914 even crashes); a number
            # it takes as it is.
            index = _scope_index(zone)
            if index is None:
                return None
            host = f"{address}%{index}"
        return f"[{host}]:{ep.port}" if ":" in host else f"{host}:{ep.port}"
    if ep.kind == "unix" and ep.port:
        return f"127.0.0.1:{ep.port}"
    return None


def display_endpoint(ep: Endpoint) -> str:
    """A human form for logs and the status dashboard."""
    if ep.kind == "vsock":
        return f"vsock://{ep.host}:{ep.port}"
    if ep.kind == "inet":
        host = str(ep.host)
        if ":" not in host:
            return f"{host}:{ep.port}"
        address, _, zone = host.partition("%")
        if _DIGITS_RE.fullmatch(zone):
            # A person knows the interface by its name; `wg` prints it so too.
            with contextlib.suppress(OSError, OverflowError):
                host = f"{address}%{socket.if_indextoname(int(zone))}"
        return f"[{host}]:{ep.port}"
    if ep.kind == "unix":
        return f"unix:{ep.host}" if ep.host else f"unix:<inbound #{ep.conn_id}>"
    return f"{ep.kind}:{ep.host}:{ep.port}"
