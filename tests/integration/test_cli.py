"""The command line against the real broker: publish, tail, and Kafka's own console tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from pipeline.kafka.admin import ensure_topics
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

pytestmark = pytest.mark.integration


def herald(
    settings: HeraldSettings, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "HERALD_TOPIC_PREFIX": settings.topic_prefix,
        "HERALD_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        errors="replace",  # console tools print Avro values as raw bytes
        timeout=timeout,
    )


def test_publish_then_tail_and_console_consumer_show_the_event(settings: HeraldSettings) -> None:
    ensure_topics(settings)
    uid = f"u-{uuid.uuid4().hex[:6]}"
    data = {"user_id": uid, "email": f"{uid}@example.com", "display_name": "Tail"}
    out = herald(settings, "publish", "user-registered", "--data", json.dumps(data))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("published user-registered ")
    event_id = out.stdout.split()[2]
    topic = Topics(settings.topic_prefix).events("user")
    assert f"to {topic}[" in out.stdout

    tail = herald(settings, "tail", topic, "--from-beginning", "--max", "1", "--idle-timeout", "20")
    assert tail.returncode == 0, tail.stderr
    line = json.loads(tail.stdout.splitlines()[0])
    assert line["key"] == uid
    assert line["headers"]["herald-event-type"] == "user-registered"
    assert line["headers"]["herald-event-id"] == event_id
    assert line["schema"].startswith("herald.events.UserRegistered@")
    assert line["value"]["email"] == data["email"]
    assert line["value"]["envelope"]["event_id"] == event_id
    assert line["value"]["envelope"]["producer"] == "herald-cli"

    # Kafka's own console consumer, from the provisioned classpath: keys and headers are text.
    console = herald(
        settings,
        "kafka",
        "console-consumer",
        "--topic",
        topic,
        "--from-beginning",
        "--max-messages",
        "1",
        "--timeout-ms",
        "20000",
        "--formatter-property",
        "print.key=true",
        "--formatter-property",
        "print.headers=true",
        timeout=90,
    )
    assert console.returncode == 0, console.stderr
    assert f"herald-event-id:{event_id}" in console.stdout
    assert "herald-event-type:user-registered" in console.stdout
    assert uid in console.stdout


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"user_id": "u1", "display_name": "No Email"}, "email: missing or null, expected string"),
        ({"user_id": 7, "email": "a@example.com", "display_name": "X"}, "user_id: got int"),
    ],
)
def test_publish_rejects_invalid_data_naming_the_field(
    settings: HeraldSettings, data: dict[str, object], expected: str
) -> None:
    out = herald(settings, "publish", "user-registered", "--data", json.dumps(data))
    assert out.returncode == 2
    assert "invalid herald.events.UserRegistered" in out.stderr
    assert expected in out.stderr


def test_publish_unknown_event_type_lists_known_ones(settings: HeraldSettings) -> None:
    out = herald(settings, "publish", "user-deleted", "--data", "{}")
    assert out.returncode == 2
    assert "unknown event type 'user-deleted'" in out.stderr
    assert "user-registered" in out.stderr


def test_topics_and_consumer_groups_tools_see_herald(settings: HeraldSettings) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    ensure_topics(settings)
    topic = Topics(settings.topic_prefix).notifications("email")
    out = herald(settings, "kafka", "topics", "--list", timeout=90)
    assert out.returncode == 0, out.stderr
    assert topic in out.stdout.split()

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for _ in range(3):
        producer.produce(topic, b"x", b"k", partition=0)
    producer.flush(10)
    group = f"{settings.sink_group_prefix}-email"
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group})
    consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    consumer.close()

    out = herald(settings, "kafka", "consumer-groups", "--describe", "--group", group, timeout=90)
    assert out.returncode == 0, out.stderr
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith(group))
    # GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
    assert row[1:6] == [topic, "0", "1", "3", "2"]
