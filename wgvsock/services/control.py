"""The control channel: how an enclave and its parent exchange WireGuard keys.

One stream connection (vsock, or the Unix/TCP stand-in) from the enclave to the parent's
control port. Every message is a frame: a u32 big-endian length, then a UTF-8 JSON object of
at most MAX_MESSAGE bytes with `"v": 1` and a `"type"`:

    parent  -> enclave  {"v":1, "type":"challenge", "nonce": B64(32 random bytes), "profile": NAME,
                         "versions": [1]}
    enclave -> parent   {"v":1, "type":"register", "nonce": <the challenge's>,
                         "public_key": B64(32), "attestation": B64(COSE_Sign1) | null}
    parent  -> enclave  {"v":1, "type":"welcome", "public_key": B64(32), "wg_port": N,
                         "attested": bool, "attestation": STATE}
                     or {"v":1, "type":"refused", "reason": TEXT [, "retry_after": SECONDS]}

`attested` is true for a genuine enclave whether or not a PCR0 pins its image; STATE (one of
ATTESTATION_STATES, newer parents only) tells the two apart. `retry_after` (newer parents
only) marks a refusal for registering too often (REGISTER_BURST at once, then one per
REGISTER_INTERVAL per peer): the parent listens again after that many seconds. The whole
exchange must finish within EXCHANGE_TIMEOUT seconds. After a welcome the connection stays
open and both sides send {"v":1,"type":"ping"} every PING_INTERVAL seconds; a side that
hears nothing for 3 intervals, or sees the connection close, knows the other restarted: the
enclave then registers again (with the same key) and the parent keeps the peer until a new
enclave replaces it. The nonce is fresh per connection and single-use, so a recorded register
message (or attestation document) cannot be replayed on another connection.

Versions. An enclave image is immutable (the parent pins its PCR0), so a parent meets enclaves
built with older wgvsock releases, and after a downgrade newer ones. Each side reads only the
fields and, on a held connection, the message types it knows, so a release may add either
without a new version. One that must change what a message means raises PROTOCOL_VERSION, and
a parent keeps speaking every version it did (its challenge's "versions" lists them; the
challenge itself stays readable by version 1): the enclave answers in its own, which the parent
then speaks on that connection. A side that cannot speak the other's version says so, naming
both and what to upgrade (IncompatibleParent on the enclave, a `refused` from the parent), and
a `refused` is read whatever version it carries, since it says why.

The attestation document's nonce is not the challenge's but attested_nonce(challenge), a hash
under a label of this protocol's: whoever answers on the control port (the parent, or anything
in its place) chooses the challenge, and a document for a nonce of its choosing would answer
another service's challenge in the enclave's name.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..acceptwait import AcceptWait
from ..conn.bind import RateLimitedLog
from ..safetext import error, prose, quote
from ..threads import NamedThread, Survivor, raised_at

log = logging.getLogger("wgvsock.control")

PROTOCOL_VERSION = 1
#: The versions a parent of this release speaks (its challenge says them), oldest first.
VERSIONS = (1,)
MAX_MESSAGE = 64 * 1024
EXCHANGE_TIMEOUT = 10.0
PING_INTERVAL = 10.0
NONCE_LEN = 32
_LEN = struct.Struct(">I")
# Never a prefix of another protocol's nonce derivation, and says which exchange it served.
ATTESTATION_CONTEXT = b"wgvsock control v1: attestation for this challenge\0"


def attested_nonce(challenge: bytes) -> bytes:
    """The nonce an enclave's attestation document carries for control CHALLENGE (see the
    module's docstring: the challenge is not the attacker-free choice it looks like)."""
    return hashlib.sha256(ATTESTATION_CONTEXT + challenge).digest()


class ControlError(Exception):
    """The other side broke the protocol, went silent, or refused us."""


class Refused(ControlError):
    """The parent answered and refused this enclave (its policy, or its verifier)."""


class IncompatibleParent(Refused):
    """The parent answered, but speaks no version of the protocol this enclave does: retried
    as a refusal is (the parent's wgvsock may be changed back), and its reason kept."""


