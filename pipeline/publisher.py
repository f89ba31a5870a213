"""Publishing domain events: what producing services (and ``herald publish``) call.

    publisher = Publisher(HeraldSettings(), producer_name="accounts-service")
    publisher.publish("user-registered", {"user_id": "u-1", "email": ..., "display_name": ...})
    publisher.flush()

The envelope is filled in when absent (event_id, occurred_at, producer, traceparent); the record
is validated against the newest schema version before anything is sent, keyed by the event's
key field (the user id) as UTF-8, with headers that Kafka's console tools print as text.

A record whose encoded size (value, key and headers) is over ``HERALD_MAX_RECORD_BYTES`` is
refused before it is produced (``OversizedRecordError``): every reader refuses a record over
that limit, so writing it would only make a dead letter.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pipeline import headers as h
from pipeline import tracing
from pipeline.schemas import EventType
from pipeline.serialization import AvroSerde, serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = [
    "OutgoingRecord",
    "OversizedRecordError",
    "PublishError",
    "PublishedEvent",
    "Publisher",
    "new_traceparent",
]

CONTENT_TYPE = h.AVRO


class PublishError(RuntimeError):
    """Kafka did not accept the event."""


class OversizedRecordError(ValueError):
    """An encoded record is over the record limit; nothing was written. Make the record
    smaller (or raise HERALD_MAX_RECORD_BYTES everywhere, brokers' max.message.bytes too)."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        self.topic = topic
        self.size = size
        self.limit = limit
        super().__init__(
            f"a record for {topic} would be {size} bytes encoded (value, key and headers), "
            f"over the {limit}-byte limit (HERALD_MAX_RECORD_BYTES)"
        )


@dataclass(frozen=True)
class OutgoingRecord:
    """An encoded record, ready to produce."""

    topic: str
    key: str
    value: bytes
    headers: h.Headers

    @property
    def size(self) -> int:
        """The bytes counted against the record limit: value, key, header names and values.
        (Kafka adds a few bytes of framing; the readers check the value alone.)"""
        headers = sum(len(k.encode()) + len(_bytes(v)) for k, v in self.headers)
        return len(self.value) + len(self.key.encode()) + headers


def _bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


@dataclass(frozen=True)
class PublishedEvent:
    event_type: str
    event_id: str
    topic: str
    key: str
    partition: int | None = None
    offset: int | None = None


def new_traceparent() -> str:
    """A fresh W3C traceparent (version 00, sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class Publisher:
    def __init__(
        self,
        settings: HeraldSettings,
        *,
        producer_name: str = "herald",
        serde: AvroSerde | None = None,
        producer: Producer | None = None,
    ) -> None:
        self.settings = settings
        self.producer_name = producer_name
        self.serde = serde or serde_from_settings(settings)
        self.topics = Topics(settings.topic_prefix)
        self._client = producer

    @property
    def _producer(self) -> Producer:
        # Created on first use, so validating input needs no broker.
        if self._client is None:
            self._client = Producer(self.settings.producer_config())
        return self._client

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Wait for outstanding events, then close the schema registry client, if any."""
        if self._client is not None:
            self._client.flush(timeout)
            self._client = None  # librdkafka's threads end when the client is released
        self.serde.close()

    def build(self, event_type: str, data: dict[str, Any]) -> tuple[EventType, dict[str, Any]]:
        """The full record for ``data``: envelope filled in, timestamps parsed. Raises
        SchemaError for an unknown event type."""
        et = self.serde.schemas.event_type(event_type)
        record = dict(data)
        envelope = dict(record.get("envelope") or {})
        envelope.setdefault("event_id", str(uuid.uuid4()))
        envelope.setdefault("occurred_at", datetime.now(UTC))
        envelope.setdefault("producer", self.producer_name)
        if tracing.enabled():
            # The event carries the publish span: its parent is the caller's traceparent.
            with tracing.span(
                f"herald.publish {et.name}",
                parent=envelope.get("traceparent"),
                kind="producer",
                attributes={
                    "herald.event_type": et.name,
                    "herald.event_id": str(envelope["event_id"]),
                    "messaging.system": "kafka",
                    "messaging.destination.name": self.topics.events(et.domain),
                },
            ) as span:
                if span is not None:
                    envelope["traceparent"] = span.traceparent
        envelope.setdefault("traceparent", new_traceparent())
        record["envelope"] = envelope
        schema = self.serde.schemas.latest(et.full_name)
        return et, _parse_timestamps(schema.definition, record)

    def prepare(
        self, event_type: str, data: dict[str, Any]
    ) -> tuple[PublishedEvent, OutgoingRecord]:
        """Validate, encode and size-check one event without writing it. Raises SchemaError
        (unknown event type), RecordValidationError (naming the offending fields) or
        OversizedRecordError."""
        et, record = self.build(event_type, data)
        value, schema_ref = self.serde.encode(et.full_name, record)
        key = str(record[et.key_field])
        envelope = record["envelope"]
        event_id = str(envelope["event_id"])
        topic = self.topics.events(et.domain)
        hdrs = h.for_record(
            schema_ref=schema_ref,
            event_type=et.name,
            event_id=event_id,
            traceparent=envelope.get("traceparent"),
        )
        out = self.check_size(OutgoingRecord(topic, key, value, hdrs))
        return PublishedEvent(et.name, event_id, topic, key), out

    def check_size(self, record: OutgoingRecord) -> OutgoingRecord:
        """``record``, if it is within the record limit; else OversizedRecordError."""
        if record.size > self.settings.max_record_bytes:
            raise OversizedRecordError(record.topic, record.size, self.settings.max_record_bytes)
        return record

    def publish(
        self, event_type: str, data: dict[str, Any], *, on_delivery: Any = None
    ) -> PublishedEvent:
        """Validate, encode and enqueue one event. Delivery is asynchronous: call flush()
        (or use publish_sync) to know it was written. Raises what prepare() raises."""
        event, record = self.prepare(event_type, data)
        self.produce(record, on_delivery)
        return event

    def publish_sync(
        self, event_type: str, data: dict[str, Any], timeout: float = 30.0
    ) -> PublishedEvent:
        """Publish and wait until Kafka acknowledged the write."""
        event, record = self.prepare(event_type, data)
        partition, offset = self.write_sync(record, timeout)
        return replace(event, partition=partition, offset=offset)

    def write_sync(self, record: OutgoingRecord, timeout: float = 30.0) -> tuple[int, int]:
        """Produce ``record`` and wait until Kafka acknowledged it; returns its partition and
        offset. Raises PublishError when Kafka refused it or did not answer in time."""
        result: dict[str, Any] = {}

        def done(err: KafkaError | None, msg: Message) -> None:
            result["err"], result["msg"] = err, msg

        self.produce(record, done)
        self._producer.flush(timeout)
        if "msg" not in result:
            raise PublishError(
                f"no acknowledgement from Kafka within {timeout}s for {record.topic}"
            )
        if result["err"] is not None:
            raise PublishError(f"{record.topic}: {result['err']}")
        msg = result["msg"]
        return int(msg.partition()), int(msg.offset())

    def produce(self, record: OutgoingRecord, on_delivery: Any = None) -> None:
        """Enqueue ``record`` (waiting while the local queue is full)."""
        while True:
            try:
                self._producer.produce(
                    record.topic,
                    record.value,
                    record.key.encode(),
                    headers=record.headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.1)  # local queue full: let deliveries drain

    def reachable(self, timeout: float = 2.0) -> bool:
        """Whether a broker answers a metadata request within ``timeout`` seconds."""
        try:
            self._producer.list_topics(timeout=timeout)
        except Exception:  # KafkaException on timeout or transport failure
            return False
        return True

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding events; returns how many are still not acknowledged."""
        return int(self._producer.flush(timeout))


def _parse_timestamps(schema: Any, value: Any) -> Any:
    """Accept ISO-8601 strings for timestamp-millis fields (handy in JSON input)."""
    if isinstance(schema, dict):
        if schema.get("logicalType") == "timestamp-millis" and isinstance(value, str):
            ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        if schema.get("type") == "record" and isinstance(value, dict):
            out = dict(value)
            for f in schema["fields"]:
                if f["name"] in out:
                    out[f["name"]] = _parse_timestamps(f["type"], out[f["name"]])
            return out
        if schema.get("type") == "array" and isinstance(value, list):
            return [_parse_timestamps(schema["items"], v) for v in value]
        if isinstance(schema.get("type"), dict | list):
            return _parse_timestamps(schema["type"], value)
    if isinstance(schema, list) and value is not None:
        for branch in schema:
            if branch != "null":
                return _parse_timestamps(branch, value)
    return value
