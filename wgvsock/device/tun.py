"""Linux TUN device (layer 3, no packet-info header) via /dev/net/tun.

Standard library only. Interface attributes (MTU, flags, index) are read and written with
ioctls on a control socket that is opened when the device is created, so every query goes to
the network namespace the device was created in, even if the calling thread has since moved
to another namespace (tests create devices inside namespaces from helper threads).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Final

from mypy_extensions import mypyc_attr

__all__ = ["Tun", "TunError", "coalesce_tcp", "complete_checksum", "split_tso"]

_TUN_PATH = "/dev/net/tun"
# Its device number (a misc device, TUN_MINOR): only a descriptor of it is asked TUNGETIFF, a
# number another driver may read as a request of its own.
_TUN_DEVICE: Final = (10, 200)

# From <linux/if_tun.h> and <linux/sockios.h>.
_TUNSETIFF: Final = 0x400454CA
_TUNGETIFF: Final = 0x800454D2
_TUNGETDEVNETNS: Final = 0x54E3
_TUNGETVNETHDRSZ: Final = 0x800454D7
_IFF_TUN: Final = 0x0001
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
_TUNSETOFFLOAD: Final = 0x400454D0
_TUN_F_CSUM: Final = 0x01
_TUN_F_TSO4: Final = 0x02
_TUN_F_TSO6: Final = 0x04
_OFFLOAD_ALL: Final = _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6
# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR_LEN: Final = 10
_VNET_F_NEEDS_CSUM: Final = 1
_GSO_TCPV4: Final = 1
_GSO_TCPV6: Final = 4
_GSO_ECN: Final = 0x80
_IPPROTO_TCP: Final = 6
# IPv6 extension headers that may come before TCP: hop-by-hop options, routing,
# destination options (8-byte units), the authentication header (4-byte units).
_IPV6_ROUTING: Final = 43
_IPV6_AH: Final = 51
_IPV6_EXTENSIONS: Final = frozenset({0, _IPV6_ROUTING, 60, _IPV6_AH})
_TCP_CWR: Final = 0x80
_TCP_FIN_PSH: Final = 0x09
_TCP_ACK: Final = 0x10
_TCP_PSH: Final = 0x08
# What we put in front of a packet we write: no GSO, and no claim about its checksum, so the
# kernel verifies it as it would for any received packet.
_VNET_PLAIN: Final = bytes(VNET_HDR_LEN)
# Segments per merged run: a merged run is written by one writev() of its headers and each
# payload, and IOV_MAX is 1024. 64 binds only below 1 KiB a segment (64 KiB at MTU 1420 is 48).
_MAX_RUN: Final = 64
# Bound once: a module attribute or a format string looked up per packet shows in the
# instruction count of the data path (bench/instr_bench.py).
_read: Final = os.read
_write: Final = os.write
_writev: Final = os.writev
_VNET_HEADER: Final = struct.Struct("<BBHHHH")
_U16_PAIR: Final = struct.Struct("<HH")
_U16_TRIPLE: Final = struct.Struct("<HHH")
# Inner packets must fit a WireGuard message in one 65535-byte stream frame (16-byte header,
# up to 15 bytes of padding, 16-byte tag).
GSO_MAX_SIZE: Final = 65000
# The TUN's gso_max_size: as large as the kernel's super-packets get (GSO_LEGACY_MAX_SIZE), so
# that it hands over whole what it forwards to us (a NIC's GRO, a veth, make them up to 64 KiB).
# At GSO_MAX_SIZE it cut every larger one into segments before our read: the parent's
# downloads took the per-packet path (bench/README.md, thirty-second round). What does not fit
# a message is cut into super-packets that do (Device._read_for_peer).
READ_GSO_MAX_SIZE: Final = 65536
_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_SIOCGIFMTU: Final = 0x8921
_SIOCSIFMTU: Final = 0x8922
_SIOCGIFINDEX: Final = 0x8933
_SIOCGIFTXQLEN: Final = 0x8942
_SIOCSIFTXQLEN: Final = 0x8943
_IFF_UP: Final = 0x1
# rtnetlink (<linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>).
_NLMSGHDR: Final = struct.Struct("=IHHII")
_IFINFOMSG: Final = struct.Struct("=BxHiII")
_RTATTR_U32: Final = struct.Struct("=HHI")
_RTATTR: Final = struct.Struct("=HH")
_RTM_GETLINK: Final = 18
_IFLA_IFNAME: Final = 3
_IFLA_LINKINFO: Final = 18
_IFLA_INFO_DATA: Final = 2
_IFLA_TUN_PI: Final = 4
_NLA_TYPE_MASK: Final = 0x3FFF
_RTM_NEWLINK: Final = 16
_RTM_DELLINK: Final = 17
_RTMGRP_LINK: Final = 0x1
_SO_RCVBUFFORCE: Final = 33  # <asm-generic/socket.h>; not in Python's socket module
# Room for the link announcements of a busy namespace while the timer thread is in a send.
_LINK_EVENTS_BUFFER: Final = 1 << 20
_NLMSG_ERROR: Final = 2
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_IFLA_GSO_MAX_SIZE: Final = 41

_IFNAMSIZ: Final = 16
# struct ifreq is 40 bytes on Linux: a 16-byte name and a 24-byte union.
_IFREQ_SHORT: Final = "16sH22x"
_IFREQ_INT: Final = "16si20x"
# Tun.read_offload hands out a packet as a view, not a copy, when it read more than this.
_VIEW_FROM: Final = 2048

# Segmentation and checksums in C (_segment.c), in a compiled build; the functions below are
# the pure build's, and the reference the C is tested against.
_native: ModuleType | None
try:
    from . import _segment as _native
except ImportError as e:
    if e.name not in (f"{__package__}._segment", __package__):
        raise
    _native = None
# Whether cutting super-packets for a peer that takes none costs less than the TUN reads it
# saves (device.py then reads the TUN with offload for every peer, up to MTU 16250).
NATIVE_SEGMENTATION: Final = _native is not None


def _complete_checksum(
    buf: bytes | memoryview, header: int, start: int, offset: int
) -> bytearray:
    """A copy of BUF from HEADER on, with its partial checksum finished (C when built)."""
    if _native is not None:
        return _native.complete_checksum(memoryview(buf)[header:], start, offset)
    return py_complete_checksum(buf, header, start, offset)


def py_complete_checksum(
    buf: bytes | memoryview, header: int, start: int, offset: int
) -> bytearray:
    """Finishes a checksum the kernel left partial (CHECKSUM_PARTIAL): the field already holds
    the pseudo-header sum, so the one's complement sum of everything from `start` is the
    checksum's complement. That sum is the big-endian integer modulo 0xFFFF (2^16 = 1 mod
    0xFFFF), which int.from_bytes and % compute at C speed for a 64 KiB segment."""
    packet = bytearray(buf[header:])
    tail = memoryview(packet)[start:]
    value = _fold(int.from_bytes(tail, "big") << (8 * (len(tail) & 1)))
    at = start + offset
    packet[at] = value >> 8
    packet[at + 1] = value & 0xFF
    return packet


def complete_checksum(packet: bytes | memoryview, start: int, offset: int) -> bytearray:
    """A copy of a packet from Tun.read_offload with its partial checksum finished."""
    return _complete_checksum(packet, 0, start, offset)


def _fold(total: int) -> int:
    """The one's complement checksum field for a sum taken modulo 0xFFFF (see above)."""
    return ~(total % 0xFFFF) & 0xFFFF