class Throttled(Refused):
    """The parent refused this registration for coming too soon after the ones before; it
    takes one again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: What the parent's verdict on its enclave amounts to, as `wgvsock status --json` (its
#: "attestation") and the metrics (wgvsock_peer_attestation_state's "state") name it:
#: attested (a genuine document, and PCR0 pinned: it proves the image), genuine (a genuine
#: Nitro enclave's document, but the profile pins no PCR0: any image would do), debug (a
#: debug-mode enclave that allow_debug let in: its PCRs prove nothing) or unattested.
ATTESTATION_STATES = ("attested", "genuine", "debug", "unattested")
#: The same, as the parent's read-only UAPI key wgvsock_attested says it.
UAPI_ATTESTED = {"attested": "true", "genuine": "genuine", "debug": "debug",
                 "unattested": "false"}


@dataclass(frozen=True)
class Verdict:
    """The parent's decision on a registering enclave."""

    accepted: bool
    attested: bool = False  # its document was verified, and it is not in debug mode
    reason: str = ""
    detail: dict | None = None
    # What the decision was made on, for the installer to keep (the parent asks a reloaded
    # policy about it again): (attestation document or None, nonce, wall-clock time, policy).
    evidence: tuple[bytes | None, bytes, float, Any] | None = field(default=None,
                                                                     compare=False, repr=False)
    # The policy pinned PCR0 (the whole image), which the document matched: without it a
    # verified document proves a genuine Nitro enclave, not which image it runs.
    image_pinned: bool = False

    @property
    def state(self) -> str:
        """One of ATTESTATION_STATES."""
        if self.attested:
            return "attested" if self.image_pinned else "genuine"
        if (self.detail or {}).get("debug_mode"):
            return "debug"
        return "unattested"


@dataclass(frozen=True)
class Welcome:
    parent_public_key: bytes
    wg_port: int
    attested: bool
    # One of ATTESTATION_STATES: a parent before the welcome said it gave only `attested`,
    # which is also true for a genuine enclave whose image no PCR0 pins.
    state: str = ""


def encode(message: dict) -> bytes:
    body = json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ControlError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlError("timed out waiting for the other side")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise ControlError("timed out waiting for the other side") from None
        except OSError as e:
            raise ControlError(f"connection failed: {e}") from None
        if not chunk:
            what = "connection closed" if not buf else "connection closed mid-message"
            raise ControlError(what)
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket, deadline: float, any_version: bool = False) -> dict:
    """The next message. ANY_VERSION: one of another version is returned too (its "v" a
    positive integer), for the caller to answer or refuse; otherwise it is a ControlError."""
    (length,) = _LEN.unpack(_recv_exact(sock, 4, deadline))
    if length == 0 or length > MAX_MESSAGE:
        raise ControlError(f"message length {length} outside 1..{MAX_MESSAGE}")
    body = _recv_exact(sock, length, deadline)
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert;
        # RecursionError deeply nested arrays.
        raise ControlError("message is not JSON") from None
    if not isinstance(msg, dict):
        raise ControlError("message is not a JSON object")
    version = msg.get("v")
    # `type(...) is int`: 1.0 and true compare equal to 1 but are not the version.
    if type(version) is not int or (version != PROTOCOL_VERSION
                                    and not (any_version and 0 < version < 2**31)):
        raise ControlError(f"unsupported protocol version {quote(version)} (this side "
                           f"speaks {PROTOCOL_VERSION})")
    if not isinstance(msg.get("type"), str):
        raise ControlError("message has no type")
    return msg


