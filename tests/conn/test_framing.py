"""wireguard-go-vsock stream framing: u16 LE length, u32 LE CRC-32, payload."""

from __future__ import annotations

import itertools
import random
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgvsock.conn.framing import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    MIN_PAYLOAD,
    RECEIVE_BUFFER,
    VIEW_FROM,
    FrameDecoder,
    FramingError,
    encode_frame,
    frame_header,
)


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_encode_layout() -> None:
    p = payload(148)
    frame = encode_frame(p)
    assert HEADER_SIZE == 6
    assert frame[:2] == (148).to_bytes(2, "little")
    assert frame[2:6] == zlib.crc32(p).to_bytes(4, "little")
    assert frame[6:] == p
    assert encode_frame(bytearray(p)) == frame
    assert encode_frame(memoryview(p)) == frame


def test_encode_refuses_unframeable_sizes() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"x" * (MIN_PAYLOAD - 1))
    with pytest.raises(ValueError):
        encode_frame(b"")
    with pytest.raises(ValueError):
        encode_frame(b"x" * (MAX_PAYLOAD + 1))
    assert len(encode_frame(b"x" * MAX_PAYLOAD)) == MAX_PAYLOAD + HEADER_SIZE
    assert len(encode_frame(b"x" * MIN_PAYLOAD)) == MIN_PAYLOAD + HEADER_SIZE


def test_decode_many_frames_in_one_feed() -> None:
    msgs = [payload(n, n) for n in (32, 92, 148, 64, 1500, MAX_PAYLOAD)]
    dec = FrameDecoder()
    assert dec.feed(b"".join(encode_frame(m) for m in msgs)) == msgs
    assert dec.buffered == 0


def test_decode_byte_by_byte() -> None:
    msgs = [payload(32, 1), payload(100, 2)]
    stream = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert out == msgs
    assert dec.buffered == 0


