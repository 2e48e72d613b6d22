"""RateLimitedLog: a burst, then one line per interval, and the count of what was left out."""

from __future__ import annotations

import logging

import pytest

from wgvsock.conn import bind
from wgvsock.conn.bind import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(bind.time, "monotonic", c)
    return c


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return out


def test_one_line_per_interval(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    say = RateLimitedLog(10.0, logging.getLogger("t"))
    with caplog.at_level(logging.INFO, "t"):
        for i in range(5):
            say(logging.INFO, "line %d", i)
        assert _lines(caplog) == ["line 0"]
        clock.now += 9.9
        say(logging.INFO, "line %d", 5)
        assert _lines(caplog) == []
        clock.now += 0.1
        say(logging.INFO, "line %d", 6)
        assert _lines(caplog) == ["line 6 (5 similar messages suppressed)"]


def test_a_burst_then_the_rate(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    say = RateLimitedLog(1.0, logging.getLogger("t"), burst=20)
    with caplog.at_level(logging.INFO, "t"):
        for i in range(100):
            say(logging.INFO, "conn %d", i)
        assert _lines(caplog) == [f"conn {i}" for i in range(20)]
        clock.now += 2.5  # two lines' worth
        for i in range(100, 105):
            say(logging.INFO, "conn %d", i)
        assert _lines(caplog) == ["conn 100 (80 similar messages suppressed)", "conn 101"]
        clock.now += 1000  # the bucket refills only up to the burst
        for i in range(200, 230):
            say(logging.INFO, "conn %d", i)
        assert len(_lines(caplog)) == 20


def test_a_traceback_comes_with_the_lines_let_through(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    say = RateLimitedLog(10.0, logging.getLogger("t"))
    with caplog.at_level(logging.INFO, "t"):
        for _ in range(3):
            try:
                raise ValueError("boom")
            except ValueError:
                say(logging.ERROR, "failed", exc_info=True)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


def test_lines_the_logger_would_not_show_leave_the_budget_alone(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A client could trigger debug lines at will (the metrics port): before, they used up
    the budget and the real warning after them was dropped."""
    logger = logging.getLogger("wgvsock.test.ratelimit.level")
    logger.setLevel(logging.WARNING)
    say = RateLimitedLog(10.0, logger=logger, burst=1)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(5):
            say(logging.DEBUG, "noise")
        say(logging.WARNING, "the real one")
    assert _lines(caplog) == ["the real one"]
