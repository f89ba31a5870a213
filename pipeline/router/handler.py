"""What the router does with one record, apart from Kafka: decode, map, encode.

The router's loop hands each record to RouterHandler.handle and sends what it returns, in
one transaction per batch. Every failure is classified here:

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pipeline import headers as h
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


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: h.Headers
    dead: bool = False
    rule: str | None = None  # the rule it is of (intents, statuses and a rule's dead letter)


class RouterPeople(People, Protocol):
    """People as the handler uses them: the mapping's lookups, and how a channel's
    connector shows an address (for statuses)."""

    def describe(self, channel: str, address: str) -> str: ...


class _RuleFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


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
        # What the router knows about people (PeopleTables); None: nothing, every rule takes
        # its recipient from the event. May be set after construction.
        self.people = people
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
        people: RouterPeople | None = None,
    ) -> list[Output]:
        """The records to write for one event record: its intents, the dead letters of the
        rules that failed, the SUPPRESSED statuses of what was not sent; nothing (no rule
        matched); or one dead letter of the event. ``people`` overrides ``self.people`` for
        this call. Raises RegistryUnavailableError (transient) only."""
        people = people if people is not None else self.people
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
            now = self.clock()
            routed = route(event_type.name, decoded.record, self.rules, self.templates, now, people)
        except RegistryUnavailableError:
            raise
        except DecodeError as e:
            return [self._dead(key, value, headers, topic, partition, offset, e)]
        except Exception as e:
            # A bug in a template filter or in the mapping: the same input would fail the
            # same way on every retry, so it is dead-lettered (with its class and message)
            # rather than holding the partition forever.
            log.exception("unexpected error routing %s[%d]@%d", topic, partition, offset)
            return [self._dead(key, value, headers, topic, partition, offset, e)]

        where = (key, value, headers, topic, partition, offset)
        outputs = [self._dead(*where, f, f.rule) for f in routed.failures]
        by_rule: dict[str, list[NotificationIntent]] = {}
        for intent in routed.intents:
            by_rule.setdefault(intent.rule, []).append(intent)
        for rule, intents in by_rule.items():
            # A rule's intents go together or not at all (one per device of a subscriber).
            try:
                outputs += [self._intent(intent, where) for intent in intents]
            except RegistryUnavailableError:
                raise
            except _RuleFailed as e:
                outputs.append(self._dead(*where, e.error, rule))
        outputs += [self._status(s, now, people) for s in routed.suppressed]
        return outputs

    def _intent(
        self,
        intent: NotificationIntent,
        where: tuple[bytes | None, bytes | None, h.Headers | None, str, int, int],
    ) -> Output:
        topic, partition, offset = where[3], where[4], where[5]
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
        )
        out_key = intent.recipient.encode()
        size = record_size(out_key, encoded, hdrs)
        if size > self.max_record_bytes:
            raise _RuleFailed(
                RecordTooLargeError(
                    f"rule {intent.rule!r}: its {intent.channel} intent is {size} bytes, over "
                    f"the {self.max_record_bytes}-byte record limit (HERALD_MAX_RECORD_BYTES)",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                )
            )
        return Output(
            self.topics.notifications(intent.channel), out_key, encoded, hdrs, rule=intent.rule
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
        return Output(self.topics.status, s.notification_id.encode(), encoded, hdrs, rule=s.rule)

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
        return Output(dl.topic, dl.key, dl.value, dl.headers, dead=True, rule=rule)
