"""A per-provider circuit breaker.

For failures without a hint of how long to wait (a provider's retry-after pauses the
channel through ``limits.Throttle`` instead, and counts neither way here).

Closed: sends flow. After ``threshold`` consecutive retryable failures it opens: the sink
pauses its partitions and sends nothing for ``open_s`` (backpressure: records stay in Kafka,
nothing is dropped and no retry is burnt). Then half-open: one probe send at a time; a success
closes it, a failure opens it again for twice as long (up to ``open_max_s``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        open_s: float,
        open_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = max(1, threshold)
        self.open_s = open_s
        self.open_max_s = open_max_s
        self._clock = clock
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._current_open_s = open_s
        self._probe = asyncio.Lock()
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        elapsed = self._clock() - self._opened_at
        if self._state is BreakerState.OPEN and elapsed >= self._current_open_s:
            self._state = BreakerState.HALF_OPEN
        return self._state

    def remaining_open_s(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._current_open_s - (self._clock() - self._opened_at))

    async def wait_until_closed_or_probe(self) -> bool:
        """Wait while open. Returns True when the caller is the half-open probe (it must
        report its outcome before others may send)."""
        while True:
            state = self.state
            if state is BreakerState.CLOSED:
                return False
            if state is BreakerState.OPEN:
                await asyncio.sleep(min(self.remaining_open_s(), 0.5) or 0.01)
                continue
            if not self._probe.locked():
                await self._probe.acquire()
                if self.state is BreakerState.HALF_OPEN:
                    return True
                self._probe.release()
                continue
            await asyncio.sleep(0.01)

    def success(self, probe: bool = False) -> None:
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self._current_open_s = self.open_s
        if probe and self._probe.locked():
            self._probe.release()

    def failure(self, probe: bool = False) -> None:
        self._failures += 1
        if probe:
            self._current_open_s = min(self._current_open_s * 2, self.open_max_s)
            self._open()
            if self._probe.locked():
                self._probe.release()
        elif self._state is BreakerState.CLOSED and self._failures >= self.threshold:
            self._current_open_s = self.open_s
            self._open()

    def release_probe(self) -> None:
        """The probe got no verdict (the provider asked to wait, or the send was given up):
        let the next sender probe instead, state unchanged."""
        if self._probe.locked():
            self._probe.release()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self.opened_count += 1
