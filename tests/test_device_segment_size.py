"""The sender's side of CAP_SEGMENT_SIZE (Device._read_for_peer): which TCP super-packets read
from the TUN cross whole with their segment size, which are cut into segments here, and
which go whole without a size. No TUN device: the Tun reads virtio-net headers and packets
from a pipe, and the transport is a stand-in that answers the peer's hello flags."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator

import pytest

from wgvsock.conn.caps import CAP_PARTIAL_CSUM, CAP_SEGMENT_SIZE, CAP_SUPER
from wgvsock.conn.endpoint import Endpoint
from wgvsock.conn.framing import MAX_PAYLOAD
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.keypair import Keypair
from wgvsock.core.messages import (
    MIN_SEGMENT_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    SEGMENT_TRAILER_MAGIC,
    SEGMENT_TRAILER_SIZE,
    padding_size,
)
from wgvsock.device import tun as tun_mod
from wgvsock.device.device import Device, Trailed
from wgvsock.device.tun import GSO_MAX_SIZE
from wgvsock.device.uapi import parse_set

from .stubbind import StubBind

_ACK = 0x10
_GSO_TCPV4 = 1
_ALL = CAP_SUPER | CAP_PARTIAL_CSUM | CAP_SEGMENT_SIZE
# fcntl.F_SETPIPE_SZ (Python 3.10+ names it, but not on every platform's build).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _HelloBind(StubBind):
    """A stream transport whose every peer's hello said `flags`; it sends nothing."""

    def __init__(self) -> None:
        self.flags = 0
        self.max_packet = GSO_MAX_SIZE

    def send(self, data, ep):
        return 0

    def peer_caps(self, ep):
        return (self.flags, self.max_packet)


