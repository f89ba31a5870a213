"""A sink worker without a broker: an in-memory Kafka (a producer and a Source over the same
logs), a real SQLite ledger in the test's tmp_path, and connectors.testing.FakeConnector.

The in-memory Kafka is deliberately small: partitions are lists of confluent_kafka.Message,
records produced by the worker (retries, dead letters, statuses) land in the same logs, so a
retry record comes back to the worker as it would from a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Message

from connectors.base import Connector
from pipeline import headers as h
from pipeline.records import (
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    DeliveryStatus,
    NotificationIntent,
)
from pipeline.serialization import AvroSerde
from pipeline.settings import HeraldSettings
from pipeline.sink.consumer import RebalanceListener
from pipeline.sink.ledger import Ledger
from pipeline.sink.ledger_sqlite import SQLiteLedger
from pipeline.sink.runtime import SinkWorker
from pipeline.sink.windows import TP
from pipeline.topics import Topics

PREFIX = "unit."
PARTITIONS = 2


def settings(**overrides: Any) -> HeraldSettings:
    values: dict[str, Any] = {
        "topic_prefix": PREFIX,
        "sink_commit_interval_ms": 5,
        "sink_retry_backoff_ms": 1,
        "sink_retry_backoff_max_ms": 2,
        "sink_max_attempts": 3,
        "breaker_failure_threshold": 100,
    }
    values.update(overrides)
    return HeraldSettings(**values)


class MemoryKafka:
    def __init__(self, partitions: int = PARTITIONS) -> None:
        self.partitions = partitions
        self.logs: dict[str, list[list[Message]]] = {}

    def log(self, topic: str) -> list[list[Message]]:
        return self.logs.setdefault(topic, [[] for _ in range(self.partitions)])

    def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> Message:
        log = self.log(topic)
        if partition is None:
            partition = zlib.crc32(key or b"") % len(log)
        msg = Message(
            topic=topic,
            partition=partition,
            offset=len(log[partition]),
            key=key,
            value=value,
            headers=headers or [],
        )
        log[partition].append(msg)
        return msg

    def records(self, topic: str) -> list[Message]:
        return [m for part in self.log(topic) for m in part]


class MemoryProducer:
    def __init__(self, kafka: MemoryKafka) -> None:
        self.kafka = kafka
        self._unacked: list[tuple[Callable[[Any, Message], None], Message]] = []

    def produce(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        *,
        headers: Any = None,
        on_delivery: Any,
    ) -> None:
        msg = self.kafka.append(topic, value, key, list(headers or []))
        self._unacked.append((on_delivery, msg))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        unacked, self._unacked = self._unacked, []
        for callback, msg in unacked:
            callback(None, msg)
        return 0


@dataclass
class MemorySource:
    """Source over MemoryKafka: assigns every partition of the subscribed topics at the
    first poll, starting at the ledger's offset (else the committed one, else 0)."""

    kafka: MemoryKafka
    batch: int = 50
    listener: RebalanceListener | None = None
    topics: list[str] = field(default_factory=list)
    position: dict[TP, int] = field(default_factory=dict)
    committed: dict[TP, int] = field(default_factory=dict)
    paused: set[TP] = field(default_factory=set)
    held: bool = False
    hold_log: list[tuple[bool, float]] = field(default_factory=list)  # (held, monotonic)
    pause_log: list[tuple[TP, bool]] = field(default_factory=list)
    closed: bool = False
    _revoke: list[TP] = field(default_factory=list)
    revoked_offsets: dict[TP, int] = field(default_factory=dict)

    async def start(self, topics: list[str], listener: RebalanceListener) -> None:
        self.topics, self.listener = topics, listener

    async def poll(self) -> list[Message]:
        assert self.listener is not None
        if not self.position:
            tps = [(t, p) for t in self.topics for p in range(len(self.kafka.log(t)))]
            from_ledger = await self.listener.assigned(tps)
            for tp in tps:
                self.position[tp] = from_ledger.get(tp, self.committed.get(tp, 0))
        if self._revoke:
            tps, self._revoke = self._revoke, []
            offsets = await self.listener.revoked(tps)
            self.revoked_offsets.update(offsets)
            self.commit(offsets)
            for tp in tps:
                self.position.pop(tp, None)
        out: list[Message] = []
        for (topic, partition), at in self.position.items():
            if (topic, partition) in self.paused or self.held:
                continue
            log = self.kafka.log(topic)[partition]
            got = log[at : at + self.batch]
            self.position[(topic, partition)] = at + len(got)
            out += got
        if not out:
            await asyncio.sleep(0.002)
        return out

    def pause(self, tp: TP, paused: bool) -> None:
        self.pause_log.append((tp, paused))
        if paused:
            self.paused.add(tp)
        else:
            self.paused.discard(tp)

    def hold(self, held: bool) -> None:
        self.hold_log.append((held, time.monotonic()))
        self.held = held

    def commit(self, offsets: dict[TP, int]) -> None:
        for tp, offset in offsets.items():
            assert offset >= self.committed.get(tp, 0), (tp, offset, self.committed)
            self.committed[tp] = offset

    def revoke(self, tps: list[TP]) -> None:
        """Revoke ``tps`` at the next poll (as librdkafka calls on_revoke inside a poll)."""
        self._revoke += tps

    async def close(self) -> None:
        self.closed = True


