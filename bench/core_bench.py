"""Micro-benchmark of the core's per-packet path: seal (encapsulate) and open (decapsulate).

Run: .venv/bin/python bench/core_bench.py [--seconds S]
Prints packets per second and Mbit/s of inner payload at 1420 and 65000 bytes.
"""

from __future__ import annotations

import argparse
import struct
import time

from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import SEND, TUNNEL, Engine


def ip4(size: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return header + bytes(size - 20)


def connected_pair(mtu: int) -> tuple[Engine, Engine]:
    ka, kb = generate_private_key(), generate_private_key()
    a, b = Engine(ka, mtu=mtu), Engine(kb, mtu=mtu)
    pa, pb = a.add_peer(public_key(kb)), b.add_peer(public_key(ka))
    pa.endpoint, pb.endpoint = "B", "A"
    a.allowed_ips.insert("10.0.0.2/32", pa)
    b.allowed_ips.insert("10.0.0.1/32", pb)
    queue = [("A", x) for x in a.initiate_handshake(pa, 0.0)]
    while queue:
        side, (kind, _peer, data) = queue.pop()
        if kind == SEND:
            dest, origin = (b, "A") if side == "A" else (a, "B")
            queue += [("B" if dest is b else "A", x) for x in dest.decapsulate(data, origin, 0.0)]
    return a, b


def measure(size: int, seconds: float) -> tuple[float, float]:
    a, b = connected_pair(mtu=max(1420, size))
    packet = ip4(size)
    now = 1.0
    sealed = []
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(256):
            sealed.append(a.encapsulate(packet, now)[0][2])
        n += 256
    seal_pps = n / elapsed
    start = time.perf_counter()
    for msg in sealed:
        out = b.decapsulate(msg, "A", now)
        assert out[0][0] == TUNNEL
    open_pps = len(sealed) / (time.perf_counter() - start)
    return seal_pps, open_pps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    cols = ("seal pkt/s", "seal Mbit/s", "open pkt/s", "open Mbit/s")
    print(f"{'size':>6} " + " ".join(f"{c:>12}" for c in cols))
    for size in (1420, 65000):
        seal, open_ = measure(size, args.seconds)
        print(f"{size:>6} {seal:>12,.0f} {seal * size * 8 / 1e6:>12,.0f} "
              f"{open_:>12,.0f} {open_ * size * 8 / 1e6:>12,.0f}")


if __name__ == "__main__":
    main()
