"""PeopleTables without a broker: records applied as the reader would apply them, readiness
per partition, and the wiring a router loop adds (on_assign, hold until ready, route with
the tables, on_revoke), driven by plain Python."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import Message

from pipeline import headers as h
from pipeline.people.policy import PreferencePolicy
from pipeline.people.records import (
    PREFERENCES,
    SUBSCRIBER,
    SUPPRESSION,
    Preferences,
    Subscriber,
    Suppression,
    suppression_key,
)
from pipeline.people.store import partition_for
from pipeline.people.tables import PeopleTables, PeopleTablesError
from pipeline.records import DELIVERY_STATUS, NOTIFICATION_INTENT, DeliveryState
from pipeline.router.handler import RouterHandler
from pipeline.router.rules import Rule, RuleSet
from pipeline.router.templates import Templates
from pipeline.serialization import AvroSerde
from pipeline.topics import Topics
from tests.unit.unit_helpers import NOW, USER_REGISTERED, user_registered

TOPICS = Topics()
PARTITIONS = 3


def record(topic: str, key: str, value: bytes | None, partition: int, offset: int = 0) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=key.encode(), value=value)


def subscriber_msg(serde: AvroSerde, sub: Subscriber, partition: int | None = None) -> Message:
    value, _ = serde.encode(SUBSCRIBER, sub.to_avro())
    p = partition_for(sub.user_id, PARTITIONS) if partition is None else partition
    return record(TOPICS.subscribers, sub.user_id, value, p)


def prefs_msg(serde: AvroSerde, prefs: Preferences) -> Message:
    value, _ = serde.encode(PREFERENCES, prefs.to_avro())
    return record(
        TOPICS.preferences, prefs.user_id, value, partition_for(prefs.user_id, PARTITIONS)
    )


def suppression_msg(serde: AvroSerde, s: Suppression, address: str) -> Message:
    value, _ = serde.encode(SUPPRESSION, s.to_avro())
    key = suppression_key(s.channel, address)
    return record(TOPICS.suppressions, key, value, partition_for(key, PARTITIONS))


def restored(tables: PeopleTables, partitions: range | list[int], at_ms: int = 10**15) -> None:
    """What the reader reports once it read the partitions to their end."""
    for p in partitions:
        for topic in (TOPICS.subscribers, TOPICS.preferences):
            tables.complete((topic, p), at_ms, tables.epoch(p))
    for p in range(PARTITIONS):
        tables.complete((TOPICS.suppressions, p), at_ms)


@pytest.fixture
def tables(serde: AvroSerde) -> PeopleTables:
    t = PeopleTables(serde, TOPICS, PreferencePolicy(critical=frozenset({"security"})))
    t.expect_global(PARTITIONS)
    return t


ADA = Subscriber("u-42", email="ada@new.example.com", locale="pt-BR", updated_at=NOW)


def test_topics_are_the_compacted_people_topics(tables: PeopleTables) -> None:
    assert tables.topics() == ["people.subscribers", "people.preferences", "people.suppressions"]


def test_apply_upserts_and_tombstones_delete(tables: PeopleTables, serde: AvroSerde) -> None:
    p = partition_for("u-42", PARTITIONS)
    tables.on_assign([("events.user", p)])
    tables.apply(subscriber_msg(serde, ADA))
    assert tables.subscriber("u-42") == ADA
    newer = Subscriber("u-42", email="ada@newer.example.com", updated_at=NOW)
    tables.apply(subscriber_msg(serde, newer))
    assert tables.subscriber("u-42") == newer
    tables.apply(record(TOPICS.subscribers, "u-42", None, p))
    assert tables.subscriber("u-42") is None


def test_records_of_partitions_not_held_are_ignored(tables: PeopleTables, serde: AvroSerde) -> None:
    p = partition_for("u-42", PARTITIONS)
    tables.on_assign([("events.user", (p + 1) % PARTITIONS)])
    tables.apply(subscriber_msg(serde, ADA))
    assert tables.subscriber("u-42") is None


def test_an_undecodable_record_is_skipped(tables: PeopleTables, serde: AvroSerde) -> None:
    p = partition_for("u-42", PARTITIONS)
    tables.on_assign([("events.user", p)])
    tables.apply(subscriber_msg(serde, ADA))
    tables.apply(record(TOPICS.subscribers, "u-42", b"\x07junk", p))
    assert tables.subscriber("u-42") == ADA  # the last good record stands


def test_preferences_and_suppressions(tables: PeopleTables, serde: AvroSerde) -> None:
    tables.on_assign([("events.user", p) for p in range(PARTITIONS)])
    prefs = Preferences("u-42", {"marketing": {"email": False}}, updated_at=NOW)
    tables.apply(prefs_msg(serde, prefs))
    assert tables.preferences("u-42") == prefs
    gone = Suppression(
        "email", "ada@example.com", "bounced", "sink-email", detail="550 5.1.1", suppressed_at=NOW
    )
    tables.apply(suppression_msg(serde, gone, "ada@example.com"))
    assert tables.suppressed("email", "ADA@example.com") == gone  # email compared lower-case
    assert tables.suppressed("email", "grace@example.com") is None
    assert tables.suppressed("sms", "ada@example.com") is None
    key = suppression_key("email", "ada@example.com")
    tables.apply(record(TOPICS.suppressions, key, None, 0))
    assert tables.suppressed("email", "ada@example.com") is None


def test_an_address_with_a_secret_is_keyed_by_its_hash(serde: AvroSerde) -> None:
    tables = PeopleTables(serde, TOPICS, describers={"webpush": lambda a: a.split("#")[0]})
    address = "https://push.example/abc#secret-keys"
    shown = tables.describe("webpush", address)
    key = suppression_key("webpush", address, shown)
    assert key.startswith("webpush:sha256:") and "secret" not in key
    gone = Suppression("webpush", shown, "gone", "sink-webpush", suppressed_at=NOW)
    value, _ = serde.encode(SUPPRESSION, gone.to_avro())
    tables.apply(record(TOPICS.suppressions, key, value, 0))
    assert tables.suppressed("webpush", address) == gone


def test_ready_once_the_partition_and_every_suppressions_partition_are_restored(
    tables: PeopleTables,
) -> None:
    assert not tables.ready(0)
    tables.on_assign([("events.user", 0), ("events.order", 0)])
    assert not tables.ready(0)
    for topic in (TOPICS.subscribers, TOPICS.preferences):
        tables.complete((topic, 0), 1000, tables.epoch(0))
    assert not tables.ready(0), "the suppressions are not read yet"
    for p in range(PARTITIONS):
        tables.complete((TOPICS.suppressions, p), 1000)
    assert tables.ready(0)
    assert not tables.ready(1), "partition 1 is not held"


def test_ready_with_a_timestamp_waits_until_the_tables_are_complete_up_to_it(
    tables: PeopleTables,
) -> None:
    tables.on_assign([("events.user", 0)])
    restored(tables, [0], at_ms=1000)
    assert tables.ready(0, timestamp_ms=900)
    assert tables.ready(0, timestamp_ms=1000)
    assert not tables.ready(0, timestamp_ms=1001), "an event newer than what the tables hold"
    restored(tables, [0], at_ms=2000)  # the next catch-up round
    assert tables.ready(0, timestamp_ms=1001)


def test_a_completion_of_an_earlier_assignment_does_not_count(tables: PeopleTables) -> None:
    tables.on_assign([("events.user", 0)])
    first = tables.epoch(0)
    tables.on_revoke([("events.user", 0)])
    tables.on_assign([("events.user", 0)])
    for topic in (TOPICS.subscribers, TOPICS.preferences):
        tables.complete((topic, 0), 1000, first)  # the old assignment's round, late
    for p in range(PARTITIONS):
        tables.complete((TOPICS.suppressions, p), 1000)
    assert not tables.ready(0)
    restored(tables, [0])
    assert tables.ready(0)


def test_a_partition_stays_while_another_event_topic_holds_it(
    tables: PeopleTables, serde: AvroSerde
) -> None:
    p = partition_for("u-42", PARTITIONS)
    tables.on_assign([("events.user", p), ("events.order", p)])
    restored(tables, [p])
    tables.apply(subscriber_msg(serde, ADA))
    tables.on_revoke([("events.order", p)])
    assert tables.ready(p) and tables.subscriber("u-42") == ADA
    tables.on_revoke([("events.user", p)])
    assert not tables.ready(p) and tables.subscriber("u-42") is None


def test_a_stopped_reader_makes_ready_raise(tables: PeopleTables) -> None:
    tables.failed(RuntimeError("broker gone"))
    with pytest.raises(PeopleTablesError, match="broker gone"):
        tables.ready(0)


# -- the wiring a router loop adds, as plain Python ---------------------------------------------


@dataclass
class Event:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp_ms: int


class WiredLoop:
    """The lines docs/architecture.md asks the router loop to add, around a stand-in for the
    consumer: tables.on_assign / on_revoke from the rebalance callbacks, wait_ready before
    routing an event of a partition, and handler.people = tables."""

    def __init__(self, handler: RouterHandler, tables: PeopleTables) -> None:
        self.handler = handler
        self.tables = tables
        handler.people = tables  # <- wiring
        self.outputs: list[Any] = []
        self.stopping = False

    def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self.tables.on_assign(partitions)  # <- wiring

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.tables.on_revoke(partitions)  # <- wiring

    async def route(self, batch: list[Event]) -> None:
        for e in batch:
            # <- wiring: hold the event until its partition's tables are ready
            if not await self.tables.wait_ready(
                e.partition, e.timestamp_ms, stopping=lambda: self.stopping
            ):
                return
            self.outputs += self.handler.handle(
                key=e.key,
                value=e.value,
                headers=[],
                topic=e.topic,
                partition=e.partition,
                offset=e.offset,
            )


def _event(serde: AvroSerde, ts: int, **fields: Any) -> Event:
    value, _ = serde.encode(USER_REGISTERED, user_registered(**fields))
    uid = fields.get("user_id", "u-42")
    return Event("events.user", partition_for(uid, PARTITIONS), 0, uid.encode(), value, ts)


def _intents(serde: AvroSerde, outputs: list[Any]) -> list[dict[str, Any]]:
    return [
        serde.decode(o.value, expect=NOTIFICATION_INTENT).record
        for o in outputs
        if o.topic.startswith("notifications.") and o.topic != "notifications.status"
    ]


@pytest.fixture
def welcome() -> RuleSet:
    return RuleSet(
        [
            Rule(
                "welcome-email",
                "user-registered",
                "email",
                "welcome",
                recipient="subscriber.email|email",
                category="marketing",
            )
        ]
    )


async def test_the_loop_holds_events_until_the_partition_is_ready(
    serde: AvroSerde, tables: PeopleTables, welcome: RuleSet, templates: Templates
) -> None:
    loop = WiredLoop(RouterHandler(serde, welcome, templates, TOPICS, clock=lambda: NOW), tables)
    p = partition_for("u-42", PARTITIONS)
    loop.on_assign([("events.user", p)])
    routing = asyncio.ensure_future(loop.route([_event(serde, 500)]))
    await asyncio.sleep(0.05)
    assert not routing.done() and loop.outputs == [], "routed before the tables were read"
    # The reader reads the partition: the subscriber record, then the end.
    tables.apply(subscriber_msg(serde, ADA))
    restored(tables, [p], at_ms=1000)
    await asyncio.wait_for(routing, 5)
    [intent] = _intents(serde, loop.outputs)
    assert intent["recipient"] == "ada@new.example.com", "the subscriber's address, not the event's"


async def test_a_change_counts_for_the_next_event_only_once_the_tables_hold_it(
    serde: AvroSerde, tables: PeopleTables, welcome: RuleSet, templates: Templates
) -> None:
    loop = WiredLoop(RouterHandler(serde, welcome, templates, TOPICS, clock=lambda: NOW), tables)
    p = partition_for("u-42", PARTITIONS)
    loop.on_assign([("events.user", p)])
    tables.apply(subscriber_msg(serde, ADA))
    restored(tables, [p], at_ms=1000)
    await loop.route([_event(serde, 900)])
    # An opt-out written at 1500, an event at 2000: the event waits for the round that
    # reads the opt-out, and is suppressed.
    routing = asyncio.ensure_future(loop.route([_event(serde, 2000)]))
    await asyncio.sleep(0.05)
    assert not routing.done()
    tables.apply(prefs_msg(serde, Preferences("u-42", {"marketing": {"email": False}})))
    restored(tables, [p], at_ms=2500)
    await asyncio.wait_for(routing, 5)
    assert len(_intents(serde, loop.outputs)) == 1
    [status] = [o for o in loop.outputs if o.topic == "notifications.status"]
    decoded = serde.decode(status.value, expect=DELIVERY_STATUS).record
    assert decoded["state"] == DeliveryState.SUPPRESSED.value
    assert decoded["provider_response"] == "opted out of marketing on email"


async def test_stopping_releases_a_held_event_without_routing_it(
    serde: AvroSerde, tables: PeopleTables, welcome: RuleSet, templates: Templates
) -> None:
    loop = WiredLoop(RouterHandler(serde, welcome, templates, TOPICS, clock=lambda: NOW), tables)
    loop.on_assign([("events.user", 0)])
    routing = asyncio.ensure_future(loop.route([_event(serde, 1, user_id="u-0")]))
    await asyncio.sleep(0.05)
    loop.stopping = True
    await asyncio.wait_for(routing, 5)
    assert loop.outputs == []


async def test_without_tables_the_handler_routes_as_before(
    serde: AvroSerde, welcome: RuleSet, templates: Templates
) -> None:
    handler = RouterHandler(serde, welcome, templates, TOPICS, clock=lambda: NOW)
    assert handler.people is None
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    out = handler.handle(
        key=b"u-42", value=value, headers=[(h.EVENT_TYPE, b"user-registered")],
        topic="events.user", partition=0, offset=0,
    )  # fmt: skip
    [intent] = _intents(serde, out)
    assert intent["recipient"] == "ada@example.com"


def test_partition_for_matches_the_in_memory_kafka_of_the_sink_tests() -> None:
    """Both follow librdkafka's consistent_random partitioner (CRC-32); the real broker is
    checked in tests/integration/test_people.py."""
    import zlib

    assert partition_for("u-42", 3) == zlib.crc32(b"u-42") % 3
