"""The Noise IKpsk2 steps WireGuard's handshake is made of, as pure functions.

They are kept separate from WireGuard's message layout so that the generic Noise known-answer
vector (arbitrary prologue and payloads) exercises exactly the code the handshake uses.
Each function takes the running chaining key `ck` and hash `h` and returns the new ones.
Failures (bad tag, low-order key) raise `HandshakeError`; callers turn that into a drop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .crypto import AEADError, aead_decrypt, aead_encrypt, dh, hash_, kdf1, kdf2, kdf3, public_key

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
ZERO_PSK: Final = bytes(32)


class HandshakeError(Exception):
    pass


class UnknownInitiator(HandshakeError):
    """The initiator's static key decrypted but names no usable peer."""


def _dh(private: bytes, public: bytes) -> bytes:
    shared = dh(private, public)
    if shared is None:
        raise HandshakeError("low-order public key")
    return shared


def _open(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return aead_decrypt(key, 0, ciphertext, ad)
    except AEADError:
        raise HandshakeError("decryption failed") from None


def initial_state(prologue: bytes, responder_static: bytes) -> tuple[bytes, bytes]:
    ck = hash_(CONSTRUCTION)
    h = hash_(hash_(ck, prologue), responder_static)
    return ck, h


def initiator_write(
    ck: bytes, h: bytes, e_priv: bytes, s_priv: bytes, rs_pub: bytes, payload: bytes
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """-> e, es, s, ss. Returns (ck, h, e_pub, encrypted static, encrypted payload)."""
    e_pub = public_key(e_priv)
    ck = kdf1(ck, e_pub)
    h = hash_(h, e_pub)
    ck, k = kdf2(ck, _dh(e_priv, rs_pub))
    enc_static = aead_encrypt(k, 0, public_key(s_priv), h)
    h = hash_(h, enc_static)
    ck, k = kdf2(ck, _dh(s_priv, rs_pub))
    enc_payload = aead_encrypt(k, 0, payload, h)
    h = hash_(h, enc_payload)
    return ck, h, e_pub, enc_static, enc_payload


def responder_read(
    ck: bytes,
    h: bytes,
    s_priv: bytes,
    e_pub: bytes,
    enc_static: bytes,
    enc_payload: bytes,
    static_static: Callable[[bytes], bytes | None] | None = None,
) -> tuple[bytes, bytes, bytes, bytes]:
    """Reads message 1. Returns (ck, h, initiator static public key, payload).

    `static_static` may be a callable mapping the initiator's static key to the precomputed
    DH(s_priv, that key), or to None for a key that is not a peer's (or not a usable one):
    that raises `UnknownInitiator` before the second X25519, as wireguard-go and the kernel
    stop there, so a flood of initiations from unknown keys costs one X25519 each, not two.
    Without it (the generic vector), the DH is computed.
    """
    ck = kdf1(ck, e_pub)
    h = hash_(h, e_pub)
    ck, k = kdf2(ck, _dh(s_priv, e_pub))
    rs_pub = _open(k, enc_static, h)
    h = hash_(h, enc_static)
    if static_static is not None:
        ss = static_static(rs_pub)
        if ss is None:
            raise UnknownInitiator("initiator is not a known peer")
    else:
        ss = _dh(s_priv, rs_pub)
    ck, k = kdf2(ck, ss)
    payload = _open(k, enc_payload, h)
    h = hash_(h, enc_payload)
    return ck, h, rs_pub, payload


def responder_write(
    ck: bytes, h: bytes, e_priv: bytes, re_pub: bytes, rs_pub: bytes, psk: bytes, payload: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """<- e, ee, se, psk. Returns (ck, h, e_pub, encrypted payload)."""
    e_pub = public_key(e_priv)
    ck = kdf1(ck, e_pub)
    h = hash_(h, e_pub)
    ck = kdf1(ck, _dh(e_priv, re_pub))
    ck = kdf1(ck, _dh(e_priv, rs_pub))
    ck, tau, k = kdf3(ck, psk)
    h = hash_(h, tau)
    enc_payload = aead_encrypt(k, 0, payload, h)
    h = hash_(h, enc_payload)
    return ck, h, e_pub, enc_payload


def initiator_read(
    ck: bytes,
    h: bytes,
    e_priv: bytes,
    s_priv: bytes,
    re_pub: bytes,
    psk: bytes,
    enc_payload: bytes,
) -> tuple[bytes, bytes, bytes]:
    """Reads message 2. Returns (ck, h, payload)."""
    ck = kdf1(ck, re_pub)
    h = hash_(h, re_pub)
    ck = kdf1(ck, _dh(e_priv, re_pub))
    ck = kdf1(ck, _dh(s_priv, re_pub))
    ck, tau, k = kdf3(ck, psk)
    h = hash_(h, tau)
    payload = _open(k, enc_payload, h)
    h = hash_(h, enc_payload)
    return ck, h, payload


def split(ck: bytes) -> tuple[bytes, bytes]:
    """Transport keys: (initiator->responder, responder->initiator)."""
    return kdf2(ck, b"")
