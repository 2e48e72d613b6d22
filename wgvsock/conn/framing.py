"""Stream framing of wireguard-go-vsock (>= 0.2.4): one frame per WireGuard message.

    u16 LE  payload length
    u32 LE  CRC-32 (IEEE, as zlib.crc32) of the payload
    bytes   payload

There is no hello and no version byte, so the first bytes on a connection are already a frame.

The CRC of a WireGuard transport message (type 4) is not checked here: its AEAD tag already
authenticates every byte that matters (a changed counter is a changed nonce, a changed receiver
index finds no key), so a corrupt one is dropped by the engine all the same, and the check
would cost a pass over every byte. Its first four bytes must still read exactly type 4, which
keeps a desynchronised stream from going unnoticed: anything else is CRC-checked. A peer that
knows this (caps.CAP_UNCHECKED_TRANSPORT) may send such frames with CRC 0.

Limits: a payload shorter than MIN_PAYLOAD (32 bytes, a keepalive, the smallest WireGuard
message) cannot be a WireGuard message, and a length of 0 would let a peer spin us with empty
frames. MAX_PAYLOAD is the u16 cap, which is also wireguard-go's MaxMessageSize (65535), so a
Go peer can never send more. A decoder may be given a lower maximum; it then refuses a large
length as soon as the header arrives instead of buffering up to 64 KiB per connection.
A decoder may also start with a small buffer (``start``) that grows only when a frame needs it
(or ``grow`` is called): a stream transport gives one to a connection nobody has authenticated
yet, so a stranger's connection costs a few KiB until it sends a large frame.
"""

from __future__ import annotations

import struct
from typing import Final, TypeAlias

# zlib's crc32 (the same IEEE CRC-32), with the SIMD code of zlib-ng. Per 64 KiB: 1.3 us in
# the first measurement, 4.2 us on a host with AVX2 but no AVX-512 (twenty-fourth round; its
# 512-bit path needs AVX-512), against zlib's 16-18. Every frame to the Go seed needs one.
from zlib_ng.zlib_ng import crc32

# Bound once: mypyc looks an imported name up in the module's dict at every use.
_crc32: Final = crc32

__all__ = [
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MAX_STREAM_MTU",
    "MIN_PAYLOAD",
    "RECEIVE_BUFFER",
    "VIEW_FROM",
    "FrameDecoder",
    "FramingError",
    "encode_frame",
    "frame_header",
]

_HEADER: Final = struct.Struct("<HI")
_TYPE: Final = struct.Struct("<I")
_TRANSPORT: Final = 4
HEADER_SIZE: Final = _HEADER.size  # 6
MIN_PAYLOAD: Final = 32
MAX_PAYLOAD: Final = 0xFFFF
# The largest tunnel MTU a frame can carry: a transport message is the packet plus 32 bytes
# (16 of header, 16 of tag; padding never goes past the MTU). Above it, full-size packets could
# not be framed and would vanish.
MAX_STREAM_MTU: Final = MAX_PAYLOAD - 32
# Transport messages from this size on come out of a decoder as views into its buffer. A copy
# of 64 KiB cost 5-10 % of a receiving daemon's CPU at MTU 65000; below a few KiB the copy is
# cheaper than the generic (non-bytes) handling a view gets downstream: 2400 instructions more
# per ACK-sized message (bench/README.md, twenty-third round).
VIEW_FROM: Final = 16384
# A decoder's receive buffer: one read can carry many frames when the peer is busy, and room
# for several 64 KiB ones keeps system calls few.
RECEIVE_BUFFER: Final = 256 * 1024

BytesLike: TypeAlias = bytes | bytearray | memoryview


