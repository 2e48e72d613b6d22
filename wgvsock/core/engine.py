"""The sans-I/O WireGuard engine: every peer of one interface, with no sockets and no clock.

The device feeds it packets from the TUN (`encapsulate`), messages from the network
(`decapsulate`) and the passage of time (`update_timers`), always with `now` (monotonic
seconds). Each call returns a list of actions, tuples whose first item says what to do:

    (SEND, peer, message)       write `message` to the transport at the peer's endpoint, and
                                count in its tx_bytes what the transport takes (the device
                                does: only it knows what was sent, as in wireguard-go)
    (REPLY, endpoint, message)  write `message` (a cookie reply: nobody's) to `endpoint`
    (TUNNEL, peer, packet)      write the inner IP `packet` to the TUN device
    (SEGMENTED, mss, packet)    the same for a TCP super-packet the peer sent with its segment
                                size (messages.SEGMENT_TRAILER_MAGIC): cut it in `mss` bytes
    (DROP, peer_or_None, reason) nothing to do; `reason` says why, for logs and tests

Nothing here raises on hostile input: every malformed, truncated, replayed or unauthenticated
message becomes a DROP with a reason. This is the shape of boringtun's `Tunn`, widened to the
whole interface because the index table and the responder's static key are shared by all peers.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from typing import Any, Final

from . import noise
from .allowedips import AllowedIPs
from .cookie import CookieChecker
from .crypto import clamp_private_key, dh, public_key, tai64n
from .keypair import Keypair
from .messages import (
    COOKIE_REPLY_SIZE,
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    MIN_SEGMENT_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    SEGMENT_TRAILER_MAGIC,
    SEGMENT_TRAILER_SIZE,
    TRANSPORT_MIN_SIZE,
    TYPE_COOKIE_REPLY,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    TYPE_TRANSPORT,
    ZERO_KEY_MATERIAL_AFTER,
    padding_size,
)
from .peer import HS_INITIATION_CREATED, Peer
from .ratelimit import SourceRateLimiter
from .timers import (
    NEW_HANDSHAKE,
    PERSISTENT_KEEPALIVE,
    RETRANSMIT_HANDSHAKE,
    SEND_KEEPALIVE,
    ZERO_KEY_MATERIAL,
    random_jitter,
)

SEND: Final = 0
TUNNEL: Final = 1
DROP: Final = 2
SEGMENTED: Final = 3
REPLY: Final = 4

Action = tuple[int, Any, Any]

_HEADER: Final = struct.Struct("<IIQ")
_INDEX_PAIR: Final = struct.Struct("<II")
_NO_MAC2: Final = bytes(16)
_TRAILER_0: Final = SEGMENT_TRAILER_MAGIC[0]
_TRAILER_1: Final = SEGMENT_TRAILER_MAGIC[1]
_KEEPALIVE_RECEIVE_LIMIT: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT


def _roam(peer: Peer, src: Any) -> None:
    """The peer's endpoint becomes `src`, where its last authenticated message came from."""
    if peer.endpoint is not None and src != peer.endpoint:
        peer.roams += 1
    peer.endpoint = src


def _sending_keypair(peer: Peer, now: float) -> Keypair | None:
    """The peer's current keypair if it may seal another message: younger than
    RejectAfterTime, with counters left below RejectAfterMessages. Queued packets too wait
    for a new one otherwise (wireguard-go's SendStagedPackets checks the same)."""
    kp = peer.keypairs.current
    if kp is None or now - kp.created >= REJECT_AFTER_TIME or (
        kp.send_nonce >= REJECT_AFTER_MESSAGES
    ):
        return None
    return kp


def _handshake_size(data: bytes) -> int:
    """The size of an initiation or response, as `data`'s type says it is one; else -1."""
    kind = data[:4]
    if kind == TYPE_INITIATION:
        return INITIATION_SIZE
    if kind == TYPE_RESPONSE:
        return RESPONSE_SIZE
    return -1


