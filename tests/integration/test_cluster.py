"""A 3-node local KRaft cluster: acks=all writes survive the crash of a partition leader."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from devtools.cluster import LocalKafkaCluster
from devtools.procs import free_ports as _free_ports
from pipeline.settings import project_root

pytestmark = pytest.mark.integration


def _produce(producer: Producer, topic: str, numbers: range) -> None:
    errors: list[KafkaError] = []
    delivered: list[Message] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered.append(msg)

    for n in numbers:
        producer.produce(topic, key=f"k{n}", value=f"v{n}", on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(60) == 0, "records still in flight after 60 s"
    assert errors == []
    assert len(delivered) == len(numbers)


def _isrs(admin: AdminClient, topic: str) -> dict[int, list[int]]:
    md = admin.list_topics(topic, timeout=5).topics[topic]
    assert md.error is None, md.error
    return {p: list(pm.isrs) for p, pm in md.partitions.items()}


def _wait_for_isrs(admin: AdminClient, topic: str, want: set[int], timeout: float) -> None:
    """Until every partition's ISR is exactly ``want``."""
    deadline = time.monotonic() + timeout
    isrs: dict[int, list[int]] = {}
    while time.monotonic() < deadline:
        try:
            isrs = _isrs(admin, topic)
        except Exception:
            isrs = {}
        if isrs and all(set(isr) == want for isr in isrs.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"ISRs {isrs} after {timeout:.0f}s, waiting for {sorted(want)} in each")


@pytest.mark.timeout(180)
def test_acks_all_writes_survive_a_leader_crash(tmp_path: Path) -> None:
    ports = _free_ports(6)
    cluster = LocalKafkaCluster(
        tmp_path / "cluster",
        ports=list(zip(ports[:3], ports[3:], strict=True)),
        lib=project_root() / ".herald" / "kafka" / "lib",
    )
    topic = f"t{uuid.uuid4().hex[:8]}.cluster"
    producer: Producer | None = None
    try:
        seconds = cluster.start()
        print(f"3-node cluster ready in {seconds:.1f}s")
        assert cluster.brokers() == {1, 2, 3}
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
        futures = admin.create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=3,
                    replication_factor=3,
                    config={"min.insync.replicas": "2"},
                )
            ]
        )
        futures[topic].result(30)
        _wait_for_isrs(admin, topic, {1, 2, 3}, timeout=30)

        producer = Producer(
            {
                "bootstrap.servers": cluster.bootstrap_servers,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                # Fail within the test's budget instead of retrying for five minutes.
                "message.timeout.ms": 60000,
            }
        )
        _produce(producer, topic, range(100))

        leader = admin.list_topics(topic, timeout=5).topics[topic].partitions[0].leader
        assert leader in (1, 2, 3)
        cluster.kill_node(leader)
        assert leader not in cluster.running()

        # Two of three replicas left: acks=all with min.insync.replicas=2 still succeeds, once
        # the controller fences the dead broker and elects new leaders.
        t0 = time.monotonic()
        _produce(producer, topic, range(100, 200))
        print(f"100 records with node {leader} down in {time.monotonic() - t0:.1f}s")
        survivors = {1, 2, 3} - {leader}
        isrs = _isrs(admin, topic)
        assert all(set(isr) <= survivors for isr in isrs.values()), isrs
        assert admin.list_topics(topic, timeout=5).topics[topic].partitions[0].leader != leader

        consumer = Consumer(
            {
                "bootstrap.servers": cluster.bootstrap_servers,
                "group.id": f"check-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        values: list[str] = []
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + 45
            while len(values) < 200 and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                assert msg.error() is None, msg.error()
                value = msg.value()
                assert value is not None
                values.append(value.decode())
        finally:
            consumer.close()
        assert set(values) == {f"v{n}" for n in range(200)}, (
            f"missing: {sorted({f'v{n}' for n in range(200)} - set(values))}"
        )
        assert len(values) == 200, "duplicates despite idempotence"

        t0 = time.monotonic()
        cluster.start_node(leader)
        _wait_for_isrs(admin, topic, {1, 2, 3}, timeout=60)
        print(f"node {leader} back in every ISR in {time.monotonic() - t0:.1f}s")
    finally:
        if producer is not None:
            producer.flush(5)
        cluster.stop()
    assert cluster.running() == []
