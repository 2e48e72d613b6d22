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
import struct
import threading

__all__ = ["Tun", "TunError"]

_TUN_PATH = "/dev/net/tun"

# From <linux/if_tun.h> and <linux/sockios.h>.
_TUNSETIFF = 0x400454CA
_TUNGETIFF = 0x800454D2
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
_TUN_F_TSO6 = 0x04
# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR_LEN = 10
_VNET_F_NEEDS_CSUM = 1
_GSO_TCPV4 = 1
_GSO_TCPV6 = 4
_GSO_ECN = 0x80
_IPPROTO_TCP = 6
_TCP_CWR = 0x80
# What we put in front of a packet we write: no GSO, and no claim about its checksum, so the
# kernel verifies it as it would for any received packet.
_VNET_PLAIN = bytes(VNET_HDR_LEN)
# Inner packets must fit a WireGuard message in one 65535-byte stream frame (16-byte header,
# up to 15 bytes of padding, 16-byte tag).
GSO_MAX_SIZE = 65000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCGIFMTU = 0x8921
_SIOCSIFMTU = 0x8922
_SIOCGIFINDEX = 0x8933
_IFF_UP = 0x1

_IFNAMSIZ = 16
# struct ifreq is 40 bytes on Linux: a 16-byte name and a 24-byte union.
_IFREQ_SHORT = "16sH22x"
_IFREQ_INT = "16si20x"


def _complete_checksum(buf: bytes, header: int, start: int, offset: int) -> bytearray:
    """Finishes a checksum the kernel left partial (CHECKSUM_PARTIAL): the field already holds
    the pseudo-header sum, so the one's complement sum of everything from `start` is the
    checksum's complement. That sum is the big-endian integer modulo 0xFFFF (2^16 = 1 mod
    0xFFFF), which int.from_bytes and % compute at C speed for a 64 KiB segment."""
    packet = bytearray(buf[header:])
    tail = memoryview(packet)[start:]
    total = int.from_bytes(tail, "big") << (8 * (len(tail) & 1))
    value = ~(total % 0xFFFF) & 0xFFFF
    at = start + offset
    packet[at] = value >> 8
    packet[at + 1] = value & 0xFF
    return packet


def _gso_for(packet: bytes, mtu: int) -> tuple[bytes, bytearray] | None:
    """A virtio-net header (and the packet, adjusted) asking the kernel to cut a TCP packet
    longer than the MTU into MTU-sized segments — what it does with its own TSO packets.

    A GSO packet must carry a partial checksum (CHECKSUM_PARTIAL): the TCP checksum field is
    set to the pseudo-header sum and the kernel completes it per segment. None when the packet
    is not plain TCP over IPv4/IPv6 (it is then written as is).
    """
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != _IPPROTO_TCP or len(packet) < ihl + 20:
            return None
        addresses, gso_type = packet[12:20], _GSO_TCPV4
    elif version == 6:
        ihl = 40
        if packet[6] != _IPPROTO_TCP or len(packet) < ihl + 20:
            return None  # extension headers: not worth the parsing here
        addresses, gso_type = packet[8:40], _GSO_TCPV6
    else:
        return None
    tcp_len = len(packet) - ihl
    thl = (packet[ihl + 12] >> 4) * 4
    mss = mtu - ihl - thl
    if mss <= 0 or thl < 20:
        return None
    if packet[ihl + 13] & _TCP_CWR:
        gso_type |= _GSO_ECN
    pseudo = (int.from_bytes(addresses, "big") + _IPPROTO_TCP + tcp_len) % 0xFFFF
    adjusted = bytearray(packet)
    adjusted[ihl + 16] = pseudo >> 8
    adjusted[ihl + 17] = pseudo & 0xFF
    header = struct.pack("<BBHHHH", _VNET_F_NEEDS_CSUM, gso_type, ihl + thl, mss, ihl, 16)
    return header, adjusted


class TunError(OSError):
    """A TUN device could not be created or configured; the message says why."""


def _encode_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= _IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1-{_IFNAMSIZ - 1} bytes")
    if b"/" in raw or b"\0" in raw or any(c <= 0x20 for c in raw) or name in (".", ".."):
        raise ValueError(f"interface name {name!r} contains characters the kernel refuses")
    return raw


class Tun:
    """An open TUN interface. Reads and writes are whole IP packets."""

    def __init__(self, fd: int, name: str, ctl: socket.socket, vnet: bool = False) -> None:
        self._fd = fd
        self.name = name
        # With a virtio-net header the kernel hands us TCP segments of up to GSO_MAX_SIZE
        # bytes (TSO) instead of MTU-sized packets: far fewer packets to encrypt one by one.
        self.vnet = vnet
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
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
            ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual, ctl, vnet=offload)

    def fileno(self) -> int:
        return self._fd

    def read(self, bufsize: int = 65535) -> bytes | bytearray:
        """One packet (blocking unless set_blocking(False) was called)."""
        if not self.vnet:
            return os.read(self._fd, bufsize)
        buf = os.read(self._fd, bufsize + VNET_HDR_LEN)
        if buf[0] & _VNET_F_NEEDS_CSUM:
            start, offset = struct.unpack_from("<HH", buf, 6)
            return _complete_checksum(buf, VNET_HDR_LEN, start, offset)
        return buf[VNET_HDR_LEN:]

    def write(self, packet: bytes) -> None:
        if not self.vnet:
            os.write(self._fd, packet)
        elif len(packet) > self.mtu_hint and (gso := _gso_for(packet, self.mtu_hint)):
            os.writev(self._fd, gso)
        else:
            os.writev(self._fd, (_VNET_PLAIN, packet))

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