@given(
    sizes=st.lists(st.integers(MIN_PAYLOAD, 3000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 30000), max_size=10),
)
def test_decode_any_split(sizes: list[int], cuts: list[int]) -> None:
    msgs = [payload(n, i) for i, n in enumerate(sizes)]
    stream = b"".join(encode_frame(m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += dec.feed(memoryview(stream)[a:b])
    assert out == msgs


def test_decoder_does_not_keep_the_callers_buffer() -> None:
    frame = encode_frame(payload(200, 5))
    rx = bytearray(frame[:50])
    dec = FrameDecoder()
    assert dec.feed(memoryview(rx)) == []
    rx[:] = b"\xff" * len(rx)  # the reader reuses its receive buffer
    assert dec.feed(memoryview(frame)[50:]) == [payload(200, 5)]


def _receive(dec: FrameDecoder, data: bytes) -> list[bytes | memoryview]:
    """What the stream reader does with one read: into space(), then frames()."""
    space = dec.space()
    assert len(space) >= len(data)
    space[: len(data)] = data
    return dec.frames(len(data))


def test_transport_messages_are_views_into_the_buffer_until_the_next_read() -> None:
    """No copy of a transport message on the way to the engine: it is a view into the receive
    buffer, valid until the next space(), which moves a cut-off frame to the front."""
    t1, hs, small, t2 = (_transport(VIEW_FROM, 1), payload(148, 2), _transport(VIEW_FROM - 1, 3),
                         _transport(65000, 4))
    t3 = _transport(20000, 5)
    stream = b"".join(encode_frame(m) for m in (t1, hs, small, t2, t3))
    cut = len(stream) - 200
    dec = FrameDecoder()
    first = _receive(dec, stream[:cut])
    # Below VIEW_FROM the copy is cheaper than handling a view downstream.
    assert [type(f) for f in first] == [memoryview, bytes, bytes, memoryview]
    assert [bytes(f) for f in first] == [t1, hs, small, t2]
    assert dec.buffered == len(encode_frame(t3)) - 200
    held = bytes(first[0])
    rest = _receive(dec, stream[cut:])  # space() moved the cut-off frame to the front
    assert bytes(first[0]) != held  # the old view shows what is there now
    assert [bytes(f) for f in rest] == [t3]
    assert dec.buffered == 0


@given(
    sizes=st.lists(st.integers(MIN_PAYLOAD, 20000), min_size=1, max_size=12),
    kinds=st.lists(st.booleans(), min_size=12, max_size=12),
    cuts=st.lists(st.integers(0, 250000), max_size=12),
)
def test_a_small_buffer_moves_cut_off_frames_and_loses_nothing(
    sizes: list[int], kinds: list[bool], cuts: list[int]
) -> None:
    """Reads of any length into a buffer barely larger than a frame: every cut-off frame
    moves to the front (over itself, too, when it is longer than what went before it), and
    each view (a transport message from VIEW_FROM bytes) is read before the next read."""
    msgs = [_transport(n, i) if kinds[i] else payload(n, i) for i, n in enumerate(sizes)]
    stream = b"".join(encode_frame(m) for m in msgs)
    dec = FrameDecoder(max_payload=20000, size=HEADER_SIZE + 20001)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    out: list[bytes] = []
    at = 0
    for end in points[1:]:
        while at < end:
            space = dec.space()
            k = min(len(space), end - at)
            space[:k] = stream[at : at + k]
            at += k
            out += [bytes(f) for f in dec.frames(k)]
    assert out == msgs
    assert dec.buffered == 0


def test_bad_crc() -> None:
    frame = bytearray(encode_frame(payload(64)))
    frame[10] ^= 1
    dec = FrameDecoder()
    with pytest.raises(FramingError, match="bad CRC") as info:
        dec.feed(bytes(encode_frame(payload(40))) + frame)
    assert info.value.reason == "bad CRC"
    assert info.value.before == [payload(40)]  # whole before the fault: still good
    # A failed stream stays failed; the connection is to be dropped.
    with pytest.raises(FramingError):
        dec.feed(encode_frame(payload(40)))


@pytest.mark.parametrize("length", [0, 1, MIN_PAYLOAD - 1])
def test_impossible_length_fails_on_the_header(length: int) -> None:
    dec = FrameDecoder()
    with pytest.raises(FramingError, match="impossible frame length"):
        dec.feed(struct.pack("<HI", length, 0))


def test_lowered_maximum_fails_before_the_payload_arrives() -> None:
    dec = FrameDecoder(max_payload=2048)
    assert dec.feed(encode_frame(payload(2048))) == [payload(2048)]
    with pytest.raises(FramingError, match="impossible frame length 60000"):
        dec.feed(struct.pack("<HI", 60000, 0) + b"\0" * 10)


def test_decoder_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_payload=MAX_PAYLOAD + 1)
    with pytest.raises(ValueError):
        FrameDecoder(max_payload=10, min_payload=20)
    # Shorter than a message type, a payload would be typed by the bytes after it: a bad CRC
    # could pass as a transport message's.
    with pytest.raises(ValueError, match="4 <= min_payload"):
        FrameDecoder(min_payload=3)
    with pytest.raises(ValueError, match="whole frame"):
        FrameDecoder(max_payload=2048, size=2048)


def _transport(n: int, seed: int = 0) -> bytes:
    return b"\x04\x00\x00\x00" + payload(n - 4, seed)


def test_transport_frames_are_trusted_to_their_aead_tag() -> None:
    """A transport message's CRC is not checked (the engine's AEAD check catches any
    corruption); a peer that knows it sends CRC 0 and spares a pass over the bytes."""
    msgs = [_transport(100, 1), _transport(60000, 2)]
    zero = b"".join(struct.pack("<HI", len(m), 0) + m for m in msgs)
    assert FrameDecoder().feed(zero) == msgs
    wrong = bytearray(encode_frame(msgs[0]))
    wrong[2] ^= 0x55
    assert FrameDecoder().feed(bytes(wrong)) == [msgs[0]]


@pytest.mark.parametrize("head", [b"\x04\x00\x00\x01", b"\x05\x00\x00\x00", b"\x01\x00\x00\x00"])
def test_other_frames_are_crc_checked_even_near_type_4(head: bytes) -> None:
    """Only an exact type-4 header skips the check, so a stream that lost its frame boundary
    still fails on its next CRC."""
    frame = struct.pack("<HI", 64, 0) + head + payload(60)
    with pytest.raises(FramingError, match="bad CRC"):
        FrameDecoder().feed(frame)


def test_frame_header_leaves_out_the_crc_only_for_transport_messages_when_asked() -> None:
    t, h = _transport(200), b"\x01\x00\x00\x00" + payload(144)
    assert frame_header(t, True) == struct.pack("<HI", 200, 0)
    assert frame_header(t) == struct.pack("<HI", 200, zlib.crc32(t))
    assert frame_header(h, True) == struct.pack("<HI", 148, zlib.crc32(h))


def test_a_small_buffer_grows_only_when_a_frame_needs_it() -> None:
    """A stream transport gives a connection nobody has authenticated a small buffer; before,
    each had 256 KiB from the accept on (review finding). It grows when a frame would not fit,
    and to its full size when asked (the connection is a peer's)."""
    dec = FrameDecoder(start=4096)
    assert len(dec.space()) == 4096
    small = [payload(148, i) for i in range(20)]
    big = _transport(60000, 1)
    stream = b"".join(encode_frame(m) for m in small) + encode_frame(big) + encode_frame(
        small[0])
    out: list[bytes] = []
    at = 0
    sizes = []
    while at < len(stream):
        space = dec.space()
        sizes.append(len(space) + dec.buffered)
        k = min(len(space), 1000, len(stream) - at)
        space[:k] = stream[at : at + k]
        at += k
        out += [bytes(f) for f in dec.frames(k)]
    assert out == [*small, big, small[0]]
    assert max(sizes) == HEADER_SIZE + 60000 + 1  # as much as the big frame needed, no more
    dec.grow()
    assert len(dec.space()) == RECEIVE_BUFFER
    with pytest.raises(ValueError):
        FrameDecoder(start=HEADER_SIZE)
