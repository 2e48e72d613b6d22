"""The device: joins the protocol core, a TUN interface, a transport and the UAPI socket.

Threads, chosen so each blocking call has one owner:
- the TUN reader (packets from the kernel -> `Engine.encapsulate` -> transport); on a stream
  transport it hands the TUN to the reader of a trusted connection (`_TunShare`) and waits
  until it comes back (that connection is gone, or a send of its reader could not wait), so
  one thread carries both directions: no second thread to wake and no GIL hand-over per
  packet (bench/README.md, twelfth round);
- the transport's own reader threads (messages -> `Engine.decapsulate` -> TUN or transport);
- the timer thread (`Engine.update_timers`), which also notices MTU changes and the interface
  being deleted;
- the UAPI server's threads (`uapi_get` / `uapi_set`).
The engine is not thread-safe, so every call into it holds `_lock`; the resulting actions are
carried out after the lock is released, so a slow socket never stalls the other direction.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from mypy_extensions import mypyc_attr

from ..conn.bind import Bind, Message, RateLimitedLog, SharedFile
from ..conn.caps import (
    CAP_PARTIAL_CSUM,
    CAP_SEGMENT_SIZE,
    CAP_SUPER,
    CAP_UNCHECKED_TRANSPORT,
    encode_hello,
)
from ..conn.endpoint import Endpoint, display_endpoint, without_source
from ..conn.framing import MAX_STREAM_MTU
from ..core.engine import DROP, REPLY, SEGMENTED, SEND, TUNNEL, Action, Engine
from ..core.messages import (
    MIN_SEGMENT_SIZE,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    segment_trailer,
)
from ..core.peer import Peer
from ..core.ratelimit import LoadTracker
from ..threads import NamedThread, Survivor
from .tun import (
    GSO_MAX_SIZE,
    NATIVE_SEGMENTATION,
    READ_GSO_MAX_SIZE,
    VNET_HDR_LEN,
    LinkEvents,
    Tun,
    complete_checksum,
    parse_offload,
    space_ipv4_ids,
    split_tso,
)
from .uapi import DEFAULT_RUN_DIR, DeviceConfig, DeviceStatus, PeerStatus, UAPIError, UAPIServer

log = logging.getLogger("wgvsock.device")

DEFAULT_MTU: Final = 1420
# The timer thread sleeps until the engine's next deadline, but never longer than this: the
# interface is checked (deleted? MTU changed?) this often. It is also why sleeping through a
# deadline armed meanwhile (by a packet, a handshake or a UAPI set) costs no precision: every
# deadline is armed at least a second ahead (the shortest persistent keepalive), and the
# thread looks again within half of that. Idle, it wakes twice a second, not 20 times.
_WATCH_EVERY: Final = 0.5
# While packets flow it still looks every 50 ms, as it always did: with deadlines alone, pings
# through the tunnel were 3-7 % slower in three A/B runs on the bench VM (bench/README.md,
# eighteenth round); a thread that wakes often keeps the data path's caches warmer there.
_BUSY_TICK: Final = 0.05
# Handshake messages seen within one window count as the "queue" wireguard-go measures: it
# processes handshakes from a 1024-deep queue and is under load at 1/8 of that.
_LOAD_WINDOW: Final = 0.1
_LOAD_CAPACITY: Final = 1024
# Under load, how many handshake messages one window answers from sources it answered none of
# yet (the first of each), and how many more from those it did, first come. The rest are
# dropped unless they carry a valid mac2 (_on_receive), as wireguard-go's full queue drops what
# comes: its workers answer a cookie in microseconds, our reader (the thread that carries the
# tunnel's data too) in about 40 us, an XChaCha20-Poly1305 seal and a send, so these are a
# tenth of its time. A source's first answer is kept apart, so one flooding source cannot use
# them all up; its others are not refused outright, since a source address proves nothing
# before mac2: whoever sent as a peer would then shut the peer out with a message a window.
_ANSWER_LIMIT: Final = _LOAD_CAPACITY // 8
# Packets the kernel may queue on the TUN for our reads. Its default, 500, overflowed when one
# GSO send of the kernel's TCP arrived as 45 MTU-sized packets (offload off) faster than we
# read them, and TCP took every drop as congestion: 1000-4000 retransmits per 4 s iperf3 run
# at MTU 1420, none at 1000.
TUN_QUEUE_LEN: Final = 1000
# The lanes (_lane.c): the steady state of a tunnel with one peer that takes super-packets, in
# one C call each way. A compiled build has them (Device's `lanes` turns them off: the
# daemon's WGVSOCK_LANES=0, to compare or to rule them out).
_send_lane: Any = None
_recv_lane: Any = None
try:
    from ._lane import recv_lane as _recv_lane
    from ._lane import send_lane as _send_lane
except ModuleNotFoundError as e:
    if e.name != f"{__package__}._lane":
        raise
# What the send lane needs of the peer's hello: it sends a packet whole, its checksum partial,
# with CRC 0.
_LANE_CAPS: Final = CAP_SUPER | CAP_PARTIAL_CSUM | CAP_UNCHECKED_TRANSPORT
# Counters reserved for one send lane call, and the frames' bytes it makes at most: its share
# of the TUN before the device's other work (a timer tick, a UAPI request) gets a turn.
_LANE_PACKETS: Final = 64
_LANE_BYTES: Final = 256 * 1024
# What one TUN read with offload holds at most, and the room the lane needs around it.
_LANE_READ: Final = READ_GSO_MAX_SIZE + VNET_HDR_LEN + 64
# Most TUN packets, and bytes, taken per wake-up of the TUN reader (what is already queued, no
# waiting). The byte cap keeps the engine lock short for the receiving thread: a batch of 64
# super-packets held it for milliseconds and cost a third of the throughput at MTU 65000.
_READ_BATCH: Final = 64
_READ_BYTES: Final = 64 * 1024
# With cutting in C (tun.NATIVE_SEGMENTATION), the TUN is read with offload for a peer that
# takes no super-packets too, while a full one holds at least four segments: one read then
# replaces four or more, for a copy and a checksum in C. At MTU 65000 each read is one packet
# either way, and the copy and checksum only cost (bench/README.md, twenty-first round).
_CUT_UP_TO_MTU: Final = GSO_MAX_SIZE // 4
# How long the timer thread may go without finishing a tick, or the TUN reader without coming
# round its loop, before the device counts as stuck (`stalled`). Either can legitimately block
# in one send for the stream transport's send timeout (5 s, a peer that stopped reading), so
# the limit sits above that.
STALL_LIMIT: Final = 8.0
# Peers one interface may have, as wireguard-go's MaxPeers: each costs memory and a share of
# every timer tick, and a set request may name a great many.
MAX_PEERS: Final = 1 << 16
# The TUN reader's longest wait for a packet: it notes the time on each pass, and an idle
# tunnel must not look like a hung reader.
_TUN_POLL_MS: Final = 1000
# A session that expires within this many seconds of a packet being read counts as gone
# (_read_for_peer): the packet may be staged by the time it is sealed.
_STAGE_MARGIN: Final = 1.0
# Bound once: the clock is read for every pass and every receive.
_monotonic: Final = time.monotonic


class Trailed:
    """A packet read from the TUN and the segment-size trailer to seal right after it
    (Engine.encapsulate's `tail`): joining the two cost a copy of up to 64 KiB per
    super-packet finer than the MTU (bench/README.md, "the trailer sealed as a tail")."""

    def __init__(self, packet: bytes | bytearray | memoryview, tail: bytes) -> None:
        self.packet = packet
        self.tail = tail

    def __len__(self) -> int:
        return len(self.packet) + len(self.tail)


# What one TUN read gives (Device._tun_reader).
TunRead = Sequence[bytes | bytearray | memoryview | Trailed]


def _src_key(ep: Endpoint) -> bytes:
    """A cookie's source: the address and port, as wireguard-go binds it to a datagram's; for
    an inbound stream connection the host alone. Its port, or the connection, is new each
    time the peer reconnects, and a cookie bound to it was lost whenever its connection was
    closed (to make room, say) before the retry that needs it."""
    if ep.conn_id:
        return f"{ep.kind}|{ep.host}".encode()
    return f"{ep.kind}|{ep.host}|{ep.port}".encode()


def _limit_key(ep: Endpoint) -> bytes:
    """The handshake rate limit's source: the host (an IPv6 one by its /64, as wireguard-go),
    so a new port or connection from it is no new allowance."""
    if ep.kind == "inet":
        # inet_pton: an ipaddress object took 4 us, on every handshake message of a flood.
        host = str(ep.host)
        if ":" in host:
            return b"inet|" + socket.inet_pton(socket.AF_INET6, host.partition("%")[0])[:8]
        return b"inet|" + socket.inet_pton(socket.AF_INET, host)
    return f"{ep.kind}|{ep.host}".encode()


_UNANSWERED: Final[list[Action]] = [
    (DROP, None, "under load: past the handshake messages answered in this window")]
_NO_LINK: Final = {"wgvsock_conn": "none"}
# A dialler's own states, reduced to what an operator acts on: "backoff" means connects keep
# failing, which is worth telling apart from a dial in progress.
_DIALER_CONN: Final = {
    "connecting": "dialing",
    "reconnecting": "dialing",
    "backoff": "backoff",
    "connected": "connected",
}


def _link_states(status: dict[str, Any]) -> dict[str, dict[str, str]] | None:
    """Per displayed endpoint, the read-only `wgvsock_conn` / `wgvsock_reconnects` UAPI keys
    for the status dashboard; None for datagram transports, which have no connections."""
    if "connections" not in status:
        return None
    links: dict[str, dict[str, str]] = {}
    for d in status.get("dialers", ()):
        links[d["endpoint"]] = {
            "wgvsock_conn": _DIALER_CONN.get(d["state"], "none"),
            "wgvsock_reconnects": str(d["reconnects"]),
        }
    for c in status["connections"]:
        # Stalled: it stopped reading our sends (stream.STALL_PATIENCE).
        state = "stalled" if c.get("stalled") else "connected"
        links.setdefault(c["endpoint"], {})["wgvsock_conn"] = state
    return links


class _TunShare(SharedFile):
    """The TUN as the stream transport's SharedFile: the reader thread of one trusted
    connection serves it (Device._tun_pass) while the device's TUN reader waits, so one
    thread carries both directions of the tunnel. The TUN reader takes over again when that
    connection is gone, or while what one of its sends could not send at once is left."""

    def __init__(self, device: Device, fd: int) -> None:
        self.device = device
        self.fd = fd
        self.taken = False
        # The TUN reader is in a pass (its sends wait, holding a connection's send lock): the
        # TUN is not taken then, so a connection's reader never queues behind it for long.
        self.busy = False
        # Given back since the TUN reader last looked: it then flushes what the connection's
        # reader could not send at once. The pipe wakes it, in poll() wherever it waits.
        self.returned = False
        self.nudge_r, self.nudge_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._survivor = Survivor(f"{device.ifname}: TUN reader (in a connection's reader)")

    def take(self) -> bool:
        # Not while the TUN reader is in a pass or has yet to flush what came back with the
        # TUN: its flush ends by declaring the transport uncongested, which must not hide a
        # tail that a new server left meanwhile.
        if self.taken or self.busy or self.returned:  # unlocked: asked on every receive
            return False
        with self._lock:
            if self.taken or self.busy or self.returned or self.device._stopped.is_set():
                return False
            self.taken = True
            return True

    def enter(self) -> bool:
        """The TUN reader starts a pass, unless the TUN was taken."""
        with self._lock:
            if self.taken:
                return False
            self.busy = True
            return True

    def leave(self) -> None:
        self.busy = False

    def serve(self, ready: bool) -> bool:
        device = self.device
        if device._stopped.is_set():
            return False
        try:
            if ready:
                device._tun_pass()
                return True
        except BlockingIOError:
            pass
        except OSError as e:
            if device._tun_failed(e):
                return False
        except Exception as e:
            if not self._survivor.survive(e):
                device.fail("the TUN reader kept failing")
                return False
        device._tun_passed = time.monotonic()
        return True

    def give_back(self) -> None:
        with self._lock:
            self.taken = False
            self.returned = True
        if self.device._stopped.is_set():  # close() may have closed the pipe
            return
        with contextlib.suppress(OSError):  # full: a nudge is pending anyway
            os.write(self.nudge_w, b"x")

    def take_nudges(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.nudge_r, 4096)

    def close(self) -> None:
        os.close(self.nudge_r)
        os.close(self.nudge_w)


def _port_error(port: int, e: OSError | ValueError) -> UAPIError:
    """The transport's refusal to listen on PORT, as a UAPI set reports it: the port given at
    start (Device's port) and one set later are refused alike."""
    if isinstance(e, ValueError):
        return UAPIError(errno.EINVAL, f"cannot listen on port {port}: {e}")
    code = errno.EADDRINUSE if e.errno == errno.EADDRINUSE else errno.EIO
    why = e.strerror or str(e)
    return UAPIError(code, f"cannot listen on port {port}: {why}", why)


# Compiled, a class cannot be patched; a test that stands in for the TUN or the sends
# subclasses it instead (tests/test_device_set.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class Device:
    def __init__(
        self,
        ifname: str,
        bind: Bind,
        *,
        mtu: int = DEFAULT_MTU,
        run_dir: str = DEFAULT_RUN_DIR,
        offload: bool = True,
        lanes: bool = True,
        tun_fd: int = -1,
        uapi_fd: int = -1,
        port: int = 0,
    ) -> None:
        self.ifname = ifname
        self.bind = bind
        self.run_dir = run_dir
        self.offload = offload
        # The TUN and the listening UAPI socket the process that started us made, to serve
        # instead of making our own (-1: none; see Tun.adopt and UAPIServer).
        self._tun_fd = tun_fd
        self._uapi_fd = uapi_fd
        self._initial_mtu = mtu
        # The port start() listens on (0: one the system picks, until a set names one): a
        # role that knows its port binds it at once, rather than a random one first, which
        # the log named as the device's port and, on the Unix stand-in, left a socket of.
        self._initial_port = port
        self._wall_offset = time.time() - time.monotonic()
        # Fixed for the engine's handshake timestamps, which must only ever grow, whatever is
        # done to the wall clock meanwhile.
        self.engine = Engine(mtu=mtu, wall_offset=self._wall_offset,
                             forget_source=without_source)
        self.engine.stop()  # until the link is up (_sync_link), as a new interface is down
        self._lock = threading.Lock()
        # One configuration transaction at a time, whoever asks (a UAPI client, a role in
        # process), as wireguard-go's ipcMutex: a set's steps (fwmark, port, engine) are never
        # interleaved with another's, and a get never sees half of one.
        self._config_lock = threading.Lock()
        self._offload_lock = threading.Lock()
        # Peers' connections come and go at their will, each one a switch.
        self._offload_log = RateLimitedLog(10.0, log, burst=5)
        self._stopped = threading.Event()
        self.stop_reason = ""
        self._on_stop: Callable[[], None] | None = None
        self.failed = False  # stopped by a fault, not asked to: the daemon exits non-zero
        self.port = 0
        self.fwmark = 0
        self.tun: Tun | None = None
        self.uapi: UAPIServer | None = None
        self._threads: list[threading.Thread] = []
        # When the timer thread last finished a tick and the TUN reader last came round its
        # loop (monotonic): both take the engine lock and send, so a deadlock or a wedged send
        # on the data path shows here.
        self._ticked = self._tun_passed = 0.0
        # The link's ups and downs as the kernel announces them (_sync_link), and the lock that
        # makes reading them, reading the flags and applying the result one step, whichever
        # thread takes it: a state read by one thread must not be applied after a newer one.
        self._link_events: LinkEvents | None = None
        self._link_lock = threading.Lock()
        # Wakes the TUN reader at shutdown: closing a fd does not wake a read() blocked on it.
        self._wake_r = self._wake_w = -1
        # How the TUN is read (_tun_reader), and the TUN as the stream transport's SharedFile.
        self._tun_read: Callable[[], TunRead] = tuple
        # Whether the TUN holds a packet now (poll with no wait), asked before a pass reads on.
        self._tun_queued = select.poll()
        self._share: _TunShare | None = None
        # The lanes' buffers (one send lane runs at a time: the TUN is read by one thread at a
        # time, _TunShare; the receive lane runs under the lock), and the one peer's prefixes
        # as they take them, with the table's generation they were packed at.
        self._lanes = lanes and offload and _send_lane is not None
        self._lane_sbuf = bytearray(_LANE_BYTES + _LANE_READ) if self._lanes else bytearray()
        self._lane_rbuf = bytearray(_LANE_READ) if self._lanes else bytearray()
        self._lane_peer: Peer | None = None
        self._lane_generation = -1
        self._lane_prefixes = b""
        self._load = LoadTracker()
        self._hs_window_start = 0.0
        self._hs_window_count = 0
        # Under load, the sources (limit keys) this window answered a handshake message of,
        # and how many more it answered from them.
        self._answered: set[bytes] = set()
        self._answered_again = 0
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.max_peers = MAX_PEERS
        # The endpoints each peer was configured with (a UAPI set, connect_peer), the current
        # one last, kept while the peer is: it may have roamed from the current one, or be
        # reached on a connection we keep to one it was given before. An earlier one is
        # forgotten once the transport lets it go (_peers_changed), so that a peer re-pointed
        # without end does not grow this without end.
        self._configured: dict[Peer, dict[Endpoint, None]] = {}
        # Read-only keys the roles add to `get` (profile, role, attestation); `wg` ignores them.
        self.extra_status: dict[str, str] = {}
        # More such keys, computed at each `get` (the parent's firewall counters).
        self.status_hook: Callable[[], dict[str, str]] | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Creates the interface, binds the transport and serves UAPI. Raises on failure,
        leaving nothing behind."""
        if self.bind.stream and self._initial_mtu > MAX_STREAM_MTU:
            raise ValueError(f"MTU {self._initial_mtu} is above {MAX_STREAM_MTU}, the most a "
                             "stream transport can frame")
        try:
            self.tun = self._create_tun()
            self.ifname = self.tun.name
            self.tun.set_mtu(self._initial_mtu)
            self.tun.set_txqueuelen(TUN_QUEUE_LEN)
            self.tun.mtu_hint = self.engine.mtu = self._initial_mtu
            self.tun.set_blocking(False)
            # Listening before the first look at the flags, so that no change falls between.
            self._link_events = LinkEvents(self.tun.ifindex())
            self._sync_link()  # no peers yet: nothing to send
            self._tun_read = self._tun_reader(self.tun)
            self._tun_queued.register(self.tun.fileno(), select.POLLIN)
            self._share = self.bind.shared = _TunShare(self, self.tun.fileno())
            self.bind.receive_batch = self._on_receive_batch
            self.bind.authenticated = self._authenticated
            self.bind.caps_changed = self._caps_changed
            self.bind.sent_later = self._sent_later
            if self.bind.stream:
                # Tells each stream peer what it may send us: transport frames without a CRC
                # always; with offload, also super-packets and partial checksums, which our
                # TUN hands to the kernel to finish (Tun.write).
                flags = CAP_UNCHECKED_TRANSPORT
                super_packets = self.offload and self.tun.vnet
                if super_packets:
                    flags |= CAP_SUPER | CAP_PARTIAL_CSUM | CAP_SEGMENT_SIZE
                self.bind.hello = encode_hello(flags, GSO_MAX_SIZE if super_packets else 0)
            try:
                self.port = self.bind.open(self._initial_port, self._on_receive)
            except (OSError, ValueError) as e:
                if not self._initial_port:
                    raise
                raise _port_error(self._initial_port, e) from e
            self._caps_changed()
            self.uapi = UAPIServer(self.ifname, self, self.run_dir, fd=self._uapi_fd)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise
        self._ticked = self._tun_passed = time.monotonic()
        for target, name in ((self._tun_loop, "tun"), (self._timer_loop, "timers")):
            t = NamedThread(target=target, name=f"{self.ifname}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "interface %s up: network %s, port %d, mtu %d",
            self.ifname, self.bind.network, self.port, self._initial_mtu,
        )

    def _create_tun(self) -> Tun:
        # With a virtio-net header our TUN writes can merge runs of TCP into super-packets
        # (Tun.write_batch) whatever the peer, as wireguard-go's do. Reads give super-packets
        # and partial checksums (_caps_changed; never with offload off) while a peer takes
        # them: one read then returns up to 64 KiB of TCP that goes out as one message; and
        # for any other peer at MTUs up to _CUT_UP_TO_MTU in a compiled build, which cuts and
        # checksums them in C (one read instead of up to 47). Otherwise the kernel cuts and
        # checksums before we read, which costs a fraction of doing it in Python (split_tso
        # took 260 us per 64 KiB at MTU 1420, a Python checksum 126 us per 64 KiB).
        adopted = self._tun_fd >= 0
        # A TUN handed over has the flags it was made with: without a virtio-net header it is
        # read and written as one made where offload could not be set up.
        tun = Tun.adopt(self._tun_fd, self.ifname) if adopted else Tun.create(self.ifname,
                                                                               offload=True)
        if not tun.vnet:
            return tun
        try:
            tun.set_gso_max_size(READ_GSO_MAX_SIZE)
            tun.set_offload(False)
        except OSError as e:
            log.warning("%s: cannot set up offload (%s); segmentation offload off", tun.name, e)
            if adopted:  # one handed over cannot be made again without the header
                self.offload = False
                tun.set_offload(False)
                return tun
            tun.close()
            return Tun.create(self.ifname)
        return tun

    def _caps_changed(self) -> None:
        """A stream peer's capabilities came or went: TUN reads give super-packets and partial
        checksums while some connected peer takes both, or at MTUs up to _CUT_UP_TO_MTU where
        they are cut and checksummed in C (tun.NATIVE_SEGMENTATION) for a peer that takes
        neither, and for every datagram peer: one read of up to 64 KiB then costs less than
        the kernel's segments read one by one. Also asked when the MTU changed."""
        tun = self.tun
        if tun is None or not tun.vnet or not self.offload:
            return
        with self._offload_lock:
            want = (NATIVE_SEGMENTATION and self.engine.mtu <= _CUT_UP_TO_MTU) or (
                self.bind.stream and self.bind.any_peer_has(CAP_SUPER | CAP_PARTIAL_CSUM))
            if want == tun.offloading:
                return
            try:
                tun.set_offload(want)
            except OSError as e:
                if not self._stopped.is_set():
                    log.warning("%s: cannot switch segmentation offload: %s", self.ifname, e)
                return
        self._offload_log(logging.INFO, "%s: segmentation offload %s", self.ifname,
                          "on" if want else "off")

    def stop(self, reason: str) -> None:
        if not self._stopped.is_set():
            self.stop_reason = reason
            log.info("%s: shutting down: %s", self.ifname, reason)
            self._stopped.set()
            if self._on_stop is not None:
                self._on_stop()

    def on_stop(self, hook: Callable[[], None]) -> None:
        """HOOK runs (on the thread that stops it) when the device stops by itself or is
        asked to with stop(); not on close(). At once if it has stopped already."""
        self._on_stop = hook
        if self._stopped.is_set() and self.stop_reason:
            hook()

    def fail(self, reason: str) -> None:
        """Stops the device because part of it broke (see wgvsock.threads)."""
        if not self._stopped.is_set():
            self.failed = True
        self.stop(reason)

    def stalled(self, now: float, limit: float = STALL_LIMIT,
                excused: Callable[[float, float], float] | None = None) -> str | None:
        """Why the device counts as stuck at monotonic `now`, or None: its timer thread has not
        finished a tick, or its TUN reader has not come round its loop, within `limit` seconds
        (for systemd's watchdog). The transport's receiving threads are not judged: they wait
        on their peers, which may be silent for any time. `excused(since, now)`: how much of
        that span not to count (the process was frozen), in the judgment and the figure said."""
        if self._stopped.is_set() or not self._threads:
            return None
        for thread, since in (("timer thread has not finished a tick", self._ticked),
                              ("TUN reader has not come round its loop", self._tun_passed)):
            behind = now - since - (excused(since, now) if excused is not None else 0.0)
            if behind > limit:
                return (f"interface {self.ifname}: the {thread} for {behind:.0f} s "
                        "(data path stuck)")
        return None

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def close(self) -> None:
        """Removes the UAPI socket, closes the transport and deletes the interface."""
        self._stopped.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self.uapi is not None:
            self.uapi.close()
        self.bind.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2.0)
        if self.tun is not None:
            # The TUN is not persistent: closing its last fd deletes the interface. Closed only
            # after the reader has returned, so its fd number cannot be reused under it.
            self.tun.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        with self._link_lock:  # not under a data path's _sync_link
            if self._link_events is not None:
                self._link_events.close()
                self._link_events = None
        self._wake_r = self._wake_w = -1
        if self._share is not None:
            self._share.close()
            self._share = None

    # -- data paths ----------------------------------------------------------------------

    def _perform(self, actions: Iterable[Action]) -> None:
        for kind, target, data in actions:
            if kind == SEND:
                peer: Peer = target
                ep = peer.endpoint  # see _send
                if ep is not None:
                    sent = self.bind.send(data, ep)
                    if sent:
                        peer.tx_bytes += sent
            elif kind == REPLY:
                self.bind.send(data, target)
            elif kind in (TUNNEL, SEGMENTED):
                self._write(data, True, target if kind == SEGMENTED else 0)
            elif kind == DROP and self._debug:
                log.debug("%s: dropped: %s (%s)", self.ifname, data, target)

    def _perform_batch(self, actions: list[Action]) -> None:
        """_perform for the actions of many packets: consecutive messages to one peer go to
        the transport together, so it can send them in one system call."""
        batch: list[bytes] = []
        dest: Any = None
        for action in actions:
            kind, target, data = action
            if kind == SEND:
                if batch and target is not dest:
                    self._send(dest, batch)
                    batch = []
                dest = target
                batch.append(data)
                continue
            if batch:
                self._send(dest, batch)
                batch = []
            self._perform((action,))
        if batch:
            self._send(dest, batch)

    def _send(self, peer: Peer, messages: list[bytes]) -> None:
        """Sends a peer's messages to its endpoint, where it is now (a message that roamed it
        may have come since they were sealed), and counts in its tx_bytes what the transport
        took, as wireguard-go does: not what it dropped, for want of a connection, say.
        Outside the lock: an integer attribute's update does not let another thread in, but
        a send does, and may wait for a stream peer's socket while other threads send to
        the peer. So the count is read after the send: `tx_bytes += send(...)` read it
        before, and wrote back over what they counted meanwhile."""
        ep = peer.endpoint
        if ep is not None:
            sent = self.bind.send_batch(messages, ep)
            if sent:
                peer.tx_bytes += sent

    def _sent_later(self, ep: Endpoint, size: int) -> None:
        """Messages a stream transport queued while it dialled `ep` went out on the connection
        it made (Bind.sent_later): counted for the peer there, or else for the one configured
        with `ep`, which has moved on since it queued them: to a connection the other side
        dialled (both sides have an endpoint, and the other's dialler came first), or
        re-pointed while the queue drained (Bind.peers_changed keeps a connection up)."""
        with self._lock:
            peers = self.engine.peers
            for peer in peers.values():
                if peer.endpoint == ep:
                    peer.tx_bytes += size
                    return
            for peer, eps in self._configured.items():
                if ep in eps and peers.get(peer.public_key) is peer:
                    peer.tx_bytes += size
                    return

    def _tun_loop(self) -> None:
        survivor = Survivor(f"{self.ifname}: TUN reader")
        while True:
            try:
                return self._read_tun()
            except Exception as e:
                if not survivor.survive(e):
                    raise  # to the thread-death hook, which stops the daemon

    def _tun_reader(self, tun: Tun) -> Callable[[], TunRead]:
        """How the TUN is read for this transport. Datagram transports take a TCP
        super-packet as MTU-sized packets; stream transports whole where the peer said it
        takes them."""
        if not self.bind.stream:
            return tun.read_segments
        if tun.vnet:
            return self._read_for_peer
        return lambda: (tun.read(),)

    def _read_tun(self) -> None:
        tun, share = self.tun, self._share
        assert tun is not None and share is not None
        monotonic = time.monotonic
        # Non-blocking reads, with poll() on the TUN and the wake pipe only when it is empty:
        # a read() blocked on the TUN fd would not return when the device is closed, and under
        # load the common path stays one system call per packet.
        poller = select.poll()
        poller.register(tun.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        poller.register(share.nudge_r, select.POLLIN)
        # Where it waits while a connection's reader serves the TUN: for the TUN back, or for
        # the end.
        parked = select.poll()
        parked.register(self._wake_r, select.POLLIN)
        parked.register(share.nudge_r, select.POLLIN)
        # After a read found the queue empty, the next step is poll(), not another read: an
        # EAGAIN costs a system call and an exception, and this loop would pay two per packet
        # on an idle tunnel.
        drained = False
        while not self._stopped.is_set():
            if share.taken:
                # A connection's reader serves the TUN (_TunShare); this thread waits until
                # it gives the TUN back. It notes no time meanwhile: the server does.
                parked.poll()
                share.take_nudges()
                continue
            if share.returned:
                # Given back: because that connection is gone, or because one of its sends
                # could not wait (the reader must go on reading its socket), whose rest this
                # thread sends now, waiting as it may.
                self.bind.flush()
                share.returned = False
                self._tun_passed = monotonic()
                drained = False
                continue
            if drained:
                self._tun_passed = monotonic()
                events = poller.poll(_TUN_POLL_MS)
                if not events:
                    continue
                for fd, _ in events:
                    if fd == share.nudge_r:
                        share.take_nudges()
                if share.taken or share.returned:
                    continue
                if self._stopped.is_set():  # close() sets it before it writes the wake pipe
                    return
                drained = False
            if not share.enter():
                continue
            try:
                drained = self._tun_pass()
            except BlockingIOError:
                drained = True
            except OSError as e:
                if self._tun_failed(e):
                    return
            finally:
                share.leave()

    def _tun_failed(self, e: OSError) -> bool:
        """A TUN read failed: whether the reading is over (the device is stopping, or its
        interface was removed, which stops it)."""
        if self._stopped.is_set():
            return True
        if e.errno in (errno.EBADFD, errno.EBADF, errno.EIO, errno.ENODEV):
            self.stop(f"interface {self.ifname} was removed")
            return True
        log.warning("%s: TUN read failed: %s", self.ifname, e)
        return False

    def _tun_pass(self) -> bool:
        """Reads what the TUN holds and sends it on: the packet at the head of the queue at
        once (asking the kernel first whether more is queued would put a system call in front
        of every packet of a ping or a request), then, if poll() says more queued meanwhile,
        that, never waited for, as one batch (one lock and one send for many packets). Raises
        BlockingIOError when the queue was empty; returns whether it is empty now."""
        if self._lanes:
            drained = self._send_by_lane()
            if drained is not None:
                return drained
        read = self._tun_read
        actions = self._seal_all(read())
        if len(actions) == 1:
            self._perform(actions)
        else:
            self._perform_batch(actions)
        if not self._tun_queued.poll(0):
            # The common end of a pass at low rates (a request, a ping): a read that found the
            # queue empty would cost an exception, and compiled code a traceback entry per frame.
            return True
        # An error other than EAGAIN shows up on the next read.
        batch: list[bytes | bytearray | memoryview | Trailed] = []
        size = 0
        drained = False
        try:
            while len(batch) < _READ_BATCH and size < _READ_BYTES:
                for packet in read():
                    batch.append(packet)
                    size += len(packet)
        except BlockingIOError:
            drained = True
        except OSError:
            pass
        if batch:
            # (The pass is noted again here: each pass may block in two sends, this batch's
            # and the first packet's, and only one of them may count against STALL_LIMIT.)
            self._perform_batch(self._seal_all(batch))
        return drained

    def _send_by_lane(self) -> bool | None:
        """A pass of _tun_pass in one C call (_lane.c's send_lane), in the steady state it
        knows: one peer, its current keypair short of every rekey limit, nothing staged, and
        a connection whose peer takes super-packets, partial checksums and CRC 0 (our own
        daemon with offload on). None: not now, take the ordinary path. Else whether the TUN
        is drained. The first packet the lane may not send as it is comes back, and goes
        the ordinary way."""
        engine, tun, bind, lock = self.engine, self.tun, self.bind, self._lock
        if tun is None or not tun.vnet or not bind.stream or len(engine.peers) != 1:
            return None
        lock.acquire()
        try:
            # (The count again, under the lock: a peer added since the look above makes the
            # one peer's prefixes no longer the routing table.)
            if not engine.running or len(engine.peers) != 1:
                return None
            peer = next(iter(engine.peers.values()))
            ep, kp = peer.endpoint, peer.keypairs.current
            now = self._tun_passed = _monotonic()
            if (ep is None or kp is None or peer.staged or now - kp.created >= REKEY_AFTER_TIME
                    or kp.send_nonce >= REKEY_AFTER_MESSAGES):
                return None
            # (Before the connection is held: nothing may raise between its hold and the try
            # that ends it.)
            prefixes = self._lane_prefixes_of(peer)
            held = bind.lane_begin(ep, _LANE_CAPS)
            if held is None:
                return None
            # Its counters, reserved: a keepalive the timer seals meanwhile takes the next.
            start = kp.send_nonce
            end = kp.send_nonce = min(start + _LANE_PACKETS, REKEY_AFTER_MESSAGES)
        finally:
            lock.release()
        hold, fd, max_packet = held
        try:
            packets, size, counter, drained, handback, unsent, partial, error = _send_lane(
                self._lane_sbuf, tun.fileno(), fd, kp.send, kp.header, start, end, engine.mtu,
                tun.mtu_hint, min(max_packet, GSO_MAX_SIZE), _LANE_BYTES, prefixes)
        except OSError:
            # Its first TUN read failed (_tun_pass's caller judges that): nothing went.
            bind.lane_end(hold, None, 0, 0)
            raise
        except BaseException:
            # Its counters stay spent: it may have sealed and sent with some before it raised
            # (sealing failed on a later packet; no memory for its result), and a counter
            # used twice is a nonce used twice. A gap costs the peer nothing. The connection
            # is closed: what went of the last frame is unknown, and half a frame would leave
            # the stream out of step.
            bind.lane_end(hold, None, 0, errno.EIO)
            raise
        # Outside the lock: a send of the rest may wait, while the connection's reader must
        # open what arrives meanwhile (held across it, two daemons sending bulk to each
        # other over Unix sockets stalled). Nobody else sends on the connection until then.
        lost = bind.lane_end(hold, unsent, partial, error)
        lock.acquire()
        try:
            if kp.send_nonce == end:
                kp.send_nonce = counter
            if packets:
                peer.timers.transport_sent(now, True)
                peer.tx_bytes += size - lost
        finally:
            lock.release()
        if handback is not None:
            if len(handback) > VNET_HDR_LEN:
                packet, mss, csum_start, csum_offset = parse_offload(handback)
                self._perform_batch(self._seal_all(
                    self._shape_for_peer(packet, mss, csum_start, csum_offset)))
            return False
        return bool(drained)

    def _lane_prefixes_of(self, peer: Peer) -> bytes:
        """The peer's allowed IPs as the lanes take them (AllowedIPs.packed_prefixes), packed
        again only when the table changed. Under the lock."""
        table = self.engine.allowed_ips
        if peer is not self._lane_peer or table.generation != self._lane_generation:
            self._lane_prefixes = table.packed_prefixes(peer)
            self._lane_peer = peer
            self._lane_generation = table.generation
        return self._lane_prefixes

    def _receive_by_lane(self, messages: list[Message], src: Endpoint,
                         partial_csum: bool) -> int:
        """The transport messages at the front of `messages` opened and written to the TUN
        in one C call (_lane.c's recv_lane), in the steady state it knows: one peer, from
        where it is, with its current keypair (no next one to confirm, short of every time
        limit). Returns how many it took (0: none; the rest go the ordinary way, from the
        first the lane was not sure of)."""
        engine, tun, lock = self.engine, self.tun, self._lock
        if tun is None or not tun.vnet or len(engine.peers) != 1:
            return 0
        lock.acquire()
        try:
            # (The count again, under the lock: a peer added since the look above makes the
            # one peer's prefixes no longer the routing table.)
            if not engine.running or len(engine.peers) != 1:
                return 0
            peer = next(iter(engine.peers.values()))
            kp = peer.keypairs.current
            now = _monotonic()
            if (kp is None or src is not peer.endpoint or peer.keypairs.next is not None
                    or now - kp.created >= REKEY_AFTER_TIME):
                return 0
            replay = kp.replay
            done, size, data, keepalives, last, error = _recv_lane(
                messages, self._lane_rbuf, tun.fileno(), kp.receive, kp.local_index,
                replay.ring, replay.last + 1, tun.mtu_hint, partial_csum,
                self._lane_prefixes_of(peer))
            if done:
                replay.last = last - 1
                timers = peer.timers
                # As the engine's per-message calls leave the timers: the first message with
                # data arms the keepalive, a second asks for another.
                if keepalives:
                    timers.transport_received(now, False)
                for _ in range(min(data, 2)):
                    timers.transport_received(now, True)
                peer.rx_bytes += size
        finally:
            lock.release()
        if error and self._debug:
            log.debug("%s: TUN write failed: %s", self.ifname, os.strerror(error))
        return int(done)

    def _seal_all(self, packets: TunRead) -> list[Action]:
        """The engine's actions for packets read from the TUN, under one hold of the lock;
        notes the pass's time. acquire() and release() rather than `with`: compiled, a
        with-statement on a lock looks up and binds __enter__ and __exit__ each time."""
        engine, lock = self.engine, self._lock
        if not engine.running:
            self._perform(self._sync_link())
        lock.acquire()
        try:
            now = self._tun_passed = _monotonic()
            if len(packets) == 1:
                packet = packets[0]
                if isinstance(packet, Trailed):
                    return engine.encapsulate(packet.packet, now, packet.tail)
                return engine.encapsulate(packet, now)
            actions: list[Action] = []
            for packet in packets:
                if isinstance(packet, Trailed):
                    actions += engine.encapsulate(packet.packet, now, packet.tail)
                else:
                    actions += engine.encapsulate(packet, now)
            return actions
        finally:
            lock.release()

    def _read_for_peer(self) -> TunRead:
        """A packet from the TUN (with offload, on a stream transport) in the shape the peer
        it is routed to takes: a TCP super-packet whole only if the peer's hello said it takes
        super-packets, else cut into MTU-sized segments (the Go seed, or our daemon with offload
        off, would write it to its TUN unsegmented, where forwarding drops it); a partial TCP
        checksum left so only if the peer said it finishes those, else completed here."""
        tun = self.tun
        assert tun is not None
        packet, mss, start, offset = tun.read_offload()
        return self._shape_for_peer(packet, mss, start, offset)

    def _shape_for_peer(self, packet: bytes | memoryview, mss: int, start: int,
                        offset: int) -> TunRead:
        """_read_for_peer for a packet read already (what the send lane gave back)."""
        tun = self.tun
        assert tun is not None
        if not start:
            return (packet,)
        with self._lock:
            engine = self.engine
            peer = engine.allowed_ips.lookup_packet_dst(packet)
            # One the peer has no session for is staged (Engine.send_data) and sealed once a
            # handshake completes, with whoever answered it, on the connection there is then:
            # the Go seed, say, that took the place of a peer that offered offload. Before,
            # staged packets kept the form chosen for the connection at hand when they were
            # read, and the seed wrote their partial checksums to its TUN. (The margin: a
            # batch's packets are sealed a little after they are read.)
            ep = None if peer is None or not engine.seals_now(
                peer, _monotonic() + _STAGE_MARGIN) else peer.endpoint
        if ep is None:
            flags = max_packet = 0  # staged or dropped: the form every peer takes
        else:
            flags, max_packet = self.bind.peer_caps(ep)
            # The hello's word, unchecked: what a frame holds caps it. Above GSO_MAX_SIZE a
            # 64 KiB read (READ_GSO_MAX_SIZE) went whole, with its segment size a message of
            # up to 65584 bytes that the transport dropped, and again at each retransmission.
            max_packet = min(max_packet, GSO_MAX_SIZE)
        # What the receiving side can finish (Tun.write) is a plain TCP packet: TCP (the
        # kernel's checksum at offset 16) right after the IP header, no IPv6 extension header
        # between them.
        v = packet[0]
        plain = offset == 16 and start == ((v & 0x0F) * 4 if v >> 4 == 4 else 40)
        if mss and not (flags & CAP_SUPER and plain):
            return split_tso(packet, start, mss)
        # A receiver cuts a super-packet at its own MTU (Tun.write). One the kernel cut finer
        # (a path MTU an ICMP "packet too big" taught it, a far end's small MSS) crosses with
        # its segment size if the peer takes that, else it is cut here in its own size:
        # beyond the parent every segment would be too big for the path again, and the
        # connection would stall (a PMTU black hole).
        # (A size below MIN_SEGMENT_SIZE, from a far end's MSS of 48-75, a receiver ignores:
        # it would cut at its own MTU, and at 65000 its forwarding refused every packet as too
        # big. Such segments are cut here too.)
        headers = start + (packet[start + 12] >> 4) * 4 if mss else 0
        finer = mss > 0 and mss + headers < tun.mtu_hint
        longer = mss > 0 and len(packet) > max_packet
        if finer and (not flags & CAP_SEGMENT_SIZE or mss < MIN_SEGMENT_SIZE):
            return split_tso(packet, start, mss)
        if longer:
            # Longer than the peer takes (the kernel hands us up to 64 KiB, READ_GSO_MAX_SIZE,
            # a message carries 65000): cut in whole segments into super-packets that fit.
            # Segments of the MTU need no size to cross, so a peer that takes none (wgvsock
            # before CAP_SEGMENT_SIZE) gets these too, not one message per segment.
            # Their TCP checksums stay partial for a peer that has its kernel finish them: it
            # writes every piece to its TUN as NEEDS_CSUM (Tun.write: a partial checksum is
            # known by its value, and a super-packet gets one anyway), so a sum over the
            # payload here would be thrown away. (`plain` holds here: checked above.)
            segments = max((max_packet - headers) // mss, 1)
            pieces = split_tso(packet, start, segments * mss, bool(flags & CAP_PARTIAL_CSUM))
            space_ipv4_ids(pieces, segments)
            if finer:
                trailer = segment_trailer(mss)
                return [Trailed(piece, trailer) for piece in pieces]
            return pieces
        out: bytes | bytearray | memoryview = packet
        if not (flags & CAP_PARTIAL_CSUM and plain):
            out = complete_checksum(packet, start, offset)
        if finer:
            return (Trailed(out, segment_trailer(mss)),)
        return (out,)

    def _on_receive(self, data: Message, src: Endpoint) -> None:
        now = _monotonic()
        # (A view is a transport message: conn.framing.VIEW_FROM.)
        if isinstance(data, bytes) and data[:1] in (b"\x01", b"\x02"):
            if not self.engine.running:
                self._perform(self._sync_link())
            with self._lock:
                engine = self.engine
                limit_key = _limit_key(src)
                if self._answered_enough(limit_key, now):
                    # A cookie reply to each message took the reader's whole time from 20000
                    # a second on, and the tunnel's data waited behind them. Only a valid mac2
                    # still passes (to the per-source limit), so a peer that got a cookie
                    # comes through; refusing a made-up one takes a hash, as junk does. Each
                    # counts towards the load unchecked: it comes after _ANSWER_LIMIT answered
                    # in this window. (Not counted, the load ended after a second, and the next
                    # 127 initiations each cost a DH before it began again.)
                    self._note_handshake(now)
                    src_key = _src_key(src)
                    vouched = engine.mac2_valid(data, src_key, now)
                    actions = engine.decapsulate(
                        data, src, now, src_key=src_key, limit_key=limit_key, under_load=True,
                    ) if vouched else _UNANSWERED
                else:
                    # Only a message with our mac1 counts towards being under load: junk with
                    # a handshake's type byte costs one hash, and counted it put a device
                    # under load for anyone, so that a peer's initiation got only a cookie
                    # reply.
                    vouched = engine.mac1_valid(data)
                    under_load = vouched and self._note_handshake(now)
                    actions = engine.decapsulate(
                        data, src, now, src_key=_src_key(src), limit_key=limit_key,
                        under_load=under_load,
                    )
                    if under_load and actions and actions[0][0] in (SEND, REPLY):
                        self._note_answer(limit_key)
            if vouched and src.conn_id:
                self.bind.handshake_seen(src)
        else:
            # (A message alone is written as _perform writes it: its checksum looked at.)
            if self._lanes and self._receive_by_lane([data], src, True):
                return
            with self._lock:
                actions = self.engine.decapsulate(data, src, now)
        self._perform(actions)

    def _on_receive_batch(self, messages: list[Message], src: Endpoint, flags: int) -> None:
        """Several messages from one endpoint (UDP GRO, one read of a stream): decrypted under
        one lock, and their packets written to the TUN together, so runs of one TCP flow merge
        into few writes. `flags`: what the hello on their connection offered
        (Bind.receive_batch)."""
        if any(isinstance(m, bytes) and m[:1] in (b"\x01", b"\x02") for m in messages):
            for m in messages:
                self._on_receive(m, src)
            return
        # Only from a peer that sends super-packets: the lane writes each packet alone, where
        # the ordinary path merges a run of MTU-sized TCP segments (the Go seed's, ours with
        # offload off) into one write; with the lane ours -> seed lost 20 % b->a at 1420
        # (bench/README.md, thirty-eighth round).
        if self._lanes and flags & CAP_SUPER:
            done = self._receive_by_lane(messages, src, bool(flags & CAP_PARTIAL_CSUM))
            if done == len(messages):
                return
            if done:
                messages = messages[done:]
        now = _monotonic()
        actions: list[Action] = []
        lock = self._lock
        lock.acquire()
        try:
            decapsulate = self.engine.decapsulate
            for m in messages:
                actions += decapsulate(m, src, now)
        finally:
            lock.release()
        # Only a sender whose hello offered CAP_PARTIAL_CSUM (our daemon, offload on) leaves
        # TCP checksums partial; the Go seed's packets, or a UDP peer's, need no looking at.
        partial_csum = bool(flags & CAP_PARTIAL_CSUM)
        packets = [data for kind, _, data in actions if kind == TUNNEL]
        if len(packets) != len(actions):
            if any(a[0] == SEGMENTED for a in actions):
                self._write_in_order(actions, partial_csum)
                return
            self._perform(a for a in actions if a[0] != TUNNEL)
        self._write_batch(packets, partial_csum)

    def _write_in_order(self, actions: list[Action], partial_csum: bool) -> None:
        """_on_receive_batch's writes when some packets came with their segment size: each of
        those goes alone, between the runs of the others, so that no TCP flow is reordered."""
        run: list[bytes] = []
        for action in actions:
            kind, target, data = action
            if kind == TUNNEL:
                run.append(data)
                continue
            if run:
                self._write_batch(run, partial_csum)
                run = []
            if kind == SEGMENTED:
                self._write(data, partial_csum, target)
            else:
                self._perform((action,))
        if run:
            self._write_batch(run, partial_csum)

    def _write(self, packet: bytes, partial_csum: bool, mss: int) -> None:
        try:
            self.tun.write(packet, partial_csum, mss)  # type: ignore[union-attr]
        except OSError as e:
            if self._debug:
                log.debug("%s: TUN write failed: %s", self.ifname, e)

    def _write_batch(self, packets: list[bytes], partial_csum: bool) -> None:
        try:
            self.tun.write_batch(packets, partial_csum)  # type: ignore[union-attr]
        except OSError as e:
            if self._debug:
                log.debug("%s: TUN write failed: %s", self.ifname, e)

    def _authenticated(self, ep: Endpoint) -> bool:
        # The engine points a peer at a source only after a message from it authenticated;
        # configured endpoints never carry a connection id, so they cannot match an inbound one.
        with self._lock:
            return any(p.endpoint == ep for p in self.engine.peers.values())

    def _answered_enough(self, key: bytes, now: float) -> bool:
        """Under load, whether this window answered as many handshake messages as it may from
        sources answered already (when `key`, a limit key, is one of them), or else from
        sources it had not answered (_ANSWER_LIMIT)."""
        if now - self._hs_window_start > _LOAD_WINDOW or not self._load.under_load(now):
            return False
        if key in self._answered:
            return self._answered_again >= _ANSWER_LIMIT
        return len(self._answered) >= _ANSWER_LIMIT

    def _note_answer(self, key: bytes) -> None:
        if key in self._answered:
            self._answered_again += 1
        else:
            self._answered.add(key)

    def _note_handshake(self, now: float) -> bool:
        if now - self._hs_window_start > _LOAD_WINDOW:
            self._hs_window_start, self._hs_window_count = now, 0
            self._answered.clear()
            self._answered_again = 0
        self._hs_window_count += 1
        self._load.note_queue(self._hs_window_count, _LOAD_CAPACITY, now)
        return self._load.under_load(now)

    def _timer_loop(self) -> None:
        tun, events = self.tun, self._link_events
        assert tun is not None and events is not None
        survivor = Survivor(f"{self.ifname}: timers")
        # Woken by a link event, by close() (the wake pipe), or when the next timer is due.
        # stop() writes no pipe: the daemon's close() follows it, and a turn is at most
        # _WATCH_EVERY long anyway.
        poller = select.poll()
        poller.register(events.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_watch = 0.0
        sleep = 0.0
        moved = -1
        while not self._stopped.is_set():
            woken = poller.poll(sleep * 1000.0)
            if self._stopped.is_set():
                return
            # After a failed turn: try again soon, as a tick always did, so that a fault that
            # keeps firing reaches the survivor's limit (20 in 10 s) and stops the daemon.
            sleep = _BUSY_TICK
            try:
                if woken:
                    self._watch(tun)  # the link changed, or its MTU, or it was removed
                now = time.monotonic()
                with self._lock:
                    actions = self.engine.update_timers(now)
                    due = self.engine.next_deadline()
                    was, moved = moved, self.engine.bytes_moved()
                for action in actions:
                    self._perform((action,))
                    # Progress after each: every send may block for the send timeout (a peer
                    # that stopped reading), and several such peers are no hang.
                    self._ticked = time.monotonic()
                if now >= next_watch:
                    next_watch = now + _WATCH_EVERY
                    self._watch(tun)
                # When it ended: a tick that spent seconds in a blocked send is not then
                # counted twice against STALL_LIMIT.
                self._ticked = end = time.monotonic()
                wake = next_watch if due is None else min(due, next_watch)
                if moved != was:
                    wake = min(wake, end + _BUSY_TICK)
                sleep = max(wake - end, 0.0)
            except Exception as e:
                if not survivor.survive(e):
                    raise

    def _watch(self, tun: Tun) -> None:
        if self.uapi is not None and self.uapi.socket_removed():
            self.stop("UAPI socket was removed")
            return
        try:
            if not tun.exists():
                self.stop(f"interface {self.ifname} was removed")
                return
            mtu = tun.mtu()
        except OSError:
            self.stop(f"interface {self.ifname} was removed")
            return
        if self.bind.stream and mtu > MAX_STREAM_MTU:
            # `ip link set mtu` above what a frame can carry: full-size packets would be dropped
            # without a trace, so the interface is put back to the largest MTU that works.
            log.warning("%s: MTU %d cannot be framed on a stream transport; clamped to %d",
                        self.ifname, mtu, MAX_STREAM_MTU)
            try:
                tun.set_mtu(MAX_STREAM_MTU)
            except OSError as e:
                log.warning("%s: cannot set the MTU: %s", self.ifname, e)
            mtu = MAX_STREAM_MTU
        if mtu != self.engine.mtu:
            log.info("%s: MTU changed to %d", self.ifname, mtu)
            with self._lock:
                self.engine.mtu = mtu
            tun.mtu_hint = mtu
            self._caps_changed()
        self._perform(self._sync_link())

    def _sync_link(self) -> list[Action]:
        """Brings the engine in line with the link: each up and down the kernel announced,
        in order, then the flags now (Engine.start, Engine.stop). Called by the timer thread
        when an announcement comes and at every _watch, and by any path that finds the
        engine stopped (a handshake that arrives, or is asked for, just after `ip link set
        up`, before the timer thread has read the announcement). Returns the keepalives
        coming up sends, for the caller to send.

        Coming up sends each peer with a persistent keepalive one, as wireguard-go does;
        wg-quick configures the peers before it sets the link up. Going down ends every
        session as wireguard-go's and the kernel's down do, so that `ip link set down` and up
        again starts afresh with new keys: also when announcements were lost in between
        (the socket's buffer overflowed), where the link is then restarted to be sure."""
        actions: list[Action] = []
        with self._link_lock:
            states: list[bool | None] = []
            lost = False
            if self._link_events is not None:
                states, lost = self._link_events.read()
            if lost:
                states.append(False)
            states.append(self._is_up())
            for up in states:
                if up is None:  # removed: _watch finds that and stops the device
                    continue
                actions = self._set_link(up, actions)
        return actions

    def _set_link(self, up: bool, actions: list[Action]) -> list[Action]:
        with self._lock:
            engine = self.engine
            if up == engine.running:
                return actions
            if up:
                actions = actions + engine.start(time.monotonic())
            else:
                engine.stop()
                self.bind.sessions_ended()  # nor what the transport queued
                actions = []  # sealed with keys just forgotten: nothing to send any more
        log.info("%s: link %s%s", self.ifname, "up" if up else "down",
                 "" if up else "; sessions ended")
        return actions

    # -- UAPI ----------------------------------------------------------------------------

    def uapi_get(self) -> DeviceStatus:
        with self._config_lock:  # never half of a set
            return self._uapi_get()

    def _uapi_get(self) -> DeviceStatus:
        fmt = self.bind.format_endpoint
        # Taken before the engine lock so the two locks are never held together, and so that
        # the hook (which may run nft) never stalls packets.
        transport = self.bind.status()
        links = _link_states(transport)
        hook = self.status_hook
        dynamic = hook() if hook is not None else {}
        # Connections the port closed at accept (the parent's enclave CID check), for the
        # dashboard beside the control port's refusals; only where something is checked.
        door: dict[str, str] = {}
        if self.bind.refuse_from is not None and "refused" in transport:
            door["wgvsock_transport_refused"] = str(transport["refused"])
        # The wall clock now, not at start: it may have been stepped since (chrony's makestep),
        # and `wg show` and the dashboard give ages from it. Taken afresh only past a second's
        # difference, so that an unchanged handshake reads the same on every `get`.
        offset = time.time() - time.monotonic()
        if abs(offset - self._wall_offset) > 1.0:
            self._wall_offset = offset
        wall_offset = self._wall_offset
        with self._lock:
            engine = self.engine
            peers = []
            for peer in engine.peers.values():
                sec = nsec = 0
                if peer.last_handshake is not None:
                    wall = peer.last_handshake + wall_offset
                    sec = int(wall)
                    nsec = int((wall - sec) * 1e9)
                extra: dict[str, str] = {}
                endpoint = None
                if peer.endpoint is not None:
                    endpoint = fmt(peer.endpoint)
                    shown = display_endpoint(peer.endpoint)
                    extra["wgvsock_endpoint"] = shown
                    if links is not None:
                        extra.update(links.get(shown, _NO_LINK))
                        # Not dialled by us: count the connections the peer came back on.
                        extra.setdefault("wgvsock_reconnects", str(peer.roams))
                peers.append(
                    PeerStatus(
                        public_key=peer.public_key,
                        preshared_key=peer.preshared_key,
                        endpoint=endpoint,
                        last_handshake_time_sec=sec,
                        last_handshake_time_nsec=nsec,
                        rx_bytes=peer.rx_bytes,
                        tx_bytes=peer.tx_bytes,
                        persistent_keepalive_interval=peer.persistent_keepalive,
                        allowed_ips=[str(n) for n in engine.allowed_ips.entries_for(peer)],
                        extra=extra,
                    )
                )
            return DeviceStatus(
                private_key=engine.private_key,
                listen_port=self.port,
                fwmark=self.fwmark,
                peers=peers,
                extra={
                    "wgvsock_network": self.bind.network,
                    # Whether TUN reads give super-packets (a peer takes them) right now.
                    "wgvsock_tun_offload": "on" if self.tun and self.tun.offloading else "off",
                    # Whether the tunnel runs: down, it has no sessions and answers nothing.
                    "wgvsock_link": "up" if engine.running else "down",
                    "wgvsock_port": str(self.port),
                    **door,
                    **self.extra_status,
                    **dynamic,
                },
            )

    def uapi_set(self, cfg: DeviceConfig) -> None:
        # Validate everything that can fail before changing anything, so a bad request
        # leaves the device as it was. Endpoints first and outside the lock: a name waits for
        # the resolver, and no other configuration client (`wg show`) need wait with it.
        endpoints: dict[int, Endpoint] = {}
        for i, pc in enumerate(cfg.peers):
            if pc.endpoint is not None:
                try:
                    endpoints[i] = self.bind.parse_endpoint(pc.endpoint)
                except ValueError as e:  # which names the endpoint already
                    raise UAPIError(errno.EINVAL, str(e)) from e
        with self._config_lock:
            self._uapi_set(cfg, endpoints)

    def _uapi_set(self, cfg: DeviceConfig, endpoints: dict[int, Endpoint]) -> None:
        self._check_peer_count(cfg)
        new_port = cfg.listen_port if cfg.listen_port != self.port else None
        if new_port is not None:
            # A clear EINVAL before the transport is touched.
            try:
                self.bind.check_port(new_port)
            except ValueError as e:
                raise UAPIError(errno.EINVAL, f"cannot listen on port {new_port}: {e}") from e
        old_mark = self.fwmark
        if cfg.fwmark is not None and cfg.fwmark != self.fwmark:
            # Before a new port's socket is made, which then gets it too.
            try:
                self.bind.set_mark(cfg.fwmark)
            except (OSError, ValueError) as e:
                code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
                raise UAPIError(code, f"cannot set fwmark {cfg.fwmark}: {e}") from e
            self.fwmark = cfg.fwmark
        if new_port is not None:
            try:
                self._rebind(new_port)
            except UAPIError:
                if self.fwmark != old_mark:  # a refused request changes nothing
                    with contextlib.suppress(OSError, ValueError):
                        self.bind.set_mark(old_mark)
                    self.fwmark = old_mark
                raise
        now = time.monotonic()
        keepalives: list[Peer] = []
        with self._lock:
            engine = self.engine
            if cfg.private_key is not None:
                old_key = engine.private_key
                engine.set_private_key(cfg.private_key if any(cfg.private_key) else None)
                if engine.private_key != old_key:
                    self.bind.sessions_ended()
                if engine.public_key is not None:
                    # wireguard-go ignores a peer whose key is our own; drop it likewise.
                    engine.remove_peer(engine.public_key)
            if cfg.replace_peers:
                for key in list(engine.peers):
                    engine.remove_peer(key)
            for i, pc in enumerate(cfg.peers):
                if pc.public_key == engine.public_key:
                    continue
                if pc.remove:
                    engine.remove_peer(pc.public_key)
                    continue
                peer = engine.peers.get(pc.public_key)
                if peer is None:
                    if pc.update_only:
                        continue
                    peer = engine.add_peer(pc.public_key)
                if pc.preshared_key is not None:
                    peer.preshared_key = pc.preshared_key
                if i in endpoints:
                    peer.endpoint = endpoints[i]
                    self._configure_endpoint(peer, peer.endpoint)
                if pc.persistent_keepalive is not None:
                    was = peer.timers.persistent_keepalive_interval
                    peer.timers.persistent_keepalive_interval = pc.persistent_keepalive
                    if pc.persistent_keepalive and not was:
                        keepalives.append(peer)
                if pc.replace_allowed_ips:
                    engine.allowed_ips.remove_by_peer(peer)
                for net, add in pc.allowed_ips:
                    if add:
                        engine.allowed_ips.insert(net, peer)
                    else:
                        engine.allowed_ips.remove(net, peer)
            actions: list[Action] = []
            # While down, none: they go out when the link comes up (_sync_link).
            if keepalives and engine.running:
                for kept in keepalives:
                    # Not one removed (or replaced) later in the same request.
                    if engine.peers.get(kept.public_key) is kept:
                        actions += engine.send_keepalive(kept, now)
            if cfg.peers or cfg.replace_peers or cfg.private_key is not None:
                self._peers_changed()
        if actions:
            # Sent from a thread of their own: a send may wait for a stream peer that stopped
            # reading, up to the send timeout, and every other UAPI client would wait with it
            # (wireguard-go's IpcSet only queues the keepalive).
            NamedThread(target=self._perform, args=(actions,), name=f"{self.ifname}-uapi-send",
                        daemon=True).start()

    def _configure_endpoint(self, peer: Peer, endpoint: Endpoint) -> None:
        """Under _lock: `endpoint` is the one `peer` is configured with now (moved last)."""
        eps = self._configured.setdefault(peer, {})
        eps.pop(endpoint, None)
        eps[endpoint] = None

    def _peers_changed(self) -> None:
        """Under _lock: tells the transport which endpoints the peers have now or are
        configured with, so it lets those of removed peers go (Bind.peers_changed). The one a
        peer is configured with stays, though it roamed elsewhere (say to a connection it
        dialled itself); one it was given before stays while the transport keeps a
        connection it dialled there up, as the other side may reach us only over it. Under
        the lock, so that two changes (a set, connect_peer) reach it in the order made."""
        peers = self.engine.peers
        configured = {peer: eps for peer, eps in self._configured.items()
                      if peers.get(peer.public_key) is peer}
        wanted = {peer.endpoint for peer in peers.values() if peer.endpoint is not None}
        earlier: set[Endpoint] = set()
        for eps in configured.values():
            given = list(eps)
            wanted.add(given[-1])
            earlier.update(given[:-1])
        earlier -= wanted
        kept = self.bind.peers_changed(wanted, earlier)
        # What is left: each peer's current endpoint, and those the transport kept or some
        # peer has now (at most the peers' endpoints and the connections that stay up).
        self._configured = {
            peer: eps if len(eps) == 1 else
            {ep: None for ep in eps if ep in kept or ep in wanted}
            for peer, eps in configured.items()
        }

    def _check_peer_count(self, cfg: DeviceConfig) -> None:
        """EINVAL, before anything changes, for a set that would leave more than max_peers
        peers (wireguard-go refuses the peer that goes past MaxPeers, having applied the lines
        before it)."""
        if len(cfg.peers) + (0 if cfg.replace_peers else len(self.engine.peers)) <= self.max_peers:
            return  # the common case, without building the set below
        keys = set() if cfg.replace_peers else set(self.engine.peers)
        for pc in cfg.peers:
            if pc.remove:
                keys.discard(pc.public_key)
            elif not pc.update_only:
                keys.add(pc.public_key)
        if len(keys) > self.max_peers:
            raise UAPIError(errno.EINVAL, f"too many peers: the set would leave {len(keys)}, "
                            f"and an interface takes at most {self.max_peers}")

    def connect_peer(self, public_key: bytes, endpoint: Endpoint) -> bool:
        """Points a configured peer at `endpoint` and starts a handshake with it now (once
        the link is up). False when there is no such peer: a set (a UAPI client's) may have
        removed it since the caller looked (has_peer, or its own set)."""
        if not self.engine.running:
            self._perform(self._sync_link())
        with self._lock:
            peer = self.engine.peers.get(public_key)
            if peer is None:
                return False
            peer.endpoint = endpoint
            self._configure_endpoint(peer, endpoint)
            # An attempt made before the peer had an endpoint (a keepalive being configured)
            # went nowhere; it must not hold this one back for RekeyTimeout.
            peer.handshake.last_sent = None
            actions = self.engine.initiate_handshake(peer, time.monotonic())
            self._peers_changed()
        self._perform(actions)
        return True

    def has_peer(self, public_key: bytes) -> bool:
        """Whether a peer with this key is configured (read without the engine lock, as
        last_handshake is)."""
        return public_key in self.engine.peers

    def last_handshake(self, public_key: bytes) -> float | None:
        """Monotonic time of the peer's last completed handshake, or None. Read without the
        engine lock (one dict look-up and one attribute, each atomic): the parent's status
        line asks every second and must not wait behind a data path that is stuck."""
        peer = self.engine.peers.get(public_key)
        return peer.last_handshake if peer is not None else None

    def _is_up(self) -> bool:
        try:
            return self.tun is not None and self.tun.is_up()
        except OSError:
            return False

    def _rebind(self, port: int) -> None:
        bind = self.bind
        try:
            self.port = (bind.change_port(port) if bind.is_open
                         else bind.open(port, self._on_receive))
        except (OSError, ValueError) as e:
            raise _port_error(port, e) from e
        log.info("%s: listening on port %d", self.ifname, self.port)
