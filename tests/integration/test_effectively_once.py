"""Effectively-once delivery on a real broker: ledger, retry topics, dead letters with their
history, duplicates and offset resets that cost no provider call, the circuit breaker."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.smtp_catcher import SmtpCatcher
from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.records import DELIVERY_STATUS, DeliveryState, notification_id
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = pytest.mark.integration

WAIT = 90.0


@dataclass
class Pipeline:
    settings: HeraldSettings
    smtp: SmtpCatcher
    publisher: Publisher
    router: HeraldProcess
    sink: HeraldProcess
    topics: Topics

    def user(self, name: str) -> dict[str, str]:
        uid = f"u-{uuid.uuid4().hex[:8]}"
        return {"user_id": uid, "email": f"{name}-{uid}@example.com", "display_name": name}

    def welcome(self, user: dict[str, str]) -> str:
        event = self.publisher.publish_sync("user-registered", user)
        return notification_id(event.event_id, "welcome-email", "email", user["email"])

    def statuses(self, nid: str) -> list[DeliveryState]:
        out = []
        for msg in read_all(self.settings.kafka_bootstrap_servers, self.topics.status):
            if h.as_dict(msg.headers()).get(h.NOTIFICATION_ID) == nid:
                rec = self.publisher.serde.decode(msg.value(), expect=DELIVERY_STATUS).record
                out.append(DeliveryState(rec["state"]))
        return out

    def wait_status(self, nid: str, state: DeliveryState) -> list[DeliveryState]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            states = self.statuses(nid)
            if state in states:
                return states
            assert self.sink.alive(), self.sink.tail()
            time.sleep(0.3)
        raise AssertionError(f"no {state} for {nid}; sink log:\n{self.sink.tail()}")

    def records_for(self, topic: str, nid: str) -> list[dict[str, str]]:
        return [
            h.as_dict(m.headers())
            for m in read_all(self.settings.kafka_bootstrap_servers, topic)
            if h.as_dict(m.headers()).get(h.NOTIFICATION_ID) == nid
        ]


@pytest.fixture
def pipeline(settings: HeraldSettings, tmp_path: Path) -> Iterator[Pipeline]:
    with SmtpCatcher() as smtp:
        s = settings.model_copy(
            update={
                "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
                "sink_max_attempts": 3,
                "sink_retry_backoff_ms": 200,
                "sink_retry_backoff_max_ms": 1000,
                "breaker_failure_threshold": 3,
                "breaker_open_ms": 1000,
                "breaker_open_max_ms": 2000,
            }
        )
        s = HeraldSettings.model_validate(
            {**s.model_dump(), "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}
        )
        ensure_topics(s)
        env = herald_env(s, HERALD_SMTP_PORT=str(smtp.port))
        router = HeraldProcess("router", ["run", "router"], env, tmp_path).start()
        sink = HeraldProcess("sink", ["run", "sink", "email"], env, tmp_path).start()
        try:
            yield Pipeline(
                s, smtp, Publisher(s, producer_name="tests"), router, sink, Topics(s.topic_prefix)
            )
        finally:
            sink.stop()
            router.stop()


def test_retryable_failure_goes_through_retry_tiers_then_delivers_once(pipeline: Pipeline) -> None:
    user = pipeline.user("retry")
    pipeline.smtp.defer_counts[user["email"]] = 2
    nid = pipeline.welcome(user)

    states = pipeline.wait_status(nid, DeliveryState.SENT)
    assert states == [DeliveryState.RETRYING, DeliveryState.RETRYING, DeliveryState.SENT]
    assert len(pipeline.smtp.to(user["email"])) == 1
    assert pipeline.smtp.attempts[user["email"]] == 3
    for tier, attempts in ((1, "1"), (2, "2")):
        retry = pipeline.records_for(pipeline.topics.notifications_retry("email", tier), nid)
        assert len(retry) == 1
        assert retry[0][h.ATTEMPTS] == attempts
        assert retry[0][h.ORIGINAL_TOPIC] == pipeline.topics.notifications("email")
        assert int(retry[0][h.NOT_BEFORE]) > 0


def test_exhausted_attempts_dead_letter_carries_the_failure_history(pipeline: Pipeline) -> None:
    user = pipeline.user("dead")
    pipeline.smtp.defer_recipients.add(user["email"])
    nid = pipeline.welcome(user)

    states = pipeline.wait_status(nid, DeliveryState.DEAD)
    assert states == [DeliveryState.RETRYING, DeliveryState.RETRYING, DeliveryState.DEAD]
    dead = pipeline.records_for(pipeline.topics.notifications_dlq("email"), nid)
    assert len(dead) == 1
    d = dead[0]
    assert d[h.ATTEMPTS] == "3"
    assert d[h.ORIGINAL_TOPIC] == pipeline.topics.notifications("email")
    assert d[h.ERROR_MESSAGE].startswith("451")
    assert d[h.FIRST_FAILED_AT] < d[h.LAST_FAILED_AT]
    assert pipeline.smtp.to(user["email"]) == []


def test_a_duplicated_intent_costs_no_second_provider_call(pipeline: Pipeline) -> None:
    user = pipeline.user("dup")
    nid = pipeline.welcome(user)
    pipeline.wait_status(nid, DeliveryState.SENT)
    [original] = [
        m
        for m in read_all(
            pipeline.settings.kafka_bootstrap_servers, pipeline.topics.notifications("email")
        )
        if h.as_dict(m.headers()).get(h.NOTIFICATION_ID) == nid
    ]
    producer = pipeline.publisher._producer
    for _ in range(3):  # as a router crash or a replay would
        producer.produce(
            original.topic(), original.value(), original.key(), headers=original.headers()
        )
    producer.flush(10)
    marker = dict(user, email=f"marker-{user['email']}")  # same key: same partition, after
    marker_nid = pipeline.welcome({**marker, "user_id": user["user_id"]})
    pipeline.wait_status(marker_nid, DeliveryState.SENT)

    assert len(pipeline.smtp.to(user["email"])) == 1
    assert pipeline.statuses(nid) == [DeliveryState.SENT]
    assert pipeline.smtp.attempts[user["email"]] == 1


def _consumer_groups(settings: HeraldSettings, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "kafka", "consumer-groups", *args],
        env=herald_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reset_offsets_to_earliest_makes_no_provider_calls(pipeline: Pipeline) -> None:
    users = [pipeline.user(f"reset{i}") for i in range(5)]
    nids = [pipeline.welcome(u) for u in users]
    for nid in nids:
        pipeline.wait_status(nid, DeliveryState.SENT)
    group = f"{pipeline.settings.sink_group_prefix}-email"
    topic = pipeline.topics.notifications("email")
    # Offsets are committed to Kafka as well as to the ledger: lag reaches 0.
    deadline = time.monotonic() + WAIT
    while True:
        rows = [
            line.split()
            for line in _consumer_groups(
                pipeline.settings, "--describe", "--group", group
            ).splitlines()
            if line.startswith(group) and f" {topic} " in f" {line} "
        ]
        # GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG: an empty partition has no lag
        if rows and all(r[5] == "0" for r in rows if r[4] != "0"):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(1)

    assert pipeline.sink.stop() == 0
    _consumer_groups(
        pipeline.settings,
        "--reset-offsets",
        "--to-earliest",
        "--group",
        group,
        "--topic",
        topic,
        "--execute",
    )
    pipeline.sink.start()
    marker = pipeline.user("reset-marker")
    pipeline.wait_status(pipeline.welcome(marker), DeliveryState.SENT)
    for u, nid in zip(users, nids, strict=True):
        assert len(pipeline.smtp.to(u["email"])) == 1
        assert pipeline.statuses(nid) == [DeliveryState.SENT]


def test_circuit_breaker_holds_deliveries_during_an_outage(pipeline: Pipeline) -> None:
    port = pipeline.smtp.port
    pipeline.smtp.stop()
    users = [pipeline.user(f"outage{i}") for i in range(6)]
    nids = [pipeline.welcome(u) for u in users]
    deadline = time.monotonic() + WAIT
    while "circuit breaker open" not in pipeline.sink.tail(400):
        assert time.monotonic() < deadline, pipeline.sink.tail()
        time.sleep(0.3)
    with SmtpCatcher(port=port) as smtp:
        for u in users:
            assert smtp.wait_for(1, u["email"], timeout=WAIT), pipeline.sink.tail()
        for nid in nids:
            assert DeliveryState.DEAD not in pipeline.wait_status(nid, DeliveryState.SENT)
    # Far fewer attempts than notifications x attempts: the breaker paused instead.
    dead = read_all(
        pipeline.settings.kafka_bootstrap_servers, pipeline.topics.notifications_dlq("email")
    )
    assert dead == []


def test_poison_intents_are_dead_lettered_and_the_partition_keeps_flowing(
    pipeline: Pipeline,
) -> None:
    from pipeline.records import NOTIFICATION_INTENT, NotificationIntent

    serde = pipeline.publisher.serde
    topic = pipeline.topics.notifications("email")

    def intent(recipient: str, subject: str = "Hello") -> bytes:
        record = NotificationIntent(
            notification_id=str(uuid.uuid4()),
            event_id=str(uuid.uuid4()),
            event_type="user-registered",
            rule="welcome-email",
            channel="email",
            recipient=recipient,
            subject=subject,
            body_text="hi",
        )
        return serde.encode(NOTIFICATION_INTENT, record.to_avro())[0]

    poison = {
        "UnknownFramingError": b"\x01\x02 not avro",
        "MalformedRecordError": intent("ok@example.com")[:-5],
        "RecordTooLargeError": b"\xc3\x01" + b"\x00" * (pipeline.settings.max_record_bytes + 1),
        "InvalidAddressError": intent("not an address"),
        "InvalidAddressError/subject": intent("crlf@example.com", "Hi\r\nBcc: victim@example.com"),
        "UnexpectedSchemaError": serde.encode(
            "herald.events.UserRegistered",
            pipeline.publisher.build("user-registered", pipeline.user("x"))[1],
        )[0],
    }
    producer = pipeline.publisher._producer
    where: dict[str, tuple[int, int]] = {}
    for name, value in poison.items():
        producer.produce(
            topic,
            value,
            b"same-key",
            on_delivery=lambda err, msg, name=name: where.__setitem__(
                name, (msg.partition(), msg.offset())
            ),
        )
    marker = pipeline.user("after-poison")
    marker_bytes = intent(marker["email"])
    producer.produce(topic, marker_bytes, b"same-key")
    producer.flush(10)
    assert len({p for p, _ in where.values()}) == 1  # one partition, marker last

    assert pipeline.smtp.wait_for(1, marker["email"], timeout=WAIT), pipeline.sink.tail()
    # Records of one partition are sent concurrently (its window): the marker can arrive
    # before the dead letters of the records ahead of it are written.
    deadline = time.monotonic() + WAIT
    while True:
        dead = {
            (d[h.ORIGINAL_PARTITION], d[h.ORIGINAL_OFFSET]): d
            for d in (
                h.as_dict(m.headers())
                for m in read_all(
                    pipeline.settings.kafka_bootstrap_servers,
                    pipeline.topics.notifications_dlq("email"),
                )
            )
        }
        if len(dead) >= len(where) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name, (partition, offset) in where.items():
        d = dead.get((str(partition), str(offset)))
        assert d is not None, f"{name} not dead-lettered: {sorted(dead)}"
        assert d[h.ORIGINAL_TOPIC] == topic
        assert d[h.ERROR_CLASS] == name.split("/")[0], (name, d)
        assert "\r" not in d[h.ERROR_MESSAGE] and "\n" not in d[h.ERROR_MESSAGE]
    assert pipeline.smtp.to("crlf@example.com") == []


def test_a_recreated_topic_is_read_from_its_start(pipeline: Pipeline) -> None:
    from confluent_kafka.admin import AdminClient

    first = [pipeline.user(f"before{i}") for i in range(4)]
    for u in first:
        pipeline.wait_status(pipeline.welcome(u), DeliveryState.SENT)
    assert pipeline.sink.stop() == 0
    topic = pipeline.topics.notifications("email")
    admin = AdminClient(pipeline.settings.admin_config())
    admin.delete_topics([topic], operation_timeout=30)[topic].result()
    deadline = time.monotonic() + WAIT
    while topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ensure_topics(pipeline.settings)  # empty again: the ledger's offsets are past its end
    assignments = pipeline.sink.tail(100_000).count("email sink assigned")
    pipeline.sink.start()
    # The sink tells a recreated partition by its ledger offset being past the end; new
    # intents (each followed by a transaction marker) written before it holds its
    # partitions could bring the end up to that offset first.
    while pipeline.sink.tail(100_000).count("email sink assigned") <= assignments:
        assert time.monotonic() < deadline, pipeline.sink.tail()
        time.sleep(0.1)
    # New events for the same recipients: their intents land in exactly the partitions
    # whose ledger offsets are now past the end.
    for u in first:
        pipeline.wait_status(pipeline.welcome(u), DeliveryState.SENT)
        assert len(pipeline.smtp.to(u["email"])) == 2
    assert "ignoring it (topic recreated?)" in pipeline.sink.tail(400)
