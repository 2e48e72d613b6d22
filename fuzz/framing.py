"""Target `framing`: hostile byte streams into the stream transport's FrameDecoder.

An input is `u16 max_payload, u32 split seed, stream`. The stream is fed in pieces cut by the
split seed, as bytes, bytearray or memoryview, and each piece is scribbled over after `feed`
returns (the decoder must have copied what it keeps). A straightforward reference parser
says what must come out: the same payloads, and a FramingError exactly when the reference
finds a bad length or CRC, after which the decoder stays failed. A third of the generated frames
are WireGuard transport messages with a right, zero or wrong CRC: the decoder must take them
all, and check every other frame's CRC (frames that are not exactly type 4 among them).
"""

from __future__ import annotations

import random
import struct
import zlib

from wgvsock.conn.framing import HEADER_SIZE, MAX_PAYLOAD, MIN_PAYLOAD, FrameDecoder, FramingError

from .harness import Target
from .mutate import havoc, random_bytes

_HEADER = struct.Struct("<HI")
_INPUT = struct.Struct("<HI")
_TRANSPORT = b"\x04\x00\x00\x00"
MAX_CHOICES = (MAX_PAYLOAD, MAX_PAYLOAD, 1500, 148, MIN_PAYLOAD)


def reference(stream: bytes, max_payload: int) -> tuple[list[bytes], bool, int]:
    """(payloads, failed, bytes left over) as the format defines them."""
    out: list[bytes] = []
    pos = 0
    while len(stream) - pos >= HEADER_SIZE:
        length, crc = _HEADER.unpack_from(stream, pos)
        if not MIN_PAYLOAD <= length <= max_payload:
            return out, True, 0
        end = pos + HEADER_SIZE + length
        if end > len(stream):
            break
        payload = stream[pos + HEADER_SIZE:end]
        # A WireGuard transport message (exactly type 4) is left to its AEAD tag.
        if payload[:4] != _TRANSPORT and zlib.crc32(payload) != crc:
            return out, True, 0
        out.append(payload)
        pos = end
    return out, False, len(stream) - pos


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def some_frame(rng: random.Random, size: int) -> bytes:
    """A frame of `size` bytes; a third of them transport messages, whose CRC may be right,
    0 (what a peer with CAP_UNCHECKED_TRANSPORT sends) or wrong, which the decoder ignores."""
    if rng.random() < 2 / 3:
        return frame(rng.randbytes(size))
    payload = _TRANSPORT + rng.randbytes(size - 4)
    crc = rng.choice((zlib.crc32(payload), 0, rng.getrandbits(32)))
    return _HEADER.pack(size, crc) + payload


class FramingTarget(Target):
    name = "framing"
    count = 100_000
    shard_size = 25_000

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        max_payload = rng.choice(MAX_CHOICES)
        head = _INPUT.pack(max_payload, rng.getrandbits(32))
        r = rng.random()
        if r < 0.15:
            return "random", head + random_bytes(rng, 2000)
        sizes = (MIN_PAYLOAD, MIN_PAYLOAD + 1, 148, 92, 64, rng.randrange(MIN_PAYLOAD, 1600))
        frames = [some_frame(rng, rng.choice(sizes)) for _ in range(rng.randint(1, 6))]
        if r < 0.4:
            return "valid", head + b"".join(frames)
        if r < 0.5:  # a header at the edges of the length range, with or without its payload
            length = rng.choice((0, 1, MIN_PAYLOAD - 1, MIN_PAYLOAD, max_payload,
                                 min(max_payload + 1, MAX_PAYLOAD), MAX_PAYLOAD))
            body = rng.randbytes(min(length, rng.choice((0, length, 100))))
            bad = _HEADER.pack(length, zlib.crc32(body) ^ rng.choice((0, 0, 1))) + body
            frames.insert(rng.randrange(len(frames) + 1), bad)
            return "edge-length", head + b"".join(frames)
        stream = havoc(rng, b"".join(frames), max_len=12_000, pool=tuple(frames))
        return "mutated", head + stream

    def run(self, data: bytes) -> None:
        max_payload, split_seed = _INPUT.unpack_from(data)
        stream = data[_INPUT.size:]
        if max_payload < MIN_PAYLOAD:
            max_payload = MIN_PAYLOAD
        want, want_failed, want_left = reference(stream, max_payload)
        split = random.Random(split_seed)
        decoder = FrameDecoder(max_payload)
        got: list[bytes] = []
        failed = False
        pos = 0
        while pos < len(stream) or pos == 0:
            n = split.choice((1, 2, 5, HEADER_SIZE, 7, 64, 1000, len(stream) or 1))
            piece = bytearray(stream[pos:pos + n])
            fed: bytes | bytearray | memoryview = (bytes(piece), piece, memoryview(piece))[
                split.randrange(3)]
            pos += n
            try:
                got += decoder.feed(fed)
            except FramingError:
                failed = True
                break
            finally:
                piece[:] = b"\xee" * len(piece)  # the caller reuses its buffer
        assert got == want[:len(got)], "decoder returned a payload the stream does not hold"
        assert failed == want_failed, (
            f"decoder {'refused' if failed else 'accepted'} a stream the format "
            f"{'accepts' if failed else 'refuses'}")
        if failed:
            try:
                decoder.feed(b"")
            except FramingError:
                pass
            else:
                raise AssertionError("decoder accepted data after a FramingError")
        else:
            assert got == want, "decoder lost payloads"
            assert decoder.buffered == want_left, "decoder holds the wrong number of bytes"
