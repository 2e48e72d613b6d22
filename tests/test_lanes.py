"""The lanes (device/_lane.c): the tunnel's steady state in one C call each way. Each is held
to the ordinary path's own output, byte for byte, and to the rules it must keep: a packet goes
only to an allowed destination, a packet is written only from an allowed source, every counter
is used once, the keypair's replay filter is shared with the engine's.

No TUN device: a datagram socket pair stands in for it (each read or write one packet, as a
TUN's), a stream socket pair for the connection."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
import struct
from collections.abc import Iterator

import pytest

from wgvsock.conn.caps import CAP_PARTIAL_CSUM, CAP_SUPER, CAP_UNCHECKED_TRANSPORT
from wgvsock.conn.framing import FrameDecoder, frame_header
from wgvsock.core.allowedips import AllowedIPs
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.messages import REJECT_AFTER_MESSAGES, padding_size
from wgvsock.core.replay import RING_SLOTS, WINDOW, ReplayFilter
from wgvsock.core.transport_aead import TransportKey
from wgvsock.device import device as device_mod
from wgvsock.device import tun as tun_mod
from wgvsock.device.uapi import parse_set

from .devrig import DeviceRig
from .stubbind import StubBind

lane = pytest.importorskip(
    "wgvsock.device._lane",
    reason="the lanes are C: a pure build (WGVSOCK_PURE=1) has none, and runs the ordinary "
           "path only")

_KEY = bytes(range(32))
_HEADER = b"\x04\x00\x00\x00" + (0x11223344).to_bytes(4, "little")
_INDEX = 0x55667788
_MTU = 1420
_NEEDS_CSUM, _GSO_TCPV4, _GSO_TCPV6 = 1, 1, 4
_VNET = struct.Struct("<BBHHHH")
_READ_ROOM = 65536 + 10 + 64


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp4(src: str, dst: str, payload: int = 100, *, partial: bool = True,
         sport: int = 40000, flags: int = 0x10) -> bytes:
    """A TCP packet: its checksum partial (the pseudo-header's sum, as the kernel leaves it
    with offload, and our daemon to a peer that offered CAP_PARTIAL_CSUM) or complete."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    body = bytes(random.Random(payload).randrange(256) for _ in range(payload))
    length = 20 + len(body)
    pseudo = _sum16(s + d + struct.pack("!HH", 6, length))
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, 1, 1, 5 << 4, flags, 512, 0, 0)
    check = pseudo if partial else 0xFFFF - _sum16(
        s + d + struct.pack("!HH", 6, length) + tcp + body) or 0xFFFF
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, 6, 0, s, d)
    return ip + tcp + body


def tcp6(src: str, dst: str, payload: int = 100) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    body = b"y" * payload
    length = 20 + len(body)
    pseudo = _sum16(s + d + struct.pack("!IxxxB", length, 6))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 512, pseudo, 0)
    return struct.pack("!IHBB16s16s", 6 << 28, length, 6, 64, s, d) + tcp + body


def udp4(src: str, dst: str, payload: int = 30) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    udp = struct.pack("!HHHH", 53, 53, 8 + payload, 0) + b"u" * payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, s, d) + udp


def plain_header() -> bytes:
    return bytes(10)


def csum_header(packet: bytes, mss: int = 0) -> bytes:
    """The virtio-net header the kernel puts on a TCP packet it leaves for us to finish: a
    partial checksum, and with `mss` a segmentation job (a super-packet)."""
    v = packet[0] >> 4
    ihl = (packet[0] & 0xF) * 4 if v == 4 else 40
    gso = (_GSO_TCPV4 if v == 4 else _GSO_TCPV6) if mss else 0
    return _VNET.pack(_NEEDS_CSUM, gso, ihl + 20 if mss else 0, mss, ihl, 16)


def prefixes(*nets: str) -> bytes:
    table: AllowedIPs[str] = AllowedIPs()
    for net in nets:
        table.insert(net, "peer")
    return table.packed_prefixes("peer")