def intent(recipient: str = "a@example.com", **fields: Any) -> NotificationIntent:
    values: dict[str, Any] = {
        "notification_id": str(uuid.uuid4()),
        "event_id": str(uuid.uuid4()),
        "event_type": "user-registered",
        "rule": "unit",
        "channel": "fake",
        "recipient": recipient,
        "subject": "Hello",
        "body_text": "Hi there",
    }
    values.update(fields)
    return NotificationIntent(**values)


@dataclass
class Sink:
    """A worker wired to MemoryKafka, a FakeConnector (or any connector) and a ledger."""

    worker: SinkWorker
    kafka: MemoryKafka
    source: MemorySource
    serde: AvroSerde
    ledger_path: Path
    topics: Topics

    @property
    def topic(self) -> str:
        return self.topics.notifications(self.worker.channel)

    def publish(
        self,
        i: NotificationIntent,
        partition: int | None = None,
        *,
        topic: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Message:
        value, _ = self.serde.encode(NOTIFICATION_INTENT, i.to_avro())
        return self.kafka.append(
            topic or self.topic,
            value,
            i.recipient.encode(),
            [(h.NOTIFICATION_ID, i.notification_id.encode()), *(headers or [])],
            partition,
        )

    def statuses(self, notification_id: str | None = None) -> list[DeliveryStatus]:
        out = []
        for msg in self.kafka.records(self.topics.status):
            record = self.serde.decode(msg.value(), expect=DELIVERY_STATUS).record
            status = DeliveryStatus.from_avro(record)
            if notification_id is None or status.notification_id == notification_id:
                out.append(status)
        return out

    def dead_letters(self) -> list[dict[str, str]]:
        return [
            h.as_dict(m.headers())
            for m in self.kafka.records(self.topics.notifications_dlq(self.worker.channel))
        ]

    def retries(self) -> list[dict[str, str]]:
        return [
            h.as_dict(m.headers()) for t in self.worker.retry_topics for m in self.kafka.records(t)
        ]

    def ledger(self) -> Ledger:
        return SQLiteLedger(str(self.ledger_path))


def make_sink(
    connector: Connector,
    serde: AvroSerde,
    tmp_path: Path,
    *,
    kafka: MemoryKafka | None = None,
    **overrides: Any,
) -> Sink:
    kafka = kafka or MemoryKafka()
    s = settings(**overrides)
    source = MemorySource(kafka)
    ledger_path = tmp_path / "ledger.db"
    worker = SinkWorker(
        s,
        connector,
        serde=serde,
        ledger=SQLiteLedger(str(ledger_path)),
        source=source,
        producer=MemoryProducer(kafka),
    )
    topics = Topics(s.topic_prefix)
    for t in (topics.notifications(connector.channel), *worker.retry_topics):
        kafka.log(t)  # the topics exist before the worker subscribes
    return Sink(worker, kafka, source, serde, ledger_path, topics)


@contextlib.asynccontextmanager
async def running(sink: Sink) -> AsyncIterator[Sink]:
    """The worker runs inside the block; leaving it stops the worker (finishing, recording
    and committing what is in flight) and re-raises a failure of the worker."""
    task = asyncio.ensure_future(sink.worker.run())
    try:
        yield sink
    finally:
        sink.worker.stop()
        await asyncio.wait_for(task, 30)


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait for ``condition``; the timeout is a safety net, never what a test measures."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.005)