def _b64(msg: dict, key: str, length: int | None = None, optional: bool = False) -> bytes | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ControlError(f"{msg['type']}: {key} missing or not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError(f"{msg['type']}: {key} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise ControlError(f"{msg['type']}: {key} must be {length} bytes, not {len(raw)}")
    return raw


def _text(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _send(sock: socket.socket, message: dict) -> None:
    sock.settimeout(EXCHANGE_TIMEOUT)
    sock.sendall(encode(message))


# -- parent side ---------------------------------------------------------------------------

Verifier = Callable[[bytes, bytes | None, bytes], Verdict]
Installer = Callable[[bytes, Verdict], None]


# Connections one peer may have in their exchange at once: an enclave registers once, and
# again at most while its previous exchange is being torn down.
MAX_PENDING_PER_PEER = 2
# Registrations one peer may make at once, then one per REGISTER_INTERVAL seconds. An enclave
# registers when it starts and again when its control connection drops; one that registers
# in a loop would otherwise cost a verification, possibly a rebuilt peer and a log line each
# time, thousands a second. A refused enclave's quick retries (for a minute, at most every
# 0.05 to 1 s) may meet the limit too: they are told when to come back, which is within 1 s.
REGISTER_BURST = 5
REGISTER_INTERVAL = 1.0
# Why a registration was refused, as wgvsock_control_refused_registrations_total counts it:
# the parent's verdict (the attestation policy, a nonce not this connection's, a verifier
# error, an installer's refusal under a reloaded policy), too many from one peer (the
# limit above), or no control protocol version both sides speak (either side saying so).
REFUSED_REGISTRATION_REASONS = ("verdict", "throttled", "version")
# Clock differences carry float noise (1000.4 - 1000.0 is 0.39999...): a peer that comes back
# when told must not be refused for a token short by 1e-13.
_SLACK = 1e-6
_UCRED = struct.Struct("3i")


class RegistrationLimit:
    """A token bucket per peer: `burst` registrations at once, then one per `interval`."""

    def __init__(self, burst: int, interval: float, clock: Callable[[], float]) -> None:
        self._burst = float(burst)
        self._interval = interval
        self._clock = clock
        # peer -> (tokens, when counted), least recently counted first.
        self._peers: OrderedDict[object, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, peer: object) -> float:
        """0.0 when PEER may register now (and counts it), else the seconds until it may."""
        with self._lock:
            now = self._clock()
            tokens, last = self._peers.pop(peer, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) / self._interval)
            wait = 0.0
            if tokens >= 1.0 - _SLACK:
                tokens = max(0.0, tokens - 1.0)
            else:
                wait = (1.0 - tokens) * self._interval
            self._peers[peer] = (tokens, now)
            # A peer not counted for burst * interval has its whole burst again, as one never
            # seen has: forgetting it keeps many peers (TCP addresses, Unix processes) from
            # growing the table.
            full_after = self._burst * self._interval
            while self._peers:
                oldest, (_tokens, at) = next(iter(self._peers.items()))
                if now - at < full_after:
                    break
                del self._peers[oldest]
            return wait


#: How many refusals the parent keeps for `wgvsock status` (UAPI keys
#: wgvsock_control_refused_1, newest, ... _N).
REFUSALS_KEPT = 4
# Longest reason kept: the log's limit for a verdict's.
_REASON_LIMIT = 500


@dataclass(slots=True)
class ControlRefusal:
    kind: str  # "registration" (the verdict), "throttled" (too often), "connection" (at the door)
    who: str  # "CID 16", "10.0.0.2", "pid 4242" (see peer_name)
    reason: str  # as the log says it
    count: int  # the same refusal of the same peer, since the record was last cleared
    first: float
    last: float


class ControlRefusals:
    """The control port's last refusals, for `wgvsock status`: an operator whose parent shows
    no enclave must tell "not started" from "refused, and why" without the log. The same
    (kind, who, reason) again counts up and becomes the newest; only the newest
    REFUSALS_KEPT are kept; an admitted enclave clears them (they are about its way in).
    Thread-safe: the connection threads add, `get` on the UAPI reads."""

    def __init__(self, *, limit: int = REFUSALS_KEPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str, str], ControlRefusal] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, kind: str, who: str, reason: str) -> None:
        # Escaped here: the peer's words (its document's fields) reach a terminal from here.
        key = (kind, prose(who, 100), prose(reason, _REASON_LIMIT))
        now = self._clock()
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                entry = ControlRefusal(*key, 0, now, now)
            entry.count += 1
            entry.last = now
            self._entries[key] = entry
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def recent(self) -> list[ControlRefusal]:
        """Newest first (copies)."""
        with self._lock:
            return [ControlRefusal(r.kind, r.who, r.reason, r.count, r.first, r.last)
                    for r in reversed(self._entries.values())]

    def uapi_keys(self) -> dict[str, str]:
        """``wgvsock_control_refused_1`` (newest) ...: "KIND COUNT AGE_SECONDS WHO; REASON"
        (WHO never holds "; ")."""
        now = self._clock()
        return {f"wgvsock_control_refused_{i}":
                f"{r.kind} {r.count} {max(0, int(now - r.last))} {r.who}; {r.reason}"
                for i, r in enumerate(self.recent(), 1)}


def peer_name(conn: socket.socket, addr: object, peer: object) -> str:
    """Who is on the other end (PEER from peer_of), as an operator reads it: "CID 16",
    "10.0.0.2", "pid 4242"; the source port changes with every connection, so it is left out."""
    if conn.family == socket.AF_UNIX:
        return f"pid {peer}" if peer is not None else "a local process"
    if conn.family == getattr(socket, "AF_VSOCK", -1) and peer is not None:
        return f"CID {peer}"
    return str(peer) if peer is not None else prose(addr, 100)


