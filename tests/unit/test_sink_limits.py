"""pipeline/sink/limits.py: size check, token bucket, throttle and the provider gate, on a
fake clock where time matters; then the same limits enforced by a worker without a broker
(tests/unit/sink_harness.py), asserting counts and lower bounds only."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from connectors.base import Outcome
from connectors.testing import FakeConnector
from pipeline import headers as h
from pipeline.records import DeliveryState
from pipeline.serialization import AvroSerde
from pipeline.sink.limits import PAYLOAD_TOO_LARGE, ProviderGate, Throttle, TokenBucket, oversize
from tests.unit.sink_harness import intent, make_sink, running, until


class FakeTime:
    """A clock that moves only when something sleeps on it (one sleeper at a time)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


# -- size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"subject": "abc", "body_text": "defg", "body_html": None}, 7),
        ({"subject": None, "body_text": "x" * 10, "body_html": "<p>x</p>"}, 18),
        ({"subject": "é", "body_text": "€", "body_html": "😀"}, 2 + 3 + 4),  # UTF-8 bytes
    ],
)
def test_body_bytes_counts_subject_text_and_html_in_utf8(fields: dict[str, Any], size: int) -> None:
    assert FakeConnector().body_bytes(intent(**fields)) == size


def test_an_intent_at_the_limit_passes_and_one_byte_over_is_rejected() -> None:
    fake = FakeConnector(max_body_bytes=10)
    assert oversize(fake, intent(subject="12345", body_text="67890")) is None
    result = oversize(fake, intent(subject="12345", body_text="67890!"))
    assert result is not None
    assert result.outcome is Outcome.REJECTED
    assert result.error_class == PAYLOAD_TOO_LARGE
    assert "11 bytes" in (result.response or "")
    assert "10 bytes" in (result.response or "")
    assert "max_body_bytes" in (result.response or "")


def test_no_limit_no_check() -> None:
    assert oversize(FakeConnector(), intent(body_text="x" * 100_000)) is None


# -- rate --------------------------------------------------------------------------------


async def test_token_bucket_never_starts_more_than_rate_times_span_plus_one_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(10, clock=t.clock, sleep=t.sleep)
    times = []
    for _ in range(100):
        await bucket.take()
        times.append(t.now)
    assert times[:10] == [0.0] * 10  # one second's worth at once
    assert times[-1] == pytest.approx(9.0)  # then 10 a second
    for span in (0.05, 0.5, 1.0, 3.0):
        for start in times:
            count = sum(1 for x in times if start <= x < start + span)
            assert count <= 10 * span + 10 + 1e-9, (span, start, count)


async def test_token_bucket_refills_to_one_burst_at_most() -> None:
    t = FakeTime()
    bucket = TokenBucket(2, clock=t.clock, sleep=t.sleep)
    for _ in range(2):
        await bucket.take()
    t.now += 3600  # an idle hour earns no more than the bucket holds
    for _ in range(2):
        await bucket.take()
    assert t.slept == []
    await bucket.take()
    assert t.slept == [pytest.approx(0.5)]


def test_a_rate_below_one_still_holds_one_token() -> None:
    assert TokenBucket(0.2).burst == 1.0
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


# -- throttle ----------------------------------------------------------------------------


def test_throttle_pause_only_grows() -> None:
    t = FakeTime()
    throttle = Throttle(t.clock)
    assert throttle.remaining() == 0
    assert throttle.pause(5)
    assert not throttle.pause(2)  # a shorter ask does not cut the pause short
    t.now = 1
    assert throttle.remaining() == 4
    assert throttle.pause(10)
    assert throttle.remaining() == 10
    t.now = 11
    assert throttle.remaining() == 0


# -- the gate ----------------------------------------------------------------------------


async def test_gate_holds_concurrency() -> None:
    gate = ProviderGate(3, None)
    peak = 0

    async def send() -> None:
        nonlocal peak
        assert await gate.acquire()
        peak = max(peak, gate.in_flight)
        await asyncio.sleep(0.001)
        gate.release()

    await asyncio.gather(*(send() for _ in range(20)))
    assert peak == 3
    assert gate.in_flight == 0


