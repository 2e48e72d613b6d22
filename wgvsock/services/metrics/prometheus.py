"""Prometheus text for one running parent, on ``parent.metrics.listen``.

A custom collector reads the live state in-process: the device's peers (what `wg show dump`
prints, from the same ``get``), the attestation verdict, and the firewall and DNS counters
(:mod:`.counters`). Nothing is kept from one collection to the next, so a replaced peer simply
disappears from the next one. A collection runs on the parent's own Python threads, beside the
tunnel's, so the exporter runs at most one a second (MAX_AGE) and serves the page it rendered
to every request in between: a flood of scrapes costs one collection a second and the sends.

Per-peer names are prometheus_wireguard_exporter's (``wireguard_sent_bytes_total``,
``wireguard_received_bytes_total``, ``wireguard_latest_handshake_seconds``, labels
``interface``, ``public_key``, ``allowed_ips``) so that its dashboards work as they are; the
rest carry the ``wgvsock_`` prefix.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from ...conn.bind import RateLimitedLog
from ...core.crypto import key_to_base64
from ...threads import NamedThread
from ..control import ATTESTATION_STATES
from ..firewall import COUNTERS, rule_comment
from .counters import ParentCounters

log = logging.getLogger("wgvsock.metrics")

#: The states of ``wgvsock_peer_connection_state``: the stream transport's link to the peer.
CONNECTION_STATES = ("connected", "stalled", "dialing", "backoff", "none")


class ParentLike(Protocol):
    """What the collector reads from roles.parent.Parent."""

    profile: Any
    device: Any
    enclave_key: bytes | None
    verdict: Any
    counters: ParentCounters | None
    control: Any  # (optional: a ControlServer, or None before `up` starts one)


# The stream transport's connection counts (its status()), as counters.
_TRANSPORT_CONNECTIONS = (
    ("accepted", "Stream connections the transport accepted; on the parent, each time the "
                 "enclave (re)connects"),
    ("refused", "Stream connections the transport closed as it accepted them: on the parent "
                "over vsock, those from a CID that is not the enclave's"),
)


class ParentCollector(Collector):
    def __init__(self, parent: ParentLike) -> None:
        self.parent = parent

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: registering must not run a collection (and nft).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._peers()
        yield from self._profile()
        yield from self._control()

    def _peers(self) -> Iterator[Metric]:
        device = self.parent.device
        if device is None:
            return
        status = device.uapi_get()
        ifname = device.ifname
        wg_labels = ["interface", "public_key", "allowed_ips"]
        sent = CounterMetricFamily("wireguard_sent_bytes_total", "Bytes sent to the peer",
                                   labels=wg_labels)
        received = CounterMetricFamily("wireguard_received_bytes_total",
                                       "Bytes received from the peer", labels=wg_labels)
        handshake = GaugeMetricFamily(
            "wireguard_latest_handshake_seconds",
            "Unix time of the latest completed handshake with the peer (0: never)",
            labels=wg_labels)
        peer_labels = ["interface", "public_key"]
        state = GaugeMetricFamily(
            "wgvsock_peer_connection_state",
            "1 for the stream transport's current state of its link to the peer "
            f"({', '.join(CONNECTION_STATES)}), 0 for the others",
            labels=[*peer_labels, "state"])
        reconnects = CounterMetricFamily(
            "wgvsock_peer_reconnects_total",
            "Times the link to the peer was dialled again after it broke (the dialling side)",
            labels=peer_labels)
        attested = GaugeMetricFamily(
            "wgvsock_peer_attested",
            "1 when the enclave's attestation document was verified and the profile pins its "
            "image (PCR0), 0 otherwise (wgvsock_peer_attestation_state says what it is)",
            labels=peer_labels)
        attestation = GaugeMetricFamily(
            "wgvsock_peer_attestation_state",
            "1 for what the parent's verdict on the enclave amounts to, 0 for the others: "
            "attested (the pinned image), genuine (a genuine Nitro enclave, no PCR0 pinned: "
            "any image), debug (a debug-mode enclave allow_debug let in), unattested",
            labels=[*peer_labels, "state"])
        verdict, enclave_key = self.parent.verdict, self.parent.enclave_key
        for p in status.peers:
            key = key_to_base64(p.public_key)
            labels = [ifname, key, ",".join(str(ip) for ip in p.allowed_ips)]
            sent.add_metric(labels, p.tx_bytes)
            received.add_metric(labels, p.rx_bytes)
            # Whole seconds, as `wg show dump` and the exporter print them.
            handshake.add_metric(labels, p.last_handshake_time_sec)
            conn = p.extra.get("wgvsock_conn")
            if conn is not None:
                for s in CONNECTION_STATES:
                    state.add_metric([ifname, key, s], 1 if conn == s else 0)
            count = p.extra.get("wgvsock_reconnects", "")
            if count.isdigit():
                reconnects.add_metric([ifname, key], int(count))
            if verdict is not None and p.public_key == enclave_key:
                now = verdict.state
                attested.add_metric([ifname, key], 1 if now == "attested" else 0)
                for s in ATTESTATION_STATES:
                    attestation.add_metric([ifname, key, s], 1 if now == s else 0)
        yield from (sent, received, handshake, state, reconnects, attested, attestation)
        transport = device.bind.status()
        for key, help_text in _TRANSPORT_CONNECTIONS:
            count = transport.get(key)
            if count is not None:
                c = CounterMetricFamily(f"wgvsock_transport_{key}_connections_total",
                                        help_text, labels=["interface"])
                c.add_metric([ifname], count)
                yield c

    def _profile(self) -> Iterator[Metric]:
        counters = self.parent.counters
        if counters is None:
            return
        reading = counters.read()
        name = self.parent.profile.name
        egress = reading.egress()
        if egress is not None:
            e = CounterMetricFamily(
                "wgvsock_egress_packets_total",
                "Enclave packets judged by the egress policy, by verdict: allowed, denied (a "
                "deny entry matched), blocked (no allow entry matched), limited (over "
                "parent.egress.max_connections). The first packet of "
                "each allowed flow; every packet of a dropped one", labels=["profile", "verdict"])
            for verdict, packets in egress.items():
                e.add_metric([name, verdict], packets)
            yield e
            rules = CounterMetricFamily(
                "wgvsock_egress_rule_packets_total",
                "Packets that matched each allow/deny entry of the profile",
                labels=["profile", "action", "rule"])
            # A long name rule's nft comment is cut (firewall.rule_comment): label it whole.
            whole = {rule_comment(f"allow {r}"): f"allow {r}"
                     for r in self.parent.profile.parent.egress.allow_names}
            for comment, c in reading.rules().items():
                action, _, rule = whole.get(comment, comment).partition(" ")
                rules.add_metric([name, action, rule], c.packets)
            yield rules
            fw = CounterMetricFamily(
                "wgvsock_firewall_packets_total",
                "The profile's named nftables counters (see wgvsock.services.firewall.COUNTERS)",
                labels=["profile", "counter"])
            named = reading.firewall or {}
            for counter in COUNTERS:
                if counter in named:
                    fw.add_metric([name, counter], named[counter].packets)
            yield fw
        if reading.dns is not None:
            q = CounterMetricFamily("wgvsock_dns_queries_total",
                                    "Queries the DNS forwarder received from the enclave",
                                    labels=["profile"])
            q.add_metric([name], reading.dns.queries)
            r = CounterMetricFamily("wgvsock_dns_refused_total",
                                    "Names the DNS forwarder refused (denied or not allowed)",
                                    labels=["profile"])
            r.add_metric([name], reading.dns.refused)
            yield q
            yield r

    def _control(self) -> Iterator[Metric]:
        # (getattr: the parent has no control port before `up` starts one, nor do the
        # collector's stand-ins in tests that read the other series.)
        control = getattr(self.parent, "control", None)
        if control is None:
            return
        c = CounterMetricFamily(
            "wgvsock_control_refused_connections_total",
            "Connections the control port closed before their exchange: over vsock, those "
            "from a CID that is not the enclave's; also those over its limits (connections "
            "open, registrations in progress from one peer) and those a failing admission "
            "check refused", labels=["profile"])
        c.add_metric([self.parent.profile.name], control.refused_connections)
        yield c
        r = CounterMetricFamily(
            "wgvsock_control_registrations_total",
            "Registrations the control port accepted, the enclave's key installed: each start "
            "of the enclave, and each time it registered again (its control connection "
            "dropped)", labels=["profile"])
        r.add_metric([self.parent.profile.name], control.registrations)
        yield r
        f = CounterMetricFamily(
            "wgvsock_control_refused_registrations_total",
            "Registrations the control port refused, by reason: verdict (the attestation "
            "policy, a nonce not this connection's, a verifier error, a reloaded policy), "
            "throttled (too many from one peer), version (no control protocol version both "
            "sides speak)", labels=["profile", "reason"])
        # Every reason, 0 until it happens: a rate over the series is then there from the
        # start, not from the first refusal of its kind.
        for reason, count in dict(control.refused_registrations).items():
            f.add_metric([self.parent.profile.name, reason], count)
        yield f


class _Registry(CollectorRegistry):
    """A registry whose `?name[]=NAME` restriction (the federation convention that
    prometheus_client's app honours) works for a collector that describes nothing up front:
    prometheus_client picks the collectors to run by the names they describe, so for ours
    (see ParentCollector.describe) it ran none and served an empty page."""

    def restricted_registry(self, names: Iterable[str]) -> _Restricted:  # type: ignore[override]
        return _Restricted(self, set(names))


class _Restricted:
    """The families of REGISTRY that NAMES name: by the family's name (OpenMetrics', without
    a counter's `_total`) all of it, by a sample's name (as the text format prints it, with
    `_total`) its samples of that name; HELP and TYPE either way."""

    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name in self._names:
                yield family
                continue
            samples = [s for s in family.samples if s.name in self._names]
            if samples:
                part = Metric(family.name, family.documentation, family.type, family.unit)
                part.samples = samples
                yield part


def registry_for(parent: ParentLike) -> CollectorRegistry:
    """A registry of this parent alone (no process or GC metrics of the global one)."""
    registry = _Registry(auto_describe=False)
    registry.register(ParentCollector(parent))
    return registry


# Connections served at once. A scrape sends its request at once; a connection that has not
# sent a whole request head within HEAD_TIMEOUT is closed, and when every slot is taken the
# one that has waited longest for its head makes room for the newcomer. Idle or slow clients
# therefore cost at most this many threads and cannot keep a scrape out.
MAX_CONNECTIONS = 8
HEAD_TIMEOUT = 2.0
WRITE_TIMEOUT = 10.0  # each send of the response, to a client that stopped reading
_MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Limit:
    """A token bucket of connections: `burst` at once, then `rate` a second."""

    rate: float
    burst: int


# Connections accepted, from all clients together and from one source (_source). Prometheus
# scrapes every 5-60 s, so a few scrapers are far below either; a client looping on /metrics
# is not, and each request it got served cost the parent ~0.7 ms of CPU (wsgiref and a
# thread), taken from the tunnel's threads (same process, one GIL). Beyond the limit a
# connection is answered a fixed 429 as it is accepted: no thread, nothing parsed, nothing
# collected. The per-source bucket keeps one flooding address from using up the overall one,
# so the scrapers at other addresses are still served.
LIMIT = Limit(rate=20.0, burst=40)
SOURCE_LIMIT = Limit(rate=5.0, burst=20)
MAX_SOURCES = 256  # sources remembered; the least recently seen is forgotten (a full bucket)
# Refusals, too, cost the accepting thread (~0.05 ms each: accept, send, close), and a client
# refused at once loops faster: 8 looping clients made ~4000 a second, 20 % of a core.
# Beyond this rate the accepting thread waits before taking the next connection, and a flood
# waits in the kernel's accept queue (request_queue_size) instead of on the parent's CPU; a
# scrape that queues behind it is taken within request_queue_size / rate seconds.
REFUSALS = Limit(rate=200.0, burst=200)


_LOOPBACK = b""  # (the other keys are 4 or 8 bytes long)


def _source(host: str) -> bytes:
    """Whom a connection from HOST counts against: its IPv4 address, its IPv6 /64 (what one
    host or LAN is given), and loopback (127.0.0.0/8 and ::1) as one source, since any local
    user can pick any of its addresses."""
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if packed[:12] != bytes(10) + b"\xff\xff":
                return _LOOPBACK if packed == bytes(15) + b"\x01" else packed[:8]
            packed = packed[12:]  # an IPv4 client of a dual-stack socket
        else:
            packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:  # (no address of a family we listen on: cannot be, but one key for all)
        return b"?"
    return _LOOPBACK if packed[0] == 127 else packed


class _Limiter:
    """The buckets of LIMIT, SOURCE_LIMIT and REFUSALS. Used by the accepting thread alone."""

    def __init__(self, overall: Limit, source: Limit, clock: Callable[[], float],
                 refusals: Limit = REFUSALS) -> None:
        self._overall = overall
        self._source = source
        self._refusals = refusals
        self._clock = clock
        self._tokens = float(overall.burst)
        self._last = clock()
        self._sources: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # tokens, when
        self._refusal_tokens = float(refusals.burst)
        self._refusal_last = self._last

    def admit(self, host: str) -> bool:
        """Whether a connection from HOST is within both limits; if so, it is counted."""
        now = self._clock()
        tokens = min(self._overall.burst,
                     self._tokens + (now - self._last) * self._overall.rate)
        self._last = now
        key = _source(host)
        seen = self._sources.pop(key, None)
        mine = float(self._source.burst) if seen is None else min(
            self._source.burst, seen[0] + (now - seen[1]) * self._source.rate)
        admitted = tokens >= 1.0 and mine >= 1.0
        if admitted:  # (a refused connection takes from neither)
            tokens -= 1.0
            mine -= 1.0
        self._tokens = tokens
        self._sources[key] = (mine, now)
        if len(self._sources) > MAX_SOURCES:
            self._sources.popitem(last=False)
        return admitted

    def pause(self) -> float:
        """Seconds to wait after a refusal before accepting again: none within the refusals'
        burst, then until their bucket has a token again (at most 1 / its rate)."""
        now = self._clock()
        rate = self._refusals.rate
        tokens = min(self._refusals.burst,
                     self._refusal_tokens + (now - self._refusal_last) * rate)
        if tokens >= 1.0:
            self._refusal_tokens, self._refusal_last = tokens - 1.0, now
            return 0.0
        wait = (1.0 - max(tokens, 0.0)) / rate
        # The token that comes in the wait is this refusal's.
        self._refusal_tokens, self._refusal_last = 0.0, now + wait
        return wait


def _too_many(overall: Limit, source: Limit) -> bytes:
    """The whole answer to a connection over the limit, sent as it is accepted."""
    body = (f"too many requests: this endpoint accepts {overall.rate:g} connections a second, "
            f"{source.rate:g} from one address; try again later\n").encode()
    return (b"HTTP/1.0 429 Too Many Requests\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Retry-After: 1\r\n"
            b"Connection: close\r\n\r\n" % len(body)) + body


_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _guarded(app: _WSGIApp, say: RateLimitedLog) -> _WSGIApp:
    """`app` with its exceptions answered (400 for an Accept header prometheus_client cannot
    parse, 500 otherwise) and logged rate-limited. Left to wsgiref, each became a traceback on
    raw stderr: past logging and the journal's priority prefix, and anyone who reaches the port
    could fill the journal until journald's rate limit dropped the real warnings."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except Exception:
            accept = environ.get("HTTP_ACCEPT") or ""
            try:
                choose_encoder(accept)
            except Exception:  # (TypeError for `version=x`): the client's mistake, not ours
                say(logging.DEBUG, "metrics: refused a scrape with an Accept header "
                    "prometheus_client cannot parse: %r", accept[:200])
                status, body = "400 Bad Request", b"unparseable Accept header\n"
            else:
                say(logging.WARNING, "metrics: a collection failed", exc_info=True)
                status, body = "500 Internal Server Error", b"collection failed\n"
            # exc_info: should the app have started its response, wsgiref raises it again
            # (and our stderr below takes the traceback) instead of sending a second head.
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body)))], sys.exc_info())
            return [body]

    return guarded


