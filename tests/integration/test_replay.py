"""Replay on a real broker: replaying what was sent costs no provider call, --force sends
again under a new idempotency key, dead letters go back to their topic and get delivered,
and replaying the same dead letters again delivers nothing twice."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.email import EmailSettings
from pipeline.records import DeliveryState, NotificationIntent
from pipeline.sink.ledger import open_ledger
from tests.integration.procs import herald_env
from tests.integration.test_effectively_once import WAIT, Pipeline, pipeline

pytestmark = pytest.mark.integration
__all__ = ["pipeline"]  # the fixture, shared with test_effectively_once


def herald_replay(p: Pipeline, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "replay", *args],
        env=herald_env(p.settings, HERALD_LOG_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def counts(line: str) -> dict[str, int]:
    return {
        k: int(v)
        for k, v in (part.split("=", 1) for part in line.split(": ", 1)[1].split() if "=" in part)
        if v.isdigit()
    }


def test_replaying_what_was_sent_makes_no_provider_call(pipeline: Pipeline) -> None:
    users = [pipeline.user(f"replay{i}") for i in range(3)]
    nids = [pipeline.welcome(u) for u in users]
    for nid in nids:
        pipeline.wait_status(nid, DeliveryState.SENT)
    topic = pipeline.topics.notifications("email")

    dry = counts(herald_replay(pipeline, topic, "--from-offset", "0", "--dry-run"))
    assert dry["read"] == 3 and dry["skipped_sent"] == 3 and dry["written"] == 0

    done = counts(herald_replay(pipeline, topic, "--from-offset", "0", "--no-ledger"))
    assert done["written"] == 3  # without the ledger's help the sink must skip them itself
    marker = pipeline.user("replay-marker")
    pipeline.wait_status(pipeline.welcome(marker), DeliveryState.SENT)
    for u in users:
        assert len(pipeline.smtp.to(u["email"])) == 1


def test_force_sends_again_under_a_new_idempotency_key(pipeline: Pipeline) -> None:
    user = pipeline.user("force")
    nid = pipeline.welcome(user)
    pipeline.wait_status(nid, DeliveryState.SENT)
    topic = pipeline.topics.notifications("email")

    done = counts(herald_replay(pipeline, topic, "--recipient", user["email"], "--force"))
    assert done["written"] == 1 and done["new_generation"] == 1
    got = pipeline.smtp.wait_for(2, user["email"], timeout=WAIT)
    assert len(got) == 2
    assert got[0].message_id != got[1].message_id  # generation 1 has its own key
    assert got[0].message["X-Herald-Notification-Id"] == got[1].message["X-Herald-Notification-Id"]


def test_dead_letters_go_back_to_their_topic_and_are_delivered(pipeline: Pipeline) -> None:
    user = pipeline.user("dlq")
    pipeline.smtp.reject_recipients.add(user["email"])
    nid = pipeline.welcome(user)
    pipeline.wait_status(nid, DeliveryState.REJECTED)
    pipeline.smtp.reject_recipients.discard(user["email"])  # the cause is fixed

    dlq = pipeline.topics.notifications_dlq("email")
    done = counts(herald_replay(pipeline, dlq, "--notification-id", nid))
    assert done["written"] == 1 and done["new_generation"] == 1  # REJECTED: a new key
    assert pipeline.smtp.wait_for(1, user["email"], timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while DeliveryState.SENT not in pipeline.statuses(nid):
        assert time.monotonic() < deadline
        time.sleep(0.3)


def wait_until_the_sink_caught_up(p: Pipeline, topic: str) -> None:
    """Until the sink's ledger has recorded every record now in ``topic``."""
    consumer = Consumer({"bootstrap.servers": p.settings.kafka_bootstrap_servers, "group.id": "x"})
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {
            (topic, part): consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=10)[
                1
            ]
            for part in md.partitions
        }
    finally:
        consumer.close()
    group = f"{p.settings.sink_group_prefix}-email"
    ledger = open_ledger(p.settings.ledger_url.get_secret_value())
    try:
        deadline = time.monotonic() + WAIT
        while True:
            done = ledger.offsets(group, list(ends))
            if all(done.get(tp, 0) >= end for tp, end in ends.items() if end > 0):
                return
            assert time.monotonic() < deadline, (done, ends)
            assert p.sink.alive(), p.sink.tail()
            time.sleep(0.3)
    finally:
        ledger.close()


def test_replaying_the_same_dead_letters_twice_delivers_each_once(pipeline: Pipeline) -> None:
    users = [pipeline.user(f"redrive{i}") for i in range(4)]
    for u in users:
        pipeline.smtp.reject_recipients.add(u["email"])  # 550: dead-lettered at once
    nids = [pipeline.welcome(u) for u in users]
    for nid in nids:
        pipeline.wait_status(nid, DeliveryState.REJECTED)
    for u in users:
        pipeline.smtp.reject_recipients.discard(u["email"])  # the cause is fixed
    dlq = pipeline.topics.notifications_dlq("email")
    topic = pipeline.topics.notifications("email")

    # Twice in a row: the second run may read the ledger before or after the sink recorded
    # the first run's deliveries; either way it names the same generations.
    first = counts(herald_replay(pipeline, dlq))
    second = counts(herald_replay(pipeline, dlq))
    assert first["written"] == 4 and first["new_generation"] == 4
    assert second["written"] + second["skipped_sent"] == 4
    wait_until_the_sink_caught_up(pipeline, topic)

    # Once the deliveries are recorded, the replay itself finds them sent...
    third = counts(herald_replay(pipeline, dlq))
    assert third["written"] == 0 and third["skipped_sent"] == 4
    # ...and without the ledger's help it writes the same generations, which the sink skips.
    fourth = counts(herald_replay(pipeline, dlq, "--no-ledger"))
    assert fourth["written"] == 4 and fourth["new_generation"] == 4
    wait_until_the_sink_caught_up(pipeline, topic)

    # The sink runs with the email connector's default Message-ID domain.
    domain = EmailSettings.model_fields["message_id_domain"].default
    accepted = [m for u in users for m in pipeline.smtp.to(u["email"])]
    assert sorted(len(pipeline.smtp.to(u["email"])) for u in users) == [1, 1, 1, 1]
    expected_ids = {
        f"<{NotificationIntent(nid, '', '', '', '', '', '', generation=1).idempotency_key}"
        f"@{domain}>"
        for nid in nids
    }
    assert {m.message_id for m in accepted} == expected_ids  # generation 1, once each
    for u in users:
        assert pipeline.smtp.attempts[u["email"]] == 2  # the 550, then one delivery
    for nid in nids:
        assert pipeline.statuses(nid).count(DeliveryState.SENT) == 1
