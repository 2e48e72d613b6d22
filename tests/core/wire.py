"""Two engines joined by a fake wire and a fake clock, for the core's tests."""

from __future__ import annotations

import random
import struct

from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import DROP, REPLY, SEGMENTED, SEND, TUNNEL, Engine


def ip4(src: str, dst: str, payload: bytes = b"p" * 20) -> bytes:
    """A minimal IPv4 packet (header checksum left zero: the core does not check it)."""
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
        bytes(int(o) for o in src.split(".")), bytes(int(o) for o in dst.split(".")),
    )
    return header + payload


def seeded_rng(seed: int):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


class Pair:
    """Engine `a` (10.0.0.1) and engine `b` (10.0.0.2), endpoints "A" and "B"."""

    def __init__(self, psk_a: bytes | None = None, psk_b: bytes | None = None, seed: int = 1):
        self.now = 1000.0
        ka, kb = generate_private_key(), generate_private_key()
        self.a = Engine(ka, rng=seeded_rng(seed), rand=random.Random(seed).random)
        self.b = Engine(kb, rng=seeded_rng(seed + 1), rand=random.Random(seed + 1).random)
        self.pa = self.a.add_peer(public_key(kb))  # a's view of b
        self.pb = self.b.add_peer(public_key(ka))  # b's view of a
        self.pa.endpoint, self.pb.endpoint = "B", "A"
        if psk_a:
            self.pa.preshared_key = psk_a
        if psk_b:
            self.pb.preshared_key = psk_b
        self.a.allowed_ips.insert("10.0.0.2/32", self.pa)
        self.b.allowed_ips.insert("10.0.0.1/32", self.pb)
        self.tun = {"A": [], "B": []}
        self.drops = {"A": [], "B": []}
        self.sent = {"A": [], "B": []}  # messages each side put on the wire
        self.under_load = {"A": False, "B": False}
        self.cut = False  # when True the wire loses everything

    def engine(self, side: str) -> Engine:
        return self.a if side == "A" else self.b

    def run(self, side: str, actions: list) -> None:
        """Carries out `side`'s actions, delivering sends until the wire is quiet."""
        queue = [(side, a) for a in actions]
        while queue:
            origin, (kind, target, data) = queue.pop(0)
            if kind in (TUNNEL, SEGMENTED):
                self.tun[origin].append(data)
            elif kind == DROP:
                self.drops[origin].append(data)
            elif kind in (SEND, REPLY):
                self.sent[origin].append(data)
                if kind == SEND:  # a peer's message: to its endpoint, counted as the device does
                    target.tx_bytes += len(data)
                    target = target.endpoint
                if self.cut:
                    continue
                dest = target
                out = self.engine(dest).decapsulate(
                    data, origin, self.now, src_key=origin.encode(),
                    under_load=self.under_load[dest],
                )
                queue += [(dest, a) for a in out]

    def send(self, side: str, packet: bytes) -> None:
        self.run(side, self.engine(side).encapsulate(packet, self.now))

    def a_to_b(self, payload: bytes = b"p" * 20) -> bytes:
        pkt = ip4("10.0.0.1", "10.0.0.2", payload)
        self.send("A", pkt)
        return pkt

    def b_to_a(self, payload: bytes = b"q" * 20) -> bytes:
        pkt = ip4("10.0.0.2", "10.0.0.1", payload)
        self.send("B", pkt)
        return pkt

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Moves the clock, firing both sides' timers at every step."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(self.now + step, end)
            for side in ("A", "B"):
                self.run(side, self.engine(side).update_timers(self.now))
