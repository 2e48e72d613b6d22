"""What the parent refused the enclave lately: destinations and names, for the log and
`wgvsock status`.

The firewall's counters say how many packets were denied or blocked; an operator whose
enclave app cannot reach something needs to know *which* destination, and what to change.
Two sources feed :class:`Refusals`:

* the parent's nftables table logs the first packets of each refusal (a few per second per
  rule, at most) to an nfnetlink_log group that `parent up` reads (services/nflog.py); the
  log prefix says which rule: ``blocked`` (no allow entry), a deny rule's comment (``deny
  10.0.0.0/8``), ``credentials NETWORK`` (the built-in deny of a credential endpoint such
  as IMDS), ``to parent`` (the parent's own ports), ``connection limit`` (a new
  connection over parent.egress.max_connections), ``spoofed`` (a source address that
  is not the enclave's), ``forged`` (an ICMP error about a connection the enclave is not
  party to);
* the DNS forwarder reports each name it answered REFUSED, and why.

Each distinct refusal (kind, destination or name, rule) is kept with a count and when it was
first and last seen; the first sighting is logged once with what to change. Memory is bounded
(:data:`LIMIT` entries of each kind, the least recently seen dropped first), and so is the
log. Each kind has its record and log budget to itself, and the credential endpoints have
theirs apart from other denies: the enclave can have thousands of names refused a second, or
packets to as many destinations blocked, and a flood of one kind must not push out or silence
its try at the metadata service.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ...conn.bind import RateLimitedLog
from ...threads import NamedThread, Survivor
from ..firewall import DNS_PORT
from ..nflog import Flow, NflogSocket, flow

LIMIT = 256  # of each kind (see _bucket)
#: How many `wgvsock status` shows (UAPI keys wgvsock_refused_1 ... _N, newest first).
SHOWN = 8
# Log prefixes of the parent's table (services/firewall.py renders them).
PREFIX_BLOCKED = "blocked"
PREFIX_TO_PARENT = "to parent"
PREFIX_SPOOFED = "spoofed"
PREFIX_CREDENTIALS = "credentials "  # + the endpoint's network
PREFIX_LIMITED = "connection limit"
PREFIX_FORGED = "forged"

log = logging.getLogger("wgvsock.refused")


@dataclass(slots=True)
class Refusal:
    kind: str  # "denied", "blocked", "to-parent", "limited", "spoofed", "forged", "dns"
    what: str  # "tcp 203.0.113.5:5432", "from 10.9.9.9", a DNS name
    rule: str  # the deny rule ("deny 10.0.0.0/8"), the DNS reason, or ""
    count: int
    first: float
    last: float


class Refusals:
    """Thread-safe: the log reader and the DNS forwarder add, `get` on the UAPI reads."""

    def __init__(self, *, limit: int = LIMIT, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self._limit = limit
        self._clock = clock
        # All of them, least recently seen first; and each bucket's keys in the same order,
        # for what to drop when a bucket is full.
        self._entries: OrderedDict[tuple[str, str, str], Refusal] = OrderedDict()
        self._buckets: dict[str, OrderedDict[tuple[str, str, str], None]] = {}
        self._lock = threading.Lock()
        self._log = logger or log
        # A flood of distinct destinations must not flood the log: 20 at once, then 1 a
        # second, for each bucket.
        self._says: dict[str, RateLimitedLog] = {}

    def packet(self, prefix: str, flow: Flow) -> None:
        """A packet the table logged under PREFIX."""
        where = flow.describe()
        if prefix == PREFIX_BLOCKED:
            # Allowing another resolver would let the enclave look up, past the forwarder,
            # names parent.egress does not allow (and carry data out in them).
            dns = (" (port 53 is DNS: with host names in parent.egress, the enclave should "
                   "ask the parent's forwarder, enclave.dns: parent, the default then; "
                   "allowing another resolver lets it look up names parent.egress does not "
                   "allow)") if flow.port == DNS_PORT and flow.protocol in ("tcp", "udp") else ""
            self._add("blocked", where, "", lambda: (
                f"egress blocked: {where} from the enclave matches no parent.egress.allow "
                f"entry; to allow it, add {_allow_entry(flow)} (or its host name) to "
                f"parent.egress.allow and run `wgvsock parent reload`{dns}"))
        elif prefix.startswith(PREFIX_CREDENTIALS):
            self._add("denied", where, prefix, lambda: (
                f"egress denied: {where} from the enclave is a credential endpoint "
                f"({flow.destination}), denied by wgvsock itself whatever "
                "parent.egress.deny says; if the enclave must reach it, add "
                f"{_allow_entry(flow)} to parent.egress.allow (and take it out of "
                "parent.egress.deny if listed there) and run `wgvsock parent reload`"))
        elif prefix.startswith("deny "):
            self._add("denied", where, prefix, lambda: (
                f"egress denied: {where} from the enclave matches parent.egress.deny "
                f"({prefix})"))
        elif prefix == PREFIX_TO_PARENT:
            self._add("to-parent", where, "", lambda: (
                f"enclave to the parent itself blocked: {where} (the parent takes ping and, "
                "with host names in parent.egress, DNS; other ports only where a "
                "parent.egress.allow CIDR entry narrower than 0.0.0.0/0 or ::/0 covers the "
                "address, never for a host name)"))
        elif prefix == PREFIX_LIMITED:
            self._add("limited", where, "", lambda: (
                f"egress over the connection limit: {where} from the enclave was dropped "
                "because the enclave already has parent.egress.max_connections connections "
                "open through the parent and to it; close idle ones in the enclave, or raise "
                "parent.egress.max_connections and run `wgvsock parent reload`"))
        elif prefix == PREFIX_SPOOFED:
            what = f"from {flow.source}"
            self._add("spoofed", what, "", lambda: (
                f"spoofed packet dropped: {flow.protocol} from {flow.source} to "
                f"{flow.destination} came through the tunnel, but {flow.source} is not the "
                "enclave's address (a misconfigured app or route in the enclave)"))
        elif prefix == PREFIX_FORGED:
            self._forged(flow)

    def _forged(self, flow: Flow) -> None:
        # No allow entry lets these through, and none should: conntrack relates an error to
        # whichever connection it quotes, and this one's is the parent host's or that of a
        # host the parent routes for, which it would end or mislead.
        about = flow.quoted
        if about is not None:
            what = f"{flow.protocol} {flow.destination} quoting {about.connection()}"
            head = ("forged ICMP error dropped: the enclave sent an ICMP error about a "
                    f"connection it is not party to ({flow.source} -> {flow.destination}, "
                    f"quoting {about.connection()})")
        else:  # another related packet: a conntrack helper's expected connection
            what = flow.describe()
            head = (f"related packet dropped: the enclave sent {flow.connection()}, which "
                    "conntrack relates to a connection the enclave is not party to")
        self._add("forged", what, "", lambda: (
            f"{head}; it would have ended or misled a connection of the parent host or of a "
            "host the parent routes for. Nothing in the profile lets it through, and nothing "
            "should: unless the enclave's app is meant to send such packets, it usually "
            "means software in the enclave is probing for other hosts' connections or is "
            "misbehaving"))

    def name(self, name: str, why: str) -> None:
        """A DNS query the forwarder answered REFUSED; WHY: "denied", "not allowed", "alias of
        NAME", or "class CH" (only class IN is forwarded)."""
        if why == "not allowed":
            advice = ("no parent.egress.allow entry names it; to allow it, add it and run "
                      "`wgvsock parent reload`")
        elif why == "denied":
            advice = "a parent.egress.deny entry names it"
        elif why.startswith("class "):
            advice = f"a query of {why}; only class IN is forwarded"
        else:
            advice = f"it is an {why}, which parent.egress.deny names"
        self._add("dns", name, why, lambda: f"DNS query refused: {name}: {advice}")

    def _add(self, kind: str, what: str, rule: str, message: Callable[[], str]) -> None:
        now = self._clock()
        key = (kind, what, rule)
        name = _bucket(kind, rule)
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:  # (not setdefault: a flood would make one per refusal)
                bucket = self._buckets[name] = OrderedDict()
            entry = self._entries.get(key)
            if entry is not None:
                entry.count += 1
                entry.last = now
                self._entries.move_to_end(key)
                bucket.move_to_end(key)
                return
            self._entries[key] = Refusal(kind, what, rule, 1, now, now)
            bucket[key] = None
            if len(bucket) > self._limit:
                del self._entries[bucket.popitem(last=False)[0]]
            say = self._says.get(name)
            if say is None:
                say = self._says[name] = RateLimitedLog(1.0, self._log, burst=20,
                                                        clock=self._clock)
        say(logging.WARNING, "%s", message())

    def recent(self, n: int = SHOWN) -> list[Refusal]:
        """The N most recently seen, newest first (copies)."""
        with self._lock:
            out = []
            for entry in reversed(self._entries.values()):
                if len(out) == n:
                    break
                out.append(Refusal(entry.kind, entry.what, entry.rule, entry.count,
                                   entry.first, entry.last))
            return out

    def uapi_keys(self) -> dict[str, str]:
        """``wgvsock_refused_1`` (newest) ... : "KIND COUNT AGE_SECONDS WHAT[; RULE]"."""
        now = self._clock()
        keys = {}
        for i, r in enumerate(self.recent(), 1):
            text = f"{r.kind} {r.count} {max(0, int(now - r.last))} {r.what}"
            if r.rule:
                text += f"; {r.rule}"
            keys[f"wgvsock_refused_{i}"] = text
        return keys


