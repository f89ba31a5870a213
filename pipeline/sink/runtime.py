"""The sink worker: one confluent-kafka consumer group per channel, effectively once.

Reading. The worker consumes the channel's topic and its retry tiers. Each partition has a
window of at most ``HERALD_SINK_MAX_IN_FLIGHT`` records being sent or waiting for their
outcome to be recorded; records fetched beyond it wait in the partition's queue and the
partition is paused until the queue drains (backpressure, not buffering). A retry record is
started only when its not-before time has come; until then its partition waits, others flow.

Deciding. Before sending, the worker asks the ledger (and its own memory of recent outcomes)
about the notification: anything terminal (SENT, REJECTED, DEAD) is skipped, as is a
RETRYING notification whose retry was already scheduled by a later attempt. Two copies of
one notification in flight at once are serialized, so the second sees the first's outcome.

Sending. Through the connector, gated by the provider's circuit breaker. Outcomes:
sent -> SENT; rejected -> REJECTED + dead letter; retryable -> a retry record on tier
min(attempts, tiers) with a not-before header, or DEAD + dead letter once attempts run out.
Every outcome is also a DeliveryStatus on notifications.status.

Recording (group commit, every ``HERALD_SINK_COMMIT_INTERVAL_MS``). The producer is flushed,
so every dead letter, retry and status record of the completed sends is acknowledged; then
ONE ledger transaction stores the outcomes and each partition's next offset, which only
advances over a contiguous run of completed records; then the same offsets are committed to
Kafka, moved past any transaction markers that follow (so ``kafka-consumer-groups
--describe`` shows true lag). Only then does a record
leave its window.

Rebalancing. The consumer is touched by one thread only. On assignment a partition starts
at min(ledger offset, Kafka's committed offset): the ledger is the truth, and an operator's
``--reset-offsets`` to an earlier point is honoured without resending what is done. On
revocation the worker stops starting new records of those partitions, waits for their
windows to be recorded, and commits them before giving them up; it never commits past
unfinished work.

A crash loses nothing: an outcome is recorded only after its side records were written, and
an offset only moves past recorded outcomes. It resends at most the windows in flight, with
the same idempotency key (email Message-ID) so receivers can drop the duplicate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors.base import Connector, DeliveryResult, Outcome
from pipeline import headers as h
from pipeline.deadletter import dead_letter, safe_header_text
from pipeline.records import (
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    DeliveryState,
    DeliveryStatus,
    NotificationIntent,
)
from pipeline.serialization import (
    AvroSerde,
    Decoded,
    RegistryUnavailableError,
    serde_from_settings,
)
from pipeline.settings import HeraldSettings
from pipeline.sink.breaker import BreakerState, CircuitBreaker
from pipeline.sink.ledger import TERMINAL, Ledger, LedgerEntry, LedgerOutcome, open_ledger
from pipeline.sink.retry import (
    RetryPolicy,
    epoch_ms,
    failure_headers,
    original_coordinates,
    parse_attempts,
    parse_not_before,
)
from pipeline.topics import Topics

__all__ = ["SinkStats", "SinkWorker"]

log = logging.getLogger(__name__)

TP = tuple[str, int]
Key = tuple[str, int]


@dataclass
class SinkStats:
    sent: int = 0
    rejected: int = 0
    dead: int = 0
    retried: int = 0
    skipped: int = 0
    undecodable: int = 0
    recorded: int = 0
    commits: int = 0


@dataclass
class _Partition:
    tp: TP
    queue: deque[Message] = field(default_factory=deque)  # fetched, not started
    order: deque[int] = field(default_factory=deque)  # offsets started, in order
    done: set[int] = field(default_factory=set)  # recorded offsets not yet contiguous
    active: int = 0  # started and not yet recorded
    next_offset: int | None = None  # what the ledger has (or will have) for this partition
    paused: bool = False
    wake: asyncio.TimerHandle | None = None
    revoked: bool = False


@dataclass
class _Completion:
    part: _Partition  # the assignment it was started under (a regained partition is new)
    offset: int
    outcome: LedgerOutcome | None


class SinkWorker:
    def __init__(
        self,
        settings: HeraldSettings,
        connector: Connector,
        *,
        serde: AvroSerde | None = None,
        ledger: Ledger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.connector = connector
        self.channel = connector.channel
        self.serde = serde or serde_from_settings(settings)
        self.topics = Topics(settings.topic_prefix)
        self.source = self.topics.notifications(self.channel)
        self.retry_topics = [
            self.topics.notifications_retry(self.channel, t)
            for t in range(1, settings.sink_retry_tiers + 1)
        ]
        self.dlq = self.topics.notifications_dlq(self.channel)
        self.group_id = f"{settings.sink_group_prefix}-{self.channel}"
        self.policy = RetryPolicy(
            max_attempts=settings.sink_max_attempts,
            tiers=settings.sink_retry_tiers,
            backoff_ms=settings.sink_retry_backoff_ms,
            backoff_max_ms=settings.sink_retry_backoff_max_ms,
        )
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_open_ms / 1000,
            settings.breaker_open_max_ms / 1000,
        )
        self.stats = SinkStats()
        self._ledger = ledger
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._stopping = asyncio.Event()
        self._parts: dict[TP, _Partition] = {}
        self._pending: list[_Completion] = []
        self._inflight: dict[Key, asyncio.Future[None]] = {}
        self._recent: OrderedDict[Key, tuple[DeliveryState, int]] = OrderedDict()
        # Ledger lookups asked for while one runs; the next runs them as one query.
        self._lookups: dict[Key, asyncio.Future[LedgerEntry | None]] = {}
        self._lookup_running = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._produce_errors: list[KafkaError] = []
        # Requests for the consumer thread (the only thread that touches the consumer).
        self._pause_requests: dict[TP, bool] = {}
        self._commit_request: dict[TP, int] = {}
        # The consumer thread's own view: the last offset it returned and the offset it
        # last committed to Kafka, per partition (see _past_markers).
        self._returned: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}
        self._consumer_thread = concurrent.futures.ThreadPoolExecutor(1, "herald-consumer")
        self._ledger_thread = concurrent.futures.ThreadPoolExecutor(1, "herald-ledger")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._fatal: BaseException | None = None
        self._cooperative = True

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish what is in flight, record and commit it, then leave the group."""
        self._stopping.set()

    async def run(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        if self._ledger is None:
            url = self.settings.ledger_url.get_secret_value()
            self._ledger = await loop.run_in_executor(self._ledger_thread, open_ledger, url)
        self._producer = Producer(self.settings.producer_config())
        config = self.settings.consumer_config(self.group_id)
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy"))
        self._consumer = Consumer(config)
        self._consumer.subscribe(
            [self.source, *self.retry_topics],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info("%s sink consuming %s as group %s", self.channel, self.source, self.group_id)
        recorder = asyncio.ensure_future(self._record_loop())
        try:
            while not self._stopping.is_set() and self._fatal is None:
                batch = await loop.run_in_executor(self._consumer_thread, self._consume)
                for msg in batch:
                    self._accept(msg)
            await self._drain(list(self._parts))
        finally:
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            for task in list(self._tasks):
                task.cancel()
            await loop.run_in_executor(self._consumer_thread, self._close)
            self._consumer_thread.shutdown()
            if self._ledger is not None:
                await loop.run_in_executor(self._ledger_thread, self._ledger.close)
            self._ledger_thread.shutdown()
        if self._fatal is not None:
            raise self._fatal

    def _close(self) -> None:
        if self._producer is not None:
            self._producer.flush(30)
        if self._consumer is not None:
            self._consumer.close()

    # -- the consumer thread -----------------------------------------------------------------

    def _consume(self) -> list[Message]:
        consumer = self._consumer
        assert consumer is not None  # noqa: S101 - set in run()
        requests, self._pause_requests = self._pause_requests, {}
        pause = [TopicPartition(t, p) for (t, p), want in requests.items() if want]
        resume = [TopicPartition(t, p) for (t, p), want in requests.items() if not want]
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        pause = [tp for tp in pause if (tp.topic, tp.partition) in assigned]
        resume = [tp for tp in resume if (tp.topic, tp.partition) in assigned]
        if pause:
            consumer.pause(pause)
        if resume:
            consumer.resume(resume)
        commit, self._commit_request = self._commit_request, {}
        commit.update(self._past_markers(consumer, commit))
        if commit:
            offsets = [TopicPartition(t, p, o) for (t, p), o in commit.items()]
            consumer.commit(offsets=offsets, asynchronous=True)
            self._committed.update(commit)
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
                topic, partition, offset = _coords(msg)
                self._returned[(topic, partition)] = offset
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("%s sink consumer error: %s", self.channel, err)
        return out

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

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget_positions(tps)
        ledger_offsets = self._call_on_loop(self._ledger_offsets(tps))
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
                        self.channel,
                        from_ledger,
                        end,
                        p.topic,
                        p.partition,
                    )
                    from_ledger = None
            candidates = [o for o in (from_ledger, committed.get(key)) if o is not None]
            if candidates:
                p.offset = min(candidates)
        log.info("%s sink assigned %s", self.channel, _describe(partitions))
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        # librdkafka keeps a partition's pause flag across losing and regaining it; a
        # partition we paused before a lost session would otherwise never deliver again.
        consumer.resume(partitions)
        for key in tps:
            self._pause_requests.pop(key, None)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget_positions(tps)
        offsets = self._call_on_loop(self._drain(tps))
        if offsets:
            with contextlib.suppress(KafkaException):
                consumer.commit(offsets=offsets, asynchronous=False)
        log.info("%s sink revoked %s", self.channel, _describe(partitions))
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Someone else may own them already: do not commit, just forget local state. Their
        # in-flight records are recorded in the ledger as they finish; a resend by the new
        # owner is skipped once those land, or carries the same idempotency key.
        log.warning("%s sink lost %s", self.channel, _describe(partitions))
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget_positions(tps)
        self._call_on_loop(self._forget(tps))
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _forget_positions(self, tps: list[TP]) -> None:
        for tp in tps:
            self._returned.pop(tp, None)
            self._committed.pop(tp, None)

    def _call_on_loop(self, coro: Any) -> Any:
        assert self._loop is not None  # noqa: S101
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    # -- the event loop: dispatch ------------------------------------------------------------

    def _accept(self, msg: Message) -> None:
        topic, partition, _ = _coords(msg)
        tp = (topic, partition)
        part = self._parts.get(tp)
        if part is None or part.revoked:
            part = self._parts[tp] = _Partition(tp)
        part.queue.append(msg)
        self._pump(part)

    def _pump(self, part: _Partition) -> None:
        if part.revoked:
            return
        limit = max(1, self.settings.sink_max_in_flight)
        while part.queue and part.active < limit and not self._stopping.is_set():
            head = part.queue[0]
            due = parse_not_before(h.as_dict(head.headers()))
            wait = due - time.time()
            if wait > 0:
                if part.wake is None:
                    assert self._loop is not None  # noqa: S101
                    part.wake = self._loop.call_later(wait, self._wake, part)
                break
            part.queue.popleft()
            offset = _coords(head)[2]
            part.order.append(offset)
            part.active += 1
            task = asyncio.ensure_future(self._process(part, head, offset))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        want_pause = bool(part.queue)
        if want_pause != part.paused:
            part.paused = want_pause
            self._pause_requests[part.tp] = want_pause

    def _wake(self, part: _Partition) -> None:
        part.wake = None
        self._pump(part)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fatal = task.exception()
            log.error("%s sink failed", self.channel, exc_info=self._fatal)

    # -- one record --------------------------------------------------------------------------

    async def _process(self, part: _Partition, msg: Message, offset: int) -> None:
        topic, partition, _ = _coords(msg)
        try:
            decoded = await self._decode(msg, topic, partition, offset)
            intent = NotificationIntent.from_avro(decoded.record)
        except Exception as e:  # DecodeError, or a record that does not make an intent
            log.warning("dead-lettering %s[%d]@%d to %s: %s", topic, partition, offset, self.dlq, e)
            self.stats.undecodable += 1
            self._dead_letter(msg, e, attempts=0, error_class=None)
            self._complete(part, offset, None)
            return
        key = (intent.notification_id, intent.generation)
        while key in self._inflight:  # the same notification twice: one at a time
            await asyncio.shield(self._inflight[key])
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        try:
            retry = topic in self.retry_topics
            attempts = parse_attempts(h.as_dict(msg.headers())) if retry else 0
            outcome = await self._deliver(msg, intent, key, attempts)
        finally:
            del self._inflight[key]
            done.set_result(None)
        self._complete(part, offset, outcome)

    async def _decode(self, msg: Message, topic: str, partition: int, offset: int) -> Decoded:
        """The intent in ``msg``. While the schema registry cannot answer, the record is
        held (its window slot stays taken, so no offset moves past it) and decoded again
        with capped backoff, in a thread so a hanging registry does not stall the loop."""
        decode = functools.partial(
            self.serde.decode,
            msg.value(),
            topic=topic,
            partition=partition,
            offset=offset,
            expect=NOTIFICATION_INTENT,
        )
        try:
            return decode()
        except RegistryUnavailableError as e:
            error: Exception = e
        delay = 0.2
        while True:
            log.warning(
                "holding %s[%d]@%d: %s; retrying in %.1fs", topic, partition, offset, error, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                return await asyncio.to_thread(decode)
            except RegistryUnavailableError as e:
                error = e

    async def _deliver(
        self, msg: Message, intent: NotificationIntent, key: Key, attempts_before: int
    ) -> LedgerOutcome | None:
        if await self._already_handled(key, attempts_before):
            self.stats.skipped += 1
            return None
        probe = await self.breaker.wait_until_closed_or_probe()
        result = await self._send(intent)
        attempts = attempts_before + 1
        now = datetime.now(UTC)
        before = self.breaker.opened_count
        if result.outcome is Outcome.RETRYABLE:
            self.breaker.failure(probe)
            if self.breaker.opened_count != before:
                log.warning(
                    "%s circuit breaker open for %.1fs after %s: %s",
                    self.channel,
                    self.breaker.remaining_open_s(),
                    "a failed probe" if probe else "consecutive failures",
                    result.response,
                )
        else:
            was_open = self.breaker.state is not BreakerState.CLOSED
            self.breaker.success(probe)
            if was_open:
                log.warning("%s circuit breaker closed: the provider answers again", self.channel)

        if result.outcome is Outcome.SENT:
            self.stats.sent += 1
            state = DeliveryState.SENT
        elif result.outcome is Outcome.REJECTED:
            self.stats.rejected += 1
            state = DeliveryState.REJECTED
            log.info("%s rejected %s: %s", self.channel, intent.notification_id, result.response)
            self._dead_letter(msg, _ProviderError(result), attempts, result.error_class, now)
        elif self.policy.exhausted(attempts):
            self.stats.dead += 1
            state = DeliveryState.DEAD
            log.warning(
                "%s gave up on %s after %d attempts: %s",
                self.channel,
                intent.notification_id,
                attempts,
                result.response,
            )
            self._dead_letter(msg, _ProviderError(result), attempts, result.error_class, now)
        else:
            self.stats.retried += 1
            state = DeliveryState.RETRYING
            self._schedule_retry(msg, attempts, result, now)
        self._status(intent, state, attempts, result, now)
        self._remember(key, state, attempts)
        return LedgerOutcome(
            notification_id=intent.notification_id,
            generation=intent.generation,
            channel=self.channel,
            recipient=self.connector.describe_recipient(intent.recipient),
            state=state,
            attempts=attempts,
            response=safe_header_text(result.response) if result.response else None,
            error_class=result.error_class,
            provider_message_id=result.provider_message_id,
            at=now,
        )

    async def _already_handled(self, key: Key, attempts_before: int) -> bool:
        known = self._recent.get(key)
        if known is None:
            entry = await self._ledger_entry(key)
            known = (entry.state, entry.attempts) if entry is not None else None
        if known is None:
            return False
        state, attempts = known
        # Terminal: done. RETRYING with more attempts than this record knows of: a retry
        # for a later attempt exists already, this copy is stale.
        return state in TERMINAL or attempts > attempts_before

    async def _ledger_entry(self, key: Key) -> LedgerEntry | None:
        """The ledger's entry for ``key``. Lookups asked for while one is running wait for
        the next, which asks for all of them at once: one query and one trip to the ledger
        thread for a batch of records instead of one each."""
        loop = asyncio.get_running_loop()
        future = self._lookups.get(key)
        if future is None or future.cancelled():
            future = self._lookups[key] = loop.create_future()
            if not self._lookup_running:
                self._lookup_running = True
                task = asyncio.ensure_future(self._run_lookups())
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
        return await future

    async def _run_lookups(self) -> None:
        assert self._ledger is not None  # noqa: S101
        ledger, loop = self._ledger, asyncio.get_running_loop()
        try:
            while self._lookups:
                batch, self._lookups = self._lookups, {}
                try:
                    entries = await loop.run_in_executor(
                        self._ledger_thread, ledger.lookup, list(batch)
                    )
                except Exception as e:  # each waiting record fails as its own lookup would
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(e)
                    continue
                for key, future in batch.items():
                    if not future.done():
                        future.set_result(entries.get(key))
        finally:
            self._lookup_running = False

    def _remember(self, key: Key, state: DeliveryState, attempts: int) -> None:
        previous = self._recent.get(key)
        if previous is not None and previous[0] is DeliveryState.SENT:
            return
        self._recent[key] = (state, attempts)
        self._recent.move_to_end(key)
        while len(self._recent) > 100_000:
            self._recent.popitem(last=False)

    async def _send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            return await self.connector.send(intent)
        except Exception as e:  # a connector bug or an unexpected failure: try again later
            log.exception("%s connector raised for %s", self.channel, intent.notification_id)
            return DeliveryResult.retryable(type(e).__name__, str(e))

    # -- recording ---------------------------------------------------------------------------

    def _complete(self, part: _Partition, offset: int, outcome: LedgerOutcome | None) -> None:
        self._pending.append(_Completion(part, offset, outcome))

    async def _record_loop(self) -> None:
        interval = self.settings.sink_commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self._record_pending()
            except Exception as e:
                self._fatal = e
                log.error("%s sink cannot record outcomes: %s", self.channel, e)
                return

    async def _record_pending(self) -> list[TopicPartition]:
        """One group commit. Returns the offsets it committed."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        producer = self._producer
        assert producer is not None and self._ledger is not None  # noqa: S101
        remaining = await loop.run_in_executor(None, producer.flush, 60)
        if remaining or self._produce_errors:
            errors = self._produce_errors or [KafkaError(KafkaError._MSG_TIMED_OUT)]
            # Without these records acknowledged nothing may be recorded: stop; the records
            # are processed again after a restart, and skipped where already done.
            raise KafkaException(errors[0])
        touched: dict[TP, _Partition] = {}
        for c in batch:
            if c.part.revoked:  # outcome still recorded; its offset is the next owner's
                continue
            c.part.done.add(c.offset)
            touched[c.part.tp] = c.part
        offsets: dict[TP, int] = {}
        for tp, part in touched.items():
            while part.order and part.order[0] in part.done:
                first = part.order.popleft()
                part.done.discard(first)
                part.next_offset = first + 1
            if part.next_offset is not None:
                offsets[tp] = part.next_offset
        outcomes = [c.outcome for c in batch if c.outcome is not None]
        ledger = self._ledger
        await loop.run_in_executor(
            self._ledger_thread, ledger.record, self.group_id, outcomes, offsets
        )
        self.stats.recorded += len(outcomes)
        self.stats.commits += 1
        commit = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        for tp, offset in offsets.items():  # merged: the consumer thread may not have run yet
            self._commit_request[tp] = max(offset, self._commit_request.get(tp, offset))
        for c in batch:
            c.part.active -= 1
        for part in touched.values():
            self._pump(part)
        return commit

    async def _ledger_offsets(self, tps: list[TP]) -> dict[TP, int]:
        assert self._ledger is not None  # noqa: S101
        ledger = self._ledger
        return await asyncio.get_running_loop().run_in_executor(
            self._ledger_thread, ledger.offsets, self.group_id, tps
        )

    async def _drain(self, tps: list[TP]) -> list[TopicPartition]:
        """Stop starting records of ``tps``, wait for their windows to be recorded, and
        return their next offsets (for a synchronous commit before they are given up)."""
        parts = [self._parts[tp] for tp in tps if tp in self._parts]
        for part in parts:
            part.queue.clear()  # not started: the next owner reads them again
            if part.wake is not None:
                part.wake.cancel()
                part.wake = None
        deadline = time.monotonic() + 60
        while any(p.active for p in parts) and time.monotonic() < deadline:
            if self._fatal is not None:
                break
            await asyncio.sleep(0.01)
            await self._record_pending()
        offsets = [
            TopicPartition(p.tp[0], p.tp[1], p.next_offset)
            for p in parts
            if p.next_offset is not None and not p.active
        ]
        await self._forget(tps)
        return offsets

    async def _forget(self, tps: list[TP]) -> None:
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                part.revoked = True
                if part.wake is not None:
                    part.wake.cancel()

    # -- output ------------------------------------------------------------------------------

    def _schedule_retry(
        self, msg: Message, attempts: int, result: DeliveryResult, now: datetime
    ) -> None:
        delay = self.policy.delay_ms(attempts, result.retry_after, self._rng)
        topic = self.topics.notifications_retry(self.channel, self.policy.tier(attempts))
        hdrs = failure_headers(
            h.pairs(msg.headers()),
            failed_attempts=attempts,
            now=now,
            not_before_ms=epoch_ms(now) + delay,
            original=self._original(msg),
        )
        self._produce(topic, msg.key(), msg.value(), hdrs)

    def _original(self, msg: Message) -> tuple[str, int, int]:
        here = _coords(msg)
        return original_coordinates(h.as_dict(msg.headers()), here, here[0] in self.retry_topics)

    def _status(
        self,
        intent: NotificationIntent,
        state: DeliveryState,
        attempts: int,
        r: DeliveryResult,
        now: datetime,
    ) -> None:
        status = DeliveryStatus(
            notification_id=intent.notification_id,
            generation=intent.generation,
            event_id=intent.event_id,
            channel=self.channel,
            recipient=self.connector.describe_recipient(intent.recipient),
            state=state,
            attempts=attempts,
            provider_message_id=r.provider_message_id,
            provider_response=safe_header_text(r.response) if r.response else None,
            error_class=r.error_class,
            occurred_at=now,
        )
        value, ref = self.serde.encode(DELIVERY_STATUS, status.to_avro())
        self._produce(
            self.topics.status,
            intent.notification_id.encode(),
            value,
            [
                (h.NOTIFICATION_ID, intent.notification_id.encode()),
                (h.EVENT_ID, intent.event_id.encode()),
                (h.SCHEMA, ref.encode()),
            ],
        )

    def _dead_letter(
        self,
        msg: Message,
        error: BaseException,
        attempts: int,
        error_class: str | None,
        now: datetime | None = None,
    ) -> None:
        coords = self._original(msg)
        hdrs = failure_headers(
            h.pairs(msg.headers()),
            failed_attempts=attempts,
            now=now or datetime.now(UTC),
            not_before_ms=None,
            original=coords,
        )
        dl = dead_letter(
            self.dlq,
            key=msg.key(),
            value=msg.value(),
            headers=hdrs,
            topic=coords[0],
            partition=coords[1],
            offset=coords[2],
            error=error,
            attempts=attempts,
            error_class=error_class,
            max_bytes=self.settings.max_record_bytes,
        )
        self._produce(dl.topic, dl.key, dl.value, dl.headers)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, hdrs: h.Headers) -> None:
        producer = self._producer
        assert producer is not None  # noqa: S101 - set in run()
        while True:
            try:
                producer.produce(topic, value, key, headers=hdrs, on_delivery=self._acked)
                return
            except BufferError:
                producer.poll(0.05)

    def _acked(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._produce_errors.append(err)


class _ProviderError(Exception):
    """The provider's final answer, as the error recorded in dead-letter headers."""

    def __init__(self, result: DeliveryResult) -> None:
        self.result = result
        super().__init__(result.response or result.error_class or result.outcome.value)


def _coords(msg: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (never None for a record without
    an error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"record without coordinates: {msg.error()}")
    return topic, partition, offset


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in partitions) or "nothing"
