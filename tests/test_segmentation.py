"""split_tso and coalesce_tcp: TCP super-packets cut and merged as the kernel's TSO and GRO
would; pure functions, no root needed."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import pytest

from wgvsock.device import tun as tun_mod
from wgvsock.device.tun import _offload_header, coalesce_tcp, split_tso

_FIN, _PSH, _ACK, _CWR = 0x01, 0x08, 0x10, 0x80


def _ones_sum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _tcp(seq: int, flags: int, payload: bytes, options: bytes = b"") -> bytes:
    thl = 20 + len(options)
    # Checksum left as garbage: with TSO the kernel leaves it partial.
    return struct.pack("!HHIIBBHHH", 40000, 5201, seq, 7, (thl // 4) << 4, flags, 512, 0xBEEF,
                       0) + options + payload


def _v4(tcp: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0xFFFE, 0x4000, 64, 6, 0,
                      bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return hdr + tcp


def _v6(tcp: bytes) -> bytes:
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    return struct.pack("!IHBB", 0x60000000, len(tcp), 6, 64) + src + dst + tcp


def _check(seg: bytes, version: int) -> tuple[int, int, bytes]:
    """Verifies the segment's lengths and checksums; returns (seq, flags, payload)."""
    if version == 4:
        l4 = 20
        assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
        assert _ones_sum(seg[:20]) == 0xFFFF
        pseudo = seg[12:20] + struct.pack("!HH", 6, len(seg) - l4)
    else:
        l4 = 40
        assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40
        pseudo = seg[8:40] + struct.pack("!IxxxB", len(seg) - l4, 6)
    assert _ones_sum(pseudo + seg[l4:]) == 0xFFFF
    thl = (seg[l4 + 12] >> 4) * 4
    return struct.unpack_from("!I", seg, l4 + 4)[0], seg[l4 + 13], seg[l4 + thl :]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [1, 1368, 1369, 1368 * 3, 1368 * 3 + 17, 64000, 64001])
