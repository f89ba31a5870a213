"""The router's failure paths, made to really happen on a real broker: the schema registry
stopped while events arrive, an intent over the record limit, a record near the broker's
limit. Each test counts every input event at the end: delivered, or dead-lettered with its
reason."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from devtools.smtp_catcher import SmtpCatcher
from pipeline import headers as h
from pipeline.deadletter import record_size
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.records import NOTIFICATION_INTENT, notification_id
from pipeline.serialization import serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics
from tests.conftest import free_port
from tests.integration.conftest import RunningPipeline
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = pytest.mark.integration

WAIT = 90.0
REGISTRY = [sys.executable, "-m", "devtools.registry"]
BROKER_LIMIT = 1_048_588  # the broker's message.max.bytes (Kafka's default, not overridden)


def _user(name: str) -> dict[str, str]:
    uid = f"u-{uuid.uuid4().hex[:8]}"
    return {"user_id": uid, "email": f"{name}-{uid}@example.com", "display_name": name.title()}


def _dead_letters(settings: HeraldSettings, topic: str) -> list[dict[str, str]]:
    return [h.as_dict(m.headers()) for m in read_all(settings.kafka_bootstrap_servers, topic)]


# -- limits, on the shared pipeline (single-object framing) ------------------------------------


def test_an_intent_over_the_limit_dead_letters_its_event_and_the_next_is_delivered(
    pipeline: RunningPipeline,
) -> None:
    """A valid event whose rendered intent exceeds the record limit (the name appears in
    subject, text and HTML) is in events.dlq with RecordTooLargeError and the rule name."""
    topics = Topics(pipeline.settings.topic_prefix)
    big = _user("big")
    big["display_name"] = "B" * 400_000
    after = {**_user("after"), "user_id": big["user_id"]}  # same key, same partition
    first = pipeline.publisher.publish_sync("user-registered", big)
    second = pipeline.publisher.publish_sync("user-registered", after)
    assert (first.topic, first.partition) == (second.topic, second.partition)

    assert pipeline.smtp.wait_for(1, after["email"], timeout=WAIT), pipeline.log_tail()
    assert pipeline.smtp.to(big["email"]) == []
    mine = [
        d
        for d in _dead_letters(pipeline.settings, topics.events_dlq)
        if d.get(h.EVENT_ID) == first.event_id
    ]
    assert len(mine) == 1, pipeline.log_tail()
    assert mine[0][h.ERROR_CLASS] == "RecordTooLargeError"
    assert mine[0][h.ERROR_RULE] == "welcome-email"
    assert mine[0][h.ORIGINAL_OFFSET] == str(first.offset)
    assert h.TRUNCATED not in mine[0]  # the event itself fits: kept whole for a replay
    intents = read_all(pipeline.settings.kafka_bootstrap_servers, topics.notifications("email"))
    assert first.event_id not in {h.as_dict(m.headers()).get(h.EVENT_ID) for m in intents}
    assert pipeline.process.poll() is None


def test_a_record_just_under_the_brokers_limit_gets_a_truncated_dead_letter(
    pipeline: RunningPipeline,
) -> None:
    """The record is over Herald's limit but the broker took it; its dead letter would be
    over the broker's limit whole, so it is cut to fit, marked, with the coordinates."""
    topics = Topics(pipeline.settings.topic_prefix)
    user = _user("huge")
    producer = Producer(
        {"bootstrap.servers": pipeline.settings.kafka_bootstrap_servers, "message.max.bytes": 2**21}
    )
    value = b"\xc3\x01" + b"\x00" * (BROKER_LIMIT - 200 - len(user["user_id"]) - 2)
    acked: list[tuple[object, int, int]] = []
    producer.produce(
        topics.events("user"),
        value,
        user["user_id"].encode(),
        headers=[(h.EVENT_TYPE, b"user-registered")],
        on_delivery=lambda err, msg: acked.append((err, msg.partition(), msg.offset())),
    )
    producer.flush(30)
    [(err, partition, offset)] = acked
    assert err is None, f"the broker refused the test record: {err}"
    good = pipeline.publisher.publish_sync("user-registered", user)
    assert good.partition == partition

    assert pipeline.smtp.wait_for(1, user["email"], timeout=WAIT), pipeline.log_tail()
    msgs = read_all(pipeline.settings.kafka_bootstrap_servers, topics.events_dlq)
    mine = [
        m
        for m in msgs
        if h.as_dict(m.headers()).get(h.ORIGINAL_OFFSET) == str(offset)
        and h.as_dict(m.headers()).get(h.ORIGINAL_PARTITION) == str(partition)
    ]
    assert len(mine) == 1, pipeline.log_tail()
    hd = h.as_dict(mine[0].headers())
    assert hd[h.ORIGINAL_TOPIC] == topics.events("user")
    assert hd[h.ERROR_CLASS] == "RecordTooLargeError"
    assert hd[h.TRUNCATED] == "value"
    assert int(hd[h.ORIGINAL_SIZE]) >= len(value)
    dl_value = mine[0].value()
    assert value.startswith(dl_value) and len(dl_value) > 900_000
    size = record_size(mine[0].key(), dl_value, h.pairs(mine[0].headers()))
    assert size <= pipeline.settings.max_record_bytes


