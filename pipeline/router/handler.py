"""What the router does with one record, apart from Kafka: decode, map, encode.

The Faust agent hands each record to RouterHandler.handle and sends what it returns. Any
record that cannot be decoded or routed becomes one dead-letter record instead; a bad
record never stops its partition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import headers as h
from pipeline.deadletter import dead_letter
from pipeline.publisher import CONTENT_TYPE
from pipeline.records import NOTIFICATION_INTENT
from pipeline.router.mapping import RoutingError, route
from pipeline.router.rules import RuleSet
from pipeline.router.templates import Templates
from pipeline.serialization import AvroSerde, DecodeError, UnexpectedSchemaError
from pipeline.topics import Topics

__all__ = ["Output", "RouterHandler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: h.Headers
    dead: bool = False


class RouterHandler:
    def __init__(
        self,
        serde: AvroSerde,
        rules: RuleSet,
        templates: Templates,
        topics: Topics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.serde = serde
        self.rules = rules
        self.templates = templates
        self.topics = topics
        self.clock = clock

    def handle(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: h.Headers | None,
        topic: str,
        partition: int,
        offset: int,
    ) -> list[Output]:
        """The records to write for one event record: its intents, nothing (no rule
        matched), or one dead letter."""
        try:
            decoded = self.serde.decode(value, topic=topic, partition=partition, offset=offset)
            event_type = self.serde.schemas.event_type_of(decoded.schema.full_name)
            if event_type is None:
                raise UnexpectedSchemaError(
                    f"{decoded.schema.full_name} is not a domain event",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                )
            intents = route(
                event_type.name, decoded.record, self.rules, self.templates, self.clock()
            )
        except (DecodeError, RoutingError) as e:
            return [self._dead(key, value, headers, topic, partition, offset, e)]
        except Exception as e:  # a bug must not stall the partition either
            log.exception("unexpected error routing %s[%d]@%d", topic, partition, offset)
            return [self._dead(key, value, headers, topic, partition, offset, e)]

        outputs = []
        for intent in intents:
            encoded, schema_ref = self.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
            hdrs: h.Headers = [
                (h.EVENT_TYPE, intent.event_type.encode()),
                (h.EVENT_ID, intent.event_id.encode()),
                (h.NOTIFICATION_ID, intent.notification_id.encode()),
                (h.CONTENT_TYPE, CONTENT_TYPE.encode()),
                (h.SCHEMA, schema_ref.encode()),
            ]
            if intent.traceparent:
                hdrs.append((h.TRACEPARENT, intent.traceparent.encode()))
            outputs.append(
                Output(
                    self.topics.notifications(intent.channel),
                    intent.recipient.encode(),
                    encoded,
                    hdrs,
                )
            )
        return outputs

    def _dead(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: h.Headers | None,
        topic: str,
        partition: int,
        offset: int,
        error: Exception,
    ) -> Output:
        where = f"{topic}[{partition}]@{offset}"
        log.warning(
            "dead-lettering %s to %s: %s: %s",
            where,
            self.topics.events_dlq,
            type(error).__name__,
            error,
        )
        dl = dead_letter(
            self.topics.events_dlq,
            key=key,
            value=value,
            headers=headers,
            topic=topic,
            partition=partition,
            offset=offset,
            error=error,
        )
        return Output(dl.topic, dl.key, dl.value, dl.headers, dead=True)
