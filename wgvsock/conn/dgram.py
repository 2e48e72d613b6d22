"""Datagram transports: UDP (dual stack), Unix datagram, vsock datagram.

One socket, one reader thread. A datagram is a whole WireGuard message, so there is no framing.
Sends never block: a full socket buffer (or a Unix peer's full queue) drops the message, as a
UDP network would.

The UDP socket listens on every address, so a reply's source would be the one the route to the
peer gives, which on a host with several addresses need not be the one the peer sent to. As
wireguard-go and the kernel do, the address each message arrived at (IP_PKTINFO) goes with its
endpoint (Endpoint.src) and replies name it as their source; when the kernel refuses that
source (the address went away), the reply leaves from the route's choice instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import struct
from typing import Any, Final, TypeAlias

from .bind import (
    Message,
    RateLimitedLog,
    Receiver,
    SocketBind,
    log,
    new_inet_socket,
    unavailable,
)
from .endpoint import (
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    Endpoint,
    display_endpoint,
    inet_host,
    inet_sockaddr,
    unix_endpoint_from_path,
)
from .framing import MAX_PAYLOAD

__all__ = ["DGRAM_NETWORKS", "DatagramBind"]

DGRAM_NETWORKS: Final = frozenset({"vsock", "udp", "unix"})

# wireguard-go asks for 7 MiB too, past net.core.rmem_max/wmem_max with the *FORCE options
# where it may (CAP_NET_ADMIN, which a daemon that makes TUN devices has); else the kernel caps
# it at those (212992 bytes by default: about 90 full-size messages, which a burst from a
# kernel WireGuard peer overflowed while our reader handled a batch).
SOCKET_BUFFER: Final = 7 << 20
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
# Address caches are per peer, not per packet; the cap only guards against address floods.
_CACHE_MAX: Final = 4096
# UDP segmentation and receive offload (<linux/udp.h>): one sendmsg() carries many equal-sized
# datagrams, and one recvmsg() may return several coalesced ones. Python pays per system call,
# the kernel per byte, so this is what makes UDP cheap for us.
_SOL_UDP: Final = 17
_UDP_SEGMENT: Final = 103
_UDP_GRO: Final = 104
_UDP_MAX_SEGMENTS: Final = 64
# One GSO send must fit an IP packet: 65535 minus the IPv6/UDP headers, rounded down.
_GSO_MAX_BYTES: Final = 65000
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
# The local address (and interface) a datagram arrived at, and a send's source address:
# in_pktinfo {ifindex, spec_dst, addr} for IPv4 sockets, in6_pktinfo {addr, ifindex} for IPv6
# ones, which report an IPv4 datagram's as a v4-mapped address and take one to send from.
_IP_PKTINFO: Final = 8  # <linux/in.h>; Python has no name for it
_IPV6_PKTINFO: Final = socket.IPV6_PKTINFO
_IPV6_RECVPKTINFO: Final = socket.IPV6_RECVPKTINFO
_PKTINFO_CMSG_SPACE: Final = socket.CMSG_SPACE(20)
_V4_MAPPED: Final = bytes(10) + b"\xff\xff"
# How a send says the source it names is not ours (any more) or cannot reach the peer: the
# address was removed (IPv6 EINVAL, IPv4 ENETUNREACH), or its interface went down.
_SOURCE_REFUSED: Final = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH,
                                    errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENODEV})
_NO_CMSG: Final[tuple[tuple[int, int, bytes], ...]] = ()
# Most messages taken per wake-up of a reader (what is queued already, never waited for).
_DRAIN: Final = 64
_NO_LIMIT: Final = 1 << 16
_unpack_int: Final = struct.Struct("=i").unpack_from
_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")

# Where sends to an endpoint go: the socket address and the control messages that name the
# source (none: the route's choice).
Destination: TypeAlias = tuple[Any, tuple[tuple[int, int, bytes], ...]]


class DatagramBind(SocketBind):
    stream = False

    def __init__(self, network: str, *, unix_dir: str | None = None) -> None:
        if network not in DGRAM_NETWORKS:
            raise ValueError(f"network {network!r} has no datagram transport")
        super().__init__(network, unix_dir=unix_dir)
        self._kind = self.endpoint_kind()
        self._sock: socket.socket | None = None
        self._family = socket.AF_UNSPEC
        # Per source address (and, with IP_PKTINFO, the address it came to): its endpoint.
        self._ep_cache: dict[Any, Endpoint] = {}
        self._addr_cache: dict[Endpoint, Destination] = {}
        self._pktinfo = False  # whether the socket tells each datagram's local address
        self._send_errors = 0
        self._unroutable = 0
        self._source_refused = 0
        self._gso = False
        # Per endpoint, the smallest message size a GSO send was refused for (EMSGSIZE: the
        # segments would exceed the path MTU). Messages this long go one by one, so IP
        # fragments them, as wireguard-go's are: a tunnel MTU above the underlay's works.
        self._gso_too_big: dict[Endpoint, int] = {}
        self._err_log = RateLimitedLog()

    def open(self, port: int, receive: Receiver) -> int:
        sock = self._open_socket(port, receive, self._make_socket)
        self._sock = sock
        self._family = sock.family
        self._gso = self.network == "udp"
        cmsg_space = 0
        if self.network == "udp":
            try:
                sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
                cmsg_space += _GRO_CMSG_SPACE
            except OSError:
                pass
            self._pktinfo = self._receive_pktinfo(sock)
            if self._pktinfo:
                cmsg_space += _PKTINFO_CMSG_SPACE
        loop = functools.partial(self._read_loop, cmsg_space=cmsg_space)
        self._start_thread(loop, f"wgvsock-{self.network}-dgram-read", sock)
        log.info("%s: datagram socket on port %d%s", self.network, self.port,
                 f" ({self._unix_path})" if self._unix_path else "")
        return self.port

    def _marked_sockets(self) -> list[socket.socket]:
        return [self._sock] if self._sock is not None else []

    @staticmethod
    def _receive_pktinfo(sock: socket.socket) -> bool:
        """Asks for each datagram's local address; False where the kernel refuses (replies
        then leave from the route's choice)."""
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        except OSError as exc:
            log.info("udp: no local address per datagram (%s): replies leave from the "
                     "address the route gives", exc)
            return False
        return True

    def _make_socket(self, port: int) -> tuple[socket.socket, int]:
        if self.network == "vsock":
            # Nitro refuses vsock SOCK_DGRAM (EOPNOTSUPP); other hypervisors say ENODEV.
            what = ("vsock datagram (AF_VSOCK SOCK_DGRAM; use the stream transport: without "
                    "-d)")
            try:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_DGRAM)
            except OSError as exc:
                raise unavailable(exc, what) from exc
            try:
                sock.bind((VMADDR_CID_ANY, port or VMADDR_PORT_ANY))
                port = sock.getsockname()[1]
            except OSError as exc:
                sock.close()
                raise unavailable(exc, what) from exc
        elif self.network == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                port = self._bind_unix(sock, port, dgram=True)
            except BaseException:
                sock.close()
                raise
        else:
            sock, wildcard = new_inet_socket(self.network, socket.SOCK_DGRAM)
            try:
                self._sync_mark(sock)
                sock.bind((wildcard, port))
                port = sock.getsockname()[1]
            except BaseException:
                sock.close()
                raise
        for force, opt in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF),
                           (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        return sock, port

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            sock, self._sock = self._sock, None
        if sock is not None:
            # Wakes the blocked recvfrom() (on unconnected sockets too, despite ENOTCONN).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._join_threads()
        if sock is not None:
            sock.close()
        self._remove_unix_path()
        self._ep_cache.clear()
        self._addr_cache.clear()
        self._gso_too_big.clear()
        log.info("%s: closed", self.network)

    # -- sending -----------------------------------------------------------------------------

    def _destination(self, ep: Endpoint) -> Destination | None:
        """Where sends to ``ep`` go, or None if this socket cannot reach it."""
        if ep.kind != self._kind:
            return None
        if ep.kind == "vsock":
            return (int(ep.host), ep.port), _NO_CMSG
        if ep.kind == "unix":
            # An unbound sender cannot be answered.
            return (ep.host, _NO_CMSG) if ep.host else None
        ipv6 = self._family == socket.AF_INET6
        try:
            addr = inet_sockaddr(ep, ipv6)
        except ValueError:
            return None
        src = ep.src
        if not src or not self._pktinfo:
            return addr, _NO_CMSG
        # Interface 0: the route picks it, as for the kernel's own replies. Naming the one the
        # message came in on (as wireguard-go does) would hold replies to it after the route
        # moved.
        try:
            if ipv6:
                packed = socket.inet_pton(socket.AF_INET6,
                                          "::ffff:" + src if "." in src else src)
                return addr, ((socket.IPPROTO_IPV6, _IPV6_PKTINFO, packed + bytes(4)),)
            return addr, ((socket.IPPROTO_IP, _IP_PKTINFO,
                           bytes(4) + socket.inet_pton(socket.AF_INET, src) + bytes(4)),)
        except OSError:  # not this socket's family: the route's choice
            return addr, _NO_CMSG

    def _resolve(self, ep: Endpoint) -> Destination | None:
        dest = self._destination(ep)
        if dest is None:
            self._unroutable += 1
            self._err_log(logging.WARNING, "%s: cannot send to %s", self.network,
                          display_endpoint(ep))
            return None
        if len(self._addr_cache) >= _CACHE_MAX:
            self._addr_cache.clear()
        self._addr_cache[ep] = dest
        return dest

    def send(self, data: bytes, ep: Endpoint) -> int:
        sock = self._sock
        if sock is None:
            return 0
        dest = self._addr_cache.get(ep) or self._resolve(ep)
        if dest is None:
            return 0
        addr, cmsg = dest
        try:
            if cmsg:
                sock.sendmsg((data,), cmsg, socket.MSG_DONTWAIT, addr)
            else:
                sock.sendto(data, socket.MSG_DONTWAIT, addr)
            return len(data)
        except OSError as exc:
            if not (cmsg and exc.errno in _SOURCE_REFUSED):
                self._send_failed(ep, exc)
                return 0
            refused = exc
        # Whether the source was the trouble shows only when the route's choice does better:
        # the same errnos also say the peer is unreachable from anywhere.
        try:
            sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError as exc:
            self._send_failed(ep, exc)
            return 0
        self._unstick(ep, addr, refused)
        return len(data)

    def _send_failed(self, ep: Endpoint, exc: OSError) -> None:
        self._send_errors += 1
        self._err_log(logging.INFO, "%s: send to %s failed: %s", self.network,
                      display_endpoint(ep), exc)

    def _unstick(self, ep: Endpoint, addr: Any, exc: OSError) -> None:
        """The kernel refused ep's source: sends to it leave from the route's choice, until a
        message arrives at that address again (the next one from there makes a new endpoint
        in _remember, which tries the address again)."""
        self._source_refused += 1
        self._addr_cache[ep] = (addr, _NO_CMSG)
        # Rare, and the cache is bounded (_CACHE_MAX): a scan, rather than a second index.
        for key in [k for k, known in self._ep_cache.items() if known == ep]:
            del self._ep_cache[key]
        self._err_log(logging.INFO, "%s: cannot send to %s from %s (%s): sending from the "
                      "address the route gives", self.network, display_endpoint(ep), ep.src,
                      exc.strerror or exc)

    def send_batch(self, messages: list[bytes], ep: Endpoint) -> int:
        sock = self._sock
        sent = 0
        if not self._gso or len(messages) < 2 or sock is None:
            for data in messages:
                sent += self.send(data, ep)
            return sent
        dest = self._addr_cache.get(ep) or self._resolve(ep)
        if dest is None:
            return 0
        # The kernel cuts a GSO send into datagrams of the first one's size, the last may be
        # shorter: so a run ends after a shorter message, or at the per-send limits.
        i, n = 0, len(messages)
        while i < n:
            size = len(messages[i])
            limit = min(_UDP_MAX_SEGMENTS, _GSO_MAX_BYTES // size)
            j = i + 1
            while j < n and j - i < limit and len(messages[j]) == size:
                j += 1
            if j < n and j - i < limit and len(messages[j]) < size:
                j += 1
            if j - i == 1:
                sent += self.send(messages[i], ep)
                i = j
                continue
            went = -1
            if size < self._gso_too_big.get(ep, _NO_LIMIT):
                # (A run before may have found the source refused: _unstick changed it.)
                went = self._send_gso(sock, messages[i:j], size,
                                      self._addr_cache.get(ep, dest), ep)
            if went < 0:
                for data in messages[i:j]:
                    sent += self.send(data, ep)
            else:
                sent += went
            i = j
        return sent

    def _send_gso(self, sock: socket.socket, run: list[bytes], size: int, dest: Destination,
                  ep: Endpoint) -> int:
        """The bytes sent; -1 when the kernel refused segmentation itself (the caller then
        sends one by one); other failures count as a dropped send (0), as in send()."""
        addr, source = dest
        segment = (_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))
        data = b"".join(run)
        refused: OSError | None = None
        while True:
            try:
                sock.sendmsg([data], (segment, *source) if source else (segment,),
                             socket.MSG_DONTWAIT, addr)
            except OSError as exc:
                if source and exc.errno in _SOURCE_REFUSED:
                    # Again without the source, which tells a refused source from what the
                    # same errnos say below (EINVAL: a segment too large on older kernels).
                    refused, source = exc, _NO_CMSG
                    continue
                return 0 if self._gso_failed(ep, size, exc) else -1
            if refused is not None:
                self._unstick(ep, addr, refused)
            return len(data)

    def _gso_failed(self, ep: Endpoint, size: int, exc: OSError) -> bool:
        """_send_gso's answer for a send the kernel refused (the source aside): whether it
        counts as dropped (else the caller sends one by one)."""
        # A segment larger than the path allows: EMSGSIZE, and EINVAL from kernels before
        # 6.13 (and 6.1.129). Only this endpoint's path; other peers keep segmentation.
        if exc.errno in (errno.EMSGSIZE, errno.EINVAL):
            too_big = self._gso_too_big
            if len(too_big) >= _CACHE_MAX:
                too_big.clear()
            too_big[ep] = min(size, too_big.get(ep, _NO_LIMIT))
            return False
        if exc.errno in (errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            # No checksum offload on the route's device (EIO, as wireguard-go reads it) or
            # a kernel without UDP segmentation.
            self._gso = False
            log.info("%s: UDP segmentation offload unavailable: %s", self.network, exc)
            return False
        self._send_failed(ep, exc)
        return True

    # -- receiving ---------------------------------------------------------------------------

    def _endpoint_for(self, addr: Any, info: bytes = b"") -> Endpoint:
        if self._kind == "inet":
            host = inet_host(addr[0], addr[3] if len(addr) == 4 else 0)
            return Endpoint("inet", host, addr[1], 0, _local_address(info, host))
        if self._kind == "vsock":
            return Endpoint("vsock", addr[0], addr[1])
        return unix_endpoint_from_path(addr if isinstance(addr, str) else "", self.unix_dir,
                                       dgram=True)

    def _remember(self, key: Any, addr: Any, info: bytes) -> Endpoint:
        """The endpoint for a source address (and local address) not seen before (the cache
        is per peer, so a flood of new addresses only ever resets it)."""
        cache = self._ep_cache
        ep = self._endpoint_for(addr, info)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = ep
        if ep.src:
            dest = self._addr_cache.get(ep)
            if dest is not None and not dest[1]:
                # Its source was refused (_unstick), and a message came to it since: try it.
                self._addr_cache.pop(ep, None)
        return ep

    def _read_loop(self, sock: socket.socket, cmsg_space: int = 0) -> None:
        """One datagram per receive, or with UDP_GRO several of the size the control message
        gives (the last may be shorter). After each wake-up, what else is queued already is
        taken too (never waited for, at most _DRAIN messages), and consecutive messages from
        one source go to the owner as one batch: its TUN writes can then merge runs of TCP,
        which GRO never does for datagrams that IP reassembled from fragments (a tunnel MTU
        above the path MTU)."""
        closed = self._closed
        while True:
            try:
                batch, src = self._receive_one(sock, cmsg_space, 0)
            except OSError as exc:
                if closed.is_set() or exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    break
                self._err_log(logging.WARNING, "%s: receive failed: %s", self.network, exc)
                continue
            if closed.is_set():
                break
            if not batch:
                continue
            while len(batch) < _DRAIN:
                try:
                    more, ep = self._receive_one(sock, cmsg_space, socket.MSG_DONTWAIT)
                except OSError:
                    break  # EAGAIN: all taken; another error comes back on the next receive
                if not more:
                    break
                if ep is not src:
                    self._deliver(batch, src)
                    batch, src = more, ep
                else:
                    batch += more
            self._deliver(batch, src)

    def _receive_one(self, sock: socket.socket, cmsg_space: int,
                     flags: int) -> tuple[list[Message], Any]:
        size = 0
        info = b""
        if cmsg_space:
            data, ancdata, _flags, addr = sock.recvmsg(MAX_PAYLOAD, cmsg_space, flags)
            for level, kind, value in ancdata:
                if kind == _UDP_GRO and level == _SOL_UDP:
                    if len(value) >= 4:
                        size = _unpack_int(value)[0]
                elif level != _SOL_UDP:  # the pktinfo asked for, the only other one
                    info = value
        else:
            data, addr = sock.recvfrom(MAX_PAYLOAD, flags)
        if not data:  # an empty datagram, or the socket shut down by close()
            return [], None
        # The local address is part of the key: a message to another of our addresses is
        # another endpoint (the tuple costs less than a second lookup).
        key = (addr, info) if info else addr
        ep = self._ep_cache.get(key) or self._remember(key, addr, info)
        if 0 < size < len(data):
            return [data[at : at + size] for at in range(0, len(data), size)], ep
        return [data], ep

    def _deliver(self, messages: list[Message], ep: Any) -> None:
        receive = self._receive
        assert receive is not None
        try:
            if len(messages) > 1 and self.receive_batch is not None:
                self.receive_batch(messages, ep, 0)
            else:
                for message in messages:
                    receive(message, ep)
        except Exception:
            self._err_log(logging.ERROR, "%s: receive callback failed", self.network)
            log.debug("receive callback failure", exc_info=True)

    def status(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "stream": False,
            "open": self.is_open,
            "port": self.port,
            "path": self._unix_path,
            "send_errors": self._send_errors,
            "unroutable": self._unroutable,
            "source_refused": self._source_refused,
        }


def _local_address(info: bytes, host: str) -> str:
    """Our address a datagram came to, from its in6_pktinfo (20 bytes) or in_pktinfo (12),
    as Endpoint.src; "" for none, or one no reply can leave from: a group or broadcast
    address, or a link-local one for a peer beyond the link (the kernel wants an interface
    with such a source, and a reply to a global address names none)."""
    if len(info) == 20:
        raw = info[:16]
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(raw[12:]) if raw[:12] == _V4_MAPPED
            else ipaddress.IPv6Address(raw))
    elif len(info) == 12:
        ip = ipaddress.IPv4Address(info[4:8])  # spec_dst: the local address for replies
    else:
        return ""
    if ip.is_multicast or ip.is_unspecified or ip == _BROADCAST:
        return ""
    if ip.is_link_local and ip.version == 6 and "%" not in host:
        return ""
    return str(ip)