def peer_of(conn: socket.socket, addr: object) -> object:
    """Who is on the other end, for the per-peer limit: the CID (vsock), the IP address (TCP)
    or the process id (Unix, from SO_PEERCRED). None when it cannot be told."""
    if conn.family == socket.AF_UNIX:
        try:
            pid, _uid, _gid = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return None
        return pid
    if isinstance(addr, tuple) and addr:
        return addr[0]
    return None


class ControlServer:
    """Accepts enclaves on `listener`; each connection gets its own thread.

    `verify(public_key, attestation_or_None, nonce)` decides; on acceptance `install(public_key,
    verdict)` replaces the profile's enclave peer before the welcome is sent, so the enclave's
    first handshake finds its key installed. Installs never run concurrently, and the last one
    installed is always the connection being held.

    Admission: `refuse_from(addr)`, when given, says why the accept() address is not let in
    (the parent passes "not the enclave's CID", naming the CID it expects and where that comes
    from), or None to let it in (one that raises refuses: it is the fence); a peer may have
    MAX_PENDING_PER_PEER connections in their exchange, and may register `register_burst`
    times at once, then once per `register_interval` seconds (the rest are refused,
    unverified, with a retry_after); and when `max_clients` connections are open, newcomers
    are refused. A connection that was sent its challenge is never dropped to make room: that
    would let a flood of connections push out the real enclave's exchange (issue 12).
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        profile: str,
        public_key: bytes,
        wg_port: int,
        verify: Verifier,
        install: Installer,
        rng: Callable[[int], bytes] = os.urandom,
        timeout: float = EXCHANGE_TIMEOUT,
        max_clients: int = 16,
        max_per_peer: int = MAX_PENDING_PER_PEER,
        refuse_from: Callable[[object], str | None] | None = None,
        register_burst: int = REGISTER_BURST,
        register_interval: float = REGISTER_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listener = listener
        # What was refused lately, for `wgvsock status` (the parent's UAPI keys).
        self.refusals = ControlRefusals(clock=clock)
        self._profile = profile
        self.public_key = public_key
        self.wg_port = wg_port
        self._verify = verify
        self._install = install
        self._rng = rng
        self._timeout = timeout
        self._max_clients = max_clients
        self._max_per_peer = max_per_peer
        self._refuse_from = refuse_from
        # The clock is for the rate limits only (tests pass their own); the exchange's
        # deadlines are real.
        self._register_limit = RegistrationLimit(register_burst, register_interval, clock)
        self._register_rule = (f"at most {register_burst} at once, then one every "
                               f"{register_interval:g} s")
        self._clients: set[socket.socket] = set()
        # Connections still in their exchange -> their peer (see peer_of).
        self._pending: dict[socket.socket, object] = {}
        self._lock = threading.Lock()
        # Held from install to publishing the connection as current, so concurrent
        # registrations cannot leave the device's peer and the held connection disagreeing.
        self._install_lock = threading.Lock()
        self._stop = threading.Event()
        self._current: socket.socket | None = None
        # Read by the metrics exporter's thread (wgvsock_control_registrations_total): the
        # registrations installed, written under _install_lock.
        self.registrations = 0
        # Read by the metrics exporter's thread (wgvsock_control_refused_connections_total);
        # written under _lock, as the connection table it is a count of turning away from.
        self.refused_connections = 0
        # By REFUSED_REGISTRATION_REASONS (wgvsock_control_refused_registrations_total); each
        # counted under _lock, from the connections' threads.
        self.refused_registrations = dict.fromkeys(REFUSED_REGISTRATION_REASONS, 0)
        self.last_verdict: Verdict | None = None
        # What the last installed registration was (key, attestation state): a registration
        # is logged at INFO when it changes that, or follows a start or a removal.
        self._registered: tuple[bytes, str] | None = None
        self._refusal_log = RateLimitedLog(logger=log, clock=clock)
        # An admission check that fails: a bug, which strangers' refusals must not hide.
        self._check_log = RateLimitedLog(logger=log, clock=clock)
        # Verdicts: a refused enclave registers again (at most every minute, but several
        # enclaves of one profile, or a policy that refuses them all, add up).
        self._verdict_log = RateLimitedLog(10.0, logger=log, burst=5, clock=clock)
        # How connections ended badly: protocol errors, connection errors, bugs.
        self._conn_log = RateLimitedLog(10.0, logger=log, burst=5, clock=clock)
        # Registrations refused for coming too often: one peer in a loop, every second.
        self._throttle_log = RateLimitedLog(10.0, logger=log, burst=2, clock=clock)
        # Registrations that change something: one per enclave start normally, which this
        # never holds back; it bounds many peers (any CID, where the parent does not know the
        # enclave's) each registering new keys once a second.
        self._change_log = RateLimitedLog(10.0, logger=log, burst=10, clock=clock)
        # The same enclave with the same key and verdict (its control connection dropped,
        # its tunnel check failed): rare, and worth a line, but a loop of them says nothing
        # new after the first few; the next line let through counts the ones left out.
        self._again_log = RateLimitedLog(60.0, logger=log, burst=3, clock=clock)
        self._survivor = Survivor("control: accept")
        self._thread = NamedThread(target=self._accept_loop, name="control", daemon=True)
        self._waiting = AcceptWait(listener)

    def start(self) -> None:
        # Not blocking: a connection reset between poll() and accept() must not leave the
        # thread in an accept() that nothing wakes.
        self._listener.setblocking(False)
        self._waiting.begin()
        try:
            self._thread.start()
        except BaseException:  # no thread to be had: close() releases all
            self._waiting.ended()
            raise

    def close(self) -> None:
        self._stop.set()
        self._waiting.wake()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        # (Released by the thread as it ends if it outlasts the join, or if this is that thread.)
        self._waiting.join_and_close(self._thread)

    def _accept_loop(self) -> None:
        try:
            self._accept_until_stopped()
        finally:
            self._waiting.ended()

    def _accept_until_stopped(self) -> None:
        while not self._stop.is_set():
            self._waiting.wait()
            if self._stop.is_set():
                return
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # taken back before we got to it
            except OSError:
                if self._stop.is_set():
                    return
                self._stop.wait(0.1)
                continue
            try:
                self._admit(conn, addr)
            except Exception as e:
                # One odd connection must not end the listener: the enclave could never
                # register again while the daemon looked healthy.
                conn.close()
                if not self._survivor.survive(e):
                    raise  # to the thread-death hook, which stops the parent
                self._stop.wait(0.1)

    def _admit(self, conn: socket.socket, addr: object) -> None:
        why = ""
        peer = peer_of(conn, addr)
        who = peer_name(conn, addr, peer)
        try:
            expected = self._refuse_from(addr) if self._refuse_from is not None else None
        except Exception as exc:
            # The check is the fence: one that fails refuses, as the WireGuard port's does. Not
            # the accept loop's Survivor: it fails for every connection, so a traceback each
            # time and, after 20, a stopped parent would be anyone's to cause. Where it was
            # raised is what finding the bug needs.
            why = f"the admission check failed ({error(exc)}){raised_at(exc)}"
            self._refused(conn, who, why)
            self._check_log(logging.ERROR, "control: %s; refused a connection from %s", why, who)
            return
        if expected is not None:
            why = f"{who} is not the enclave ({expected})"
        with self._lock:
            if not why and len(self._clients) >= self._max_clients:
                why = f"{len(self._clients)} connections already"
            if not why and sum(p == peer for p in self._pending.values()) >= self._max_per_peer:
                why = f"{who} has {self._max_per_peer} registrations in progress already"
            if not why:
                self._clients.add(conn)
                self._pending[conn] = peer
        if why:
            self._refused(conn, who, why)
            self._refusal_log(logging.WARNING, "control: refused a connection: %s", why)
            return
        try:
            NamedThread(target=self._serve, args=(conn, peer, who), name="control-conn",
                        daemon=True).start()
        except BaseException:
            with self._lock:
                self._clients.discard(conn)
                self._pending.pop(conn, None)
            raise

    def _refused(self, conn: socket.socket, who: str, why: str) -> None:
        """Counts and closes a connection turned away at the door; the caller logs it."""
        with self._lock:
            self.refused_connections += 1
        self.refusals.add("connection", who, why)
        conn.close()

    def _refused_registration(self, reason: str) -> None:
        with self._lock:
            self.refused_registrations[reason] += 1

    def _serve(self, conn: socket.socket, peer: object = None, who: str = "?") -> None:
        try:
            if self._exchange(conn, peer, who):
                self._hold(conn)
        except ControlError as e:
            # Anyone who can reach the port can break the protocol on every connection.
            self._conn_log(logging.WARNING, "control: %s", e)
        except OSError as e:
            self._conn_log(logging.INFO, "control: connection error: %s", e)
        except Exception:
            # A bug in one exchange (an install that raised) ends that connection only; the
            # enclave registers again.
            self._conn_log(logging.ERROR, "control: exchange failed", exc_info=True)
        finally:
            with self._lock:
                self._clients.discard(conn)
                self._pending.pop(conn, None)
                if self._current is conn:
                    self._current = None
            conn.close()

    def _exchange(self, conn: socket.socket, peer: object = None, who: str = "?") -> bool:
        deadline = time.monotonic() + self._timeout
        nonce = self._rng(NONCE_LEN)
        _send(conn, {"type": "challenge", "nonce": _text(nonce), "profile": self._profile,
                     "versions": list(VERSIONS)})
        msg = read_message(conn, deadline, any_version=True)
        if msg["type"] == "refused":
            # The enclave cannot speak with this parent (another version), and says why.
            reason = f"the enclave refused this parent: {prose(msg.get('reason', '?'), 500)}"
            self._verdict_log(logging.WARNING, "control: %s: %s", who, reason)
            self.refusals.add("registration", who, reason)
            self._refused_registration("version")
            return False
        if msg["v"] not in VERSIONS:
            # An enclave image built with a newer wgvsock than the parent's: the parent is the
            # side to upgrade (a parent serves enclave images of its release and older ones).
            reason = (f"this parent speaks control protocol {_versions(VERSIONS)} and the "
                      f"enclave version {msg['v']}: upgrade "
                      f"wgvsock on the parent to the release the enclave image was built "
                      f"with, or a newer one")
            self._verdict_log(logging.WARNING, "control: refused %s: %s", who, reason)
            self.refusals.add("registration", who, reason)
            self._refused_registration("version")
            self._settled(conn)
            _send(conn, {"type": "refused", "reason": reason, "versions": list(VERSIONS)})
            return False
        if msg["type"] != "register":
            raise ControlError(f"expected register, got {quote(msg['type'])}")
        echoed = _b64(msg, "nonce", NONCE_LEN)
        public_key = _b64(msg, "public_key", 32)
        attestation = _b64(msg, "attestation", optional=True)
        assert public_key is not None
        if (wait := self._register_limit.take(peer)) > 0:
            # Before the verifier: a peer in a loop must not cost a verification each time.
            # Rounded up to a tenth: one that comes back when told finds a registration's worth.
            retry_after = max(0.1, math.ceil(wait * 10 - _SLACK) / 10)
            self._throttle_log(logging.WARNING, "control: refused a registration from %s: "
                               "too many (%s)", who, self._register_rule)
            # Without "try again in": the same refusal must count up, not fill the record.
            self.refusals.add("throttled", who, f"too many registrations "
                                                f"({self._register_rule})")
            self._refused_registration("throttled")
            self._settled(conn)
            _send(conn, {"type": "refused", "retry_after": retry_after,
                         "reason": f"too many registrations ({self._register_rule}); "
                                   f"try again in {retry_after:g} s"})
            return False
        # The nonce was made for this connection alone, so matching it proves freshness.
        if not hmac.compare_digest(echoed or b"", nonce):
            verdict = Verdict(False, reason="nonce does not match this connection's challenge")
        else:
            try:
                verdict = self._verify(public_key, attestation, nonce)
            except Exception as e:  # a verifier bug must not take the listener down
                log.exception("control: verifier failed")
                # (safetext.error: an exception whose message cannot be made must still
                # refuse, not end the exchange as a bug with no word to the enclave.)
                verdict = Verdict(False, reason=f"verifier error: {error(e)}")
        self.last_verdict = verdict
        if not verdict.accepted:
            # Built from the enclave's own document (certificate subjects, field values).
            reason = prose(verdict.reason, 500)
            self._verdict_log(logging.WARNING, "control: refused an enclave: %s", reason)
            self.refusals.add("registration", who, reason)
            self._refused_registration("verdict")
            self._settled(conn)
            _send(conn, {"type": "refused", "reason": reason})
            return False
        with self._install_lock:
            if self._stop.is_set():
                raise ControlError("shutting down")
            try:
                self._install(public_key, verdict)
            except ControlError as e:  # the installer's own refusal (a reloaded policy's)
                self.refusals.add("registration", who, str(e))
                self._refused_registration("verdict")
                raise
            # An enclave is in: what kept it (or another) out before is history.
            self.refusals.clear()
            self.registrations += 1
            before, self._registered = self._registered, (public_key, verdict.state)
            with self._lock:
                previous, self._current = self._current, conn
        if previous is not None:
            # The enclave was replaced (restart): its old control connection has no meaning.
            with contextlib.suppress(OSError):
                previous.shutdown(socket.SHUT_RDWR)
        self._settled(conn)
        # Before the welcome, as the refusals are: the line is there by the time the enclave
        # acts on its answer (and a test that has the answer finds it).
        self._log_registration(before, public_key, verdict.state)
        _send(conn, {"type": "welcome", "public_key": _text(self.public_key),
                     "wg_port": self.wg_port, "attested": verdict.attested,
                     "attestation": verdict.state})
        return True

    def _log_registration(self, before: tuple[bytes, str] | None, public_key: bytes,
                          state: str) -> None:
        key = _text(public_key)
        if before is None:
            self._change_log(logging.INFO, "control: enclave registered (key %s, "
                             "attestation: %s)", key, state)
        elif before[0] != public_key:
            self._change_log(logging.INFO, "control: enclave registered with a new key %s "
                             "(attestation: %s; it replaces %s)", key, state,
                             _text(before[0]))
        elif before[1] != state:
            self._change_log(logging.INFO, "control: enclave registered again (key %s), "
                             "attestation now %s (was %s)", key, state, before[1])
        else:
            self._again_log(logging.INFO, "control: enclave registered again, unchanged "
                            "(key %s, attestation: %s)", key, state)

    def _settled(self, conn: socket.socket) -> None:
        # Before the answer is sent: an enclave that has its answer and dials again at once
        # must not find its finished exchange still counted against it.
        with self._lock:
            self._pending.pop(conn, None)

    def _hold(self, conn: socket.socket) -> None:
        why = hold_connection(conn, self._stop)
        with self._lock:
            current = self._current is conn
        # A replaced or removed enclave's connection was ended here, and said so; this one
        # ended on the enclave's side (it exited, restarted, or its host went away). Its peer
        # stays installed: a restarted enclave registers again, and its tunnel carries on.
        if current and not self._stop.is_set():
            self._conn_log(logging.INFO, "control: the enclave's control connection ended (%s)",
                           why)

    def revalidate(self, admitted: Callable[[], bool], remove: Callable[[], None]) -> bool:
        """Asks ADMITTED whether the installed enclave may stay (a reload changed the policy),
        with installs held off meanwhile; if not, calls REMOVE and closes that enclave's
        control connection, so it notices and registers again (to be judged anew). Returns
        ADMITTED's answer."""
        with self._install_lock:
            if admitted():
                return True
            remove()
            self._registered = None  # its next registration is news again
            with self._lock:
                current, self._current = self._current, None
        if current is not None:
            with contextlib.suppress(OSError):
                current.shutdown(socket.SHUT_RDWR)
        return False


