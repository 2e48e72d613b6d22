from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgvsock.core.replay import RING_SLOTS, WINDOW, ReplayFilter

REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
LIMIT = REJECT_AFTER_MESSAGES


def test_window_is_wireguards() -> None:
    assert WINDOW == 8128
    assert RING_SLOTS > WINDOW


def test_in_order() -> None:
    f = ReplayFilter()
    for c in range(20000):
        assert f.check(c, LIMIT)


def test_duplicates_rejected() -> None:
    f = ReplayFilter()
    assert f.check(0, LIMIT)
    assert not f.check(0, LIMIT)
    for c in range(1, 100):
        assert f.check(c, LIMIT)
    for c in range(100):
        assert not f.check(c, LIMIT)


def test_first_counter_need_not_be_zero() -> None:
    f = ReplayFilter()
    assert f.check(5000, LIMIT)
    assert f.check(0, LIMIT)
    assert f.check(4999, LIMIT)
    assert not f.check(5000, LIMIT)


def test_out_of_order_within_window() -> None:
    f = ReplayFilter()
    assert f.check(1000, LIMIT)
    for c in (999, 3, 500, 0, 1001, 2):
        assert f.check(c, LIMIT)
    for c in (999, 3, 500, 0, 1001, 2, 1000):
        assert not f.check(c, LIMIT)


def test_window_edge() -> None:
    f = ReplayFilter()
    assert f.check(20000, LIMIT)
    assert not f.check(20000 - WINDOW - 1, LIMIT)
    assert f.check(20000 - WINDOW, LIMIT)
    assert not f.check(20000 - WINDOW, LIMIT)
    assert not f.check(0, LIMIT)


def test_window_edge_follows_max() -> None:
    f = ReplayFilter()
    assert f.check(WINDOW, LIMIT)
    assert f.check(0, LIMIT)
    assert f.check(WINDOW + 1, LIMIT)
    # 1 is now exactly WINDOW behind the newest, so still acceptable; 0 was seen anyway.
    assert f.check(1, LIMIT)
    assert f.check(WINDOW + 2, LIMIT)
    assert not f.check(1, LIMIT)


def test_too_old_after_jump() -> None:
    f = ReplayFilter()
    for c in range(10):
        assert f.check(c, LIMIT)
    assert f.check(1_000_000, LIMIT)
    for c in range(10):
        assert not f.check(c, LIMIT)
    assert f.check(1_000_000 - 1, LIMIT)


def test_lapped_slots_read_as_unseen() -> None:
    f = ReplayFilter()
    for c in range(RING_SLOTS):
        assert f.check(c, LIMIT)
    # Jumping ahead must clear the skipped slots, which still hold marks from a lap ago.
    assert f.check(RING_SLOTS + 100, LIMIT)
    for c in range(RING_SLOTS, RING_SLOTS + 100):
        assert f.check(c, LIMIT)
    newest = RING_SLOTS + 100
    # Counters from the previous lap that are still inside the window stay seen...
    assert not f.check(newest - WINDOW, LIMIT)
    assert not f.check(RING_SLOTS - 1, LIMIT)
    # ...and the ones just outside it are too old.
    assert not f.check(newest - WINDOW - 1, LIMIT)


def test_clearing_wraps_around_ring_end() -> None:
    f = ReplayFilter()
    start = RING_SLOTS - 10
    assert f.check(start, LIMIT)
    for c in range(start - 5, start):
        assert f.check(c, LIMIT)
    # A gap that runs over the end of the ring and back to its start.
    assert f.check(start + 30, LIMIT)
    for c in range(start + 1, start + 30):
        assert f.check(c, LIMIT)
    for c in range(start - 5, start + 31):
        assert not f.check(c, LIMIT)


def test_jump_larger_than_ring() -> None:
    f = ReplayFilter()
    for c in range(0, 3 * RING_SLOTS, 7):
        assert f.check(c, LIMIT)
    top = 10 * RING_SLOTS + 3
    assert f.check(top, LIMIT)
    for c in range(top - WINDOW, top):
        assert f.check(c, LIMIT)


