"""PeopleService (the API's and the CLI's people operations) over an in-memory store: what
it writes, what it refuses, and the one-click unsubscribe."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Message
from pydantic import SecretStr

from pipeline.people.policy import PreferencePolicy
from pipeline.people.records import suppression_key
from pipeline.people.service import PeopleService
from pipeline.people.unsubscribe import ExpiredToken, ForgedToken, sign
from pipeline.serialization import AvroSerde
from pipeline.service import InvalidRequest, NotFound
from pipeline.settings import HeraldSettings

SECRET = "unit-secret"  # noqa: S105 - the test's own


class MemoryStore:
    """PeopleStore's interface on dicts: the latest record per (topic, key)."""

    def __init__(self, serde: AvroSerde) -> None:
        self.serde = serde
        self.latest_by: dict[tuple[str, str], Message] = {}
        self.writes: list[tuple[str, str, bool]] = []  # topic, key, tombstone

    def write(
        self, topic: str, key: str, full_name: str | None, record: dict[str, Any] | None
    ) -> tuple[int, int]:
        value = None
        if record is not None and full_name is not None:
            value, _ = self.serde.encode(full_name, record)
        msg = Message(
            topic=topic, partition=0, offset=len(self.writes), key=key.encode(), value=value
        )
        self.latest_by[(topic, key)] = msg
        self.writes.append((topic, key, value is None))
        return 0, len(self.writes) - 1

    def latest(self, topic: str, key: str) -> Message | None:
        msg = self.latest_by.get((topic, key))
        return None if msg is None or msg.value() is None else msg

    def all_latest(self, topic: str) -> dict[str, Message]:
        return {
            k: m for (t, k), m in self.latest_by.items() if t == topic and m.value() is not None
        }

    def close(self) -> None:
        pass


@pytest.fixture
def service(serde: AvroSerde) -> PeopleService:
    settings = HeraldSettings(unsubscribe_secret=SecretStr(SECRET))
    policy = PreferencePolicy(critical=frozenset({"security"}))
    return PeopleService(settings, MemoryStore(serde), policy, ["email", "fcm", "sms"])  # type: ignore[arg-type]


def test_put_get_delete(service: PeopleService) -> None:
    sub = service.put_subscriber("u-1", {"email": "ada@example.com", "locale": "pt-BR"}, "api")
    assert service.get_subscriber("u-1") == sub
    service.delete_subscriber("u-1")
    with pytest.raises(NotFound):
        service.get_subscriber("u-1")


def test_merge_keeps_what_is_not_named(service: PeopleService) -> None:
    service.put_subscriber("u-1", {"email": "a@example.com", "devices": {"fcm": ["t1"]}}, "api")
    merged = service.merge_subscriber(
        "u-1", {"phone": "+44 7911 123456", "devices": {"fcm": ["t2"]}}, "cli"
    )
    assert (merged.email, merged.phone, merged.devices) == (
        "a@example.com",
        "+44 7911 123456",
        {"fcm": ["t1", "t2"]},
    )
    assert service.merge_subscriber("u-1", {"email": None}, "cli").email is None


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"email": "not an address"}, ["email"]),
        ({"locale": "xx-NOPE"}, ["locale"]),
        ({"time_zone": "Mars/Olympus"}, ["time_zone"]),
        ({"devices": {"fax": ["x"]}}, ["devices"]),
        ({"devices": {"fcm": "t1"}}, ["devices"]),
        ({"custom": {"n": 1}}, ["custom"]),
        ({"shoe_size": 42}, ["shoe_size"]),
    ],
)
def test_invalid_subscribers(
    service: PeopleService, body: dict[str, Any], fields: list[str]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        service.put_subscriber("u-1", body, "api")
    assert info.value.fields == fields


def test_registering_a_device_lifts_its_suppression(service: PeopleService) -> None:
    key = service.add_suppression("fcm", "t9", "gone", "cli")
    assert key == suppression_key("fcm", "t9")
    assert [k for k, _ in service.list_suppressions()] == [key]
    sub = service.add_device("u-1", {"channel": "fcm", "address": "t9"}, "api")
    assert sub.devices == {"fcm": ["t9"]}
    assert service.list_suppressions() == []


def test_remove_a_suppression_that_is_not_there(service: PeopleService) -> None:
    with pytest.raises(NotFound):
        service.remove_suppression("email", "nobody@example.com")


def test_preferences(service: PeopleService) -> None:
    assert service.get_preferences("u-1").choices == {}
    service.set_preference("u-1", "marketing", "email", False, "cli")
    prefs = service.set_preference("u-1", "*", "sms", False, "cli")
    assert prefs.choices == {"marketing": {"email": False}, "*": {"sms": False}}
    described = service.describe_preferences(prefs)
    assert described["effective"]["marketing"] == {"email": False, "fcm": True, "sms": False}
    assert described["effective"]["security"] == {"email": True, "fcm": True, "sms": True}
    with pytest.raises(InvalidRequest):
        service.put_preferences("u-1", {"choices": {"marketing": {"fax": False}}}, "api")
    with pytest.raises(InvalidRequest):
        service.put_preferences("u-1", {"choices": {"marketing": {"email": "no"}}}, "api")


def test_unsubscribe_writes_the_opt_out(service: PeopleService) -> None:
    token = sign(SECRET.encode(), "u-1", "news", "email", datetime.now(UTC) + timedelta(days=1))
    found = service.unsubscribe(token)
    assert (found.user_id, found.category, found.channel) == ("u-1", "news", "email")
    prefs = service.get_preferences("u-1")
    assert prefs.choices == {"news": {"email": False}} and prefs.updated_by == "unsubscribe-link"


@pytest.mark.parametrize(
    ("secret", "expires", "error"),
    [
        (b"another secret", timedelta(days=1), ForgedToken),
        (SECRET.encode(), timedelta(seconds=-1), ExpiredToken),
    ],
    ids=["forged", "expired"],
)
def test_a_bad_token_changes_nothing(
    service: PeopleService, secret: bytes, expires: timedelta, error: type[Exception]
) -> None:
    token = sign(secret, "u-1", "news", "email", datetime.now(UTC) + expires)
    with pytest.raises(error):
        service.unsubscribe(token)
    assert service.store.writes == []  # type: ignore[attr-defined]
