"""The sink worker: one confluent-kafka consumer group per channel.

Per batch of records returned by one ``consume`` call:

1. Records are decoded; ones that cannot be (or that a connector rejects, or whose attempts
   run out) are written to the channel's dead-letter topic with their coordinates.
2. Intents are sent through the connector, at most ``HERALD_SINK_MAX_IN_FLIGHT`` at a time
   per partition. A retryable failure is retried in place with capped exponential backoff
   and jitter, up to ``HERALD_SINK_MAX_ATTEMPTS``.
3. Every outcome becomes a DeliveryStatus record on notifications.status.
4. Once every record of the batch reached an outcome and the dead-letter and status records
   were acknowledged by Kafka, the next offsets are committed (synchronously).

So an offset is committed only after its record was delivered or dead-lettered, and a
rebalance (which can only happen inside ``consume``) never finds unfinished work.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors.base import Connector, DeliveryResult, Outcome
from pipeline import headers as h
from pipeline.deadletter import dead_letter, safe_header_text
from pipeline.records import (
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    DeliveryState,
    DeliveryStatus,
    NotificationIntent,
)
from pipeline.serialization import AvroSerde, DecodeError, serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["SinkStats", "SinkWorker"]

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    sent: int = 0
    rejected: int = 0
    dead: int = 0
    undecodable: int = 0
    retries: int = 0
    batches: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class SinkWorker:
    def __init__(
        self,
        settings: HeraldSettings,
        connector: Connector,
        *,
        serde: AvroSerde | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.connector = connector
        self.channel = connector.channel
        self.serde = serde or serde_from_settings(settings)
        self.topics = Topics(settings.topic_prefix)
        self.source = self.topics.notifications(self.channel)
        self.dlq = self.topics.notifications_dlq(self.channel)
        self.group_id = f"{settings.sink_group_prefix}-{self.channel}"
        self.stats = SinkStats()
        self._sleep = sleep
        self._stopping = asyncio.Event()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._produce_errors: list[KafkaError] = []

    def stop(self) -> None:
        """Ask the worker to stop after the batch in hand (which is finished and committed)."""
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._producer = Producer(self.settings.producer_config())
        self._consumer = Consumer(self.settings.consumer_config(self.group_id))
        self._consumer.subscribe(
            [self.source], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        log.info("%s sink consuming %s as group %s", self.channel, self.source, self.group_id)
        try:
            while not self._stopping.is_set():
                batch = await loop.run_in_executor(None, self._consumer.consume, 500, 0.5)
                if batch:
                    await self._process_batch(batch)
        finally:
            await loop.run_in_executor(None, self._close)

    def _close(self) -> None:
        if self._producer is not None:
            self._producer.flush(30)
        if self._consumer is not None:
            self._consumer.close()
        # connector connections are closed by the caller that created the connector

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s sink assigned %s", self.channel, _tps(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches are finished and committed before the next consume(), and rebalance
        # callbacks only run inside consume(): nothing is in flight here.
        log.info("%s sink revoked %s", self.channel, _tps(partitions))

    # -- one batch ---------------------------------------------------------------------------

    async def _process_batch(self, batch: list[Message]) -> None:
        by_partition: dict[tuple[str, int], list[Message]] = defaultdict(list)
        for msg in batch:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("%s sink consumer error: %s", self.channel, err)
                continue
            topic, partition, _ = _coords(msg)
            by_partition[(topic, partition)].append(msg)
        if not by_partition:
            return
        await asyncio.gather(*(self._process_partition(msgs) for msgs in by_partition.values()))
        await self._flush_producer()
        offsets = [
            TopicPartition(topic, partition, _coords(msgs[-1])[2] + 1)
            for (topic, partition), msgs in by_partition.items()
        ]
        assert self._consumer is not None  # noqa: S101 - set in run()
        consumer = self._consumer
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: consumer.commit(offsets=offsets, asynchronous=False)
        )
        self.stats.batches += 1

    async def _process_partition(self, msgs: list[Message]) -> None:
        limit = asyncio.Semaphore(max(1, self.settings.sink_max_in_flight))

        async def one(msg: Message) -> None:
            async with limit:
                await self._process(msg)

        await asyncio.gather(*(one(m) for m in msgs))

    async def _process(self, msg: Message) -> None:
        try:
            decoded = self.serde.decode(
                msg.value(),
                topic=msg.topic(),
                partition=msg.partition(),
                offset=msg.offset(),
                expect=NOTIFICATION_INTENT,
            )
            intent = NotificationIntent.from_avro(decoded.record)
        except DecodeError as e:
            log.warning("dead-lettering %s to %s: %s", _where(msg), self.dlq, e)
            self.stats.undecodable += 1
            self._dead_letter(msg, e, attempts=0)
            return
        except Exception as e:  # a record that decodes but does not make an intent
            log.warning(
                "dead-lettering %s to %s: %s: %s", _where(msg), self.dlq, type(e).__name__, e
            )
            self.stats.undecodable += 1
            self._dead_letter(msg, e, attempts=0)
            return
        await self._deliver(msg, intent)

    async def _deliver(self, msg: Message, intent: NotificationIntent) -> None:
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            result = await self._send(intent)
            if result.outcome is Outcome.SENT:
                self.stats.sent += 1
                self._status(intent, DeliveryState.SENT, attempt, result)
                return
            if result.outcome is Outcome.REJECTED:
                self.stats.rejected += 1
                log.info(
                    "%s rejected %s: %s", self.channel, intent.notification_id, result.response
                )
                self._status(intent, DeliveryState.REJECTED, attempt, result)
                self._dead_letter(msg, _ProviderError(result), attempts=attempt)
                return
            if attempt >= s.sink_max_attempts:
                self.stats.dead += 1
                self._status(intent, DeliveryState.DEAD, attempt, result)
                self._dead_letter(msg, _ProviderError(result), attempts=attempt)
                return
            self.stats.retries += 1
            self._status(intent, DeliveryState.RETRYING, attempt, result)
            await self._sleep(self._backoff(attempt, result.retry_after))

    async def _send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            return await self.connector.send(intent)
        except Exception as e:  # a connector bug or an unexpected failure: try again later
            log.exception("%s connector raised for %s", self.channel, intent.notification_id)
            return DeliveryResult.retryable(type(e).__name__, str(e))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Capped exponential backoff with full jitter; a provider's Retry-After wins."""
        s = self.settings
        cap = min(s.sink_retry_backoff_max_ms, s.sink_retry_backoff_ms * 2 ** (attempt - 1))
        delay = random.uniform(0, cap) / 1000  # noqa: S311 - jitter, not crypto
        return max(delay, retry_after or 0.0)

    # -- output ------------------------------------------------------------------------------

    def _status(
        self, intent: NotificationIntent, state: DeliveryState, attempts: int, r: DeliveryResult
    ) -> None:
        status = DeliveryStatus(
            notification_id=intent.notification_id,
            generation=intent.generation,
            event_id=intent.event_id,
            channel=self.channel,
            recipient=intent.recipient,
            state=state,
            attempts=attempts,
            provider_message_id=r.provider_message_id,
            provider_response=safe_header_text(r.response) if r.response else None,
            error_class=r.error_class,
        )
        value, ref = self.serde.encode(DELIVERY_STATUS, status.to_avro())
        self._produce(
            self.topics.status,
            intent.notification_id.encode(),
            value,
            [
                (h.NOTIFICATION_ID, intent.notification_id.encode()),
                (h.EVENT_ID, intent.event_id.encode()),
                (h.SCHEMA, ref.encode()),
            ],
        )

    def _dead_letter(self, msg: Message, error: BaseException, attempts: int) -> None:
        topic, partition, offset = _coords(msg)
        dl = dead_letter(
            self.dlq,
            key=msg.key(),
            value=msg.value(),
            headers=h.pairs(msg.headers()),
            topic=topic,
            partition=partition,
            offset=offset,
            error=error,
            attempts=attempts,
            error_class=error.result.error_class if isinstance(error, _ProviderError) else None,
        )
        self._produce(dl.topic, dl.key, dl.value, dl.headers)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, hdrs: h.Headers) -> None:
        assert self._producer is not None  # noqa: S101 - set in run()
        while True:
            try:
                self._producer.produce(topic, value, key, headers=hdrs, on_delivery=self._acked)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _acked(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._produce_errors.append(err)

    async def _flush_producer(self) -> None:
        assert self._producer is not None  # noqa: S101 - set in run()
        producer = self._producer
        remaining = await asyncio.get_running_loop().run_in_executor(None, producer.flush, 60)
        if remaining or self._produce_errors:
            errors, self._produce_errors = self._produce_errors, []
            # Without these records acknowledged the batch must not be committed: stop, and
            # the records are processed again after restart (the sink is idempotent by id).
            raise KafkaException(errors[0] if errors else KafkaError(KafkaError._MSG_TIMED_OUT))


class _ProviderError(Exception):
    """The provider's final answer, as the error recorded in dead-letter headers."""

    def __init__(self, result: DeliveryResult) -> None:
        self.result = result
        super().__init__(result.response or result.error_class or result.outcome.value)


def _coords(msg: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (never None for a record without
    an error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"record without coordinates: {msg.error()}")
    return topic, partition, offset


def _where(msg: Message) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


def _tps(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