@pytest.mark.parametrize("options", [b"", b"\x01\x01\x08\x0a" + bytes(8)])
def test_segments_reassemble_and_verify(version: int, size: int, options: bytes) -> None:
    mss = 1368
    payload = os.urandom(size)
    seq = 0xFFFFF000  # wraps within the packet
    tcp = _tcp(seq, _ACK | _PSH | _FIN | _CWR, payload, options)
    packet = _v4(tcp) if version == 4 else _v6(tcp)
    l4 = 20 if version == 4 else 40
    segs = split_tso(packet, l4, mss)
    assert len(segs) == -(-size // mss)
    joined = b""
    for i, seg in enumerate(segs):
        s_seq, flags, chunk = _check(bytes(seg), version)
        assert s_seq == (seq + len(joined)) & 0xFFFFFFFF
        assert len(chunk) <= mss
        assert bool(flags & _CWR) == (i == 0)
        assert bool(flags & (_FIN | _PSH)) == (i == len(segs) - 1)
        assert flags & _ACK
        assert seg[l4 + 20 : l4 + 20 + len(options)] == options
        if version == 4:
            assert struct.unpack_from("!H", seg, 4)[0] == (0xFFFE + i) & 0xFFFF
        joined += chunk
    assert joined == payload


def test_header_only_packet() -> None:
    packet = _v4(_tcp(5, _ACK | _FIN, b""))
    (seg,) = split_tso(packet, 20, 1000)
    _, flags, chunk = _check(bytes(seg), 4)
    assert chunk == b"" and flags == _ACK | _FIN


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_undoes_split(version: int) -> None:
    mss, payload = 1368, os.urandom(1368 * 20 + 99)
    tcp = _tcp(1000, _ACK | _PSH, payload, b"\x01\x01\x08\x0a" + bytes(8))
    packet = _v4(tcp) if version == 4 else _v6(tcp)
    l4 = 20 if version == 4 else 40
    segs = [bytes(s) for s in split_tso(packet, l4, mss)]
    ((head, payloads, size),) = coalesce_tcp(segs)
    assert size == mss
    # The payloads are views of the segments, not copies.
    assert all(p.obj is s for p, s in zip(payloads, segs, strict=True))
    merged = bytearray(head) + b"".join(payloads)
    if version == 4:
        assert _ones_sum(bytes(merged[:20])) == 0xFFFF
        merged[10:12] = packet[10:12]  # the helper leaves the original's at 0
    assert bytes(merged[: l4 + 16]) == packet[: l4 + 16]  # lengths, ID, flags as the original
    assert bytes(merged[l4 + 32 :]) == payload


def test_coalesce_keeps_what_must_not_merge() -> None:
    mss, data = 100, os.urandom(1000)
    segs = [bytes(s) for s in split_tso(_v4(_tcp(0, _ACK, data)), 20, mss)]
    other = [bytes(s) for s in split_tso(_v4(_tcp(0, _ACK, data, b"\x01" * 4)), 20, mss)]
    syn = _v4(_tcp(0, 0x02, b""))
    # Out of order, another flow in between, a gap, a non-ACK packet: none of these merge.
    batch = [segs[1], segs[0], other[0], segs[2], segs[4], syn, segs[5], segs[6]]
    out = coalesce_tcp(batch)
    assert [m for _, _, m in out] == [0, 0, 0, 0, 0, 0, mss]
    assert [p for p, _, _ in out[:6]] == batch[:6]
    assert [views for _, views, _ in out[:6]] == [[]] * 6
    # A shorter segment or PSH ends a run.
    tail = [bytes(s) for s in split_tso(_v4(_tcp(0, _ACK | _PSH, os.urandom(250))), 20, mss)]
    assert [m for _, _, m in coalesce_tcp(tail + tail)] == [mss, mss]
    assert [m for _, _, m in coalesce_tcp(segs[:3], limit=2 * (40 + mss))] == [mss, 0]
    pushed = bytearray(segs[0])
    pushed[33] |= _PSH  # PSH on a run's first segment: it stays alone, the next ones merge
    assert [m for _, _, m in coalesce_tcp([bytes(pushed), *segs[1:3]])] == [0, mss]
    assert [m for _, _, m in coalesce_tcp(segs[:1])] == [0]  # a segment alone in its batch
    # So does the 64th segment: a merged run is one writev(), and IOV_MAX is 1024.
    many = [bytes(s) for s in split_tso(_v4(_tcp(0, _ACK, os.urandom(10 * 100))), 20, 10)]
    assert [len(views) for _, views, _ in coalesce_tcp(many)] == [64, 36]


def test_coalesce_leaves_a_tcp_header_shorter_than_20_bytes() -> None:
    """A data offset below 5 is no TCP header (a peer may send anything it can encrypt): such
    segments are written as they are, and the batch around them still merges. This used to
    raise from coalesce_tcp, in the thread that reads from the peer."""
    segs = [bytes(s) for s in split_tso(_v4(_tcp(0, _ACK, os.urandom(300))), 20, 100)]
    bad = bytearray(segs[1])
    bad[32] = 0x20  # data offset 2: 8 bytes
    batch = [segs[0], bytes(bad), bytes(bad), segs[1], segs[2]]
    assert [m for _, _, m in coalesce_tcp(batch)] == [0, 0, 0, 100]


def _pseudo(seg: bytes, version: int) -> int:
    l4 = 20 if version == 4 else 40
    pseudo = (seg[12:20] + struct.pack("!HH", 6, len(seg) - l4) if version == 4
              else seg[8:40] + struct.pack("!IxxxB", len(seg) - l4, 6))
    return _ones_sum(pseudo)


def _with_checksum(seg: bytes, version: int, value: int) -> bytes:
    at = (20 if version == 4 else 40) + 16
    return seg[:at] + value.to_bytes(2, "big") + seg[at + 2 :]


@pytest.mark.parametrize("version", [4, 6])
def test_offload_header_lets_the_kernel_finish_partial_checksums(version: int) -> None:
    wrap = _v4 if version == 4 else _v6
    small = wrap(_tcp(1000, _ACK, b"x" * 100))
    partial = _with_checksum(small, version, _pseudo(small, version))
    l4 = 20 if version == 4 else 40
    # Partial (what a CAP_PARTIAL_CSUM sender leaves): the kernel computes it, no GSO.
    header, out = _offload_header(partial, 1420)
    flags, gso_type, _hlen, _mss, start, offset = struct.unpack("<BBHHHH", header)
    assert (flags, gso_type, start, offset) == (1, 0, l4, 16) and out == partial
    # Complete (any other sender): written as it is.
    complete = split_tso(partial, l4, 1400)[0]
    assert _offload_header(bytes(complete), 1420) is None
    # Longer than the MTU: a GSO job whose checksum field holds the pseudo-header sum; when
    # it did not already, its headers are copied and changed, its payload never.
    big = wrap(_tcp(1000, _ACK, b"y" * 5000))
    for seg in (big, _with_checksum(big, version, _pseudo(big, version))):
        header, *pieces = _offload_header(seg, 1420)
        if seg is big:
            head, payload = pieces
            assert len(head) == l4 + 20 and payload.obj is big
        else:
            assert pieces == [seg]
        out = b"".join(pieces)
        flags, gso_type, hlen, mss, start, offset = struct.unpack("<BBHHHH", header)
        assert (flags, gso_type & 0x7F, hlen, start, offset) == (1, 1 if version == 4 else 4,
                                                                 l4 + 20, l4, 16)
        assert mss == 1420 - l4 - 20
        assert int.from_bytes(out[l4 + 16 : l4 + 18], "big") == _pseudo(big, version)
    # Not TCP: plain.
    udp = bytearray(small)
    udp[9 if version == 4 else 6] = 17
    assert _offload_header(bytes(udp), 1420) is None


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_compares_every_field_segmentation_copies(version: int) -> None:
    wrap, l4 = (_v4, 20) if version == 4 else (_v6, 40)
    mss = 100
    segs = [bytes(s) for s in split_tso(wrap(_tcp(0, _ACK, os.urandom(2 * mss),
                                                  b"\x01\x01\x08\x0a" + bytes(8))), l4, mss)]
    ip = {4: {"tos": 1, "ttl": 8, "src": 12, "dst": 19},
          6: {"traffic class": 1, "flow label": 3, "hop limit": 7, "src": 8, "dst": 39}}[version]
    tcp = {"sport": 0, "dport": 3, "ack": 8, "offset byte": 12, "window": 15, "urgent": 18,
           "option": 31}
    copied = {**ip, **{name: l4 + at for name, at in tcp.items()}}
    for name, at in copied.items():
        second = bytearray(segs[1])
        second[at] ^= 0x01
        assert [m for _, _, m in coalesce_tcp([segs[0], bytes(second)])] == [0, 0], name
    # What segmentation sets per segment may differ.
    changed = {"tcp checksum": l4 + 16}
    if version == 4:
        changed |= {"ip id": 5, "ip checksum": 11}
    for name, at in changed.items():
        second = bytearray(segs[1])
        second[at] ^= 0x01
        assert [m for _, _, m in coalesce_tcp([segs[0], bytes(second)])] == [mss], name


# -- the C implementation (_segment.c) against the Python one ---------------------------------


def _segment_module():
    try:
        from wgvsock.device import _segment
    except ImportError:
        return None
    return _segment


@pytest.fixture
def native():
    """The C module; in a pure build (WGVSOCK_PURE=1, test_pure_python.py's copy) there is
    none to compare, and test_a_compiled_build_cuts_in_c fails a compiled build without it."""
    module = _segment_module()
    if module is None:
        pytest.skip("a pure build: no C segmentation to compare (make compile builds it)")
    return module


def test_a_compiled_build_cuts_in_c() -> None:
    root = Path(__file__).resolve().parents[1]
    if any(root.glob("wgvsock_native__mypyc.*.so")):
        assert _segment_module() is not None, "make compile builds wgvsock/device/_segment.c too"
        assert tun_mod.NATIVE_SEGMENTATION
    else:
        assert not tun_mod.NATIVE_SEGMENTATION


@pytest.mark.parametrize("seed", range(8))
def test_c_and_python_cut_alike(native, seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(40):
        size = rnd.choice([0, 1, 2, 3, rnd.randrange(1, 3000), rnd.randrange(1, 65000)])
        options = rnd.choice([b"", b"\x01\x01\x08\x0a" + rnd.randbytes(8), rnd.randbytes(4)])
        tcp = _tcp(rnd.getrandbits(32), rnd.getrandbits(8), rnd.randbytes(size), options)
        version = rnd.choice([4, 6])
        packet = bytearray(_v4(tcp) if version == 4 else _v6(tcp))
        if version == 4:
            packet[4:6] = rnd.choice([0xFFFF, 0xFFFE, rnd.getrandbits(16)]).to_bytes(2, "big")
            packet[12:20] = rnd.randbytes(8)
        else:
            packet[8:40] = rnd.randbytes(32)
        l4 = 20 if version == 4 else 40
        mss = rnd.choice([1, 7, 536, 1368, 8880, 64960, rnd.randrange(1, 70000)])
        if -(-size // mss) > 2000:
            mss = 1368
        for view in (bytes(packet), memoryview(packet)):
            assert native.split_tso(view, l4, mss) == tun_mod.py_split_tso(view, l4, mss)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [1, 1368, 1368 * 3 + 17, 65000 - 60])
def test_pieces_cut_with_partial_checksums_finish_to_the_complete_ones(
    version: int, size: int
) -> None:
    """split_tso(partial=True), for a peer that has its kernel finish checksums: each
    piece's TCP checksum field holds its pseudo-header sum (what Tun.write recognises and
    marks NEEDS_CSUM), and finishing it gives the piece split_tso cuts with the complete
    checksum, byte for byte. Before, there was no such form: every piece cost a pass over
    its payload that the receiver's kernel redid."""
    wrap, l4 = (_v4, 20) if version == 4 else (_v6, 40)
    packet = wrap(_tcp(0xFFFFF000, _ACK | _PSH, os.urandom(size), b"\x01\x01\x08\x0a" + bytes(8)))
    complete = split_tso(packet, l4, 1368)
    partial = split_tso(packet, l4, 1368, True)
    assert len(partial) == len(complete)
    for piece, whole in zip(partial, complete, strict=True):
        assert int.from_bytes(piece[l4 + 16 : l4 + 18], "big") % 0xFFFF == _pseudo(piece, version)
        assert piece[: l4 + 16] == whole[: l4 + 16] and piece[l4 + 18 :] == whole[l4 + 18 :]
        assert tun_mod.complete_checksum(bytes(piece), l4, 16) == whole
        header, *_ = _offload_header(bytes(piece), 65000)
        assert struct.unpack("<BBHHHH", header)[0] == 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM


@pytest.mark.parametrize("seed", range(4))
def test_c_and_python_cut_with_partial_checksums_alike(native, seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(40):
        version = rnd.choice([4, 6])
        tcp = _tcp(rnd.getrandbits(32), rnd.getrandbits(8), rnd.randbytes(rnd.randrange(65000)))
        packet = bytearray(_v4(tcp) if version == 4 else _v6(tcp))
        # Addresses whose sums fold to 0xFFFF as well as random ones.
        fill = rnd.choice([b"\xff", b"\0", bytes([rnd.getrandbits(8)])])
        if version == 4:
            packet[12:20] = fill * 8 if rnd.getrandbits(1) else rnd.randbytes(8)
        else:
            packet[8:40] = fill * 32 if rnd.getrandbits(1) else rnd.randbytes(32)
        l4 = 20 if version == 4 else 40
        mss = rnd.choice([536, 1368, 8880, 64960, rnd.randrange(100, 70000)])
        assert (native.split_tso(bytes(packet), l4, mss, True)
                == tun_mod.py_split_tso(bytes(packet), l4, mss, True))


@pytest.mark.parametrize("seed", range(4))
def test_c_and_python_finish_a_checksum_alike(native, seed: int) -> None:
    rnd = random.Random(seed)
    cases = [(bytes(4), 0, 0), (b"\0\0\xff\xff", 0, 0), (b"\xff\xff\xff\xff", 0, 0),
             (b"\0\0\0", 0, 0)]
    for _ in range(200):
        data = rnd.randbytes(rnd.choice([rnd.randrange(2, 100), rnd.randrange(2, 65536)]))
        start = rnd.randrange(0, len(data) - 1)
        cases.append((data, start, rnd.randrange(0, len(data) - start - 1)))
    for data, start, offset in cases:
        want = tun_mod.py_complete_checksum(data, 0, start, offset)
        assert native.complete_checksum(data, start, offset) == want
        assert native.complete_checksum(memoryview(b"hdr" + data)[3:], start, offset) == want


@pytest.mark.parametrize(("packet", "l4", "mss"), [
    (b"", 20, 1000),
    (_v4(_tcp(0, _ACK, b"x" * 10)), 20, 0),
    (_v4(_tcp(0, _ACK, b"x" * 10)), 20, -1),
    (_v4(_tcp(0, _ACK, b"x" * 10))[:30], 20, 1000),  # the TCP header cut short
    (b"\x50" + bytes(59), 20, 1000),  # neither IPv4 nor IPv6
    (_v4(_tcp(0, _ACK, b"x" * 10)), 10, 1000),  # TCP inside the IP header
    (_v4(_tcp(0, _ACK, b"", b"\x01" * 40))[:50], 20, 1000),  # data offset past the end
])
def test_c_refuses_a_malformed_super_packet(native, packet: bytes, l4: int, mss: int) -> None:
    with pytest.raises(ValueError, match="split_tso: needs"):
        native.split_tso(packet, l4, mss)


@pytest.mark.parametrize(("start", "offset"), [(-1, 0), (0, -1), (9, 0), (0, 9), (5, 4)])
def test_c_refuses_a_checksum_outside_the_packet(native, start: int, offset: int) -> None:
    with pytest.raises(ValueError, match="outside a packet of 10 bytes"):
        native.complete_checksum(bytes(10), start, offset)


def _pipe_tun() -> tuple[tun_mod.Tun, int]:
    """A Tun with offload whose writes go into a pipe (no device, no root): (it, read end)."""
    r, w = os.pipe()
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dev = tun_mod.Tun(w, "pipe0", ctl, vnet=True)
    dev.mtu_hint = 1420
    return dev, r


def test_merged_super_packets_are_cut_at_the_mtu() -> None:
    """Two in-order super-packets (a peer that sends them) merged for one write: before, the
    kernel was told to cut them at their own size, 10000 bytes, which forwarding out an
    interface of MTU 1500 refuses (review finding)."""
    dev, r = _pipe_tun()
    try:
        first = _v4(_tcp(1000, _ACK, b"a" * 10000))
        second = _v4(_tcp(11000, _ACK, b"b" * 10000))
        [(_, views, size)] = coalesce_tcp([first, second])
        assert (len(views), size) == (2, 10000)
        dev.write_batch([first, second])
        header = os.read(r, 10)
        _flags, gso_type, hlen, mss, _start, _offset = struct.unpack("<BBHHHH", header)
        assert gso_type == 1 and hlen == 40
        assert mss == 1420 - 40
    finally:
        dev.close()
        os.close(r)


def test_a_super_packet_is_cut_in_the_segment_size_it_came_with() -> None:
    """A super-packet whose sender gave its segment size (CAP_SEGMENT_SIZE) is cut in that
    size, whatever the receiving MTU. Before, it was cut at the MTU: beyond a parent whose
    tunnel MTU is larger than the path's, every segment was too big again (PMTU black
    hole, tests/net/test_ipv6.py)."""
    dev, r = _pipe_tun()
    dev.mtu_hint = 65000
    try:
        # (A path MTU of 1280 the sender's kernel learnt: 1240 bytes past the headers.)
        dev.write(_v4(_tcp(1000, _ACK, b"a" * 5000)), True, 1240)
        header = os.read(r, 10)
        _flags, gso_type, hlen, got, start, offset = struct.unpack("<BBHHHH", header)
        assert (gso_type, hlen, start, offset) == (1, 40, 20, 16)
        assert got == 1240
    finally:
        dev.close()
        os.close(r)


def test_a_segment_size_above_the_mtu_is_cut_at_the_mtu() -> None:
    """(An honest sender gives none: it gives a size only when finer than its MTU.)"""
    dev, r = _pipe_tun()
    try:
        dev.write(_v6(_tcp(1000, _ACK, b"a" * 5000)), True, 9000)
        _flags, gso_type, hlen, got, _start, _offset = struct.unpack("<BBHHHH", os.read(r, 10))
        assert (gso_type, hlen, got) == (4, 60, 1420 - 60)
    finally:
        dev.close()
        os.close(r)


def test_a_packet_of_one_segment_is_no_segmentation_job() -> None:
    dev, r = _pipe_tun()
    try:
        dev.write(_v4(_tcp(1000, _ACK, b"a" * 1000)), False, 1208)
        _flags, gso_type, _hlen, got, _start, _offset = struct.unpack("<BBHHHH", os.read(r, 10))
        assert (gso_type, got) == (0, 0)
    finally:
        dev.close()
        os.close(r)


def test_a_packet_the_kernel_refuses_costs_only_itself() -> None:
    """Before, the first failed write of a batch lost every packet after it (review
    finding); now each is tried and the first error raised after."""
    dev, r = _pipe_tun()
    w = dev.fileno()
    try:
        room = 100
        os.write(w, bytes(65536 - room))  # a pipe of 16 pages, all but 100 bytes full
        os.set_blocking(w, False)
        udp = bytearray(_v4(_tcp(1, _ACK, b"")))
        udp[9] = 17  # not TCP: written as it is, after a plain virtio-net header
        too_big = bytes(udp) + bytes(200)  # > room: EAGAIN (pipe writes under 4 KiB are whole)
        fits = bytes(udp)
        with pytest.raises(BlockingIOError):
            dev.write_batch([too_big, fits])
        os.read(r, 65536 - room)
        assert os.read(r, 1000) == bytes(10) + fits
    finally:
        dev.close()
        os.close(r)


def test_a_tcp_offset_needs_a_whole_ip_header() -> None:
    """An IPv4 header length below 20 bytes made a checksum offset the kernel refuses."""
    packet = bytearray(_v4(_tcp(1, _ACK, b"x" * 3000)))
    packet[0] = 0x42  # IHL 2: 8 bytes
    assert tun_mod.tcp_offset(bytes(packet)) == 0
    assert _offload_header(bytes(packet), 1420) is None


def test_an_ipv4_header_with_options_sums_as_ipv4() -> None:
    """A 40-byte IPv4 header (options) was summed as IPv6, so each segment the kernel cut
    carried a bad checksum (review finding)."""
    tcp = _tcp(1000, _ACK, b"z" * 3000)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x4A, 0, 40 + len(tcp), 1, 0x4000, 64, 6, 0,
                      bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])) + bytes(20)
    packet = hdr + tcp
    _header, *pieces = _offload_header(packet, 1420)
    out = b"".join(pieces)
    expected = (int.from_bytes(packet[12:20], "big") + 6 + len(packet) - 40) % 0xFFFF
    assert int.from_bytes(out[40 + 16 : 40 + 18], "big") == expected


