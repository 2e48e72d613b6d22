"""Target `core`: hostile messages into Engine.decapsulate, hostile packets into encapsulate.

The fixture is two engines, A (10.0.0.1, fd00::1) and B (10.0.0.2, fd00::2), joined by a
simulated wire and clock, after real handshakes. Their wire messages (initiation with and
without mac2, response, cookie reply, data, keepalive) are the seeds that get mutated or
replayed. Each engine also has a stray peer without an endpoint, whose allowed IPs nest inside
or around the other engine's, so that routing and source checks need the longest prefix.

An input is `op, flags, payload`:

    op 0  decapsulate(payload) at engine flags&1; under load if flags&2; from an unknown
          source if flags&4, else from the other engine's endpoint
    op 1  encapsulate(payload) at engine flags&1, the result carried to the other engine
    op 2  advance the clock by u16(payload)/100 s and fire both engines' timers
    op 3  payload sealed as an inner packet with engine flags&1's live session (a message
          only the real peer could make), then carried to the other engine
    op 4  as op 3 with payload[2:], but the transport message is held back, not carried;
          then u16(payload) counters of that session are skipped (messages lost on the wire)
    op 5  engine flags&1's held messages carried in an order drawn from the payload, each
          twice if flags&2; if flags&4, first a keepalive that puts the first of them at
          the edge of the receiver's replay window (just inside or, if payload[0]&1, outside)

Oracles besides "never raises": every action is well-formed. A packet handed to the TUN is a
whole IPv4/IPv6 packet, encapsulated or sealed by the other engine, whose source a reference
longest-prefix match (`ipaddress` networks, independent of AllowedIPs) gives to the peer it
came from; an encapsulated packet counts as sent only if the reference routes its destination
to the other engine. A transport message is accepted (the peer's rx_bytes grows) exactly when
a reference replay window says so: made by the engines, for a live keypair of the receiver,
its counter not accepted before and at most WINDOW behind the greatest one accepted (one made
by the engines but with its unauthenticated receiver index rewritten may be accepted, within
the same window). No engine accepts a handshake message twice. A hostile message (one the
engines never made, a handshake its receiver accepted before, a transport message refused)
gets no packet into the TUN and moves no endpoint; only a new handshake the engines made may
move one even with its unauthenticated fields (sender index, MACs) rewritten.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wgvsock.core.crypto import hash_, mac
from wgvsock.core.engine import DROP, REPLY, SEGMENTED, SEND, TUNNEL, Engine, inner_length
from wgvsock.core.keypair import Keypair
from wgvsock.core.messages import (
    INITIATION_SIZE,
    LABEL_MAC1,
    MIN_SEGMENT_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    SEGMENT_TRAILER_MAGIC,
    SEGMENT_TRAILER_SIZE,
    TYPE_COOKIE_REPLY,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    TYPE_TRANSPORT,
    padding_size,
    segment_trailer,
)

from .harness import Target
from .mutate import havoc, random_bytes

OP_DECAP, OP_ENCAP, OP_TIMERS, OP_SEAL, OP_HOLD, OP_FLUSH = range(6)
NAMES = ("A", "B")
TYPES = (TYPE_INITIATION, TYPE_RESPONSE, TYPE_COOKIE_REPLY, TYPE_TRANSPORT)
SIZES = (0, 1, 3, 4, 15, 16, 31, 32, 33, 47, 48, 63, 64, 65, 91, 92, 93, 147, 148, 149)
V4 = ("10.0.0.1", "10.0.0.2", "198.51.100.7", "192.0.2.9", "192.0.2.77", "10.9.8.7",
      "1.2.3.4", "0.0.0.0")
V6 = ("fd00::1", "fd00::2", "2001:db8::1", "2001:db8::77", "::", "ff02::1")
# Allowed IPs per engine: (the other engine's prefixes, the stray peer's). Nested both ways,
# so that a lookup ignoring the prefix length picks the wrong peer for some listed address.
ROUTES = (
    (("0.0.0.0/0", "::/0", "192.0.2.9/32", "2001:db8::1/128"), ("192.0.2.0/24", "2001:db8::/32")),
    (("10.0.0.1/32", "fd00::1/128", "198.51.100.0/24"), ("10.0.0.0/8",)),
)
# The replay window of wireguard-go and Linux (8192 - 64), written here rather than imported:
# the oracle must not move with the code it checks.
WINDOW = 8128
# Counters a held-back message may be overtaken by: the window's edge and the ring's size.
SKIPS = (1, 63, 64, 65, WINDOW - 1, WINDOW, WINDOW + 1, 8191, 8192, 8193, 16_000)
MAX_HELD = 64
WIRE_SEEDS = 256
HANDSHAKE_SEEDS = 32
MAX_HOPS = 1024  # actions carried per input; a ping-pong longer than this is itself a bug
_RECEIVER_COUNTER = struct.Struct("<IQ")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ip_packet(rng: random.Random) -> bytes:
    """A plausible IPv4 or IPv6 packet, its length field sometimes lying."""
    payload = rng.randbytes(rng.choice((0, 1, 8, 20, 100, 1000, 1400, 1480)))
    if rng.random() < 0.6:
        total = 20 + len(payload) if rng.random() < 0.8 else rng.randrange(0x10000)
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, 0, 0, 64, 17, 0,
                             _addr(rng.choice(V4)), _addr(rng.choice(V4)))
    else:
        plen = len(payload) if rng.random() < 0.8 else rng.randrange(0x10000)
        header = struct.pack("!IHBB16s16s", 0x6000_0000, plen & 0xFFFF, 17, 64,
                             _addr(rng.choice(V6)), _addr(rng.choice(V6)))
    return header + payload


def _address(packet: bytes, *, source: bool) -> IPAddress | None:
    """A packet's source or destination, if its first byte and length make it IPv4 or IPv6."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        return ipaddress.IPv4Address(packet[12:16] if source else packet[16:20])
    if version == 6 and len(packet) >= 40:
        return ipaddress.IPv6Address(packet[8:24] if source else packet[24:40])
    return None


