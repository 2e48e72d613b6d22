"""Packets that nftables `log group N` statements hand to userspace (nfnetlink_log).

The parent's table logs the enclave's refused packets (denied, blocked, spoofed) to a group of
its own, so an operator learns *what* was refused, not only how many packets: see
services/egress/refusals.py. The kernel copies at most SNAPLEN bytes of each packet, from its
network header, with the rule's prefix.

The protocol (linux/netfilter/nfnetlink_log.h): a NETLINK_NETFILTER socket sends a config
message (subsystem ULOG) that binds it to a group — one socket per group and network namespace;
another gets EPERM — and sets the copy mode; the kernel then sends one message per logged
packet, with attributes. A group nobody has bound costs nothing: the log statement does
nothing. When our socket's buffer is full the kernel drops log messages (ENOBUFS on our next
read), never the packets' verdicts.

`parse` is free of I/O and takes hostile bytes (it is the only part a peer could influence,
through the packets it sends): what does not parse is skipped.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import zlib
from dataclasses import dataclass

NETLINK_NETFILTER = 12
_SUBSYS_ULOG = 4
_MSG_PACKET = (_SUBSYS_ULOG << 8) | 0
_MSG_CONFIG = (_SUBSYS_ULOG << 8) | 1
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
# Config attributes and values.
_CFG_CMD = 1
_CFG_MODE = 2
_CMD_BIND = 1
_COPY_PACKET = 2
# Packet attributes.
_ATTR_PAYLOAD = 9
_ATTR_PREFIX = 10
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

#: Bytes copied of each logged packet: an IPv6 header (40) or an IPv4 header with options
#: (up to 60), and the transport header's ports.
SNAPLEN = 64
#: Bytes copied of a logged ICMP error, which is read for the packet it quotes too: the
#: error's IP and ICMP headers, then the quoted packet's IP header and ports (IPv4 with
#: options on both 60 + 8 + 60 + 4, IPv6 40 + 8 + 40 + 4 with room for an extension header).
SNAPLEN_QUOTING = 136
#: Groups the parent tries, from one chosen by its profile name (so two profiles on one host
#: usually start apart and rarely probe): 0x7767 ("wg") upwards.
GROUP_BASE = 0x7767
GROUP_TRIES = 64

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big-endian group)
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class Logged:
    """One logged packet: the log statement's prefix and the packet from its IP header."""

    prefix: str
    packet: bytes


@dataclass(frozen=True, slots=True)
class Flow:
    """What a logged packet was: protocol name, addresses, destination port (TCP, UDP, SCTP,
    UDP-Lite) or ICMP type, else None; the source port likewise; and for an ICMP error, the
    packet it quotes (as far as the copy reaches), else None."""

    protocol: str
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int | None
    source_port: int | None = None
    quoted: Flow | None = None

    def describe(self) -> str:
        """``tcp 203.0.113.5:5432``, ``udp [2001:db8::1]:53``, ``icmp 192.0.2.1``."""
        return f"{self.protocol} {self._end(self.destination, self.port)}"

    def connection(self) -> str:
        """Both ends: ``tcp 10.0.0.2:41234 -> 198.51.100.2:80``, ``icmp 10.0.0.2 -> 192.0.2.1``."""
        return (f"{self.protocol} {self._end(self.source, self.source_port)} -> "
                f"{self._end(self.destination, self.port)}")

    def _end(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
             port: int | None) -> str:
        if port is None or self.protocol in ("icmp", "ipv6-icmp"):
            return str(address)
        return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}
# ICMP types whose body quotes the packet they are about (those conntrack relates to its
# connection): destination unreachable, source quench, redirect, time exceeded, parameter
# problem; ICMPv6's destination unreachable, packet too big, time exceeded, parameter problem.
_ERRORS = {1: (3, 4, 5, 11, 12), 58: (1, 2, 3, 4)}
_ICMP_HEADER = 8
_PORTED = (6, 17, 132, 136)
# IPv6 extension headers a packet may carry before its transport header (hop-by-hop,
# routing, destination options); a fragment or anything else ends the walk.
_IPV6_EXTENSIONS = (0, 43, 60)


def parse(data: bytes) -> list[Logged]:
    """The logged packets in one netlink read; anything malformed is skipped."""
    out = []
    offset, end = 0, len(data)
    while offset + _HDR.size <= end:
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < _HDR.size or offset + length > end:
            break
        if kind == _MSG_PACKET and length >= _HDR.size + _NFGEN.size:
            prefix, packet = "", None
            for typ, value in _attributes(data, offset + _HDR.size + _NFGEN.size,
                                          offset + length):
                if typ == _ATTR_PREFIX:
                    prefix = value.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif typ == _ATTR_PAYLOAD:
                    packet = value
            if packet is not None:
                out.append(Logged(prefix, packet))
        offset += (length + 3) & ~3
    return out


