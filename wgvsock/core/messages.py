"""WireGuard message layout and protocol constants (whitepaper §5.4 and §6)."""

from __future__ import annotations

from typing import Final

MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3
MSG_TRANSPORT: Final = 4

INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64
TRANSPORT_HEADER_SIZE: Final = 16
TRANSPORT_MIN_SIZE: Final = 32  # header + Poly1305 tag: a keepalive
MAX_MESSAGE_SIZE: Final = 65535  # a stream frame's length is a u16

# The type is a little-endian u32 whose upper three bytes must be zero; checking all four bytes
# at once rejects garbage that happens to start with a small number.
TYPE_INITIATION: Final = MSG_INITIATION.to_bytes(4, "little")
TYPE_RESPONSE: Final = MSG_RESPONSE.to_bytes(4, "little")
TYPE_COOKIE_REPLY: Final = MSG_COOKIE_REPLY.to_bytes(4, "little")
TYPE_TRANSPORT: Final = MSG_TRANSPORT.to_bytes(4, "little")

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX: Final = 0.334
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0
HANDSHAKE_INITIATION_RATE: Final = 1.0 / 50  # at most one accepted initiation per peer per 20 ms
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
ZERO_KEY_MATERIAL_AFTER: Final = REJECT_AFTER_TIME * 3
MAX_STAGED_PACKETS: Final = 128
PADDING_MULTIPLE: Final = 16

# wgvsock's segment-size trailer (conn.caps.CAP_SEGMENT_SIZE): a TCP super-packet whose segments
# are finer than the tunnel's MTU carries their size in 4 bytes right after the IP packet,
# inside the encryption, where WireGuard has only zero padding: the magic, then the segment
# size (u16 little-endian). The receiver has its kernel cut the packet in that size; without
# it the receiver cuts at its own MTU, and every segment is again too big for the path the
# sender's kernel had learnt (or the far end's MSS). A zero first byte is padding, so no
# standard WireGuard message is ever read as one.
SEGMENT_TRAILER_MAGIC: Final = b"\xfe\x53"
SEGMENT_TRAILER_SIZE: Final = 4
# The smallest segment size a trailer may give: below it the receiver's kernel would cut one
# packet into thousands (IPv4's minimum MTU of 68 leaves 8 bytes past 60 of headers).
MIN_SEGMENT_SIZE: Final = 64

LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"


def segment_trailer(mss: int) -> bytes:
    """The trailer that gives a super-packet's segment size `mss` (SEGMENT_TRAILER_MAGIC)."""
    return SEGMENT_TRAILER_MAGIC + mss.to_bytes(2, "little")


def padding_size(packet_size: int, mtu: int) -> int:
    """Bytes of zero padding after an inner packet: up to a multiple of 16, never past the MTU."""
    if mtu <= 0:
        return -packet_size % PADDING_MULTIPLE
    last = packet_size % mtu if packet_size > mtu else packet_size
    padded = min(last + (-last % PADDING_MULTIPLE), mtu)
    return padded - last