class Pipes:
    """The TUN (datagrams) and the connection (a stream), each with the test's end."""

    def __init__(self) -> None:
        self.tun, self.tun_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.conn, self.conn_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (self.tun, self.tun_peer, self.conn, self.conn_peer):
            s.setblocking(False)

    def queue(self, *reads: bytes) -> None:
        for r in reads:
            self.tun_peer.send(r)

    def tun_writes(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun_peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def received(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.conn_peer.recv(1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        for s in (self.tun, self.tun_peer, self.conn, self.conn_peer):
            s.close()

    def __enter__(self) -> Pipes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    with Pipes() as p:
        yield p


def send_lane(pipes: Pipes, counter: int = 7, counter_end: int = 1000, *,
              allowed: bytes | None = None, max_packet: int = 65000,
              max_bytes: int = 256 * 1024, mtu_hint: int = _MTU) -> tuple:
    buf = bytearray(max_bytes + _READ_ROOM)
    return lane.send_lane(buf, pipes.tun.fileno(), pipes.conn.fileno(), TransportKey(_KEY),
                          _HEADER, counter, counter_end, _MTU, mtu_hint, max_packet, max_bytes,
                          prefixes("10.0.0.0/24", "fd00::/64") if allowed is None else allowed)


def ordinary_frames(packets: list[bytes], counter: int) -> bytes:
    """The frames the ordinary path sends for these packets (Engine._seal, then StreamBind's
    frame_header for a peer that offered CAP_UNCHECKED_TRANSPORT)."""
    key = TransportKey(_KEY)
    out = b""
    for i, p in enumerate(packets):
        msg = key.seal(_HEADER, counter + i, p, padding_size(len(p), _MTU))
        out += frame_header(msg, True) + msg
    return out


# -- the send lane ------------------------------------------------------------------------


def test_the_send_lane_sends_what_the_ordinary_path_would(pipes) -> None:
    """Plain packets, partial checksums left partial, super-packets whole (segments of the
    MTU), IPv6: each sealed and framed as the engine and the stream transport would."""
    big = tcp4("10.0.0.1", "10.0.0.2", 8000)
    packets = [tcp4("10.0.0.1", "10.0.0.2"), udp4("10.0.0.1", "10.0.0.3"), big,
               tcp6("fd00::1", "fd00::2"), tcp4("10.0.0.1", "10.0.0.2", 0, flags=0x11)]
    pipes.queue(csum_header(packets[0]), plain_header() + packets[1],
                csum_header(big, _MTU - 40) + big, csum_header(packets[3]) + packets[3],
                csum_header(packets[4]) + packets[4])
    # (the first read is a header alone: not a packet, given back)
    n, size, counter, drained, handback, unsent, _partial, err = send_lane(pipes)
    assert (n, handback) == (0, csum_header(packets[0]))
    assert counter == 7 and not drained
    n, size, counter, drained, handback, unsent, _, err = send_lane(pipes)
    assert (n, counter, drained, handback, unsent, err) == (4, 11, 1, None, None, 0)
    frames = ordinary_frames(packets[1:], 7)
    assert pipes.received() == frames
    assert size == len(frames) - 4 * 6


def test_the_send_lane_gives_back_a_packet_for_a_destination_the_peer_is_not_allowed(
        pipes) -> None:
    """Cryptokey routing: the peer's prefixes are 10.0.0.0/24 and fd00::/64. A packet for
    anywhere else stops the lane and comes back whole, unsent, its counter unspent; the
    packets after it wait in the TUN for the next call."""
    ok, stray = tcp4("10.0.0.1", "10.0.0.2"), tcp4("10.0.0.1", "10.0.1.2")
    stray6 = tcp6("fd00::1", "fd00:0:0:1::2")
    pipes.queue(csum_header(ok) + ok, csum_header(stray) + stray, csum_header(ok) + ok)
    n, _, counter, drained, handback, *_ = send_lane(pipes)
    assert (n, counter, drained, handback) == (1, 8, 0, csum_header(stray) + stray)
    assert pipes.received() == ordinary_frames([ok], 7)
    pipes.queue(csum_header(stray6) + stray6)
    n, _, counter, drained, handback, *_ = send_lane(pipes, counter)
    assert (n, counter, handback) == (1, 9, csum_header(stray6) + stray6)
    # Nothing allowed: nothing goes.
    pipes.queue(csum_header(ok) + ok)
    assert send_lane(pipes, allowed=b"")[4] == csum_header(ok) + ok
    assert pipes.received() == ordinary_frames([ok], 8)


def test_the_send_lane_checks_prefixes_to_the_bit(pipes) -> None:
    """The lane's prefix match against AllowedIPs.lookup, for random prefixes of every
    length and addresses in and just out of them, both families."""
    rng = random.Random(5)
    for _ in range(300):
        v6 = rng.random() < 0.5
        bits = 128 if v6 else 32
        base = rng.getrandbits(bits)
        plen = rng.randrange(bits + 1)
        net = (ipaddress.IPv6Network if v6 else ipaddress.IPv4Network)((base, plen),
                                                                      strict=False)
        table: AllowedIPs[str] = AllowedIPs()
        table.insert(net, "peer")
        for flip in (None, *rng.sample(range(bits), 4)):
            packed = (base if flip is None else base ^ (1 << flip)).to_bytes(bits // 8, "big")
            dst = str(ipaddress.ip_address(packed))
            packet = tcp6("fd00::1", dst) if v6 else tcp4("10.0.0.1", dst)
            pipes.queue(csum_header(packet) + packet)
            n, _, _, _, handback, *_ = send_lane(pipes, allowed=table.packed_prefixes("peer"))
            assert (n == 1) == (table.lookup(packed) == "peer"), (net, dst)
            assert (handback is None) == (n == 1)
            pipes.received()


def test_the_send_lane_gives_back_what_the_ordinary_path_must_shape(pipes) -> None:
    """What Device._read_for_peer would cut, complete or trail comes back unsent: a checksum
    not TCP's right after the IP header, a super-packet cut finer than the MTU (it needs its
    segment size), one longer than the peer takes, and a packet that is not IP."""
    p = tcp4("10.0.0.1", "10.0.0.2", 3000)
    odd = _VNET.pack(_NEEDS_CSUM, 0, 0, 0, 20, 6) + p  # a UDP-like checksum offset
    finer = csum_header(p, 536) + p
    longer = csum_header(p, _MTU - 40) + p
    not_ip = plain_header() + b"\x00" * 60
    for read, kwargs in ((odd, {}), (finer, {}), (longer, {"max_packet": 2000}),
                         (not_ip, {})):
        pipes.queue(read)
        n, _, counter, _, handback, *_ = send_lane(pipes, **kwargs)
        assert (n, counter, handback) == (0, 7, read)
    assert pipes.received() == b""


def test_the_send_lane_uses_only_the_counters_it_was_given(pipes) -> None:
    """Three packets queued, two counters reserved: two go, the third waits in the TUN."""
    packets = [tcp4("10.0.0.1", "10.0.0.2", i) for i in (10, 20, 30)]
    pipes.queue(*(csum_header(p) + p for p in packets))
    n, _, counter, drained, handback, *_ = send_lane(pipes, 100, 102)
    assert (n, counter, drained, handback) == (2, 102, 0, None)
    assert pipes.received() == ordinary_frames(packets[:2], 100)
    n, _, counter, drained, *_ = send_lane(pipes, 102, 102)
    assert (n, counter) == (0, 102)
    assert pipes.tun_peer.fileno() >= 0 and send_lane(pipes, 102, 103)[0] == 1
    with pytest.raises(ValueError, match="counters"):
        send_lane(pipes, 5, 4)
    with pytest.raises(ValueError, match="counters"):
        send_lane(pipes, 0, REJECT_AFTER_MESSAGES + 1)


def test_the_send_lane_returns_what_a_full_socket_did_not_take_from_a_frame_s_start(
        pipes) -> None:
    """A socket with no room: the lane stops, and what it did not send whole comes back from
    its frame's start, with how much of that frame went. The two make up the stream."""
    pipes.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    packets = [tcp4("10.0.0.1", "10.0.0.2", 1300) for _ in range(40)]
    pipes.queue(*(csum_header(p) + p for p in packets))
    n, _, counter, _, handback, unsent, partial, err = send_lane(pipes)
    assert 0 < n < 40 and err == 0 and handback is None
    assert unsent is not None and 0 <= partial < len(unsent)
    got = pipes.received()
    frames = ordinary_frames(packets[:n], 7)
    assert got + unsent[partial:] == frames
    assert frames[len(got) - partial:].startswith(unsent)
    assert counter == 7 + n


def test_the_send_lane_reports_a_failed_socket(pipes) -> None:
    """The connection's other end is gone: the error comes back, with the frames unsent."""
    pipes.conn_peer.close()
    p = tcp4("10.0.0.1", "10.0.0.2")
    pipes.queue(csum_header(p) + p)
    n, _, counter, _, _, unsent, partial, err = send_lane(pipes)
    assert (n, counter, err, partial) == (1, 8, errno.EPIPE, 0)
    assert unsent == ordinary_frames([p], 7)
    pipes.conn_peer = socket.socket()  # (for close)


def test_the_send_lane_refuses_what_is_not_its_own() -> None:
    buf = bytearray(1000)
    with pytest.raises(TypeError, match="TransportKey"):
        lane.send_lane(buf, 0, 1, object(), _HEADER, 0, 1, 1420, 1420, 1420, 0, b"")
    with pytest.raises(ValueError, match="buffer"):
        lane.send_lane(buf, 0, 1, TransportKey(_KEY), _HEADER, 0, 1, 1420, 1420, 1420, 10,
                       b"")
    with pytest.raises(ValueError, match="header"):
        lane.send_lane(bytearray(1 << 17), 0, 1, TransportKey(_KEY), b"x", 0, 1, 1420, 1420,
                       1420, 0, b"")
    with pytest.raises(TypeError, match="12 arguments"):
        lane.send_lane(buf)


# -- the receive lane ---------------------------------------------------------------------


class Receiver:
    """The receive lane's state for one keypair: its key, its replay filter (the engine's
    own ReplayFilter) and its buffer."""

    def __init__(self, pipes: Pipes, allowed: bytes | None = None) -> None:
        self.pipes = pipes
        self.key = TransportKey(_KEY)
        self.replay = ReplayFilter()
        self.buf = bytearray(_READ_ROOM)
        self.allowed = prefixes("10.0.0.0/24", "fd00::/64") if allowed is None else allowed

    def take(self, messages: list, partial_csum: bool = True, index: int = _INDEX) -> int:
        done, _, _, _, last, _ = lane.recv_lane(
            messages, self.buf, self.pipes.tun.fileno(), self.key, index, self.replay.ring,
            self.replay.last + 1, _MTU, partial_csum, self.allowed)
        self.replay.last = last - 1
        return done


def sealed(packet: bytes, counter: int, index: int = _INDEX, tail: bytes = b"") -> bytes:
    header = b"\x04\x00\x00\x00" + index.to_bytes(4, "little")
    return TransportKey(_KEY).seal(header, counter, packet, padding_size(len(packet), _MTU),
                                   tail)


def tun_write(packet: bytes, partial_csum: bool) -> bytes:
    """What Tun.write writes for the packet (virtio-net header and packet)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tun = tun_mod.Tun(os.dup(a.fileno()), "pipe1", ctl, vnet=True)
    tun.mtu_hint = _MTU
    try:
        tun.write(packet, partial_csum)
        return b.recv(1 << 17)
    finally:
        tun.close()
        for s in (a, b, ctl):
            s.close()


def test_the_receive_lane_writes_what_tun_write_would(pipes) -> None:
    """Each packet reaches the TUN with the virtio-net header Tun.write gives it: a partial
    checksum marked for the kernel, a super-packet as a segmentation job at the MTU (its
    checksum made partial if it came complete), anything else plain; with partial_csum off,
    what fits the MTU goes as it is."""
    packets = [tcp4("10.0.0.2", "10.0.0.1"), tcp4("10.0.0.2", "10.0.0.1", 9000),
               tcp4("10.0.0.2", "10.0.0.1", 9000, partial=False),
               tcp4("10.0.0.2", "10.0.0.1", 700, partial=False),
               tcp4("10.0.0.2", "10.0.0.1", 9000, flags=0x90), udp4("10.0.0.3", "10.0.0.1"),
               tcp6("fd00::2", "fd00::1"), tcp6("fd00::2", "fd00::1", 5000)]
    for partial_csum in (True, False):
        rx = Receiver(pipes)
        messages = [sealed(p, i) for i, p in enumerate(packets)]
        assert rx.take(messages, partial_csum) == len(packets)
        assert pipes.tun_writes() == [tun_write(p, partial_csum) for p in packets]


def test_the_receive_lane_stops_at_a_packet_whose_source_the_peer_is_not_allowed(
        pipes) -> None:
    """The source check: a packet from outside the peer's prefixes is not written, and the
    lane stops there with its counter unspent, so that the engine drops it (and says why)."""
    rx = Receiver(pipes)
    good, spoofed = tcp4("10.0.0.2", "10.0.0.1"), tcp4("192.0.2.9", "10.0.0.1")
    spoofed6 = tcp6("fd00:0:0:9::2", "fd00::1")
    messages = [sealed(good, 0), sealed(spoofed, 1), sealed(good, 2)]
    assert rx.take(messages) == 1
    assert pipes.tun_writes() == [tun_write(good, True)]
    assert rx.take([sealed(spoofed6, 3)]) == 0
    assert pipes.tun_writes() == []
    # The engine's own filter still takes both counters: the lane did not spend them.
    assert rx.replay.check(1, REJECT_AFTER_MESSAGES)
    assert rx.replay.check(3, REJECT_AFTER_MESSAGES)


def test_the_receive_lane_and_the_engine_share_one_replay_filter(pipes) -> None:
    """A counter the lane took, the engine's filter refuses, and the reverse."""
    rx = Receiver(pipes)
    p = tcp4("10.0.0.2", "10.0.0.1")
    assert rx.take([sealed(p, 5)]) == 1
    assert not rx.replay.check(5, REJECT_AFTER_MESSAGES)
    assert rx.replay.check(9, REJECT_AFTER_MESSAGES)
    assert rx.take([sealed(p, 9)]) == 0
    assert rx.take([sealed(p, 5)]) == 0
    assert rx.take([sealed(p, 8), sealed(p, 8)]) == 1
    assert len(pipes.tun_writes()) == 2


def test_the_receive_lane_keeps_the_replay_rule() -> None:
    """The lane's accepting and marking against ReplayFilter.check, for random runs of
    counters: in order, reordered, far ahead, far behind, repeated, at the window's edge."""
    rng = random.Random(11)
    with Pipes() as pipes:
        for _ in range(20):
            rx, model = Receiver(pipes), ReplayFilter()
            top = 0
            for _ in range(300):
                r = rng.random()
                if r < 0.4:
                    c = top + rng.randrange(1, 4)
                elif r < 0.5:
                    c = top + rng.randrange(RING_SLOTS - 2, RING_SLOTS * 3)
                elif r < 0.7:
                    c = max(0, top - rng.choice((WINDOW, WINDOW + 1, WINDOW - 1, 0, 1)))
                else:
                    c = max(0, top - rng.randrange(0, WINDOW + 100))
                top = max(top, c)
                expected = model.check(c, REJECT_AFTER_MESSAGES)
                assert rx.take([sealed(b"", c)]) == int(expected), c
        assert rx.take([sealed(b"", REJECT_AFTER_MESSAGES)]) == 0


def test_the_receive_lane_leaves_the_unusual_to_the_engine(pipes) -> None:
    """It stops, unchanged, at a message for another keypair, one that fails authentication,
    a packet with a segment-size trailer, a packet that is not IP, one whose length lies; it
    takes keepalives."""
    rx = Receiver(pipes)
    p = tcp4("10.0.0.2", "10.0.0.1", 3000)
    tampered = bytearray(sealed(p, 1))
    tampered[40] ^= 1
    trailer = sealed(p, 2, tail=b"\xfe\x53" + (536).to_bytes(2, "little"))
    lying = bytearray(p)
    lying[2:4] = (len(p) + 16).to_bytes(2, "big")  # (past the padding too)
    for message in (sealed(p, 1, index=_INDEX + 1), bytes(tampered), trailer,
                    sealed(b"\x00" * 40, 3), sealed(bytes(lying), 4), sealed(p, 5)[:31]):
        assert rx.take([message]) == 0
    assert pipes.tun_writes() == []
    assert rx.replay.last == -1
    done, size, data, keepalives, _, _ = lane.recv_lane(
        [sealed(b"", 1), sealed(p, 2)], rx.buf, pipes.tun.fileno(), rx.key, _INDEX,
        rx.replay.ring, 0, _MTU, True, rx.allowed)
    assert (done, data, keepalives) == (2, 1, 1)
    assert size == 32 + len(sealed(p, 2))


def test_the_receive_lane_reports_a_failed_tun_write_and_goes_on(pipes) -> None:
    rx = Receiver(pipes)
    p = tcp4("10.0.0.2", "10.0.0.1")
    pipes.tun_peer.close()
    done, _, data, _, _, error = lane.recv_lane(
        [sealed(p, 0), sealed(p, 1)], rx.buf, pipes.tun.fileno(), rx.key, _INDEX,
        rx.replay.ring, 0, _MTU, True, rx.allowed)
    assert (done, data) == (2, 2) and error in (errno.ECONNREFUSED, errno.ENOTCONN,
                                                 errno.EPIPE)
    pipes.tun_peer = socket.socket()


# -- through the device -------------------------------------------------------------------

_CAPS = CAP_SUPER | CAP_PARTIAL_CSUM | CAP_UNCHECKED_TRANSPORT


class _LaneBind(StubBind):
    """A stream transport with one connection, a socket pair, whose peer offered what the
    send lane needs; what goes the ordinary way is kept in `sent`."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.conn, self.far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.far.setblocking(False)
        self.holds = 0
        self.errors: list[int] = []  # what lane_end was told the connection failed with

    def send(self, data, ep):
        self.sent.append(bytes(data))
        return len(data)

    def send_batch(self, messages, ep):
        return sum(self.send(m, ep) for m in messages)

    def peer_caps(self, ep):
        return (_CAPS, 65000)

    def lane_begin(self, ep, flags):
        self.holds += 1
        return self, self.conn.fileno(), 65000

    def lane_end(self, hold, unsent, partial, error):
        assert hold is self and unsent is None
        self.holds -= 1
        if error:
            self.errors.append(error)
        return 0

    def frames(self) -> list[bytes]:
        decoder = FrameDecoder()
        out: list[bytes] = []
        while True:
            try:
                out += decoder.feed(self.far.recv(1 << 20))
            except BlockingIOError:
                return out


class _DeviceRig(DeviceRig):
    """devrig.DeviceRig with the lane-ready transport above."""

    def __init__(self, lanes: bool = True) -> None:
        super().__init__(_LaneBind(), mtu_hint=_MTU, lanes=lanes)

    def pass_all(self) -> None:
        """TUN passes until the TUN is drained."""
        for _ in range(20):
            try:
                if self.dev._tun_pass():
                    return
            except BlockingIOError:
                return
        raise AssertionError("the TUN never drained")

    def close(self) -> None:
        super().close()
        self.bind.conn.close()
        self.bind.far.close()


@pytest.fixture(params=[True], ids=["lanes"])
def drig(request) -> Iterator[_DeviceRig]:
    r = _DeviceRig(request.param)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def lane_calls(monkeypatch) -> dict[str, list]:
    """Each lane's results, as the device got them."""
    calls: dict[str, list] = {"send": [], "recv": []}
    for name, fn in (("send", device_mod._send_lane), ("recv", device_mod._recv_lane)):
        def wrapped(*args, _fn=fn, _name=name):
            result = _fn(*args)
            calls[_name].append(result)
            return result
        monkeypatch.setattr(device_mod, f"_{name}_lane", wrapped)
    return calls


def test_the_device_sends_by_lane_only_to_allowed_destinations(drig, lane_calls) -> None:
    """Packets for the peer go by the lane, framed on its connection; one for an address no
    peer has is given back and dropped by the engine (not sent anywhere); the packets after
    it go on. The keypair's counter ends where the messages' counters end: none is skipped
    or used twice, and tx_bytes counts what went."""
    kp = drig.our_peer.keypairs.current
    first = kp.send_nonce
    tx = drig.our_peer.tx_bytes
    packets = [tcp4("10.0.0.2", "10.0.0.1", n, sport=40000 + n) for n in (10, 2000, 30)]
    stray = tcp4("10.0.0.2", "10.0.0.7")
    for read in (packets[0], packets[1], stray, packets[2]):
        drig.test_side.send(csum_header(read) + read)
    drig.pass_all()
    assert lane_calls["send"] and lane_calls["send"][0][0] == 2
    frames = drig.bind.frames()
    assert drig.opened(frames) == packets
    assert drig.bind.sent == []  # the stray went nowhere
    assert [int.from_bytes(f[8:16], "little") for f in frames] == [first, first + 1,
                                                                 first + 2]
    assert kp.send_nonce == first + 3
    assert drig.our_peer.tx_bytes - tx == sum(map(len, frames))
    assert drig.bind.holds == 0


def test_the_device_receives_by_lane_only_from_allowed_sources(drig, lane_calls) -> None:
    """A packet from an address the peer may not send from is dropped where the lane hands
    it to the engine; those around it are written; rx_bytes counts every message."""
    good = [tcp4("10.0.0.1", "10.0.0.2", n, sport=41000 + n) for n in (10, 20)]
    spoofed = tcp4("10.0.0.9", "10.0.0.2")
    messages = [drig.sealed(good[0]), drig.sealed(spoofed), drig.sealed(good[1])]
    rx = drig.our_peer.rx_bytes
    drig.dev._on_receive_batch(messages, drig.src, _CAPS)
    assert [w[10:] for w in drig.written()] == good
    assert lane_calls["recv"][0][0] == 1  # the first; then the spoofed stopped it
    assert drig.our_peer.rx_bytes - rx == sum(map(len, messages))
    # The spoofed one's counter is spent (the engine's check): it cannot come again.
    drig.dev._on_receive_batch([messages[1]], drig.src, _CAPS)
    drig.dev._on_receive_batch([messages[0]], drig.src, _CAPS)
    assert drig.written() == []


def test_the_lanes_stand_aside_for_a_second_peer(drig, lane_calls) -> None:
    """With two peers the lanes never run (their prefix check knows one peer's)."""
    other = public_key(generate_private_key())
    drig.dev.uapi_set(parse_set(f"public_key={other.hex()}\nallowed_ip=10.0.0.7/32\n"))
    p = tcp4("10.0.0.2", "10.0.0.1")
    drig.test_side.send(csum_header(p) + p)
    drig.pass_all()
    drig.dev._on_receive_batch([drig.sealed(tcp4("10.0.0.1", "10.0.0.2"))], drig.src, _CAPS)
    assert lane_calls == {"send": [], "recv": []}
    assert len(drig.written()) == 1


@pytest.mark.parametrize("drig", [False], ids=["lanes-off"], indirect=True)
def test_a_device_with_lanes_off_never_takes_them(drig, lane_calls) -> None:
    """Device(lanes=False), the daemon's WGVSOCK_LANES=0: the same packets, the ordinary
    way."""
    p = tcp4("10.0.0.2", "10.0.0.1")
    drig.test_side.send(csum_header(p) + p)
    drig.pass_all()
    drig.dev._on_receive_batch([drig.sealed(tcp4("10.0.0.1", "10.0.0.2"))], drig.src, _CAPS)
    assert lane_calls == {"send": [], "recv": []}
    assert drig.opened(drig.bind.sent) == [p]
    assert len(drig.written()) == 1


def test_a_send_lane_that_raised_after_sealing_never_hands_its_counters_out_again(
        drig, monkeypatch) -> None:
    """The lane may raise after frames went (sealing failed on a later packet, or no memory
    for its result): the counters it was given may have been used, so the keypair's counter
    must not go back to the start of their range, or the next messages reuse those nonces.
    And the connection is closed (lane_end hears of an error): what went of a frame is
    unknown."""
    real = device_mod._send_lane

    def raising(*args):
        real(*args)
        raise MemoryError

    monkeypatch.setattr(device_mod, "_send_lane", raising)
    first, second = tcp4("10.0.0.2", "10.0.0.1", 10), tcp4("10.0.0.2", "10.0.0.1", 20)
    drig.test_side.send(csum_header(first) + first)
    with pytest.raises(MemoryError):
        drig.dev._tun_pass()
    monkeypatch.setattr(device_mod, "_send_lane", real)
    drig.test_side.send(csum_header(second) + second)
    drig.pass_all()
    frames = drig.bind.frames()
    counters = [int.from_bytes(f[8:16], "little") for f in frames]
    assert len(frames) == 2 and len(set(counters)) == 2, counters
    assert drig.opened(frames) == [first, second]
    assert drig.bind.holds == 0
    assert drig.bind.errors == [errno.EIO]


class _LockThatLetsAPeerIn:
    """The device's lock, with a second peer added just before its first acquire: as a UAPI
    set would add one between the lanes' unlocked look at the peer count and the lock."""

    def __init__(self, lock, add) -> None:
        self.lock, self.add = lock, add

    def acquire(self, *args):
        if self.add is not None:
            add, self.add = self.add, None
            add()
        return self.lock.acquire(*args)

    def release(self) -> None:
        self.lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _second_peer_in(drig: _DeviceRig) -> None:
    """Our peer routes 10.0.0.0/24; a second peer, added under the lanes' feet, 10.0.0.7/32."""
    engine = drig.dev.engine
    engine.allowed_ips.insert("10.0.0.0/24", drig.our_peer)

    def add() -> None:
        other = engine.add_peer(public_key(generate_private_key()))
        engine.allowed_ips.insert("10.0.0.7/32", other)

    drig.dev._lock = _LockThatLetsAPeerIn(drig.dev._lock, add)


def test_the_send_lane_sends_nothing_once_a_second_peer_came(drig) -> None:
    """A packet for 10.0.0.7 is the second peer's (the longest prefix): it must not go to our
    peer, although 10.0.0.7 is in our peer's prefixes too."""
    _second_peer_in(drig)
    p = tcp4("10.0.0.2", "10.0.0.7")
    drig.test_side.send(csum_header(p) + p)
    drig.pass_all()
    assert drig.opened(drig.bind.frames()) == []
    assert drig.bind.holds == 0


def test_the_receive_lane_writes_nothing_once_a_second_peer_came(drig) -> None:
    """A packet from 10.0.0.7 is the second peer's to send: our peer's is dropped."""
    _second_peer_in(drig)
    spoofed = tcp4("10.0.0.7", "10.0.0.2")
    drig.dev._on_receive_batch([drig.sealed(spoofed)], drig.src, _CAPS)
    assert drig.written() == []


def test_the_send_lane_refuses_a_max_bytes_its_buffer_cannot_hold_however_large(pipes) -> None:
    """max_bytes near the top of Py_ssize_t: the room check must not overflow and pass (the
    lane would then read and seal past the buffer's end)."""
    import sys
    for max_bytes in (sys.maxsize, sys.maxsize - 65000, sys.maxsize - 65568):
        with pytest.raises(ValueError, match="buffer"):
            lane.send_lane(bytearray(1 << 17), pipes.tun.fileno(), pipes.conn.fileno(),
                           TransportKey(_KEY), _HEADER, 0, 1, _MTU, _MTU, 65000, max_bytes,
                           b"")


@pytest.mark.parametrize("bad", [b"\x04", bytes([4, 33]) + bytes(16), bytes([6, 129]) + bytes(16),
                                 bytes([5, 8]) + bytes(16)])
def test_the_lanes_refuse_prefixes_not_in_allowedips_layout(pipes, bad) -> None:
    """A prefix length past its address would have the match read past the entry."""
    with pytest.raises(ValueError, match="prefix"):
        send_lane(pipes, allowed=bad)
    rx = Receiver(pipes, allowed=bad)
    with pytest.raises(ValueError, match="prefix"):
        rx.take([sealed(tcp4("10.0.0.2", "10.0.0.1"), 0)])


def test_a_batch_from_a_peer_that_sends_no_super_packets_goes_the_ordinary_way(
        drig, lane_calls) -> None:
    """The Go seed, or ours with offload off (a hello without CAP_SUPER): their MTU-sized
    segments are merged into few TUN writes by the ordinary path, where the lane would write
    each alone (ours -> seed lost 20 % b->a at 1420 that way)."""
    packets = [tcp4("10.0.0.1", "10.0.0.2", 100, sport=42000 + i) for i in range(3)]
    drig.dev._on_receive_batch([drig.sealed(p) for p in packets], drig.src, 0)
    assert lane_calls["recv"] == []
    assert [w[10:] for w in drig.written()] == packets
    drig.dev._on_receive_batch([drig.sealed(packets[0])], drig.src, _CAPS)
    assert len(lane_calls["recv"]) == 1


def test_a_failed_tun_read_in_the_send_lane_leaves_the_connection_open(drig) -> None:
    """The lane raises OSError only when its first read failed, before anything was sent:
    the TUN's trouble (_tun_pass's caller judges it), not the connection's."""
    drig.dev.tun.close()  # the next read: EBADF (close() again is nothing)
    with pytest.raises(OSError):
        drig.dev._tun_pass()
    assert drig.bind.errors == [] and drig.bind.holds == 0