def hold_connection(conn: socket.socket, stop: threading.Event,
                    check: Callable[[], str | None] | None = None) -> str:
    """Pings every PING_INTERVAL and reads the other side's pings until the connection dies,
    goes silent for 3 intervals, or CHECK (asked about once a second) names a reason to end
    it. Returns why it ended.

    It waits for readability first and only then reads a whole message with a fresh deadline:
    a deadline that expired between a message's length and its body would leave the stream
    out of step.
    """
    next_ping = 0.0
    silence = 3 * PING_INTERVAL
    last_heard = time.monotonic()
    # poll, not select: select fails for a descriptor numbered 1024 or more.
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_ping:
            try:
                _send(conn, {"type": "ping"})
            except OSError as e:
                return f"send failed: {e}"
            next_ping = now + PING_INTERVAL
        if now >= last_heard + silence:
            return f"no message for {silence:.0f} s"
        if check is not None and (trouble := check()) is not None:
            return trouble
        # Wake at least once a second so `stop` is noticed promptly.
        wait = min(next_ping, last_heard + silence, now + 1.0) - now
        try:
            readable = poller.poll(max(0.0, wait) * 1000)
        except (OSError, ValueError) as e:
            return f"connection failed: {e}"
        if not readable:
            continue
        if readable[0][1] & select.POLLNVAL:
            return "connection failed: the socket was closed"
        try:
            read_message(conn, time.monotonic() + EXCHANGE_TIMEOUT)
        except ControlError as e:
            return str(e)
        last_heard = time.monotonic()
    return "stopped"