def _bucket(kind: str, rule: str) -> str:
    """Which record and log budget a refusal shares: its kind's, but a credential endpoint
    (IMDS and the like) has its own, which a flood of other denies leaves alone."""
    return "credentials" if kind == "denied" and rule.startswith(PREFIX_CREDENTIALS) else kind


def _allow_entry(flow: Flow) -> str:
    """The narrowest parent.egress.allow entry that lets FLOW through, as the profile spells
    it: ``203.0.113.5/32:5432/tcp``, ``"[2001:db8::1/128]:53/udp"``, ``192.0.2.1/32``."""
    bits = flow.destination.max_prefixlen
    network = f"{flow.destination}/{bits}"
    if flow.protocol in ("tcp", "udp") and flow.port is not None:
        if flow.destination.version == 6:
            return f'"[{network}]:{flow.port}/{flow.protocol}"'
        return f"{network}:{flow.port}/{flow.protocol}"
    return network


class RefusalReader:
    """A thread that reads the table's log group into REFUSALS until closed."""

    def __init__(self, sock: NflogSocket, refusals: Refusals) -> None:
        self.sock = sock
        self.refusals = refusals
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = NamedThread(target=self._run, name="refusals", daemon=True)

    @property
    def group(self) -> int:
        return self.sock.group

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        guard = Survivor("refusal log reader")
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                for logged in self.sock.read():
                    found = flow(logged.packet)
                    if found is not None:
                        self.refusals.packet(logged.prefix, found)
            except Exception as e:
                # Only a diagnosis is lost: never take the tunnel down with it.
                if not guard.survive(e):
                    log.error("the refusal log reader stopped: refused destinations are no "
                              "longer recorded (the firewall still drops them)")
                    return

    def close(self) -> None:
        os.write(self._wake_w, b"\0")
        if self._thread.is_alive():
            self._thread.join(5.0)
            if self._thread.is_alive():  # stuck (in a log handler?): never pull its fds
                log.error("the refusal log reader did not stop; leaving its sockets open")
                return
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