class _StderrToLog(io.TextIOBase):
    """The stderr wsgiref's handler prints a traceback to for an error of its own (a send
    that timed out on a client that stopped reading): one rate-limited debug line instead,
    its last, since raw stderr bypasses logging and anyone can make a client stop reading."""

    def __init__(self, say: RateLimitedLog, client: Any) -> None:
        super().__init__()
        self._say = say
        self._client = client
        self._text: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._text.append(s)
        return len(s)

    def flush(self) -> None:
        text, self._text = "".join(self._text).strip(), []
        if text:
            self._say(logging.DEBUG, "metrics: a request from %s failed: %s", self._client,
                      text.splitlines()[-1])


class _Handler(WSGIRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        # The request head, read against one deadline (a per-read timeout lets a client that
        # sends a byte now and then hold its thread for good); the handler parses it from
        # memory. Nothing whole in time: an empty head, which the handler takes as a close.
        self.rfile = io.BytesIO(self.server.read_head(self.connection))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line on stderr per scrape: the journal is not an access log

    def get_stderr(self) -> io.TextIOBase:
        return _StderrToLog(self.server.say, self.client_address)


class _Server(WSGIServer):
    """wsgiref's server with a thread per connection, as prometheus_client's, but at most
    `slots` of them (prometheus_client's own started a thread for every connection and let
    an idle one wait forever, so idle connections could take every thread there is)."""

    request_queue_size = 64  # (5 in socketserver: a burst of connections had SYNs dropped)

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, slots: int,
                 head_timeout: float, limiter: _Limiter, too_many: bytes) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(slots)
        self._head_timeout = head_timeout
        self._limiter = limiter
        self._too_many = too_many
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # no whole head yet: since when
        self.evicted = 0  # connections closed to make room for a newer one
        self.refused = 0  # connections answered 429 at once: over the limiter's rate
        # Every failed request's line, shared by the handlers' threads: a client decides how
        # many there are.
        self.say = RateLimitedLog(10.0, logger=log, burst=5)
        self._say_refused = RateLimitedLog(60.0, logger=log)
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Runs on the accepting thread, before any thread is started for the connection;
        # refused, socketserver closes it (shutdown_request) right after.
        if self._limiter.admit(client_address[0]):
            return True
        self.refused += 1
        # The request, if it has come: closing a socket with unread data sends a reset,
        # which can make the client drop the answer before reading it.
        with contextlib.suppress(OSError):
            request.recv(_MAX_HEAD, socket.MSG_DONTWAIT)
        # A new connection's send buffer is empty: this fits, and never blocks.
        with contextlib.suppress(OSError):
            request.send(self._too_many, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        self._say_refused(logging.WARNING, "metrics: answered a connection from %s with 429 "
                          "Too Many Requests: over the endpoint's rate limit (%d so far)",
                          client_address[0], self.refused)
        wait = self._limiter.pause()
        if wait > 0:
            time.sleep(wait)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict_oldest()
            # Its thread sees the shutdown at once and gives its slot back.
            if not self._slots.acquire(timeout=1.0):
                self.shutdown_request(request)
                return
        with self._lock:
            self._waiting[request] = time.monotonic()
        try:
            NamedThread(target=self._serve, args=(request, client_address),
                        name="metrics-http", daemon=True).start()
        except BaseException:
            self._done(request)
            raise

    def _evict_oldest(self) -> None:
        with self._lock:
            if not self._waiting:
                return  # every slot is writing a response: the newcomer waits for one
            oldest = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[oldest]
            self.evicted += 1
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)

    def read_head(self, conn: socket.socket) -> bytes:
        deadline = time.monotonic() + self._head_timeout
        head = bytearray()
        try:
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                left = deadline - time.monotonic()
                if left <= 0 or len(head) > _MAX_HEAD:
                    return b""
                conn.settimeout(left)
                chunk = conn.recv(4096)
                if not chunk:
                    return b""
                head += chunk
        except OSError:  # timed out, or shut down to make room
            return b""
        finally:
            with self._lock:
                self._waiting.pop(conn, None)
        conn.settimeout(WRITE_TIMEOUT)
        return bytes(head)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a client that went away or stopped reading: nothing to report
            self.say(logging.DEBUG, "metrics: a request from %s failed", client_address,
                     exc_info=True)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(request, None)
        self.shutdown_request(request)
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)


