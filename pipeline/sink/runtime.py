"""The sink worker: one consumer group per channel, effectively once.

This module dispatches records and decides each one's fate; the jobs around it live in
their own modules:

- ``consumer``: the Kafka consumer, its thread, pauses, commits and rebalances;
- ``windows``: per-partition offset windows (pure): how far an offset may move;
- ``dedupe``: whether a notification is done already or a retry is stale;
- ``limits``: the connector's declared limits and the provider's retry-after pauses;
- ``breaker``: the circuit breaker for failures without such a hint;
- ``checkpoint``: the group commit of outcomes and offsets;
- ``outputs``: retry records, dead letters and statuses.

Reading. The worker consumes the channel's topic and its retry tiers. Each partition has a
window of at most ``HERALD_SINK_MAX_IN_FLIGHT`` records being sent or waiting for their
outcome to be recorded; records fetched beyond it wait in the partition's queue and the
partition is paused until the queue drains (backpressure, not buffering). A retry record is
started only when its not-before time has come; until then its partition waits, others flow.

Deciding. Before sending: anything the ledger (or the worker's memory) has as terminal is
skipped, as is a stale retry; an intent over the connector's ``max_body_bytes`` is rejected
without a provider call.

Sending. Through the connector, one send at a time per concurrency slot and token
(``max_concurrency``, ``rate_per_second``), gated by the circuit breaker. Outcomes:
sent -> SENT; rejected -> REJECTED + dead letter (and, when the provider said the address is
gone, ``RecipientGone``, a suppression of it on people.suppressions); retryable with a
retry-after up to ``HERALD_SINK_MAX_THROTTLE_MS`` -> a THROTTLED status, the whole channel
pauses that long (every partition paused, no send starts) and the same attempt is sent again;
other
retryable -> a retry record on tier min(attempts, tiers), or DEAD + dead letter once
attempts run out. Every outcome is also a DeliveryStatus on notifications.status.

A crash loses nothing: an outcome is recorded only after its side records were written, and
an offset only moves past recorded outcomes. It resends at most the windows in flight, with
the same idempotency key (email Message-ID) so receivers can drop the duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message, Producer

from connectors.base import TRACEPARENT, Connector, DeliveryResult, Outcome
from pipeline import headers as h
from pipeline import logs, metrics, observe, tracing
from pipeline.deadletter import safe_header_text
from pipeline.kafka.stats import KafkaStats
from pipeline.people.records import SUPPRESSION
from pipeline.records import (
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    DeliveryState,
    NotificationIntent,
)
from pipeline.serialization import (
    AvroSerde,
    Decoded,
    serde_from_settings,
    through_registry_outage,
)
from pipeline.settings import HeraldSettings
from pipeline.sink.breaker import BreakerState, CircuitBreaker
from pipeline.sink.checkpoint import Checkpoint
from pipeline.sink.consumer import KafkaSource, Source
from pipeline.sink.dedupe import Deduper
from pipeline.sink.ledger import Key, Ledger, LedgerOutcome, LedgerThread
from pipeline.sink.limits import ChannelPause, ProviderGate, oversize
from pipeline.sink.outputs import RECIPIENT_GONE, Outputs, ProviderError, coords
from pipeline.sink.outputs import Producer as ProducerLike
from pipeline.sink.retry import RetryPolicy, parse_attempts, parse_not_before
from pipeline.sink.stats import SinkStats
from pipeline.sink.windows import TP, OffsetWindow
from pipeline.topics import Topics

__all__ = ["SinkStats", "SinkWorker"]

log = logging.getLogger(__name__)

_BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_OUTCOME_NAMES = {
    DeliveryState.SENT: "sent",
    DeliveryState.REJECTED: "rejected",
    DeliveryState.DEAD: "dead",
    DeliveryState.RETRYING: "retrying",
}


def _event_time(msg: Message, intent: NotificationIntent) -> float:
    """When the notification's cause happened, in epoch seconds: the event's time the router
    put on the intent, else the intent's creation (direct notifications, redrives)."""
    raw = h.as_dict(msg.headers()).get(h.EVENT_TIME)
    if raw and raw.isdigit():
        return int(raw) / 1000
    return intent.created_at.timestamp()


