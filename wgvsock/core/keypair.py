"""Transport keypairs and the current / previous / next rotation (whitepaper §5.4.6, §6.1)."""

from __future__ import annotations

from .replay import ReplayFilter
from .transport_aead import TransportKey


class Keypair:
    """One direction pair of transport keys from one handshake.

    The transport keys are set up once here, not per packet.
    """

    __slots__ = (
        "created",
        "header",
        "is_initiator",
        "local_index",
        "receive",
        "remote_index",
        "replay",
        "send",
        "send_nonce",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        *,
        is_initiator: bool,
        local_index: int,
        remote_index: int,
        created: float,
    ) -> None:
        self.send = TransportKey(send_key)
        self.receive = TransportKey(receive_key)
        self.send_nonce = 0
        self.replay = ReplayFilter()
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index
        # A transport message's first 8 bytes (type 4, the receiver's index), made once: each
        # message is these, its counter and the ciphertext.
        self.header = b"\x04\x00\x00\x00" + remote_index.to_bytes(4, "little")
        self.created = created


class Keypairs:
    """`current` sends; `next` is the responder's unconfirmed keypair until the initiator
    proves it has it by sending data; `previous` still receives packets in flight."""

    __slots__ = ("current", "next", "previous")

    def __init__(self) -> None:
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

    def all(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Adds a freshly derived keypair; returns the ones that are no longer usable."""
        dropped = []
        if keypair.is_initiator:
            if self.next is not None:
                # We initiated over the top of an unconfirmed responder keypair: that one is
                # kept as previous so packets already sent with it still open.
                if self.current is not None:
                    dropped.append(self.current)
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.next
                self.next = None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                dropped.append(self.next)
            if self.previous is not None:
                dropped.append(self.previous)
            self.next = keypair
            self.previous = None
        return dropped

    def confirm(self, keypair: Keypair) -> list[Keypair] | None:
        """Called when data opens with `keypair`. If it was `next`, it becomes current (the
        responder's key confirmation) and the displaced keypairs are returned; else None."""
        if self.next is not keypair:
            return None
        dropped = [self.previous] if self.previous is not None else []
        self.previous = self.current
        self.current = keypair
        self.next = None
        return dropped

    def clear(self) -> list[Keypair]:
        dropped = self.all()
        self.current = self.previous = self.next = None
        return dropped