class FramingError(ValueError):
    """The byte stream is not a sequence of valid frames; the connection must be dropped."""

    def __init__(self, reason: str, before: list[bytes | memoryview] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        # The whole frames that came before the fault in the same data: still good, so they
        # are delivered before the connection goes (as the Go seed does, reading one frame
        # at a time). Views, valid as the decoder's frames are.
        self.before: list[bytes | memoryview] = before if before is not None else []


def encode_frame(payload: BytesLike) -> bytes:
    """One frame for ``payload``. Refuses what our own decoder would refuse."""
    return frame_header(payload) + payload


def frame_header(payload: BytesLike, unchecked_transport: bool = False) -> bytes:
    """The 6-byte header of the frame for ``payload`` (to send with it as an iovec). With
    ``unchecked_transport`` (the peer's hello said CAP_UNCHECKED_TRANSPORT) a transport
    message gets CRC 0."""
    n = len(payload)
    if n < MIN_PAYLOAD or n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes cannot be framed ({MIN_PAYLOAD}-{MAX_PAYLOAD})")
    if unchecked_transport and _TYPE.unpack_from(payload)[0] == _TRANSPORT:
        return n.to_bytes(HEADER_SIZE, "little")
    # _HEADER's layout as one integer: mypyc compiles int.to_bytes to C, where Struct.pack is
    # a method call (about 600 instructions).
    return (n | _crc32(payload) << 16).to_bytes(HEADER_SIZE, "little")


class FrameDecoder:
    """Incremental decoder that owns its receive buffer: receive into ``space()``, then
    ``frames(n)`` gives the whole payloads among what arrived so far.

    A transport message of VIEW_FROM bytes or more comes out as a view into the buffer, with
    no copy: it is valid until the next ``space()``, which moves a frame cut off by the end of
    the last read to the front and so writes over what the views showed. Anything else comes
    out as its own bytes (CRC-checked unless a transport message). ``feed`` does the same for
    data from elsewhere and returns bytes only (tests, the fuzzer). After a FramingError the
    decoder stays failed.
    """

    __slots__ = ("_buf", "_end", "_error", "_max", "_min", "_size", "_used", "_view")

    def __init__(self, max_payload: int = MAX_PAYLOAD, min_payload: int = MIN_PAYLOAD,
                 size: int = RECEIVE_BUFFER, start: int = 0) -> None:
        """`size` is the buffer's full size; `start` (0: the full size) what it begins with,
        growing when a frame would not fit (never past `size`)."""
        # 4 at least: each payload's message type is read before its CRC is checked or not.
        if not 4 <= min_payload <= max_payload <= MAX_PAYLOAD:
            raise ValueError("need 4 <= min_payload <= max_payload <= 65535")
        if size <= HEADER_SIZE + max_payload:
            raise ValueError("the receive buffer must hold a whole frame and more")
        if start and not HEADER_SIZE < start <= size:
            raise ValueError("a small buffer must hold a frame header and more")
        self._size = size
        self._buf = bytearray(start or size)
        self._view = memoryview(self._buf)
        self._end = 0  # bytes received into the buffer
        self._used = 0  # of them, bytes of whole frames handed out
        self._min = min_payload
        self._max = max_payload
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back for the next read."""
        return self._end - self._used

    def space(self) -> memoryview:
        """Where the next read goes: the buffer after the incomplete frame, which first moves
        to the front (so views from the last ``frames`` are stale from here on)."""
        end, used = self._end, self._used
        if used:
            rest = end - used
            if rest:
                part = self._view[used:end]
                # bytearray slice assignment copies with memcpy: overlapping ranges need a copy
                # of their own.
                self._buf[:rest] = bytes(part) if rest > used else part
            self._end, self._used = rest, 0
            end = rest
        return self._view[end:]

    def frames(self, n: int) -> list[bytes | memoryview]:
        """The whole frames once `n` more bytes have been received into ``space()``."""
        if self._error is not None:
            raise self._error
        mv = self._view
        total = self._end = self._end + n
        pos = self._used
        out: list[bytes | memoryview] = []
        need = 0
        while total - pos >= HEADER_SIZE:
            # Typed, so that compiled code compares and adds machine integers.
            length: int
            crc: int
            length, crc = _HEADER.unpack_from(mv, pos)
            if length < self._min or length > self._max:
                # Checked before the payload arrives: no waiting on a bogus 64 KiB length.
                raise self._fail(f"impossible frame length {length}", out)
            start = pos + HEADER_SIZE
            end = start + length
            if end > total:
                need = HEADER_SIZE + length  # at the buffer's front, once space() moved it
                break
            kind: int = _TYPE.unpack_from(mv, start)[0]
            if kind != _TRANSPORT:
                payload = bytes(mv[start:end])
                if _crc32(payload) != crc:
                    raise self._fail("bad CRC", out)
                out.append(payload)
            elif length >= VIEW_FROM:
                out.append(mv[start:end])
            else:
                out.append(bytes(mv[start:end]))
            pos = end
        self._used = pos
        if need >= len(self._buf):  # only ever with a small buffer (`start`)
            self.grow(need + 1)
        return out

    def grow(self, size: int = 0) -> None:
        """Makes the buffer `size` bytes (0: its full size; never more), keeping what it
        holds. Views handed out before stay valid: they keep the old buffer."""
        size = min(size or self._size, self._size)
        if size <= len(self._buf):
            return
        rest = self._end - self._used
        buf = bytearray(size)
        buf[:rest] = self._view[self._used:self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._end, self._used = rest, 0

    def _fail(self, reason: str, before: list[bytes | memoryview]) -> FramingError:
        """Fails the decoder for good; the error to raise now carries `before`."""
        self._error = FramingError(reason)
        return FramingError(reason, before) if before else self._error

    def feed(self, data: BytesLike) -> list[bytes]:
        """``frames`` of `data` received from elsewhere, as bytes."""
        out: list[bytes] = []
        with memoryview(data) as src:
            at = 0
            while True:
                dst = self.space()
                k = min(len(dst), len(src) - at)
                dst[:k] = src[at:at + k]
                at += k
                out += [f if isinstance(f, bytes) else bytes(f) for f in self.frames(k)]
                if at == len(src):
                    return out
