"""The Prometheus endpoint under clients that do not behave. prometheus_client's own server
started a thread per connection and let each wait forever for its request; ours serves a few
at once, gives each connection one deadline for its request head, and makes room for a new
connection by closing the one that has waited longest without a request, so idle or slow
clients cost a few threads and a scrape still gets in. Beyond a rate of connections far above
any scraper's, a connection is answered a fixed 429 as it is accepted, without a thread."""

from __future__ import annotations

import gzip
import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from wgvsock.services.metrics import prometheus
from wgvsock.services.metrics.prometheus import LIMIT, REFUSALS, SOURCE_LIMIT, Exporter, Limit
from wgvsock.ui.nslab import wait_for

# For the tests of something else than the rate limit, which scrape faster than any scraper.
_UNLIMITED = {"limit": Limit(1e9, 10**9), "source_limit": Limit(1e9, 10**9)}


class _One:
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("wgvsock_test_up", "a gauge", value=1)


def _serving() -> int:
    return sum(t.name == "metrics-http" for t in threading.enumerate())


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
        return res.read().decode()


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One())
    e = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2, head_timeout=30,
                 **_UNLIMITED)
    yield e
    e.close()


def test_idle_connections_cost_few_threads_and_cannot_keep_a_scrape_out(
        exporter: Exporter) -> None:
    idle = [socket.create_connection(("127.0.0.1", exporter.port), timeout=10)
            for _ in range(20)]
    try:
        # Each newcomer beyond the 2 slots closed the oldest one still without a request.
        for s in idle[:18]:
            assert s.recv(1) == b"", "an older idle connection was left open"
        assert exporter.evicted == 18
        assert _serving() <= 2
        # The scrape, too, gets a slot at once (30 s head timeout: not by waiting for it).
        started = time.monotonic()
        assert "wgvsock_test_up 1.0" in _scrape(exporter.port)
        assert time.monotonic() - started < 5
    finally:
        for s in idle:
            s.close()


def test_a_request_dripped_a_byte_at_a_time_is_closed_at_its_deadline() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One())
    exporter = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2,
                        head_timeout=1.0)
    try:
        s = socket.create_connection(("127.0.0.1", exporter.port), timeout=10)
        started = time.monotonic()
        closed = False
        with s:
            for c in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 100:
                try:
                    s.sendall(bytes([c]))
                except OSError:
                    closed = True
                    break
                s.settimeout(0.2)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
        assert closed
        assert time.monotonic() - started < 3
        assert "wgvsock_test_up 1.0" in _scrape(exporter.port)
    finally:
        exporter.close()


def test_close_stops_listening(exporter: Exporter) -> None:
    port = exporter.port
    assert "wgvsock_test_up 1.0" in _scrape(port)
    exporter.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _get(port: int, accept: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept})
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


@pytest.mark.parametrize("accept", ["text/plain; version=x",
                                    "application/openmetrics-text; version=abc"])
def test_an_accept_header_prometheus_client_cannot_parse_is_a_400_not_a_traceback(
        exporter: Exporter, accept: str, capfd: pytest.CaptureFixture[str]) -> None:
    # prometheus_client raises TypeError for these; wsgiref printed its traceback to raw
    # stderr, so anyone reaching the port could flood the journal.
    for _ in range(3):
        status, _body = _get(exporter.port, accept)
        assert status == 400
    assert "wgvsock_test_up 1.0" in _scrape(exporter.port)
    assert capfd.readouterr().err == ""


class _Broken:
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        raise RuntimeError("collector failed")


def test_a_failing_collection_is_a_500_logged_not_printed(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Broken())
    exporter = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2, **_UNLIMITED)
    try:
        with caplog.at_level(logging.DEBUG, logger="wgvsock.metrics"):
            for _ in range(20):
                status, _body = _get(exporter.port, "text/plain")
                assert status == 500
    finally:
        exporter.close()
    assert capfd.readouterr().err == ""
    failed = [r for r in caplog.records if "collection failed" in r.getMessage()]
    assert 1 <= len(failed) < 20  # rate-limited
    assert "RuntimeError: collector failed" in caplog.text


class _Big:
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("wgvsock_test_big", "x" * (16 << 20), value=1)


