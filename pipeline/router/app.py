"""The router as a Faust app: a thin loop around RouterHandler.

Nothing may move the source offset past an event whose outputs were not acknowledged:

- RouterHandler dead-letters what can never be routed, so the loop only ever sends records
  that fit the broker's limit.
- A transient failure (the schema registry down) holds the event: the loop retries it with
  capped backoff and sends nothing else meanwhile (the agent reads all of the process's
  partitions in one stream, and they all need the same registry).
- Anything else that escapes (a produce that failed, a bug) ends the process at once,
  without the commit a graceful Faust shutdown would make. Faust's default supervisor would
  restart the agent past the event; a hard exit leaves the offset where the last commit put
  it, and the process supervisor's restart reads the event again.
- Outputs are acknowledged before their source offset commits: inside the same Kafka
  transaction (exactly_once, where a failed send aborts the commit), or by awaiting each
  send before the next event (at_least_once).

A crash can at worst route an event again, and re-routing yields the same notification ids,
which the sinks deliver once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any

import faust
from mode.supervisors import CrashingSupervisor

from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.security import faust_credentials
from pipeline.router.check import check_rules
from pipeline.router.handler import Output, RouterHandler
from pipeline.router.rules import load_rules
from pipeline.router.templates import Templates
from pipeline.serialization import RegistryUnavailableError, serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["HoldingRouter", "create_app", "create_handler"]

log = logging.getLogger(__name__)

# Exit status of a router that stopped itself on an unexpected failure (EX_SOFTWARE).
EXIT_UNEXPECTED = 70


def create_handler(settings: HeraldSettings) -> RouterHandler:
    """Load rules, templates and schemas; fail at start-up, not on the first event: the
    rules are checked as `herald rules check` does (pipeline/router/check.py)."""
    from connectors.registry import installed_channels

    rules = load_rules(settings.rules_file)
    serde = serde_from_settings(settings)
    templates = Templates(settings.templates_dir)
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

    async def handle(self, **record: Any) -> list[Output]:
        try:
            return self.handler.handle(**record)
        except RegistryUnavailableError as e:
            return await self._hold(record, e)

    async def _hold(self, record: dict[str, Any], error: Exception) -> list[Output]:
        where = f"{record['topic']}[{record['partition']}]@{record['offset']}"
        self.holds += 1
        self.held_since = time.monotonic()
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


def _stop_now(error: BaseException, where: str) -> None:
    """End the process without Faust's graceful shutdown, which would commit the offset of
    the event that failed (and, under exactly_once, the open transaction with it)."""
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


def create_app(settings: HeraldSettings) -> faust.App:
    handler = create_handler(settings)
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings)
    app = faust.App(
        settings.router_app_id,
        broker=[f"kafka://{s.strip()}" for s in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee=settings.processing_guarantee,
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        topic_replication_factor=settings.topic_replication_factor,
        web_enabled=False,
        datadir=str(settings.router_data_dir),
        producer_acks=-1,
        broker_session_timeout=settings.router_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.router_session_timeout_s / 5),
        producer_max_request_size=settings.max_record_bytes + 64 * 1024,
    )
    source = app.topic(
        *topics.all_events(handler.serde.schemas.domains()),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    sinks: dict[str, Any] = {}
    router = HoldingRouter(
        handler,
        backoff_s=settings.router_retry_backoff_ms / 1000,
        max_backoff_s=settings.router_retry_backoff_max_ms / 1000,
    )
    # Under exactly_once the transaction commit fails if any send in it failed; otherwise
    # each send is awaited before the event counts as done.
    await_sends = settings.processing_guarantee != "exactly_once"

    def out(name: str) -> Any:
        if name not in sinks:
            sinks[name] = app.topic(name, key_serializer="raw", value_serializer="raw")
        return sinks[name]

    @app.agent(source, name="route", supervisor_strategy=CrashingSupervisor)
    async def route(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                outputs = await router.handle(
                    key=msg.key,
                    value=msg.value,
                    headers=h.pairs(msg.headers),
                    topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                )
                sent = [
                    await out(o.topic).send(key=o.key, value=o.value, headers=o.headers)
                    for o in outputs
                ]
                if await_sends and sent:
                    await asyncio.gather(*sent)
            except Exception as e:
                _stop_now(e, f"{msg.topic}[{msg.partition}]@{msg.offset}")

    return app
