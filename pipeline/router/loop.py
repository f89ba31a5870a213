"""The router as a transactional consume-transform-produce loop on confluent-kafka (the
default engine, ``HERALD_ROUTER_ENGINE=confluent``).

One turn of the loop:

1. Read a batch (up to ``BATCH`` records) from the event topics: consumer group
   ``HERALD_ROUTER_APP_ID``, isolation.level=read_committed, no automatic commits.
2. Route every record with HoldingRouter: its intents, nothing, or one dead letter. A
   registry outage holds the batch here, before anything is produced, so no transaction
   is open while it waits.
3. exactly_once: begin a transaction, produce every output, send the batch's next offsets
   to the transaction with the consumer's group metadata, commit. The outputs and the
   source offsets become visible together or not at all. at_least_once: produce, flush
   (every output acknowledged), then commit the offsets.

A kill before the commit completes leaves an open transaction; the restarted router's
producer (the same transactional.id, kept in ``HERALD_ROUTER_DATA_DIR``) aborts it when it
starts, else the broker does after transaction.timeout.ms. Its consumer resumes from the
offsets the last committed transaction carried, so a read_committed reader sees every
intent once. A router that lost its partitions in a rebalance cannot commit for them: the
group metadata sent with the offsets fences it (KIP-447).

Failures: a commit refused with an error that asks for an abort while every output was
delivered (the group generation moved on, e.g. a hold longer than max.poll.interval.ms)
aborts the transaction and reads the batch again. Anything else (an output the broker
refused, a fatal error such as another process using this transactional.id, a bug)
aborts what is open and ends the process (``stop_now``, exit 70); the process
supervisor's restart reads the batch again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from pipeline import observe
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.stats import KafkaStats

if TYPE_CHECKING:
    from pipeline.people.tables import PeopleTables
from pipeline.router.handler import Output
from pipeline.router.handling import HoldingRouter, stop_now
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["BATCH", "RouterLoop", "RouterStats", "run_router", "transactional_id"]

log = logging.getLogger(__name__)

BATCH = 500  # records per transaction, at most
TIMEOUT_S = 60.0  # for one transactional call (init, send offsets, commit, abort)
RETRIES = 5  # of a transactional call that failed with a retriable error

T = TypeVar("T")


def transactional_id(settings: HeraldSettings) -> str:
    """``<router app id>-<instance>``: the instance is a random id created once in the
    router's data directory, so a restarted router has the id of the one it replaces (and
    aborts its open transaction at start), and two routers with their own data
    directories never fence each other."""
    data_dir = Path(settings.router_data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "router-instance-id"
    try:
        with open(path, "x") as f:
            f.write(uuid.uuid4().hex[:12])
    except FileExistsError:
        pass
    return f"{settings.router_app_id}-{path.read_text().strip()}"


@dataclass
class RouterStats:
    events: int = 0  # records routed and committed
    outputs: int = 0  # intents and dead letters committed
    batches: int = 0
    aborted: int = 0  # batches aborted and read again


def _coords(msg: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (never None for a record without
    an error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"record without coordinates: {msg.error()}")
    return topic, partition, offset


def _where(batch: list[Message]) -> str:
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for m in batch:
        topic, partition, offset = _coords(m)
        first, _ = spans.get((topic, partition), (offset, offset))
        spans[(topic, partition)] = (first, offset)
    return ", ".join(f"{t}[{p}]@{a}..{b}" for (t, p), (a, b) in sorted(spans.items()))


def _describe(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "nothing"


class RouterLoop:
    """Runs until ``stop()``: then it finishes the batch in hand (unless a hold is keeping
    it), commits it and leaves the group. ``on_unexpected`` is called with any failure the
    loop cannot recover from; by default it ends the process (``stop_now``)."""

    def __init__(
        self,
        settings: HeraldSettings,
        router: HoldingRouter,
        *,
        on_unexpected: Callable[[BaseException, str], None] = stop_now,
    ) -> None:
        self.settings = settings
        self.router = router
        self.on_unexpected = on_unexpected
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self.topics = Topics(settings.topic_prefix)
        self.stats = RouterStats()
        self._stopping = asyncio.Event()
        # The one thread that touches the consumer and the producer.
        self._kafka = concurrent.futures.ThreadPoolExecutor(1, "herald-router-kafka")
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._in_transaction = False
        self._delivery_errors: list[KafkaError] = []
        self._assigned: set[tuple[str, int]] = set()
        self.people: PeopleTables | None = None
        self.kafka_stats = KafkaStats("router")
        observe.register_readiness("router", self._readiness)

    def _readiness(self) -> tuple[bool, str]:
        ready = bool(self._assigned) and self.kafka_stats.broker_up is not False
        return ready, f"{len(self._assigned)} partition(s) assigned"

    @classmethod
    def from_settings(cls, settings: HeraldSettings) -> RouterLoop:
        from pipeline.people.tables import PeopleTables

        router = HoldingRouter.from_settings(settings)
        ensure_topics(settings)
        loop = cls(settings, router)
        # What the router knows about people: the subscriber, preference and suppression
        # tables, read from their compacted topics (pipeline/people/tables.py).
        loop.people = PeopleTables.from_settings(settings, router.handler.serde)
        router.handler.people = loop.people
        return loop

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        where = "start-up"
        try:
            await self._call(self._start)
            while not self._stopping.is_set():
                batch = await self._call(self._consume)
                if not batch:
                    continue
                where = _where(batch)
                outputs = await self._route_unless_stopped(batch)
                if outputs is None:
                    break  # stopped during a hold; nothing was produced for the batch
                await self._call(self._commit, batch, outputs)
            where = "shutdown"
            await self._call(self._close)
        except Exception as e:
            with contextlib.suppress(Exception):
                await self._call(self._abort_open)
            self.on_unexpected(e, where)
            raise
        finally:
            self._kafka.shutdown(wait=False)
        log.info(
            "router stopped: %d events, %d outputs in %d batches (%d aborted and read again)",
            self.stats.events,
            self.stats.outputs,
            self.stats.batches,
            self.stats.aborted,
        )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._kafka, fn, *args)

    # -- routing (on the event loop) ---------------------------------------------------------

    async def _route_unless_stopped(self, batch: list[Message]) -> list[Output] | None:
        routing = asyncio.ensure_future(self._route(batch))
        while not routing.done():
            await asyncio.wait({routing}, timeout=0.5)
            people_waiting = self.people is not None and self.people.waiting
            if self._stopping.is_set() and (self.router.held_since is not None or people_waiting):
                routing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await routing
                log.warning("stopping while %s is held; it will be read again", _where(batch))
                return None
        return routing.result()

    async def _route(self, batch: list[Message]) -> list[Output]:
        outputs: list[Output] = []
        for i, msg in enumerate(batch):
            topic, partition, offset = _coords(msg)
            if self.people is not None:
                # The people tables of this partition hold everything written before the
                # event (a subscriber set just before an event is seen by it).
                ts_type, ts = msg.timestamp()
                await self.people.wait_ready(
                    partition, ts if ts_type != TIMESTAMP_NOT_AVAILABLE else None
                )
            outputs += await self.router.handle(
                key=msg.key(),
                value=msg.value(),
                headers=msg.headers(),
                topic=topic,
                partition=partition,
                offset=offset,
            )
            if i % 50 == 49:
                await asyncio.sleep(0)  # sinks may share this event loop (herald run all)
        return outputs

    # -- the Kafka thread ----------------------------------------------------------------------

    def _start(self) -> None:
        if self.exactly_once:
            tid = transactional_id(self.settings)
            producer = Producer(self.settings.producer_config(**{"transactional.id": tid}))
            # Fences an earlier producer with this id and aborts its open transaction.
            self._retry(producer.init_transactions, TIMEOUT_S)
            log.info("router transactional producer %s ready", tid)
        else:
            producer = Producer(self.settings.producer_config())
        self._producer = producer
        consumer = Consumer(
            self.settings.router_consumer_config(
                **self.kafka_stats.config(self.settings.kafka_stats_interval_ms)
            )
        )
        if self.people is not None:
            self.people.start()  # checks co-partitioning, starts reading suppressions
        consumer.subscribe(
            self.topics.all_events(self.router.handler.serde.schemas.domains()),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer
        log.info(
            "router (%s) consuming %s as group %s",
            self.settings.processing_guarantee,
            ", ".join(self.topics.all_events(self.router.handler.serde.schemas.domains())),
            self.settings.router_app_id,
        )

    def _consume(self) -> list[Message]:
        consumer = self._consumer
        assert consumer is not None  # noqa: S101 - set in _start()
        first = consumer.poll(0.2)
        msgs = [] if first is None else [first, *consumer.consume(BATCH - 1, 0)]
        out = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("router consumer: %s", err)
        return out

    def _commit(self, batch: list[Message], outputs: list[Output]) -> None:
        consumer, producer = self._consumer, self._producer
        assert consumer is not None and producer is not None  # noqa: S101 - set in _start()
        offsets: dict[tuple[str, int], int] = {}
        for m in batch:
            topic, partition, offset = _coords(m)
            offsets[(topic, partition)] = offset + 1
        next_offsets = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        self._delivery_errors = []
        if self.exactly_once:
            producer.begin_transaction()
            self._in_transaction = True
            self._produce(producer, outputs)
            try:
                self._retry(
                    producer.send_offsets_to_transaction,
                    next_offsets,
                    consumer.consumer_group_metadata(),
                    TIMEOUT_S,
                )
                self._retry(producer.commit_transaction, TIMEOUT_S)
            except KafkaException as e:
                err = e.args[0]
                if self._delivery_errors:
                    raise self._delivery_failure() from e
                if not err.txn_requires_abort():
                    raise
                log.warning("router transaction for %s aborted: %s", _where(batch), err)
                self._retry(producer.abort_transaction, TIMEOUT_S)
                self._in_transaction = False
                self._rewind(consumer, batch)
                self.stats.aborted += 1
                return
            self._in_transaction = False
        else:
            self._produce(producer, outputs)
            if producer.flush(TIMEOUT_S) or self._delivery_errors:
                raise self._delivery_failure()
            consumer.commit(offsets=next_offsets, asynchronous=False)
        self.stats.batches += 1
        self.stats.events += len(batch)
        self.stats.outputs += len(outputs)

    def _produce(self, producer: Producer, outputs: list[Output]) -> None:
        for o in outputs:
            while True:
                try:
                    producer.produce(
                        o.topic, o.value, o.key, headers=o.headers, on_delivery=self._delivered
                    )
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: let deliveries drain
        producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.error("router output to %s refused: %s", msg.topic(), err)
            self._delivery_errors.append(err)

    def _delivery_failure(self) -> KafkaException:
        if self._delivery_errors:
            return KafkaException(self._delivery_errors[0])
        return KafkaException(KafkaError(KafkaError._TIMED_OUT, "outputs not acknowledged"))

    def _rewind(self, consumer: Consumer, batch: list[Message]) -> None:
        """Back to the batch's first record on every partition still assigned; a partition
        assigned again starts from its committed offset, which is the same place."""
        first: dict[tuple[str, int], int] = {}
        for m in batch:
            topic, partition, offset = _coords(m)
            first.setdefault((topic, partition), offset)
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        for (topic, partition), offset in first.items():
            if (topic, partition) in assigned:
                consumer.seek(TopicPartition(topic, partition, offset))

    def _retry(self, fn: Callable[..., T], *args: Any) -> T:
        for attempt in range(1, RETRIES + 1):
            try:
                return fn(*args)
            except KafkaException as e:
                err = e.args[0]
                if not err.retriable() or attempt == RETRIES:
                    raise
                log.warning("router %s: %s; retrying", getattr(fn, "__name__", fn), err)
        raise AssertionError("unreachable")

    def _abort_open(self) -> None:
        if self._in_transaction and self._producer is not None:
            self._in_transaction = False
            self._producer.abort_transaction(5)

    def _close(self) -> None:
        if self.people is not None:
            self.people.close()
        if self._consumer is not None:
            self._consumer.close()  # leaves the group: its partitions move on at once
        if self._producer is not None:
            self._producer.flush(TIMEOUT_S)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("router assigned %s", _describe(partitions))
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        if self.people is not None:
            self.people.on_assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called inside poll(), between batches: no transaction is open.
        log.info("router revoked %s", _describe(partitions))
        self._assigned -= {(p.topic, p.partition) for p in partitions}
        if self.people is not None:
            self.people.on_revoke(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("router lost %s", _describe(partitions))
        self._assigned -= {(p.topic, p.partition) for p in partitions}
        if self.people is not None:
            self.people.on_revoke(partitions)


async def run_router(settings: HeraldSettings) -> None:
    """``herald run router``: until SIGINT or SIGTERM, then the batch in hand is committed."""
    router = RouterLoop.from_settings(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, router.stop)
    server = await observe.serve(settings.observe_host, settings.observe_port)
    try:
        await router.run()
    finally:
        if server is not None:
            await server.close()