def test_a_client_that_stops_reading_leaves_nothing_on_stderr(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # The response's send times out inside wsgiref, whose log_exception printed a traceback.
    monkeypatch.setattr(prometheus, "WRITE_TIMEOUT", 0.3)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Big())
    exporter = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with s:
            s.connect(("127.0.0.1", exporter.port))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            wait_for(_serving, 10, "the request to be taken")
            wait_for(lambda: not _serving(), 10, "the stalled response to be given up")
    finally:
        exporter.close()
    assert capfd.readouterr().err == ""


class _Counting:
    """A collector that counts its collections and how many ran at once; each takes a while,
    as the device's uapi_get does while the tunnel is busy."""

    FAMILIES = 40

    def __init__(self) -> None:
        self.value = 1
        self.calls = 0
        self.most = 0
        self._running = 0
        self._lock = threading.Lock()

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            self.calls += 1
            self._running += 1
            self.most = max(self.most, self._running)
        try:
            time.sleep(0.01)
            yield GaugeMetricFamily("wgvsock_test_value", "the value", value=self.value)
            for i in range(self.FAMILIES):
                yield GaugeMetricFamily(f"wgvsock_test_{i}", "one of many", value=i)
        finally:
            with self._lock:
                self._running -= 1


# _Counting's and the exporter's own (wgvsock_metrics_refused_connections_total).
_PAGE_FAMILIES = _Counting.FAMILIES + 2


def _families(text: str) -> dict[str, float]:
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)}


def _counting_exporter(**kwargs: Any) -> tuple[_Counting, Exporter]:
    collector = _Counting()
    registry = prometheus._Registry(auto_describe=False)  # (its name filter)
    registry.register(collector)
    return collector, Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, **kwargs)


@pytest.fixture
def counting() -> Iterator[tuple[_Counting, Exporter]]:
    collector, e = _counting_exporter(**_UNLIMITED)
    try:
        yield collector, e
    finally:
        e.close()


def test_a_flood_of_scrapes_costs_one_collection_a_second_and_is_mostly_refused() -> None:
    """Every request ran a whole collection (the device's uapi_get and nft's counters), up to
    8 at once on the parent's Python threads: 8 clients looping on /metrics cut the tunnel's
    throughput about 4 times (review finding). A page is now collected at most once a second,
    one collection at a time, and every request in between gets that page. Each request served
    still cost ~0.7 ms of the parent's CPU, ~90 % of a core under this flood: beyond
    SOURCE_LIMIT the flood is answered 429 as it is accepted, and beyond REFUSALS a second
    its connections wait in the kernel's queue."""
    # The parent's limits; a slot for each client and each thread still closing its last
    # connection, so that no connection is closed to make room (that is another test's).
    collector, exporter = _counting_exporter(slots=16)
    pages: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()
    started = time.monotonic()
    stop = started + 1.0

    errors: list[Exception] = []

    def client() -> None:
        while time.monotonic() < stop:
            conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
            try:
                conn.request("GET", "/metrics")
                res = conn.getresponse()
                page = (res.status, res.read().decode(), res.getheader("Retry-After"))
            except Exception as e:  # (a refusal must be an answer, not a reset)
                with lock:
                    errors.append(e)
                return
            finally:
                conn.close()
            with lock:
                pages.append(page)

    try:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - started
        refused = exporter.refused
    finally:
        exporter.close()
    assert not errors
    assert len(pages) >= 40, "the flood never got going"
    assert collector.calls <= 3, f"{collector.calls} collections for {len(pages)} requests"
    assert collector.most == 1
    served = [text for status, text, _ in pages if status == 200]
    answered_429 = [(text, retry) for status, text, retry in pages if status == 429]
    assert len(served) + len(answered_429) == len(pages)
    assert SOURCE_LIMIT.burst <= len(served) <= SOURCE_LIMIT.burst + \
        SOURCE_LIMIT.rate * elapsed + 1
    for text in served:
        families = _families(text)
        assert len(families) == _PAGE_FAMILIES
        assert families["wgvsock_test_value"] == 1
    for text, retry in answered_429:
        assert retry == "1"
        assert text.startswith("too many requests")
    assert refused == len(answered_429)
    assert refused <= REFUSALS.burst + REFUSALS.rate * elapsed + 1


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _status(port: int) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), res.read().decode()
    finally:
        conn.close()