# -- enclave side --------------------------------------------------------------------------


def _versions(versions: list | tuple) -> str:
    """ "version 1", "versions 1, 2" (at most 8 named: the other side may have sent them)."""
    return (f"version{'s' if len(versions) > 1 else ''} "
            + ", ".join(quote(v) for v in versions[:8]) + (", ..." if len(versions) > 8 else ""))


def _refused(msg: dict) -> None:
    """Raises the Refused (or Throttled) that the parent's `refused` message says."""
    text = f"parent refused this enclave: {prose(msg.get('reason', '?'), 1000)}"
    retry_after = msg.get("retry_after")
    # Only a number of seconds counts (bool is an int; json reads NaN and Infinity); the
    # caller bounds it, since whoever answers on the control port may have sent it.
    if (type(retry_after) in (int, float) and math.isfinite(retry_after)
            and retry_after >= 0):
        raise Throttled(text, float(retry_after))
    raise Refused(text)

Attester = Callable[[bytes, bytes], bytes | None]


def register(
    conn: socket.socket, public_key: bytes, attest: Attester | None = None,
    timeout: float = EXCHANGE_TIMEOUT,
) -> Welcome:
    """Runs the enclave's half of the exchange on a connected socket."""
    deadline = time.monotonic() + timeout
    msg = read_message(conn, deadline, any_version=True)
    if msg["type"] != "challenge":
        if msg["type"] == "refused":
            _refused(msg)
        raise ControlError(f"expected challenge, got {quote(msg['type'])}")
    versions = msg.get("versions")
    if not (isinstance(versions, list) and versions
            and all(type(v) is int for v in versions)):
        versions = [msg["v"]]  # a parent before "versions" speaks only the one it sends
    if PROTOCOL_VERSION not in versions:
        speaks = (f"the parent speaks control protocol {_versions(versions)} and this "
                  f"enclave speaks version {PROTOCOL_VERSION}")
        if max(versions) < PROTOCOL_VERSION:
            why = (f"{speaks}: the parent's wgvsock is older than the one this enclave image "
                   f"was built with; upgrade wgvsock on the parent to that release or a newer "
                   f"one")
        else:
            why = (f"{speaks}: the parent's wgvsock no longer serves enclave images built with "
                   f"this one; rebuild the enclave image with the parent's wgvsock (a new "
                   f"image means a new PCR0: update attestation.pcrs), or run a parent wgvsock "
                   f"that still speaks version {PROTOCOL_VERSION}")
        # The parent's operator reads it there (its log, `wgvsock status`): a refusal is read
        # whatever its version.
        with contextlib.suppress(OSError, ControlError):
            _send(conn, {"type": "refused", "reason": why})
        raise IncompatibleParent(why)
    nonce = _b64(msg, "nonce", NONCE_LEN)
    assert nonce is not None
    document = attest(attested_nonce(nonce), public_key) if attest is not None else None
    _send(conn, {
        "type": "register",
        "nonce": _text(nonce),
        "public_key": _text(public_key),
        "attestation": _text(document) if document else None,
    })
    msg = read_message(conn, deadline, any_version=True)
    if msg["type"] == "refused":
        _refused(msg)
    if msg["v"] != PROTOCOL_VERSION:
        raise ControlError(f"the parent answered in control protocol version "
                           f"{quote(msg['v'])}, not the version {PROTOCOL_VERSION} this "
                           f"enclave registered in")
    if msg["type"] != "welcome":
        raise ControlError(f"expected welcome, got {quote(msg['type'])}")
    parent_key = _b64(msg, "public_key", 32)
    port = msg.get("wg_port")
    # bool is an int in Python; JSON's true must not pass for port 1.
    if type(port) is not int or not 0 < port < 2**32:
        raise ControlError("welcome: wg_port missing or out of range")
    attested = msg.get("attested")
    if type(attested) is not bool:  # the string "false" must not read as attested
        raise ControlError("welcome: attested missing or not a boolean")
    assert parent_key is not None
    state = msg.get("attestation")
    if state not in ATTESTATION_STATES:  # an older parent's welcome (or a word not known yet)
        state = "attested" if attested else "unattested"
    return Welcome(parent_key, port, attested, state)
