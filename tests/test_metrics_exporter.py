"""The Prometheus endpoint under clients that do not behave. prometheus_client's own server
started a thread per connection and let each wait forever for its request; ours serves a few
at once, gives each connection one deadline for its request head, and makes room for a new
connection by closing the one that has waited longest without a request, so idle or slow
clients cost a few threads and a scrape still gets in."""

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

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from wgvsock.services.metrics import prometheus
from wgvsock.services.metrics.prometheus import Exporter
from wgvsock.ui.nslab import wait_for


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
    e = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2, head_timeout=30)
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
    exporter = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2)
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


def _families(text: str) -> dict[str, float]:
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)}


@pytest.fixture
def counting() -> Iterator[tuple[_Counting, Exporter]]:
    collector = _Counting()
    registry = prometheus._Registry(auto_describe=False)  # (its name filter)
    registry.register(collector)
    e = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0)
    try:
        yield collector, e
    finally:
        e.close()


def test_a_flood_of_scrapes_costs_one_collection_a_second(
        counting: tuple[_Counting, Exporter]) -> None:
    """Every request ran a whole collection (the device's uapi_get and nft's counters), up to
    8 at once on the parent's Python threads: 8 clients looping on /metrics cut the tunnel's
    throughput about 4 times (review finding). A page is now collected at most once a second,
    one collection at a time, and every request in between gets that page."""
    collector, exporter = counting
    stop = time.monotonic() + 1.0
    pages: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
        try:
            while time.monotonic() < stop:
                conn.request("GET", "/metrics")
                res = conn.getresponse()
                with lock:
                    pages.append((res.status, res.read().decode()))
                conn.close()
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(pages) >= 40, "the flood never got going"
    assert collector.calls <= 3, f"{collector.calls} collections for {len(pages)} requests"
    assert collector.most == 1
    for status, text in pages:
        assert status == 200
        families = _families(text)
        assert len(families) == _Counting.FAMILIES + 1
        assert families["wgvsock_test_value"] == 1


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
    assert len(_families(_scrape(exporter.port))) == _Counting.FAMILIES + 1
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
    assert len(_families(gzip.decompress(body).decode())) == _Counting.FAMILIES + 1
    assert len(_families(_scrape(exporter.port))) == _Counting.FAMILIES + 1
    assert collector.calls <= 2


def _get_path(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as res:
        return res.read().decode()
