"""The Prometheus endpoint under clients that do not behave: idle connections take at most
its few slots, each for at most its read timeout, and scrapes are served again after them.
(prometheus_client's own server started a thread per connection and let each wait forever.)"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

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


def test_idle_connections_cannot_take_every_thread() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One())
    exporter = Exporter(registry, ipaddress.ip_address("127.0.0.1"), 0, slots=2, timeout=0.5)
    idle: list[socket.socket] = []
    try:
        assert "wgvsock_test_up 1.0" in _scrape(exporter.port)
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", exporter.port), timeout=5))
        deadline = time.monotonic() + 5
        while exporter.refused < 18 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exporter.refused >= 18
        assert _serving() <= 2
        # The two that were let in are dropped after the timeout; a scrape is served then.
        for s in idle[:2]:
            s.settimeout(5)
            assert s.recv(1) == b""
        assert "wgvsock_test_up 1.0" in _scrape(exporter.port)
    finally:
        for s in idle:
            s.close()
        exporter.close()
    with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", exporter.port), timeout=1):
        raise AssertionError("still listening after close")
