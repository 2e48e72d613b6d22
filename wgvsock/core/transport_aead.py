"""ChaCha20-Poly1305 for transport messages: `TransportKey`, one per direction of a keypair.

`seal(header, counter, packet, pad, tail=b"")` returns the whole message (header, counter,
ciphertext of the packet, the tail and `pad` zero bytes, tag: the tail sealed as if joined to
the packet, which the compiled build never joins); `open(message)` returns the plaintext or
None. A compiled build uses the C extension `_transport_aead` (OpenSSL with one context per
key: half the cost of `cryptography` per 1420-byte message, bench/README.md fifteenth round);
a pure build (WGVSOCK_PURE=1) uses `PureTransportKey` below, the same on `cryptography`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = ["PureTransportKey", "TransportKey"]

_NONCE_PREFIX = b"\x00\x00\x00\x00"


class PureTransportKey:
    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"a transport key is 32 bytes, not {len(key)}")
        self._aead = ChaCha20Poly1305(key)

    def seal(self, header: bytes, counter: int, packet: bytes | bytearray | memoryview,
             pad: int, tail: bytes | bytearray | memoryview = b"", /) -> bytes:
        if len(header) != 8:
            raise ValueError(f"a transport header is 8 bytes, not {len(header)}")
        if not 0 <= pad <= 15:
            raise ValueError(f"padding is 0-15 bytes, not {pad}")
        counter_le = counter.to_bytes(8, "little")
        # (cryptography takes one buffer: here the tail costs the copy the C seal spares.)
        # A tail other than bytes goes to the join too, which refuses a non-buffer (None, a
        # str) as the C seal does, however falsy.
        if pad or tail or tail.__class__ is not bytes:
            packet = b"".join((packet, tail, bytes(pad)))
        return header + counter_le + self._aead.encrypt(_NONCE_PREFIX + counter_le, packet, None)

    def open(self, message: bytes | bytearray | memoryview, /) -> bytes | None:
        view = memoryview(message)
        if len(view) < 32:
            return None
        try:
            return self._aead.decrypt(_NONCE_PREFIX + bytes(view[8:16]), view[16:], None)
        except InvalidTag:
            return None


if TYPE_CHECKING:
    from ._transport_aead import TransportKey
else:
    try:
        from ._transport_aead import TransportKey
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._transport_aead":
            raise
        TransportKey = PureTransportKey
