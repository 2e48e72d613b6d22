"""WireGuard's per-peer timers as a pure state machine (whitepaper §6, wireguard-go timers.go).

Each timer is a deadline (or None). Protocol events arm and disarm them; `expired(now)`
reports which deadlines have passed, disarming them. The peer decides what each expiry means:
this module only keeps time, so it can be tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .messages import (
    KEEPALIVE_TIMEOUT,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEY_MATERIAL_AFTER,
)

RETRANSMIT_HANDSHAKE: Final = "retransmit_handshake"
SEND_KEEPALIVE: Final = "send_keepalive"
NEW_HANDSHAKE: Final = "new_handshake"
ZERO_KEY_MATERIAL: Final = "zero_key_material"
PERSISTENT_KEEPALIVE: Final = "persistent_keepalive"

_ORDER: Final = (
    RETRANSMIT_HANDSHAKE,
    NEW_HANDSHAKE,
    SEND_KEEPALIVE,
    PERSISTENT_KEEPALIVE,
    ZERO_KEY_MATERIAL,
)


class Timers:
    __slots__ = (
        "_jitter",
        "deadlines",
        "handshake_attempts",
        "need_another_keepalive",
        "persistent_keepalive_interval",
        "sent_last_minute_handshake",
    )

    def __init__(self, jitter: Callable[[], float]) -> None:
        self._jitter = jitter
        self.deadlines: dict[str, float | None] = dict.fromkeys(_ORDER)
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.persistent_keepalive_interval = 0

    def pending(self, name: str) -> bool:
        return self.deadlines[name] is not None

    def next_deadline(self) -> float | None:
        armed = [d for d in self.deadlines.values() if d is not None]
        return min(armed) if armed else None

    def expired(self, now: float) -> list[str]:
        fired = []
        for name in _ORDER:
            d = self.deadlines[name]
            if d is not None and d <= now:
                self.deadlines[name] = None
                fired.append(name)
        return fired

    def stop_all(self) -> None:
        for name in _ORDER:
            self.deadlines[name] = None

    # Events, named as in wireguard-go so the two can be read side by side.

    def data_sent(self, now: float) -> None:
        # No reply to our data within Keepalive+Rekey timeout means the session is dead.
        if self.deadlines[NEW_HANDSHAKE] is None:
            self.deadlines[NEW_HANDSHAKE] = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def data_received(self, now: float) -> None:
        if self.deadlines[SEND_KEEPALIVE] is None:
            self.deadlines[SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self) -> None:
        self.deadlines[SEND_KEEPALIVE] = None

    def any_authenticated_packet_received(self) -> None:
        self.deadlines[NEW_HANDSHAKE] = None

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.deadlines[PERSISTENT_KEEPALIVE] = now + self.persistent_keepalive_interval

    # The events of one transport message, in one call each: they run for every packet, where
    # a Python call costs more than the event itself. Each does what its named events do.

    def transport_sent(self, now: float, data: bool) -> None:
        """data_sent (if it carried data), any_authenticated_packet_sent and _traversal."""
        deadlines = self.deadlines
        if data and deadlines[NEW_HANDSHAKE] is None:
            deadlines[NEW_HANDSHAKE] = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
        deadlines[SEND_KEEPALIVE] = None
        if self.persistent_keepalive_interval > 0:
            deadlines[PERSISTENT_KEEPALIVE] = now + self.persistent_keepalive_interval

    def transport_received(self, now: float, data: bool) -> None:
        """any_authenticated_packet_traversal and _received, data_received (if it had data)."""
        deadlines = self.deadlines
        if self.persistent_keepalive_interval > 0:
            deadlines[PERSISTENT_KEEPALIVE] = now + self.persistent_keepalive_interval
        deadlines[NEW_HANDSHAKE] = None
        if data:
            if deadlines[SEND_KEEPALIVE] is None:
                deadlines[SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
            else:
                self.need_another_keepalive = True

    def handshake_initiated(self, now: float) -> None:
        self.deadlines[RETRANSMIT_HANDSHAKE] = now + REKEY_TIMEOUT + self._jitter()

    def handshake_complete(self) -> None:
        self.deadlines[RETRANSMIT_HANDSHAKE] = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.deadlines[ZERO_KEY_MATERIAL] = now + ZERO_KEY_MATERIAL_AFTER

    def rearm_keepalive(self, now: float) -> None:
        self.deadlines[SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT


def random_jitter(rand: Callable[[], float]) -> Callable[[], float]:
    """Jitter in [0, 334 ms) from a uniform [0, 1) source, to desynchronise retries."""
    return lambda: rand() * REKEY_TIMEOUT_JITTER_MAX