def _attributes(data: bytes, offset: int, end: int):
    while offset + _ATTR.size <= end:
        length, typ = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            return
        yield typ & _NLA_TYPE_MASK, data[offset + _ATTR.size:offset + length]
        offset += (length + 3) & ~3


def flow(packet: bytes) -> Flow | None:
    """The protocol, addresses and ports of PACKET (from its IP header), and for an ICMP
    error those of the packet it quotes; None if it is no IPv4 or IPv6 packet this can read."""
    return _flow(packet, quoting=True)


def _flow(packet: bytes, *, quoting: bool) -> Flow | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < 20:
            return None
        proto = packet[9]
        src, dst = ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])
        # Only the first fragment has the transport header.
        first = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF == 0
        transport = ihl if first else None
    elif version == 6:
        if len(packet) < 40:
            return None
        proto = packet[6]
        src = ipaddress.IPv6Address(packet[8:24])
        dst = ipaddress.IPv6Address(packet[24:40])
        transport = 40
        while proto in _IPV6_EXTENSIONS and transport + 8 <= len(packet):
            proto, transport = packet[transport], transport + (packet[transport + 1] + 1) * 8
        if proto in _IPV6_EXTENSIONS:
            transport = None
    else:
        return None
    name = _PROTOCOLS.get(proto, str(proto))
    port = sport = quoted = None
    if transport is not None:
        if proto in _PORTED and transport + 4 <= len(packet):
            sport, port = struct.unpack_from("!HH", packet, transport)
        elif proto in (1, 58) and transport < len(packet):
            port = packet[transport]  # the ICMP type
            # One level only: an error about an error says nothing more.
            if quoting and port in _ERRORS[proto] and proto == (1 if version == 4 else 58):
                quoted = _flow(packet[transport + _ICMP_HEADER:], quoting=False)
    return Flow(name, src, dst, port, sport, quoted)


def _message(kind: int, group: int, attributes: bytes, seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + attributes
    return _HDR.pack(_HDR.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


def _attribute(typ: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, typ) + value + b"\0" * (-length % 4)


class NflogSocket:
    """A socket bound to one nfnetlink_log group of this network namespace. Raises OSError:
    EPERM when another socket has the group (or without CAP_NET_ADMIN), EPROTONOSUPPORT and
    the like when the kernel has no nfnetlink_log."""

    def __init__(self, group: int, *, buffer: int = 1 << 20) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"nflog group {group} is not 0-65535")
        self.group = group
        #: Log messages the kernel dropped because we did not read fast enough (at least).
        self.overruns = 0
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            self._sock.bind((0, 0))
            self._request(_attribute(_CFG_CMD, bytes([_CMD_BIND])), 1)
            # The most any rule asks for: each rule's own snaplen cuts its packets shorter.
            self._request(_attribute(_CFG_MODE, struct.pack(
                "!IBB", max(SNAPLEN, SNAPLEN_QUOTING), _COPY_PACKET, 0)), 2)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def _request(self, attributes: bytes, seq: int) -> None:
        self._sock.send(_message(_MSG_CONFIG, self.group, attributes, seq))
        self._sock.settimeout(5.0)
        while True:
            reply = self._sock.recv(4096)
            if len(reply) >= _HDR.size + 4:
                _, kind, _, rseq, _ = _HDR.unpack_from(reply)
                if kind == _NLMSG_ERROR and rseq == seq:
                    code = -struct.unpack_from("=i", reply, _HDR.size)[0]
                    if code:
                        raise OSError(code, f"nfnetlink_log group {self.group}: "
                                            f"{os.strerror(code)}")
                    return

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[Logged]:
        """What is queued, without waiting ([] when nothing is)."""
        out: list[Logged] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            out += parse(data)

    def close(self) -> None:
        self._sock.close()  # the kernel unbinds the group with the socket


def open_free_group(name: str) -> NflogSocket:
    """A socket bound to a free group, trying GROUP_TRIES from one chosen by NAME."""
    start = zlib.crc32(name.encode()) % GROUP_TRIES
    last: OSError | None = None
    for i in range(GROUP_TRIES):
        try:
            return NflogSocket(GROUP_BASE + (start + i) % GROUP_TRIES)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            last = e
    raise OSError(errno.EPERM, f"nfnetlink_log groups {GROUP_BASE}-"
                               f"{GROUP_BASE + GROUP_TRIES - 1} are all taken by other "
                               "processes (or this one lacks CAP_NET_ADMIN)") from last