class _Rig:
    def __init__(self, mtu: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgseg")
        self.bind = _HelloBind()
        self.dev = Device("wgsegsize", self.bind, run_dir=os.path.join(self.dir, "run"))
        peer = public_key(generate_private_key())
        self.dev.uapi_set(parse_set(f"public_key={peer.hex()}\nallowed_ip=10.0.0.0/24\n"))
        self.peer = self.dev.engine.peers[peer]
        self.peer.endpoint = Endpoint("unix", "peer", 1)
        # A session: without one, what is read is staged, in the form every peer takes.
        self.peer.keypairs.current = Keypair(bytes(32), bytes(32), is_initiator=True,
                                             local_index=1, remote_index=2,
                                             created=time.monotonic())
        self.r, self.w = os.pipe()
        # Room for a whole 64 KiB read (65535 bytes and the virtio-net header) in one write:
        # a pipe holds 64 KiB by default.
        fcntl.fcntl(self.w, _F_SETPIPE_SZ, 1 << 17)
        self.ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dev.tun = tun_mod.Tun(self.r, "pipe0", self.ctl, vnet=True)
        self.dev.tun.mtu_hint = mtu

    def read(self, flags: int, mss: int, payload: int,
             max_packet: int = GSO_MAX_SIZE) -> list[bytes]:
        """What _read_for_peer gives for an IPv4 super-packet of `payload` bytes in segments
        of `mss`, its checksum partial, for a peer whose hello said `flags` and
        `max_packet`."""
        self.bind.flags = flags
        self.bind.max_packet = max_packet
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 7, 5 << 4, _ACK, 512, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 1, 0x4000, 64, 6, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        header = struct.pack("<BBHHHH", 1, _GSO_TCPV4, 40, mss, 20, 16)
        os.write(self.w, header + ip + tcp + b"a" * payload)
        return [bytes(p.packet) + p.tail if isinstance(p, Trailed) else bytes(p)
                for p in self.dev._read_for_peer()]

    def close(self) -> None:
        assert self.dev.tun is not None
        self.dev.tun.close()
        os.close(self.w)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig() -> Iterator[_Rig]:
    r = _Rig(65000)
    try:
        yield r
    finally:
        r.close()


def test_a_super_packet_finer_than_the_mtu_crosses_whole_with_its_segment_size(rig) -> None:
    [out] = rig.read(_ALL, 1208, 5000)
    assert len(out) == 40 + 5000 + 4
    assert out[-4:] == SEGMENT_TRAILER_MAGIC + (1208).to_bytes(2, "little")


def test_a_packet_read_for_a_peer_without_a_session_is_staged_as_every_peer_takes_it(
    rig
) -> None:
    """Staged until a handshake, it may go to whoever answers that, on another connection:
    so it is cut into segments with complete checksums, whatever the connection at hand
    offered (tests/net/test_seed.py has the seed taking a peer's place). Before, it was
    the one super-packet with its trailer and its checksum partial."""
    rig.peer.keypairs.current = None
    out = rig.read(_ALL, 1208, 5000)
    assert [len(p) - 40 for p in out] == [1208] * 4 + [5000 - 4 * 1208]
    for p in out:
        _, pseudo = _tcp_sum(p)
        assert tun_mod.complete_checksum(_with_field(p, pseudo), 20, 16) == p


@pytest.mark.parametrize("left", [0.5, 5.0])
def test_a_session_about_to_expire_counts_as_none(rig, left: float) -> None:
    """A session with less than a second to live (_STAGE_MARGIN) may be gone by the time the
    packet is sealed, later in the pass, and the packet staged: it is read as for no session.
    One with seconds left keeps the connection's form. (The keypair's age is what counts, as
    Engine.send_data reads it, not how long the test takes: 5 s of slack either way.)"""
    rig.peer.keypairs.current.created = time.monotonic() - REJECT_AFTER_TIME + left
    out = rig.read(_ALL, 1208, 5000)
    if left < 1:
        assert [len(p) - 40 for p in out] == [1208] * 4 + [5000 - 4 * 1208]
    else:
        assert [len(p) for p in out] == [40 + 5000 + SEGMENT_TRAILER_SIZE]


def test_a_session_that_sends_no_more_counts_as_none(rig) -> None:
    """Its counter at RejectAfterMessages (a new private key expires it so: _expire_sessions),
    a session stages what is sent until a handshake, whatever its age."""
    rig.peer.keypairs.current.send_nonce = REJECT_AFTER_MESSAGES
    out = rig.read(_ALL, 1208, 5000)
    assert [len(p) - 40 for p in out] == [1208] * 4 + [5000 - 4 * 1208]


def test_a_peer_without_the_capability_gets_the_segments(rig) -> None:
    out = rig.read(CAP_SUPER | CAP_PARTIAL_CSUM, 1208, 5000)
    assert [len(p) - 40 for p in out] == [1208] * 4 + [5000 - 4 * 1208]


def test_a_super_packet_at_the_mtu_crosses_whole_without_a_size() -> None:
    r = _Rig(1420)
    try:
        [out] = r.read(_ALL, 1380, 5000)
        assert len(out) == 40 + 5000
    finally:
        r.close()


@pytest.mark.parametrize("mss", [36, MIN_SEGMENT_SIZE - 1])
def test_a_segment_size_below_what_a_receiver_takes_is_cut_here(rig, mss: int) -> None:
    """A far end's MSS can be as small as 48 (net.ipv4.tcp_min_snd_mss), less the TCP
    options: a segment size a receiver ignores in a trailer (below MIN_SEGMENT_SIZE it cuts
    at its own MTU instead). Before, the trailer went all the same: at a tunnel MTU of 65000
    the receiver wrote packets of up to 65000 bytes, which its forwarding refused as too
    big; only retransmitted single segments got through (1 MiB to a far end with MSS 56:
    20.6 s and 28276 retransmissions, against 0.10 s and none on ef120cd)."""
    out = rig.read(_ALL, mss, 500)
    assert len(out) == -(-500 // mss)
    assert all(len(p) - 40 <= mss for p in out)


def test_a_super_packet_longer_than_a_message_carries_is_cut_into_ones_that_fit(rig) -> None:
    """The kernel hands the TUN super-packets of up to 64 KiB (READ_GSO_MAX_SIZE: before, it
    cut every forwarded one above 65000 bytes into segments before our read). One longer
    than the peer takes is cut in whole segments into super-packets that fit, each with its
    segment size; a peer that takes no size gets the segments."""
    payload = 45 * 1448  # what a veth's or a NIC's GRO makes at MSS 1448: 65200 bytes
    first, second = rig.read(_ALL, 1448, payload)
    trailer = SEGMENT_TRAILER_MAGIC + (1448).to_bytes(2, "little")
    assert (len(first), len(second)) == (40 + 44 * 1448 + 4, 40 + 1448 + 4)
    assert first[-4:] == second[-4:] == trailer
    assert len(first) - 4 <= GSO_MAX_SIZE
    assert len(rig.read(CAP_SUPER | CAP_PARTIAL_CSUM, 1448, payload)) == 45


def _payloads(pieces: list[bytes], trailer: bool) -> tuple[bytes, list[int]]:
    """The TCP payload the pieces carry, joined, and each piece's sequence number (IPv4 and
    TCP headers of 20 bytes each, as _Rig.read makes them)."""
    end = -SEGMENT_TRAILER_SIZE if trailer else None
    return (b"".join(p[40:end] for p in pieces),
            [int.from_bytes(p[24:28], "big") for p in pieces])


@pytest.mark.parametrize("mss", [1448, 1000])
@pytest.mark.parametrize("max_packet", [65001, 65535, 0xFFFFFFFF])
def test_a_hello_naming_more_than_a_message_carries_gets_what_a_frame_holds(
    rig, max_packet: int, mss: int
) -> None:
    """A hello's max_packet is the peer's word, unchecked (and unauthenticated: conn.caps).
    Before, one above GSO_MAX_SIZE let a 65535-byte read (READ_GSO_MAX_SIZE) go whole, 65539
    bytes with its segment size: a message of 65584 bytes, which no frame holds (65535), so
    the transport dropped it, and again each time TCP sent it anew."""
    payload = 65535 - 40
    pieces = rig.read(_ALL, mss, payload, max_packet)
    for p in pieces:
        assert len(p) <= GSO_MAX_SIZE + SEGMENT_TRAILER_SIZE
        assert 16 + len(p) + padding_size(len(p), 65000) + 16 <= MAX_PAYLOAD
        assert p[-4:] == SEGMENT_TRAILER_MAGIC + mss.to_bytes(2, "little")
    data, seqs = _payloads(pieces, trailer=True)
    assert data == b"a" * payload
    assert len(pieces) == 2 and seqs[1] - seqs[0] == len(pieces[0]) - 44


@pytest.mark.parametrize("max_packet", [0, 1, 40, 1000])
def test_a_hello_naming_less_than_a_segment_gets_segments(rig, max_packet: int) -> None:
    """No exception and nothing lost for a hello whose max_packet is below one segment: it
    gets one segment per message, each with its size."""
    payload = 65535 - 40
    pieces = rig.read(_ALL, 1448, payload, max_packet)
    assert len(pieces) == -(-payload // 1448)
    data, seqs = _payloads(pieces, trailer=True)
    assert data == b"a" * payload
    assert seqs == [1000 + i * 1448 for i in range(len(pieces))]


def test_an_older_peer_gets_a_longer_super_packet_at_the_mtu_as_ones_that_fit() -> None:
    """A peer that takes super-packets but no segment size (wgvsock before CAP_SEGMENT_SIZE)
    cuts one at its MTU: one longer than it takes (max_packet) whose segments are the
    tunnel's own size needs no size to cross, only cutting into super-packets that fit.
    Before, it was cut into its 45 segments, one message each."""
    r = _Rig(1488)  # 1448 bytes of payload and 40 of headers: segments of the MTU
    try:
        payload = 45 * 1448
        pieces = r.read(CAP_SUPER | CAP_PARTIAL_CSUM, 1448, payload)
        assert [len(p) for p in pieces] == [40 + 44 * 1448, 40 + 1448]
        data, _ = _payloads(pieces, trailer=False)
        assert data == b"a" * payload
    finally:
        r.close()


def _ipv4_header_sum_ok(packet: bytes) -> bool:
    header = packet[:(packet[0] & 0x0F) * 4]
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@pytest.mark.parametrize("flags", [_ALL, CAP_SUPER | CAP_PARTIAL_CSUM])
def test_the_pieces_of_a_longer_super_packet_keep_their_segments_ipv4_ids(flags: int) -> None:
    """The receiver's kernel numbers each piece's segments on from the piece's IPv4 ID, so
    the second piece must start where the first one's segments end (the ID of its first
    segment in the super-packet the kernel handed us). Before, split_tso numbered the
    pieces 1 and 2, and the two pieces' segments went out with IDs 1-44 and 2-45."""
    r = _Rig(1488)
    try:
        pieces = r.read(flags, 1448, 45 * 1448)
        assert [int.from_bytes(p[4:6], "big") for p in pieces] == [1, 1 + 44]
        assert all(_ipv4_header_sum_ok(p) for p in pieces)
    finally:
        r.close()



def test_a_finer_super_packet_and_its_trailer_are_never_joined(rig) -> None:
    """The trailer goes to the seal beside the packet (Trailed, Engine.encapsulate's tail),
    and the packet is the TUN read's own bytes. Before, the two were joined into a copy of
    up to 64 KiB per super-packet (about 4 us; 2.2 us for each piece of a longer one)."""
    payload = 45 * 1448  # longer than a message: two pieces
    for size in (5000, payload):
        rig.bind.flags = _ALL
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 7, 5 << 4, _ACK, 512, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + size, 1, 0x4000, 64, 6, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        os.write(rig.w, struct.pack("<BBHHHH", 1, _GSO_TCPV4, 40, 1448, 20, 16) + ip + tcp
                 + b"a" * size)
        out = rig.dev._read_for_peer()
        assert len(out) == (1 if size == 5000 else 2)
        for p in out:
            assert isinstance(p, Trailed)
            assert p.tail == SEGMENT_TRAILER_MAGIC + (1448).to_bytes(2, "little")
            assert len(p) == len(p.packet) + SEGMENT_TRAILER_SIZE
            assert bytes(p.packet[-4:]) == b"aaaa"


def _tcp_sum(packet: bytes) -> tuple[int, int]:
    """(the TCP checksum field, the pseudo-header's sum) of an IPv4 packet as _Rig makes it,
    both modulo 0xFFFF."""
    pseudo = packet[12:20] + struct.pack("!HH", 6, len(packet) - 20)
    total = sum(int.from_bytes(pseudo[i:i + 2], "big") for i in range(0, len(pseudo), 2))
    return int.from_bytes(packet[36:38], "big") % 0xFFFF, total % 0xFFFF


# At 65000 the segments are finer than the MTU (a trailer); at 1488 they are the MTU's.
@pytest.mark.parametrize(("mtu", "flags"), [
    (65000, _ALL), (1488, _ALL), (1488, CAP_SUPER | CAP_PARTIAL_CSUM), (1488, CAP_SUPER)])
def test_the_pieces_of_a_longer_super_packet_keep_checksums_partial_where_finished(
    flags: int, mtu: int
) -> None:
    """A super-packet cut to fit a message, for a peer that has its kernel finish partial
    checksums (CAP_PARTIAL_CSUM): each piece's TCP checksum stays partial (its pseudo-header
    sum, as the kernel left the whole one), which that peer's Tun.write marks NEEDS_CSUM,
    so no pass over the payload here. Before, split_tso summed every piece's payload.
    A peer that does not finish them gets complete checksums. The segment-size trailer goes
    beside the piece (Trailed), never copied onto it."""
    r = _Rig(mtu)
    try:
        r.bind.flags = flags
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 7, 5 << 4, _ACK, 512, 0, 0)
        payload = 45 * 1448
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 1, 0x4000, 64, 6, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        os.write(r.w, struct.pack("<BBHHHH", 1, _GSO_TCPV4, 40, 1448, 20, 16) + ip + tcp
                 + os.urandom(payload))
        pieces = r.dev._read_for_peer()
        assert len(pieces) == 2
        assert all(isinstance(p, Trailed) == (mtu == 65000) for p in pieces)
        for p in pieces:
            packet = bytes(p.packet if isinstance(p, Trailed) else p)
            field, pseudo = _tcp_sum(packet)
            if flags & CAP_PARTIAL_CSUM:
                assert field == pseudo
            else:
                assert tun_mod.complete_checksum(
                    _with_field(packet, pseudo), 20, 16) == packet
    finally:
        r.close()


def _with_field(packet: bytes, value: int) -> bytes:
    return packet[:36] + value.to_bytes(2, "big") + packet[38:]
