"""Reading topics to their end, for assertions."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    # A fresh client can hit a stale leader (e.g. right after topic creation): retry.
    for attempt in range(20):
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            return int(low), int(high)
        except KafkaException as e:
            if attempt == 19 or (
                not e.args[0].retriable()
                and e.args[0].code()
                not in (
                    KafkaError.NOT_LEADER_FOR_PARTITION,
                    KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                )
            ):
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def read_all(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Message]:
    """Every committed record in ``topic`` up to its end as of the call."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"assert-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        ends: dict[int, int] = {}
        for p in md.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, p))
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append(msg)
            # Positions, not offsets of returned records: transaction markers take offsets too.
            for tp in consumer.position([TopicPartition(topic, p) for p in list(ends)]):
                if tp.offset >= ends[tp.partition]:
                    ends.pop(tp.partition)
        return out
    finally:
        consumer.close()
