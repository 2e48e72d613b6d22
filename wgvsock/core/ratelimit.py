"""Handshake rate limiting, after wireguard-go's flood protection and ratelimiter.

Three independent pieces, all driven by a caller-supplied monotonic ``now`` in seconds:

* PeerInitiationLimiter: at most one consumed initiation per peer per 20 ms.
* SourceRateLimiter: under load, a token bucket per source address (20/s, burst 5).
* LoadTracker: whether the device is "under load", which is what switches on cookie replies
  and the per-source limiter.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final

__all__ = [
    "GC_INTERVAL",
    "HANDSHAKE_INITIATION_RATE",
    "PACKETS_BURSTABLE",
    "PACKETS_PER_SECOND",
    "UNDER_LOAD_AFTER_TIME",
    "LoadTracker",
    "PeerInitiationLimiter",
    "SourceRateLimiter",
]

#: Minimum spacing of initiations consumed from one peer (wireguard-go HandshakeInitationRate).
HANDSHAKE_INITIATION_RATE: Final = 1.0 / 50
#: Sustained handshake packets per second allowed from one source while under load.
PACKETS_PER_SECOND: Final = 20
#: Bucket depth, in packets.
PACKETS_BURSTABLE: Final = 5
#: Idle time after which a source's bucket is forgotten, and the spacing of sweeps for them.
GC_INTERVAL: Final = 1.0
#: How long the device stays under load after the handshake queue was last found busy.
UNDER_LOAD_AFTER_TIME: Final = 1.0

# Tokens are kept in integer nanoseconds, as wireguard-go does, so that the bucket's exact
# comparisons (a full bucket holds exactly PACKETS_BURSTABLE packet costs) do not drift with
# float rounding.
_NS: Final = 1_000_000_000
_PACKET_COST: Final = _NS // PACKETS_PER_SECOND
_MAX_TOKENS: Final = _PACKET_COST * PACKETS_BURSTABLE
_GC_INTERVAL_NS: Final = round(GC_INTERVAL * _NS)


def _to_ns(now: float) -> int:
    return round(now * _NS)


class PeerInitiationLimiter:
    """Flood guard for one peer's handshake initiations.

    As in wireguard-go, an initiation is refused when no more than 20 ms have passed since the
    last one that was consumed (so exactly 20 ms later is still refused). Only allowed
    initiations move the reference point, so a steady flood cannot keep a peer locked out
    beyond one interval after it stops. Call ``allow`` once the initiation has otherwise been
    validated (MACs, decryption, timestamp), since allowing it consumes the slot.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        """Return True and record ``now`` if an initiation may be consumed at ``now``."""
        last = self._last
        if last is not None and now - last <= HANDSHAKE_INITIATION_RATE:
            return False
        self._last = now
        return True

    def reset(self) -> None:
        """Forget the last initiation, e.g. when the peer's keys are replaced."""
        self._last = None


class SourceRateLimiter:
    """Token bucket per source key (an address, or an IPv6 /64, chosen by the caller).

    Behaviour follows wireguard-go's ratelimiter: a new source starts with a full bucket less
    the cost of its first packet, tokens accrue at PACKETS_PER_SECOND up to PACKETS_BURSTABLE
    packets' worth, and a packet passes only if strictly more than one packet's worth of tokens
    is left. So a fresh source gets 4 packets back to back, then one per 50 ms.

    Entries idle for more than GC_INTERVAL are swept, lazily, at most once per GC_INTERVAL of
    ``now``. When ``max_entries`` sources are tracked even after a sweep, packets from new
    sources are refused (the kernel implementation does the same), so a spoofing flood cannot
    grow the table without bound.
    """

    __slots__ = ("_entries", "_last_gc", "max_entries")

    def __init__(self, max_entries: int = 16384) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # key -> [tokens_ns, last_ns]; a list so the hot path updates in place.
        self._entries: dict[Hashable, list[int]] = {}
        self._last_gc: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def allow(self, key: Hashable, now: float) -> bool:
        """Return True if a handshake packet from ``key`` may be processed at ``now``."""
        now_ns = _to_ns(now)
        if self._last_gc is None:
            self._last_gc = now_ns
        elif now_ns - self._last_gc >= _GC_INTERVAL_NS:
            self._collect(now_ns)

        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                # Sweep out of turn before refusing: the table may be full of stale entries.
                self._collect(now_ns)
                if len(self._entries) >= self.max_entries:
                    return False
            self._entries[key] = [_MAX_TOKENS - _PACKET_COST, now_ns]
            return True

        tokens = entry[0]
        if now_ns > entry[1]:
            # Never move `last` backwards: a clock step back must not mint tokens later.
            tokens += now_ns - entry[1]
            entry[1] = now_ns
        if tokens > _MAX_TOKENS:
            tokens = _MAX_TOKENS
        if tokens > _PACKET_COST:
            entry[0] = tokens - _PACKET_COST
            return True
        entry[0] = tokens
        return False

    def _collect(self, now_ns: int) -> None:
        self._last_gc = now_ns
        horizon = now_ns - _GC_INTERVAL_NS
        stale = [key for key, (_, last) in self._entries.items() if last < horizon]
        for key in stale:
            del self._entries[key]

    def clear(self) -> None:
        """Forget every source."""
        self._entries.clear()
        self._last_gc = None


class LoadTracker:
    """Decides whether the device is under load.

    The device is under load while the handshake queue is at least 1/8 full, and for
    UNDER_LOAD_AFTER_TIME after the last time it was seen that full, so that a burst that
    briefly drains the queue does not switch cookies off at once.
    """

    __slots__ = ("_until",)

    def __init__(self) -> None:
        self._until: float | None = None

    def note_queue(self, depth: int, capacity: int, now: float) -> None:
        """Report the handshake queue's ``depth`` out of ``capacity`` at ``now``."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        # depth >= capacity / 8 without the rounding of a float or floor division.
        if depth * 8 >= capacity:
            until = now + UNDER_LOAD_AFTER_TIME
            if self._until is None or until > self._until:
                self._until = until

    def under_load(self, now: float) -> bool:
        """Whether the device counts as under load at ``now``."""
        return self._until is not None and now < self._until