def split_tso(
    packet: bytes | bytearray | memoryview, l4: int, mss: int, partial: bool = False
) -> list[bytearray]:
    """py_split_tso's result, from C when built (_segment.c)."""
    if _native is not None:
        return _native.split_tso(packet, l4, mss, partial)
    return py_split_tso(packet, l4, mss, partial)


def space_ipv4_ids(pieces: list[bytearray], segments: int) -> None:
    """Gives the IPv4 super-packets that split_tso cut from one in runs of `segments` whole
    segments the IDs their segments had: split_tso numbers its pieces one apart, as it does
    segments, but the receiver's kernel numbers a piece's segments on from the piece's ID, so
    piece i must start at the first's plus i * segments. One apart, the segments of
    neighbouring pieces went out with the same IDs (only harmless while DF is set: without
    it a fragment of one could be reassembled with another's)."""
    if segments < 2 or len(pieces) < 2 or pieces[0][0] >> 4 != 4:
        return
    first = (pieces[0][4] << 8) | pieces[0][5]
    ihl = (pieces[0][0] & 0x0F) * 4
    for i in range(1, len(pieces)):
        p = pieces[i]
        ip_id = (first + i * segments) & 0xFFFF
        p[4] = ip_id >> 8
        p[5] = ip_id & 0xFF
        p[10] = p[11] = 0
        p[10:12] = _fold(int.from_bytes(p[:ihl], "big")).to_bytes(2, "big")


