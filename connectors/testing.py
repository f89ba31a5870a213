"""A connector for tests: scripted results, recorded calls, optional latency.

Like httpx's ``MockTransport``, it ships with the package so that the sink runtime (and a
third-party connector's own runtime tests) can be exercised without a provider::

    fake = FakeConnector(results={"slow@example.com": [DeliveryResult.retryable("HTTP429",
                                  retry_after=2.0)]})
    fake = FakeConnector(lambda intent: DeliveryResult.rejected("Nope"))
    fake = FakeConnector(handler, delay=0.01, max_concurrency=4)

Per recipient, ``results`` lists the answers to that recipient's next calls, one each; once
they are used up (or for a recipient without a script) the ``handler`` answers, or, without
one, ``default`` (SENT). A handler may be a coroutine function, e.g. to wait on an event and
so complete sends in an order the test chooses.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Self

from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.base import Connector, DeliveryResult
from pipeline.records import NotificationIntent

__all__ = ["FakeCall", "FakeConnector", "Handler"]

Handler = Callable[[NotificationIntent], DeliveryResult | Awaitable[DeliveryResult]]


@dataclass
class FakeCall:
    intent: NotificationIntent
    started_at: float  # the fake's clock when send() was called
    finished_at: float | None = None  # and when it answered (None while in flight)
    result: DeliveryResult | None = None


class FakeSettings(BaseSettings):
    """The fake has no settings; the class is there because every connector has one."""

    model_config = SettingsConfigDict(env_prefix="HERALD_FAKE_", extra="ignore")


class FakeConnector(Connector):
    """Answers from a script; see the module docstring. Not registered as an entry point:
    subclass it with another ``channel`` to stand in for a real channel."""

    channel = "fake"
    settings_class = FakeSettings

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        results: Mapping[str, Iterable[DeliveryResult]] | None = None,
        default: DeliveryResult | None = None,
        delay: float | Callable[[NotificationIntent], float] = 0.0,
        max_body_bytes: int | None = None,
        max_concurrency: int | None = None,
        rate_per_second: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handler = handler
        self.default = default or DeliveryResult.sent("250 accepted by FakeConnector")
        self.delay = delay
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.rate_per_second = rate_per_second
        self.clock = clock
        self._scripts: dict[str, deque[DeliveryResult]] = {
            recipient: deque(answers) for recipient, answers in (results or {}).items()
        }
        self.calls: list[FakeCall] = []
        self.in_flight = 0
        self.peak_in_flight = 0  # the most sends in flight at once, ever
        self.closed = False

    @classmethod
    def from_env(cls) -> Self:
        return cls()

    def script(self, recipient: str, *results: DeliveryResult) -> None:
        """Append answers for ``recipient``'s next calls."""
        self._scripts.setdefault(recipient, deque()).extend(results)

    def calls_to(self, recipient: str) -> list[FakeCall]:
        return [c for c in self.calls if c.intent.recipient == recipient]

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        call = FakeCall(intent, self.clock())
        self.calls.append(call)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            delay = self.delay(intent) if callable(self.delay) else self.delay
            if delay > 0:
                await asyncio.sleep(delay)
            call.result = await self._answer(intent)
            return call.result
        finally:
            call.finished_at = self.clock()
            self.in_flight -= 1

    async def _answer(self, intent: NotificationIntent) -> DeliveryResult:
        script = self._scripts.get(intent.recipient)
        if script:
            return script.popleft()
        if self.handler is None:
            return self.default
        answer = self.handler(intent)
        if inspect.isawaitable(answer):
            return await answer
        return answer

    async def aclose(self) -> None:
        self.closed = True
