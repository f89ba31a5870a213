"""Reading topics back as JSON: what ``herald tail`` prints."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from pipeline import headers as h
from pipeline.serialization import AvroSerde, DecodeError
from pipeline.settings import HeraldSettings

__all__ = ["message_to_json", "read_topics", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def message_to_json(msg: Message, serde: AvroSerde) -> str:
    """One JSON line: coordinates, key, headers and the decoded value (or why it could not
    be decoded, with the raw bytes in base64)."""
    key = msg.key()
    out: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "timestamp": msg.timestamp()[1],
        "key": key.decode("utf-8", errors="replace") if key is not None else None,
        "headers": h.as_dict(msg.headers()),
    }
    try:
        decoded = serde.decode(
            msg.value(), topic=msg.topic(), partition=msg.partition(), offset=msg.offset()
        )
    except DecodeError as e:
        out["error"] = f"{type(e).__name__}: {e.reason}"
        value = msg.value()
        out["value_base64"] = base64.b64encode(value).decode() if value is not None else None
    else:
        out["schema"] = decoded.writer
        out["value"] = to_jsonable(decoded.record)
    return json.dumps(out, ensure_ascii=False)


def read_topics(
    settings: HeraldSettings, topics: list[str], since: datetime | None = None
) -> Iterator[Message]:
    """Every committed record of ``topics`` (those that exist), from ``since`` (or the
    start) up to each partition's end as of the call; so a read always finishes."""
    conf = settings.consumer_config(f"herald-inspect-{uuid.uuid4()}")
    conf.pop("group.instance.id", None)  # never take a sink's static membership
    conf["enable.partition.eof"] = True
    consumer = Consumer(conf)
    try:
        existing = consumer.list_topics(timeout=10).topics
        ends: dict[tuple[str, int], int] = {}
        starts: list[TopicPartition] = []
        for topic in topics:
            md = existing.get(topic)
            if md is None or md.error is not None:
                continue
            for p in md.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high <= low:
                    continue
                start = low
                if since is not None:
                    [found] = consumer.offsets_for_times(
                        [TopicPartition(topic, p, int(since.timestamp() * 1000))], timeout=10
                    )
                    start = found.offset if found.offset >= 0 else high
                if start < high:
                    ends[(topic, p)] = high
                    starts.append(TopicPartition(topic, p, start))
        if not starts:
            return
        consumer.assign(starts)
        while ends:
            msg = consumer.poll(1.0)
            if msg is None:
                # Transaction markers take offsets: compare positions, not record offsets.
                positions = consumer.position([TopicPartition(t, p) for t, p in ends])
                for tp in positions:
                    if tp.offset >= ends[(tp.topic, tp.partition)]:
                        ends.pop((tp.topic, tp.partition), None)
                continue
            tp_key = (str(msg.topic()), int(msg.partition() or 0))
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    ends.pop(tp_key, None)
                continue
            if tp_key in ends:
                yield msg
                if int(msg.offset() or 0) + 1 >= ends[tp_key]:
                    ends.pop(tp_key, None)
    finally:
        consumer.close()
