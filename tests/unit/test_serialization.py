"""AvroSerde: both framings, detection from the first bytes, schema resolution, typed errors."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.schemas import SchemaSet
from pipeline.serialization import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MAGIC,
    AvroSerde,
    DecodeError,
    MalformedRecordError,
    RecordTooLargeError,
    RecordValidationError,
    UnexpectedSchemaError,
    UnknownFramingError,
    UnknownSchemaError,
)
from tests.unit.unit_helpers import (
    ORDER_SHIPPED,
    RESET_REQUESTED,
    USER_REGISTERED,
    envelope,
    order_shipped,
    user_registered,
)


def mock_registry() -> Any:
    """An in-memory registry (confluent-kafka's mock:// client; one store per instance)."""
    if hasattr(SchemaRegistryClient, "new_client"):
        return SchemaRegistryClient.new_client({"url": "mock://"})
    return SchemaRegistryClient({"url": "mock://test"})  # pragma: no cover - older clients


@pytest.fixture
def registry_serde(schemas: SchemaSet) -> AvroSerde:
    return AvroSerde(schemas, registry=mock_registry())


def _normalize(record: dict[str, Any]) -> dict[str, Any]:
    env = dict(record["envelope"])
    env["event_id"] = str(env["event_id"])
    return {**record, "envelope": env}


def _v1_user_registered() -> dict[str, Any]:
    record = user_registered()
    del record["locale"], record["phone"]
    return record


def _write(schema_parsed: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema_parsed, record)
    return buf.getvalue()


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full_name", "record"),
    [
        (USER_REGISTERED, user_registered()),
        (ORDER_SHIPPED, order_shipped()),
        (
            RESET_REQUESTED,
            {
                "envelope": envelope(),
                "user_id": "u-1",
                "email": "ada@example.com",
                "reset_url": "https://example.com/reset/abc",
                "expires_at": envelope()["occurred_at"],
                "requested_ip": "192.0.2.1",
            },
        ),
    ],
    ids=["user-registered", "order-shipped", "password-reset"],
)
def test_single_object_round_trip(
    serde: AvroSerde, schemas: SchemaSet, full_name: str, record: dict[str, Any]
) -> None:
    data, ref = serde.encode(full_name, record)
    latest = schemas.latest(full_name)
    assert data[:2] == SINGLE_OBJECT_MAGIC
    assert data[2:10] == latest.fingerprint
    assert ref == f"{full_name}@{latest.fingerprint.hex()}"

    decoded = serde.decode(data, expect=full_name)
    assert decoded.schema == latest
    assert decoded.writer == ref
    assert _normalize(decoded.record) == _normalize(record)


def test_confluent_round_trip(registry_serde: AvroSerde, schemas: SchemaSet) -> None:
    record = user_registered()
    data, ref = registry_serde.encode(USER_REGISTERED, record)
    assert data[:1] == CONFLUENT_MAGIC
    (schema_id,) = struct.unpack(">I", data[1:5])
    assert ref == f"{USER_REGISTERED}@registry:{schema_id}"
    # registered under the record's full name (RecordNameStrategy), newest version
    registered = registry_serde.registry.get_schema(schema_id)  # type: ignore[union-attr]
    assert json.loads(registered.schema_str)["name"] == "UserRegistered"
    assert json.loads(registered.schema_str)["namespace"] == "herald.events"

    decoded = registry_serde.decode(data, topic="events.user", partition=0, offset=3)
    assert decoded.schema == schemas.latest(USER_REGISTERED)
    assert decoded.writer == ref
    assert _normalize(decoded.record) == _normalize(record)


def test_confluent_encode_registers_once_per_schema(registry_serde: AvroSerde) -> None:
    first, _ = registry_serde.encode(USER_REGISTERED, user_registered())
    second, _ = registry_serde.encode(USER_REGISTERED, user_registered(user_id="u-2"))
    other, _ = registry_serde.encode(ORDER_SHIPPED, order_shipped())
    assert first[1:5] == second[1:5]
    assert first[1:5] != other[1:5]


def test_a_registry_serde_still_reads_single_object_records(
    serde: AvroSerde, registry_serde: AvroSerde
) -> None:
    """Detection from the first bytes: a topic may hold both framings while migrating."""
    single, _ = serde.encode(USER_REGISTERED, user_registered())
    confluent, _ = registry_serde.encode(USER_REGISTERED, user_registered())
    assert single[:2] == SINGLE_OBJECT_MAGIC and confluent[:1] == CONFLUENT_MAGIC
    a = registry_serde.decode(single)
    b = registry_serde.decode(confluent)
    assert _normalize(a.record) == _normalize(b.record)
    assert "@registry:" in b.writer and "@registry:" not in a.writer


