"""What every router loop shares: the handler built and checked at start-up, the hold
through transient failures, and the hard stop on anything unexpected.

Nothing may move the source offset past an event whose outputs were not acknowledged:

- RouterHandler dead-letters what can never be routed, so a loop only ever sends records
  that fit the broker's limit.
- A transient failure (the schema registry down) holds the event: HoldingRouter retries it
  with capped backoff, and the loop sends nothing else meanwhile (the process reads all of
  its partitions in one loop, and they all need the same registry).
- Anything else that escapes (a produce that failed, a bug) ends the process at once
  (``stop_now``), without the commit a graceful shutdown would make: the offset stays where
  the last commit put it, and the process supervisor's restart reads the event again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, NoReturn

from pipeline import metrics
from pipeline.router.check import check_rules
from pipeline.router.handler import Output, RouterHandler
from pipeline.router.rules import load_rules
from pipeline.router.templates import Templates
from pipeline.serialization import RegistryUnavailableError, serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["EXIT_UNEXPECTED", "HoldingRouter", "create_handler", "stop_now"]

log = logging.getLogger(__name__)

# Exit status of a router that stopped itself on an unexpected failure (EX_SOFTWARE).
EXIT_UNEXPECTED = 70


def create_handler(settings: HeraldSettings) -> RouterHandler:
    """Load rules, templates and schemas; fail at start-up, not on the first event."""
    from connectors.registry import installed_channels

    rules = load_rules(settings.rules_file)
    serde = serde_from_settings(settings)
    templates = Templates(settings.templates_dir)
    # What `herald rules check` checks: events against the schemas, channels against the
    # installed connectors, every template compiled and every rule rendered for examples.
    check_rules(rules, templates, serde.schemas, installed_channels()).raise_for_problems()
    return RouterHandler(
        serde,
        rules,
        templates,
        Topics(settings.topic_prefix),
        max_record_bytes=settings.max_record_bytes,
    )


class HoldingRouter:
    """RouterHandler.handle, retried while the failure is transient.

    The first try runs on the event loop (the registry answers from cache nearly always);
    retries run in a thread, so a registry that hangs until its timeout does not stall
    the consumer's heartbeats. Backoff doubles from ``backoff_s`` up to ``max_backoff_s``,
    with jitter; it never gives up: the event is held until it can be routed.
    """

    def __init__(
        self, handler: RouterHandler, backoff_s: float = 0.2, max_backoff_s: float = 30.0
    ) -> None:
        self.handler = handler
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.held_since: float | None = None  # monotonic time the current hold began
        self.holds = 0  # events that had to be held, since start

    @classmethod
    def from_settings(cls, settings: HeraldSettings) -> HoldingRouter:
        return cls(
            create_handler(settings),
            backoff_s=settings.router_retry_backoff_ms / 1000,
            max_backoff_s=settings.router_retry_backoff_max_ms / 1000,
        )

    async def handle(self, **record: Any) -> list[Output]:
        try:
            return self.handler.handle(**record)
        except RegistryUnavailableError as e:
            return await self._hold(record, e)

    async def _hold(self, record: dict[str, Any], error: Exception) -> list[Output]:
        where = f"{record['topic']}[{record['partition']}]@{record['offset']}"
        self.holds += 1
        self.held_since = time.monotonic()
        metrics.router_held(True)
        delay = self.backoff_s
        try:
            while True:
                held = time.monotonic() - self.held_since
                log.warning(
                    "holding %s (and the partitions behind it) for %.1fs so far: %s; "
                    "retrying in %.1fs",
                    where,
                    held,
                    error,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                delay = min(delay * 2, self.max_backoff_s)
                try:
                    outputs = await asyncio.to_thread(self.handler.handle, **record)
                except RegistryUnavailableError as e:
                    error = e
                    continue
                log.warning("released %s after %.1fs", where, time.monotonic() - self.held_since)
                return outputs
        finally:
            self.held_since = None
            metrics.router_held(False)


def stop_now(error: BaseException, where: str) -> NoReturn:
    """End the process without a graceful shutdown, which would commit the offset of the
    event that failed (under Faust's exactly_once, the open transaction with it)."""
    log.critical(
        "router stopping at %s on an unexpected %s: %s; the event will be read again "
        "from the last committed offset when the router restarts",
        where,
        type(error).__name__,
        error,
        exc_info=error,
    )
    logging.shutdown()
    os._exit(EXIT_UNEXPECTED)
