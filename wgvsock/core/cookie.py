"""MAC1/MAC2 and cookie replies (whitepaper §5.4.4, §5.4.7).

The responder's side (`CookieChecker`) validates MACs and answers with encrypted cookies when
under load; the initiator's side (`CookieGenerator`, one per peer) stamps outgoing handshake
messages and consumes cookie replies. Time comes in as `now`; randomness through `rng`.
"""

from __future__ import annotations

import hmac as _hmac
import struct
from collections.abc import Callable

from .crypto import AEADError, hash_, mac, xaead_decrypt, xaead_encrypt
from .messages import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    TYPE_COOKIE_REPLY,
)


class CookieChecker:
    """Our own MAC1 key and rotating cookie secret, keyed by our static public key."""

    def __init__(self, public_key: bytes, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self.mac1_key = hash_(LABEL_MAC1, public_key)
        self.cookie_key = hash_(LABEL_COOKIE, public_key)
        self._secret = b""
        self._secret_set: float | None = None

    def check_mac1(self, msg: bytes) -> bool:
        expected = mac(self.mac1_key, msg[:-32])
        return _hmac.compare_digest(expected, msg[-32:-16])

    def _cookie(self, src: bytes, now: float, refresh: bool) -> bytes | None:
        if self._secret_set is None or now - self._secret_set >= COOKIE_REFRESH_TIME:
            if not refresh:
                return None
            self._secret = self._rng(32)
            self._secret_set = now
        return mac(self._secret, src)

    def check_mac2(self, msg: bytes, src: bytes, now: float) -> bool:
        cookie = self._cookie(src, now, refresh=False)
        if cookie is None:
            return False
        return _hmac.compare_digest(mac(cookie, msg[:-16]), msg[-16:])

    def create_reply(self, msg: bytes, receiver_index: int, src: bytes, now: float) -> bytes:
        cookie = self._cookie(src, now, refresh=True)
        assert cookie is not None
        nonce = self._rng(24)
        sealed = xaead_encrypt(self.cookie_key, nonce, cookie, msg[-32:-16])
        return TYPE_COOKIE_REPLY + struct.pack("<I", receiver_index) + nonce + sealed


class CookieGenerator:
    """Per-peer state for the MACs we put on handshake messages sent to that peer."""

    __slots__ = ("_cookie", "_cookie_set", "_last_mac1", "cookie_key", "mac1_key")

    def __init__(self, peer_public_key: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1, peer_public_key)
        self.cookie_key = hash_(LABEL_COOKIE, peer_public_key)
        self._cookie: bytes | None = None
        self._cookie_set = 0.0
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, now: float) -> None:
        mac1 = mac(self.mac1_key, bytes(msg[:-32]))
        msg[-32:-16] = mac1
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_set < COOKIE_REFRESH_TIME:
            msg[-16:] = mac(self._cookie, bytes(msg[:-16]))
        else:
            msg[-16:] = bytes(16)

    def consume_reply(self, msg: bytes, now: float) -> bool:
        """Accepts a cookie reply for the last message we sent; False when it does not open."""
        if self._last_mac1 is None or len(msg) != COOKIE_REPLY_SIZE:
            return False
        try:
            cookie = xaead_decrypt(self.cookie_key, msg[8:32], msg[32:64], self._last_mac1)
        except AEADError:
            return False
        self._cookie = cookie
        self._cookie_set = now
        # One reply per message: a second, replayed reply must not reset the clock.
        self._last_mac1 = None
        return True

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None