def test_v1_single_object_record_reads_in_newest_shape(
    serde: AvroSerde, schemas: SchemaSet
) -> None:
    v1, newest = schemas.versions(USER_REGISTERED)[0], schemas.latest(USER_REGISTERED)
    record = _v1_user_registered()
    data = SINGLE_OBJECT_MAGIC + v1.fingerprint + _write(v1.parsed, record)

    decoded = serde.decode(data)
    assert decoded.schema == newest
    assert decoded.writer == f"{USER_REGISTERED}@{v1.fingerprint.hex()}"
    assert decoded.record["locale"] is None
    assert _normalize(decoded.record) == _normalize({**record, "locale": None, "phone": None})


def test_v1_confluent_record_reads_in_newest_shape(schemas: SchemaSet) -> None:
    """An old producer registered v1; the reader resolves it to the newest version."""
    registry = mock_registry()
    v1 = schemas.versions(USER_REGISTERED)[0]
    schema_id = registry.register_schema(USER_REGISTERED, RegistrySchema(v1.to_json(), "AVRO"))
    record = _v1_user_registered()
    data = CONFLUENT_MAGIC + struct.pack(">I", schema_id) + _write(v1.parsed, record)

    decoded = AvroSerde(schemas, registry=registry).decode(data)
    assert decoded.schema == schemas.latest(USER_REGISTERED)
    assert decoded.record["locale"] is None
    assert _normalize(decoded.record) == _normalize({**record, "locale": None, "phone": None})


# -- typed decode errors ----------------------------------------------------------------------


def _single(serde: AvroSerde) -> bytes:
    return serde.encode(USER_REGISTERED, user_registered())[0]


Case = Callable[[AvroSerde], tuple[bytes | None, dict[str, Any]]]

