"""Publishing domain events: what producing services (and ``herald publish``) call.

    publisher = Publisher(HeraldSettings(), producer_name="accounts-service")
    publisher.publish("user-registered", {"user_id": "u-1", "email": ..., "display_name": ...})
    publisher.flush()

The envelope is filled in when absent (event_id, occurred_at, producer, traceparent); the record
is validated against the newest schema version before anything is sent, keyed by the event's
key field (the user id) as UTF-8, with headers that Kafka's console tools print as text.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pipeline import headers as h
from pipeline.schemas import EventType
from pipeline.serialization import AvroSerde, serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["PublishError", "PublishedEvent", "Publisher", "new_traceparent"]

CONTENT_TYPE = "application/avro"


class PublishError(RuntimeError):
    """Kafka did not accept the event."""


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
        envelope.setdefault("traceparent", new_traceparent())
        record["envelope"] = envelope
        schema = self.serde.schemas.latest(et.full_name)
        return et, _parse_timestamps(schema.definition, record)

    def publish(
        self, event_type: str, data: dict[str, Any], *, on_delivery: Any = None
    ) -> PublishedEvent:
        """Validate, encode and enqueue one event. Delivery is asynchronous: call flush()
        (or use publish_sync) to know it was written. Raises RecordValidationError naming
        the offending fields."""
        et, record = self.build(event_type, data)
        value, schema_ref = self.serde.encode(et.full_name, record)
        key = str(record[et.key_field])
        envelope = record["envelope"]
        event_id = str(envelope["event_id"])
        topic = self.topics.events(et.domain)
        hdrs: h.Headers = [
            (h.EVENT_TYPE, et.name.encode()),
            (h.EVENT_ID, event_id.encode()),
            (h.CONTENT_TYPE, CONTENT_TYPE.encode()),
            (h.SCHEMA, schema_ref.encode()),
        ]
        if envelope.get("traceparent"):
            hdrs.append((h.TRACEPARENT, str(envelope["traceparent"]).encode()))
        self._produce(topic, key, value, hdrs, on_delivery)
        return PublishedEvent(et.name, event_id, topic, key)

    def publish_sync(
        self, event_type: str, data: dict[str, Any], timeout: float = 30.0
    ) -> PublishedEvent:
        """Publish and wait until Kafka acknowledged the write."""
        result: dict[str, Any] = {}

        def done(err: KafkaError | None, msg: Message) -> None:
            result["err"], result["msg"] = err, msg

        event = self.publish(event_type, data, on_delivery=done)
        self._producer.flush(timeout)
        if "msg" not in result:
            raise PublishError(f"no acknowledgement from Kafka within {timeout}s for {event.topic}")
        if result["err"] is not None:
            raise PublishError(f"{event.topic}: {result['err']}")
        msg = result["msg"]
        return PublishedEvent(
            event.event_type, event.event_id, event.topic, event.key, msg.partition(), msg.offset()
        )

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding events; returns how many are still not acknowledged."""
        return int(self._producer.flush(timeout))

    def _produce(self, topic: str, key: str, value: bytes, hdrs: h.Headers, cb: Any) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key.encode(), headers=hdrs, on_delivery=cb)
                return
            except BufferError:
                self._producer.poll(0.1)  # local queue full: let deliveries drain


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
