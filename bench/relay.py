"""The least a Python data path can do: a TUN relayed over one TCP connection, no WireGuard.

Run as root, one per side (ping_bench.py and tunnel_bench.py start it as the `relay-tcp` and
`relay-tcp-plain` cases):
    relay.py IFNAME --listen HOST:PORT | --connect HOST:PORT [--plain]

A calibration for the round-trip time, not a tunnel: our daemon's thread shape (one thread
waits in poll() on the TUN and the socket and serves whichever is ready), each packet sealed
and opened with the same ChaCha20-Poly1305 binding our daemon uses and a fixed key, behind a
4-byte length. No handshake, routing, counters, timers, replay window or checks. What our
daemon takes beyond this is the cost of WireGuard in Python; what this takes beyond the Go
seed is the cost of Python itself (an interpreter woken per packet), which no change to our
WireGuard code can remove. `--plain` leaves the AEAD out too. Prints "ready" once listening
(or connected) and exits when the connection or the interface goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import struct
import sys

from wgvsock.core.transport_aead import TransportKey
from wgvsock.device.tun import Tun

_LEN = struct.Struct("<I")
_HEADER = struct.pack("<II", 4, 0)  # a transport message's type and receiver


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ifname")
    side = ap.add_mutually_exclusive_group(required=True)
    side.add_argument("--listen", type=_addr, metavar="HOST:PORT")
    side.add_argument("--connect", type=_addr, metavar="HOST:PORT")
    ap.add_argument("--plain", action="store_true", help="no AEAD either")
    args = ap.parse_args()

    tun = Tun.create(args.ifname)
    if args.listen:
        with socket.create_server(args.listen) as server:
            print("ready", flush=True)
            sock, _ = server.accept()
    else:
        sock = socket.create_connection(args.connect)
        print("ready", flush=True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = None if args.plain else TransportKey(bytes(32))
    counter = 0
    pending = b""
    tun_fd, sock_fd = tun.fileno(), sock.fileno()
    os.set_blocking(tun_fd, False)
    poller = select.poll()
    poller.register(tun_fd, select.POLLIN)
    poller.register(sock_fd, select.POLLIN)
    try:
        while True:
            for fd, _ in poller.poll():
                if fd == tun_fd:
                    try:
                        packet = os.read(tun_fd, 65535)
                    except BlockingIOError:
                        continue
                    if key is not None:
                        packet = key.seal(_HEADER, counter, packet, 0)
                        counter += 1
                    sock.sendmsg([_LEN.pack(len(packet)), packet])
                    continue
                data = sock.recv(262144)
                if not data:
                    return 0
                pending += data
                while len(pending) >= 4:
                    end = 4 + _LEN.unpack_from(pending)[0]
                    if len(pending) < end:
                        break
                    message, pending = pending[4:end], pending[end:]
                    packet = message if key is None else key.open(message)
                    if packet is not None:
                        # Refused while the interface is not up yet: dropped, as a NIC would.
                        with contextlib.suppress(OSError):
                            os.write(tun_fd, packet)
    except OSError as e:  # the interface was deleted, or the peer reset the connection
        print(f"relay {args.ifname}: {e}", file=sys.stderr)
        return 0
    finally:
        sock.close()
        tun.close()


if __name__ == "__main__":
    sys.exit(main())