DECODE_ERRORS: list[tuple[str, Case, type[DecodeError], str]] = [
    ("bad-magic", lambda s: (b"\x07not avro at all", {}), UnknownFramingError, "0x07"),
    ("json-value", lambda s: (b'{"user_id": "u"}', {}), UnknownFramingError, "magic byte"),
    (
        "unknown-fingerprint",
        lambda s: (SINGLE_OBJECT_MAGIC + b"\xde\xad\xbe\xef" * 2 + _single(s)[10:], {}),
        UnknownSchemaError,
        "deadbeefdeadbeef",
    ),
    ("truncated-header", lambda s: (_single(s)[:6], {}), MalformedRecordError, "header"),
    ("truncated-datum", lambda s: (_single(s)[:-3], {}), MalformedRecordError, "truncated"),
    ("header-only", lambda s: (_single(s)[:10], {}), MalformedRecordError, "truncated"),
    (
        "trailing-bytes",
        lambda s: (_single(s) + b"\x00\x01", {}),
        MalformedRecordError,
        "2 trailing",
    ),
    ("empty", lambda s: (b"", {}), MalformedRecordError, "empty"),
    ("none", lambda s: (None, {}), MalformedRecordError, "empty"),
    (
        "oversized",
        lambda s: (_single(s) + b"\x00" * s.max_record_bytes, {}),
        RecordTooLargeError,
        "limit",
    ),
    (
        "confluent-without-registry",
        lambda s: (CONFLUENT_MAGIC + struct.pack(">I", 7) + b"\x02", {}),
        UnknownSchemaError,
        "no schema registry",
    ),
    ("confluent-truncated-header", lambda s: (b"\x00\x00\x01", {}), MalformedRecordError, "header"),
    (
        "expect-mismatch",
        lambda s: (_single(s), {"expect": "herald.notifications.NotificationIntent"}),
        UnexpectedSchemaError,
        "expected herald.notifications.NotificationIntent, got herald.events.UserRegistered",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [case[1:] for case in DECODE_ERRORS],
    ids=[case[0] for case in DECODE_ERRORS],
)
def test_decode_errors_are_typed_and_say_where(
    serde: AvroSerde, make: Case, error: type[DecodeError], reason: str
) -> None:
    data, kwargs = make(serde)
    with pytest.raises(error) as info:
        serde.decode(data, topic="events.user", partition=2, offset=1234, **kwargs)
    e = info.value
    assert type(e) is error
    assert "events.user[2]@1234" in str(e)
    assert (e.topic, e.partition, e.offset) == ("events.user", 2, 1234)
    assert reason in str(e)


def test_every_truncation_is_malformed(serde: AvroSerde) -> None:
    data = _single(serde)
    for n in range(10, len(data)):
        with pytest.raises(MalformedRecordError):
            serde.decode(data[:n], topic="t", partition=0, offset=n)


def test_unknown_registry_id_is_unknown_schema(registry_serde: AvroSerde) -> None:
    data = CONFLUENT_MAGIC + struct.pack(">I", 4242) + b"\x02"
    with pytest.raises(UnknownSchemaError, match=r"events\.user\[0\]@9: schema id 4242"):
        registry_serde.decode(data, topic="events.user", partition=0, offset=9)


def test_registry_schema_unknown_to_schemas_dir_is_unknown_schema(schemas: SchemaSet) -> None:
    registry = mock_registry()
    foreign = '{"type":"record","name":"Foreign","namespace":"x","fields":[]}'
    schema_id = registry.register_schema("x.Foreign", RegistrySchema(foreign, "AVRO"))
    data = CONFLUENT_MAGIC + struct.pack(">I", schema_id)
    with pytest.raises(UnknownSchemaError, match=r"x\.Foreign"):
        AvroSerde(schemas, registry=registry).decode(data, topic="t", partition=1, offset=2)


def test_without_coordinates_errors_say_record(serde: AvroSerde) -> None:
    with pytest.raises(UnknownFramingError, match=r"^record: "):
        serde.decode(b"\x01\x02")


def test_record_at_the_size_limit_is_read(schemas: SchemaSet) -> None:
    data = AvroSerde(schemas).encode(USER_REGISTERED, user_registered())[0]
    assert AvroSerde(schemas, max_record_bytes=len(data)).decode(data)
    with pytest.raises(RecordTooLargeError):
        AvroSerde(schemas, max_record_bytes=len(data) - 1).decode(data)


# -- validation -------------------------------------------------------------------------------

CANARY = "s3cr3t-hunter2-do-not-log"


def test_validation_names_the_missing_field(serde: AvroSerde) -> None:
    record = user_registered()
    del record["email"]
    with pytest.raises(RecordValidationError) as info:
        serde.encode(USER_REGISTERED, record)
    assert info.value.fields == ["email"]
    assert info.value.schema == USER_REGISTERED
    assert "email" in str(info.value)
    assert "missing" in str(info.value)


def test_validation_names_the_wrongly_typed_field_without_its_value(serde: AvroSerde) -> None:
    record = user_registered(user_id=987654321, display_name=CANARY)
    with pytest.raises(RecordValidationError) as info:
        serde.validate(USER_REGISTERED, record)
    assert info.value.fields == ["user_id"]
    assert "user_id: got int, expected string" in str(info.value)
    assert "987654321" not in str(info.value)
    assert CANARY not in str(info.value)


def test_validation_names_nested_fields_by_their_path(serde: AvroSerde) -> None:
    """``fields`` holds field paths in the record (envelope.producer), not the name of the
    nested record type (herald.Envelope.producer), which the caller never wrote."""
    record = user_registered(envelope=envelope(producer=None))
    with pytest.raises(RecordValidationError) as info:
        serde.validate(USER_REGISTERED, record)
    assert info.value.fields == ["envelope.producer"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("email", {"token": CANARY}), ("locale", [CANARY]), ("user_id", CANARY.encode())],
    ids=["dict-in-string", "list-in-union", "bytes-in-string"],
)
def test_validation_errors_never_include_the_value(
    serde: AvroSerde, field: str, value: Any
) -> None:
    with pytest.raises(RecordValidationError) as info:
        serde.encode(USER_REGISTERED, user_registered(**{field: value}))
    # a union mismatch is reported once per branch, so the field may be named twice
    assert set(info.value.fields) == {field}
    assert CANARY not in str(info.value)
    assert CANARY not in repr(info.value)
    assert all(CANARY not in problem for _, problem in info.value.problems)


def test_secret_in_a_wrongly_typed_timestamp_is_not_echoed(serde: AvroSerde) -> None:
    record = {
        "envelope": envelope(),
        "user_id": "u-1",
        "email": "ada@example.com",
        "reset_url": "https://example.com/reset/x",
        "expires_at": CANARY,
    }
    with pytest.raises(RecordValidationError) as info:
        serde.encode(RESET_REQUESTED, record)
    assert info.value.fields == ["expires_at"]
    assert CANARY not in str(info.value)
