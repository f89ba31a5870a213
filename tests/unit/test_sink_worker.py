"""The sink worker end to end without a broker (tests/unit/sink_harness.py): ordering,
windows, offsets committed only over recorded records, dedupe, outcomes, the breaker."""

from __future__ import annotations

import asyncio
from pathlib import Path

from connectors.base import DeliveryResult
from connectors.testing import FakeConnector
from pipeline import headers as h
from pipeline.records import DeliveryState, NotificationIntent
from pipeline.serialization import AvroSerde
from pipeline.sink.ledger import LedgerOutcome
from tests.unit.sink_harness import Sink, intent, make_sink, running, until

S = DeliveryState


async def test_records_of_a_partition_are_sent_in_offset_order(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(delay=0.001)
    sink = make_sink(fake, serde, tmp_path, sink_max_in_flight=1)
    sent = {p: [intent(f"p{p}-{i}@example.com") for i in range(15)] for p in (0, 1)}
    for i in range(15):
        for p in (0, 1):
            sink.publish(sent[p][i], partition=p)
    async with running(sink):
        await until(lambda: len(fake.calls) == 30)
    for p in (0, 1):
        got = [c.intent.recipient for c in fake.calls if c.intent.recipient.startswith(f"p{p}-")]
        assert got == [i.recipient for i in sent[p]]
    assert sink.source.committed[(sink.topic, 0)] == 15
    assert sink.source.committed[(sink.topic, 1)] == 15
    assert sink.worker.stats.sent == 30


async def test_windows_bound_records_in_flight_per_partition_and_pause_a_full_one(
    serde: AvroSerde, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(i: NotificationIntent) -> DeliveryResult:
        await release.wait()
        return DeliveryResult.sent("250 ok")

    fake = FakeConnector(slow)
    sink = make_sink(fake, serde, tmp_path, sink_max_in_flight=4)
    for n in range(10):
        sink.publish(intent(f"r{n}@example.com"), partition=0)
    async with running(sink):
        await until(lambda: len(fake.calls) == 4)
        await asyncio.sleep(0.05)
        assert len(fake.calls) == 4  # the window is full: nothing more starts...
        assert ((sink.topic, 0), True) in sink.source.pause_log  # ...and the partition waits
        release.set()
        await until(lambda: len(fake.calls) == 10)
        await until(lambda: sink.source.committed.get((sink.topic, 0)) == 10)
    assert fake.peak_in_flight == 4
    assert sink.source.pause_log[-1] == ((sink.topic, 0), False)


async def test_out_of_order_completions_commit_only_the_contiguous_run(
    serde: AvroSerde, tmp_path: Path
) -> None:
    gates = {f"r{n}@example.com": asyncio.Event() for n in range(5)}

    async def held(i: NotificationIntent) -> DeliveryResult:
        await gates[i.recipient].wait()
        return DeliveryResult.sent("250 ok")

    fake = FakeConnector(held)
    sink = make_sink(fake, serde, tmp_path)
    for n in range(5):
        sink.publish(intent(f"r{n}@example.com"), partition=0)
    tp = (sink.topic, 0)
    async with running(sink):
        await until(lambda: len(fake.calls) == 5)
        for n in (4, 2, 3):  # everything but the first two completes
            gates[f"r{n}@example.com"].set()
        await until(lambda: sink.worker.stats.recorded == 3)
        await asyncio.sleep(0.03)  # more group commits: still nothing to commit
        assert tp not in sink.source.committed
        gates["r0@example.com"].set()
        await until(lambda: sink.source.committed.get(tp) == 1)
        gates["r1@example.com"].set()
        await until(lambda: sink.source.committed.get(tp) == 5)  # 1, then past 2..4 at once
    ledger = sink.ledger()
    assert ledger.offsets(sink.worker.group_id, [tp]) == {tp: 5}
    ledger.close()


async def test_a_done_notification_costs_no_provider_call_and_a_stale_retry_is_skipped(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector()
    sink = make_sink(fake, serde, tmp_path)
    done, retrying = intent("done@example.com"), intent("later@example.com")
    ledger = sink.ledger()
    ledger.record(
        sink.worker.group_id,
        [outcome(done, S.SENT, 1), outcome(retrying, S.RETRYING, 2)],
        {},
    )
    ledger.close()
    retry_topic = sink.worker.retry_topics[0]
    sink.publish(done, partition=0)  # a duplicate of a delivered notification
    sink.publish(retrying, topic=retry_topic, partition=0, headers=[(h.ATTEMPTS, b"1")])  # stale
    marker = intent("marker@example.com")
    sink.publish(marker, partition=0)
    async with running(sink):
        await until(lambda: len(fake.calls) == 1 and sink.worker.stats.skipped == 2)
    assert [c.intent.recipient for c in fake.calls] == ["marker@example.com"]
    assert sink.statuses(done.notification_id) == []


async def test_two_copies_in_flight_at_once_are_sent_once(serde: AvroSerde, tmp_path: Path) -> None:
    fake = FakeConnector(delay=0.02)
    sink = make_sink(fake, serde, tmp_path)
    twice = intent("twice@example.com")
    sink.publish(twice, partition=0)
    sink.publish(twice, partition=1)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent + sink.worker.stats.skipped == 2)
    assert len(fake.calls) == 1


async def test_outcomes_rejected_retried_then_sent_and_dead(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(
        results={
            "no@example.com": [DeliveryResult.rejected("SMTPRecipientRefused", "550 no such user")],
            "flaky@example.com": [DeliveryResult.retryable("SMTPResponseException", "451 later")],
        }
    )
    fake.script("down@example.com", *[DeliveryResult.retryable("HTTP500", "500")] * 3)
    sink = make_sink(fake, serde, tmp_path, sink_max_attempts=3)
    no, flaky, down = (
        intent("no@example.com"),
        intent("flaky@example.com"),
        intent("down@example.com"),
    )
    for i in (no, flaky, down):
        sink.publish(i)
    async with running(sink):
        await until(lambda: S.SENT in states(sink, flaky) and S.DEAD in states(sink, down))
        await until(lambda: len(sink.dead_letters()) == 2)
    assert states(sink, no) == [S.REJECTED]
    assert states(sink, flaky) == [S.RETRYING, S.SENT]
    assert states(sink, down) == [S.RETRYING, S.RETRYING, S.DEAD]
    assert [s.attempts for s in sink.statuses(down.notification_id)] == [1, 2, 3]
    dead = {d[h.NOTIFICATION_ID]: d for d in sink.dead_letters()}
    assert dead[no.notification_id][h.ERROR_CLASS] == "SMTPRecipientRefused"
    assert dead[down.notification_id][h.ATTEMPTS] == "3"
    assert dead[down.notification_id][h.ORIGINAL_TOPIC] == sink.topic


async def test_the_breaker_stops_sends_for_its_pause_after_consecutive_failures(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(
        default=DeliveryResult.retryable("ConnectionRefusedError", "refused"),
        max_concurrency=1,  # one send at a time, so "after" is well defined
    )
    sink = make_sink(
        fake,
        serde,
        tmp_path,
        breaker_failure_threshold=3,
        breaker_open_ms=200,
        breaker_open_max_ms=400,
        sink_max_attempts=100,
    )
    for n in range(6):
        sink.publish(intent(f"r{n}@example.com"))
    async with running(sink):
        await until(lambda: len(fake.calls) >= 5)
        fake.default = DeliveryResult.sent("250 ok")
        await until(lambda: sink.worker.stats.sent == 6, timeout=20)
    starts = [c.started_at for c in fake.calls]
    # The third failure opened it: the next send (the probe) waited the whole pause; the
    # probe failed too, which reopened it for twice as long.
    assert starts[3] - starts[2] >= 0.2
    assert starts[4] - starts[3] >= 0.4
    assert sink.worker.breaker.opened_count >= 2
    assert sink.dead_letters() == []


def states(sink: Sink, i: NotificationIntent) -> list[DeliveryState]:
    return [s.state for s in sink.statuses(i.notification_id)]


def outcome(i: NotificationIntent, state: DeliveryState, attempts: int) -> LedgerOutcome:
    return LedgerOutcome(
        notification_id=i.notification_id,
        generation=i.generation,
        channel="fake",
        recipient=i.recipient,
        state=state,
        attempts=attempts,
        response=None,
        error_class=None,
        provider_message_id=None,
        at=i.created_at,
    )


async def test_a_gone_recipient_is_suppressed_next_to_its_dead_letter(
    serde: AvroSerde, tmp_path: Path
) -> None:
    from pipeline.people.records import SUPPRESSION, Suppression, suppression_key

    fake = FakeConnector(
        results={
            "gone@example.com": [
                DeliveryResult.rejected("RecipientGone", "550 5.1.1 no such user")
            ],
            "refused@example.com": [DeliveryResult.rejected("SMTPRecipientRefused", "550 5.7.1")],
        }
    )
    sink = make_sink(fake, serde, tmp_path)
    gone = intent("gone@example.com", user_id="u-7")
    sink.publish(gone)
    sink.publish(intent("refused@example.com"))
    async with running(sink):
        await until(lambda: len(sink.dead_letters()) == 2)
    [record] = sink.kafka.records(sink.topics.suppressions)
    assert record.key() == suppression_key("fake", "gone@example.com").encode()
    s = Suppression.from_avro(serde.decode(record.value(), expect=SUPPRESSION).record)
    assert (s.channel, s.address, s.reason, s.source) == (
        "fake",
        "gone@example.com",
        "gone",
        "sink-fake",
    )
    assert (s.error_class, s.detail) == ("RecipientGone", "550 5.1.1 no such user")
    assert (s.notification_id, s.user_id) == (gone.notification_id, "u-7")
    # Recorded only once acknowledged: the outcome is in the ledger.
    assert states(sink, gone) == [S.REJECTED]
