"""The consumer that keeps the router's people tables (pipeline/people/tables.py) up to date.

One confluent-kafka consumer on a thread of its own, assigning partitions itself (no
consumer group, no commits: a table is rebuilt from the start of its topic on every
assignment). It reads

- partition p of the co-partitioned topics (subscribers, preferences) while the router holds
  an event partition p, from the beginning;
- every partition of the global topics (suppressions), from the beginning, for as long as it
  runs.

It reports, per topic-partition, up to which wall-clock time the table is complete: a
*catch-up round* takes the time t0, asks the broker for the partitions' end offsets, and once
the consumer's position reaches them everything written before t0 has been applied. The first
round of a partition is its restore; later rounds run when the tables ask (an event newer
than what they are known to be complete up to).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec  # what confluent_kafka.admin re-exports

from pipeline.kafka.admin import list_offsets
from pipeline.serialization import RegistryUnavailableError
from pipeline.settings import HeraldSettings

__all__ = ["TP", "TableReader", "TableSink"]

log = logging.getLogger(__name__)

TP = tuple[str, int]
BATCH = 500
# How long the reader waits for records before it looks at its requests: a catch-up round an
# event is waiting for starts at most this late.
POLL_S = 0.01


class TableSink(Protocol):
    """What the reader feeds: the tables."""

    def apply(self, msg: Message) -> None: ...

    def complete(self, tp: TP, as_of_ms: int, epoch: int) -> None: ...

    def failed(self, error: BaseException) -> None: ...


@dataclass
class _Round:
    started_ms: int
    ends: dict[TP, int] = field(default_factory=dict)


class TableReader:
    def __init__(
        self,
        settings: HeraldSettings,
        sink: TableSink,
        co_partitioned: list[str],
        global_topics: list[str],
        *,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        backoff_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.co_partitioned = co_partitioned
        self.global_topics = global_topics
        self.clock_ms = clock_ms
        self.backoff_s = backoff_s
        self._requests: queue.Queue[tuple[str, dict[int, int]]] = queue.Queue()
        self._sync = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned: set[TP] = set()
        self._rounds: list[_Round] = []
        self._eof: dict[TP, int] = {}  # where the consumer last reached the end
        self._epoch: dict[TP, int] = {}  # the tables' epoch of each assignment
        self._admin: AdminClient | None = None  # asks for end offsets (see _offsets)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="herald-people-tables", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def assign(self, partitions: dict[int, int]) -> None:
        """Read these partitions of the co-partitioned topics from the beginning. Each comes
        with the tables' epoch for it, which its completions carry: a completion of an
        earlier assignment of the same partition must not count for this one."""
        self._requests.put(("assign", dict(partitions)))

    def revoke(self, partitions: set[int]) -> None:
        self._requests.put(("revoke", dict.fromkeys(partitions, 0)))

    def sync(self) -> None:
        """Run a catch-up round soon (the tables want to be complete up to now)."""
        self._sync.set()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            conf = self.settings.consumer_config(f"herald-people-{uuid.uuid4()}")
            conf.pop("group.instance.id", None)
            conf["enable.partition.eof"] = True
            consumer = Consumer(conf)
            self._admin = AdminClient(self.settings.admin_config())
            initial = []
            for topic in self.global_topics:
                md = consumer.list_topics(topic, timeout=30).topics.get(topic)
                if md is None or md.error is not None:
                    raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, topic))
                initial += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions]
            self._add(consumer, initial)
            while not self._stopping.is_set():
                self._handle_requests(consumer)
                if self._sync.is_set():
                    self._sync.clear()
                    self._start_round(consumer, self._assigned)
                for msg in consumer.consume(BATCH, POLL_S):
                    err = msg.error()
                    if err is None:
                        self._apply(msg)
                    elif err.fatal():
                        raise KafkaException(err)
                    elif err.code() == KafkaError._PARTITION_EOF:
                        # At the end: whatever the last offsets were (markers, compacted
                        # gaps), the position is the end.
                        self._eof[(str(msg.topic()), int(msg.partition() or 0))] = int(
                            msg.offset() or 0
                        )
                    else:
                        log.warning("people tables consumer: %s", err)
                self._check_rounds(consumer)
        except BaseException as e:  # the tables say so; ready() never turns true after it
            log.critical("people tables reader stopped: %s", e, exc_info=e)
            self.sink.failed(e)
        finally:
            if consumer is not None:
                consumer.close()

    def _apply(self, msg: Message) -> None:
        delay = self.backoff_s
        while True:
            try:
                self.sink.apply(msg)
                return
            except RegistryUnavailableError as e:  # hold: the table is not ready meanwhile
                if self._stopping.is_set():
                    raise
                log.warning("people tables: holding %s[%s]: %s", msg.topic(), msg.partition(), e)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _handle_requests(self, consumer: Consumer) -> None:
        while True:
            try:
                action, partitions = self._requests.get_nowait()
            except queue.Empty:
                return
            tps = [(t, p) for t in self.co_partitioned for p in sorted(partitions)]
            if action == "assign":
                for t, p in tps:
                    self._epoch[(t, p)] = partitions[p]
                again = [tp for tp in tps if tp in self._assigned]
                if again:  # assigned again meanwhile: read it from the beginning again
                    consumer.incremental_unassign([TopicPartition(t, p) for t, p in again])
                    self._forget(again)
                self._add(consumer, [TopicPartition(t, p, OFFSET_BEGINNING) for t, p in tps])
            else:
                gone = [tp for tp in tps if tp in self._assigned]
                if gone:
                    consumer.incremental_unassign([TopicPartition(t, p) for t, p in gone])
                    self._forget(gone)

    def _forget(self, tps: list[TP]) -> None:
        self._assigned.difference_update(tps)
        for tp in tps:
            self._eof.pop(tp, None)
            for r in self._rounds:
                r.ends.pop(tp, None)

    def _add(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        if not tps:
            return
        consumer.incremental_assign(tps)
        added = {(tp.topic, tp.partition) for tp in tps}
        self._assigned |= added
        self._start_round(consumer, added)

    def _start_round(self, consumer: Consumer, tps: set[TP]) -> None:
        if not tps:
            return
        r = _Round(self.clock_ms())
        lows = self._offsets(sorted(tps), OffsetSpec.earliest())  # type: ignore[no-untyped-call]
        highs = self._offsets(sorted(tps), OffsetSpec.latest())  # type: ignore[no-untyped-call]
        for tp in sorted(tps):
            # Nothing to read (empty, or every record deleted): complete at once.
            r.ends[tp] = highs[tp] if highs[tp] > lows[tp] else 0
        self._rounds.append(r)
        self._check_rounds(consumer)

    def _offsets(self, tps: list[TP], spec: OffsetSpec) -> dict[TP, int]:
        """The partitions' offsets for ``spec`` (earliest, or latest: the last stable offset),
        in one request per broker.

        Asked through an admin client, not the reader's consumer: a consumer's offset
        request waits behind its own fetch, which the broker holds up to fetch.wait.max.ms
        when there is nothing new, so twelve partitions asked one by one took six seconds
        and every event newer than the last round waited for that."""
        assert self._admin is not None  # noqa: S101 - made in _run() before any round
        return list_offsets(
            self._admin,
            [TopicPartition(t, p) for t, p in tps],
            spec,
            timeout=15.0,
            stopping=self._stopping.is_set,
        )

    def _check_rounds(self, consumer: Consumer) -> None:
        if not self._rounds:
            return
        waiting = {tp for r in self._rounds for tp in r.ends}
        positions: dict[TP, int] = {}
        if waiting:
            for pos in consumer.position([TopicPartition(t, p) for t, p in sorted(waiting)]):
                tp = (pos.topic, pos.partition)
                positions[tp] = max(int(pos.offset), self._eof.get(tp, -1))
        done = []
        for r in self._rounds:
            for tp, end in list(r.ends.items()):
                # Before the first fetch the position is invalid (negative); an empty
                # partition (end 0) is complete at once.
                if end == 0 or positions.get(tp, -1) >= end:
                    r.ends.pop(tp)
                    self.sink.complete(tp, r.started_ms, self._epoch.get(tp, 0))
            if not r.ends:
                done.append(r)
        for r in done:
            self._rounds.remove(r)
