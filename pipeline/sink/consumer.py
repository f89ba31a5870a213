"""The sink's Kafka consumer: fetching, pausing, committing and rebalancing.

The confluent-kafka consumer is touched by one thread only. The event loop asks for
pauses, resumes and commits through methods that queue the request; the consumer thread
applies the queue before each fetch. Rebalance callbacks run on the consumer thread, inside
a fetch, and call the worker's ``RebalanceListener`` on the event loop, waiting for it:

- assigned: the worker answers the ledger's next offsets; the partition starts at
  min(ledger offset, Kafka's committed offset) — the ledger is the truth, and an operator's
  ``--reset-offsets`` to an earlier point is honoured (the ledger skips what is done). A
  ledger offset past the partition's end (the topic was recreated) is ignored with a
  warning.
- revoked: the worker stops starting records of those partitions, waits for their windows
  to be recorded and answers their next offsets, committed synchronously before they go.
- lost (session expired): forgotten without a commit; someone else may own them already.

``hold(True)`` pauses every assigned partition (and any assigned while held) until
``hold(False)``, on top of the per-partition pauses the windows ask for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline.sink.windows import TP

__all__ = ["KafkaSource", "RebalanceListener", "Source"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class RebalanceListener(Protocol):
    async def assigned(self, tps: list[TP]) -> dict[TP, int]:
        """Partitions were assigned; return the ledger's next offsets for them."""

    async def revoked(self, tps: list[TP]) -> dict[TP, int]:
        """Partitions are being revoked; finish and record their windows and return the
        next offsets to commit before letting them go."""

    async def lost(self, tps: list[TP]) -> None:
        """Partitions were lost; forget them."""


class Source(Protocol):
    """What the sink worker needs from a consumer (KafkaSource, or a fake in tests)."""

    async def start(self, topics: list[str], listener: RebalanceListener) -> None: ...

    async def poll(self) -> list[Message]:
        """The next batch of records (possibly none after a short wait)."""

    def pause(self, tp: TP, paused: bool) -> None: ...

    def hold(self, held: bool) -> None: ...

    def commit(self, offsets: dict[TP, int]) -> None:
        """Commit to Kafka (asynchronously); only ever forward."""

    async def close(self) -> None: ...


