"""Per-peer protocol state: configuration, handshake, keypairs, timers, counters."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .cookie import CookieGenerator
from .keypair import Keypairs
from .messages import MAX_STAGED_PACKETS
from .timers import Timers

# Handshake states, as in wireguard-go's noise-protocol.go.
HS_ZEROED: Final = 0
HS_INITIATION_CREATED: Final = 1
HS_INITIATION_CONSUMED: Final = 2
HS_RESPONSE_CREATED: Final = 3
HS_RESPONSE_CONSUMED: Final = 4


class Handshake:
    __slots__ = (
        "chain_key",
        "ephemeral_private",
        "hash",
        "last_initiation_consumption",
        "last_sent",
        "last_timestamp",
        "local_index",
        "remote_ephemeral",
        "remote_index",
        "state",
    )

    def __init__(self) -> None:
        self.state = HS_ZEROED
        self.chain_key = b""
        self.hash = b""
        self.ephemeral_private = b""
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0
        self.last_timestamp = bytes(12)
        self.last_initiation_consumption: float | None = None
        self.last_sent: float | None = None

    def clear(self) -> None:
        """Forgets the session secrets but keeps the replay and flood guards."""
        self.state = HS_ZEROED
        self.chain_key = self.hash = self.ephemeral_private = self.remote_ephemeral = b""
        self.local_index = self.remote_index = 0


class Peer:
    """A configured remote. `endpoint` is opaque to the core: the transport's address object."""

    __slots__ = (
        "cookies",
        "endpoint",
        "handshake",
        "keypairs",
        "last_handshake",
        "preshared_key",
        "public_key",
        "roams",
        "rx_bytes",
        "staged",
        "static_static",
        "timers",
        "tx_bytes",
    )

    def __init__(self, public_key: bytes, jitter: Callable[[], float]) -> None:
        self.public_key = public_key
        self.preshared_key = bytes(32)
        self.endpoint: Any = None
        self.handshake = Handshake()
        self.keypairs = Keypairs()
        self.timers = Timers(jitter)
        self.cookies = CookieGenerator(public_key)
        self.static_static: bytes | None = None
        self.staged: deque[bytes | bytearray | memoryview] = deque(maxlen=MAX_STAGED_PACKETS)
        self.rx_bytes = 0
        # Counted by the device, of what the transport took (engine.SEND): not what was
        # sealed, some of which a transport with no connection drops.
        self.tx_bytes = 0
        # Times the endpoint moved to another one: on a stream transport, each new connection
        # the peer came back on (the listening side's count of its reconnects).
        self.roams = 0
        # `now` of the last completed handshake, in the caller's clock; None if never.
        self.last_handshake: float | None = None

    @property
    def persistent_keepalive(self) -> int:
        return self.timers.persistent_keepalive_interval

    def __repr__(self) -> str:
        from .crypto import key_to_base64

        return f"<Peer {key_to_base64(self.public_key)[:8]}…>"
