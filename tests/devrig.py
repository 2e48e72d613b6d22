"""A device after a real handshake with a second engine, with no TUN device and no transport:
its Tun writes and reads virtio-net headers and packets through a datagram socket pair (each
read or write one packet, as a TUN's), and the transport is whatever stand-in the test gives.

Our device has the peer 10.0.0.1/32 behind it; the peer (`peer`, an Engine) has our device
with 10.0.0.2/32."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from typing import Any

from wgvsock.conn.endpoint import Endpoint
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import SEND, TUNNEL, Engine
from wgvsock.core.peer import Peer
from wgvsock.device import tun as tun_mod
from wgvsock.device.device import Device
from wgvsock.device.uapi import parse_set

_ACK = 0x10
A, B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def tcp(sport: int, src: bytes = A, dst: bytes = B) -> bytes:
    """A TCP packet with 100 bytes of payload, its checksum partial (the pseudo-header's sum,
    folded and not inverted), as our daemon sends one to a peer that offered
    CAP_PARTIAL_CSUM."""
    payload = b"x" * 100
    length = 20 + len(payload)
    folded = sum(struct.unpack("!4H", src + dst)) + 6 + length
    while folded > 0xFFFF:
        folded = (folded & 0xFFFF) + (folded >> 16)
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, 1, 1, 5 << 4, _ACK, 512, folded, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, 6, 0, src, dst)
    return ip + tcp + payload


class DeviceRig:
    """The device (`dev`) with `bind` as its transport, a stand-in that keeps what the device
    sends it in `sent`; a session up with `peer`: the peer's initiation and its first data
    message reached the device from `src`. The test's end of the TUN is `test_side`."""

    def __init__(self, bind: Any, *, mtu_hint: int = 1420, lanes: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgdevrig")
        self.bind = bind
        self.dev = Device("wgdevrig", bind, run_dir=os.path.join(self.dir, "run"), lanes=lanes)
        dev_key, peer_key = generate_private_key(), generate_private_key()
        self.dev.uapi_set(parse_set(
            f"private_key={dev_key.hex()}\npublic_key={public_key(peer_key).hex()}\n"
            "allowed_ip=10.0.0.1/32\n"))
        self.tun_side, self.test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.test_side.setblocking(False)
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tun = self.dev.tun = tun_mod.Tun(os.dup(self.tun_side.fileno()), "pipe1", self.ctl,
                                         vnet=True)
        tun.set_blocking(False)
        tun.mtu_hint = mtu_hint
        self.dev._tun_read = self.dev._tun_reader(tun)  # (start() would)
        self.src = Endpoint("unix", "peer", 1)
        self.peer = Engine(peer_key)
        self.dev_peer = self.peer.add_peer(public_key(dev_key))
        self.dev_peer.endpoint = "D"
        self.peer.allowed_ips.insert("10.0.0.2/32", self.dev_peer)
        now = time.monotonic()
        self.dev.engine.start(now)
        self.peer.start(now)
        # The handshake, with the device answering through the stand-in transport.
        [(kind, _, initiation)] = self.peer.encapsulate(tcp(1), now)
        assert kind == SEND
        self.dev._on_receive(initiation, self.src)
        [response] = bind.sent
        bind.sent.clear()
        for kind, _, message in self.peer.decapsulate(response, "D", now):
            if kind == SEND:  # the staged packet, which confirms the session
                self.dev._on_receive(message, self.src)
        self.written()
        self.our_peer: Peer = next(iter(self.dev.engine.peers.values()))
        assert self.our_peer.keypairs.current is not None

    def sealed(self, packet: bytes) -> bytes:
        """`packet` as the peer sends it to the device."""
        [(kind, _, message)] = self.peer.encapsulate(packet, time.monotonic())
        assert kind == SEND
        return message

    def opened(self, messages: list[bytes]) -> list[bytes]:
        """The packets the peer finds in the device's messages."""
        out = []
        for m in messages:
            for kind, _, data in self.peer.decapsulate(m, "D", time.monotonic()):
                if kind == TUNNEL:
                    out.append(bytes(data))
        return out

    def written(self) -> list[bytes]:
        """What the device wrote to its TUN since last asked (virtio-net header first)."""
        out = []
        while True:
            try:
                out.append(self.test_side.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        assert self.dev.tun is not None
        self.dev.tun.close()
        for s in (self.tun_side, self.test_side, self.ctl):
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)