class KafkaSource:
    def __init__(
        self,
        config: dict[str, Any],
        name: str,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
    ) -> None:
        """``name`` (the channel) prefixes log lines; ``consumer_factory`` builds the
        confluent-kafka consumer (tests pass a stand-in)."""
        self._config = config
        self._factory = consumer_factory
        self._name = name
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy"))
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "herald-consumer")
        self._lock = threading.Lock()
        self._pause_requests: dict[TP, bool] = {}  # guarded by _lock
        self._commit_requests: dict[TP, int] = {}  # guarded by _lock
        self._held = False
        # Consumer thread only:
        self._want_paused: set[TP] = set()
        self._paused: set[TP] = set()
        # The last offset returned and the offset last committed to Kafka, per partition
        # (see _past_markers).
        self._returned: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}
        self._consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: RebalanceListener | None = None

    async def start(self, topics: list[str], listener: RebalanceListener) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._consumer = self._factory(self._config)
        self._consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    async def poll(self) -> list[Message]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._consume)

    def pause(self, tp: TP, paused: bool) -> None:
        with self._lock:
            self._pause_requests[tp] = paused

    def hold(self, held: bool) -> None:
        self._held = held

    def commit(self, offsets: dict[TP, int]) -> None:
        with self._lock:  # merged: the consumer thread may not have run since the last one
            for tp, offset in offsets.items():
                self._commit_requests[tp] = max(offset, self._commit_requests.get(tp, offset))

    async def close(self) -> None:
        try:
            if self._consumer is not None:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._consumer.close)
        finally:
            self._thread.shutdown()

    # -- the consumer thread -----------------------------------------------------------------

    def _get(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource.start() was not called")
        return self._consumer

    def _consume(self) -> list[Message]:
        consumer = self._get()
        self._apply_requests(consumer)
        # Wait for the first record only: consume(500, 0.1) waits the whole 0.1 s unless 500
        # records are there, which added ~50 ms of latency at moderate rates. Under load the
        # queue holds more than the first record and the batch fills without waiting.
        first = consumer.poll(0.1)
        msgs = [] if first is None else [first, *consumer.consume(499, 0)]
        out = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(msg)
                self._returned[(str(msg.topic()), int(msg.partition() or 0))] = int(
                    msg.offset() or 0
                )
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("%s sink consumer error: %s", self._name, err)
        return out

    def _apply_requests(self, consumer: Consumer) -> None:
        with self._lock:
            requests, self._pause_requests = self._pause_requests, {}
            commit, self._commit_requests = self._commit_requests, {}
        for tp, want in requests.items():
            if want:
                self._want_paused.add(tp)
            else:
                self._want_paused.discard(tp)
        assigned = {(p.topic, p.partition) for p in consumer.assignment()}
        target = set(assigned) if self._held else self._want_paused & assigned
        pause = target - self._paused
        resume = (self._paused & assigned) - target
        if pause:
            consumer.pause([TopicPartition(t, p) for t, p in sorted(pause)])
        if resume:
            consumer.resume([TopicPartition(t, p) for t, p in sorted(resume)])
        self._paused = target
        commit.update(self._past_markers(consumer, commit))
        if commit:
            offsets = [TopicPartition(t, p, o) for (t, p), o in commit.items()]
            consumer.commit(offsets=offsets, asynchronous=True)
            self._committed.update(commit)

    def _past_markers(self, consumer: Consumer, commit: dict[TP, int]) -> dict[TP, int]:
        """Where a partition's offset to commit follows the last record returned, and the
        consumer's position is further on, only records it never returns lie between:
        transaction markers and aborted records (the router writes intents in
        transactions). Committing the position then keeps the lag Kafka reports at 0
        instead of 1 behind a marker; the ledger keeps the offset after the last record."""
        settled = {
            tp: offset
            for tp, offset in {**self._committed, **commit}.items()
            if self._returned.get(tp) == offset - 1
        }
        if not settled:
            return {}
        further = {}
        for pos in consumer.position([TopicPartition(t, p) for t, p in settled]):
            tp = (pos.topic, pos.partition)
            if pos.error is None and pos.offset > settled[tp]:
                further[tp] = pos.offset
        return further

    def _forget_positions(self, tps: list[TP]) -> None:
        for tp in tps:
            self._returned.pop(tp, None)
            self._committed.pop(tp, None)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget_positions(tps)
        ledger_offsets = self._on_loop(self._listener_().assigned(tps))
        committed = {
            (c.topic, c.partition): c.offset
            for c in consumer.committed(partitions, timeout=30)
            if c.offset >= 0
        }
        for p in partitions:
            key = (p.topic, p.partition)
            from_ledger = ledger_offsets.get(key)
            if from_ledger is not None:
                _, end = consumer.get_watermark_offsets(p, timeout=30, cached=False)
                if from_ledger > end:
                    # The topic was deleted and created again (or the ledger belongs to
                    # another cluster): its offset would skip new records. Read from the
                    # start; the ledger still skips every notification it has as done.
                    log.warning(
                        "%s sink: ledger offset %d is past the end (%d) of %s[%d]; "
                        "ignoring it (topic recreated?)",
                        self._name,
                        from_ledger,
                        end,
                        p.topic,
                        p.partition,
                    )
                    from_ledger = None
            candidates = [o for o in (from_ledger, committed.get(key)) if o is not None]
            if candidates:
                p.offset = min(candidates)
        log.info("%s sink assigned %s", self._name, _describe(partitions))
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        # librdkafka keeps a partition's pause flag across losing and regaining it; a
        # partition we paused before a lost session would otherwise never deliver again.
        consumer.resume(partitions)
        with self._lock:
            for tp in tps:
                self._pause_requests.pop(tp, None)
        self._want_paused.difference_update(tps)
        self._paused.difference_update(tps)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget_positions(tps)
        offsets = self._on_loop(self._listener_().revoked(tps))
        if offsets:
            with contextlib.suppress(KafkaException):
                consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    asynchronous=False,
                )
        log.info("%s sink revoked %s", self._name, _describe(partitions))
        self._unassign(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Someone else may own them already: do not commit, just forget local state. Their
        # in-flight records are recorded in the ledger as they finish; a resend by the new
        # owner is skipped once those land, or carries the same idempotency key.
        log.warning("%s sink lost %s", self._name, _describe(partitions))
        self._forget_positions([(p.topic, p.partition) for p in partitions])
        self._on_loop(self._listener_().lost([(p.topic, p.partition) for p in partitions]))
        self._unassign(consumer, partitions)

    def _unassign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()
        gone = {(p.topic, p.partition) for p in partitions}
        self._want_paused -= gone
        self._paused -= gone

    def _listener_(self) -> RebalanceListener:
        if self._listener is None:
            raise RuntimeError("KafkaSource.start() was not called")
        return self._listener

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            raise RuntimeError("KafkaSource.start() was not called")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in partitions) or "nothing"
