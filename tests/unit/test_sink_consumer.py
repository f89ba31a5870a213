"""pipeline/sink/consumer.py's KafkaSource over a stand-in for confluent-kafka's Consumer:
where an assigned partition starts, holding every partition, merged commits."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from pipeline.sink.consumer import KafkaSource
from pipeline.sink.windows import TP

T = "unit.notifications.fake"


class StandIn:
    """The calls KafkaSource makes on a confluent_kafka.Consumer, recorded."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.assigned: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.committed_offsets: dict[TP, int] = {}
        self.commits: list[dict[TP, int]] = []
        self.end = 100
        self.to_assign: list[TP] = []
        self.callbacks: dict[str, Any] = {}

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def poll(self, timeout: float) -> None:
        if self.to_assign:
            parts = [TopicPartition(t, p) for t, p in self.to_assign]
            self.to_assign = []
            self.callbacks["on_assign"](self, parts)

    def consume(self, n: int, timeout: float) -> list[Any]:
        return []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.assigned]

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(
                p.topic, p.partition, self.committed_offsets.get((p.topic, p.partition), -1001)
            )
            for p in parts
        ]

    def get_watermark_offsets(self, p: TopicPartition, **kw: Any) -> tuple[int, int]:
        return 0, self.end

    def incremental_assign(self, parts: list[TopicPartition]) -> None:
        for p in parts:
            self.assigned[(p.topic, p.partition)] = p.offset

    def pause(self, parts: list[TopicPartition]) -> None:
        self.paused |= {(p.topic, p.partition) for p in parts}

    def resume(self, parts: list[TopicPartition]) -> None:
        self.paused -= {(p.topic, p.partition) for p in parts}

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append({(o.topic, o.partition): o.offset for o in offsets})

    def close(self) -> None:
        pass


class Listener:
    def __init__(self, ledger: dict[TP, int]) -> None:
        self.ledger = ledger

    async def assigned(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self.ledger[tp] for tp in tps if tp in self.ledger}

    async def revoked(self, tps: list[TP]) -> dict[TP, int]:
        return {}

    async def lost(self, tps: list[TP]) -> None:
        pass


async def started(ledger: dict[TP, int]) -> tuple[KafkaSource, StandIn]:
    made: list[StandIn] = []

    def factory(config: dict[str, Any]) -> Any:
        made.append(StandIn(config))
        return made[-1]

    source = KafkaSource(
        {"partition.assignment.strategy": "cooperative-sticky"}, "fake", consumer_factory=factory
    )
    await source.start([T], Listener(ledger))
    return source, made[0]


async def test_an_assigned_partition_starts_at_the_lower_of_ledger_and_kafka(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, rd = await started({(T, 0): 40, (T, 1): 10, (T, 2): 500})
    rd.committed_offsets = {(T, 0): 30, (T, 1): 20, (T, 3): 7}
    rd.to_assign = [(T, 0), (T, 1), (T, 2), (T, 3), (T, 4)]
    with caplog.at_level(logging.WARNING):
        await source.poll()
    assert rd.assigned == {
        (T, 0): 30,  # an operator reset Kafka's offset back: honoured
        (T, 1): 10,  # the ledger is behind Kafka's commit: the ledger is the truth
        (T, 2): -1001,  # the ledger is past the end (topic recreated): from the start
        (T, 3): 7,
        (T, 4): -1001,  # nothing anywhere: auto.offset.reset decides
    }
    assert "ignoring it (topic recreated?)" in caplog.text
    await source.close()


async def test_hold_pauses_every_partition_and_release_keeps_the_windows_pauses() -> None:
    source, rd = await started({})
    rd.to_assign = [(T, 0), (T, 1), (T, 2)]
    await source.poll()
    source.pause((T, 1), True)  # a full window
    await source.poll()
    assert rd.paused == {(T, 1)}
    source.hold(True)
    await source.poll()
    assert rd.paused == {(T, 0), (T, 1), (T, 2)}
    rd.to_assign = [(T, 3)]  # assigned while held
    await source.poll()  # assigned (and resumed) in this poll...
    await source.poll()  # ...and held at the next
    assert (T, 3) in rd.paused
    source.pause((T, 2), True)
    source.hold(False)
    await source.poll()
    assert rd.paused == {(T, 1), (T, 2)}
    source.pause((T, 1), False)
    await source.poll()
    assert rd.paused == {(T, 2)}
    await source.close()


async def test_commit_requests_merge_to_the_furthest_offset() -> None:
    source, rd = await started({})
    rd.to_assign = [(T, 0), (T, 1)]
    await source.poll()
    source.commit({(T, 0): 5, (T, 1): 3})
    source.commit({(T, 0): 9})
    source.commit({(T, 0): 7})  # late and lower: never commits backwards
    await source.poll()
    assert rd.commits == [{(T, 0): 9, (T, 1): 3}]
    await source.poll()
    assert len(rd.commits) == 1  # nothing new
    await source.close()
