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

LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"


def padding_size(packet_size: int, mtu: int) -> int:
    """Bytes of zero padding after an inner packet: up to a multiple of 16, never past the MTU."""
    if mtu <= 0:
        return -packet_size % PADDING_MULTIPLE
    last = packet_size % mtu if packet_size > mtu else packet_size
    padded = min(last + (-last % PADDING_MULTIPLE), mtu)
    return padded - last