def _drop(reason: str, peer: Peer | None = None) -> list[Action]:
    return [(DROP, peer, reason)]


def inner_length(packet: bytes) -> int:
    """Length the IP header claims, or -1 when it is not a plausible IPv4/IPv6 packet: as
    wireguard-go's receiver, an IPv4 total length shorter than the header is one."""
    n = len(packet)
    version = packet[0] >> 4
    if version == 4 and n >= 20:
        length = (packet[2] << 8) | packet[3]
        if length < 20:
            return -1
    elif version == 6 and n >= 40:
        length = 40 + ((packet[4] << 8) | packet[5])
    else:
        return -1
    return length if length <= n else -1


class Engine:
    def __init__(
        self,
        private_key: bytes | None = None,
        *,
        mtu: int = 1420,
        rng: Callable[[int], bytes] = os.urandom,
        rand: Callable[[], float] | None = None,
        wall_offset: float = 0.0,
        forget_source: Callable[[Any], Any] | None = None,
    ) -> None:
        self.mtu = mtu
        # A peer's endpoint without the local address replies were sent from (a UDP bind's
        # sticky source), or None where endpoints hold none. Applied before each retried or
        # timer-made handshake, as wireguard-go and the kernel do: if that address is why no
        # answer comes (it moved, or the path from it broke), the route's choice may get one.
        self._forget_source = forget_source
        # TAI64N timestamps are wall-clock time: now + wall_offset. The device sets the offset
        # once, so later wall-clock jumps cannot make our timestamps go backwards.
        self.wall_offset = wall_offset
        self._rng = rng
        # The jitter only desynchronises retries and need not be secret, as wireguard-go's
        # fastrandn: a seeded PRNG, where SystemRandom made a getrandom() call per data packet
        # that armed the new-handshake timer (each ping, say).
        self._jitter = random_jitter(rand or random.Random(os.urandom(16)).random)  # noqa: S311
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        # receiver index -> (peer, keypair), keypair None while it names a pending handshake
        self._index: dict[int, tuple[Peer, Keypair | None]] = {}
        self._source_limiter = SourceRateLimiter()
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self._cookie_checker: CookieChecker | None = None
        self._responder_initial: tuple[bytes, bytes] = (b"", b"")
        # Whether the interface is up. While down nothing is sent, taken in or timed
        # (stop, start): the device starts its engine down, with its link.
        self.running = True
        self.set_private_key(private_key)

    # -- configuration -------------------------------------------------------------------

    def set_private_key(self, private_key: bytes | None) -> None:
        if private_key is not None:
            # Kept clamped as wireguard-go and the kernel keep it: `wg show` reports the key
            # they hold, and an unclamped key and its clamped form are the same key.
            private_key = clamp_private_key(private_key)
        if private_key == self.private_key:
            return
        self.private_key = private_key
        for peer in self.peers.values():
            self._expire_sessions(peer)
        if private_key is None:
            self.public_key = None
            self._cookie_checker = None
            return
        self.public_key = public_key(private_key)
        self._cookie_checker = CookieChecker(self.public_key, self._rng)
        self._responder_initial = noise.initial_state(noise.IDENTIFIER, self.public_key)
        for peer in self.peers.values():
            peer.static_static = dh(private_key, peer.public_key)

    def add_peer(self, public_key: bytes) -> Peer:
        if len(public_key) != 32:
            raise ValueError("a peer's public key is 32 bytes")
        peer = self.peers.get(public_key)
        if peer is None:
            peer = Peer(public_key, self._jitter)
            if self.private_key is not None:
                peer.static_static = dh(self.private_key, public_key)
            self.peers[public_key] = peer
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        self._forget_sessions(peer)
        peer.timers.stop_all()
        peer.staged.clear()
        self.allowed_ips.remove_by_peer(peer)

    def stop(self) -> None:
        """The interface went down. Every peer is stopped as wireguard-go's Peer.Stop and the
        kernel's wg_stop do: its sessions and any handshake in progress are forgotten, its
        timers stopped and its staged packets dropped. Counters, endpoints and the time of the
        last handshake stay. Until start(), messages and packets are dropped."""
        self.running = False
        for peer in self.peers.values():
            self._forget_sessions(peer)
            timers = peer.timers
            timers.stop_all()
            timers.handshake_attempts = 0
            timers.need_another_keepalive = False
            timers.sent_last_minute_handshake = False
            peer.staged.clear()

    def start(self, now: float) -> list[Action]:
        """The interface came up: each peer with a persistent keepalive sends one now, as
        wireguard-go's upLocked does, which starts a handshake."""
        if self.running:
            return []
        self.running = True
        out: list[Action] = []
        for peer in list(self.peers.values()):
            if peer.timers.persistent_keepalive_interval:
                out += self.send_keepalive(peer, now)
        return out

    def _forget_sessions(self, peer: Peer) -> None:
        self._unindex(peer.keypairs.clear())
        self._drop_handshake(peer)

    def _expire_sessions(self, peer: Peer) -> None:
        """A new private key: the sessions made with the old one send no more, and the next
        packet starts a handshake at once. They still open what the peer sends until they
        expire, so packets in flight are not lost (wireguard-go's ExpireCurrentKeypairs)."""
        for kp in (peer.keypairs.current, peer.keypairs.next):
            if kp is not None:
                kp.send_nonce = REJECT_AFTER_MESSAGES
        # A handshake sent just before would otherwise hold the next one back for
        # RekeyTimeout, with no timer armed to try again.
        self._drop_handshake(peer)

    def _drop_handshake(self, peer: Peer) -> None:
        if peer.handshake.local_index:
            self._index.pop(peer.handshake.local_index, None)
        peer.handshake.clear()
        peer.handshake.last_sent = None

    def _unindex(self, keypairs: list[Keypair]) -> None:
        for kp in keypairs:
            self._index.pop(kp.local_index, None)

    def _new_index(self, peer: Peer) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "little")
            if index and index not in self._index:
                self._index[index] = (peer, None)
                return index

    def _new_ephemeral(self) -> bytes:
        k = bytearray(self._rng(32))
        k[0] &= 248
        k[31] = (k[31] & 127) | 64
        return bytes(k)

    # -- outgoing ------------------------------------------------------------------------

    def encapsulate(
        self, packet: bytes | bytearray | memoryview, now: float, tail: bytes = b""
    ) -> list[Action]:
        """A packet read from the TUN device: route it by allowed IPs and seal it, `tail`
        (a segment-size trailer) sealed right after it as if joined to it."""
        if not self.running:
            return _drop("interface is down")
        peer = self.allowed_ips.lookup_packet_dst(packet)
        if peer is None:
            return _drop("no peer has an allowed IP for the destination")
        return self.send_data(peer, packet, now, tail)

    def seals_now(self, peer: Peer, now: float) -> bool:
        """Whether a packet for `peer` would be sealed at `now` (send_data), not staged until
        a handshake completes."""
        return _sending_keypair(peer, now) is not None

    def send_data(
        self, peer: Peer, packet: bytes | bytearray | memoryview, now: float, tail: bytes = b""
    ) -> list[Action]:
        kp = _sending_keypair(peer, now)
        if kp is None:
            peer.staged.append(b"".join((packet, tail)) if tail else packet)
            return self._initiate(peer, now, retry=False)
        out = [self._seal(peer, kp, packet, now, tail)]
        if kp.send_nonce > REKEY_AFTER_MESSAGES or (
            kp.is_initiator and now - kp.created > REKEY_AFTER_TIME
        ):
            out += self._initiate(peer, now, retry=False)
        return out

    def send_keepalive(self, peer: Peer, now: float) -> list[Action]:
        if not self.running:
            return _drop("interface is down")
        if peer.staged:
            return self._send_staged(peer, now)
        return self.send_data(peer, b"", now)

    def initiate_handshake(self, peer: Peer, now: float) -> list[Action]:
        if not self.running:
            return _drop("interface is down")
        return self._initiate(peer, now, retry=False)

    def _seal(
        self, peer: Peer, kp: Keypair, packet: bytes | bytearray | memoryview, now: float,
        tail: bytes = b"",
    ) -> Action:
        counter = kp.send_nonce
        kp.send_nonce = counter + 1
        if tail:
            size = len(packet) + len(tail)
            msg = kp.send.seal(kp.header, counter, packet, padding_size(size, self.mtu), tail)
        else:
            msg = kp.send.seal(kp.header, counter, packet, padding_size(len(packet), self.mtu))
        peer.timers.transport_sent(now, bool(packet))
        if peer.endpoint is None:
            return (DROP, peer, "peer has no endpoint")
        return (SEND, peer, msg)

    def _send_staged(self, peer: Peer, now: float) -> list[Action]:
        out: list[Action] = []
        while peer.staged:
            kp = _sending_keypair(peer, now)
            if kp is None:
                return out + self._initiate(peer, now, retry=False)
            out.append(self._seal(peer, kp, peer.staged.popleft(), now))
        return out

    def _unstick(self, peer: Peer) -> None:
        if self._forget_source is not None and peer.endpoint is not None:
            peer.endpoint = self._forget_source(peer.endpoint)

    def _initiate(self, peer: Peer, now: float, *, retry: bool) -> list[Action]:
        if not retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if hs.last_sent is not None and now - hs.last_sent < REKEY_TIMEOUT:
            return []
        if self.private_key is None or peer.static_static is None:
            return _drop("no private key (or the peer's key is invalid)", peer)
        hs.last_sent = now
        msg = self._create_initiation(peer, now)
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent()
        timers.handshake_initiated(now)
        if peer.endpoint is None:
            return _drop("peer has no endpoint", peer)
        return [(SEND, peer, msg)]

    def _create_initiation(self, peer: Peer, now: float) -> bytes:
        assert self.private_key is not None
        hs = peer.handshake
        if hs.local_index:
            self._index.pop(hs.local_index, None)
        e_priv = self._new_ephemeral()
        ck, h = noise.initial_state(noise.IDENTIFIER, peer.public_key)
        ck, h, e_pub, enc_static, enc_ts = noise.initiator_write(
            ck, h, e_priv, self.private_key, peer.public_key, tai64n(now + self.wall_offset)
        )
        index = self._new_index(peer)
        msg = bytearray(TYPE_INITIATION)
        msg += index.to_bytes(4, "little") + e_pub + enc_static + enc_ts + bytes(32)
        peer.cookies.add_macs(msg, now)
        hs.state = HS_INITIATION_CREATED
        hs.chain_key, hs.hash, hs.ephemeral_private = ck, h, e_priv
        hs.local_index = index
        return bytes(msg)

    # -- incoming ------------------------------------------------------------------------

    def decapsulate(
        self, data: bytes | memoryview, src: Any, now: float, *, src_key: bytes = b"",
        limit_key: bytes | None = None, under_load: bool = False,
    ) -> list[Action]:
        """A message from the network. `src` is the transport's endpoint it came from;
        `src_key` the bytes that identify that source for cookies (its address and port), and
        `limit_key` the host for the handshake rate limit (default: `src_key`), as wireguard-go
        keys its limiter by IP: a host must not get a fresh allowance per port."""
        if not self.running:
            return _drop("interface is down")
        if not isinstance(data, bytes):
            # A large transport message as a view into a stream transport's receive buffer.
            # Anything else goes to _on_message as bytes, which compiled code indexes in C.
            if data[:4] == TYPE_TRANSPORT:
                return self._on_transport(data, src, now)
            return self._on_message(bytes(data), src, now, src_key, limit_key, under_load)
        return self._on_message(data, src, now, src_key, limit_key, under_load)

    def _on_message(self, data: bytes, src: Any, now: float, src_key: bytes,
                    limit_key: bytes | None, under_load: bool) -> list[Action]:
        kind = data[:4]
        if kind == TYPE_TRANSPORT:
            return self._on_transport(data, src, now)
        keys = (src_key, src_key if limit_key is None else limit_key)
        if kind == TYPE_INITIATION:
            return self._on_initiation(data, src, keys, now, under_load)
        if kind == TYPE_RESPONSE:
            return self._on_response(data, src, keys, now, under_load)
        if kind == TYPE_COOKIE_REPLY:
            return self._on_cookie_reply(data, now)
        return _drop("unknown message type")

    def _on_transport(self, data: bytes | memoryview, src: Any, now: float) -> list[Action]:
        if len(data) < TRANSPORT_MIN_SIZE:
            return _drop("transport message too short")
        _, receiver, counter = _HEADER.unpack_from(data)
        entry = self._index.get(receiver)
        if entry is None:
            return _drop("transport message for an unknown receiver index")
        peer, kp = entry
        if kp is None:
            return _drop("transport message for an unknown receiver index")
        if now - kp.created >= REJECT_AFTER_TIME or counter >= REJECT_AFTER_MESSAGES:
            return _drop("keypair expired", peer)
        packet = kp.receive.open(data)
        if packet is None:
            return _drop("transport message failed authentication", peer)
        if not kp.replay.check(counter, REJECT_AFTER_MESSAGES):
            return _drop("replayed transport message", peer)

        out: list[Action] = []
        keypairs = peer.keypairs
        timers = peer.timers
        # Roam first, so staged packets flushed below go where the peer is now.
        if src is not peer.endpoint:
            _roam(peer, src)
        # Before the staged packets go: sending them answers this packet, and no keepalive
        # must be armed for it afterwards (wireguard-go's sender cancels it the same way).
        timers.transport_received(now, bool(packet))
        if keypairs.next is kp:
            self._unindex(keypairs.confirm(kp) or [])
            timers.handshake_complete()
            peer.last_handshake = now
            out += self._send_staged(peer, now)
        current = keypairs.current
        if (
            current is not None
            and current.is_initiator
            and now - current.created > _KEEPALIVE_RECEIVE_LIMIT
            and not timers.sent_last_minute_handshake
        ):
            timers.sent_last_minute_handshake = True
            out += self._initiate(peer, now, retry=False)
        peer.rx_bytes += len(data)
        if not packet:
            return out  # keepalive
        length = inner_length(packet)
        if length < 0:
            out.append((DROP, peer, "inner packet is not IPv4 or IPv6"))
            return out
        mss = 0
        if length != len(packet):
            # Zero padding, or a segment-size trailer and then padding. (An out-of-range size
            # is ignored: the packet is cut at the MTU, as one that came without it.)
            # (Byte by byte: most padded packets are ACKs, and a zero first byte ends it.)
            if (packet[length] == _TRAILER_0 and len(packet) - length >= SEGMENT_TRAILER_SIZE
                    and packet[length + 1] == _TRAILER_1):
                mss = packet[length + 2] | packet[length + 3] << 8
                if mss < MIN_SEGMENT_SIZE:
                    mss = 0
            packet = packet[:length]
        if self.allowed_ips.lookup_packet_src(packet) is not peer:
            out.append((DROP, peer, "inner source address not allowed for this peer"))
            return out
        out.append((SEGMENTED, mss, packet) if mss else (TUNNEL, peer, packet))
        return out

    def mac1_valid(self, data: bytes) -> bool:
        """Whether `data` is an initiation or response of its size with our mac1: its sender
        knows our public key. Only such a message costs a DH (or, under load, a cookie reply),
        so only such messages count towards being under load: junk of the right type byte is
        dropped for one hash, as _check_macs does."""
        checker = self._cookie_checker
        return (checker is not None and len(data) == _handshake_size(data)
                and checker.check_mac1(data))

    def mac2_valid(self, data: bytes, src_key: bytes, now: float) -> bool:
        """Whether `data` is an initiation or response of its size with a mac2 made with the
        cookie we gave `src_key`: its sender receives at that address, and knows our public
        key (mac1, which _check_macs checks too)."""
        checker = self._cookie_checker
        # An initiator without a cookie sends a zero mac2: that takes no hash to refuse.
        return (checker is not None and len(data) == _handshake_size(data)
                and data[-16:] != _NO_MAC2 and checker.check_mac2(data, src_key, now))

    def _check_macs(
        self, data: bytes, src: Any, keys: tuple[bytes, bytes], now: float, under_load: bool
    ) -> list[Action] | None:
        """None when the message may be processed; else the actions (a drop or a cookie)."""
        checker = self._cookie_checker
        if checker is None:
            return _drop("no private key")
        if not checker.check_mac1(data):
            return _drop("handshake message with an invalid mac1")
        if under_load:
            src_key, limit_key = keys
            if not checker.check_mac2(data, src_key, now):
                sender = int.from_bytes(data[4:8], "little")
                return [(REPLY, src, checker.create_reply(data, sender, src_key, now))]
            if not self._source_limiter.allow(limit_key, now):
                return _drop("handshake rate limit for this source")
        return None

    def _on_initiation(
        self, data: bytes, src: Any, keys: tuple[bytes, bytes], now: float, under_load: bool
    ) -> list[Action]:
        if len(data) != INITIATION_SIZE:
            return _drop("initiation has the wrong size")
        refused = self._check_macs(data, src, keys, now, under_load)
        if refused is not None:
            return refused
        assert self.private_key is not None
        ck, h = self._responder_initial
        e_pub = data[8:40]

        def static_static(remote: bytes) -> bytes | None:
            known = self.peers.get(remote)
            return known.static_static if known is not None else None

        try:
            ck, h, remote, timestamp = noise.responder_read(
                ck, h, self.private_key, e_pub, data[40:88], data[88:116], static_static
            )
        except noise.UnknownInitiator:
            return _drop("initiation from an unknown peer")
        except noise.HandshakeError as e:
            return _drop(f"initiation did not decrypt: {e}")
        peer = self.peers.get(remote)
        if peer is None:  # the callback found it; this only narrows the type
            return _drop("initiation from an unknown peer")
        hs = peer.handshake
        if timestamp <= hs.last_timestamp:
            return _drop("initiation replayed (timestamp did not increase)", peer)
        if (
            hs.last_initiation_consumption is not None
            and now - hs.last_initiation_consumption <= HANDSHAKE_INITIATION_RATE
        ):
            return _drop("initiation flood (more than one per 20 ms)", peer)
        hs.last_timestamp = timestamp
        hs.last_initiation_consumption = now
        # As wireguard-go: answering counts as sending a handshake, so we do not start a
        # crossing one of our own while the initiator's confirmation is on its way.
        hs.last_sent = now
        if hs.local_index:
            self._index.pop(hs.local_index, None)
        sender = int.from_bytes(data[4:8], "little")

        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received()
        _roam(peer, src)
        peer.rx_bytes += len(data)

        e_priv = self._new_ephemeral()
        ck, h, e_resp, enc_empty = noise.responder_write(
            ck, h, e_priv, e_pub, remote, peer.preshared_key, b""
        )
        index = self._new_index(peer)
        msg = bytearray(TYPE_RESPONSE)
        msg += _INDEX_PAIR.pack(index, sender) + e_resp + enc_empty + bytes(32)
        peer.cookies.add_macs(msg, now)
        recv_key, send_key = noise.split(ck)
        kp = Keypair(
            send_key, recv_key, is_initiator=False, local_index=index, remote_index=sender,
            created=now,
        )
        self._index[index] = (peer, kp)
        self._unindex(peer.keypairs.install(kp))
        hs.clear()
        timers.session_derived(now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent()
        return [(SEND, peer, bytes(msg))]  # to src: _roam made it the peer's endpoint

    def _on_response(
        self, data: bytes, src: Any, keys: tuple[bytes, bytes], now: float, under_load: bool
    ) -> list[Action]:
        if len(data) != RESPONSE_SIZE:
            return _drop("response has the wrong size")
        refused = self._check_macs(data, src, keys, now, under_load)
        if refused is not None:
            return refused
        assert self.private_key is not None
        sender, receiver = _INDEX_PAIR.unpack_from(data, 4)
        entry = self._index.get(receiver)
        if entry is None or entry[1] is not None:
            return _drop("response for an unknown receiver index")
        peer = entry[0]
        hs = peer.handshake
        if hs.state != HS_INITIATION_CREATED or hs.local_index != receiver:
            return _drop("response without a pending initiation", peer)
        try:
            ck, _h, _ = noise.initiator_read(
                hs.chain_key, hs.hash, hs.ephemeral_private, self.private_key,
                data[12:44], peer.preshared_key, data[44:60],
            )
        except noise.HandshakeError as e:
            return _drop(f"response did not decrypt: {e}", peer)
        send_key, recv_key = noise.split(ck)
        kp = Keypair(
            send_key, recv_key, is_initiator=True, local_index=receiver, remote_index=sender,
            created=now,
        )
        self._index[receiver] = (peer, kp)
        self._unindex(peer.keypairs.install(kp))
        hs.clear()
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received()
        _roam(peer, src)
        peer.rx_bytes += len(data)
        timers.session_derived(now)
        timers.handshake_complete()
        peer.last_handshake = now
        # The responder holds our keys as "next" until it sees data: confirm them at once.
        return self.send_keepalive(peer, now)

    def _on_cookie_reply(self, data: bytes, now: float) -> list[Action]:
        if len(data) != COOKIE_REPLY_SIZE:
            return _drop("cookie reply has the wrong size")
        entry = self._index.get(int.from_bytes(data[4:8], "little"))
        if entry is None:
            return _drop("cookie reply for an unknown receiver index")
        peer = entry[0]
        if not peer.cookies.consume_reply(data, now):
            return _drop("cookie reply did not decrypt", peer)
        return _drop("cookie stored; the handshake will be retried with mac2", peer)

    # -- time ----------------------------------------------------------------------------

    def update_timers(self, now: float) -> list[Action]:
        out: list[Action] = []
        if not self.running:
            return out
        for peer in list(self.peers.values()):
            timers = peer.timers
            for name in timers.expired(now):
                if name == RETRANSMIT_HANDSHAKE:
                    if timers.handshake_attempts > MAX_TIMER_HANDSHAKES:
                        # Give up: stop trying until new traffic asks for a session again.
                        timers.deadlines[SEND_KEEPALIVE] = None
                        peer.staged.clear()
                        if not timers.pending(ZERO_KEY_MATERIAL):
                            timers.deadlines[ZERO_KEY_MATERIAL] = now + ZERO_KEY_MATERIAL_AFTER
                        out.append((DROP, peer, "handshake gave up after 90 s of retries"))
                    else:
                        timers.handshake_attempts += 1
                        self._unstick(peer)
                        out += self._initiate(peer, now, retry=True)
                elif name == SEND_KEEPALIVE:
                    out += self.send_keepalive(peer, now)
                    if timers.need_another_keepalive:
                        timers.need_another_keepalive = False
                        timers.rearm_keepalive(now)
                elif name == NEW_HANDSHAKE:
                    self._unstick(peer)
                    out += self._initiate(peer, now, retry=False)
                elif name == ZERO_KEY_MATERIAL:
                    self._forget_sessions(peer)
                    peer.staged.clear()
                elif name == PERSISTENT_KEEPALIVE and timers.persistent_keepalive_interval:
                    out += self.send_keepalive(peer, now)
        return out

    def bytes_moved(self) -> int:
        """Bytes sent and received over all peers: whether any moved between two looks."""
        return sum(p.rx_bytes + p.tx_bytes for p in self.peers.values())

    def next_deadline(self) -> float | None:
        deadlines = [d for p in self.peers.values() if (d := p.timers.next_deadline()) is not None]
        return min(deadlines) if deadlines else None
