"""Writing and reading the people topics outside the router: what the API and the CLI use.

The topics are the only place this state lives. A write is one record (or a tombstone)
acknowledged by Kafka; a read finds the latest record for a key by reading the key's
partition from its start to its end as of the read (the topics are compacted, so that is
about one record per key), or the latest record of every key for a listing.

Keys are partitioned as librdkafka's default partitioner does (``consistent_random``: CRC-32
of the key modulo the partition count), which is what Herald's publisher uses for events: a
user's subscriber and preferences records land in the partition of that user's events.
"""

from __future__ import annotations

import threading
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from pipeline import headers as h
from pipeline.serialization import AvroSerde
from pipeline.settings import HeraldSettings

__all__ = ["PeopleStore", "StoreError", "partition_for"]


class StoreError(RuntimeError):
    """Kafka did not answer or refused a write; the message says which topic."""


def partition_for(key: str, partitions: int) -> int:
    """The partition librdkafka's default partitioner gives a non-empty key (CRC-32, as
    zlib computes it, modulo the partition count)."""
    return zlib.crc32(key.encode()) % partitions


class PeopleStore:
    """Reads and writes people records. Thread-safe; the producer is made on first use."""

    def __init__(self, settings: HeraldSettings, serde: AvroSerde) -> None:
        self.settings = settings
        self.serde = serde
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    # -- writing ------------------------------------------------------------------------------

    def write(
        self, topic: str, key: str, full_name: str | None, record: dict[str, Any] | None
    ) -> tuple[int, int]:
        """Write ``record`` (encoded as ``full_name``) under ``key``, or a tombstone when
        ``record`` is None; returns (partition, offset) once Kafka acknowledged it."""
        value: bytes | None = None
        hdrs: h.Headers = []
        if record is not None and full_name is not None:
            value, ref = self.serde.encode(full_name, record)
            hdrs = h.for_record(schema_ref=ref)
        result: dict[str, Any] = {}

        def done(err: KafkaError | None, msg: Message) -> None:
            result["err"], result["msg"] = err, msg

        with self._lock:
            if self._producer is None:
                self._producer = Producer(self.settings.producer_config())
            producer = self._producer
        producer.produce(topic, value, key.encode(), headers=hdrs, on_delivery=done)
        producer.flush(30)
        if "msg" not in result:
            raise StoreError(f"no acknowledgement from Kafka within 30s for {topic}")
        if result["err"] is not None:
            raise StoreError(f"{topic}: {result['err']}")
        msg = result["msg"]
        return int(msg.partition()), int(msg.offset())

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.flush(10)
                self._producer = None

    # -- reading ------------------------------------------------------------------------------

    def latest(self, topic: str, key: str) -> Message | None:
        """The latest record of ``key`` in ``topic`` (None when there is none, or the latest
        is a tombstone): its partition read from the start to its end as of the call."""
        found: Message | None = None
        wanted = key.encode()
        consumer = self._consumer()
        try:
            partitions = self._partitions(consumer, topic)
            p = partition_for(key, partitions)
            for msg in self._read(consumer, [TopicPartition(topic, p)]):
                if msg.key() == wanted:
                    found = msg
        finally:
            consumer.close()
        if found is None or found.value() is None:
            return None
        return found

    def all_latest(self, topic: str) -> dict[str, Message]:
        """The latest record of every key in ``topic``, tombstoned keys left out."""
        latest: dict[str, Message] = {}
        consumer = self._consumer()
        try:
            n = self._partitions(consumer, topic)
            for msg in self._read(consumer, [TopicPartition(topic, p) for p in range(n)]):
                key = (msg.key() or b"").decode("utf-8", errors="replace")
                if msg.value() is None:
                    latest.pop(key, None)
                else:
                    latest[key] = msg
        finally:
            consumer.close()
        return latest

    def _consumer(self) -> Consumer:
        conf = self.settings.consumer_config(f"herald-people-read-{uuid.uuid4()}")
        conf.pop("group.instance.id", None)  # never take a sink's static membership
        return Consumer(conf)

    @staticmethod
    def _partitions(consumer: Consumer, topic: str) -> int:
        try:
            md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as e:
            raise StoreError(f"{topic}: {e.args[0]}") from e
        if md is None or md.error is not None or not md.partitions:
            raise StoreError(f"topic {topic} does not exist (run `herald topics ensure`)")
        return len(md.partitions)

    @staticmethod
    def _read(consumer: Consumer, tps: list[TopicPartition]) -> Iterator[Message]:
        """Every committed record of ``tps`` up to their ends as of the call, in order per
        partition."""
        ends: dict[tuple[str, int], int] = {}
        starts = []
        for tp in tps:
            try:
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
            except KafkaException as e:
                raise StoreError(f"{tp.topic}[{tp.partition}]: {e.args[0]}") from e
            if high > low:
                ends[(tp.topic, tp.partition)] = high
                starts.append(TopicPartition(tp.topic, tp.partition, low))
        if not starts:
            return
        consumer.assign(starts)
        idle = 0
        while ends:
            msg = consumer.poll(0.5)
            if msg is None:
                idle += 1
                if idle > 60:
                    raise StoreError("reading the people topics timed out")
                # Transaction markers and compacted gaps take offsets: compare positions.
                for pos in consumer.position([TopicPartition(t, p) for t, p in ends]):
                    if pos.offset >= ends[(pos.topic, pos.partition)]:
                        ends.pop((pos.topic, pos.partition), None)
                continue
            idle = 0
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise StoreError(str(err))
                continue
            where = (str(msg.topic()), int(msg.partition() or 0))
            if where in ends:
                yield msg
                if int(msg.offset() or 0) + 1 >= ends[where]:
                    ends.pop(where)
