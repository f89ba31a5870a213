"""Publisher.build and _parse_timestamps: the record a producing service would send (no
Kafka involved)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.publisher import OversizedRecordError, Publisher, _parse_timestamps
from pipeline.schemas import SchemaError, SchemaSet
from pipeline.serialization import AvroSerde
from pipeline.settings import HeraldSettings


@pytest.fixture
def publisher(serde: AvroSerde) -> Publisher:
    # The Kafka producer is created on first publish; build() never needs it.
    return Publisher(HeraldSettings(), producer_name="unit", serde=serde)


def test_build_fills_the_envelope(publisher: Publisher) -> None:
    et, record = publisher.build(
        "user-registered", {"user_id": "u-1", "email": "a@example.com", "display_name": "A"}
    )
    assert et.full_name == "herald.events.UserRegistered"
    env = record["envelope"]
    assert uuid.UUID(env["event_id"])
    assert env["occurred_at"].tzinfo is not None
    assert env["producer"] == "unit"
    assert env["traceparent"].startswith("00-") and env["traceparent"].endswith("-01")
    publisher.serde.validate(et.full_name, record)


def test_build_keeps_a_given_envelope(publisher: Publisher) -> None:
    given = {"event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e", "producer": "shop"}
    _, record = publisher.build("user-registered", {"envelope": given, "user_id": "u"})
    assert record["envelope"]["event_id"] == given["event_id"]
    assert record["envelope"]["producer"] == "shop"


def test_build_unknown_event_type(publisher: Publisher) -> None:
    with pytest.raises(SchemaError, match="unknown event type"):
        publisher.build("nope", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-06T07:08:09Z", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06T07:08:09", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06T09:08:09+02:00", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
    ],
    ids=["zulu", "naive-is-utc", "offset"],
)
def test_iso_timestamps_are_parsed(schemas: SchemaSet, text: str, expected: datetime) -> None:
    schema = schemas.latest("herald.events.PasswordResetRequested").definition
    record: dict[str, Any] = {"envelope": {"occurred_at": text}, "expires_at": text, "email": text}
    out = _parse_timestamps(schema, record)
    assert out["envelope"]["occurred_at"] == expected
    assert out["expires_at"] == expected
    assert out["email"] == text  # a string field stays a string
    assert record["expires_at"] == text  # the input is not modified


USER = {"user_id": "u-1", "email": "a@example.com", "display_name": "A"}


def test_prepare_counts_value_key_and_headers(serde: AvroSerde) -> None:
    roomy = Publisher(HeraldSettings(), producer_name="unit", serde=serde)
    event, record = roomy.prepare("user-registered", USER)
    headers = sum(len(k) + len(v or b"") for k, v in record.headers)
    assert record.size == len(record.value) + len(b"u-1") + headers
    assert record.key == event.key == "u-1"
    fixed = {"event_id": event.event_id, "producer": "unit", "traceparent": "00-" + "a" * 52}
    envelope = {"envelope": {**fixed, "occurred_at": "2025-03-01T12:00:00Z"}}
    sized = roomy.prepare("user-registered", {**USER, **envelope})[1].size

    exact = Publisher(HeraldSettings(max_record_bytes=sized), serde=serde)
    exact.prepare("user-registered", {**USER, **envelope})  # at the limit: accepted
    # One byte less: the value alone would fit, value, key and headers do not.
    tight = Publisher(HeraldSettings(max_record_bytes=sized - 1), serde=serde)
    with pytest.raises(OversizedRecordError, match=f"{sized} bytes encoded") as err:
        tight.prepare("user-registered", {**USER, **envelope})
    assert (err.value.size, err.value.limit) == (sized, sized - 1)
    assert len(record.value) < sized - 1