def _handshake_core(msg: bytes) -> bytes | None:
    """The part of a handshake message that Noise authenticates: all but the type, the
    sender index and the MACs, which anyone knowing the public key can rewrite."""
    if msg[:4] == TYPE_INITIATION and len(msg) == INITIATION_SIZE:
        return msg[8:116]
    if msg[:4] == TYPE_RESPONSE and len(msg) == RESPONSE_SIZE:
        return msg[8:60]  # with the receiver index, which picks the handshake it completes
    return None


@dataclass(slots=True)
class _Window:
    """The reference replay state of one receiving keypair: every counter it accepted."""

    keypair: Keypair
    last: int = -1
    seen: set[int] = field(default_factory=set)

    def accept(self, counter: int) -> None:
        self.seen.add(counter)
        self.last = max(self.last, counter)


class CoreTarget(Target):
    name = "core"
    count = 1_000_000
    shard_size = 50_000
    rebuild_every = 10_000

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        super().__init__(rng, workdir)
        self.now = 1000.0
        own = random.Random(rng.getrandbits(64))
        self.engines = [
            Engine(own.randbytes(32), rng=own.randbytes, rand=own.random) for _ in NAMES
        ]
        a, b = self.engines
        assert a.public_key is not None and b.public_key is not None
        self.peers = [a.add_peer(b.public_key), b.add_peer(a.public_key)]
        self.peers[0].endpoint, self.peers[1].endpoint = "B", "A"
        # Each engine's stray peer has no endpoint and no session: its packets stage and drop.
        # The reference: each side's networks, longest first, with the peer owning each.
        self.routes: list[list[tuple[Any, Any]]] = []
        for engine, peer, (mine, stray_prefixes) in zip(self.engines, self.peers, ROUTES,
                                                        strict=True):
            stray = engine.add_peer(own.randbytes(32))
            table = [(p, peer) for p in mine] + [(p, stray) for p in stray_prefixes]
            for prefix, owner in table:
                engine.allowed_ips.insert(prefix, owner)
            nets = [(ipaddress.ip_network(p), owner) for p, owner in table]
            self.routes.append(sorted(nets, key=lambda n: -n[0].prefixlen))
        self.mac1_keys = [hash_(LABEL_MAC1, e.public_key) for e in self.engines]  # type: ignore[arg-type]
        self.delivered: list[set[bytes]] = [set(), set()]  # inner packets each side sent
        # The segment sizes each of those may come out with (0: none; a TUNNEL action),
        # from the trailer sealed after it, and how many came out with one.
        self.sizes: list[dict[bytes, set[int]]] = [{}, {}]
        self.segmented = 0
        # Every message the engines sent each other, oldest dropped: the mutation seeds, kept
        # fresh so that their receiver indices name live sessions.
        self.wire: deque[tuple[bytes, int]] = deque(maxlen=WIRE_SEEDS)
        self.originals: set[bytes] = set()
        self.sealed: set[bytes] = set()  # counter and ciphertext of every transport message
        self.cores: set[bytes] = set()  # _handshake_core of every handshake message made
        self.consumed: list[set[bytes]] = [set(), set()]  # ... that each side accepted
        # The latest handshake messages, for _remac: a burst of held transport messages can
        # push every one of them out of `wire`.
        self.handshakes: deque[bytes] = deque(maxlen=HANDSHAKE_SEEDS)
        self.windows: dict[tuple[int, int], _Window] = {}  # (side, receiver index) -> window
        self.held: list[deque[Any]] = [deque(maxlen=MAX_HELD), deque(maxlen=MAX_HELD)]
        self._handshakes()

    # -- fixture -------------------------------------------------------------------------

    def _handshakes(self) -> None:
        wire = self.wire
        self._carry(0, self.engines[0].encapsulate(self._packet(0), self.now))
        self._carry(1, self.engines[1].encapsulate(self._packet(1), self.now))
        # A second initiation while B is under load draws a cookie reply; the retry has mac2.
        self.now += 6
        a, peer = self.engines[0], self.peers[0]
        initiation = a.initiate_handshake(peer, self.now)
        wire.append((initiation[0][2], 1))
        self._made(initiation[0][2])
        cookie, _ = self._deliver(1, initiation[0][2], "A", True)
        self._carry(1, cookie)
        self.now += 6
        self._carry(0, a.initiate_handshake(peer, self.now), load=True)
        self._carry(0, a.encapsulate(self._packet(0), self.now))
        self._carry(1, self.engines[1].send_keepalive(self.peers[1], self.now))
        kinds = {m[:4] for m, _ in wire}
        assert kinds == set(TYPES), f"fixture missed message types: {kinds}"

    def _packet(self, side: int) -> bytes:
        src, dst = ("10.0.0.1", "10.0.0.2") if side == 0 else ("10.0.0.2", "10.0.0.1")
        pkt = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, _addr(src), _addr(dst))
        pkt += b"fuzzseed"
        self.delivered[side].add(pkt)
        self.sizes[side].setdefault(pkt, set()).add(0)
        return pkt

    def _made(self, msg: bytes) -> None:
        """Records a message one of the engines made."""
        self.originals.add(msg)
        if msg[:4] == TYPE_TRANSPORT:
            self.sealed.add(msg[8:])
        else:
            core = _handshake_core(msg)
            if core is not None:
                self.cores.add(core)
                self.handshakes.append(msg)

    def _owner(self, side: int, addr: IPAddress | None) -> Any:
        """The peer owning `addr` among `side`'s allowed IPs, by the reference: None if none."""
        if addr is None:
            return None
        for net, peer in self.routes[side]:
            if addr in net:  # False across IP versions
                return peer
        return None

    def _carry(self, side: int, actions: list[Any], *, load: bool = False,
               hostile: bool = False) -> None:
        """Checks `side`'s actions and carries its sends to the other engine until quiet;
        `hostile` marks actions that a message the engines never made (or a replay) caused."""
        queue = deque((side, a, hostile) for a in actions)
        hops = 0
        while queue:
            hops += 1
            assert hops <= MAX_HOPS, "engines kept answering each other"
            origin, action, bad = queue.popleft()
            assert isinstance(action, tuple) and len(action) == 3, f"bad action {action!r}"
            kind, target, data = action
            if kind == DROP:
                assert isinstance(data, str), f"drop reason {data!r}"
                continue
            if kind == TUNNEL:
                self._check_tunnel(origin, target, data, bad)
                assert 0 in self.sizes[1 - origin][data], (
                    "a segment-size trailer sealed with the packet was lost")
                continue
            if kind == SEGMENTED:
                # A sealed plaintext with a segment-size trailer after its IP packet.
                assert isinstance(target, int) and MIN_SEGMENT_SIZE <= target <= 0xFFFF, (
                    f"segment size {target!r}")
                self._check_tunnel(origin, self.peers[origin], data, bad)
                assert target in self.sizes[1 - origin][data], (
                    f"segment size {target} was not the one sealed with the packet")
                self.segmented += 1
                continue
            assert kind in (SEND, REPLY), f"unknown action kind {kind!r}"
            if kind == SEND:  # a peer's message, to where the peer is now
                assert target is self.peers[origin], f"sent for {target!r}"
                target = target.endpoint
            assert isinstance(data, bytes) and data[:4] in TYPES, f"sent {data[:8]!r}"
            dest = NAMES.index(target) if target in NAMES else None
            if dest is None or dest == origin:
                continue  # an answer to the fuzzer's made-up source
            self.wire.append((data, dest))
            self._made(data)
            out, hostile_msg = self._deliver(dest, data, NAMES[origin], load)
            queue += [(dest, a, bad or hostile_msg) for a in out]

    def _deliver(self, side: int, msg: bytes, src: str, load: bool) -> tuple[list[Any], bool]:
        """`side` decapsulates `msg` from `src`. Returns its actions and whether `msg` is
        hostile: not made by the engines, a handshake that `side` accepted before, or a
        transport message `side` refused. Checks that a transport message is accepted exactly
        when the reference says so, that no handshake is accepted twice (accepted: the peer's
        rx_bytes grew), and that a hostile message moves no endpoint."""
        engine, peer = self.engines[side], self.peers[side]
        transport = msg[:4] == TYPE_TRANSPORT
        core = None if transport else _handshake_core(msg)
        replayed = core is not None and core in self.consumed[side]
        if transport:
            window = self._window(side, msg)
            # The receiver index is not authenticated: a message sealed for a keypair whose
            # peer was handed a rewritten index opens once the index is put right.
            may = window is not None and msg[8:] in self.sealed
            must = may and msg in self.originals
            hostile = not must
        else:
            hostile = replayed or msg not in self.originals
        rx = peer.rx_bytes
        endpoints = [p.endpoint for p in engine.peers.values()] if hostile else None
        out = engine.decapsulate(msg, src, self.now, src_key=src.encode(), under_load=load)
        accepted = peer.rx_bytes != rx
        if transport:
            assert accepted or not must, (
                "a fresh transport message for a live keypair, within the replay window, "
                "was refused")
            assert may or not accepted, (
                "a replayed, stale, expired or forged transport message was accepted")
            if accepted:
                assert window is not None
                window[0].accept(window[1])
                hostile = False
        elif accepted and core is not None:
            assert not replayed, "a handshake message was accepted a second time"
            self.consumed[side].add(core)
        # A handshake the engines made may come with its unauthenticated fields rewritten
        # (the sender index, the MACs): it is the engines' all the same, and what its
        # acceptance lets out (the packets held for the handshake) is theirs too.
        if hostile and not transport and not replayed and core in self.cores:
            hostile = False
        if hostile:
            assert [p.endpoint for p in engine.peers.values()] == endpoints, (
                "a message the engines never made (or a replay) moved a peer's endpoint")
        return out, hostile

    def _window(self, side: int, msg: bytes) -> tuple[_Window, int] | None:
        """The window and counter of transport message `msg` if `side` holds a live keypair
        under its receiver index and the counter is acceptable there, by the rule of the
        whitepaper (5.4.6) written out plainly (no ring); None if `side` must refuse it."""
        if len(msg) < 16:
            return None
        receiver, counter = _RECEIVER_COUNTER.unpack_from(msg, 4)
        for kp in self.peers[side].keypairs.all():
            if kp.local_index == receiver:
                break
        else:
            return None
        if self.now - kp.created >= REJECT_AFTER_TIME or counter >= REJECT_AFTER_MESSAGES:
            return None
        window = self.windows.get((side, receiver))
        if window is None or window.keypair is not kp:
            window = self.windows[side, receiver] = _Window(kp)
        if counter in window.seen or window.last - counter > WINDOW:
            return None
        return window, counter

    def _check_tunnel(self, side: int, peer: object, packet: object, hostile: bool) -> None:
        assert not hostile, "a message the engines never made put a packet into the TUN"
        assert isinstance(packet, bytes), f"TUN packet is {type(packet).__name__}"
        assert peer is self.peers[side], "TUN packet attributed to the wrong peer"
        assert inner_length(packet) == len(packet), "TUN packet is not a whole IP packet"
        assert self._owner(side, _address(packet, source=True)) is peer, (
            "TUN packet's source is not allowed for its peer")
        assert packet in self.delivered[1 - side], "TUN packet the other side never sent"

    # -- inputs --------------------------------------------------------------------------

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        side = rng.randrange(2)
        r = rng.random()
        if r < 0.20:
            kind, op, payload = "decap-random", OP_DECAP, self._random_message(rng)
        elif r < 0.50:
            kind, op = "decap-mutated", OP_DECAP
            seed, dest = self._recent(rng)
            side = dest if rng.random() < 0.8 else side  # mostly where it was going
            payload = havoc(rng, seed, max_len=2048, pool=tuple(m for m, _ in self.wire))
        elif r < 0.55:
            kind, op = "decap-replay", OP_DECAP
            payload, side = self._recent(rng)  # verbatim, where it went before
        elif r < 0.62:
            kind, op, payload = "decap-remac", OP_DECAP, self._remac(rng, side)
        elif r < 0.65:
            kind, op, payload = "decap-response", OP_DECAP, self._fresh_response(rng, side)
        elif r < 0.77:
            kind, op, payload = "decap-sealed", OP_SEAL, self._inner(rng)
        elif r < 0.82:
            kind, op = "held", OP_HOLD
            skip = rng.choice(SKIPS) if rng.random() < 0.2 else 0
            payload = skip.to_bytes(2, "big") + self._inner(rng)
        elif r < 0.83:
            kind, op, payload = "held-flush", OP_FLUSH, rng.randbytes(8)
        elif r < 0.98:
            kind, op, payload = "encap", OP_ENCAP, self._inner(rng)
        else:
            kind, op = "timers", OP_TIMERS
            payload = rng.choice((rng.randrange(100), rng.randrange(0x10000))).to_bytes(2, "big")
        flags = side | (rng.random() < 0.2) << 1 | (rng.random() < 0.2) << 2
        return kind, bytes((op, flags)) + payload

    def _recent(self, rng: random.Random) -> tuple[bytes, int]:
        """A wire message and where it went, mostly a recent one: older ones name sessions
        that have since been replaced."""
        return self.wire[-1 - min(int(rng.expovariate(1 / 16)), len(self.wire) - 1)]

    def _random_message(self, rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return random_bytes(rng)
        body = rng.randbytes(max(0, rng.choice(SIZES) - 4))
        return rng.choice(TYPES) + body

    def _remac(self, rng: random.Random, side: int, msg: bytes | None = None) -> bytes:
        """A handshake message changed in place, then given a valid mac1 for `side`, so that
        it gets past the cheap check into the Noise code."""
        if msg is None:
            msg = rng.choice(self.handshakes)
        b = bytearray(msg)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(4, len(b) - 32)
            b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
        if rng.random() < 0.2:  # a low-order or all-zero ephemeral key
            off = 8 if b[:4] == TYPE_INITIATION else 12
            b[off:off + 32] = bytes(32) if rng.random() < 0.5 else b"\x01" + bytes(31)
        b[-32:-16] = mac(self.mac1_keys[side], bytes(b[:-32]))
        assert len(b) in (INITIATION_SIZE, RESPONSE_SIZE)
        return bytes(b)

    def _fresh_response(self, rng: random.Random, side: int) -> bytes:
        """`side` starts a handshake and the other engine answers; the answer, changed and
        re-MACed, is what `side` gets: a response for a pending initiation, which the seeds
        (all answered long ago) cannot give."""
        self.now += REKEY_TIMEOUT + 0.1  # the initiator sends at most one per REKEY_TIMEOUT
        initiation = self.engines[side].initiate_handshake(self.peers[side], self.now)
        for kind, _, msg in initiation:
            if kind == SEND:
                self._made(msg)
                answer, _ = self._deliver(1 - side, msg, NAMES[side], False)
                for kind2, _, response in answer:
                    if kind2 == SEND and response[:4] == TYPE_RESPONSE:
                        # A change can be undone by chance: the genuine one is no attack.
                        self._made(response)
                        return self._remac(rng, side, response)
        return self._remac(rng, side)

    def _inner(self, rng: random.Random) -> bytes:
        r = rng.random()
        if r < 0.1:
            # A super-packet's segment size after it (CAP_SEGMENT_SIZE), maybe out of range,
            # cut short, or with more bytes after it.
            tail = segment_trailer(rng.choice((0, MIN_SEGMENT_SIZE - 1, MIN_SEGMENT_SIZE,
                                               1208, 0xFFFF)))
            return ip_packet(rng) + tail[:rng.choice((1, 3, 4, 4, 4))] + rng.choice(
                (b"", b"", bytes(12), rng.randbytes(5)))
        if r < 0.5:
            return ip_packet(rng)
        if r < 0.85:
            return havoc(rng, ip_packet(rng), max_len=2000)
        return random_bytes(rng, 100)

    def _expect(self, side: int, payload: bytes) -> None:
        """Remember what the other side may hand to its TUN for `payload` sealed by `side`:
        the padded packet cut to its header's length. (Padding can complete a packet whose
        header claims a few bytes more than it has, as in every WireGuard; a real TUN never
        reads such a packet.)"""
        padded = payload + bytes(padding_size(len(payload), self.engines[side].mtu))
        length = inner_length(padded) if padded else -1
        if length >= 0:
            self.delivered[side].add(padded[:length])
            tail = padded[length:length + SEGMENT_TRAILER_SIZE]
            mss = int.from_bytes(tail[2:], "little") if (
                tail[:2] == SEGMENT_TRAILER_MAGIC and len(tail) == SEGMENT_TRAILER_SIZE) else 0
            self.sizes[side].setdefault(padded[:length], set()).add(
                mss if mss >= MIN_SEGMENT_SIZE else 0)

    # -- running -------------------------------------------------------------------------

    def run(self, data: bytes) -> None:
        op, flags, payload = data[0], data[1], data[2:]
        side = flags & 1
        engine = self.engines[side]
        self.now += 0.001
        if op == OP_DECAP:
            src = "X" if flags & 4 else NAMES[1 - side]
            out, hostile = self._deliver(side, payload, src, bool(flags & 2))
            self._carry(side, out, hostile=hostile)
        elif op == OP_ENCAP:
            if self._owner(side, _address(payload, source=False)) is self.peers[side]:
                self._expect(side, payload)  # routed to the other engine, by the reference
            self._carry(side, engine.encapsulate(payload, self.now))
        elif op == OP_TIMERS:
            self.now += int.from_bytes(payload[:2], "big") / 100
            for s, e in enumerate(self.engines):
                self._carry(s, e.update_timers(self.now))
        elif op == OP_SEAL:
            self._expect(side, payload)
            self._carry(side, engine.send_data(self.peers[side], payload, self.now))
        elif op == OP_HOLD:
            packet = payload[2:]
            self._expect(side, packet)
            out = engine.send_data(self.peers[side], packet, self.now)
            sends = [a for a in out if a[0] == SEND and a[2][:4] == TYPE_TRANSPORT]
            self.held[side] += sends
            kp = self.peers[side].keypairs.current
            if sends and kp is not None:
                # The receiver cannot tell skipped counters from messages lost on the wire.
                kp.send_nonce += int.from_bytes(payload[:2], "big")
            self._carry(side, [a for a in out if a not in sends])
        elif op == OP_FLUSH:
            held = list(self.held[side])
            self.held[side].clear()
            if flags & 2:
                held += held
            random.Random(payload).shuffle(held)
            if flags & 4 and held:
                self._overtake(side, held[0][2], payload[0] & 1)
            self._carry(side, held)

    def _overtake(self, side: int, msg: bytes, beyond: int) -> None:
        """`side` skips counters (the receiver cannot tell them from messages lost on the
        wire) and sends a keepalive WINDOW + `beyond` past held `msg`'s counter: `msg`, once
        delivered, is just inside (0) or just outside (1) the receiver's window."""
        kp = self.peers[side].keypairs.current
        receiver, counter = _RECEIVER_COUNTER.unpack_from(msg, 4)
        if kp is None or kp.remote_index != receiver:
            return  # sealed with a keypair since replaced
        kp.send_nonce = max(kp.send_nonce, counter + WINDOW + beyond)
        self._carry(side, self.engines[side].send_keepalive(self.peers[side], self.now))
