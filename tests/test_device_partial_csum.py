"""The receiver's side of CAP_PARTIAL_CSUM (Device._on_receive_batch): a batch's TCP packets
go to the TUN marked for the kernel to finish their checksums as the hello on the connection
they came on said (Bind.receive_batch's flags), whatever connection the transport has for the
endpoint by the time they are written. No TUN device: the Tun writes virtio-net headers and
packets to a socket pair; the peer is a second engine that made a real handshake with the
device's."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator

import pytest

from wgvsock.conn.caps import CAP_PARTIAL_CSUM, CAP_SUPER
from wgvsock.conn.endpoint import Endpoint
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import SEND, Engine
from wgvsock.device import tun as tun_mod
from wgvsock.device.device import Device
from wgvsock.device.uapi import parse_set

from .stubbind import StubBind

_NEEDS_CSUM = 1
_ACK = 0x10
_A, _B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


class _GoneBind(StubBind):
    """A stream transport that has no connection for any endpoint any more (peer_caps says
    nothing was offered), as when the one a batch came on was replaced or closed meanwhile;
    it keeps what the device sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data, ep):
        self.sent.append(bytes(data))
        return len(data)

    def peer_caps(self, ep):
        return (0, 0)


def _tcp(sport: int) -> bytes:
    """A TCP packet from a to b with 100 bytes of payload, its checksum partial (the
    pseudo-header's sum, folded and not inverted), as our daemon sends one to a peer that
    offered CAP_PARTIAL_CSUM."""
    payload = b"x" * 100
    length = 20 + len(payload)
    folded = sum(struct.unpack("!4H", _A + _B)) + 6 + length
    while folded > 0xFFFF:
        folded = (folded & 0xFFFF) + (folded >> 16)
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, 1, 1, 5 << 4, _ACK, 512, folded, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, 6, 0, _A, _B)
    return ip + tcp + payload


class _Rig:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgpcsum")
        self.bind = _GoneBind()
        self.dev = Device("wgpcsum", self.bind, run_dir=os.path.join(self.dir, "run"))
        dev_key, peer_key = generate_private_key(), generate_private_key()
        self.dev.uapi_set(parse_set(
            f"private_key={dev_key.hex()}\npublic_key={public_key(peer_key).hex()}\n"
            "allowed_ip=10.0.0.1/32\n"))
        # A datagram pair keeps each TUN write (one writev) apart.
        self.tun_side, self.test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dev.tun = tun_mod.Tun(os.dup(self.tun_side.fileno()), "pipe1", self.ctl,
                                   vnet=True)
        self.dev.tun.mtu_hint = 1420
        self.src = Endpoint("unix", "peer", 1)
        self.peer = Engine(peer_key)
        self.dev_peer = self.peer.add_peer(public_key(dev_key))
        self.dev_peer.endpoint = "D"
        self.peer.allowed_ips.insert("10.0.0.2/32", self.dev_peer)
        now = time.monotonic()
        self.dev.engine.start(now)
        self.peer.start(now)
        # The handshake, with the device answering as its transport would have it.
        [(kind, _, initiation)] = self.peer.encapsulate(_tcp(1), now)
        assert kind == SEND
        self.dev._on_receive(initiation, self.src)
        [response] = self.bind.sent
        confirm = [data for kind, _, data in self.peer.decapsulate(response, "D", now)
                   if kind == SEND]
        for message in confirm:  # the staged packet, which confirms the session
            self.dev._on_receive(message, self.src)
        self.written()

    def sealed(self, packet: bytes) -> bytes:
        [(kind, _, message)] = self.peer.encapsulate(packet, time.monotonic())
        assert kind == SEND
        return message

    def written(self) -> list[bytes]:
        """What the device wrote to its TUN since last asked."""
        self.test_side.setblocking(False)
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


@pytest.fixture
def rig() -> Iterator[_Rig]:
    r = _Rig()
    try:
        yield r
    finally:
        r.close()


def test_a_batch_from_a_connection_that_offered_partial_checksums_has_them_finished(
    rig
) -> None:
    """The sender left the checksums partial because the hello on this connection offered
    CAP_PARTIAL_CSUM; the connection is gone by the time the batch is written (peer_caps
    says (0, 0)). Each packet still goes as NEEDS_CSUM for the kernel to finish. Before
    0cb0092 the device asked peer_caps, wrote them as they were, and the kernel dropped
    them for their bad checksums."""
    # Two flows: packets of one would go as one GSO write, which needs no such word.
    packets = [_tcp(40000), _tcp(40001)]
    rig.dev._on_receive_batch([rig.sealed(p) for p in packets], rig.src,
                              CAP_SUPER | CAP_PARTIAL_CSUM)
    out = rig.written()
    assert [w[10:] for w in out] == packets
    for w in out:
        flags, _, _, _, start, offset = struct.unpack_from("<BBHHHH", w)
        assert (flags & _NEEDS_CSUM, start, offset) == (_NEEDS_CSUM, 20, 16)


def test_a_batch_from_a_connection_that_offered_nothing_goes_as_it_is(rig) -> None:
    """The Go seed's (no hello), or our daemon's with offload off: its checksums are complete,
    and its packets are written without looking for a partial one."""
    packets = [_tcp(40000), _tcp(40001)]
    rig.dev._on_receive_batch([rig.sealed(p) for p in packets], rig.src, 0)
    out = rig.written()
    assert [w[10:] for w in out] == packets
    assert all(w[0] & _NEEDS_CSUM == 0 for w in out)
