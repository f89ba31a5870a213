"""What a sink writes besides deliveries: retry records, dead letters, statuses and
suppressions of addresses a provider said are gone.

Every record is produced asynchronously; ``flush()`` waits until all of them are
acknowledged and raises if any was not. The checkpoint calls it before recording outcomes,
so an outcome is never recorded without its side records.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message

from connectors.base import Connector, DeliveryResult
from pipeline import headers as h
from pipeline import metrics
from pipeline.deadletter import dead_letter, safe_header_text
from pipeline.people.records import SUPPRESSION, Suppression, suppression_key
from pipeline.records import DELIVERY_STATUS, DeliveryState, DeliveryStatus, NotificationIntent
from pipeline.serialization import AvroSerde
from pipeline.sink.retry import RetryPolicy, epoch_ms, failure_headers, original_coordinates
from pipeline.topics import Topics

__all__ = ["RECIPIENT_GONE", "Outputs", "Producer", "ProviderError", "coords"]

# The error class connectors give a rejection that means the address is gone for good (an
# SMTP 550 5.1.1, an HTTP 410 from a push service, an unregistered device token).
RECIPIENT_GONE = "RecipientGone"


class Producer(Protocol):
    """The part of confluent_kafka.Producer the sink uses."""

    def produce(
        self, topic: str, value: Any = ..., key: Any = ..., *, headers: Any = ..., on_delivery: Any
    ) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


class ProviderError(Exception):
    """The provider's final answer, as the error recorded in dead-letter headers."""

    def __init__(self, result: DeliveryResult) -> None:
        self.result = result
        super().__init__(result.response or result.error_class or result.outcome.value)


def coords(msg: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (never None for a record without
    an error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"record without coordinates: {msg.error()}")
    return topic, partition, offset


class Outputs:
    def __init__(
        self,
        producer: Producer,
        connector: Connector,
        topics: Topics,
        serde: AvroSerde,
        policy: RetryPolicy,
        *,
        max_record_bytes: int,
        rng: random.Random,
    ) -> None:
        self.producer = producer
        self.connector = connector
        self.channel = connector.channel
        self.topics = topics
        self.serde = serde
        self.policy = policy
        self.max_record_bytes = max_record_bytes
        self.rng = rng
        self.dlq = topics.notifications_dlq(self.channel)
        self.retry_topics = frozenset(
            topics.notifications_retry(self.channel, t) for t in range(1, policy.tiers + 1)
        )
        self._errors: list[KafkaError] = []

    def retry(self, msg: Message, attempts: int, result: DeliveryResult, now: datetime) -> None:
        """``msg`` again on tier min(attempts, tiers), due after the backoff (never before
        the provider's retry-after), with its headers (the traceparent among them)."""
        delay = self.policy.delay_ms(attempts, result.retry_after, self.rng)
        topic = self.topics.notifications_retry(self.channel, self.policy.tier(attempts))
        hdrs = failure_headers(
            h.pairs(msg.headers()),
            failed_attempts=attempts,
            now=now,
            not_before_ms=epoch_ms(now) + delay,
            original=self.original(msg),
        )
        self._produce(topic, msg.key(), msg.value(), hdrs)
        metrics.RETRIES.labels(self.channel, topic).inc()

    def dead_letter(
        self,
        msg: Message,
        error: BaseException,
        attempts: int,
        error_class: str | None,
        now: datetime | None = None,
    ) -> None:
        """``msg`` to the channel's DLQ with its first coordinates and failure history (and
        its headers, the traceparent among them)."""
        where = self.original(msg)
        hdrs = failure_headers(
            h.pairs(msg.headers()),
            failed_attempts=attempts,
            now=now or datetime.now(UTC),
            not_before_ms=None,
            original=where,
        )
        dl = dead_letter(
            self.dlq,
            key=msg.key(),
            value=msg.value(),
            headers=hdrs,
            topic=where[0],
            partition=where[1],
            offset=where[2],
            error=error,
            attempts=attempts,
            error_class=error_class,
            max_bytes=self.max_record_bytes,
        )
        self._produce(dl.topic, dl.key, dl.value, dl.headers)
        error_name = metrics.bounded(error_class or type(error).__name__)
        metrics.DEAD_LETTERS.labels("sink", self.channel, error_name).inc()

    def status(
        self,
        intent: NotificationIntent,
        state: DeliveryState,
        attempts: int,
        r: DeliveryResult,
        now: datetime,
    ) -> None:
        status = DeliveryStatus(
            notification_id=intent.notification_id,
            generation=intent.generation,
            event_id=intent.event_id,
            channel=self.channel,
            recipient=self.connector.describe_recipient(intent.recipient),
            state=state,
            attempts=attempts,
            provider_message_id=r.provider_message_id,
            provider_response=safe_header_text(r.response) if r.response else None,
            error_class=r.error_class,
            occurred_at=now,
        )
        value, ref = self.serde.encode(DELIVERY_STATUS, status.to_avro())
        hdrs = h.for_record(
            schema_ref=ref,
            event_id=intent.event_id,
            notification_id=intent.notification_id,
            traceparent=h.valid_traceparent(intent.traceparent),
        )
        self._produce(self.topics.status, intent.notification_id.encode(), value, hdrs)

    def suppress(self, intent: NotificationIntent, result: DeliveryResult, now: datetime) -> None:
        """The intent's address to people.suppressions (compacted, keyed by channel and
        address): the provider said it is gone, so the router sends nothing more to it (a
        dead device token is thereby dropped from its subscriber). Produced next to the dead
        letter and acknowledged with it before the outcome is recorded; a crash before that
        writes it again, which compaction makes harmless."""
        shown = self.connector.describe_recipient(intent.recipient)
        record = Suppression(
            channel=self.channel,
            address=shown,
            reason="bounced" if self.channel == "email" else "gone",
            source=f"sink-{self.channel}",
            detail=safe_header_text(result.response, 300) if result.response else None,
            error_class=result.error_class,
            notification_id=intent.notification_id,
            user_id=intent.user_id,
            suppressed_at=now,
        )
        value, ref = self.serde.encode(SUPPRESSION, record.to_avro())
        key = suppression_key(self.channel, intent.recipient, shown)
        hdrs = h.for_record(
            schema_ref=ref, event_id=intent.event_id, notification_id=intent.notification_id
        )
        self._produce(self.topics.suppressions, key.encode(), value, hdrs)

    def original(self, msg: Message) -> tuple[str, int, int]:
        """Where the notification first appeared (kept across retry tiers)."""
        here = coords(msg)
        return original_coordinates(h.as_dict(msg.headers()), here, here[0] in self.retry_topics)

    async def flush(self) -> None:
        """Wait until every record produced so far is acknowledged. Raises KafkaException
        when one was not (nothing may be recorded then: the sink stops and a restart redoes
        the records, skipping what is done)."""
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, self.producer.flush, 60)
        if remaining or self._errors:
            errors = self._errors or [KafkaError(KafkaError._MSG_TIMED_OUT)]
            raise KafkaException(errors[0])

    def close(self) -> None:
        self.producer.flush(30)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, hdrs: h.Headers) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=hdrs, on_delivery=self._acked)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _acked(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(err)
