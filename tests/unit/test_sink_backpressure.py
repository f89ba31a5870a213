"""A provider's retry-after pauses the whole channel, costs no attempt and no breaker
failure, and says so with a THROTTLED status; over HERALD_SINK_MAX_THROTTLE_MS it is an
ordinary retryable failure. Worker without a broker (tests/unit/sink_harness.py)."""

from __future__ import annotations

import time
from pathlib import Path

from connectors.base import DeliveryResult
from connectors.testing import FakeConnector
from pipeline import headers as h
from pipeline.records import DeliveryState
from pipeline.serialization import AvroSerde
from pipeline.sink.breaker import BreakerState
from tests.unit.sink_harness import intent, make_sink, running, until

S = DeliveryState
SLOW_DOWN = DeliveryResult.retryable("HTTP429", "429 Too Many Requests", retry_after=0.3)


async def test_a_retry_after_pauses_every_partition_and_costs_no_attempt(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(results={"busy@example.com": [SLOW_DOWN]}, delay=0.005)
    sink = make_sink(fake, serde, tmp_path, sink_max_throttle_ms=5_000)
    busy = intent("busy@example.com")
    others = [intent(f"r{n}@example.com") for n in range(20)]
    sink.publish(busy, partition=0)
    for n, i in enumerate(others):
        sink.publish(i, partition=n % 2)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 21)
    [throttled] = [c for c in fake.calls if c.result is SLOW_DOWN]
    assert throttled.finished_at is not None
    resumed_at = throttled.finished_at + 0.3
    # No send to the provider started during the pause, on any partition...
    during = [c for c in fake.calls if throttled.finished_at <= c.started_at < resumed_at]
    assert during == []
    # ...whose partitions were all held (records stay in Kafka) and released after it.
    assert [held for held, _ in sink.source.hold_log] == [True, False]
    (_, held_at), (_, released_at) = sink.source.hold_log
    assert throttled.finished_at <= held_at  # held as soon as the answer came
    assert released_at >= resumed_at
    # The same attempt went again: statuses say so, no retry record, no attempt used up.
    statuses = sink.statuses(busy.notification_id)
    assert [(s.state, s.attempts) for s in statuses] == [(S.THROTTLED, 0), (S.SENT, 1)]
    assert statuses[0].error_class == "HTTP429"
    assert statuses[0].provider_response == "429 Too Many Requests"
    assert sink.retries() == []
    assert len(fake.calls_to("busy@example.com")) == 2
    assert sink.worker.stats.throttled == 1
    assert sink.worker.stats.retried == 0
    assert sink.worker.breaker.state is BreakerState.CLOSED
    assert sink.worker.breaker.opened_count == 0
    ledger = sink.ledger()
    entry = ledger.lookup([(busy.notification_id, 0)])[(busy.notification_id, 0)]
    ledger.close()
    assert (entry.state, entry.attempts) == (S.SENT, 1)


async def test_a_retried_record_that_is_throttled_keeps_its_attempt_count(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(
        results={"again@example.com": [DeliveryResult.retryable("HTTP500", "500"), SLOW_DOWN]}
    )
    sink = make_sink(fake, serde, tmp_path)
    again = intent("again@example.com")
    sink.publish(again)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 1)
    assert [(s.state, s.attempts) for s in sink.statuses(again.notification_id)] == [
        (S.RETRYING, 1),
        (S.THROTTLED, 1),
        (S.SENT, 2),
    ]


async def test_a_retry_after_over_the_cap_goes_through_the_retry_topics(
    serde: AvroSerde, tmp_path: Path
) -> None:
    day = DeliveryResult.retryable("HTTP503", "503 maintenance", retry_after=86_400)
    fake = FakeConnector(results={"later@example.com": [day]})
    sink = make_sink(fake, serde, tmp_path, sink_max_throttle_ms=1_000)
    later, marker = intent("later@example.com"), intent("marker@example.com")
    sink.publish(later, partition=0)
    sink.publish(marker, partition=0)
    before_ms = time.time() * 1000
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 1 and sink.worker.stats.retried == 1)
    assert [(s.state, s.attempts) for s in sink.statuses(later.notification_id)] == [
        (S.RETRYING, 1)
    ]
    [retry] = sink.retries()
    assert retry[h.ATTEMPTS] == "1"
    assert int(retry[h.NOT_BEFORE]) >= before_ms + 86_400_000  # never before the provider's ask
    assert sink.source.hold_log == []  # the channel did not pause
    assert sink.worker.stats.throttled == 0


async def test_stopping_during_a_pause_leaves_the_unsent_record_for_the_next_run(
    serde: AvroSerde, tmp_path: Path
) -> None:
    long = DeliveryResult.retryable("HTTP429", "429", retry_after=30)
    fake = FakeConnector(results={"busy@example.com": [long]})
    sink = make_sink(fake, serde, tmp_path, sink_max_throttle_ms=60_000)
    first, busy, after = (intent(f"{n}@example.com") for n in ("first", "busy", "after"))
    for i in (first, busy, after):
        sink.publish(i, partition=0)
    tp = (sink.topic, 0)
    started = time.monotonic()
    async with running(sink):
        await until(lambda: sink.worker.stats.throttled == 1 and sink.worker.stats.sent == 1)
    assert time.monotonic() - started < 10  # it did not wait out the 30 s pause
    # "busy" waited out the pause to go again, "after" waited for its first send: neither
    # was sent, and the offset stops before them.
    assert sink.worker.stats.abandoned == 2
    assert sink.source.committed[tp] == 1
    ledger = sink.ledger()
    assert ledger.lookup([(busy.notification_id, 0), (after.notification_id, 0)]) == {}
    ledger.close()

    # The next run reads both again and sends each once.
    again = make_sink(fake, serde, tmp_path, kafka=sink.kafka)
    async with running(again):
        await until(lambda: again.worker.stats.sent == 2)
    assert [c.intent.recipient for c in fake.calls] == [
        "first@example.com",
        "busy@example.com",
        "busy@example.com",
        "after@example.com",
    ]
    assert again.source.committed[tp] == 3
