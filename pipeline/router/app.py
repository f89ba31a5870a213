"""The router as a Faust app: a thin loop around RouterHandler.

Faust commits a source offset only after the records sent while processing it were
acknowledged (at_least_once), or inside the same Kafka transaction (exactly_once). Either
way a crash can at worst re-route an event, and re-routing yields the same notification ids,
which the sinks deliver once.
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.router.handler import RouterHandler
from pipeline.router.rules import RuleError, load_rules
from pipeline.router.templates import Templates
from pipeline.serialization import serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import CHANNELS, Topics

__all__ = ["create_app", "create_handler"]

log = logging.getLogger(__name__)


def create_handler(settings: HeraldSettings) -> RouterHandler:
    """Load rules, templates and schemas; fail at start-up, not on the first event."""
    rules = load_rules(settings.rules_file)
    for rule in rules.rules:
        if rule.channel not in CHANNELS:
            raise RuleError(
                f"rule {rule.name!r}: unknown channel {rule.channel!r}; "
                f"known: {', '.join(CHANNELS)}"
            )
    templates = Templates(settings.templates_dir)
    templates.check({r.template for r in rules.rules})
    return RouterHandler(
        serde_from_settings(settings), rules, templates, Topics(settings.topic_prefix)
    )


def create_app(settings: HeraldSettings) -> faust.App:
    handler = create_handler(settings)
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings)
    app = faust.App(
        settings.router_app_id,
        broker=[f"kafka://{s.strip()}" for s in settings.kafka_bootstrap_servers.split(",")],
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
        *topics.all_events(),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    sinks: dict[str, Any] = {}

    def out(name: str) -> Any:
        if name not in sinks:
            sinks[name] = app.topic(name, key_serializer="raw", value_serializer="raw")
        return sinks[name]

    @app.agent(source, name="route")
    async def route(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            outputs = handler.handle(
                key=msg.key,
                value=msg.value,
                headers=h.pairs(msg.headers),
                topic=msg.topic,
                partition=msg.partition,
                offset=msg.offset,
            )
            for o in outputs:
                await out(o.topic).send(key=o.key, value=o.value, headers=o.headers)

    return app
