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
    FrameDecoder,
    FramingError,
    encode_frame,
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


def test_bad_crc() -> None:
    frame = bytearray(encode_frame(payload(64)))
    frame[10] ^= 1
    dec = FrameDecoder()
    with pytest.raises(FramingError, match="bad CRC") as info:
        dec.feed(bytes(encode_frame(payload(40))) + frame)
    assert info.value.reason == "bad CRC"
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