#: How long a rendered page is served, counted from the collection it shows.
MAX_AGE = 1.0
#: Distinct pages kept (each Accept, Accept-Encoding and `name[]` filter renders its own).
MAX_PAGES = 16


class CollectionFailed(Exception):
    """The collection of the last MAX_AGE failed; the one that did is its __cause__."""


class _Snapshot:
    """The families of one collection, rendered as a registry would be."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

    def restricted_registry(self, names: Iterable[str]) -> _Restricted:
        return _Restricted(self, set(names))


_Key = tuple[str, bool, frozenset[str] | None]  # content type, gzip, the name[] filter


class _Pages:
    """REGISTRY's pages, each rendered once from the latest collection and served until that
    collection is MAX_AGE old. One thread collects or renders at a time; the requests that
    arrive meanwhile wait for it and are answered with its page (prometheus_client collected
    for every request, up to one per connection at once)."""

    def __init__(self, registry: Collector, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._collected: tuple[float, _Snapshot | Exception] | None = None
        self._pages: OrderedDict[_Key, tuple[float, list[tuple[str, str]], bytes]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._pages)

    def page(self, accept: str | None, accept_encoding: str | None,
             names: frozenset[str] | None) -> tuple[list[tuple[str, str]], bytes]:
        # (Raises for an Accept header it cannot parse: the caller answers 400.)
        encoder, content_type = choose_encoder(accept or "")
        zipped = gzip_accepted(accept_encoding or "")
        key = (content_type, zipped, names)
        with self._lock:
            now = self._clock()
            for k in [k for k, (when, _, _) in self._pages.items()
                      if now - when >= self._max_age]:
                del self._pages[k]
            hit = self._pages.get(key)
            if hit is None:
                when, snapshot = self._snapshot(now)
                source: Any = snapshot if names is None else snapshot.restricted_registry(names)
                output = encoder(source)
                headers = [("Content-Type", content_type)]
                if zipped:
                    output = gzip.compress(output)
                    headers.append(("Content-Encoding", "gzip"))
                hit = self._pages[key] = (when, headers, output)
                while len(self._pages) > MAX_PAGES:
                    self._pages.popitem(last=False)
        _, headers, output = hit
        return list(headers), output  # (wsgiref adds Content-Length to the list it is given)

    def _snapshot(self, now: float) -> tuple[float, _Snapshot]:
        if self._collected is None or now - self._collected[0] >= self._max_age:
            try:
                self._collected = (now, _Snapshot(list(self._registry.collect())))
            except Exception as e:  # answered 500 until the next collection is due
                self._collected = (now, e)
                raise
        when, got = self._collected
        if isinstance(got, Exception):
            raise CollectionFailed("the collection failed") from got
        return when, got


class _WithOwn:
    """REGISTRY's families and the exporter's own."""

    def __init__(self, registry: Collector, server: _Server) -> None:
        self._registry = registry
        self._server = server

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        refused = CounterMetricFamily(
            "wgvsock_metrics_refused_connections_total",
            "Connections to this endpoint answered 429 Too Many Requests as they were "
            "accepted: over its rate limit")
        refused.add_metric([], self._server.refused)
        yield refused


def _app(pages: _Pages, registry: Collector) -> _WSGIApp:
    """prometheus_client's app with GET's page from PAGES. Its other answers (405 for any
    method but GET and OPTIONS, HEAD included; the empty favicon) collect nothing."""
    theirs = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "GET" or environ["PATH_INFO"] == "/favicon.ico":
            return theirs(environ, start_response)  # type: ignore[no-any-return]
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        headers, output = pages.page(environ.get("HTTP_ACCEPT"),
                                     environ.get("HTTP_ACCEPT_ENCODING"),
                                     None if names is None else frozenset(names))
        start_response("200 OK", headers)
        return [output]

    return app


class Exporter:
    """The HTTP endpoint: GET /metrics (any path, as prometheus_client serves it)."""

    def __init__(self, registry: CollectorRegistry, host: ipaddress.IPv4Address |
                 ipaddress.IPv6Address, port: int, *, slots: int = MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT, limit: Limit = LIMIT,
                 source_limit: Limit = SOURCE_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"
        family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        self._server = _Server((str(host), port), family, slots, head_timeout,
                               _Limiter(limit, source_limit, clock),
                               _too_many(limit, source_limit))
        # The exporter's own counter is on its page alone (not CloudWatch's: billed per
        # metric), and read with the collection it is served with.
        self._pages = _Pages(_WithOwn(registry, self._server), clock=clock)
        self._server.set_app(_guarded(_app(self._pages, registry), self._server.say))
        self._thread = NamedThread(target=self._server.serve_forever, name="metrics",
                                   daemon=True)
        self._thread.start()
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def evicted(self) -> int:
        return self._server.evicted

    @property
    def refused(self) -> int:
        """Connections answered 429 as they were accepted: over LIMIT or SOURCE_LIMIT."""
        return self._server.refused

    @property
    def pages(self) -> int:
        """Rendered pages kept (at most MAX_PAGES)."""
        return len(self._pages)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)
