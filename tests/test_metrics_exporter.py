"""The Prometheus endpoint under clients that do not behave. prometheus_client's own server
started a thread per connection and let each wait forever for its request; ours serves a few
at once, gives each connection one deadline for its request head, and makes room for a new
connection by closing the one that has waited longest without a request, so idle or slow
clients cost a few threads and a scrape still gets in."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from wgvsock.services.metrics.prometheus import Exporter


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
