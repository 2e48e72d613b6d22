"""The per-message timer events the data path uses against the named events they stand for."""

from __future__ import annotations

import itertools

import pytest

from wgvsock.core.timers import _ORDER, Timers

NOW = 1000.0


def _timers(armed: dict[str, float], keepalive: int, need_another: bool) -> Timers:
    t = Timers(lambda: 0.125)
    t.deadlines.update(armed)
    t.persistent_keepalive_interval = keepalive
    t.need_another_keepalive = need_another
    return t


def _states() -> list[tuple[dict[str, float], int, bool]]:
    """Every timer armed or not, persistent keepalive off or on, a keepalive owed or not."""
    out = []
    for mask in range(1 << len(_ORDER)):
        armed = {name: 5.0 + i for i, name in enumerate(_ORDER) if mask >> i & 1}
        for keepalive, need_another in itertools.product((0, 25), (False, True)):
            out.append((armed, keepalive, need_another))
    return out


def _state(t: Timers) -> tuple[object, ...]:
    return (dict(t.deadlines), t.need_another_keepalive)


@pytest.mark.parametrize("data", [True, False], ids=["data", "keepalive"])
def test_transport_sent_is_its_named_events(data: bool) -> None:
    for armed, keepalive, need_another in _states():
        one = _timers(armed, keepalive, need_another)
        one.transport_sent(NOW, data)
        named = _timers(armed, keepalive, need_another)
        if data:
            named.data_sent(NOW)
        named.any_authenticated_packet_sent()
        named.any_authenticated_packet_traversal(NOW)
        assert _state(one) == _state(named), (armed, keepalive, need_another)


@pytest.mark.parametrize("data", [True, False], ids=["data", "keepalive"])
def test_transport_received_is_its_named_events(data: bool) -> None:
    for armed, keepalive, need_another in _states():
        one = _timers(armed, keepalive, need_another)
        one.transport_received(NOW, data)
        named = _timers(armed, keepalive, need_another)
        named.any_authenticated_packet_traversal(NOW)
        named.any_authenticated_packet_received()
        if data:
            named.data_received(NOW)
        assert _state(one) == _state(named), (armed, keepalive, need_another)
