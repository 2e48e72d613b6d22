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

    def __init__(self, fd: int, name: str, ctl: socket.socket) -> None:
        self._fd = fd
        self.name = name
        self._ctl = ctl
        self._close_lock = threading.Lock()
        self._closed = False

    @classmethod
    def create(cls, name: str) -> Tun:
        """Create (or attach to) the TUN interface `name` in the caller's network namespace."""
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
            ifr = struct.pack(_IFREQ_SHORT, raw, _IFF_TUN | _IFF_NO_PI)
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
            ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual, ctl)

    def fileno(self) -> int:
        return self._fd

    def read(self, bufsize: int = 65535) -> bytes:
        """Block until one packet arrives and return it."""
        return os.read(self._fd, bufsize)

    def write(self, packet: bytes) -> None:
        os.write(self._fd, packet)

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
