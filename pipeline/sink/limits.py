"""The provider's limits and backpressure, held by the runtime for every connector alike.

- Size: an intent over the connector's ``max_body_bytes`` (as its ``body_bytes()``
  measures) is rejected before any provider call (``oversize``).
- Concurrency: at most ``max_concurrency`` sends in flight at once in this sink process,
  across all its partitions.
- Rate: a token bucket of ``rate_per_second`` holding one second's worth, so in any span of
  T seconds at most ``rate x T + max(1, rate)`` sends start.
- Throttle: a provider's retry-after pauses the channel; no send starts until it is over.

``ProviderGate`` joins the last three: a send starts only holding a concurrency slot and a
token, and only while no pause is on. The pause is checked again after the waits, right
before the send, so no send starts while a pause is on however the waits interleave.

``ChannelPause`` decides which results pause the channel (RETRYABLE with a retry-after up
to ``HERALD_SINK_MAX_THROTTLE_MS``; a longer one is an ordinary retryable failure), starts
or extends the pause, holds the consumer's partitions meanwhile and says when it is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from connectors.base import Connector, DeliveryResult, Outcome
from pipeline.records import NotificationIntent

__all__ = [
    "PAYLOAD_TOO_LARGE",
    "ChannelPause",
    "ProviderGate",
    "Throttle",
    "TokenBucket",
    "oversize",
]

log = logging.getLogger(__name__)

PAYLOAD_TOO_LARGE = "PayloadTooLarge"
# The shortest channel pause: "Retry-After: 0" answered forever must not make a sink spin.
MIN_PAUSE_S = 0.1

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def oversize(connector: Connector, intent: NotificationIntent) -> DeliveryResult | None:
    """The rejection for an intent over the connector's ``max_body_bytes``, else None."""
    limit = connector.max_body_bytes
    if limit is None:
        return None
    size = connector.body_bytes(intent)
    if size <= limit:
        return None
    return DeliveryResult.rejected(
        PAYLOAD_TOO_LARGE,
        f"the intent's subject and bodies are {size} bytes (UTF-8), over the {limit} bytes "
        f"the {connector.channel} connector takes (max_body_bytes); not sent",
    )


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``. Waiters are served in order:
    each takes the next token, even one not yet there, and sleeps until it is."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate_per_second must be positive, not {rate}")
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._at = clock()

    async def take(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


class Throttle:
    """A pause asked for by the provider (retry-after), until a point on the clock."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._until = 0.0

    def pause(self, seconds: float) -> bool:
        """Pause for ``seconds`` from now, unless a longer pause is on. Returns whether the
        pause started or grew."""
        until = self._clock() + seconds
        if until <= self._until:
            return False
        self._until = until
        return True

    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())


class ProviderGate:
    """Where every send waits for its turn: the throttle, a concurrency slot, a token."""

    def __init__(
        self,
        max_concurrency: int | None,
        rate_per_second: float | None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency) if max_concurrency is not None else None
        self.throttle = Throttle(clock)
        self._sleep = sleep
        self._slots = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        self._bucket = (
            TokenBucket(rate_per_second, clock=clock, sleep=sleep)
            if rate_per_second is not None
            else None
        )
        self.in_flight = 0

    async def acquire(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Wait until a send may start; True when it may (call ``release()`` after it).
        False when ``give_up()`` turned true while a pause was on: the caller abandons the
        record without sending it."""
        while True:
            while (wait := self.throttle.remaining()) > 0:
                if give_up():
                    return False
                await self._sleep(min(wait, 0.5))
            if self._slots is not None:
                await self._slots.acquire()
            if self._bucket is not None:
                try:
                    await self._bucket.take()
                except BaseException:
                    self._free_slot()
                    raise
            if self.throttle.remaining() <= 0:
                self.in_flight += 1
                return True
            self._free_slot()  # a pause began while waiting: wait for it again

    def release(self) -> None:
        self.in_flight -= 1
        self._free_slot()

    def _free_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()


class ChannelPause:
    """A provider's retry-after, turned into a pause of the whole channel."""

    def __init__(
        self,
        gate: ProviderGate,
        max_s: float,
        hold: Callable[[bool], None],
        resumed: Callable[[], None],
        name: str,
    ) -> None:
        """``hold(True/False)`` pauses and resumes every partition of the consumer;
        ``resumed()`` is called once the pause is over (to start waiting records)."""
        self._throttle = gate.throttle
        self.max_s = max_s
        self._hold = hold
        self._resumed = resumed
        self._name = name
        self._timer: asyncio.TimerHandle | None = None

    @property
    def on(self) -> bool:
        return self._throttle.remaining() > 0

    def applies(self, result: DeliveryResult) -> bool:
        """Whether ``result`` pauses the channel (else it is an ordinary outcome)."""
        after = result.retry_after
        if result.outcome is not Outcome.RETRYABLE or after is None:
            return False
        if after > self.max_s:
            log.info(
                "%s provider asked to wait %.0fs, over HERALD_SINK_MAX_THROTTLE_MS (%.0fs): "
                "retrying through the retry topics",
                self._name,
                after,
                self.max_s,
            )
            return False
        return True

    def start(self, result: DeliveryResult) -> None:
        """Pause for ``result``'s retry-after (at least MIN_PAUSE_S), unless a longer pause
        is on already."""
        was_on = self.on
        seconds = max(result.retry_after or 0.0, MIN_PAUSE_S)
        if not self._throttle.pause(seconds):
            return
        if not was_on:
            log.warning(
                "%s provider asked to wait %.1fs (%s): channel paused",
                self._name,
                seconds,
                result.response or result.error_class,
            )
        self._hold(True)
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self.close()
        self._timer = asyncio.get_running_loop().call_later(self._throttle.remaining(), self._end)

    def _end(self) -> None:
        self._timer = None
        if self.on:  # extended meanwhile, or the clock and the loop's timer differ by a hair
            self._schedule()
            return
        log.info("%s channel resumed after the provider's pause", self._name)
        self._hold(False)
        self._resumed()
