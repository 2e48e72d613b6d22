"""The capability hello: how two wgvsock peers on one stream connection agree on offload.

Our daemon with segmentation offload on sends this frame first on every stream connection it
opens or accepts. It is not a WireGuard message: its first four bytes, read as wireguard-go
reads a message type (u32 little-endian), name no known type, so wireguard-go-vsock (the Go
seed) drops it and keeps the connection, and so does our engine ("unknown message type").
A peer that never sends one gets only MTU-sized packets with complete checksums.

    8 bytes  magic  b"\\xfewgvcaps"
    u32 LE   flags  (CAP_*; unknown bits are ignored)
    u32 LE   largest inner packet the sender of the hello accepts
    16 bytes zero   (the frame is MIN_PAYLOAD long, as short as a WireGuard message may be)

The hello is not authenticated. Whoever can write to the stream can already cut or corrupt
it; a forged hello can only make us send super-packets to a peer that writes them to its TUN
unsegmented, which costs throughput, not confidentiality or integrity (the AEAD covers every
inner packet).
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "CAP_PARTIAL_CSUM",
    "CAP_SEGMENT_SIZE",
    "CAP_SUPER",
    "CAP_UNCHECKED_TRANSPORT",
    "HELLO_MAGIC",
    "encode_hello",
    "parse_hello",
]

HELLO_MAGIC: Final = b"\xfewgvcaps"
_HELLO: Final = struct.Struct("<8sII16x")
HELLO_SIZE: Final = _HELLO.size  # 32

# "Send me TCP super-packets (inner packets above the MTU, up to the size given): my kernel
# cuts them into segments where it has to forward them."
CAP_SUPER: Final = 0x1
# "A TCP checksum may arrive partial (the field holding the pseudo-header sum, as the kernel
# leaves it for offload): I have my kernel finish it." Spares the sender a pass over the bytes.
CAP_PARTIAL_CSUM: Final = 0x2
# "Frames of transport messages may carry CRC 0: I do not check their CRC." Every wgvsock
# receiver trusts the AEAD tag for those (framing.FrameDecoder), which any corruption fails;
# the sender then spares a CRC pass over each message (16 us per 64 KiB). The Go seed checks
# every CRC, so it never sends this and always gets them.
CAP_UNCHECKED_TRANSPORT: Final = 0x4
# "A super-packet whose segments are finer than the MTU may carry their size (the trailer of
# core.messages.SEGMENT_TRAILER_MAGIC, after the IP packet inside the encryption): I have my
# kernel cut it in that size." Without it such a super-packet is cut into segments by the
# sender, since a receiver cuts super-packets at its own MTU: the segments of a path MTU that
# an ICMP "packet too big" taught the sender, or of a far end's small MSS, would then be too
# big for that path again. Offered with CAP_SUPER only.
CAP_SEGMENT_SIZE: Final = 0x8


def encode_hello(flags: int, max_packet: int) -> bytes:
    return _HELLO.pack(HELLO_MAGIC, flags, max_packet)


def parse_hello(payload: bytes) -> tuple[int, int] | None:
    """(flags, max_packet) when `payload` is a hello, else None."""
    if len(payload) != HELLO_SIZE or payload[:8] != HELLO_MAGIC:
        return None
    _, flags, max_packet = _HELLO.unpack(payload)
    return flags, max_packet
