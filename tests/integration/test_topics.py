"""Topic provisioning on the real broker: what ``ensure_topics`` promises its callers."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec

from pipeline.kafka.admin import KafkaUnreachableError, ensure_topics, list_offsets
from pipeline.settings import HeraldSettings
from tests.conftest import unique_prefix


def test_every_partition_is_served_when_ensure_topics_returns(settings: HeraldSettings) -> None:
    # A broker names a new partition's leader before it has created its log; a producer that
    # writes in between can lose its first records (KAFKA-15591). Many topics at once widen
    # that window: the broker creates their logs one after another.
    s = settings.model_copy(update={"topic_prefix": unique_prefix(), "topic_partitions": 6})
    names = [f"{s.topic_prefix}t{i}" for i in range(60)]
    created = ensure_topics(s, names)
    assert sorted(created) == sorted(names)

    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers})
    latest = OffsetSpec.latest()
    tps = [TopicPartition(n, p) for n in names for p in range(6)]
    refused = []
    for tp, fut in admin.list_offsets({tp: latest for tp in tps}).items():
        try:
            assert fut.result().offset == 0
        except KafkaException as e:
            refused.append(f"{tp.topic}[{tp.partition}]: {e.args[0].str()}")
    assert refused == []


def test_ensure_topics_waits_for_topics_another_process_created(settings: HeraldSettings) -> None:
    s = settings.model_copy(update={"topic_prefix": unique_prefix()})
    names = [f"{s.topic_prefix}shared"]
    assert ensure_topics(s, names) == names
    assert ensure_topics(s, names) == []  # exists: nothing created, returns at once


def test_a_partition_no_leader_serves_is_named_after_the_timeout(settings: HeraldSettings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    absent = TopicPartition(f"{unique_prefix()}absent", 3)  # no broker will ever serve it
    with pytest.raises(KafkaUnreachableError, match=r"absent\[3\]\) are not served"):
        list_offsets(admin, [absent], OffsetSpec.latest(), timeout=1)
