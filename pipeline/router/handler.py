"""What the router does with one record, apart from Kafka: decode, map, encode.

Every router loop hands each record to RouterHandler.handle and sends what it returns, so
the router's metrics (pipeline/metrics.py: consumed, routed by channel, dead letters by error
class), its log context and its tracing span ("herald.route <event type>", whose
traceparent the intents carry) live here. Every failure is classified here:

- permanent (the bytes cannot be decoded, no intent can be made, an intent is over the
  record limit): the event becomes one dead-letter record, which itself always fits the
  limit; a bad record never stops its partition;
- transient (the schema registry cannot answer): ``RegistryUnavailableError`` propagates,
  and the caller holds the record and tries it again; nothing is written for it meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pipeline import headers as h
from pipeline import logs, metrics, tracing
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

_ROUTED = metrics.ROUTER_EVENTS.labels("routed")
_NO_RULE = metrics.ROUTER_EVENTS.labels("no_rule")
_DEAD_LETTERED = metrics.ROUTER_EVENTS.labels("dead_lettered")


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: h.Headers
    dead: bool = False
    channel: str | None = None  # an intent's channel


@dataclass(frozen=True)
class _Record:
    """The event record being handled."""

    key: bytes | None
    value: bytes | None
    headers: h.Headers | None
    topic: str
    partition: int
    offset: int

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


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
        self._consumed: dict[str, Any] = {}  # metric children, by topic / channel
        self._routed: dict[str, Any] = {}

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
        matched), or one dead letter. Raises RegistryUnavailableError (transient) only.

        Counts the record in Herald's metrics (consumed, routed by channel, dead letters by
        error class) once it is decided, so a held record tried again counts once."""
        rec = _Record(key, value, headers, topic, partition, offset)
        with logs.context(topic=topic, partition=partition, offset=offset):
            outputs = self._handle(rec)
        self._count(topic, outputs)
        return outputs

    def _handle(self, rec: _Record) -> list[Output]:
        start_ns = tracing.now_ns() if tracing.enabled() else None
        try:
            decoded = self.serde.decode(
                rec.value, topic=rec.topic, partition=rec.partition, offset=rec.offset
            )
            event_type = self.serde.schemas.event_type_of(decoded.schema.full_name)
            if event_type is None:
                raise UnexpectedSchemaError(
                    f"{decoded.schema.full_name} is not a domain event",
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                )
        except RegistryUnavailableError:
            raise
        except DecodeError as e:
            return [self._dead(rec, e)]
        except Exception as e:
            log.exception("unexpected error decoding %s", rec.where)
            return [self._dead(rec, e)]
        envelope = decoded.record.get("envelope") or {}
        logs.update_context(event_id=envelope.get("event_id"))
        if start_ns is None:
            return self._route(rec, event_type.name, decoded.record, envelope, None)
        # The routing span continues the event's trace; its intents continue the span.
        parent = h.as_dict(rec.headers).get(h.TRACEPARENT) or envelope.get("traceparent")
        attributes = {
            "herald.event_type": event_type.name,
            "herald.event_id": envelope.get("event_id"),
            "messaging.system": "kafka",
            "messaging.source.name": rec.topic,
            "messaging.kafka.partition": rec.partition,
            "messaging.kafka.offset": rec.offset,
        }
        with tracing.span(
            f"herald.route {event_type.name}",
            parent=parent,
            kind="consumer",
            attributes=attributes,
            start_ns=start_ns,
        ) as span:
            outputs = self._route(rec, event_type.name, decoded.record, envelope, span)
            if span is not None:
                span.set("herald.intents", sum(1 for o in outputs if not o.dead))
                if outputs and outputs[0].dead:
                    span.error(h.as_dict(outputs[0].headers).get(h.ERROR_CLASS, "dead letter"))
            return outputs

    def _route(
        self,
        rec: _Record,
        event_type: str,
        record: dict[str, Any],
        envelope: dict[str, Any],
        span: tracing.Span | None,
    ) -> list[Output]:
        try:
            intents = route(event_type, record, self.rules, self.templates, self.clock())
        except RoutingError as e:
            return [self._dead(rec, e, e.rule)]
        except Exception as e:
            # A bug in a template filter or in the mapping: the same input would fail the
            # same way on every retry, so it is dead-lettered (with its class and message)
            # rather than holding the partition forever.
            log.exception("unexpected error routing %s", rec.where)
            return [self._dead(rec, e)]

        # The event's time goes with each intent as a header, for the delivery latency.
        occurred_at = envelope.get("occurred_at")
        event_time_ms = (
            int(occurred_at.timestamp() * 1000) if isinstance(occurred_at, datetime) else None
        )
        outputs = []
        for intent in intents:
            if span is not None:
                intent = replace(intent, traceparent=span.traceparent)
            try:
                encoded, schema_ref = self.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
            except RegistryUnavailableError:
                raise
            except Exception as e:  # e.g. a rendered field the schema does not take
                return [self._dead(rec, e, intent.rule)]
            hdrs = h.for_record(
                schema_ref=schema_ref,
                event_type=intent.event_type,
                event_id=intent.event_id,
                notification_id=intent.notification_id,
                traceparent=intent.traceparent,
                event_time_ms=event_time_ms,
            )
            out_key = intent.recipient.encode()
            size = record_size(out_key, encoded, hdrs)
            if size > self.max_record_bytes:
                too_large = RecordTooLargeError(
                    f"rule {intent.rule!r}: its {intent.channel} intent is {size} bytes, over "
                    f"the {self.max_record_bytes}-byte record limit (HERALD_MAX_RECORD_BYTES)",
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                )
                return [self._dead(rec, too_large, intent.rule)]
            outputs.append(
                Output(
                    self.topics.notifications(intent.channel),
                    out_key,
                    encoded,
                    hdrs,
                    channel=intent.channel,
                )
            )
        return outputs

    def _count(self, topic: str, outputs: list[Output]) -> None:
        consumed = self._consumed.get(topic)
        if consumed is None:
            consumed = self._consumed[topic] = metrics.CONSUMED.labels("router", topic)
        consumed.inc()
        if not outputs:
            _NO_RULE.inc()
        elif outputs[0].dead:
            _DEAD_LETTERED.inc()
            error_class = h.as_dict(outputs[0].headers).get(h.ERROR_CLASS)
            metrics.DEAD_LETTERS.labels("router", "", metrics.bounded(error_class)).inc()
        else:
            _ROUTED.inc()
            for o in outputs:
                channel = o.channel or ""
                routed = self._routed.get(channel)
                if routed is None:
                    routed = self._routed[channel] = metrics.ROUTED.labels(channel)
                routed.inc()

    def _dead(self, rec: _Record, error: Exception, rule: str | None = None) -> Output:
        log.warning(
            "dead-lettering %s to %s: %s: %s",
            rec.where,
            self.topics.events_dlq,
            type(error).__name__,
            error,
        )
        dl = dead_letter(
            self.topics.events_dlq,
            key=rec.key,
            value=rec.value,
            headers=rec.headers,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            error=error,
            max_bytes=self.max_record_bytes,
            extra=[(h.ERROR_RULE, rule.encode())] if rule else None,
        )
        return Output(dl.topic, dl.key, dl.value, dl.headers, dead=True)