def test_a_burst_over_the_limit_is_refused_at_once_until_the_bucket_refills(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    started: list[str] = []
    thread = prometheus.NamedThread

    def counted(*args: Any, **kwargs: Any) -> threading.Thread:
        started.append(str(kwargs.get("name")))
        return thread(*args, **kwargs)

    monkeypatch.setattr(prometheus, "NamedThread", counted)
    clock = _Clock()  # stands still: only what the test adds refills the buckets
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One())
    exporter = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, head_timeout=30,
                        clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="wgvsock.metrics"):
            answers = [_status(exporter.port) for _ in range(3 * SOURCE_LIMIT.burst)]
        statuses = [status for status, _, _ in answers]
        assert statuses == [200] * SOURCE_LIMIT.burst + [429] * 2 * SOURCE_LIMIT.burst
        assert "wgvsock_test_up 1.0" in answers[0][2]
        _, headers, body = answers[-1]
        assert headers["Retry-After"] == "1"
        assert headers["Connection"] == "close"
        assert body == (f"too many requests: this endpoint accepts {LIMIT.rate:g} connections "
                        f"a second, {SOURCE_LIMIT.rate:g} from one address; try again later\n")
        # A thread for each request served, none for those refused (the server's is "metrics").
        assert started.count("metrics-http") == SOURCE_LIMIT.burst
        # Refused as it is accepted: nothing read, no head awaited (head_timeout is 30 s).
        with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as s:
            assert s.recv(4096).startswith(b"HTTP/1.0 429 Too Many Requests\r\n")
        assert exporter.refused == 2 * SOURCE_LIMIT.burst + 1
        # Once, not a line per connection.
        refusals = [r for r in caplog.records if "429" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
        # One connection's worth of refill: one more served, then refused again.
        clock.now += 1 / SOURCE_LIMIT.rate
        assert [_status(exporter.port)[0] for _ in range(2)] == [200, 429]
        # The refusals are on the page (collected anew once the page is MAX_AGE old).
        clock.now += prometheus.MAX_AGE
        status, _, text = _status(exporter.port)
        assert status == 200
        assert _families(text)["wgvsock_metrics_refused_connections"] == \
            2 * SOURCE_LIMIT.burst + 2
        assert started.count("metrics-http") == SOURCE_LIMIT.burst + 2
    finally:
        exporter.close()


def test_one_flooding_address_leaves_the_scrapers_at_others_served() -> None:
    clock = _Clock()
    limiter = prometheus._Limiter(LIMIT, SOURCE_LIMIT, clock)
    scrapers = ["10.0.0.5", "10.0.0.6", "192.0.2.7", "2001:db8:1::5", "2001:db8:2::5"]
    refused = 0
    # Five minutes of a client looping on /metrics at 1000 requests a second from one address,
    # and five Prometheus servers scraping every second (5-60 s is usual), one at each other.
    for second in range(300):
        for i in range(1000):
            clock.now = 1000.0 + second + i / 1000
            refused += not limiter.admit("10.0.0.99")
            if i % 200 == 0:
                assert limiter.admit(scrapers[i // 200]), (second, scrapers[i // 200])
    assert 300 * 1000 - refused <= SOURCE_LIMIT.burst + SOURCE_LIMIT.rate * 300


@pytest.mark.parametrize(("flooder", "same", "other"), [
    ("127.0.0.1", ["127.0.0.2", "127.255.0.1", "::1", "::ffff:127.0.0.1"], "10.0.0.1"),
    ("10.0.0.1", ["::ffff:10.0.0.1"], "10.0.0.2"),
    ("2001:db8::1", ["2001:db8::2", "2001:db8:0:0:ffff::1"], "2001:db8:0:1::1"),
    ("fe80::1%eth0", ["fe80::2%eth1"], "fe81::1"),
])
def test_a_source_is_an_ipv4_address_an_ipv6_64_and_loopback_as_one(
        flooder: str, same: list[str], other: str) -> None:
    clock = _Clock()
    limiter = prometheus._Limiter(LIMIT, SOURCE_LIMIT, clock)
    assert all(limiter.admit(flooder) for _ in range(SOURCE_LIMIT.burst))
    for address in same:
        assert not limiter.admit(address), address
    assert limiter.admit(other)


def test_all_sources_together_are_held_to_the_overall_limit() -> None:
    clock = _Clock()
    limiter = prometheus._Limiter(LIMIT, SOURCE_LIMIT, clock)
    admitted = sum(limiter.admit(f"10.0.{i // 250}.{i % 250}") for i in range(10_000))
    assert admitted == LIMIT.burst
    clock.now += 1.0
    admitted = sum(limiter.admit(f"10.1.{i // 250}.{i % 250}") for i in range(10_000))
    assert admitted == LIMIT.rate
    assert len(limiter._sources) == prometheus.MAX_SOURCES


def test_refusals_beyond_their_rate_make_the_accepting_thread_wait() -> None:
    clock = _Clock()
    limiter = prometheus._Limiter(LIMIT, SOURCE_LIMIT, clock)
    assert [limiter.pause() for _ in range(REFUSALS.burst)] == [0.0] * REFUSALS.burst
    # Then one refusal per token: the wait for the next one each time.
    for _ in range(3):
        wait = limiter.pause()
        assert wait == pytest.approx(1 / REFUSALS.rate)
        clock.now += wait
    clock.now += 10 / REFUSALS.rate + 1e-9  # 10 tokens (and floating point's error)
    assert [limiter.pause() for _ in range(10)] == [0.0] * 10
    assert limiter.pause() == pytest.approx(1 / REFUSALS.rate, rel=1e-3)


def test_a_page_is_never_older_than_a_second(counting: tuple[_Counting, Exporter]) -> None:
    collector, exporter = counting
    assert _families(_scrape(exporter.port))["wgvsock_test_value"] == 1
    collector.value = 2
    changed = time.monotonic()
    wait_for(lambda: _families(_scrape(exporter.port))["wgvsock_test_value"] == 2, 5,
             "the change to show", max_delay=0.05)
    assert time.monotonic() - changed < 2.0  # (1 s, and a loaded machine's latency)


def test_a_page_is_served_until_its_collection_is_a_second_old() -> None:
    collector = _Counting()
    now = [100.0]
    pages = prometheus._Pages(collector, clock=lambda: now[0])

    def value() -> float:
        return _families(pages.page(None, None, None)[1].decode())["wgvsock_test_value"]

    assert value() == 1
    collector.value = 2
    now[0] += 0.5
    assert pages.page(None, None, frozenset({"wgvsock_test_value"}))  # rendered, not collected
    now[0] += 0.49
    assert value() == 1
    assert collector.calls == 1
    now[0] += 0.01
    assert value() == 2
    assert collector.calls == 2
    assert len(pages) == 1  # the filtered page, a second old, is gone


def test_a_name_filter_is_served_from_the_same_collection(
        counting: tuple[_Counting, Exporter]) -> None:
    collector, exporter = counting
    assert len(_families(_scrape(exporter.port))) == _PAGE_FAMILIES
    for _ in range(3):
        assert _families(_get_path(exporter.port, "/metrics?name[]=wgvsock_test_3")) == {
            "wgvsock_test_3": 3}
    assert _families(_get_path(exporter.port, "/metrics?name[]=wgvsock_test_4")) == {
        "wgvsock_test_4": 4}
    assert collector.calls <= 2  # (a second may have passed)
    # A client's distinct queries keep a bounded number of pages.
    for i in range(3 * prometheus.MAX_PAGES):
        assert _get_path(exporter.port, f"/metrics?name[]=wgvsock_other_{i}") == ""
    assert exporter.pages <= prometheus.MAX_PAGES


def test_head_and_other_methods_are_refused_without_a_collection(
        counting: tuple[_Counting, Exporter]) -> None:
    collector, exporter = counting
    for method in ("HEAD", "POST", "DELETE"):
        conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=5)
        try:
            conn.request(method, "/metrics")
            res = conn.getresponse()
            res.read()
            assert res.status == 405
            assert res.getheader("Allow") == "OPTIONS,GET"
        finally:
            conn.close()
    assert collector.calls == 0


def test_gzip_is_a_page_of_its_own(counting: tuple[_Counting, Exporter]) -> None:
    collector, exporter = counting
    conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        res = conn.getresponse()
        body = res.read()
        assert res.getheader("Content-Encoding") == "gzip"
    finally:
        conn.close()
    assert len(_families(gzip.decompress(body).decode())) == _PAGE_FAMILIES
    assert len(_families(_scrape(exporter.port))) == _PAGE_FAMILIES
    assert collector.calls <= 2


def _get_path(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as res:
        return res.read().decode()


def test_the_connections_the_transport_refused_at_accept_are_counted() -> None:
    """Connections the parent's WireGuard port closed at accept (vsock: not the enclave's CID)
    are a counter beside the accepted ones; a transport with no such count (datagrams) has
    neither."""
    from types import SimpleNamespace

    from wgvsock.services.metrics.prometheus import ParentCollector

    def collected(transport: dict[str, Any]) -> dict[str, float]:
        device = SimpleNamespace(ifname="wg0", uapi_get=lambda: SimpleNamespace(peers=[]),
                                 bind=SimpleNamespace(status=lambda: transport))
        parent = SimpleNamespace(profile=None, device=device, enclave_key=None, verdict=None,
                                 counters=None)
        return {s.name: s.value for m in ParentCollector(parent).collect()
                for s in m.samples if s.name.startswith("wgvsock_transport_")}

    assert collected({"accepted": 3, "refused": 2}) == {
        "wgvsock_transport_accepted_connections_total": 3,
        "wgvsock_transport_refused_connections_total": 2,
    }
    assert collected({}) == {}


def test_the_connections_the_control_port_refused_are_counted() -> None:
    """The control port's refused_connections as a counter of the profile, read from a real
    server that refused one; absent while the parent has no control port."""
    from types import SimpleNamespace

    from tests.test_control import _dial_tcp, _tcp_server, expect_closed
    from wgvsock.services.metrics.prometheus import ParentCollector

    def collected(control: object) -> dict[str, float]:
        parent = SimpleNamespace(profile=SimpleNamespace(name="p1"), device=None,
                                 enclave_key=None, verdict=None, counters=None, control=control)
        return {s.name: s.value for m in ParentCollector(parent).collect()
                for s in m.samples if s.name.startswith("wgvsock_control_")}

    assert collected(None) == {}
    srv, _rec, port = _tcp_server(refuse_from=lambda addr: "not the enclave (a test)")
    try:
        with _dial_tcp(port) as s:
            expect_closed(s)
        assert collected(srv)["wgvsock_control_refused_connections_total"] == 1
    finally:
        srv.close()


def test_the_control_port_s_registrations_are_counted_accepted_and_refused_by_reason() -> None:
    """The registrations the control port installed, and those it refused by reason, as
    counters of the profile, read from a real server; every reason is there from the start,
    at 0. Before, registrations was a bare attribute no metric read, and the refused ones
    were counted nowhere (status keeps the last few, and clears them once one is in)."""
    import base64
    import time
    from types import SimpleNamespace

    from tests.test_control import _dial_tcp, _exchange, _tcp_server, expect_closed
    from wgvsock.services.control import encode, read_message
    from wgvsock.services.metrics.prometheus import ParentCollector

    def collected(control: object) -> dict[tuple[str, str], float]:
        parent = SimpleNamespace(profile=SimpleNamespace(name="p1"), device=None,
                                 enclave_key=None, verdict=None, counters=None, control=control)
        return {(s.name, s.labels.get("reason", "")): s.value
                for m in ParentCollector(parent).collect() for s in m.samples
                if s.name.startswith("wgvsock_control_") and "registrations" in s.name
                and s.labels["profile"] == "p1"}

    def refused(**counts: int) -> dict[tuple[str, str], float]:
        return {("wgvsock_control_refused_registrations_total", reason): counts.get(reason, 0)
                for reason in ("verdict", "throttled", "version")}

    # One registration from each peer, then none for an hour: the second is throttled.
    srv, rec, port = _tcp_server(register_burst=1, register_interval=3600.0)
    try:
        assert collected(srv) == {("wgvsock_control_registrations_total", ""): 0, **refused()}
        with _dial_tcp(port) as s:
            assert _exchange(s, b"E" * 32)["type"] == "welcome"
        with _dial_tcp(port) as s:
            assert _exchange(s, b"E" * 32)["type"] == "refused"
        rec.accept = False
        with _dial_tcp(port, "127.0.0.2") as s:
            assert _exchange(s, b"F" * 32)["type"] == "refused"
        with _dial_tcp(port, "127.0.0.3") as s:  # an enclave of a newer protocol only
            challenge = read_message(s, time.monotonic() + 5)
            s.sendall(encode({"v": 2, "type": "register", "nonce": challenge["nonce"],
                              "public_key": base64.b64encode(b"G" * 32).decode()}))
            assert read_message(s, time.monotonic() + 5)["type"] == "refused"
        with _dial_tcp(port, "127.0.0.4") as s:  # one that refuses this parent itself
            read_message(s, time.monotonic() + 5)
            s.sendall(encode({"type": "refused", "reason": "no version in common"}))
            expect_closed(s)
        assert collected(srv) == {("wgvsock_control_registrations_total", ""): 1,
                                  **refused(verdict=1, throttled=1, version=2)}
    finally:
        srv.close()
