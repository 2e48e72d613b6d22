"""Stream transports (vsock, TCP, Unix stream) with wireguard-go-vsock framing.

Connections: any number of inbound connections are accepted; each gets an endpoint with a
``conn_id`` so replies go back over it, and it is never dialled. Sending to an endpoint with no
connection queues the message (at most ``max_pending``, oldest dropped) and starts one dialler
thread for it; nothing is dialled before there is something to send.

Redial policy: the dialling side owns the connection. When a connection it dialled drops, it
redials at once (a peer behind an inbound connection cannot call back, so waiting for the next
outgoing message could leave it mute), then with jittered exponential backoff from
``backoff_min`` to ``backoff_max`` while connects fail. The range depends on the network
(:func:`redial_backoff`): on a local link (vsock, Unix) a failed dial costs almost nothing, so
the cap is 1 s and a peer that comes back after minutes is found within a second; across a
network (TCP) it is the seed's 0.5-30 s. A connection that dies within STABLE_AFTER seconds
counts as a failure, unless it delivered frames and the one before it lasted (a peer that
restarted): anyone who can listen on the address can send a frame, so a listener that sends one
and hangs up every time is backed off from, not redialled in a loop.
A dialler whose endpoint has had nothing to send for ``redial_idle`` seconds since its
connection dropped gives up; the next send starts a new one.

A send that cannot complete within ``send_timeout`` (the peer stopped reading, or reads a
little at a time) closes that connection; a partly written frame would corrupt the stream
anyway. On TCP and vsock that is the whole send's limit; a Unix stream socket (a stand-in)
renews the timeout for each buffer it allocates within one call.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import random
import select
import socket
import threading
import time
from collections.abc import Set as AbstractSet
from typing import Any, Final

from ..safetext import error
from ..threads import Survivor, raised_at
from .bind import (
    SHARED_POLL_MS,
    Message,
    RateLimitedLog,
    Receiver,
    SharedFile,
    SocketBind,
    log,
    new_inet_socket,
    set_receive_timeout,
    set_send_timeout,
    unavailable,
    vsock_connect_error,
)
from .caps import CAP_UNCHECKED_TRANSPORT, HELLO_MAGIC, parse_hello
from .endpoint import (
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    Endpoint,
    display_endpoint,
    inet_host,
    inet_sockaddr,
)
from .framing import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    FrameDecoder,
    FramingError,
    encode_frame,
    frame_header,
)

__all__ = ["STREAM_NETWORKS", "StreamBind", "redial_backoff"]

STREAM_NETWORKS: Final = frozenset({"vsock", "tcp", "tcp4", "tcp6", "unix"})
LOCAL_NETWORKS: Final = frozenset({"vsock", "unix"})
# (first delay, cap) in seconds between failed dials.
# Not Final: mypyc (2.4.1) compiles a Final tuple of floats into a check that always
# fails ("value for final name ... was not set").
LOCAL_BACKOFF = (0.1, 1.0)
NETWORK_BACKOFF = (0.5, 30.0)


def redial_backoff(network: str) -> tuple[float, float]:
    """The (min, max) redial delay for `network`; the control channel uses it too."""
    return LOCAL_BACKOFF if network in LOCAL_NETWORKS else NETWORK_BACKOFF

# Buffers one sendmsg() takes (Linux: 1024); a batch of more goes in several calls.
IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
STABLE_AFTER: Final = 1.0
# Inbound connections cost a thread and a receive buffer each: cap them, and close one that
# has not authenticated (see Bind.authenticated) this long after it was accepted, whatever
# arrives on it meanwhile (a byte every few seconds, junk in valid frames).
# When the cap is reached, a newcomer replaces an unauthenticated connection, else one that is
# no peer's endpoint any more (a restarted peer's old one); only when every connection is a
# live peer's is the newcomer refused. The unauthenticated one chosen is, among those whose
# sender has not shown it knows our public key (Bind.handshake_seen) in the last
# HANDSHAKE_GRACE seconds if there are any, one of the source (host, /64, CID) that holds the
# most of them, and of those the one accepted first: a stranger that opens connections without
# end replaces its own, never a peer's on another host, and a fresh connection from the same
# host as the stranger survives MAX_INBOUND newcomers. Junk in valid frames can therefore
# never lock a real peer out.
MAX_INBOUND = 64
CHURN_LOG_INTERVAL, CHURN_LOG_BURST = 1.0, 20
FIRST_FRAME_TIMEOUT = 30.0
# A peer whose initiation got a cookie reply retries after REKEY_TIMEOUT (5 s, with jitter),
# and may need a second retry: its connection is kept that long after its last handshake
# message with a valid mac1.
HANDSHAKE_GRACE = 15.0
# The receive buffer of a connection that has not authenticated; it grows if a frame needs
# more, and to framing.RECEIVE_BUFFER once the connection is a peer's.
UNTRUSTED_BUFFER = 4096
# How long a send waits for a peer's connection while other peers have connections of their
# own: one thread sends to them all (the TUN reader), and a peer that stops reading must not
# hold up the others for the whole send timeout, over and over as it reconnects. Past this
# the connection is stalled: its sends no longer wait, and what its socket cannot take is
# dropped as a datagram would be, until it has taken everything left and SEND_TIMEOUT more
# seconds have passed; it is closed once it takes nothing for the send timeout. A device
# with one peer (an enclave's, a parent's) waits the whole send timeout, as before.
STALL_PATIENCE = 0.25
TCP_KEEPALIVE: Final = 15  # seconds: idle before the first probe, and between probes
_NO_CAPS: Final = (0, 0)
# What _Conn.send_iov did: FAILED (the connection failed or is closed) is false, so that `not
# send_iov(...)` says the connection is gone; DROPPED (it is stalled: see _send_stalled) and
# SENT (to the kernel, or behind what it is sending) are true.
FAILED: Final = 0
SENT: Final = 1
DROPPED: Final = 2
_HELLO_BYTE: Final = HELLO_MAGIC[0]


def _source(ep: Endpoint) -> object:
    """The host an inbound connection comes from, for sharing out the connection table: an
    IPv6 one by its /64 (as wireguard-go's rate limiter), which one host often has whole."""
    host = ep.host
    if ep.kind == "inet" and ":" in str(host):
        with contextlib.suppress(ValueError):
            return ipaddress.ip_network(f"{str(host).split('%', 1)[0]}/64", strict=False)
    return host


def _unsent(bufs: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """What is left of `bufs` after a send took `n` bytes."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    bufs = bufs[i:]
    if n:
        bufs[0] = memoryview(bufs[0])[n:]
    return bufs


def _send_all(sock: socket.socket, bufs: list[bytes | memoryview], timeout: float,
              give_up: bool = False) -> list[bytes | memoryview]:
    """Every buffer, waiting while the kernel is full: `timeout` seconds (the socket's
    SO_SNDTIMEO) for the whole send. The option bounds each sendmsg() alone, and a peer that
    reads a little at a time would renew it with every call: after a short write each further
    call gets only what is left of the whole. Out of time, raises TimeoutError, or with
    GIVE_UP returns what is left (nothing: all sent)."""
    begun = time.monotonic()
    n = 0
    if len(bufs) <= IOV_MAX:
        try:
            n = sock.sendmsg(bufs)
        except BlockingIOError:  # SO_SNDTIMEO passed with nothing taken
            if not give_up:
                raise
            return bufs
        if n == sum(map(len, bufs)):
            return []  # the common case: one system call, one length check
    bufs = _unsent(bufs, n)
    try:
        while bufs:
            # 1 ms at least: a timeval of 0 would mean no limit at all.
            left = begun + timeout - time.monotonic()
            if left < 0.001:
                if give_up:
                    return bufs
                raise TimeoutError("send timed out")
            set_send_timeout(sock, left)
            try:
                bufs = _unsent(bufs, sock.sendmsg(bufs[:IOV_MAX]))
            except BlockingIOError:
                if not give_up:
                    raise
                return bufs
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile: the send's own error counts
            set_send_timeout(sock, timeout)
    return []


def _send_some(sock: socket.socket, bufs: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """What the kernel takes without waiting; returns the rest."""
    while bufs:
        try:
            n = sock.sendmsg(bufs[:IOV_MAX], (), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return bufs
        bufs = _unsent(bufs, n)
    return bufs


class _Conn:
    """One established stream connection; its reader thread owns the socket's lifetime."""

    __slots__ = (
        "caps",
        "closed",
        "done",
        "dropped",
        "ep",
        "got_frame",
        "hello_seen",
        "last_rx",
        "outbound",
        "patience",
        "progress_at",
        "reason",
        "send_lock",
        "send_timeout",
        "since",
        "sock",
        "sock_patience",
        "source",
        "stalled_at",
        "tail",
        "tail_lock",
        "trusted",
        "vouched",
    )

    def __init__(self, sock: socket.socket, ep: Endpoint, outbound: bool,
                 send_timeout: float) -> None:
        self.sock = sock
        self.ep = ep
        self.outbound = outbound
        self.send_timeout = send_timeout  # its SO_SNDTIMEO, for a whole send (_send_all)
        # How long a waiting send waits (StreamBind._set_patience), and what the socket's
        # SO_SNDTIMEO says now: set under send_lock by the next send, not by whoever changes
        # the patience while a send may be under way.
        self.patience = self.sock_patience = send_timeout
        # When a waiting send gave up (see STALL_PATIENCE; 0: it did not), when the socket
        # last took bytes while stalled, and the sends dropped while stalled.
        self.stalled_at = 0.0
        self.progress_at = 0.0
        self.dropped = 0
        # Whose it is, for sharing out the table of inbound connections (_source): worked
        # out once, not for each connection at each accept.
        self.source: object = None if outbound else _source(ep)
        self.send_lock = threading.Lock()
        self.closed = False
        self.done = threading.Event()
        self.since = self.last_rx = time.monotonic()
        self.got_frame = False
        # Dialled by us, or a message on it authenticated. Until then last_rx is kept.
        self.trusted = outbound
        # When a handshake message on it last passed mac1 (0: never; Bind.handshake_seen).
        self.vouched = 0.0
        self.reason = ""
        # The peer's capability hello on this connection: (flags, max_packet). A flag of its
        # own says whether one came, not identity with _NO_CAPS: compiled code (mypyc) keeps
        # such a tuple unboxed, and `is` on it is never true.
        self.caps = _NO_CAPS
        self.hello_seen = False
        # What a send that could not wait left unsent (send_iov); goes before anything else.
        # Its lock is never held across a system call.
        self.tail: list[bytes | memoryview] = []
        self.tail_lock = threading.Lock()

    def send(self, frame: bytes) -> int:
        return self.send_iov([frame])

    def send_iov(self, bufs: list[bytes | memoryview], wait: bool = True) -> int:
        """Sends the buffers in order, in as few sendmsg() calls as the kernel allows (no
        joined copy; a short write is continued where it stopped). SENT, DROPPED while the
        connection is stalled, FAILED when it failed or is closed.

        Without `wait` (the thread serving the bind's SharedFile, which must never block while
        its own socket goes unread: two daemons each blocked in a send to the other would
        wait for the send timeout) neither the kernel nor another sender is waited for: what
        cannot go at once becomes this connection's tail, which the next waiting send, or
        StreamBind.flush(), sends first."""
        if wait:
            with self.send_lock:
                return self._send(bufs, True)
        if not self.send_lock.acquire(False):  # a waiting send is under way: queue behind it
            with self.tail_lock:
                self.tail += bufs
            return FAILED if self.closed else SENT
        try:
            return self._send(bufs, False)
        finally:
            self.send_lock.release()

    def _send(self, bufs: list[bytes | memoryview], wait: bool) -> int:
        if self.closed:
            return FAILED
        if self.stalled_at:
            return self._send_stalled(bufs, wait)
        if self.tail:
            with self.tail_lock:
                bufs = self.tail + bufs
                self.tail = []
        if not bufs:
            return SENT
        try:
            if wait:
                patience = self.patience
                if patience != self.sock_patience:
                    set_send_timeout(self.sock, patience)
                    self.sock_patience = patience
                if patience >= self.send_timeout:
                    _send_all(self.sock, bufs, patience)
                elif rest := _send_all(self.sock, bufs, patience, give_up=True):
                    # Other peers wait behind this one: it is stalled (STALL_PATIENCE).
                    self.stalled_at = self.progress_at = time.monotonic()
                    with self.tail_lock:
                        self.tail = rest + self.tail
            elif rest := _send_some(self.sock, bufs):
                with self.tail_lock:
                    self.tail = rest + self.tail
            return SENT
        except OSError as exc:
            timed_out = isinstance(exc, TimeoutError | BlockingIOError)
            self.shutdown("send timed out (peer not reading)" if timed_out else f"send: {exc}")
            return FAILED

    def _send_stalled(self, bufs: list[bytes | memoryview], wait: bool) -> int:
        """A send on a stalled connection: nothing waits. What is left of the send that
        stalled goes first and whole (a frame begun must end); while any is left, BUFS are
        dropped."""
        with self.tail_lock:
            pending, self.tail = self.tail, []
        now = time.monotonic()
        try:
            if pending:
                before = sum(map(len, pending))
                pending = _send_some(self.sock, pending)
                if sum(map(len, pending)) < before:
                    self.progress_at = now
            if not pending:
                if now - self.stalled_at >= self.send_timeout:
                    self.stalled_at = 0.0  # it kept up for a while: sends may wait again
                    return self._send(bufs, wait)
                if bufs:
                    pending = _send_some(self.sock, bufs)
                    if len(pending) < len(bufs) or (pending and pending[0] is not bufs[0]):
                        self.progress_at = now
                    bufs = []
        except OSError as exc:
            self.shutdown(f"send: {exc}")
            return FAILED
        if pending:
            with self.tail_lock:
                self.tail = pending + self.tail
            if now - self.progress_at >= self.send_timeout:
                self.shutdown("send timed out (peer not reading)")
                return FAILED
        if bufs:
            self.dropped += 1
            return DROPPED
        return SENT

    def shutdown(self, reason: str) -> None:
        """Wake the reader and any sender; the reader then closes the socket."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        with self.tail_lock:
            self.tail = []  # nobody sends it now
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Dialer:
    __slots__ = (
        "active_at",
        "conn",
        "dropped",
        "ep",
        "failures",
        "last_error",
        "pending",
        "quick_drops",
        "reconnects",
        "retired",
        "sock",
        "state",
    )

    def __init__(self, ep: Endpoint, max_pending: int) -> None:
        self.ep = ep
        self.pending: collections.deque[bytes] = collections.deque(maxlen=max_pending)
        self.dropped = 0
        self.reconnects = 0
        self.failures = 0
        # Connections in a row that died within STABLE_AFTER (see _dial_loop).
        self.quick_drops = 0
        self.last_error = ""
        self.state = "connecting"
        self.active_at = time.monotonic()
        self.sock: socket.socket | None = None  # while connecting
        self.conn: _Conn | None = None  # from connect until the connection is gone
        # Set when no peer has the endpoint any more (StreamBind.peers_changed), when what it
        # queued was made with sessions that ended (sessions_ended) or the bind closes: the
        # dialler stops, whatever it was waiting for.
        self.retired = threading.Event()


class StreamBind(SocketBind):
    stream = True

    def __init__(
        self,
        network: str,
        *,
        unix_dir: str | None = None,
        send_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        backoff_min: float | None = None,
        backoff_max: float | None = None,
        max_pending: int = 16,
        redial_idle: float = 300.0,
        max_frame: int = MAX_PAYLOAD,
    ) -> None:
        if network not in STREAM_NETWORKS:
            raise ValueError(f"network {network!r} has no stream transport")
        super().__init__(network, unix_dir=unix_dir)
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        low, high = redial_backoff(network)
        self.backoff_min = low if backoff_min is None else backoff_min
        self.backoff_max = high if backoff_max is None else backoff_max
        self.max_pending = max_pending
        self.redial_idle = redial_idle
        self.max_frame = max_frame
        self._kind = self.endpoint_kind()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._move_lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        self._conns: dict[Endpoint, _Conn] = {}
        self._dialers: dict[Endpoint, _Dialer] = {}
        self._conn_ids = 0
        # The thread serving `shared` (0: none), whose sends never wait (_Conn.send_iov), and
        # whether one of them left a connection a tail: the file then goes back to its owner,
        # whose flush() sends the tails, until they are all gone.
        self._serving = 0
        self.congested = False
        # The connections changed since the sends' patience was last set (_set_patience).
        self._recount = False
        self._accepted = 0
        # Connections refuse_from turned away at accept (the enclave's CID check).
        self._refused = 0
        self._framing_errors = 0
        self._send_failures = 0
        self._dropped_no_conn = 0
        self._misc_log = RateLimitedLog()
        # Connections nobody has authenticated yet: anyone who can reach the port can open and
        # close them in a loop, so their lines are limited (a real peer's close is not). A
        # burst of them, a port scan say, is still logged line by line.
        self._churn_log = RateLimitedLog(CHURN_LOG_INTERVAL, burst=CHURN_LOG_BURST)
        # A full table, when a flood causes it, must not use up _misc_log's other warnings.
        self._room_log = RateLimitedLog()
        # Connections refuse_from turns away: at DEBUG only (anyone who can reach the port can
        # make them, the count is in status()), and limited as the churn lines are.
        self._door_log = RateLimitedLog(CHURN_LOG_INTERVAL, burst=CHURN_LOG_BURST)

    # -- open / close ------------------------------------------------------------------------

    def open(self, port: int, receive: Receiver) -> int:
        listener = self._open_socket(port, receive, self._listen)
        try:
            self._serve(listener)
        except BaseException:
            # Out of file descriptors or threads: a listener nobody accepts on must not stay
            # bound, nor the bind count as open (a retry would be refused, a port change fail).
            self._close()
            raise
        return self.port

    def _serve(self, listener: socket.socket) -> None:
        """Makes `listener` the one new connections come from, with an accept thread and a
        wake pipe of its own."""
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe()
        self._acceptor = self._start_acceptor(listener, self._wake_r)
        log.info("%s: listening on port %d%s", self.network, self.port,
                 f" ({self._unix_path})" if self._unix_path else "")

    def _start_acceptor(self, listener: socket.socket, wake_r: int) -> threading.Thread:
        return self._start_thread(self._accept_loop, f"wgvsock-{self.network}-accept",
                                  listener, wake_r)

    def change_port(self, port: int) -> int:
        """Listens on `port` instead, keeping every connection: they do not depend on the
        listener that accepted them, and a dialler's never did. The new listener, its wake
        pipe and accept thread are made first, so a port that cannot be had (or a process
        out of file descriptors or threads) changes nothing; then the old ones are retired."""
        self.check_port(port)
        with self._move_lock:  # not with close(), which would find half of each
            if not self.is_open:
                raise RuntimeError(f"{type(self).__name__}({self.network}) is not open")
            old_unix = self._unix_path, self._unix_ident
            # A failed _listen must not remove ours. (A method, so the type checker, and the
            # compiled code that trusts it, do not take both for None after _listen below.)
            self._forget_unix_path()
            try:
                listener, actual = self._listen(port)
                new_unix = self._unix_path, self._unix_ident
                wake: tuple[int, int] | None = None
                try:
                    wake = os.pipe()
                    acceptor = self._start_acceptor(listener, wake[0])
                except BaseException:
                    listener.close()
                    for fd in wake or ():
                        os.close(fd)
                    self._remove_unix_path()
                    raise
            except BaseException:
                self._unix_path, self._unix_ident = old_unix
                raise
            with self._lock:
                old_listener, old_acceptor = self._listener, self._acceptor
                old_wake = self._wake_r, self._wake_w
                self._listener, self._acceptor = listener, acceptor
                self._wake_r, self._wake_w = wake
                self.port = actual
            os.write(old_wake[1], b"x")
            if old_acceptor is not None:
                old_acceptor.join(5.0)
            if old_acceptor is None or not old_acceptor.is_alive():
                for fd in old_wake:  # never under a thread that may still poll it
                    os.close(fd)
            if old_listener is not None:
                old_listener.close()
            self._unix_path, self._unix_ident = old_unix
            self._remove_unix_path()
            self._unix_path, self._unix_ident = new_unix
        log.info("%s: listening on port %d%s instead", self.network, actual,
                 f" ({self._unix_path})" if self._unix_path else "")
        return actual

    def _marked_sockets(self) -> list[socket.socket]:
        with self._lock:
            socks = [c.sock for c in self._conns.values() if not c.closed]
            socks += [d.sock for d in self._dialers.values() if d.sock is not None]
        return ([self._listener] if self._listener is not None else []) + socks

    def _listen(self, port: int) -> tuple[socket.socket, int]:
        if self.network == "vsock":
            try:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            except OSError as exc:
                raise unavailable(exc, "vsock (AF_VSOCK stream)") from exc
            try:
                sock.bind((VMADDR_CID_ANY, port or VMADDR_PORT_ANY))
                sock.listen(socket.SOMAXCONN)
                port = sock.getsockname()[1]
            except OSError as exc:
                sock.close()
                raise unavailable(exc, "vsock (AF_VSOCK stream)") from exc
        elif self.network == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                port = self._bind_unix(sock, port, dgram=False)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                self._remove_unix_path()
                raise
        else:
            sock, wildcard = new_inet_socket(self.network, socket.SOCK_STREAM)
            try:
                self._sync_mark(sock)  # accepted connections inherit it
                # A restarted daemon must get its port back despite TIME_WAIT leftovers.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((wildcard, port))
                sock.listen(socket.SOMAXCONN)
                port = sock.getsockname()[1]
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        return sock, port

    def close(self) -> None:
        with self._move_lock:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            conns = list(self._conns.values())
            dialers = list(self._dialers.values())
            for d in dialers:  # (under the lock: no dialler publishes a connection after)
                d.retired.set()
            listener, self._listener = self._listener, None
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        for conn in conns:
            conn.shutdown("bind closed")
        for d in dialers:
            s, c = d.sock, d.conn
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            if c is not None:  # may still be draining the queue, not yet in _conns
                c.shutdown("bind closed")
        self._join_threads()
        if listener is not None:
            listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._remove_unix_path()
        with self._lock:
            self._conns.clear()
            self._dialers.clear()
        log.info("%s: closed", self.network)

    # -- sending -----------------------------------------------------------------------------

    def send(self, data: bytes, ep: Endpoint) -> int:
        conn = self._conns.get(ep)
        if conn is None:
            return self.send_batch([data], ep)
        try:
            header = frame_header(data, conn.caps[0] & CAP_UNCHECKED_TRANSPORT != 0)
        except ValueError as exc:
            self._misc_log(logging.WARNING, "%s: dropping message: %s", self.network, exc)
            return 0
        went = self._send_iov(conn, [header, data])
        if went == SENT:
            return len(data)
        if went == FAILED:
            return self._send_slow(encode_frame(data), ep)
        return 0

    def send_batch(self, messages: list[bytes], ep: Endpoint) -> int:
        """Several messages in one sendmsg(): frame headers and payloads as an iovec."""
        conn = self._conns.get(ep)
        sent = 0
        if conn is None:
            for data in messages:
                try:
                    frame = encode_frame(data)
                except ValueError as exc:
                    self._misc_log(logging.WARNING, "%s: dropping message: %s", self.network,
                                   exc)
                    continue
                sent += self._send_slow(frame, ep)
            return sent
        unchecked = conn.caps[0] & CAP_UNCHECKED_TRANSPORT != 0
        bufs: list[bytes | memoryview] = []
        for data in messages:
            try:
                bufs.append(frame_header(data, unchecked))
            except ValueError as exc:
                self._misc_log(logging.WARNING, "%s: dropping message: %s", self.network, exc)
                continue
            bufs.append(data)
            sent += len(data)
        if not bufs:
            return 0
        went = self._send_iov(conn, bufs)
        if went == SENT:
            return sent
        sent = 0
        if went == FAILED:
            # The connection failed (and is closing): what it did not take goes the slow way,
            # to a connection whose peer may check every CRC; a message sent twice is dropped
            # by the peer's replay check.
            for i in range(1, len(bufs), 2):
                sent += self._send_slow(encode_frame(bufs[i]), ep)
        return sent

    def _send_iov(self, conn: _Conn, bufs: list[bytes | memoryview]) -> int:
        if self._recount:
            self._set_patience()
        if threading.get_ident() != self._serving:
            return conn.send_iov(bufs)
        went = conn.send_iov(bufs, wait=False)
        if went and conn.tail and not conn.stalled_at:  # a stalled one's tail waits for it
            self.congested = True
        return went

    def flush(self) -> None:
        for conn in list(self._conns.values()):
            if conn.tail:
                conn.send_iov([])
        self.congested = False

    def lane_begin(self, ep: Endpoint, flags: int) -> tuple[Any, int, int] | None:
        conn = self._conns.get(ep)
        # (A recount due asks the owner, which holds its lock here: the ordinary path's next
        # send makes it.)
        if (conn is None or conn.closed or conn.stalled_at or conn.tail or self._recount
                or conn.caps[0] & flags != flags):
            return None
        if not conn.send_lock.acquire(False):  # another send is under way: the ordinary path
            return None
        if conn.closed or conn.tail:  # (a send that could not wait queued this meanwhile)
            conn.send_lock.release()
            return None
        return conn, conn.sock.fileno(), conn.caps[1]

    def lane_end(self, hold: Any, unsent: bytes | None, partial: int, error: int) -> int:
        conn: _Conn = hold
        lost = 0
        try:
            went = SENT
            if error:
                conn.shutdown(f"send: {OSError(error, os.strerror(error))}")
                went = FAILED
            elif unsent is not None:
                serving = threading.get_ident() == self._serving
                went = conn._send([memoryview(unsent)[partial:]], not serving)
                if serving and went == SENT and conn.tail and not conn.stalled_at:
                    self.congested = True
        finally:
            conn.send_lock.release()
        if went != FAILED or unsent is None:
            return 0
        # As send_batch: what the failed connection did not take goes the slow way, with
        # CRCs, to whatever connection comes next (the peer's replay check drops a message
        # that arrives twice).
        at = 0
        while at < len(unsent):
            size = unsent[at] | unsent[at + 1] << 8
            payload = unsent[at + HEADER_SIZE:at + HEADER_SIZE + size]
            lost += size - self._send_slow(encode_frame(payload), conn.ep)
            at += HEADER_SIZE + size
        return lost

    def _send_slow(self, frame: bytes, ep: Endpoint) -> int:
        """Sends a frame to an endpoint with no connection: queued for its dialler, which
        reports it to sent_later when it goes. Returns the message's size if it went at once
        (a connection came meanwhile), else 0."""
        if self._closed.is_set():
            return 0
        if ep.conn_id:
            # An inbound connection that is gone: only its dialler can bring it back.
            self._dropped_no_conn += 1
            return 0
        if ep.kind != self._kind:
            self._misc_log(logging.WARNING, "%s: cannot send to %s endpoint %s", self.network,
                           ep.kind, display_endpoint(ep))
            return 0
        start = None
        with self._lock:
            if self._closed.is_set():
                return 0
            conn = self._conns.get(ep)
            if conn is None or conn.closed:
                conn = None
                d = self._dialers.get(ep)
                if d is None:
                    d = self._dialers[ep] = start = _Dialer(ep, self.max_pending)
                if len(d.pending) == d.pending.maxlen:
                    d.dropped += 1
                d.pending.append(frame)
                d.active_at = time.monotonic()
        if start is not None:
            try:
                self._start_thread(self._dial_loop, f"wgvsock-{self.network}-dial-"
                                   f"{display_endpoint(ep)}", start)
            except RuntimeError as exc:  # out of threads: the next send must try again
                with self._lock:
                    if self._dialers.get(ep) is start:
                        del self._dialers[ep]
                self._misc_log(logging.WARNING, "%s: cannot start dialling %s: %s",
                               self.network, display_endpoint(ep), exc)
        # A connection registered while we looked: one try, no requeue.
        elif conn is not None and self._send_iov(conn, [frame]) == SENT:
            return len(frame) - HEADER_SIZE
        return 0

    def peer_caps(self, ep: Endpoint) -> tuple[int, int]:
        conn = self._conns.get(ep)
        return _NO_CAPS if conn is None else conn.caps

    def any_peer_has(self, flags: int) -> bool:
        # Only a peer's: a hello costs nothing to send, and anyone who can reach the port
        # could otherwise switch the device's offload (a kernel ioctl) at will. And only a
        # peer's current connection: an inbound one stays trusted after its peer moved on.
        check = self.authenticated
        return any(
            c.trusted and c.caps[0] & flags == flags and (c.outbound or check is None
                                                          or check(c.ep))
            for c in list(self._conns.values())
        )

    def handshake_seen(self, ep: Endpoint) -> None:
        conn = self._conns.get(ep)
        if conn is not None and not conn.trusted:
            conn.vouched = time.monotonic()

    # -- connections -------------------------------------------------------------------------

    def _configure(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        if self._kind == "inet":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # TCP keep-alives as the Go seed has them (Go's default for dialled and accepted
            # connections: probes after 15 s idle, 15 s apart): a peer gone without a word
            # (power lost, a partition) is noticed on an idle connection, which is then
            # redialled or dropped. vsock has no such silent loss (the host resets the
            # connections of an enclave that ends).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPALIVE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPALIVE)
        set_send_timeout(sock, self.send_timeout)

    def _inbound_endpoint(self, addr: Any) -> Endpoint:
        self._conn_ids += 1
        if self._kind == "inet":
            host = inet_host(addr[0], addr[3] if len(addr) == 4 else 0)
            return Endpoint("inet", host, addr[1], self._conn_ids)
        if self._kind == "vsock":
            return Endpoint("vsock", addr[0], addr[1], self._conn_ids)
        return Endpoint("unix", addr if isinstance(addr, str) else "", 0, self._conn_ids)

    def _accept_loop(self, listener: socket.socket, wake_r: int) -> None:
        survivor = Survivor(f"{self.network}: accept")
        while True:
            try:
                return self._accept_connections(listener, wake_r)
            except Exception as e:
                if not survivor.survive(e):
                    raise  # to the thread-death hook, which stops the daemon
                self._closed.wait(0.1)

    def _accept_connections(self, listener: socket.socket, wake_r: int) -> None:
        # poll() with a wake pipe: shutdown() does not wake accept() on an AF_VSOCK listener.
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while not self._closed.is_set():
            events = poller.poll()
            # Closed, or this listener replaced (change_port wrote its own wake pipe).
            if self._closed.is_set() or any(fd == wake_r for fd, _ in events):
                break
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                # EMFILE and friends: say so, and do not spin on a listener that stays readable.
                self._misc_log(logging.WARNING, "%s: accept failed: %s", self.network, exc)
                self._closed.wait(0.1)
                continue
            if self.refuse_from is not None and self._refused_at_door(addr):
                sock.close()  # before it costs a thread, a buffer or a slot in the table
                continue
            try:
                self._configure(sock)
            except OSError:
                sock.close()
                continue
            ep = self._inbound_endpoint(addr)
            if not self._make_room(ep):
                sock.close()
                self._misc_log(logging.WARNING, "%s: %d inbound connections of live peers "
                               "already; refusing another", self.network, MAX_INBOUND)
                continue
            # (No break inside the with: mypyc cannot compile one in a try/finally.)
            with self._lock:
                closing = self._closed.is_set()
                if not closing:
                    conn = _Conn(sock, ep, outbound=False, send_timeout=self.send_timeout)
                    self._publish(conn)
                    self._accepted += 1
            if closing:
                sock.close()
                break
            self._churn_log(logging.INFO, "%s: inbound connection %s", self.network,
                            display_endpoint(conn.ep))
            try:
                self._start_reader(conn)
            except (OSError, RuntimeError) as exc:
                self._misc_log(logging.WARNING, "%s: cannot serve a connection: %s",
                               self.network, exc)
                with self._lock:
                    self._conns.pop(conn.ep, None)
                sock.close()

    def _refused_at_door(self, addr: Any) -> bool:
        """Whether refuse_from turns away a connection from `addr` (counted and logged here).
        A check that fails refuses (it is the fence), said as an error: it is a bug, and it
        would keep the enclave out too."""
        refuse = self.refuse_from
        if refuse is None:
            return False
        try:
            why = refuse(addr)
        except Exception as exc:
            # One line, limited as the other refusals are: a check that fails does so for
            # every connection, a traceback each time at DEBUG included. Where it was raised
            # is what finding the bug needs.
            # (safetext.error: a message that cannot be made must not escape to the Survivor.)
            why = f"the admission check failed ({error(exc)}){raised_at(exc)}"
            self._misc_log(logging.ERROR, "%s: %s; refusing the connection", self.network, why)
        if why is None:
            return False
        self._refused += 1
        who = (f"CID {addr[0]}" if self._kind == "vsock" and isinstance(addr, tuple) and addr
               else repr(addr))
        self._door_log(logging.DEBUG, "%s: refused a connection from %s: %s", self.network,
                       who, why)
        return True

    def _make_room(self, newcomer: Endpoint) -> bool:
        """Below MAX_INBOUND, or an inbound connection was closed to make room for one from
        `newcomer` (see MAX_INBOUND)."""
        with self._lock:
            inbound = [c for c in self._conns.values() if not c.outbound and not c.closed]
        if len(inbound) < MAX_INBOUND:
            return True
        victims = [c for c in inbound if not c.trusted]
        why = "unauthenticated"
        if victims:
            now = time.monotonic()
            quiet = [c for c in victims if not c.vouched or now - c.vouched > HANDSHAKE_GRACE]
            victim = self._most_from_one_source(quiet or victims, newcomer)
        else:
            check = self.authenticated
            if check is not None:
                victims = [c for c in inbound if not check(c.ep)]
                why = "no peer's endpoint any more"
            if not victims:
                return False
            victim = min(victims, key=lambda c: c.last_rx)
        reason = f"closed to make room for a new one ({why})"
        # Its own close line may be one of many left out (_churn_log): the table being full
        # is worth a line of its own (at most one in 10 s).
        self._room_log(logging.WARNING, "%s: %d inbound connections; %s %s", self.network,
                       len(inbound), display_endpoint(victim.ep), reason)
        victim.shutdown(reason)
        return True

    @staticmethod
    def _most_from_one_source(conns: list[_Conn], newcomer: Endpoint) -> _Conn:
        """Of `conns`, the one accepted first from the source that holds the most of them (the
        newcomer counted with its own). Not by the last frame received: junk sent every
        100 ms would keep a stranger's connections fresh, and a peer's new one would go."""
        counts: dict[object, int] = {}
        for c in conns:
            counts[c.source] = counts.get(c.source, 0) + 1
        key = _source(newcomer)
        if key in counts:
            counts[key] += 1
        return max(conns, key=lambda c: (counts[c.source], -c.since))

    def _trust(self, conn: _Conn) -> None:
        """After frames on a connection not yet trusted: is it a peer's now?"""
        check = self.authenticated
        if check is not None and not check(conn.ep):
            conn.last_rx = time.monotonic()
            return
        conn.trusted = True
        set_receive_timeout(conn.sock, 0)  # a real peer: no limit on idling now
        self._recount = True
        if conn.hello_seen:
            self._notify_caps()

    def _start_reader(self, conn: _Conn) -> None:
        self._start_thread(self._read_loop, f"wgvsock-{self.network}-read-"
                           f"{display_endpoint(conn.ep)}", conn)

    def _read_loop(self, conn: _Conn) -> None:
        sock, ep, receive = conn.sock, conn.ep, self._receive
        assert receive is not None
        # A stranger's connection gets a small buffer (it grows as frames need), a peer's the
        # full one.
        decoder = FrameDecoder(self.max_frame, start=0 if conn.trusted else UNTRUSTED_BUFFER)
        if self.hello is not None and conn.outbound:
            # The dialler speaks first; an accepter answers only a hello (_take_hello), so a
            # peer that sends none (the Go seed, a port scanner) never hears anything but
            # WireGuard from us.
            conn.send(encode_frame(self.hello))
        reason = "closed by peer"
        # The owner's SharedFile, once this thread serves it: then it waits in poll() on both
        # and serves the file first on each turn. Only a trusted connection takes it (a
        # stranger's must not carry the tunnel, and its receive timeout needs recv() to block).
        shared: SharedFile | None = None
        offer = self.shared
        poller: Any = None
        sock_fd = sock.fileno()
        try:
            while True:
                if offer is not None and conn.trusted and not self.congested and offer.take():
                    shared, offer = offer, None
                    self._serving = threading.get_ident()
                    poller = select.poll()
                    poller.register(sock_fd, select.POLLIN)
                    poller.register(shared.fd, select.POLLIN)
                if shared is not None:
                    sock_ready = file_ready = False
                    # (At once when a send of the last turn, or of the frames it received,
                    # could not wait: the owner's thread is to send the rest now.)
                    for fd, _ in poller.poll(0 if self.congested else SHARED_POLL_MS):
                        if fd == sock_fd:
                            sock_ready = True
                        else:
                            file_ready = True
                    served = shared.serve(file_ready)
                    if not served or self.congested:
                        # Stopping; or a send could not wait: the owner's thread serves the
                        # file (and sends the tails) while this one reads on, until the
                        # tails are gone and the next receive here takes it back.
                        self._serving = 0
                        shared.give_back()
                        if served:
                            offer = shared
                        shared = None
                    if not sock_ready:
                        continue
                if not conn.trusted:
                    # A deadline from the accept, not an idle limit: a byte every few seconds
                    # must not hold the connection (and its buffer) for ever.
                    left = conn.since + FIRST_FRAME_TIMEOUT - time.monotonic()
                    if left <= 0:
                        reason = f"no authenticated message within {FIRST_FRAME_TIMEOUT:g} s"
                        break
                    set_receive_timeout(sock, max(left, 0.001))  # (0 would be no limit)
                try:
                    n = sock.recv_into(decoder.space())
                except OSError as exc:
                    if isinstance(exc, BlockingIOError | TimeoutError) and not conn.trusted:
                        reason = f"no authenticated message within {FIRST_FRAME_TIMEOUT:g} s"
                    else:
                        reason = f"receive: {exc}"
                    break
                if n == 0:
                    break
                failed: FramingError | None = None
                try:
                    frames = decoder.frames(n)
                except FramingError as exc:
                    frames, failed = exc.before, exc
                if frames:
                    conn.got_frame = True
                    for frame in frames:
                        if isinstance(frame, bytes) and frame[0] == _HELLO_BYTE:
                            frames = self._take_hello(conn, frames)
                            break
                    # Many frames from one recv(): the owner decrypts them under one lock and
                    # can merge their packets into few TUN writes.
                    if len(frames) > 1 and (batch := self.receive_batch) is not None:
                        self._deliver_batch(batch, frames, ep, conn.caps[0])
                    else:
                        for frame in frames:
                            self._deliver(receive, frame, ep)
                    if not conn.trusted:
                        self._trust(conn)
                        if conn.trusted:
                            decoder.grow()
                if failed is not None:
                    reason = f"framing error: {failed.reason}"
                    self._framing_errors += 1
                    break
        finally:
            if shared is not None:
                self._serving = 0
                shared.give_back()
            self._conn_gone(conn, reason)

    def _deliver(self, fn: Any, data: Any, ep: Endpoint) -> None:
        try:
            fn(data, ep)
        except Exception:
            self._misc_log(logging.ERROR, "%s: receive callback failed", self.network)
            log.debug("receive callback failure", exc_info=True)

    def _deliver_batch(self, fn: Any, frames: list[Message], ep: Endpoint, flags: int) -> None:
        try:
            fn(frames, ep, flags)
        except Exception:
            self._misc_log(logging.ERROR, "%s: receive callback failed", self.network)
            log.debug("receive callback failure", exc_info=True)

    def _take_hello(self, conn: _Conn, frames: list[Message]) -> list[Message]:
        """Notes the capability hello among `frames` on `conn` (answering it with ours on an
        inbound connection); returns the other frames. Only a connection's first hello
        counts: a peer says once what it takes, and each change the owner is told of may cost
        a kernel call (the TUN's offload) and a log line. Later ones are dropped."""
        rest = []
        for frame in frames:
            if isinstance(frame, bytes) and frame[0] == _HELLO_BYTE and (
                caps := parse_hello(frame)
            ):
                if conn.hello_seen:
                    continue
                conn.caps = caps
                conn.hello_seen = True
                if not conn.outbound and self.hello is not None:
                    self._send_iov(conn, [encode_frame(self.hello)])
                if conn.trusted:  # else when it becomes trusted (_trust)
                    self._notify_caps()
            else:
                rest.append(frame)
        return rest

    def _notify_caps(self) -> None:
        changed = self.caps_changed
        if changed is None:
            return
        try:
            changed()
        except Exception:
            self._misc_log(logging.ERROR, "%s: capability callback failed", self.network)
            log.debug("capability callback failure", exc_info=True)

    def _conn_gone(self, conn: _Conn, reason: str) -> None:
        conn.shutdown(reason)
        with self._lock:
            if self._conns.get(conn.ep) is conn:
                del self._conns[conn.ep]
                # Strangers' connections come and go without changing the count.
                self._recount = self._recount or conn.trusted
        with conn.send_lock:  # no sender may be inside sendall() when the fd number is freed
            conn.sock.close()
        if conn.reason.startswith("send"):
            self._send_failures += 1
        if conn.hello_seen and conn.trusted:
            self._notify_caps()
        if not self._closed.is_set():
            level = logging.WARNING if conn.reason.startswith("framing") else logging.INFO
            say = log.log if conn.outbound or conn.trusted else self._churn_log
            say(level, "%s: %s connection %s closed: %s", self.network,
                "outbound" if conn.outbound else "inbound", display_endpoint(conn.ep),
                conn.reason)
        conn.done.set()

    # -- dialling ----------------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        step = min(self.backoff_max, self.backoff_min * 2.0 ** min(failures - 1, 30))
        # Jitter keeps two sides (or many peers) from redialling in lockstep: the lower half
        # of the step, never below backoff_min, so the first step spreads upward instead (a
        # shared outage ends with every peer's first redial).
        low = max(step / 2, self.backoff_min)
        return random.uniform(low, min(max(step, low * 1.5), self.backoff_max))  # noqa: S311

    def _dial(self, d: _Dialer) -> socket.socket:
        ep = d.ep
        addr: Any
        if ep.kind == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            addr = (int(ep.host), ep.port)
        elif ep.kind == "inet":
            ipv6 = ":" in str(ep.host)
            sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET,
                                 socket.SOCK_STREAM)
            addr = inet_sockaddr(ep, ipv6)  # a link-local peer's zone as the scope id
            try:
                self._sync_mark(sock)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = str(ep.host)
        d.sock = sock
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(addr)
            self._configure(sock)
        except OSError as exc:
            sock.close()
            if ep.kind == "vsock":
                raise vsock_connect_error(exc) from None
            raise
        except BaseException:
            sock.close()
            raise
        finally:
            d.sock = None
        return sock

    def _dial_loop(self, d: _Dialer) -> None:
        name = display_endpoint(d.ep)
        retired = d.retired
        try:
            while not retired.is_set():
                if d.failures:
                    d.state = "backoff"
                    if retired.wait(self._backoff(d.failures)):
                        break
                with self._lock:
                    closing = self._closed.is_set() or retired.is_set()
                    # Messages older than redial_idle are stale; nobody is waiting on them.
                    if not closing and time.monotonic() - d.active_at > self.redial_idle:
                        del self._dialers[d.ep]
                        d.state = "idle"
                        log.info("%s: nothing to send to %s; stopped redialling", self.network,
                                 name)
                        return
                if closing:
                    break
                d.state = "connecting"
                try:
                    sock = self._dial(d)
                # Unreachable or unusable (OverflowError: a port no socket takes).
                except (OSError, ValueError, TypeError, OverflowError) as exc:
                    if retired.is_set():
                        break
                    d.failures += 1
                    d.last_error = str(exc)
                    if d.failures == 1:
                        log.info("%s: cannot connect to %s: %s (attempt 1); trying again, "
                                 "%g to %g s apart, while there is something to send",
                                 self.network, name, exc, self.backoff_min, self.backoff_max)
                    else:
                        log.debug("%s: cannot connect to %s: %s (attempt %d)", self.network,
                                  name, exc, d.failures)
                    continue
                conn = d.conn = _Conn(sock, d.ep, outbound=True, send_timeout=self.send_timeout)
                try:
                    self._start_reader(conn)  # replies may arrive while the queue drains
                except RuntimeError as exc:  # no thread to be had: try again later
                    d.conn = None
                    sock.close()
                    d.failures += 1
                    d.last_error = str(exc)
                    log.warning("%s: cannot read from %s: %s", self.network, name, exc)
                    continue
                if self._flush_and_register(d, conn):
                    d.state = "connected"
                    log.info("%s: connected to %s", self.network, name)
                    if conn.hello_seen:
                        # The peer's hello beat the registration: its notice found no
                        # connection with it, so tell again now that there is one.
                        self._notify_caps()
                conn.done.wait()
                d.conn = None
                if retired.is_set():
                    break
                d.reconnects += 1
                d.active_at = time.monotonic()
                d.last_error = conn.reason
                # A connection that lasted is stable; so is one that died young after
                # delivering frames (a peer restarting), but only once in a row: a listener
                # that sends a frame and hangs up every time is backed off from.
                if time.monotonic() - conn.since >= STABLE_AFTER:
                    d.failures = d.quick_drops = 0
                elif conn.got_frame and not d.quick_drops:
                    d.failures, d.quick_drops = 0, 1
                else:
                    d.failures += 1
                    d.quick_drops += 1
                d.state = "reconnecting"
        finally:
            with self._lock:
                # Gone for whatever reason: the next send must start a fresh dialler.
                if self._dialers.get(d.ep) is d:
                    del self._dialers[d.ep]

    def _publish(self, conn: _Conn) -> None:
        """Makes CONN the one its endpoint's sends use; under self._lock. A fwmark set while
        it was being made (set_mark did not see it yet) is given to it here."""
        with contextlib.suppress(OSError):  # a refused mark failed set_mark already
            self._sync_mark(conn.sock)
        self._conns[conn.ep] = conn
        self._recount = self._recount or conn.trusted

    def sessions_ended(self) -> None:
        """A dialler without a connection holds messages made with sessions (and a private
        key) that are gone: they must not go out on the connection it would make later. One
        that is connected has nothing queued: it stays, as the other side may reach us only
        on its connection once the link is up again."""
        with self._lock:
            conns = self._retire([d for ep, d in self._dialers.items()
                                  if d.conn is None or self._conns.get(ep) is not d.conn])
        for c in conns:  # still sending what was queued
            c.shutdown("sessions ended")

    def _retire(self, dialers: list[_Dialer]) -> list[_Conn]:
        """Under self._lock: DIALERS stop and drop what they queued; returns their
        connections not yet published (the dial loop closes those, seeing them retired)."""
        for d in dialers:
            del self._dialers[d.ep]
            d.pending.clear()
            d.retired.set()
            s = d.sock
            if s is not None:  # still connecting
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        return [c for d in dialers if (c := d.conn) is not None]

    def peers_changed(self, endpoints: AbstractSet[Endpoint],
                      earlier: AbstractSet[Endpoint] = frozenset()) -> AbstractSet[Endpoint]:
        """A dialler whose endpoint is not in `endpoints` stops, dropping what it queued
        (made for a peer since removed), and a connection we dialled to one is closed: else
        they stayed, redialled when closed, until the other end had been away for
        redial_idle. One in `earlier` (a peer's endpoint before it was re-pointed) stays
        while its connection is up, as the other side may reach us only there; one still
        dialling there has reached nobody, and stops. Inbound connections stay: their peers
        dialled them, and a table of them is kept full by _make_room alone."""
        self._recount = True
        with self._lock:
            if self._closed.is_set():
                return frozenset()
            # Every connection we dialled is its dialler's (d.conn), published or still
            # sending what was queued.
            kept = {ep for ep in earlier if (d := self._dialers.get(ep)) is not None
                    and (c := d.conn) is not None and not c.closed}
            conns = self._retire([d for ep, d in self._dialers.items()
                                  if ep not in endpoints and ep not in kept])
            conns += [c for c in self._conns.values()
                      if c.outbound and c.ep not in endpoints and c.ep not in kept]
        for c in conns:
            c.shutdown("no peer has this endpoint any more")
        return kept

    def _set_patience(self) -> None:
        """A waiting send waits the whole send timeout while one peer has a connection, and
        STALL_PATIENCE while more do (see there). Asked by the next send after connections
        came, went or were trusted; the owner says which are some peer's current endpoint
        (not under self._lock: the owner takes its own)."""
        self._recount = False
        with self._lock:
            conns = list(self._conns.values())
        check = self.authenticated
        peers = sum(1 for c in conns
                    if c.trusted and not c.closed and (check is None or check(c.ep)))
        patience = self.send_timeout if peers <= 1 else min(STALL_PATIENCE, self.send_timeout)
        for c in conns:
            c.patience = patience

    def _flush_and_register(self, d: _Dialer, conn: _Conn) -> bool:
        """Send what queued up while dialling, then publish the connection for direct sends."""
        while True:
            with self._lock:
                if d.retired.is_set() or self._closed.is_set() or conn.closed:
                    conn.shutdown(conn.reason or "bind closed")
                    return False
                if not d.pending:
                    self._publish(conn)
                    return True
                batch = list(d.pending)
                d.pending.clear()
            sent = 0
            for i, frame in enumerate(batch):
                went = conn.send(frame)
                if went == SENT:
                    sent += len(frame) - HEADER_SIZE
                elif not went:
                    with self._lock:
                        # Keep the unsent ones for the next connection, newest winning.
                        rest = batch[i:] + list(d.pending)
                        d.pending.clear()
                        d.pending.extend(rest)
                    self._report_sent(d.ep, sent)
                    return False
            self._report_sent(d.ep, sent)

    def _report_sent(self, ep: Endpoint, size: int) -> None:
        report = self.sent_later
        if size and report is not None:
            report(ep, size)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            conns = [
                {
                    "endpoint": display_endpoint(c.ep),
                    "direction": "out" if c.outbound else "in",
                    "age": round(now - c.since, 3),
                    "stalled": c.stalled_at > 0,
                    "dropped": c.dropped,
                }
                for c in self._conns.values()
            ]
            dialers = [
                {
                    "endpoint": display_endpoint(d.ep),
                    "state": d.state,
                    "reconnects": d.reconnects,
                    "failures": d.failures,
                    "pending": len(d.pending),
                    "dropped": d.dropped,
                    "last_error": d.last_error,
                }
                for d in self._dialers.values()
            ]
        return {
            "network": self.network,
            "stream": True,
            "open": self.is_open,
            "port": self.port,
            "path": self._unix_path,
            "connections": conns,
            "dialers": dialers,
            "accepted": self._accepted,
            "refused": self._refused,
            "framing_errors": self._framing_errors,
            "send_failures": self._send_failures,
            "dropped_no_connection": self._dropped_no_conn,
        }