@dataclass(eq=False)
class _Partition:
    tp: TP
    window: OffsetWindow
    queue: deque[Message] = field(default_factory=deque)  # fetched, not started
    paused: bool = False
    draining: bool = False  # being given up: records waiting out a pause give up
    wake: asyncio.TimerHandle | None = None


class _Abandoned(Exception):
    """A record given up unsent while waiting out a pause (its partition is going away)."""


class SinkWorker:
    def __init__(
        self,
        settings: HeraldSettings,
        connector: Connector,
        *,
        serde: AvroSerde | None = None,
        ledger: Ledger | None = None,
        rng: random.Random | None = None,
        source: Source | None = None,
        producer: ProducerLike | None = None,
    ) -> None:
        """``ledger``, ``source`` and ``producer`` default to what the settings name (the
        ledger URL, a KafkaSource and a confluent-kafka Producer, built in ``run()``);
        tests pass their own."""
        self.settings = settings
        self.connector = connector
        self.channel = connector.channel
        self.serde = serde or serde_from_settings(settings)
        self.policy = RetryPolicy(
            max_attempts=settings.sink_max_attempts,
            tiers=settings.sink_retry_tiers,
            backoff_ms=settings.sink_retry_backoff_ms,
            backoff_max_ms=settings.sink_retry_backoff_max_ms,
        )
        self.topics = Topics(settings.topic_prefix)
        self.topic = self.topics.notifications(self.channel)
        self.retry_topics = [
            self.topics.notifications_retry(self.channel, t)
            for t in range(1, settings.sink_retry_tiers + 1)
        ]
        self.dlq = self.topics.notifications_dlq(self.channel)
        self.group_id = f"{settings.sink_group_prefix}-{self.channel}"
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold,
            settings.breaker_open_ms / 1000,
            settings.breaker_open_max_ms / 1000,
        )
        # The connector's limits, read once from the instance (it may set them from its
        # settings in __init__).
        self.gate = ProviderGate(connector.max_concurrency, connector.rate_per_second)
        self.pause = ChannelPause(
            self.gate,
            settings.sink_max_throttle_ms / 1000,
            self._hold,
            self._pump_all,
            self.channel,
        )
        self.stats = SinkStats()
        # Prometheus children, bound once (pipeline/metrics.py).
        self._outcomes = {
            name: metrics.DELIVERIES.labels(self.channel, name)
            for name in (
                "sent",
                "rejected",
                "dead",
                "retrying",
                "throttled",
                "skipped",
                "abandoned",
            )
        }
        self._consumed: dict[str, Any] = {}
        self._latency = metrics.DELIVERY_LATENCY.labels(self.channel)
        self._send_seconds = {
            o: metrics.SEND_SECONDS.labels(self.channel, o.value) for o in Outcome
        }
        self._breaker_opened = metrics.BREAKER_OPENED.labels(self.channel)
        # librdkafka statistics of the consumer run() builds: lag, broker reachability.
        self.kafka_stats = KafkaStats("sink")
        self._assigned: set[TP] | None = None  # None until the group's first assignment
        self.ledger = LedgerThread(ledger)
        self.deduper = Deduper(self.ledger.lookup)
        self.checkpoint = Checkpoint(
            self.group_id,
            self.ledger,
            self._flush_outputs,
            self._commit,
            self._released,
            self.stats,
        )
        self.outputs: Outputs  # built in run(), with the producer
        self._source = source
        self._producer = producer
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._stopping = asyncio.Event()
        self._parts: dict[TP, _Partition] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fatal: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish what is in flight, record and commit it, then leave the group."""
        self._stopping.set()

    async def run(self) -> None:
        readiness = f"sink-{self.channel}"
        observe.register_readiness(readiness, self.readiness)
        metrics.IN_FLIGHT.labels(self.channel).set_function(self._in_flight)
        metrics.BREAKER_STATE.labels(self.channel).set_function(self._breaker_state)
        try:
            # Status records are encoded after a send: make sure their schema is registered
            # first, so a registry outage later cannot fail a record already sent.
            # The same for suppressions, written after a send whose address is gone.
            for schema in (DELIVERY_STATUS, SUPPRESSION):
                await through_registry_outage(
                    functools.partial(self.serde.prepare, schema),
                    f"the {self.channel} sink's start",
                    self.settings.router_retry_backoff_ms / 1000,
                    self.settings.router_retry_backoff_max_ms / 1000,
                )
            await self.ledger.open(self.settings.ledger_url.get_secret_value())
            producer = self._producer or Producer(self.settings.producer_config())
            self.outputs = Outputs(
                producer,
                self.connector,
                self.topics,
                self.serde,
                self.policy,
                max_record_bytes=self.settings.max_record_bytes,
                rng=self._rng,
            )
            source = self._source or KafkaSource(
                self.settings.consumer_config(
                    self.group_id,
                    **self.kafka_stats.config(self.settings.kafka_stats_interval_ms),
                ),
                self.channel,
            )
            self._source = source
            await source.start([self.topic, *self.retry_topics], self)
            log.info("%s sink consuming %s as group %s", self.channel, self.topic, self.group_id)
            await self._consume(source)
        finally:
            observe.unregister_readiness(readiness)
            self.kafka_stats.close()
            await self.ledger.close()
        if self._fatal is not None:
            raise self._fatal

    async def _consume(self, source: Source) -> None:
        recorder = asyncio.ensure_future(self._record_loop())
        try:
            while not self._stopping.is_set() and self._fatal is None:
                for msg in await source.poll():
                    self._accept(msg)
            await self._drain(list(self._parts))
        finally:
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            for task in list(self._tasks):
                task.cancel()
            self.deduper.cancel()
            self.pause.close()
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.outputs.close)
            finally:
                await source.close()

    # -- rebalancing (called by the consumer, on the event loop) -----------------------------

    async def assigned(self, tps: list[TP]) -> dict[TP, int]:
        offsets = await self.ledger.offsets(self.group_id, tps)
        self._assigned = (self._assigned or set()) | set(tps)
        return offsets

    async def revoked(self, tps: list[TP]) -> dict[TP, int]:
        if self._assigned is not None:
            self._assigned -= set(tps)
        return await self._drain(tps)

    async def lost(self, tps: list[TP]) -> None:
        if self._assigned is not None:
            self._assigned -= set(tps)
        self._forget(tps)

    # -- observability -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Ready: the group has assigned this sink its partitions (possibly none, when the
        group has more members than partitions), a broker answers, and the breaker is not
        open. Called on each /readyz."""
        if self._fatal is not None:
            return False, f"stopping after a failure: {type(self._fatal).__name__}"
        if self._assigned is None:
            return False, f"waiting for the group's assignment ({self.group_id})"
        if self.kafka_stats.broker_up is False:
            return False, "no Kafka broker answers"
        if self.breaker.state is BreakerState.OPEN:
            return False, f"circuit breaker open for {self.breaker.remaining_open_s():.1f}s more"
        return True, f"{len(self._assigned)} partition(s) assigned"

    def _in_flight(self) -> float:
        return float(sum(p.window.in_flight for p in list(self._parts.values())))

    def _breaker_state(self) -> float:
        return float(_BREAKER_VALUES[self.breaker.state])

    async def _drain(self, tps: list[TP]) -> dict[TP, int]:
        """Stop starting records of ``tps``, wait for their windows to be recorded, and
        return their next offsets (for a synchronous commit before they are given up)."""
        parts = [self._parts[tp] for tp in tps if tp in self._parts]
        for part in parts:
            part.draining = True
            part.queue.clear()  # not started: the next owner reads them again
            if part.wake is not None:
                part.wake.cancel()
                part.wake = None
        deadline = time.monotonic() + 60
        while any(p.window.in_flight for p in parts) and time.monotonic() < deadline:
            if self._fatal is not None:
                break
            await asyncio.sleep(0.01)
            await self.checkpoint.record()
        offsets = {
            p.tp: p.window.next_offset
            for p in parts
            if p.window.next_offset is not None and not p.window.in_flight
        }
        self._forget(tps)
        return offsets

    def _forget(self, tps: list[TP]) -> None:
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                part.window.closed = True
                if part.wake is not None:
                    part.wake.cancel()

    # -- dispatch ----------------------------------------------------------------------------

    def _accept(self, msg: Message) -> None:
        topic, partition, _ = coords(msg)
        tp = (topic, partition)
        consumed = self._consumed.get(topic)
        if consumed is None:
            consumed = self._consumed[topic] = metrics.CONSUMED.labels("sink", topic)
        consumed.inc()
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition(tp, OffsetWindow(tp))
        part.queue.append(msg)
        self._pump(part)

    def _pump(self, part: _Partition) -> None:
        if part.window.closed or part.draining:
            return
        limit = self.settings.sink_max_in_flight
        paused = self.pause.on  # nothing new starts during a provider's pause
        while (
            part.queue
            and not paused
            and part.window.has_room(limit)
            and not self._stopping.is_set()
        ):
            head = part.queue[0]
            due = parse_not_before(h.as_dict(head.headers()))
            wait = due - time.time()
            if wait > 0:
                if part.wake is None:
                    part.wake = asyncio.get_running_loop().call_later(wait, self._wake, part)
                break
            part.queue.popleft()
            offset = coords(head)[2]
            part.window.start(offset)
            task = asyncio.ensure_future(self._process(part, head, offset))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        want_pause = bool(part.queue)
        if want_pause != part.paused:
            part.paused = want_pause
            self._get_source().pause(part.tp, want_pause)

    def _pump_all(self) -> None:
        for part in list(self._parts.values()):
            self._pump(part)

    def _hold(self, held: bool) -> None:
        self._get_source().hold(held)

    def _wake(self, part: _Partition) -> None:
        part.wake = None
        self._pump(part)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fatal = task.exception()
            log.error("%s sink failed", self.channel, exc_info=self._fatal)

    def _get_source(self) -> Source:
        if self._source is None:
            raise RuntimeError("SinkWorker.run() was not called")
        return self._source

    # -- one record --------------------------------------------------------------------------

    async def _process(self, part: _Partition, msg: Message, offset: int) -> None:
        topic, partition, _ = coords(msg)
        with logs.context(channel=self.channel, topic=topic, partition=partition, offset=offset):
            await self._process_in_context(part, msg, topic, partition, offset)

    async def _process_in_context(
        self, part: _Partition, msg: Message, topic: str, partition: int, offset: int
    ) -> None:
        try:
            decoded = await self._decode(msg, topic, partition, offset)
            intent = NotificationIntent.from_avro(decoded.record)
        except Exception as e:  # DecodeError, or a record that does not make an intent
            log.warning("dead-lettering %s[%d]@%d to %s: %s", topic, partition, offset, self.dlq, e)
            self.stats.undecodable += 1
            self.outputs.dead_letter(msg, e, attempts=0, error_class=None)
            self.checkpoint.complete(part.window, offset, None)
            return
        key = (intent.notification_id, intent.generation)
        logs.update_context(notification_id=intent.notification_id, event_id=intent.event_id)
        try:
            async with self.deduper.exclusive(key):
                retry = topic in self.retry_topics
                attempts = parse_attempts(h.as_dict(msg.headers())) if retry else 0
                outcome = await self._deliver(part, msg, intent, key, attempts)
        except _Abandoned:
            self.stats.abandoned += 1
            self._outcomes["abandoned"].inc()
            self.checkpoint.abandon(part.window, offset)
            return
        self.checkpoint.complete(part.window, offset, outcome)

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
        return await through_registry_outage(
            decode,
            f"{topic}[{partition}]@{offset}",
            self.settings.router_retry_backoff_ms / 1000,
            self.settings.router_retry_backoff_max_ms / 1000,
        )

    async def _deliver(
        self,
        part: _Partition,
        msg: Message,
        intent: NotificationIntent,
        key: Key,
        attempts_before: int,
    ) -> LedgerOutcome | None:
        if await self.deduper.already_handled(key, attempts_before):
            self.stats.skipped += 1
            self._outcomes["skipped"].inc()
            return None
        result = oversize(self.connector, intent)
        if result is None:
            result = await self._attempt(part, intent, attempts_before)
        attempts = attempts_before + 1
        now = datetime.now(UTC)
        if result.outcome is Outcome.SENT:
            self.stats.sent += 1
            state = DeliveryState.SENT
            self._latency.observe(max(0.0, now.timestamp() - _event_time(msg, intent)))
        elif result.outcome is Outcome.REJECTED:
            self.stats.rejected += 1
            state = DeliveryState.REJECTED
            log.info("%s rejected %s: %s", self.channel, intent.notification_id, result.response)
            self.outputs.dead_letter(msg, ProviderError(result), attempts, result.error_class, now)
            if result.error_class == RECIPIENT_GONE:
                self.outputs.suppress(intent, result, now)
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
            self.outputs.dead_letter(msg, ProviderError(result), attempts, result.error_class, now)
        else:
            self.stats.retried += 1
            state = DeliveryState.RETRYING
            self.outputs.retry(msg, attempts, result, now)
        self._outcomes[_OUTCOME_NAMES[state]].inc()
        if self.settings.log_outcomes:
            log.info(
                "%s %s after %d attempt(s)",
                self.channel,
                state.value,
                attempts,
                extra={
                    "outcome": state.value,
                    "attempts": attempts,
                    "error_class": result.error_class,
                },
            )
        self.outputs.status(intent, state, attempts, result, now)
        self.deduper.remember(key, state, attempts)
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

    async def _attempt(
        self, part: _Partition, intent: NotificationIntent, attempts_before: int
    ) -> DeliveryResult:
        """One attempt's result. A retry-after within the cap pauses the channel and sends
        the same attempt again, as often as the provider asks (each time a THROTTLED
        status): it costs no attempt and no breaker failure."""
        while True:
            probe = await self.breaker.wait_until_closed_or_probe()
            if not await self.gate.acquire(lambda: self._stopping.is_set() or part.draining):
                if probe:
                    self.breaker.release_probe()
                raise _Abandoned
            try:
                result = await self._send(intent, attempts_before + 1)
            finally:
                self.gate.release()
            if not self.pause.applies(result):
                self._account(result, probe)
                return result
            if probe:
                self.breaker.release_probe()
            self.stats.throttled += 1
            self._outcomes["throttled"].inc()
            self.pause.start(result)
            self.outputs.status(
                intent, DeliveryState.THROTTLED, attempts_before, result, datetime.now(UTC)
            )

    def _account(self, result: DeliveryResult, probe: bool) -> None:
        before = self.breaker.opened_count
        if result.outcome is Outcome.RETRYABLE:
            self.breaker.failure(probe)
            if self.breaker.opened_count != before:
                self._breaker_opened.inc()
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

    async def _send(self, intent: NotificationIntent, attempt: int) -> DeliveryResult:
        """One provider call, in a span "herald.send <channel>" continuing the intent's
        trace (when tracing is on); the connector sees the span's traceparent (or, with
        tracing off, the intent's) in ``connectors.base.TRACEPARENT``."""
        started = time.perf_counter()
        attributes: dict[str, str | int] = {
            "herald.notification_id": intent.notification_id,
            "herald.event_id": intent.event_id,
            "herald.channel": self.channel,
            "herald.generation": intent.generation,
            "herald.attempt": attempt,
        }
        with tracing.span(
            f"herald.send {self.channel}",
            parent=intent.traceparent,
            kind="client",
            attributes=attributes,
        ) as span:
            token = TRACEPARENT.set(
                span.traceparent if span else h.valid_traceparent(intent.traceparent)
            )
            try:
                result = await self.connector.send(intent)
            except Exception as e:  # a connector bug or an unexpected failure: try again later
                log.exception("%s connector raised for %s", self.channel, intent.notification_id)
                result = DeliveryResult.retryable(type(e).__name__, str(e))
            finally:
                TRACEPARENT.reset(token)
            if span is not None:
                span.set("herald.outcome", result.outcome.value)
                span.set("herald.error_class", result.error_class)
                if result.outcome is not Outcome.SENT:
                    span.error(result.error_class or result.outcome.value)
        self._send_seconds[result.outcome].observe(time.perf_counter() - started)
        return result

    # -- recording ---------------------------------------------------------------------------

    async def _record_loop(self) -> None:
        interval = self.settings.sink_commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.checkpoint.record()
            except Exception as e:
                self._fatal = e
                log.error("%s sink cannot record outcomes: %s", self.channel, e)
                return

    async def _flush_outputs(self) -> None:
        await self.outputs.flush()

    def _commit(self, offsets: dict[TP, int]) -> None:
        if offsets:
            self._get_source().commit(offsets)

    def _released(self, windows: list[OffsetWindow]) -> None:
        for window in windows:
            part = self._parts.get(window.tp)
            if part is not None and part.window is window:
                self._pump(part)
