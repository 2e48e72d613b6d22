"""The parent's counters beside the device's: the firewall's (nftables) and the DNS forwarder's.

Three readers share them: the device's UAPI ``get`` (read-only ``wgvsock_*`` keys that `wg`
ignores and `wgvsock status` shows), the Prometheus collector and the CloudWatch sender.
Reading nftables runs ``nft``, so a reading is kept for a second: a dashboard refreshing every
second, a scrape and a `wg show` at the same moment cost one run together.

The DNS forwarder (a later part of the parent) plugs in as a callable returning
:class:`DnsCounters`; until one exists the DNS numbers are absent everywhere (no UAPI keys, no
Prometheus series, null in `status --json`), rather than zeros that would claim a forwarder
answered nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .. import firewall
from ..firewall import Counter

log = logging.getLogger("wgvsock.metrics")

#: How long one nft reading is reused.
CACHE_SECONDS = 1.0


#: The table's named counters (firewall.COUNTERS) that make each egress verdict.
EGRESS_VERDICTS: dict[str, tuple[str, ...]] = {
    "allowed": ("egress_allowed",),
    "denied": ("egress_denied",),
    "blocked": ("egress_blocked", "local_blocked"),
    "limited": ("egress_limited",),
}


class DnsCounters(NamedTuple):
    queries: int  # queries the forwarder received from the enclave
    refused: int  # answered REFUSED: a denied name or one that no allow entry names


DnsSource = Callable[[], "DnsCounters | None"]


@dataclass(frozen=True)
class Reading:
    firewall: dict[str, Counter] | None  # None: nft could not be read (see error)
    dns: DnsCounters | None  # None: no DNS forwarder runs
    error: str | None = None

    def egress(self) -> dict[str, int] | None:
        """Packets per verdict: allowed, denied (a deny entry matched), blocked (no allow entry
        matched, towards the internet or the parent itself), limited (a new connection over
        parent.egress.max_connections). Each counts the first packet of a new flow, and every
        packet of a dropped one (a drop leaves no conntrack entry)."""
        if self.firewall is None:
            return None
        c = self.firewall
        zero = Counter(0, 0)
        return {verdict: sum(c.get(n, zero).packets for n in names)
                for verdict, names in EGRESS_VERDICTS.items()}

    def egress_counted(self) -> dict[str, int] | None:
        """egress() without the verdicts none of whose counters the table has: a number
        nobody counted, where a person reads it, is not 0 but unknown."""
        egress = self.egress()
        if egress is None or self.firewall is None:
            return egress
        return {verdict: n for verdict, n in egress.items()
                if any(name in self.firewall for name in EGRESS_VERDICTS[verdict])}

    def rules(self) -> dict[str, Counter]:
        """Each allow/deny entry's own counter, under the rule's nft comment ("deny 10.0.0.0/8")."""
        if self.firewall is None:
            return {}
        return {k: v for k, v in self.firewall.items() if k.startswith(("allow ", "deny "))}


class Monotonic:
    """Firewall counters that never go back. The table is replaced on `parent reload` with the
    counters' values carried over, but they are read just before the new table is loaded, so a
    reading taken in between is a little higher than what the new table starts from; and a
    table put back after `nft flush ruleset` starts from zero. Prometheus takes any decrease
    for a restart and counts the whole value again (a spike in rate()), so each counter keeps
    an offset: what it lost when it went down."""

    def __init__(self) -> None:
        self._last: dict[str, Counter] = {}  # as nft last said, by name
        self._offset: dict[str, Counter] = {}

    def __call__(self, raw: dict[str, Counter]) -> dict[str, Counter]:
        out = {}
        for name, c in raw.items():
            last = self._last.get(name)
            off = self._offset.get(name)
            if last is not None and (c.packets < last.packets or c.bytes < last.bytes):
                base = off or Counter(0, 0)
                off = self._offset[name] = Counter(
                    base.packets + max(0, last.packets - c.packets),
                    base.bytes + max(0, last.bytes - c.bytes))
            self._last[name] = c
            out[name] = c if off is None else Counter(c.packets + off.packets,
                                                      c.bytes + off.bytes)
        return out


class ParentCounters:
    """Cached readings of profile NAME's nftables table and of its DNS forwarder."""

    def __init__(self, name: str, *, dns: DnsSource | None = None, netns: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.dns = dns
        self.netns = netns
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Reading] | None = None
        self._logged_error: str | None = None
        self._monotonic = Monotonic()

    def read(self) -> Reading:
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            reading = self._read()
            self._cached = (now, reading)
            return reading

    def _read(self) -> Reading:
        error = None
        try:
            counters: dict[str, Counter] | None = self._monotonic(
                firewall.read_counters(self.name, self.netns))
        except (firewall.FirewallError, OSError, ValueError) as e:
            counters, error = None, str(e)
            if error != self._logged_error:  # once per distinct failure, not every second
                log.warning("cannot read the firewall counters of %s: %s", self.name, error)
        self._logged_error = error
        dns = None
        if self.dns is not None:
            try:
                dns = self.dns()
            except Exception as e:  # a forwarder bug must not break `wg show` or a scrape
                log.warning("cannot read the DNS forwarder's counters: %s", e)
        return Reading(counters, dns, error)

    def uapi_keys(self) -> dict[str, str]:
        """The read-only device keys of `get`: wgvsock_egress_{allowed,denied,blocked,limited}
        (each only when the table has its counters), or wgvsock_egress_error when the table
        could not be read, and, with a forwarder, wgvsock_dns_{queries,refused}."""
        r = self.read()
        keys = {f"wgvsock_egress_{k}": str(v) for k, v in (r.egress_counted() or {}).items()}
        if r.firewall is None and r.error:
            # Else the dashboard's egress line went missing without a word. One line without
            # NULs, or the device refuses the whole `get`; nft's lines after its first only
            # point (^^^) at the command.
            first = (r.error.splitlines() or [""])[0].replace("\0", " ")
            keys["wgvsock_egress_error"] = " ".join(first.split())[:400] or "unknown error"
        if r.dns is not None:
            keys["wgvsock_dns_queries"] = str(r.dns.queries)
            keys["wgvsock_dns_refused"] = str(r.dns.refused)
        return keys
