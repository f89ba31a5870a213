"""What the router does with one record, apart from Kafka: decode, map, encode.

Every router loop hands each record to RouterHandler.handle and sends what it returns, so
the router's metrics (pipeline/metrics.py: consumed, routed by channel, dead letters by error
class), its log context and its tracing span ("herald.route <event type>", whose
traceparent the intents carry) live here. Every failure is classified here:

- permanent, of the whole event (the bytes cannot be decoded, it is not a domain event, a
  bug in the mapping): the event becomes one dead-letter record, which itself always fits
  the limit; a bad record never stops its partition;
- permanent, of one rule (no recipient, a template that fails, an intent the schema refuses
  or over the record limit): that rule's dead letter (the event, with ``herald-error-rule``)
  and every other rule's intents;
- transient (the schema registry cannot answer): ``RegistryUnavailableError`` propagates,
  and the caller holds the record and tries it again; nothing is written for it meanwhile.

With people state (``people``, the router's tables): recipients may come from the subscriber
record, and what a preference or a suppression stops becomes a SUPPRESSED DeliveryStatus on
notifications.status instead of an intent. Without it (None), every rule takes its recipient
from the event and nothing is suppressed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pipeline import headers as h
from pipeline import logs, metrics, tracing
from pipeline.deadletter import dead_letter, record_size, safe_header_text
from pipeline.records import (
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    DeliveryState,
    DeliveryStatus,
    NotificationIntent,
)
from pipeline.router.mapping import People, Suppressed, route
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

__all__ = ["Output", "RouterHandler", "RouterPeople"]

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
    channel: str | None = None  # an intent's or a status's channel
    rule: str | None = None  # the rule it is of (intents, statuses and a rule's dead letter)
    status: bool = False  # a SUPPRESSED DeliveryStatus


class RouterPeople(People, Protocol):
    """People as the handler uses them: the mapping's lookups, and how a channel's
    connector shows an address (for statuses)."""

    def describe(self, channel: str, address: str) -> str: ...


class _RuleFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


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
        people: RouterPeople | None = None,
    ) -> None:
        self.serde = serde
        self.rules = rules
        self.templates = templates
        self.topics = topics
        self.clock = clock
        # Every record the router writes must fit: the broker refuses a larger one, and a
        # refused write after the event was taken would lose it.
        self.max_record_bytes = max_record_bytes or serde.max_record_bytes
        # What the router knows about people (PeopleTables); None: nothing, every rule takes
        # its recipient from the event. May be set after construction.
        self.people = people
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
        people: RouterPeople | None = None,
    ) -> list[Output]:
        """The records to write for one event record: its intents, the dead letters of the
        rules that failed, the SUPPRESSED statuses of what was not sent; nothing (no rule
        matched); or one dead letter of the event. ``people`` overrides ``self.people`` for
        this call. Raises RegistryUnavailableError (transient) only.

        Counts the record in Herald's metrics (consumed, routed by channel, dead letters by
        error class) once it is decided, so a held record tried again counts once."""
        rec = _Record(key, value, headers, topic, partition, offset)
        with logs.context(topic=topic, partition=partition, offset=offset):
            outputs = self._handle(rec, people if people is not None else self.people)
        self._count(topic, outputs)
        return outputs

    def _handle(self, rec: _Record, people: RouterPeople | None) -> list[Output]:
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
            return self._route(rec, event_type.name, decoded.record, envelope, None, people)
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
            outputs = self._route(rec, event_type.name, decoded.record, envelope, span, people)
            if span is not None:
                span.set("herald.intents", sum(1 for o in outputs if not o.dead and not o.status))
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
        people: RouterPeople | None,
    ) -> list[Output]:
        try:
            now = self.clock()
            routed = route(event_type, record, self.rules, self.templates, now, people)
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
        outputs = [self._dead(rec, f, f.rule) for f in routed.failures]
        by_rule: dict[str, list[NotificationIntent]] = {}
        for intent in routed.intents:
            if span is not None:
                intent = replace(intent, traceparent=span.traceparent)
            by_rule.setdefault(intent.rule, []).append(intent)
        for rule, intents in by_rule.items():
            # A rule's intents go together or not at all (one per device of a subscriber).
            try:
                outputs += [self._intent(rec, intent, event_time_ms) for intent in intents]
            except _RuleFailed as e:
                outputs.append(self._dead(rec, e.error, rule))
        outputs += [self._status(s, now, people) for s in routed.suppressed]
        return outputs

    def _intent(
        self, rec: _Record, intent: NotificationIntent, event_time_ms: int | None
    ) -> Output:
        try:
            encoded, schema_ref = self.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
        except RegistryUnavailableError:
            raise
        except Exception as e:  # e.g. a rendered field the schema does not take
            raise _RuleFailed(e) from e
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
            raise _RuleFailed(
                RecordTooLargeError(
                    f"rule {intent.rule!r}: its {intent.channel} intent is {size} bytes, over "
                    f"the {self.max_record_bytes}-byte record limit (HERALD_MAX_RECORD_BYTES)",
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                )
            )
        return Output(
            self.topics.notifications(intent.channel),
            out_key,
            encoded,
            hdrs,
            channel=intent.channel,
            rule=intent.rule,
        )

    def _status(self, s: Suppressed, now: datetime, people: RouterPeople | None) -> Output:
        """The SUPPRESSED status of a notification not made. The recipient is shown as the
        channel's connector shows it (a push subscription without its keys)."""
        describe = people.describe if people is not None else None
        status = DeliveryStatus(
            notification_id=s.notification_id,
            channel=s.channel,
            recipient=describe(s.channel, s.recipient) if describe else s.recipient,
            state=DeliveryState.SUPPRESSED,
            attempts=0,
            event_id=s.event_id,
            provider_response=safe_header_text(s.reason),
            error_class=s.error_class,
            occurred_at=now,
        )
        encoded, schema_ref = self.serde.encode(DELIVERY_STATUS, status.to_avro())
        hdrs = h.for_record(
            schema_ref=schema_ref,
            event_type=s.event_type,
            event_id=s.event_id,
            notification_id=s.notification_id,
            traceparent=s.traceparent,
        )
        return Output(
            self.topics.status,
            s.notification_id.encode(),
            encoded,
            hdrs,
            channel=s.channel,
            rule=s.rule,
            status=True,
        )

    def _count(self, topic: str, outputs: list[Output]) -> None:
        consumed = self._consumed.get(topic)
        if consumed is None:
            consumed = self._consumed[topic] = metrics.CONSUMED.labels("router", topic)
        consumed.inc()
        if not outputs:
            _NO_RULE.inc()
            return
        dead = [o for o in outputs if o.dead]
        for o in dead:
            error_class = h.as_dict(o.headers).get(h.ERROR_CLASS)
            metrics.DEAD_LETTERS.labels("router", "", metrics.bounded(error_class)).inc()
        (_DEAD_LETTERED if dead and len(dead) == len(outputs) else _ROUTED).inc()
        for o in outputs:
            if o.dead:
                continue
            channel = o.channel or ""
            if o.status:
                metrics.SUPPRESSED.labels(metrics.bounded(channel)).inc()
                continue
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
        return Output(dl.topic, dl.key, dl.value, dl.headers, dead=True, rule=rule)