def test_limit() -> None:
    f = ReplayFilter()
    assert not f.check(10, 10)
    assert not f.check(11, 10)
    # A refused counter leaves no trace: it is accepted once the limit allows it.
    assert f.check(10, 11)
    assert f.check(9, 10)
    assert not f.check(LIMIT, LIMIT)
    assert f.check(LIMIT - 1, LIMIT)
    assert not f.check(LIMIT - 1, LIMIT)


def test_counters_near_2_64() -> None:
    f = ReplayFilter()
    top = 2**64 - 1
    assert f.check(top - 1, 2**64)
    assert f.check(top, 2**64)
    assert f.check(top - WINDOW, 2**64)
    assert not f.check(top - WINDOW - 1, 2**64)
    assert not f.check(top, 2**64)


def test_negative_counter_rejected() -> None:
    f = ReplayFilter()
    assert not f.check(-1, LIMIT)
    assert f.check(0, LIMIT)


def test_reset() -> None:
    f = ReplayFilter()
    for c in range(50):
        f.check(c, LIMIT)
    f.check(100_000, LIMIT)
    f.reset()
    for c in range(50):
        assert f.check(c, LIMIT)
    assert f.check(100_000, LIMIT)


class Reference:
    """The documented rule, spelled out with a set."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.last = -1

    def check(self, counter: int, limit: int) -> bool:
        if counter < 0 or counter >= limit or counter in self.seen:
            return False
        if counter <= self.last and self.last - counter > WINDOW:
            return False
        self.seen.add(counter)
        self.last = max(self.last, counter)
        return True


@pytest.mark.parametrize("gap", [2, 3, 63, 64, 65, 1000, 8000, 8191, 8192, 8193])
@pytest.mark.parametrize("newest", [RING_SLOTS + 300, 2 * RING_SLOTS - 5])
def test_gap_after_dense_lap(newest: int, gap: int) -> None:
    # Counters skipped by a jump sit on slots marked a lap ago; every one of them that is still
    # inside the window must read as unseen, whatever the gap and wherever it wraps.
    f = ReplayFilter()
    ref = Reference()
    for c in range(newest - RING_SLOTS - 100, newest + 1):
        assert f.check(c, LIMIT) == ref.check(c, LIMIT)
    assert f.check(newest + gap, LIMIT)
    assert ref.check(newest + gap, LIMIT)
    for c in range(newest + gap - WINDOW - 2, newest + gap + 2):
        assert f.check(c, LIMIT) == ref.check(c, LIMIT), c


# Steps mostly small (reordering and duplicates), sometimes about a window or a ring wide
# (the edge cases), sometimes huge (jumps that wipe the ring).
steps = st.one_of(
    st.integers(-40, 40),
    st.integers(-WINDOW - 70, -WINDOW + 70),
    st.integers(RING_SLOTS - 70, RING_SLOTS + 70),
    st.integers(0, 5 * RING_SLOTS),
    st.integers(-3 * RING_SLOTS, 3 * RING_SLOTS),
)
# (step, step from the newest accepted counter rather than the last probe, run length): a run
# checks that many consecutive counters, which leaves dense marks for a later lap to trip on.
moves = st.tuples(steps, st.booleans(), st.one_of(st.just(1), st.integers(1, 400)))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**64 - 1), st.lists(moves, max_size=60))
def test_matches_reference_model(start: int, script: list[tuple[int, bool, int]]) -> None:
    f = ReplayFilter()
    ref = Reference()
    # The limit sits a little above the start so the limit check is exercised on the way up.
    limit = min(start + 4 * RING_SLOTS, 2**64)
    pos = start
    for step, from_last, run in script:
        base = ref.last if from_last and ref.last >= 0 else pos
        pos = max(0, base + step)
        for c in range(pos, pos + run):
            assert f.check(c, limit) == ref.check(c, limit), c
        pos += run - 1
    # Any stale mark left in the window shows up as a refusal the reference would not make.
    if ref.last >= 0:
        for c in range(max(0, ref.last - WINDOW - 2), ref.last + 3):
            assert f.check(c, limit) == ref.check(c, limit), c
