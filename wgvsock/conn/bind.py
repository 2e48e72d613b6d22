"""The transport interface ("bind", as in wireguard-go's conn.Bind) and plumbing the binds share.

Concurrency model: every socket or connection has one reader thread doing blocking I/O and
handing each whole WireGuard message to the receive callback; sends run on the caller's thread.
A stream connection's reader may also serve the owner's :class:`SharedFile` (the device's TUN),
so one thread carries both directions of the connection.
Nothing here logs or allocates per packet beyond the message itself.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import random
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, TypeAlias

from ..threads import NamedThread
from .endpoint import (
    INET_NETWORKS,
    NETWORKS,
    VMADDR_PORT_ANY,
    Endpoint,
    default_unix_dir,
    format_endpoint,
    parse_endpoint,
    unix_port_path,
)
from .unixsock import remove_stale, socket_dir

__all__ = [
    "Bind",
    "Message",
    "Receiver",
    "SharedFile",
    "SocketBind",
    "TransportUnavailable",
]

log = logging.getLogger("wgvsock.conn")

# A message a bind hands its owner. A stream transport hands a transport message over as a view
# into its receive buffer, which it reuses once the call returns: a receiver copies what it keeps.
Message: TypeAlias = bytes | memoryview
Receiver = Callable[[Message, Endpoint], None]
_NO_CAPS = (0, 0)

# errnos by which a kernel or hypervisor says "no such transport here".
_UNAVAILABLE_ERRNOS = frozenset(
    {
        errno.ENODEV,
        errno.EOPNOTSUPP,
        errno.EAFNOSUPPORT,
        errno.ESOCKTNOSUPPORT,
        errno.EPROTONOSUPPORT,
    }
)

_SO_MARK = getattr(socket, "SO_MARK", 36)  # Linux's value
# Dynamic range, as for IP, when open(0) has to invent a Unix port number.
_UNIX_PORT_RANGE = (49152, 65535)


class TransportUnavailable(OSError):
    """This kernel or hypervisor does not offer the requested socket type."""


class SharedFile(ABC):
    """A file the owner of a bind would otherwise wait on in a thread of its own (the device's
    TUN), offered to the bind's receiving side with what to do when it is readable. A stream
    bind serves it from the reader thread of one trusted connection, which then carries both
    directions of the tunnel: no second thread to wake and no hand-over of the GIL between
    two threads per packet (bench/README.md, twelfth round).

    That thread must keep reading its socket, so its sends never wait: when the kernel cannot
    take one at once, the rest is queued and the file goes back to the owner, whose thread
    then calls Bind.flush() and serves the file itself, waiting in sends as it may; the
    reader takes the file again once nothing is queued."""

    fd: int

    @abstractmethod
    def take(self) -> bool:
        """Whether the calling thread may serve the file now; False while another does."""

    @abstractmethod
    def serve(self, ready: bool) -> bool:
        """One turn of the serving thread, which calls it at least every SHARED_POLL_MS:
        `ready` when poll() found the file readable. False when the file is to be served no
        more (its owner is stopping); the thread then gives it back. Never raises."""

    @abstractmethod
    def give_back(self) -> None:
        """The serving thread stops serving (its connection is gone, or one of its sends
        could not wait)."""


# The longest a thread serving a SharedFile waits in poll() between turns: the owner notes
# each turn, and an idle tunnel must not look like a hung reader (Device.stalled).
SHARED_POLL_MS = 1000


class Bind(ABC):
    network: str
    stream: bool
    # Set by the owner before open(): a transport that receives several messages from one
    # endpoint at once (UDP GRO, one read of a stream) may hand them over together, so they are
    # processed as a batch. The third argument: the CAP_* flags the hello on the connection
    # they came on offered (0 for none, and on a datagram transport), as that connection's
    # sender may have made them, whatever connection the endpoint has by the time they are
    # handled (peer_caps): a dialled one delivers before it is published, and an endpoint's
    # next connection may be another peer's.
    receive_batch: Callable[[list[Message], Endpoint, int], None] | None = None
    # Set by the owner before open(): whether a message from this endpoint has authenticated
    # (it is some peer's current endpoint). A stream bind asks about an inbound connection
    # until the answer is yes, so a valid frame of junk does not make a connection a peer's.
    authenticated: Callable[[Endpoint], bool] | None = None
    # Set by the owner before open(): a stream transport sends this payload (caps.encode_hello)
    # as the first frame on every connection; None sends nothing.
    hello: bytes | None = None
    # Set by the owner before open(): called (from a reader thread) when a connection's peer
    # capabilities change: a hello arrived, or a connection that had one closed.
    caps_changed: Callable[[], None] | None = None
    # Set by the owner before open(): see SharedFile. A transport that cannot serve it from a
    # reader of its own leaves it alone, and the owner keeps serving it.
    shared: SharedFile | None = None
    # Set by the owner before open(): why a stream connection from this accept() address
    # (vsock: (CID, port)) may not come in, or None to let it in. Asked once per connection at
    # accept, before it gets a reader thread or a buffer; a refused one is closed at once. The
    # parent passes its enclave's CID check, the control port's. Datagram binds do not ask.
    refuse_from: Callable[[Any], str | None] | None = None
    # Set by the owner before open(): called with an endpoint and a byte count when messages
    # a stream transport queued while it dialled that endpoint went out on the connection it
    # made (send() did not count them: they might never have gone).
    sent_later: Callable[[Endpoint, int], None] | None = None

    @abstractmethod
    def open(self, port: int, receive: Receiver) -> int:
        """Bind and listen (port 0 = any), start the reader threads, return the actual port."""

    @property
    @abstractmethod
    def is_open(self) -> bool: ...

    @abstractmethod
    def change_port(self, port: int) -> int:
        """Listen on `port` instead (0 = any) and return the actual port. Raises OSError or
        ValueError, with the bind as it was, when that port cannot be had."""

    @abstractmethod
    def check_port(self, port: int) -> None:
        """Raise ValueError if this transport has no such port, as open() would: lets a
        caller refuse a port before it closes the listener it has."""

    @abstractmethod
    def send(self, data: bytes, ep: Endpoint) -> int:
        """Send one WireGuard message. Never raises for network trouble: queues or drops.
        Returns len(data) when the message went to the kernel (or behind what a connection is
        sending), else 0: dropped, or queued for a connection still being made, whose sending
        `sent_later` reports."""

    def send_batch(self, messages: list[bytes], ep: Endpoint) -> int:
        """Send several messages to one endpoint, in order; returns the bytes of those that
        went, as send() counts them. Transports that can hand them to the kernel in one system
        call override this."""
        sent = 0
        for data in messages:
            sent += self.send(data, ep)
        return sent

    def flush(self) -> None:
        """Sends what sends from the thread serving `shared` left queued (they never wait;
        see SharedFile), waiting as send() does. Called by the owner when the file comes
        back to it. A transport that never serves the file has nothing queued."""
        return

    def peer_caps(self, ep: Endpoint) -> tuple[int, int]:
        """(flags, max_packet) from the hello the peer behind `ep` sent on its current
        connection; (0, 0) when it sent none or there is no connection."""
        return _NO_CAPS

    def any_peer_has(self, flags: int) -> bool:
        """Whether some current connection's peer said (in its hello) it takes all of
        `flags`."""
        return False

    def lane_begin(self, ep: Endpoint, flags: int) -> tuple[Any, int, int] | None:
        """For the device's send lane (device/_lane.c), which writes framed messages to a
        socket itself: (hold, fd, max_packet) of the connection to `ep`, whose peer's hello
        offered all of `flags`, held so that nobody else sends on it until lane_end(hold,
        ...). None when the lane may not write there now (nothing is held then): this
        transport has none, or its connection is busy, stalled, or has a queue. The owner
        asks holding its own lock: nothing here may call back into it."""
        return None

    def lane_end(self, hold: Any, unsent: bytes | None, partial: int, error: int) -> int:
        """Ends lane_begin's hold, after the lane wrote to its socket: `unsent` is the frames
        the socket did not take whole (their first `partial` bytes went), sent now as a send
        from this thread would send them; `error` the errno the socket failed with (0: none).
        Returns the bytes of the messages among them that did not go (that the lane counted
        as sent)."""
        return 0

    def handshake_seen(self, ep: Endpoint) -> None:
        """A handshake message from `ep` passed mac1: its sender knows our public key, and may
        be a peer waiting out a cookie reply. A stream transport keeps such a connection a
        while when it has to close one to make room."""
        return

    def peers_changed(self, endpoints: AbstractSet[Endpoint],
                      earlier: AbstractSet[Endpoint] = frozenset()) -> AbstractSet[Endpoint]:
        """The owner's peers or their endpoints were set anew (a UAPI set); `endpoints` are
        those its peers have now or are configured with, `earlier` those they were configured
        with before. A stream transport counts again which of its connections are peers'
        (StreamBind._set_patience), and stops dialling (and closes what it dialled) where no
        peer is any more, and at an earlier endpoint unless a connection it dialled there is
        up. Returns the earlier endpoints it keeps: the owner forgets the others, so that a
        peer re-pointed without end costs no more than the connections that stay."""
        return frozenset()  # no connections: nobody reaches us at an earlier endpoint

    def sessions_ended(self) -> None:
        """The owner's sessions ended (its link went down, its private key changed): nothing
        made with them may be sent. A stream transport stops the diallers that have no
        connection, dropping what they queued; the next send starts a new one."""
        return

    @abstractmethod
    def set_mark(self, mark: int) -> None:
        """The fwmark (SO_MARK) of this transport's IP sockets, now and later ones: wg-quick
        routes everything unmarked into the tunnel, the transport's own packets included
        unless they carry it. Raises OSError, with the mark as it was, when the kernel
        refuses. vsock and Unix sockets are not routed: nothing to mark."""

    @abstractmethod
    def close(self) -> None:
        """Stop threads, close sockets, remove socket files this bind created."""

    @abstractmethod
    def parse_endpoint(self, text: str) -> Endpoint: ...

    @abstractmethod
    def format_endpoint(self, ep: Endpoint) -> str | None: ...

    @abstractmethod
    def status(self) -> dict[str, Any]: ...

    def __enter__(self) -> Bind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RateLimitedLog:
    """Logs at most `burst` lines at once, then one per `interval`; for lines that can repeat
    on every packet or connection. The next line logged says how many were left out.
    Safe to share between threads (the control server's connections each have one)."""

    __slots__ = ("_burst", "_clock", "_interval", "_last", "_lock", "_log", "_suppressed",
                 "_tokens")

    def __init__(
        self, interval: float = 10.0, logger: logging.Logger | None = None, burst: int = 1,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._interval = interval
        self._burst = float(burst)
        self._tokens = float(burst)
        # None: time.monotonic as it is at each call, so a test that patches it still works.
        self._clock = clock
        self._last = self._now()
        self._suppressed = 0
        self._log = logger or log
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        # A line the logger would not show must not use up the budget of one it would.
        if not self._log.isEnabledFor(level):
            return
        with self._lock:
            now = self._now()
            self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
            self._last = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._log.log(level, msg, *args, exc_info=exc_info)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.monotonic()


def unavailable(exc: OSError, what: str) -> OSError:
    """Turn "no such transport" errnos into one clear TransportUnavailable."""
    if exc.errno in _UNAVAILABLE_ERRNOS:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return TransportUnavailable(
            exc.errno,
            f"{what} is not available on this kernel/hypervisor ({name}: {exc.strerror})",
        )
    return exc


def vsock_connect_error(exc: OSError) -> OSError:
    """A refused vsock connect() in vsock's own words, which the Unix and TCP stand-ins never
    say: nobody listening on the port is the peer's reset (ECONNRESET, not ECONNREFUSED:
    "Connection reset by peer" reads as a connection made and then dropped), and a CID that
    no transport of this kernel reaches is ENODEV (a bare "No such device"). The errno stays,
    for callers that tell the two apart."""
    if exc.errno == errno.ECONNRESET:
        # (A listener whose backlog is full resets too: rare, and a retry then gets in.)
        return ConnectionResetError(errno.ECONNRESET, "nothing listens on that port (vsock's "
                                    "reset, ECONNRESET)")
    if exc.errno == errno.ENODEV:
        return OSError(errno.ENODEV, "no vsock transport on this machine reaches that CID "
                       "(ENODEV)")
    return exc


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    # Through libc, not sock.setsockopt: CPython parses every AF_VSOCK option value as a u64
    # (for the vsock buffer sizes), so a struct timeval cannot be passed on a vsock socket.
    whole = int(seconds)
    tv = _Timeval(whole, int((seconds - whole) * 1_000_000))
    if _libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, option, ctypes.byref(tv),
                        ctypes.sizeof(tv)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setsockopt({_OPTION_NAMES.get(option, option)}): {os.strerror(err)}")


_OPTION_NAMES = {socket.SO_SNDTIMEO: "SO_SNDTIMEO", socket.SO_RCVTIMEO: "SO_RCVTIMEO"}


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    # SO_SNDTIMEO bounds send() only, so the reader thread can keep a plain blocking recv().
    _set_timeout(sock, socket.SO_SNDTIMEO, seconds)


def set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO; 0 means none. Lets a blocking reader give up on a silent peer."""
    _set_timeout(sock, socket.SO_RCVTIMEO, seconds)


def inet_family(network: str) -> tuple[socket.AddressFamily, str, bool | None]:
    """(family, wildcard address, IPV6_V6ONLY value or None) for a tcp*/udp network."""
    if network == "tcp4":
        return socket.AF_INET, "0.0.0.0", None  # noqa: S104 - listening on all is the point
    if network == "tcp6":
        return socket.AF_INET6, "::", True
    if socket.has_ipv6:
        return socket.AF_INET6, "::", False
    return socket.AF_INET, "0.0.0.0", None  # noqa: S104


def new_inet_socket(network: str, kind: socket.SocketKind) -> tuple[socket.socket, str]:
    """A socket for a tcp*/udp listener, dual-stack where asked; IPv4 only if IPv6 is absent."""
    family, wildcard, v6only = inet_family(network)
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        if family != socket.AF_INET6 or v6only or exc.errno != errno.EAFNOSUPPORT:
            raise
        sock, wildcard, v6only = socket.socket(socket.AF_INET, kind), "0.0.0.0", None  # noqa: S104
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
    return sock, wildcard


class SocketBind(Bind):
    """Shared plumbing: open/close bookkeeping, Unix socket files, endpoint parsing."""

    stream: bool

    def __init__(self, network: str, *, unix_dir: str | None = None) -> None:
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}")
        self.network = network
        self.unix_dir = os.path.abspath(unix_dir or default_unix_dir())
        self.port = 0
        self._receive: Receiver | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._closed.set()  # not open yet
        self._threads: list[threading.Thread] = []
        self._unix_path: str | None = None
        self._unix_ident: tuple[int, int] | None = None
        self.mark = 0

    # -- endpoints ---------------------------------------------------------------------------

    def parse_endpoint(self, text: str) -> Endpoint:
        return parse_endpoint(text, self.network, self.unix_dir, dgram=not self.stream)

    def format_endpoint(self, ep: Endpoint) -> str | None:
        return format_endpoint(ep)

    def endpoint_kind(self) -> str:
        if self.network in INET_NETWORKS:
            return "inet"
        return self.network

    # -- fwmark ------------------------------------------------------------------------------

    def set_mark(self, mark: int) -> None:
        if not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark {mark} is not a 32-bit number")
        # First the value that sockets made from now on take, then the ones there are: a
        # socket between the two steps (being dialled) is synced when it is published.
        old, self.mark = self.mark, mark
        try:
            for sock in self._marked_sockets():
                try:
                    self._sync_mark(sock)
                except OSError as e:
                    if e.errno != errno.EBADF:  # EBADF: a connection closing meanwhile
                        raise
        except BaseException:
            self.mark = old
            raise

    def _marked_sockets(self) -> list[socket.socket]:
        """The open IP sockets set_mark changes (the subclass knows them)."""
        return []

    def _sync_mark(self, sock: socket.socket) -> None:
        """Gives an IP socket the current fwmark, if it does not have it (setting one, even
        0, needs CAP_NET_ADMIN: an unprivileged daemon without a mark never asks)."""
        if self.network in INET_NETWORKS and \
                sock.getsockopt(socket.SOL_SOCKET, _SO_MARK) & 0xFFFFFFFF != self.mark:
            # The kernel's mark is a u32 that getsockopt gives back as a C int, and an int
            # argument must fit a C int: marks from 0x80000000 up (wg takes up to 0xffffffff)
            # go as the 4 bytes of a native u32 instead.
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, self.mark.to_bytes(4, sys.byteorder))

    # -- lifecycle helpers -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    def check_port(self, port: int) -> None:
        limit = VMADDR_PORT_ANY - 1 if self.network == "vsock" else 0xFFFF
        if not 0 <= port <= limit:
            raise ValueError(f"port {port} out of range 0-{limit} for {self.network}")

    def change_port(self, port: int) -> int:
        # A datagram socket has nothing to keep: close it and open another, or the old port
        # again when the new one cannot be had.
        self.check_port(port)
        receive, old = self._receive, self.port
        assert receive is not None, "change_port on a bind never opened"
        self.close()
        try:
            return self.open(port, receive)
        except BaseException:
            self.open(old, receive)
            raise

    def _begin_open(self, receive: Receiver) -> None:
        with self._lock:
            if not self._closed.is_set():
                raise RuntimeError(f"{type(self).__name__}({self.network}) is already open")
            self._receive = receive
            self._threads = []
            self._closed.clear()

    def _open_socket(
        self, port: int, receive: Receiver, make: Callable[[int], tuple[socket.socket, int]]
    ) -> socket.socket:
        """The part of open() every bind shares: check the port, mark the bind open, make
        the socket with `make(port) -> (socket, actual port)`, and undo the mark on failure."""
        self.check_port(port)
        self._begin_open(receive)
        try:
            sock, self.port = make(port)
        except BaseException:
            self._closed.set()
            raise
        return sock

    def _start_thread(
        self, target: Callable[..., None], name: str, *args: object
    ) -> threading.Thread:
        t = NamedThread(target=target, name=name, args=args, daemon=True)
        # Started before it is registered: a thread that failed to start (RuntimeError when
        # the process is out of threads) must not be joined at close.
        t.start()
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        return t

    def _join_threads(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        joined: set[threading.Thread] = set()
        while True:
            # Again until no new one appears: a thread being joined may start another on its
            # way out (the accept loop, a reader for a connection it took as close began).
            with self._lock:
                threads = [t for t in self._threads if t not in joined and t is not me]
            if not threads:
                return
            for t in threads:
                joined.add(t)
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    log.warning("%s: thread %s did not stop", self.network, t.name)

    # -- Unix socket files -------------------------------------------------------------------

    def _bind_unix(self, sock: socket.socket, port: int, dgram: bool) -> int:
        """Bind ``sock`` to <unix_dir>/<port>.sock|.dgram; port 0 picks a free number."""
        # The directory is the access control: only its owner may reach the sockets.
        socket_dir(self.unix_dir)
        if port:
            path = unix_port_path(self.unix_dir, port, dgram)
            self._claim_unix_path(sock, path)
        else:
            for _ in range(100):
                port = random.randint(*_UNIX_PORT_RANGE)  # noqa: S311 - not a secret
                path = unix_port_path(self.unix_dir, port, dgram)
                if os.path.lexists(path):
                    continue
                try:
                    sock.bind(path)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
            else:
                raise OSError(errno.EADDRINUSE, f"no free port socket in {self.unix_dir}")
        os.chmod(path, 0o600)
        st = os.stat(path)
        self._unix_path, self._unix_ident = path, (st.st_dev, st.st_ino)
        return port

    @staticmethod
    def _claim_unix_path(sock: socket.socket, path: str) -> None:
        try:
            sock.bind(path)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        # Left over by a process that died? Only a socket nobody answers on may be replaced.
        if not remove_stale(path):
            raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
        sock.bind(path)

    def _forget_unix_path(self) -> None:
        self._unix_path = self._unix_ident = None

    def _remove_unix_path(self) -> None:
        path, ident = self._unix_path, self._unix_ident
        self._unix_path = self._unix_ident = None
        if path is None:
            return
        try:
            st = os.lstat(path)
            # Someone else may have bound a new socket there since; leave theirs alone.
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path)
        except FileNotFoundError:
            pass
