"""pipeline/sink/breaker.py: closed -> open -> half-open -> closed or open for longer, on a
fake clock."""

from __future__ import annotations

import asyncio

from pipeline.sink.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, open_s=5, open_max_s=12, clock=clock)


async def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    clock = Clock()
    b = breaker(clock)
    b.failure()
    b.failure()
    b.success()  # not consecutive any more
    b.failure()
    b.failure()
    assert b.state is BreakerState.CLOSED
    b.failure()
    assert b.state is BreakerState.OPEN
    assert b.opened_count == 1
    assert b.remaining_open_s() == 5


async def test_half_open_after_the_pause_then_one_probe_at_a_time() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 5
    assert b.state is BreakerState.HALF_OPEN
    assert await b.wait_until_closed_or_probe() is True  # the probe
    second = asyncio.ensure_future(b.wait_until_closed_or_probe())
    await asyncio.sleep(0.03)
    assert not second.done()  # others wait for the probe's verdict
    b.success(probe=True)
    assert b.state is BreakerState.CLOSED
    assert await asyncio.wait_for(second, 1) is False


async def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    for expected in (10, 12, 12):  # 5 doubled, then capped at open_max_s
        clock.now += b.remaining_open_s()
        assert await b.wait_until_closed_or_probe() is True
        b.failure(probe=True)
        assert b.state is BreakerState.OPEN
        assert b.remaining_open_s() == expected
    clock.now += 12
    assert await b.wait_until_closed_or_probe() is True
    b.success(probe=True)
    assert b.state is BreakerState.CLOSED
    for _ in range(3):  # closed again: the next opening is the first pause again
        b.failure()
    assert b.remaining_open_s() == 5


async def test_a_probe_without_a_verdict_hands_probing_on() -> None:
    """A throttled probe (the provider asked to wait) is neither success nor failure."""
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 5
    assert await b.wait_until_closed_or_probe() is True
    b.release_probe()
    assert b.state is BreakerState.HALF_OPEN
    assert await asyncio.wait_for(b.wait_until_closed_or_probe(), 1) is True