async def test_gate_waits_out_a_pause_before_any_send() -> None:
    t = FakeTime()
    gate = ProviderGate(None, None, clock=t.clock, sleep=t.sleep)
    gate.throttle.pause(2.0)
    assert await gate.acquire()
    assert t.now >= 2.0
    gate.release()


async def test_gate_gives_up_during_a_pause_when_asked() -> None:
    t = FakeTime()
    gate = ProviderGate(1, None, clock=t.clock, sleep=t.sleep)
    gate.throttle.pause(60)
    assert not await gate.acquire(give_up=lambda: t.now > 1)
    assert gate.in_flight == 0
    t.now = 61
    assert await gate.acquire()  # the slot was not kept by the one that gave up
    gate.release()


async def test_a_pause_that_begins_while_waiting_for_a_slot_is_waited_out() -> None:
    t = FakeTime()
    gate = ProviderGate(1, None, clock=t.clock, sleep=t.sleep)
    assert await gate.acquire()
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)  # the waiter now waits for the slot
    gate.throttle.pause(3.0)  # the send in flight was throttled
    gate.release()
    assert await waiter
    assert t.now >= 3.0
    gate.release()


# -- enforced by the worker --------------------------------------------------------------


async def test_an_oversize_intent_is_dead_lettered_without_a_provider_call(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(max_body_bytes=100)
    sink = make_sink(fake, serde, tmp_path)
    big, small = intent("big@example.com", body_text="x" * 200), intent("small@example.com")
    sink.publish(big, partition=0)
    sink.publish(small, partition=0)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 1 and len(sink.dead_letters()) == 1)
    assert [c.intent.recipient for c in fake.calls] == ["small@example.com"]
    [status] = sink.statuses(big.notification_id)
    assert status.state is DeliveryState.REJECTED
    assert status.error_class == PAYLOAD_TOO_LARGE
    [dead] = sink.dead_letters()
    assert dead[h.ERROR_CLASS] == PAYLOAD_TOO_LARGE
    assert "205 bytes" in dead[h.ERROR_MESSAGE]  # subject "Hello" + 200 x "x"
    assert "100 bytes" in dead[h.ERROR_MESSAGE]
    assert dead[h.ORIGINAL_OFFSET] == "0"


async def test_sends_in_flight_never_exceed_max_concurrency_across_partitions(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = FakeConnector(delay=0.005, max_concurrency=3)
    sink = make_sink(fake, serde, tmp_path, sink_max_in_flight=32)
    for n in range(40):
        sink.publish(intent(f"r{n}@example.com"), partition=n % 2)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 40)
    assert sink.worker.gate.max_concurrency == 3
    assert fake.peak_in_flight == 3


async def test_a_connector_sets_its_concurrency_from_its_settings(
    serde: AvroSerde, tmp_path: Path
) -> None:
    class Pooled(FakeConnector):
        max_concurrency = 50  # the class default...

        def __init__(self, connections: int) -> None:
            super().__init__(delay=0.005)
            self.max_concurrency = connections  # ...overridden from its settings

    fake = Pooled(connections=2)
    sink = make_sink(fake, serde, tmp_path)
    for n in range(10):
        sink.publish(intent(f"r{n}@example.com"))
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 10)
    assert fake.peak_in_flight == 2


async def test_sends_per_second_stay_within_the_rate(serde: AvroSerde, tmp_path: Path) -> None:
    rate = 100
    fake = FakeConnector(rate_per_second=rate)
    sink = make_sink(fake, serde, tmp_path, sink_max_in_flight=200)
    for n in range(150):
        sink.publish(intent(f"r{n}@example.com"), partition=n % 2)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 150)
    starts = sorted(c.started_at for c in fake.calls)
    # One second's worth at once, then the rest at the rate: at least 0.5 s for the last 50.
    # (Lower bounds only: a slow machine can only make these larger.)
    assert starts[-1] - starts[0] >= 0.45
    for span in (0.1, 0.25):
        for start in starts:
            count = sum(1 for s in starts if start <= s < start + span)
            assert count <= rate + rate * span + 2, (span, count)
