"""Herald's own records and their Avro mapping."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError

from pipeline.records import (
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    DeliveryState,
    DeliveryStatus,
    NotificationIntent,
    notification_id,
)
from pipeline.serialization import AvroSerde
from tests.unit.unit_helpers import NOW

EVENT_ID = "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e"


def intent(**overrides: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id(EVENT_ID, "welcome-email", "email", "a@example.com"),
        "event_id": EVENT_ID,
        "event_type": "user-registered",
        "rule": "welcome-email",
        "channel": "email",
        "recipient": "a@example.com",
        "body_text": "Hi",
        "subject": "Welcome",
        "body_html": "<p>Hi</p>",
        "user_id": "u-1",
        "data": {"k": "v"},
        "created_at": NOW,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    fields.update(overrides)
    return NotificationIntent(**fields)


@pytest.mark.parametrize(
    "value",
    [
        intent(),
        intent(subject=None, body_html=None, user_id=None, data={}, traceparent=None),
        intent(generation=3),
    ],
    ids=["full", "minimal", "redelivery"],
)
def test_intent_avro_round_trip(serde: AvroSerde, value: NotificationIntent) -> None:
    data, _ = serde.encode(NOTIFICATION_INTENT, value.to_avro())
    decoded = serde.decode(data, expect=NOTIFICATION_INTENT)
    back = NotificationIntent.from_avro(decoded.record)
    assert back == value
    assert isinstance(back.notification_id, str) and isinstance(back.event_id, str)
    assert back.created_at.tzinfo is not None


def test_intent_from_avro_accepts_epoch_millis() -> None:
    record = intent().to_avro()
    record["created_at"] = int(NOW.timestamp() * 1000)
    record["notification_id"] = uuid.UUID(record["notification_id"])
    record["data"] = None
    back = NotificationIntent.from_avro(record)
    assert back.created_at == NOW
    assert back.data == {}
    assert back.notification_id == intent().notification_id


def test_idempotency_key_per_generation() -> None:
    first = intent()
    assert first.idempotency_key == first.notification_id
    again = dataclasses.replace(first, generation=1)
    assert again.idempotency_key != first.notification_id
    assert uuid.UUID(again.idempotency_key)
    assert again.idempotency_key == dataclasses.replace(first, generation=1).idempotency_key
    assert dataclasses.replace(first, generation=2).idempotency_key != again.idempotency_key


def test_delivery_status_avro_round_trip(serde: AvroSerde) -> None:
    status = DeliveryStatus(
        notification_id=intent().notification_id,
        channel="email",
        recipient="a@example.com",
        state=DeliveryState.REJECTED,
        attempts=2,
        generation=1,
        event_id=EVENT_ID,
        provider_response="550 5.1.1 Mailbox unavailable",
        error_class="SMTPRecipientRefused",
        occurred_at=datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
    )
    data, _ = serde.encode(DELIVERY_STATUS, status.to_avro())
    back = DeliveryStatus.from_avro(serde.decode(data, expect=DELIVERY_STATUS).record)
    assert back == status
    assert back.state is DeliveryState.REJECTED


def test_throttled_status_round_trip(serde: AvroSerde) -> None:
    status = DeliveryStatus(
        notification_id=intent().notification_id,
        channel="webhook",
        recipient="https://example.com/hook",
        state=DeliveryState.THROTTLED,
        attempts=0,
        provider_response="429 Too Many Requests",
        error_class="HTTP429",
        occurred_at=datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
    )
    data, _ = serde.encode(DELIVERY_STATUS, status.to_avro())
    back = DeliveryStatus.from_avro(serde.decode(data, expect=DELIVERY_STATUS).record)
    assert back == status


def _status_versions(serde: AvroSerde) -> tuple[Any, Any]:
    v1, v2 = serde.schemas.versions(DELIVERY_STATUS)[:2]
    return v1.parsed, v2.parsed


def test_a_v1_reader_fails_on_throttled_and_reads_every_other_state(
    serde: AvroSerde,
) -> None:
    """Adding an enum symbol is backward compatible (v2 reads every v1 record) but not
    forward: a reader on DeliveryStatus.v1, which has no enum default, fails on THROTTLED.
    That is the one record a v1 reader cannot read; everything else it reads as before."""
    v1, v2 = _status_versions(serde)
    record = DeliveryStatus(
        notification_id=intent().notification_id,
        channel="email",
        recipient="a@example.com",
        state=DeliveryState.THROTTLED,
        attempts=0,
    ).to_avro()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2, record)
    with pytest.raises(SchemaResolutionError, match="THROTTLED"):
        fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v2, v1)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2, {**record, "state": "SENT"})
    assert fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v2, v1)["state"] == "SENT"


def test_a_v2_reader_reads_a_state_added_later_as_retrying(serde: AvroSerde) -> None:
    _, v2 = _status_versions(serde)
    future = json.loads(json.dumps(serde.schemas.versions(DELIVERY_STATUS)[1].definition))
    state = next(f for f in future["fields"] if f["name"] == "state")
    state["type"]["symbols"].append("SUPPRESSED")
    writer = fastavro.parse_schema(future)
    record = DeliveryStatus(
        notification_id=intent().notification_id,
        channel="email",
        recipient="a@example.com",
        state=DeliveryState.SENT,
        attempts=0,
    ).to_avro()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, {**record, "state": "SUPPRESSED"})
    read = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), writer, v2)
    assert read["state"] == "RETRYING"