# -- the schema registry stopped while events arrive -------------------------------------------


class Registry:
    """devtools.registry as a process that can be stopped and started on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.data = tmp / "registry.json"
        self.log = tmp / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*REGISTRY, "--port", str(self.port), "--data", str(self.data)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "listening" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "registry did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def test_registry_outage_holds_events_until_it_is_back_and_nothing_is_lost(
    settings: HeraldSettings, tmp_path: Path, registry: Registry
) -> None:
    events = 6
    with SmtpCatcher() as smtp:
        s = HeraldSettings.model_validate(
            {
                **settings.model_dump(),
                "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
                "schema_registry_url": registry.url,
                "router_retry_backoff_ms": 100,
                "router_retry_backoff_max_ms": 1000,
            }
        )
        ensure_topics(s)
        publisher = Publisher(s, producer_name="tests")
        users = [_user(f"reg{i}") for i in range(events)]
        # The publisher registers its schema now and keeps the id; the router, started
        # while the registry is down, has to ask for it.
        published = [publisher.publish_sync("user-registered", users[0])]
        assert published[0].partition is not None
        publisher.serde.close()  # its schema id is cached: no more registry calls
        registry.stop()

        env = herald_env(s, SCHEMA_REGISTRY_URL=registry.url, HERALD_SMTP_PORT=str(smtp.port))
        proc = HeraldProcess("all", ["run", "all", "email"], env, tmp_path).start()
        try:
            published += [publisher.publish_sync("user-registered", u) for u in users[1:]]
            # Held, not skipped: the router keeps retrying while nothing is delivered or
            # dead-lettered.
            deadline = time.monotonic() + WAIT
            while "holding" not in proc.tail(400):
                assert proc.alive(), proc.tail()
                assert time.monotonic() < deadline, proc.tail()
                time.sleep(0.5)
            time.sleep(5)
            assert proc.alive(), proc.tail()
            assert smtp.messages == []
            topics = Topics(s.topic_prefix)
            assert read_all(s.kafka_bootstrap_servers, topics.events_dlq) == []
            assert read_all(s.kafka_bootstrap_servers, topics.notifications("email")) == []

            registry.start()
            for u in users:
                assert smtp.wait_for(1, u["email"], timeout=WAIT), proc.tail()
            time.sleep(2)  # a duplicate would be on its way by now
            for u, event in zip(users, published, strict=True):
                got = smtp.to(u["email"])
                nid = notification_id(event.event_id, "welcome-email", "email", u["email"])
                assert [m.message_id for m in got] == [f"<{nid}@herald.localhost>"]
            assert read_all(s.kafka_bootstrap_servers, topics.events_dlq) == []
            assert read_all(s.kafka_bootstrap_servers, topics.notifications_dlq("email")) == []
            # The intents are in the registry's framing, readable by any registry client.
            intents = read_all(s.kafka_bootstrap_servers, topics.notifications("email"))
            assert len(intents) == events
            assert all(m.value()[:1] == b"\x00" for m in intents)
            reader = serde_from_settings(s)
            try:
                assert all(reader.decode(m.value(), expect=NOTIFICATION_INTENT) for m in intents)
            finally:
                reader.close()
            assert "released" in proc.tail(400)
        finally:
            proc.stop()
