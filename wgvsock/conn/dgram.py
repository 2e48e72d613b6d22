"""Datagram transports: UDP (dual stack), Unix datagram, vsock datagram.

One socket, one reader thread. A datagram is a whole WireGuard message, so there is no framing.
Sends never block: a full socket buffer (or a Unix peer's full queue) drops the message, as a
UDP network would.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
import struct
from typing import Any, Final

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
# Most messages taken per wake-up of a reader (what is queued already, never waited for).
_DRAIN: Final = 64
_NO_LIMIT: Final = 1 << 16


def _gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size of a coalesced UDP_GRO receive, or 0 for a single datagram."""
    for level, kind, value in ancdata:
        if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= 4:
            return struct.unpack_from("=i", value)[0]
    return 0


class DatagramBind(SocketBind):
    stream = False

    def __init__(self, network: str, *, unix_dir: str | None = None) -> None:
        if network not in DGRAM_NETWORKS:
            raise ValueError(f"network {network!r} has no datagram transport")
        super().__init__(network, unix_dir=unix_dir)
        self._kind = self.endpoint_kind()
        self._sock: socket.socket | None = None
        self._family = socket.AF_UNSPEC
        self._ep_cache: dict[Any, Endpoint] = {}
        self._addr_cache: dict[Endpoint, Any] = {}
        self._send_errors = 0
        self._unroutable = 0
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
        gro = False
        if self.network == "udp":
            try:
                sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
                gro = True
            except OSError:
                pass
        loop = functools.partial(self._read_loop, gro=gro)
        self._start_thread(loop, f"wgvsock-{self.network}-dgram-read", sock)
        log.info("%s: datagram socket on port %d%s", self.network, self.port,
                 f" ({self._unix_path})" if self._unix_path else "")
        return self.port

    def _marked_sockets(self) -> list[socket.socket]:
        return [self._sock] if self._sock is not None else []

    def _make_socket(self, port: int) -> tuple[socket.socket, int]:
        if self.network == "vsock":
            # Nitro refuses vsock SOCK_DGRAM (EOPNOTSUPP); other hypervisors say ENODEV.
            what = "vsock datagram (AF_VSOCK SOCK_DGRAM; use the stream transport)"
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

    def _sockaddr(self, ep: Endpoint) -> Any:
        """The address sendto() wants for ``ep``, or None if this socket cannot reach it."""
        if ep.kind != self._kind:
            return None
        if ep.kind == "vsock":
            return (int(ep.host), ep.port)
        if ep.kind == "unix":
            return ep.host or None  # an unbound sender cannot be answered
        try:
            return inet_sockaddr(ep, self._family == socket.AF_INET6)
        except ValueError:
            return None

    def send(self, data: bytes, ep: Endpoint) -> None:
        sock = self._sock
        if sock is None:
            return
        addr = self._addr_cache.get(ep)
        if addr is None:
            addr = self._sockaddr(ep)
            if addr is None:
                self._unroutable += 1
                self._err_log(logging.WARNING, "%s: cannot send to %s", self.network,
                              display_endpoint(ep))
                return
            if len(self._addr_cache) >= _CACHE_MAX:
                self._addr_cache.clear()
            self._addr_cache[ep] = addr
        try:
            sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError as exc:
            self._send_errors += 1
            self._err_log(logging.INFO, "%s: send to %s failed: %s", self.network,
                          display_endpoint(ep), exc)

    def send_batch(self, messages: list[bytes], ep: Endpoint) -> None:
        sock = self._sock
        if not self._gso or len(messages) < 2 or sock is None:
            for data in messages:
                self.send(data, ep)
            return
        addr = self._addr_cache.get(ep)
        if addr is None:
            self.send(messages[0], ep)  # resolves and caches the address, or logs why not
            if self._addr_cache.get(ep) is None:
                return
            messages = messages[1:]
            addr = self._addr_cache[ep]
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
                self.send(messages[i], ep)
            elif size >= self._gso_too_big.get(ep, _NO_LIMIT) or not self._send_gso(
                sock, messages[i:j], size, addr, ep
            ):
                for data in messages[i:j]:
                    self.send(data, ep)
            i = j

    def _send_gso(self, sock: socket.socket, run: list[bytes], size: int, addr: Any,
                  ep: Endpoint) -> bool:
        """False when the kernel refused segmentation itself (the caller then sends one by
        one); other failures count as a dropped send, as in send()."""
        try:
            sock.sendmsg([b"".join(run)], [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))],
                         socket.MSG_DONTWAIT, addr)
        except OSError as exc:
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
            self._send_errors += 1
            self._err_log(logging.INFO, "%s: send to %s failed: %s", self.network,
                          display_endpoint(ep), exc)
        return True

    # -- receiving ---------------------------------------------------------------------------

    def _endpoint_for(self, addr: Any) -> Endpoint:
        if self._kind == "inet":
            return Endpoint("inet", inet_host(addr[0], addr[3] if len(addr) == 4 else 0),
                            addr[1])
        if self._kind == "vsock":
            return Endpoint("vsock", addr[0], addr[1])
        return unix_endpoint_from_path(addr if isinstance(addr, str) else "", self.unix_dir,
                                       dgram=True)

    def _remember(self, addr: Any) -> Endpoint:
        """The endpoint for a source address not seen before (the cache is per peer, so a
        flood of new addresses only ever resets it)."""
        cache = self._ep_cache
        ep = self._endpoint_for(addr)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[addr] = ep
        return ep

    def _read_loop(self, sock: socket.socket, gro: bool = False) -> None:
        """One datagram per receive, or with UDP_GRO several of the size the control message
        gives (the last may be shorter). After each wake-up, what else is queued already is
        taken too (never waited for, at most _DRAIN messages), and consecutive messages from
        one source go to the owner as one batch: its TUN writes can then merge runs of TCP,
        which GRO never does for datagrams that IP reassembled from fragments (a tunnel MTU
        above the path MTU)."""
        closed = self._closed
        while True:
            try:
                batch, src = self._receive_one(sock, gro, 0)
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
                    more, ep = self._receive_one(sock, gro, socket.MSG_DONTWAIT)
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

    def _receive_one(self, sock: socket.socket, gro: bool,
                     flags: int) -> tuple[list[Message], Any]:
        if gro:
            data, ancdata, _flags, addr = sock.recvmsg(MAX_PAYLOAD, _GRO_CMSG_SPACE, flags)
            size = _gro_size(ancdata)
        else:
            data, addr = sock.recvfrom(MAX_PAYLOAD, flags)
            size = 0
        if not data:  # an empty datagram, or the socket shut down by close()
            return [], None
        ep = self._ep_cache.get(addr) or self._remember(addr)
        if 0 < size < len(data):
            return [data[at : at + size] for at in range(0, len(data), size)], ep
        return [data], ep

    def _deliver(self, messages: list[Message], ep: Any) -> None:
        receive = self._receive
        assert receive is not None
        try:
            if len(messages) > 1 and self.receive_batch is not None:
                self.receive_batch(messages, ep)
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
        }
