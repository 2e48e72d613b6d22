"""Target `core`: hostile messages into Engine.decapsulate, hostile packets into encapsulate.

The fixture is two engines, A (10.0.0.1, fd00::1) and B (10.0.0.2, fd00::2), joined by a
simulated wire and clock, after real handshakes. Their wire messages (initiation with and
without mac2, response, cookie reply, data, keepalive) are the seeds that get mutated.

An input is `op, flags, payload`:

    op 0  decapsulate(payload) at engine flags&1; under load if flags&2; from an unknown
          source if flags&4, else from the other engine's endpoint
    op 1  encapsulate(payload) at engine flags&1, the result carried to the other engine
    op 2  advance the clock by u16(payload)/100 s and fire both engines' timers
    op 3  payload sealed as an inner packet with engine flags&1's live session (a message
          only the real peer could make), then carried to the other engine

Oracles besides "never raises": every action is well-formed; a packet handed to the TUN is a
whole IPv4/IPv6 packet whose source the sending peer may use; a message that is not one the
engines made never gets a packet into the TUN; what reaches a TUN was encapsulated or sealed
by the other engine.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import deque
from pathlib import Path
from typing import Any

from wgvsock.core.crypto import hash_, mac
from wgvsock.core.engine import DROP, SEND, TUNNEL, Engine, inner_length
from wgvsock.core.messages import (
    INITIATION_SIZE,
    LABEL_MAC1,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    TYPE_COOKIE_REPLY,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    TYPE_TRANSPORT,
    padding_size,
)

from .harness import Target
from .mutate import havoc, random_bytes

OP_DECAP, OP_ENCAP, OP_TIMERS, OP_SEAL = range(4)
NAMES = ("A", "B")
TYPES = (TYPE_INITIATION, TYPE_RESPONSE, TYPE_COOKIE_REPLY, TYPE_TRANSPORT)
SIZES = (0, 1, 3, 4, 15, 16, 31, 32, 33, 47, 48, 63, 64, 65, 91, 92, 93, 147, 148, 149)
V4 = ("10.0.0.1", "10.0.0.2", "198.51.100.7", "192.0.2.9", "1.2.3.4", "0.0.0.0")
V6 = ("fd00::1", "fd00::2", "2001:db8::1", "::", "ff02::1")
WIRE_SEEDS = 256
MAX_HOPS = 1024  # actions carried per input; a ping-pong longer than this is itself a bug


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
        for prefix in ("0.0.0.0/0", "::/0"):
            a.allowed_ips.insert(prefix, self.peers[0])
        for prefix in ("10.0.0.1/32", "fd00::1/128", "198.51.100.0/24"):
            b.allowed_ips.insert(prefix, self.peers[1])
        # A third peer at A with no endpoint and no session: its packets stage and drop.
        stray = a.add_peer(own.randbytes(32))
        a.allowed_ips.insert("192.0.2.0/24", stray)
        self.mac1_keys = [hash_(LABEL_MAC1, e.public_key) for e in self.engines]  # type: ignore[arg-type]
        self.delivered: list[set[bytes]] = [set(), set()]  # inner packets each side sent
        # Every message the engines sent each other, oldest dropped: the mutation seeds, kept
        # fresh so that their receiver indices name live sessions.
        self.wire: deque[tuple[bytes, int]] = deque(maxlen=WIRE_SEEDS)
        self.originals: set[bytes] = set()
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
        self.originals.add(initiation[0][2])
        cookie = self.engines[1].decapsulate(initiation[0][2], "A", self.now, src_key=b"A",
                                             under_load=True)
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
        return pkt

    def _carry(self, side: int, actions: list[Any], *, load: bool = False,
               hostile: bool = False) -> None:
        """Checks `side`'s actions and carries its sends to the other engine until quiet."""
        queue = [(side, a) for a in actions]
        hops = 0
        while queue:
            hops += 1
            assert hops <= MAX_HOPS, "engines kept answering each other"
            origin, action = queue.pop(0)
            assert isinstance(action, tuple) and len(action) == 3, f"bad action {action!r}"
            kind, target, data = action
            if kind == DROP:
                assert isinstance(data, str), f"drop reason {data!r}"
                continue
            if kind == TUNNEL:
                self._check_tunnel(origin, target, data, hostile)
                continue
            assert kind == SEND, f"unknown action kind {kind!r}"
            assert isinstance(data, bytes) and data[:4] in TYPES, f"sent {data[:8]!r}"
            dest = NAMES.index(target) if target in NAMES else None
            if dest is None or dest == origin:
                continue  # an answer to the fuzzer's made-up source
            self.wire.append((data, dest))
            self.originals.add(data)
            out = self.engines[dest].decapsulate(data, NAMES[origin], self.now,
                                                 src_key=NAMES[origin].encode(), under_load=load)
            queue += [(dest, a) for a in out]

    def _check_tunnel(self, side: int, peer: object, packet: object, hostile: bool) -> None:
        assert not hostile, "a message the engines never made put a packet into the TUN"
        assert isinstance(packet, bytes), f"TUN packet is {type(packet).__name__}"
        assert peer is self.peers[side], "TUN packet attributed to the wrong peer"
        assert inner_length(packet) == len(packet), "TUN packet is not a whole IP packet"
        assert self.engines[side].allowed_ips.lookup_packet_src(packet) is peer, (
            "TUN packet's source is not allowed for its peer")
        assert packet in self.delivered[1 - side], "TUN packet the other side never sent"

    # -- inputs --------------------------------------------------------------------------

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        side = rng.randrange(2)
        r = rng.random()
        if r < 0.20:
            kind, op, payload = "decap-random", OP_DECAP, self._random_message(rng)
        elif r < 0.55:
            kind, op = "decap-mutated", OP_DECAP
            # Mostly recent messages: older ones name sessions that have since been replaced.
            seed, dest = self.wire[-1 - min(int(rng.expovariate(1 / 16)), len(self.wire) - 1)]
            side = dest if rng.random() < 0.8 else side  # mostly where it was going
            payload = havoc(rng, seed, max_len=2048, pool=tuple(m for m, _ in self.wire))
        elif r < 0.62:
            kind, op, payload = "decap-remac", OP_DECAP, self._remac(rng, side)
        elif r < 0.65:
            kind, op, payload = "decap-response", OP_DECAP, self._fresh_response(rng, side)
        elif r < 0.80:
            kind, op, payload = "decap-sealed", OP_SEAL, self._inner(rng)
        elif r < 0.98:
            kind, op, payload = "encap", OP_ENCAP, self._inner(rng)
        else:
            kind, op = "timers", OP_TIMERS
            payload = rng.choice((rng.randrange(100), rng.randrange(0x10000))).to_bytes(2, "big")
        flags = side | (rng.random() < 0.2) << 1 | (rng.random() < 0.2) << 2
        return kind, bytes((op, flags)) + payload

    def _random_message(self, rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return random_bytes(rng)
        body = rng.randbytes(max(0, rng.choice(SIZES) - 4))
        return rng.choice(TYPES) + body

    def _remac(self, rng: random.Random, side: int, msg: bytes | None = None) -> bytes:
        """A handshake message changed in place, then given a valid mac1 for `side`, so that
        it gets past the cheap check into the Noise code."""
        if msg is None:
            msg = rng.choice([m for m, _ in self.wire if m[:4] in (TYPE_INITIATION, TYPE_RESPONSE)]
                             or [m for m, _ in self.wire])
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
                answer = self.engines[1 - side].decapsulate(msg, NAMES[side], self.now)
                for kind2, _, response in answer:
                    if kind2 == SEND and response[:4] == TYPE_RESPONSE:
                        # A change can be undone by chance: the genuine one is no attack.
                        self.originals.add(response)
                        return self._remac(rng, side, response)
        return self._remac(rng, side)

    def _inner(self, rng: random.Random) -> bytes:
        r = rng.random()
        if r < 0.5:
            return ip_packet(rng)
        if r < 0.85:
            return havoc(rng, ip_packet(rng), max_len=2000)
        return random_bytes(rng, 100)

    def _expect(self, side: int, payload: bytes) -> None:
        """Remember what the other side may hand to its TUN for `payload`: the padded packet
        cut to its header's length. (Padding can complete a packet whose header claims a few
        bytes more than it has, as in every WireGuard; a real TUN never reads such a packet.)"""
        padded = payload + bytes(padding_size(len(payload), self.engines[side].mtu))
        length = inner_length(padded) if padded else -1
        if length >= 0:
            self.delivered[side].add(padded[:length])

    # -- running -------------------------------------------------------------------------

    def run(self, data: bytes) -> None:
        op, flags, payload = data[0], data[1], data[2:]
        side = flags & 1
        engine = self.engines[side]
        self.now += 0.001
        if op == OP_DECAP:
            stranger = bool(flags & 4)
            src = "X" if stranger else NAMES[1 - side]
            out = engine.decapsulate(payload, src, self.now, src_key=src.encode(),
                                     under_load=bool(flags & 2))
            self._carry(side, out, hostile=payload not in self.originals)
        elif op == OP_ENCAP:
            self._expect(side, payload)
            self._carry(side, engine.encapsulate(payload, self.now))
        elif op == OP_TIMERS:
            self.now += int.from_bytes(payload[:2], "big") / 100
            for s, e in enumerate(self.engines):
                self._carry(s, e.update_timers(self.now))
        elif op == OP_SEAL:
            self._expect(side, payload)
            self._carry(side, engine.send_data(self.peers[side], payload, self.now))
