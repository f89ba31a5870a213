"""pipeline/sink/windows.py: the offset a partition may commit only moves over a contiguous
run of completed records, whatever order they complete in."""

from __future__ import annotations

import itertools

import pytest

from pipeline.sink.windows import OffsetWindow

TP = ("unit.notifications.fake", 0)


def started(*offsets: int, next_offset: int | None = None) -> OffsetWindow:
    w = OffsetWindow(TP, next_offset)
    for o in offsets:
        w.start(o)
    return w


def test_out_of_order_completions_advance_only_over_the_contiguous_run() -> None:
    w = started(10, 11, 12, 13, 14)
    w.complete(12)
    w.complete(14)
    assert w.advance() is None  # 10 is not done: nothing may be committed
    w.complete(10)
    assert w.advance() == 11
    w.complete(11)
    assert w.advance() == 13  # 12 was already done
    assert w.pending == [13, 14]
    w.complete(13)
    assert w.advance() == 15
    assert w.pending == []


@pytest.mark.parametrize("order", list(itertools.permutations([0, 1, 2, 3])))
def test_every_completion_order_ends_at_the_same_offset_and_never_passes_a_gap(
    order: tuple[int, ...],
) -> None:
    w = started(0, 1, 2, 3)
    done: set[int] = set()
    for o in order:
        w.complete(o)
        done.add(o)
        offset = w.advance()
        # the committed offset is the first offset not done
        first_gap = next(i for i in range(5) if i not in done)
        assert offset == (first_gap if first_gap > 0 else None)
    assert w.advance() == 4


def test_the_ledgers_offset_stays_until_a_record_is_passed() -> None:
    w = started(7, 8, next_offset=7)
    assert w.advance() == 7
    w.complete(8)
    assert w.advance() == 7
    w.complete(7)
    assert w.advance() == 9


def test_an_abandoned_record_holds_the_offset_below_it() -> None:
    w = started(0, 1, 2)
    w.complete(0)
    w.complete(2)
    w.release()  # 1 given up unsent: its slot is free, its offset is not passed
    assert w.advance() == 1
    assert w.pending == [1, 2]


def test_slots_are_taken_at_start_and_freed_at_release() -> None:
    w = OffsetWindow(TP)
    assert w.has_room(2)
    w.start(0)
    w.start(1)
    assert not w.has_room(2)
    w.complete(0)
    w.advance()
    assert not w.has_room(2)  # completed, but not recorded yet
    w.release()
    assert w.has_room(2)
    assert w.in_flight == 1
    assert OffsetWindow(TP).has_room(0)  # a limit below 1 still lets one record through
