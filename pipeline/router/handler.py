"""What the router does with one record, apart from Kafka: decode, map, encode.

The Faust agent hands each record to RouterHandler.handle and sends what it returns. Every
failure is classified here:

- permanent (the bytes cannot be decoded, no intent can be made, an intent is over the
  record limit): the event becomes one dead-letter record, which itself always fits the
  limit; a bad record never stops its partition;
- transient (the schema registry cannot answer): ``RegistryUnavailableError`` propagates,
  and the caller holds the record and tries it again; nothing is written for it meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import headers as h
from pipeline.deadletter import dead_letter, record_size
from pipeline.records import NOTIFICATION_INTENT
from pipeline.router.mapping import RoutingError, route
from pipeline.router.rules import RuleSet
from pipeline.router.templates import Templates
from pipeline.serialization import (
    AvroSerde,
    DecodeError,
    RecordTooLargeError,
    RegistryUnavailableError,
    UnexpectedSchemaError,
)
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
        max_record_bytes: int | None = None,
    ) -> None:
        self.serde = serde
        self.rules = rules
        self.templates = templates
        self.topics = topics
        self.clock = clock
        # Every record the router writes must fit: the broker refuses a larger one, and a
        # refused write after the event was taken would lose it.
        self.max_record_bytes = max_record_bytes or serde.max_record_bytes

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
        matched), or one dead letter. Raises RegistryUnavailableError (transient) only."""
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
        except RegistryUnavailableError:
            raise
        except (DecodeError, RoutingError) as e:
            rule = e.rule if isinstance(e, RoutingError) else None
            return [self._dead(key, value, headers, topic, partition, offset, e, rule)]
        except Exception as e:
            # A bug in a template filter or in the mapping: the same input would fail the
            # same way on every retry, so it is dead-lettered (with its class and message)
            # rather than holding the partition forever.
            log.exception("unexpected error routing %s[%d]@%d", topic, partition, offset)
            return [self._dead(key, value, headers, topic, partition, offset, e)]

        outputs = []
        for intent in intents:
            try:
                encoded, schema_ref = self.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
            except RegistryUnavailableError:
                raise
            except Exception as e:  # e.g. a rendered field the schema does not take
                return [self._dead(key, value, headers, topic, partition, offset, e, intent.rule)]
            hdrs = h.for_record(
                schema_ref=schema_ref,
                event_type=intent.event_type,
                event_id=intent.event_id,
                notification_id=intent.notification_id,
                traceparent=intent.traceparent,
            )
            out_key = intent.recipient.encode()
            size = record_size(out_key, encoded, hdrs)
            if size > self.max_record_bytes:
                too_large = RecordTooLargeError(
                    f"rule {intent.rule!r}: its {intent.channel} intent is {size} bytes, over "
                    f"the {self.max_record_bytes}-byte record limit (HERALD_MAX_RECORD_BYTES)",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                )
                dead = self._dead(
                    key, value, headers, topic, partition, offset, too_large, intent.rule
                )
                return [dead]
            outputs.append(
                Output(self.topics.notifications(intent.channel), out_key, encoded, hdrs)
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
        rule: str | None = None,
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
            max_bytes=self.max_record_bytes,
            extra=[(h.ERROR_RULE, rule.encode())] if rule else None,
        )
        return Output(dl.topic, dl.key, dl.value, dl.headers, dead=True)