_FINAL = bytes(15) + b"\x09"


def _v6_with(extensions: bytes, first: int, tcp: bytes) -> bytes:
    """An IPv6 packet whose extension headers (`first` the first one's type) come before TCP;
    its destination field holds the next hop, not _FINAL."""
    src, hop = bytes(15) + b"\x01", bytes(15) + b"\x02"
    body = extensions + tcp
    return struct.pack("!IHBB", 0x60000000, len(body), first, 64) + src + hop + body


def _ext(next_header: int, body: bytes) -> bytes:
    """An extension header in 8-byte units (hop-by-hop, routing, destination options)."""
    assert (len(body) + 2) % 8 == 0
    return bytes([next_header, (len(body) + 2) // 8 - 1]) + body


_EXTENSIONS = {
    # Mobile IPv6 (type 2, segments left 1): the home address, the final destination.
    "type 2": (43, _ext(6, bytes([2, 1]) + bytes(4) + _FINAL)),
    # Segment routing (type 4), two segments left: Segment List[0] is the final destination.
    "srh": (43, _ext(6, bytes([4, 1, 1, 0, 0, 0]) + _FINAL + bytes(15) + b"\x05")),
    # Hop-by-hop options (PadN) before a type 0 header with two addresses, the final last.
    "hop-by-hop, type 0": (0, _ext(43, bytes([1, 4]) + bytes(4))
                           + _ext(6, bytes([0, 2]) + bytes(4) + bytes(15) + b"\x07" + _FINAL)),
}


@pytest.mark.parametrize("kind", list(_EXTENSIONS))
@pytest.mark.parametrize("impl", ["python", "c"])
def test_a_routing_header_names_the_destination_the_checksum_covers(kind, impl) -> None:
    """RFC 8200 8.1: with a routing header, the pseudo-header holds the final destination.
    The IPv6 header's own destination (the next hop) was summed, so every segment of such a
    super-packet carried a checksum its receiver refuses."""
    first, extensions = _EXTENSIONS[kind]
    payload = os.urandom(5000)
    packet = _v6_with(extensions, first, _tcp(1000, _ACK | _PSH, payload))
    l4 = 40 + len(extensions)
    if impl == "c":
        module = _segment_module()
        if module is None:
            pytest.skip("a pure build: no C segmentation (make compile builds it)")
        cut = module.split_tso
    else:
        cut = tun_mod.py_split_tso
    segments = [bytes(s) for s in cut(packet, l4, 1400)]
    assert b"".join(s[l4 + 20:] for s in segments) == payload
    for seg in segments:
        assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40
        pseudo = seg[8:24] + _FINAL + struct.pack("!IxxxB", len(seg) - l4, 6)
        assert _ones_sum(pseudo + seg[l4:]) == 0xFFFF
