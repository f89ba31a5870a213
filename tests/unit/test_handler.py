"""RouterHandler: the router's per-record logic without Kafka."""

from __future__ import annotations

import logging

import pytest

from pipeline import headers as h
from pipeline.records import NOTIFICATION_INTENT, NotificationIntent, notification_id
from pipeline.router.handler import Output, RouterHandler
from pipeline.router.rules import Rule, RuleSet
from pipeline.router.templates import Templates
from pipeline.schemas import SchemaSet
from pipeline.serialization import SINGLE_OBJECT_MAGIC, AvroSerde
from pipeline.topics import Topics
from tests.unit.unit_helpers import (
    NOW,
    ORDER_SHIPPED,
    USER_REGISTERED,
    order_shipped,
    user_registered,
)


@pytest.fixture
def handler(serde: AvroSerde, rules: RuleSet, templates: Templates) -> RouterHandler:
    return RouterHandler(serde, rules, templates, Topics(), clock=lambda: NOW)


def _handle(handler: RouterHandler, value: bytes | None, **kw: object) -> list[Output]:
    args: dict[str, object] = {
        "key": b"u-42",
        "value": value,
        "headers": [(h.EVENT_TYPE, b"user-registered")],
        "topic": "events.user",
        "partition": 1,
        "offset": 77,
    }
    args.update(kw)
    return handler.handle(**args)  # type: ignore[arg-type]


def test_good_record_becomes_an_intent_on_the_channel_topic(
    handler: RouterHandler, serde: AvroSerde, schemas: SchemaSet
) -> None:
    record = user_registered()
    value, _ = serde.encode(USER_REGISTERED, record)
    [out] = _handle(handler, value)

    assert out.topic == "notifications.email"
    assert out.dead is False
    assert out.key == b"ada@example.com"
    hd = h.as_dict(out.headers)
    expected_id = notification_id(
        record["envelope"]["event_id"], "welcome-email", "email", "ada@example.com"
    )
    assert hd[h.NOTIFICATION_ID] == expected_id
    assert hd[h.EVENT_TYPE] == "user-registered"
    assert hd[h.EVENT_ID] == record["envelope"]["event_id"]
    assert hd[h.CONTENT_TYPE] == "application/avro"
    intent_schema = schemas.latest(NOTIFICATION_INTENT)
    assert hd[h.SCHEMA] == f"{NOTIFICATION_INTENT}@{intent_schema.fingerprint.hex()}"
    assert hd[h.TRACEPARENT] == record["envelope"]["traceparent"]
    assert all(isinstance(v, bytes) for _, v in out.headers)

    assert out.value is not None and out.value.startswith(SINGLE_OBJECT_MAGIC)
    decoded = serde.decode(out.value, expect=NOTIFICATION_INTENT)
    intent = NotificationIntent.from_avro(decoded.record)
    assert intent.notification_id == expected_id
    assert intent.recipient == "ada@example.com"
    assert intent.subject == "Welcome to Herald, Ada!"
    assert intent.created_at == NOW


def test_same_record_twice_gives_the_same_output(handler: RouterHandler, serde: AvroSerde) -> None:
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    assert _handle(handler, value) == _handle(handler, value, offset=78)


def test_no_traceparent_header_without_a_traceparent(
    handler: RouterHandler, serde: AvroSerde
) -> None:
    record = user_registered()
    record["envelope"]["traceparent"] = None
    value, _ = serde.encode(USER_REGISTERED, record)
    [out] = _handle(handler, value)
    assert h.TRACEPARENT not in h.as_dict(out.headers)


def test_prefixed_topics(serde: AvroSerde, rules: RuleSet, templates: Templates) -> None:
    handler = RouterHandler(serde, rules, templates, Topics("acme."), clock=lambda: NOW)
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    assert [o.topic for o in _handle(handler, value)] == ["acme.notifications.email"]
    assert [o.topic for o in _handle(handler, b"junk")] == ["acme.events.dlq"]


def test_unmatched_event_makes_nothing(serde: AvroSerde, templates: Templates) -> None:
    only_welcome = RuleSet([Rule("welcome-email", "user-registered", "email", "email", "welcome")])
    handler = RouterHandler(serde, only_welcome, templates, Topics(), clock=lambda: NOW)
    value, _ = serde.encode(ORDER_SHIPPED, order_shipped())
    assert _handle(handler, value, topic="events.order") == []