def py_split_tso(
    packet: bytes | bytearray | memoryview, l4: int, mss: int, partial: bool = False
) -> list[bytearray]:
    """Cuts a TCP super-packet (IPv4 or IPv6, TCP header at offset `l4`) into packets of at
    most `mss` payload bytes, as the kernel's own segmentation would: each gets its own length,
    IPv4 ID and header checksum, sequence number and a complete TCP checksum, so it is valid
    on its own. FIN and PSH stay on the last segment only, CWR on the first only.

    `partial`: each piece's TCP checksum is left partial instead (the pseudo-header's sum for
    its length, as the kernel leaves it), for a receiver that has its kernel finish it
    (CAP_PARTIAL_CSUM): the pieces of a super-packet cut to fit a message, which such a peer
    writes to its TUN with VIRTIO_NET_HDR_F_NEEDS_CSUM (Tun.write), so a pass over the
    payload here would be thrown away.

    The incoming TCP checksum is ignored (with TSO the kernel leaves it partial).
    """
    view = memoryview(packet)
    version = view[0] >> 4
    thl = (view[l4 + 12] >> 4) * 4
    hlen = l4 + thl
    payload = view[hlen:]
    if version == 4:
        addresses = int.from_bytes(view[12:20], "big")
        ip_id = int.from_bytes(view[4:6], "big")
    elif l4 == 40:
        addresses = int.from_bytes(view[8:40], "big")
        ip_id = 0
    else:
        addresses = int.from_bytes(view[8:24].tobytes() + _final_destination(view, l4), "big")
        ip_id = 0
    seq = int.from_bytes(view[l4 + 4 : l4 + 8], "big")
    flags = view[l4 + 13]
    header = bytearray(view[:hlen])
    header[l4 + 16] = header[l4 + 17] = 0
    if version == 4:
        header[10] = header[11] = 0
    out: list[bytearray] = []
    last = max(len(payload) - 1, 0) // mss
    for i, at in enumerate(range(0, max(len(payload), 1), mss)):
        chunk = payload[at : at + mss]
        seg = header + chunk
        total = len(seg)
        if version == 4:
            seg[2:4] = total.to_bytes(2, "big")
            seg[4:6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            seg[10:12] = _fold(int.from_bytes(seg[:l4], "big")).to_bytes(2, "big")
        else:
            seg[4:6] = (total - 40).to_bytes(2, "big")
        seg[l4 + 4 : l4 + 8] = ((seq + at) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if i:
            f &= ~_TCP_CWR
        if i != last:
            f &= ~_TCP_FIN_PSH
        seg[l4 + 13] = f
        tcp_len = total - l4
        # Pseudo-header (addresses, protocol, length) plus the segment, all modulo 0xFFFF.
        s = addresses + _IPPROTO_TCP + tcp_len
        if partial:
            value = s % 0xFFFF or 0xFFFF  # the sum itself, folded as _segment.c folds it
        else:
            tcp = memoryview(seg)[l4:]
            value = _fold(s + (int.from_bytes(tcp, "big") << (8 * (tcp_len & 1))))
        seg[l4 + 16 : l4 + 18] = value.to_bytes(2, "big")
        out.append(seg)
    return out


def _final_destination(view: memoryview, l4: int) -> bytes:
    """The destination an IPv6 packet's TCP checksum covers (RFC 8200, 8.1): the final one,
    which a routing header with segments left names in place of the IPv6 header's. Its
    extension headers end at `l4`."""
    dst = view[24:40]
    nh, at = view[6], 40
    while at + 8 <= l4 and nh in _IPV6_EXTENSIONS:
        size = (view[at + 1] + 2) * 4 if nh == _IPV6_AH else (view[at + 1] + 1) * 8
        if nh == _IPV6_ROUTING and view[at + 3] and size >= 24 and at + size <= l4:
            kind = view[at + 2]
            if kind in (0, 2):  # a list of addresses, the final one last
                dst = view[at + size - 16 : at + size]
            elif kind == 4:  # a segment routing header: Segment List[0], the final one, first
                dst = view[at + 8 : at + 24]
        nh = view[at]
        at += size
    return dst.tobytes()


def _mergeable(p: bytes | bytearray) -> int:
    """The header length (IP and TCP) of a packet coalesce_tcp may merge with others: a plain
    TCP packet (tcp_offset) with a payload, flags ACK and at most PSH, and on IPv4 no
    options. Else 0."""
    l4 = tcp_offset(p)
    if not l4 or (l4 != 20 and p[0] >> 4 == 4) or p[l4 + 13] & ~_TCP_PSH != _TCP_ACK:
        return 0
    hlen = l4 + (p[l4 + 12] >> 4) * 4
    return hlen if len(p) > hlen else 0


def _run_mask(l4: int, hlen: int) -> tuple[int, int]:
    """For comparing the headers (`hlen` bytes, TCP at `l4`) of consecutive segments as one
    big-endian integer: (mask, shift). The mask keeps every bit segmentation copies unchanged
    and the sequence number, and clears what it sets per segment: the IP lengths, the IPv4 ID
    and header checksum, PSH and the TCP checksum. `shift` places a sequence number in that
    integer. One masked comparison per segment, instead of a tuple of header slices and the
    sequence number parsed on its own: a third of what the receiving thread spent merging at
    MTU 1420."""
    got = _RUN_MASKS.get((l4, hlen))
    if got is None:
        mask = bytearray(b"\xff" * hlen)
        varying = ((2, 6), (10, 12)) if l4 == 20 else ((4, 6),)
        for a, b in (*varying, (l4 + 16, l4 + 18)):
            mask[a:b] = bytes(b - a)
        mask[l4 + 13] = 0xFF & ~_TCP_PSH
        got = _RUN_MASKS[l4, hlen] = (_from_bytes(mask), 8 * (hlen - l4 - 8))
    return got


_RUN_MASKS: Final[dict[tuple[int, int], tuple[int, int]]] = {}
_from_bytes: Final = int.from_bytes


def coalesce_tcp(
    packets: Sequence[bytes | bytearray], limit: int = GSO_MAX_SIZE
) -> list[tuple[bytes | bytearray, list[memoryview], int]]:
    """Merges runs of consecutive in-order segments of one TCP flow into super-packets, as the
    kernel's GRO would, so a batch reaches the TUN in a few writes. A merged run comes back as
    (headers, payloads, segment size): its first segment's headers, the lengths (and IPv4
    header checksum) set and the last segment's PSH, then views of every segment's payload,
    for one writev() (no 64 KiB buffer to fill: copying the payloads together, into memory
    the allocator had just returned to the kernel, cost more than the write itself). A packet
    left as it was comes back as (packet, [], 0).

    All segments of a run but the last have the first one's payload size; a run ends after a
    shorter segment or one with PSH, and at _MAX_RUN segments (writev takes at most IOV_MAX
    pieces). The merged TCP checksum is left for the GSO write to set. The segments' own TCP
    checksums are not verified: the AEAD has authenticated every inner packet, which is also
    why kernel WireGuard marks them CHECKSUM_UNNECESSARY.
    """
    out: list[tuple[bytes | bytearray, list[memoryview], int]] = []
    i, n = 0, len(packets)
    while i < n:
        first = packets[i]
        hlen = _mergeable(first)
        i += 1
        l4 = 20 if hlen and first[0] >> 4 == 4 else 40
        # (A packet alone, or ending its run, is the common case outside bulk transfers:
        # it is not worth the headers as an integer.)
        if not hlen or i >= n or first[l4 + 13] & _TCP_PSH:
            out.append((first, [], 0))
            continue
        size = len(first) - hlen
        total = len(first)
        flags = first[l4 + 13]
        mask, shift = _run_mask(l4, hlen)
        headers = _from_bytes(first[:hlen])
        seq = headers >> shift & 0xFFFFFFFF
        # What every later segment's masked headers must be, but for its sequence number.
        # (_mergeable(first) vouches for the fields compared: no fragment, flags ACK.)
        key = headers & mask & ~(0xFFFFFFFF << shift)
        run = [first]
        while not flags & _TCP_PSH and i < n and len(run) < _MAX_RUN:
            q = packets[i]
            qsize = len(q) - hlen
            seq = (seq + len(run[-1]) - hlen) & 0xFFFFFFFF
            if (
                not 0 < qsize <= size
                or total + qsize > limit
                or _from_bytes(q[:hlen]) & mask != key | seq << shift
            ):
                break
            run.append(q)
            total += qsize
            flags = q[l4 + 13]
            i += 1
            if qsize < size:
                break
        if len(run) == 1:
            out.append((first, [], 0))
            continue
        head = bytearray(first[:hlen])
        head[l4 + 13] = flags
        if l4 == 20:
            head[2:4] = total.to_bytes(2, "big")
            head[10] = head[11] = 0
            head[10:12] = _fold(int.from_bytes(head[:20], "big")).to_bytes(2, "big")
        else:
            head[4:6] = (total - 40).to_bytes(2, "big")
        out.append((head, [memoryview(p)[hlen:] for p in run], size))
    return out


def _pseudo_sum(packet: bytes | bytearray, l4: int, length: int) -> int:
    """The TCP pseudo-header sum modulo 0xFFFF (what a partial checksum field holds) of a
    packet of `length` bytes."""
    # By the version, not by `l4`: an IPv4 header with options can be 40 bytes long too.
    if packet[0] >> 4 == 6:
        addresses = int.from_bytes(packet[8:40], "big")
    else:
        addresses = int.from_bytes(packet[12:20], "big")
    return (addresses + _IPPROTO_TCP + length - l4) % 0xFFFF


def tcp_offset(packet: bytes | bytearray) -> int:
    """The TCP header's offset in a plain (unfragmented, no IPv6 extension headers) TCP
    packet, else 0."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        # (Below 20 bytes is no IPv4 header; the kernel refuses such a checksum offset.)
        if ihl < 20 or packet[9] != _IPPROTO_TCP or packet[6] & 0x3F or packet[7]:
            return 0
    elif version == 6:
        ihl = 40
        if packet[6] != _IPPROTO_TCP:
            return 0  # extension headers: not worth the parsing here
    else:
        return 0
    if len(packet) < ihl + 20 or packet[ihl + 12] >> 4 < 5:
        return 0
    return ihl


def parse_offload(buf: bytes) -> tuple[bytes | memoryview, int, int, int]:
    """Tun.read_offload's result for `buf`, a read with its virtio-net header (the send lane
    hands back one it read, device/_lane.c)."""
    packet = memoryview(buf)[VNET_HDR_LEN:] if len(buf) > _VIEW_FROM else buf[VNET_HDR_LEN:]
    if not buf[0] & _VNET_F_NEEDS_CSUM:
        return packet, 0, 0, 0
    mss, start, offset = _U16_TRIPLE.unpack_from(buf, 4)
    if buf[1] & ~_GSO_ECN not in (_GSO_TCPV4, _GSO_TCPV6):
        mss = 0
    return packet, mss, start, offset


def _offload_header(
    packet: bytes | bytearray, mtu: int, mss: int = 0, length: int = 0
) -> list[bytes | bytearray | memoryview] | None:
    """What to write, after a virtio-net header, for a TCP packet the kernel must finish: one
    longer than the MTU, or than one segment of `mss` payload bytes when given, becomes a
    segmentation job cut into segments of that size (never above the MTU), as the kernel
    does with its own TSO packets; one whose checksum field holds the pseudo-header sum (a
    peer that negotiated CAP_PARTIAL_CSUM left it partial) gets the checksum computed by the
    kernel. The header first, then the packet (its headers copied and changed where need be,
    never its payload). None: write the packet as it is.

    `length`: the whole packet's, when `packet` is only the headers of a run coalesce_tcp
    merged (it is then changed in place, and `mss` is the run's segment size).

    Recognising a partial checksum by its value is safe: a complete checksum that happens to
    equal the pseudo-header sum is recomputed to the same value.
    """
    ihl = tcp_offset(packet)
    if not ihl:
        return None
    at = ihl + 16
    length = length or len(packet)
    pseudo = _pseudo_sum(packet, ihl, length)
    partial = (packet[at] << 8 | packet[at + 1]) % 0xFFFF == pseudo
    if length <= mtu and not mss:
        if not partial:
            return None
        return [_VNET_HEADER.pack(_VNET_F_NEEDS_CSUM, 0, 0, 0, ihl, 16), packet]
    thl = (packet[ihl + 12] >> 4) * 4
    mss = min(mss, mtu - ihl - thl) if mss else mtu - ihl - thl
    if mss <= 0:
        return None
    if length <= ihl + thl + mss:  # one segment: nothing to cut
        if not partial:
            return None
        return [_VNET_HEADER.pack(_VNET_F_NEEDS_CSUM, 0, 0, 0, ihl, 16), packet]
    gso_type = _GSO_TCPV4 if packet[0] >> 4 == 4 else _GSO_TCPV6
    if packet[ihl + 13] & _TCP_CWR:
        gso_type |= _GSO_ECN
    header = _VNET_HEADER.pack(_VNET_F_NEEDS_CSUM, gso_type, ihl + thl, mss, ihl, 16)
    if partial:
        return [header, packet]
    # A GSO packet must carry a partial checksum (CHECKSUM_PARTIAL): the kernel completes it
    # per segment.
    if length == len(packet):
        head = bytearray(packet[: ihl + thl])
        head[at : at + 2] = pseudo.to_bytes(2, "big")
        return [header, head, memoryview(packet)[ihl + thl :]]
    assert isinstance(packet, bytearray)  # a merged run's headers, ours to change
    packet[at : at + 2] = pseudo.to_bytes(2, "big")
    return [header, packet]


# An ordinary Python class even when this module is compiled: mypyc cannot subclass OSError.
@mypyc_attr(native_class=False)
class TunError(OSError):
    """A TUN device could not be created or configured; the message says why."""


def _encode_name(name: str) -> bytes:
    """NAME as the kernel takes it, or a ValueError saying why it would not: TUNSETIFF's
    EINVAL does not (Linux's dev_valid_name and dev_alloc_name are the rules)."""
    raw = name.encode(errors="surrogateescape")
    if not raw or len(raw) >= _IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1-{_IFNAMSIZ - 1} bytes")
    why = None
    if name in (".", ".."):
        why = "is a directory name"
    elif name in ("all", "default"):
        why = f"is reserved ('{name}' names net.ipv4.conf.{name}, not an interface)"
    elif b"/" in raw or b":" in raw:
        why = f"contains {'/' if b'/' in raw else ':'!r}"
    elif any(c in b"\t\n\v\f\r \xa0" for c in raw):  # the kernel's isspace(), 0xa0 too
        why = "contains whitespace"
    elif any(c < 0x20 or c == 0x7F for c in raw):
        why = "contains a control character"
    elif b"%" in raw and (raw.count(b"%") > 1 or b"%d" not in raw):
        why = "misuses '%': it is allowed only once, as %d (the kernel then picks a number)"
    if why is not None:
        raise ValueError(f"interface name {name!r} {why}; use letters, digits, '_', '.' "
                         "and '-', e.g. wg0")
    return raw


def adoptable(fd: int, name: str) -> bool:
    """Whether FD, a TUN descriptor attached to interface `name` as Tun reads it (IFF_TUN and
    IFF_NO_PI: IP packets with no header before them), has a virtio-net header too
    (IFF_VNET_HDR). Raises TunError saying what FD is instead, in words that follow "FD"."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise TunError(e.errno, "is not an open file descriptor") from e
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev),
                                         os.minor(st.st_rdev)) != _TUN_DEVICE:
        raise TunError(errno.ENOTTY, f"is not a TUN device ({_TUN_PATH})")
    try:
        res = fcntl.ioctl(fd, _TUNGETIFF, bytes(40))
    except OSError as e:
        if e.errno == errno.EBADFD:
            raise TunError(e.errno, f"is {_TUN_PATH} attached to no interface (TUNSETIFF was "
                           "not done, or its interface was deleted)") from e
        raise TunError(e.errno, f"is a TUN device that TUNGETIFF fails on: {e.strerror}") from e
    raw, flags = struct.unpack(_IFREQ_SHORT, res)
    actual = raw.rstrip(b"\0").decode(errors="surrogateescape")
    if flags & _IFF_TAP:
        why = "is a TAP device (Ethernet frames); create it with IFF_TUN, for IP packets"
    elif _elsewhere(fd):
        # TUNGETIFF names it all the same, and that name would be configured here: another
        # interface of that name, or none.
        why = (f"is the TUN of interface {actual!r} in another network namespace than this "
               "process's; start the daemon in the namespace the TUN was made in (e.g. "
               "ip netns exec NS), or make the TUN in the daemon's")
    elif actual != name:
        why = (f"is the TUN of interface {actual!r}, not {name!r} as the command line names "
               "it: name the interface the TUN was made for")
    elif _packet_info(name):
        why = ("is a TUN made without IFF_NO_PI (a packet information header before every "
               "packet); create it with IFF_TUN|IFF_NO_PI")
    elif flags & _IFF_VNET_HDR and (size := _vnet_hdr_size(fd)) != VNET_HDR_LEN:
        # Read and written as VNET_HDR_LEN bytes: every packet would be taken off by the rest.
        why = (f"is a TUN whose virtio-net header is {size} bytes (TUNSETVNETHDRSZ), not "
               f"{VNET_HDR_LEN}; leave it at its default")
    else:
        return bool(flags & _IFF_VNET_HDR)
    raise TunError(errno.EINVAL, why)


def _vnet_hdr_size(fd: int) -> int:
    res = fcntl.ioctl(fd, _TUNGETVNETHDRSZ, bytes(4))
    return int(struct.unpack("=i", res)[0])


def _elsewhere(fd: int) -> bool:
    """Whether the TUN on FD belongs to another network namespace than the calling thread
    (which the control socket and netlink queries are opened in)."""
    try:
        ns = fcntl.ioctl(fd, _TUNGETDEVNETNS)
    except OSError:
        # Linux before 5.2 (ENOTTY, EINVAL), or no CAP_NET_ADMIN over the device's namespace
        # (EPERM: an unprivileged daemon, in ours too): it cannot be told, as before.
        return False
    try:
        theirs = os.fstat(ns)
    finally:
        os.close(ns)
    ours = os.stat("/proc/thread-self/ns/net")
    return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)


def _packet_info(name: str) -> bool:
    """Whether the TUN interface NAME of the caller's namespace puts a packet information
    header before every packet (rtnetlink's IFLA_TUN_PI, Linux 4.15 on; False where it is not
    told). TUNGETIFF cannot say: it reports IFF_NOFILTER in IFF_NO_PI's bit."""
    raw = name.encode(errors="surrogateescape") + b"\0"
    attr = _RTATTR.pack(_RTATTR.size + len(raw), _IFLA_IFNAME) + raw
    attr += bytes(-len(attr) % 4)
    reply = _rtnl(_RTM_GETLINK, _NLM_F_REQUEST,
                  _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr)
    _, kind = struct.unpack_from("=IH", reply)
    if kind != _RTM_NEWLINK:
        return False
    link = _rtattrs(reply[_NLMSGHDR.size + _IFINFOMSG.size :])
    data = _rtattrs(_rtattrs(link.get(_IFLA_LINKINFO, b"")).get(_IFLA_INFO_DATA, b""))
    return data.get(_IFLA_TUN_PI, b"\0")[:1] != b"\0"


def _rtnl(kind: int, flags: int, body: bytes) -> bytes:
    """One rtnetlink request from the caller's namespace and the first reply to it: straight
    netlink rather than pyroute2, whose import alone would cost the daemon about 20 MiB."""
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5.0)
        nl.sendto(msg, (0, 0))
        return nl.recv(65536)


def _rtattrs(buf: bytes) -> dict[int, bytes]:
    """Netlink attributes (struct rtattr) by type, nested ones as their bytes."""
    out: dict[int, bytes] = {}
    at = 0
    while at + _RTATTR.size <= len(buf):
        length, kind = _RTATTR.unpack_from(buf, at)
        if length < _RTATTR.size:
            break
        out[kind & _NLA_TYPE_MASK] = buf[at + _RTATTR.size : at + length]
        at += (length + 3) & ~3
    return out


class Tun:
    """An open TUN interface. Reads and writes are whole IP packets."""

    def __init__(self, fd: int, name: str, ctl: socket.socket, vnet: bool = False) -> None:
        self._fd = fd
        self.name = name
        # With a virtio-net header the kernel hands us TCP segments of up to GSO_MAX_SIZE
        # bytes (TSO) instead of MTU-sized packets: far fewer packets to encrypt one by one.
        self.vnet = vnet
        # Whether reads may give super-packets and partial checksums now (set_offload).
        self.offloading = vnet
        # Packets longer than this are handed to the kernel as TCP segmentation jobs, so that
        # a super-packet from the peer can still be forwarded out an ordinary interface. The
        # device keeps it equal to the interface MTU.
        self.mtu_hint = 65535
        self._ctl = ctl
        self._close_lock = threading.Lock()
        self._closed = False

    @classmethod
    def create(cls, name: str, *, offload: bool = False) -> Tun:
        """Create (or attach to) the TUN interface `name` in the caller's network namespace.

        `offload` asks for TCP segmentation offload: reads may then return IP packets larger
        than the MTU (up to GSO_MAX_SIZE), with checksums completed here. The caller must set
        the interface's gso_max_size to GSO_MAX_SIZE.
        """
        raw = _encode_name(name)
        try:
            fd = os.open(_TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise TunError(
                e.errno,
                f"{_TUN_PATH} does not exist: the kernel has no TUN support "
                "(CONFIG_TUN) or the device node was not created",
            ) from e
        except PermissionError as e:
            raise TunError(
                e.errno, f"permission denied opening {_TUN_PATH}: root or CAP_NET_ADMIN is needed"
            ) from e
        except OSError as e:
            raise TunError(e.errno, f"cannot open {_TUN_PATH}: {e.strerror}") from e
        try:
            flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
            ifr = struct.pack(_IFREQ_SHORT, raw, flags)
            try:
                res = fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except OSError as e:
                if e.errno == errno.EPERM:
                    msg = f"creating TUN {name!r}: operation not permitted (CAP_NET_ADMIN needed)"
                elif e.errno == errno.EBUSY:
                    msg = f"creating TUN {name!r}: interface is busy (already attached elsewhere)"
                elif e.errno == errno.EINVAL:
                    msg = f"creating TUN {name!r}: an interface of another type has this name"
                else:
                    msg = f"creating TUN {name!r}: TUNSETIFF failed: {e.strerror}"
                raise TunError(e.errno, msg) from e
            # The kernel may expand a pattern such as "wg%d"; keep the name it chose.
            actual = struct.unpack(_IFREQ_SHORT, res)[0].rstrip(b"\0").decode()
            if offload:
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _OFFLOAD_ALL)
            ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual, ctl, vnet=offload)

    @classmethod
    def adopt(cls, fd: int, name: str) -> Tun:
        """The TUN interface `name` from FD, /dev/net/tun attached to it by the process that
        started us (WG_TUN_FD, as wireguard-go takes one); see adoptable(). The Tun owns FD:
        closing it closes FD. The flags are the launcher's and cannot change: with a
        virtio-net header (IFF_VNET_HDR) it is as create(offload=True) makes it, without as
        create() does."""
        vnet = adoptable(fd, name)
        ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if vnet:
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _OFFLOAD_ALL)
            os.set_inheritable(fd, False)
        except BaseException:
            ctl.close()
            raise
        return cls(fd, name, ctl, vnet=vnet)

    def fileno(self) -> int:
        return self._fd

    def read(self, bufsize: int = 65535) -> bytes | bytearray:
        """One packet (blocking unless set_blocking(False) was called)."""
        if not self.vnet:
            return _read(self._fd, bufsize)
        buf = _read(self._fd, bufsize + VNET_HDR_LEN)
        if buf[0] & _VNET_F_NEEDS_CSUM:
            start, offset = _U16_PAIR.unpack_from(buf, 6)
            return _complete_checksum(buf, VNET_HDR_LEN, start, offset)
        return buf[VNET_HDR_LEN:]

    def read_offload(self, bufsize: int = 65535) -> tuple[bytes | memoryview, int, int, int]:
        """One packet as the kernel handed it, its checksum left as it was: (packet, mss,
        csum_start, csum_offset). mss > 0 for a TCP super-packet (to cut with split_tso at
        csum_start, or send whole to a peer that takes it); csum_start > 0 when the checksum
        is partial (finish it with complete_checksum, or leave it to a peer that does).
        Only with offload (vnet) on. When the read (header included) was above _VIEW_FROM
        bytes the packet is a view past the virtio-net header, else a copy: copying 8920
        bytes took 8.5k instructions, but below about 2 KiB the view costs more further on
        (bytes are indexed and sized in C by compiled code, a view through calls) than the
        copy saves."""
        return parse_offload(_read(self._fd, bufsize + VNET_HDR_LEN))

    def read_segments(self, bufsize: int = 65535) -> list[bytearray] | list[bytes]:
        """Like read(), but a TCP super-packet comes back cut into MTU-sized packets (its
        `gso_size`), for transports whose messages must fit the path MTU."""
        if not self.vnet:
            return [_read(self._fd, bufsize)]
        buf = _read(self._fd, bufsize + VNET_HDR_LEN)
        if buf[1] & ~_GSO_ECN in (_GSO_TCPV4, _GSO_TCPV6):
            mss, l4 = _U16_PAIR.unpack_from(buf, 4)
            return split_tso(memoryview(buf)[VNET_HDR_LEN:], l4, mss)
        if buf[0] & _VNET_F_NEEDS_CSUM:
            start, offset = _U16_PAIR.unpack_from(buf, 6)
            return [_complete_checksum(buf, VNET_HDR_LEN, start, offset)]
        return [buf[VNET_HDR_LEN:]]

    def write(self, packet: bytes | bytearray, partial_csum: bool = True, mss: int = 0) -> None:
        """Writes one packet. With offload, a TCP packet whose checksum was left partial is
        marked for the kernel to finish, and one above the MTU for the kernel to segment:
        in segments of `mss` payload bytes when given (the sender's, which may be finer than
        the MTU; never coarser), else as large as the MTU allows.
        `partial_csum=False` says the sender never leaves a checksum partial (its hello did
        not offer CAP_PARTIAL_CSUM, or it sent none): a packet that fits the MTU then goes
        as it is, without the header parsing and pseudo-header sum that finding one takes."""
        if not self.vnet:
            _write(self._fd, packet)
        elif not partial_csum and not mss and len(packet) <= self.mtu_hint:
            _writev(self._fd, (_VNET_PLAIN, packet))
        elif iov := _offload_header(packet, self.mtu_hint, mss):
            _writev(self._fd, iov)
        else:
            _writev(self._fd, (_VNET_PLAIN, packet))

    def write_batch(self, packets: Sequence[bytes | bytearray], partial_csum: bool = True) -> None:
        """Writes packets in order; with offload, runs of one TCP flow go as one GSO write.
        `partial_csum` as for write()."""
        # One packet the kernel refuses must not cost the rest of the batch: the first error
        # is raised once all were tried.
        failed: OSError | None = None
        if not self.vnet or len(packets) < 2:
            for packet in packets:
                try:
                    self.write(packet, partial_csum)
                except OSError as e:
                    failed = failed or e
            if failed is not None:
                raise failed
            return
        for head, payloads, mss in coalesce_tcp(packets):
            try:
                if not payloads:
                    self.write(head, partial_csum)
                    continue
                # (Super-packets merged, from a peer that sends them, have a segment size
                # above the MTU: _offload_header cuts them at the MTU, or forwarding would
                # refuse them as too big.)
                iov = _offload_header(head, self.mtu_hint, mss,
                                      len(head) + sum(map(len, payloads)))
                if iov is None:  # an MTU below the headers: nothing fits it, so it is dropped
                    continue
                iov += payloads
                _writev(self._fd, iov)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def set_blocking(self, blocking: bool) -> None:
        os.set_blocking(self._fd, blocking)

    def _ifreq(self, fmt: str, request: int, value: int = 0) -> int:
        ifr = struct.pack(fmt, self.name.encode(), value)
        res = fcntl.ioctl(self._ctl.fileno(), request, ifr)
        return struct.unpack(fmt, res)[1]

    def mtu(self) -> int:
        """The current MTU, as the kernel sees it (changes by `ip link set mtu` included)."""
        return self._ifreq(_IFREQ_INT, _SIOCGIFMTU)

    def set_mtu(self, n: int) -> None:
        self._ifreq(_IFREQ_INT, _SIOCSIFMTU, n)

    def set_offload(self, on: bool) -> None:
        """With a virtio-net header (vnet): whether our reads may return TCP super-packets and
        partial checksums. Off, the kernel cuts and checksums TCP in C before we read it,
        which costs far less than split_tso and complete_checksum in Python when the packets
        must go out MTU-sized with complete checksums anyway. Writes take super-packets
        (write_batch) either way."""
        with self._close_lock:  # never an ioctl on a closed (maybe reused) fd number
            if self._closed:
                raise OSError(errno.EBADF, f"TUN {self.name} is closed")
            fcntl.ioctl(self._fd, _TUNSETOFFLOAD, _OFFLOAD_ALL if on else 0)
            self.offloading = on

    def txqueuelen(self) -> int:
        return self._ifreq(_IFREQ_INT, _SIOCGIFTXQLEN)

    def set_txqueuelen(self, n: int) -> None:
        """Sizes the ring of packets the kernel queues for our reads (TUN drops, never
        queues, when it is full)."""
        self._ifreq(_IFREQ_INT, _SIOCSIFTXQLEN, n)

    def set_gso_max_size(self, size: int) -> None:
        """Caps the kernel's super-packets for this interface (IFLA_GSO_MAX_SIZE), with one
        rtnetlink request (_rtnl)."""
        req = _RTATTR_U32.pack(_RTATTR_U32.size, _IFLA_GSO_MAX_SIZE, size)
        reply = _rtnl(_RTM_NEWLINK, _NLM_F_REQUEST | _NLM_F_ACK,
                      _IFINFOMSG.pack(socket.AF_UNSPEC, 0, self.ifindex(), 0, 0) + req)
        _, kind = struct.unpack_from("=IH", reply)
        if kind != _NLMSG_ERROR or len(reply) < _NLMSGHDR.size + 4:
            raise OSError(errno.EPROTO, f"setting gso_max_size on {self.name}: odd reply")
        (error,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
        if error:
            raise OSError(-error, f"setting gso_max_size on {self.name}: {os.strerror(-error)}")

    def set_up(self) -> None:
        # Read-modify-write so flags set by others (e.g. NOARP) survive.
        flags = self._ifreq(_IFREQ_SHORT, _SIOCGIFFLAGS) & 0xFFFF
        if not flags & _IFF_UP:
            self._ifreq(_IFREQ_SHORT, _SIOCSIFFLAGS, flags | _IFF_UP)

    def is_up(self) -> bool:
        return bool(self._ifreq(_IFREQ_SHORT, _SIOCGIFFLAGS) & _IFF_UP)

    def ifindex(self) -> int:
        return self._ifreq(_IFREQ_INT, _SIOCGIFINDEX)

    def exists(self) -> bool:
        """Whether the interface behind this fd still exists.

        Asked of the fd itself (TUNGETIFF fails with EBADFD once the interface was deleted),
        because a lookup by name would be fooled by a new interface of the same name and
        /sys/class/net shows whatever namespace sysfs was mounted in.
        """
        if self._closed:
            return False
        try:
            fcntl.ioctl(self._fd, _TUNGETIFF, bytes(40))
        except OSError as e:
            if e.errno in (errno.EBADFD, errno.ENODEV, errno.EBADF):
                return False
            raise
        return True

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._ctl.close()
            os.close(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<Tun {self.name} {state}>"


@mypyc_attr(allow_interpreted_subclasses=True)
class LinkEvents:
    """An interface's ups and downs as rtnetlink announces them (RTMGRP_LINK), in order: a
    down and an up between two looks at the flags would look like nothing happened, and a
    down must end the sessions all the same. (wireguard-go reads these announcements too,
    but takes a down only from a poll of the flags.) Every interface of the caller's network
    namespace is announced here; the socket is non-blocking, for poll()."""

    def __init__(self, ifindex: int) -> None:
        self._index = ifindex
        self._sock = socket.socket(socket.AF_NETLINK,
                                   socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                   socket.NETLINK_ROUTE)
        try:
            try:  # beyond net.core.rmem_max, which root may do
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _LINK_EVENTS_BUFFER)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LINK_EVENTS_BUFFER)
            self._sock.bind((0, _RTMGRP_LINK))
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> tuple[list[bool | None], bool]:
        """What was announced about the interface since the last read: True for a message
        that finds it up, False down, None removed; and whether some announcements were
        lost (ENOBUFS: the socket's buffer overflowed), after which only its flags now
        tell its state."""
        states: list[bool | None] = []
        lost = False
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return states, lost
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                lost = True
                continue
            offset = 0
            while offset + _NLMSGHDR.size + _IFINFOMSG.size <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < _NLMSGHDR.size:
                    break
                if kind in (_RTM_NEWLINK, _RTM_DELLINK):
                    _, _, index, flags, _ = _IFINFOMSG.unpack_from(data, offset + _NLMSGHDR.size)
                    if index == self._index:
                        states.append(None if kind == _RTM_DELLINK else bool(flags & _IFF_UP))
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
