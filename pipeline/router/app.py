"""The router as a Faust app (``HERALD_ROUTER_ENGINE=faust``): a thin loop around
RouterHandler. The default engine is ``router/loop.py``; this one is kept because the
project was asked to run on faust-streaming, and it guarantees at-least-once only.

Why not exactly_once: with ``processing_guarantee="exactly_once"`` faust-streaming 0.15
opens one transactional producer per source partition and commits the source offsets in
it every ``broker_commit_interval`` (2.8 s), but the agent's sends never join those
transactions. ``TransactionManager.send`` picks a producer by the *output* record's
partition (``consumer.key_partition(output topic, key)``); the consumer's metadata knows
only the topics it subscribes to, so for ``notifications.<channel>`` that is ``None``, the
transactional id is ``None``, and ``Producer.send`` falls back to the plain,
non-transactional producer. (Had the metadata known the topic, ``group_for_topic`` would
raise KeyError for a topic the app does not consume; and a transaction chosen by output
partition would not be the one carrying the source offset.) Intents are therefore visible
to read_committed readers at once while their offsets commit up to 2.8 s later: a SIGKILL
routes that window again (568 of 5,000 events at 250 events/s in
tests/integration/test_router_kill.py), and nothing flushed the plain producer before the
offset transaction committed, so a kill could also lose an intent still in its buffer.

So each send is awaited before the event counts as done, under either guarantee: outputs
are acknowledged before their source offset can commit. A crash routes again what was
processed since the last commit; re-routing yields the same notification ids, which the
sinks deliver once. Failure handling (hold, dead letters, hard stop) is
``router/handling.py``'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from mode.supervisors import CrashingSupervisor

from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.security import faust_credentials
from pipeline.router.handling import HoldingRouter, create_handler, stop_now
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["HoldingRouter", "create_app", "create_handler"]


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
                # Acknowledged before the event is: Faust's exactly_once does not carry
                # these sends in its transactions (see the module docstring).
                if sent:
                    await asyncio.gather(*sent)
            except Exception as e:
                stop_now(e, f"{msg.topic}[{msg.partition}]@{msg.offset}")

    return app