def _assert_dead(out: Output, error_class: str, value: bytes | None) -> dict[str, str]:
    assert out.dead is True
    assert out.topic == "events.dlq"
    assert out.key == b"u-42"
    assert out.value == value
    hd = h.as_dict(out.headers)
    assert hd[h.ORIGINAL_TOPIC] == "events.user"
    assert hd[h.ORIGINAL_PARTITION] == "1"
    assert hd[h.ORIGINAL_OFFSET] == "77"
    assert hd[h.ERROR_CLASS] == error_class
    assert hd[h.ATTEMPTS] == "0"
    assert hd[h.FAILED_AT]
    assert "\n" not in hd[h.ERROR_MESSAGE] and "\r" not in hd[h.ERROR_MESSAGE]
    return hd


def test_garbage_becomes_one_dead_letter(
    handler: RouterHandler, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"\x07not avro at all"
    with caplog.at_level(logging.WARNING):
        outputs = _handle(handler, garbage)
    assert len(outputs) == 1
    hd = _assert_dead(outputs[0], "UnknownFramingError", garbage)
    assert "events.user[1]@77" in hd[h.ERROR_MESSAGE]
    assert hd[h.EVENT_TYPE] == "user-registered"  # the original headers are kept
    assert "events.user[1]@77" in caplog.text


def test_tombstone_becomes_a_dead_letter(handler: RouterHandler) -> None:
    [out] = _handle(handler, None)
    _assert_dead(out, "MalformedRecordError", None)


def test_intent_on_an_events_topic_is_dead_lettered(
    handler: RouterHandler, serde: AvroSerde
) -> None:
    intent = NotificationIntent(
        notification_id=notification_id("e", "r", "email", "a@example.com"),
        event_id="0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        event_type="user-registered",
        rule="r",
        channel="email",
        recipient="a@example.com",
        body_text="x",
        created_at=NOW,
    )
    value, _ = serde.encode(NOTIFICATION_INTENT, intent.to_avro())
    [out] = _handle(handler, value)
    hd = _assert_dead(out, "UnexpectedSchemaError", value)
    assert "not a domain event" in hd[h.ERROR_MESSAGE]


def test_missing_recipient_is_dead_lettered(handler: RouterHandler, serde: AvroSerde) -> None:
    value, _ = serde.encode(USER_REGISTERED, user_registered(email=" "))
    [out] = _handle(handler, value)
    hd = _assert_dead(out, "MissingRecipientError", value)
    assert "welcome-email" in hd[h.ERROR_MESSAGE]


def test_replayed_dead_letter_gets_fresh_coordinates(handler: RouterHandler) -> None:
    """Headers of an earlier dead-lettering are replaced, not duplicated."""
    stale = [
        (h.ORIGINAL_TOPIC, b"elsewhere"),
        (h.ORIGINAL_OFFSET, b"1"),
        (h.ERROR_CLASS, b"Old"),
        ("custom", b"kept"),
    ]
    [out] = _handle(handler, b"junk", headers=stale)
    names = [k for k, _ in out.headers]
    assert names.count(h.ORIGINAL_TOPIC) == 1
    assert names.count(h.ERROR_CLASS) == 1
    hd = _assert_dead(out, "UnknownFramingError", b"junk")
    assert hd["custom"] == "kept"


def test_unexpected_exception_is_dead_lettered_not_raised(
    serde: AvroSerde, rules: RuleSet, templates: Templates
) -> None:
    def broken_clock() -> object:
        raise RuntimeError("clock broke")

    handler = RouterHandler(serde, rules, templates, Topics(), clock=broken_clock)  # type: ignore[arg-type]
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    [out] = _handle(handler, value)
    _assert_dead(out, "RuntimeError", value)


def test_intent_over_the_record_limit_dead_letters_the_event_with_its_rule(
    handler: RouterHandler, serde: AvroSerde
) -> None:
    # Subject, text and HTML each carry the name: the event fits, its intent does not.
    value, _ = serde.encode(USER_REGISTERED, user_registered(display_name="x" * 400_000))
    assert len(value) < handler.max_record_bytes
    [out] = _handle(handler, value)
    hd = _assert_dead(out, "RecordTooLargeError", value)
    assert hd[h.ERROR_RULE] == "welcome-email"
    assert "welcome-email" in hd[h.ERROR_MESSAGE]
    assert "HERALD_MAX_RECORD_BYTES" in hd[h.ERROR_MESSAGE]


def test_intent_just_under_the_limit_is_sent(
    serde: AvroSerde, rules: RuleSet, templates: Templates
) -> None:
    value, _ = serde.encode(USER_REGISTERED, user_registered(display_name="x" * 1000))
    [sized] = _handle(RouterHandler(serde, rules, templates, Topics(), clock=lambda: NOW), value)
    from pipeline.deadletter import record_size

    size = record_size(sized.key, sized.value, sized.headers)
    exact = RouterHandler(serde, rules, templates, Topics(), lambda: NOW, max_record_bytes=size)
    [out] = _handle(exact, value)
    assert out.dead is False
    smaller = RouterHandler(serde, rules, templates, Topics(), lambda: NOW, size - 1)
    [out] = _handle(smaller, value)
    assert out.dead is True


def test_a_dead_letter_always_fits_the_limit(
    serde: AvroSerde, rules: RuleSet, templates: Templates
) -> None:
    """A record over the limit is dead-lettered with its value cut, marked truncated, with
    the original's coordinates: never a write the broker would refuse."""
    from pipeline.deadletter import record_size

    limit = 10_000
    small = AvroSerde(serde.schemas, max_record_bytes=limit)
    handler = RouterHandler(small, rules, templates, Topics(), lambda: NOW)
    big = b"\xc3\x01" + b"z" * 20_000
    [out] = _handle(handler, big, headers=[(h.EVENT_TYPE, b"user-registered")])
    assert out.dead is True
    assert record_size(out.key, out.value, out.headers) <= limit
    hd = h.as_dict(out.headers)
    assert hd[h.ERROR_CLASS] == "RecordTooLargeError"
    assert hd[h.TRUNCATED] == "value"
    assert int(hd[h.ORIGINAL_SIZE]) > 20_000
    assert (hd[h.ORIGINAL_TOPIC], hd[h.ORIGINAL_PARTITION], hd[h.ORIGINAL_OFFSET]) == (
        "events.user",
        "1",
        "77",
    )
    assert out.value is not None and big.startswith(out.value) and len(out.value) > 9_000


def test_registry_outage_is_raised_not_dead_lettered(
    schemas: SchemaSet, rules: RuleSet, templates: Templates
) -> None:
    """A registry that cannot answer is transient: the caller holds the event."""
    from pipeline.serialization import RegistryUnavailableError

    class Down:
        def register_schema(self, *a: object, **k: object) -> int:
            raise ConnectionRefusedError("registry down")

        def get_schema(self, *a: object, **k: object) -> object:
            raise ConnectionRefusedError("registry down")

    writer = AvroSerde(schemas)  # single-object framing: decoding needs no registry
    value, _ = writer.encode(USER_REGISTERED, user_registered())
    handler = RouterHandler(AvroSerde(schemas, registry=Down()), rules, templates, Topics())
    with pytest.raises(RegistryUnavailableError, match="registering"):
        _handle(handler, value)
    confluent = b"\x00\x00\x00\x00\x07" + value[10:]
    with pytest.raises(RegistryUnavailableError, match="fetching schema id 7"):
        _handle(handler, confluent)


def test_schema_id_the_registry_does_not_have_is_dead_lettered(
    schemas: SchemaSet, rules: RuleSet, templates: Templates
) -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    registry = SchemaRegistryClient.new_client({"url": "mock://"})
    handler = RouterHandler(AvroSerde(schemas, registry=registry), rules, templates, Topics())
    [out] = _handle(handler, b"\x00\x00\x00\x01\x2d" + b"\x02")
    hd = _assert_dead(out, "UnknownSchemaError", b"\x00\x00\x00\x01\x2d\x02")
    assert "not found in the registry" in hd[h.ERROR_MESSAGE]
