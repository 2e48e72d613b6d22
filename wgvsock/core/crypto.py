"""Cryptographic primitives of WireGuard, as the whitepaper names them.

HASH, MAC, HMAC and the KDF chain are BLAKE2s; AEAD is ChaCha20-Poly1305 with WireGuard's
nonce layout; XAEAD (cookie replies) is XChaCha20-Poly1305, built from HChaCha20 because the
`cryptography` package has no XChaCha. Everything here is pure computation: no I/O, no clock.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac as _hmac
import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "KEY_LEN",
    "AEADError",
    "KeyFormatError",
    "aead_decrypt",
    "aead_encrypt",
    "clamp_private_key",
    "dh",
    "generate_private_key",
    "hash_",
    "hchacha20",
    "hmac",
    "kdf1",
    "kdf2",
    "kdf3",
    "key_from_base64",
    "key_from_hex",
    "key_to_base64",
    "key_to_hex",
    "mac",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

KEY_LEN: Final = 32
_ZERO_NONCE_PREFIX: Final = b"\x00\x00\x00\x00"
_SIGMA: Final = struct.unpack("<4I", b"expand 32-byte k")


class AEADError(Exception):
    """Authentication failed: wrong key, tampered data or wrong associated data."""


class KeyFormatError(ValueError):
    """A key in base64 or hex form did not decode to 32 bytes."""


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (the whitepaper's MAC)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    return _hmac.digest(key, data, hashlib.blake2s)


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac(key, data)
    return hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    t3 = hmac(t0, t2 + b"\x03")
    return t1, t2, t3


def _nonce(counter: int) -> bytes:
    return _ZERO_NONCE_PREFIX + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, ad)
    except InvalidTag:
        raise AEADError("authentication failed") from None


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2).

    The ChaCha20 block function's output is the permuted state plus the input state; HChaCha20
    is the permuted state itself (words 0-3 and 12-15), so subtract the known input words from
    one keystream block. `cryptography`'s 16-byte ChaCha20 nonce fills state words 12-15, which
    is exactly where HChaCha20 puts its 16-byte nonce.
    """
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("hchacha20 needs a 32-byte key and a 16-byte nonce")
    enc = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor()
    block = struct.unpack("<16I", enc.update(bytes(64)))
    n = struct.unpack("<4I", nonce16)
    out = [(block[i] - _SIGMA[i]) & 0xFFFFFFFF for i in range(4)]
    out += [(block[12 + i] - n[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *out)


def _xchacha_parts(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce24) != 24:
        raise ValueError("XChaCha20-Poly1305 needs a 24-byte nonce")
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey), _ZERO_NONCE_PREFIX + nonce24[16:]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    cipher, nonce = _xchacha_parts(key, nonce24)
    return cipher.encrypt(nonce, plaintext, ad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    cipher, nonce = _xchacha_parts(key, nonce24)
    try:
        return cipher.decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        raise AEADError("authentication failed") from None


def clamp_private_key(private: bytes) -> bytes:
    """`private` as X25519 uses it (RFC 7748 clamping), which is how wireguard-go and the
    kernel store a key they are given, and so how `wg show` reports it."""
    k = bytearray(private)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private_key() -> bytes:
    """A clamped Curve25519 private key, as `wg genkey` makes."""
    return clamp_private_key(os.urandom(32))


def public_key(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = X25519PrivateKey.from_private_bytes(private).public_key()
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(private: bytes, public: bytes) -> bytes | None:
    """X25519; None when the result is all zeros (a low-order public key), which WireGuard
    must reject rather than derive keys from."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError:
        return None
    if not any(shared):
        return None
    return shared


def key_to_base64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def key_from_base64(text: str) -> bytes:
    key = None
    # binascii.Error, or non-ASCII text, whose error carries the text: the key. Ours is raised
    # after that error is gone, not from its handler, where it would become our exception's
    # __context__ (compiled, this module ignores `from None`).
    with contextlib.suppress(ValueError):
        key = base64.b64decode(text.strip(), validate=True)
    if key is None:
        raise KeyFormatError("key is not valid base64")
    if len(key) != KEY_LEN:
        raise KeyFormatError(f"key must decode to 32 bytes, not {len(key)}")
    return key


def key_to_hex(key: bytes) -> str:
    return key.hex()


def key_from_hex(text: str) -> bytes:
    if len(text) != 2 * KEY_LEN:
        raise KeyFormatError(f"key must be 64 hex digits, not {len(text)} characters")
    key = None
    with contextlib.suppress(ValueError):
        key = bytes.fromhex(text)
    # fromhex skips spaces: "00 00 11..." is 64 characters but 31 bytes.
    if key is None or len(key) != KEY_LEN:
        raise KeyFormatError("key is not valid hex")
    return key


def tai64n(unix_seconds: float) -> bytes:
    """TAI64N label: 8-byte BE (2^62 + 10 + seconds) and 4-byte BE nanoseconds.

    Nanoseconds are rounded down to a multiple of 2^24 (~16.8 ms), as wireguard-go does, so the
    timestamp cannot be used to fingerprint the sender's clock precisely; it still increases
    between handshakes because those are at least RekeyTimeout apart.
    """
    secs = int(unix_seconds)
    nanos = int((unix_seconds - secs) * 1e9) & ~0xFFFFFF
    return struct.pack(">QI", (1 << 62) + 10 + secs, nanos)
