"""Metrics, readiness and trace context without a broker: the sink worker over the in-memory
Kafka (tests/unit/sink_harness.py), the router handler, the probe server, librdkafka's
statistics, and spans through the SDK's in-memory exporter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from connectors.base import TRACEPARENT, DeliveryResult
from connectors.testing import FakeConnector
from pipeline import headers as h
from pipeline import metrics, observe, tracing
from pipeline.kafka.stats import KafkaStats
from pipeline.records import NotificationIntent
from pipeline.router.handler import RouterHandler
from pipeline.router.rules import RuleSet
from pipeline.router.templates import Templates
from pipeline.serialization import AvroSerde
from pipeline.topics import Topics
from tests.unit.sink_harness import intent, make_sink, running, until
from tests.unit.unit_helpers import NOW, USER_REGISTERED, user_registered

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Observed(FakeConnector):
    """A channel of this module's own, so its metric series start at zero."""

    channel = "observed"
    seen: ClassVar[list[str | None]] = []

    def __init__(self, **kw: Any) -> None:
        super().__init__(self.answer, **kw)
        self.script: dict[str, list[DeliveryResult]] = {}

    def answer(self, i: NotificationIntent) -> DeliveryResult:
        Observed.seen.append(TRACEPARENT.get())
        queued = self.script.get(i.recipient)
        return queued.pop(0) if queued else DeliveryResult.sent("250 ok")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure("herald-test", exporter, batch=False)
    try:
        yield exporter
    finally:
        tracing.reset()


# -- the sink ------------------------------------------------------------------------------


async def test_the_sink_counts_every_outcome_and_hands_the_trace_on(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = Observed()
    fake.script = {
        "no@example.com": [DeliveryResult.rejected("Nope", "550 no such user")],
        "later@example.com": [DeliveryResult.retryable("Busy", "451 later")],
    }
    sink = make_sink(fake, serde, tmp_path, sink_max_attempts=3)
    ch = "observed"
    before = {
        outcome: value("herald_deliveries_total", channel=ch, outcome=outcome)
        for outcome in ("sent", "rejected", "retrying")
    }
    dead_before = value("herald_dead_letters_total", stage="sink", channel=ch, error_class="Nope")
    latency_before = value("herald_delivery_latency_seconds_count", channel=ch)
    within_an_hour = value("herald_delivery_latency_seconds_bucket", channel=ch, le="3600.0")
    consumed_before = value("herald_consumed_total", stage="sink", topic=sink.topic)
    Observed.seen.clear()
    for recipient in ("ok@example.com", "no@example.com", "later@example.com"):
        sink.publish(
            intent(recipient, channel=ch, traceparent=PARENT),
            headers=[(h.TRACEPARENT, PARENT.encode()), (h.EVENT_TIME, b"1700000000000")],
        )
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 2 and sink.worker.stats.rejected == 1)
        await until(lambda: sink.worker.stats.recorded == 4)
        ready, detail = sink.worker.readiness()
        assert ready, detail
        text = await _scrape()
        assert 'herald_breaker_state{channel="observed"} 0.0' in text
        assert 'herald_in_flight{channel="observed"} 0.0' in text

    delta = {
        k: value("herald_deliveries_total", channel=ch, outcome=k) - v for k, v in before.items()
    }
    assert delta == {"sent": 2, "rejected": 1, "retrying": 1}
    assert value("herald_dead_letters_total", stage="sink", channel=ch, error_class="Nope") == (
        dead_before + 1
    )
    retry_topic = sink.worker.retry_topics[0]
    assert value("herald_retries_total", channel=ch, topic=retry_topic) >= 1
    assert value("herald_consumed_total", stage="sink", topic=sink.topic) == consumed_before + 3
    # Latency from the event's time (2023, from the header): more than a year.
    assert value("herald_delivery_latency_seconds_count", channel=ch) == latency_before + 2
    assert (
        value("herald_delivery_latency_seconds_bucket", channel=ch, le="3600.0") == within_an_hour
    )
    # Tracing off: the connector sees the intent's traceparent as it is.
    assert Observed.seen and set(Observed.seen) == {PARENT}
    # Every record the sink wrote carries it: statuses, the retry and the dead letter.
    for msg in sink.kafka.records(sink.topics.status):
        assert h.as_dict(msg.headers())[h.TRACEPARENT] == PARENT
    assert [d[h.TRACEPARENT] for d in sink.dead_letters()] == [PARENT]
    assert [r[h.TRACEPARENT] for r in sink.retries()] == [PARENT]


async def test_a_sink_is_ready_once_assigned_and_not_while_its_breaker_is_open(
    serde: AvroSerde, tmp_path: Path
) -> None:
    fake = Observed()
    fake.script = {"down@example.com": [DeliveryResult.retryable("ConnectError", "refused")]}
    sink = make_sink(
        fake,
        serde,
        tmp_path,
        breaker_failure_threshold=1,
        breaker_open_ms=60_000,
        # the retry record is due after the test: nothing waits on the open breaker at stop
        sink_retry_backoff_ms=120_000,
        sink_retry_backoff_max_ms=120_000,
    )
    ready, detail = sink.worker.readiness()
    assert not ready and "assignment" in detail
    async with running(sink):
        await until(lambda: sink.worker.readiness()[0])
        ready, states = await observe.READINESS.evaluate()
        assert states["sink-observed"]["ready"]
        sink.publish(intent("down@example.com", channel="observed"))
        await until(lambda: sink.worker.stats.retried == 1)
        ready, detail = sink.worker.readiness()
        assert not ready and "breaker open" in detail
        assert 'herald_breaker_state{channel="observed"} 2.0' in await _scrape()
        assert value("herald_breaker_opened_total", channel="observed") >= 1
        sink.worker.stop()
    assert "sink-observed" not in (await observe.READINESS.evaluate())[1]


async def test_the_send_span_continues_the_intent_and_is_what_the_provider_sees(
    serde: AvroSerde, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fake = Observed()
    sink = make_sink(fake, serde, tmp_path)
    Observed.seen.clear()
    i = intent("traced@example.com", channel="observed", traceparent=PARENT)
    sink.publish(i)
    async with running(sink):
        await until(lambda: sink.worker.stats.sent == 1)
    [span] = [s for s in spans.get_finished_spans() if s.name == "herald.send observed"]
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes is not None
    assert span.attributes["herald.notification_id"] == i.notification_id
    assert span.attributes["herald.outcome"] == "sent"
    assert Observed.seen == [f"00-{TRACE_ID}-{span.context.span_id:016x}-01"]


# -- the router handler --------------------------------------------------------------------


def test_the_router_counts_its_records_and_its_intents_continue_the_routing_span(
    serde: AvroSerde, rules: RuleSet, templates: Templates, spans: InMemorySpanExporter
) -> None:
    handler = RouterHandler(serde, rules, templates, Topics("obs."), clock=lambda: NOW)
    topic = "obs.events.user"
    routed = value("herald_router_events_total", outcome="routed")
    dead = value("herald_router_events_total", outcome="dead_lettered")
    email = value("herald_routed_total", channel="email")
    framing = value(
        "herald_dead_letters_total", stage="router", channel="", error_class="UnknownFramingError"
    )
    record = user_registered()
    record["envelope"]["traceparent"] = PARENT
    encoded, _ = serde.encode(USER_REGISTERED, record)
    args: dict[str, Any] = {"key": b"u-42", "topic": topic, "partition": 0}
    [out] = handler.handle(value=encoded, headers=None, offset=1, **args)
    [bad] = handler.handle(value=b"\x07garbage", headers=None, offset=2, **args)

    assert not out.dead and bad.dead
    assert value("herald_consumed_total", stage="router", topic=topic) == 2
    assert value("herald_router_events_total", outcome="routed") == routed + 1
    assert value("herald_router_events_total", outcome="dead_lettered") == dead + 1
    assert value("herald_routed_total", channel="email") == email + 1
    assert value(
        "herald_dead_letters_total", stage="router", channel="", error_class="UnknownFramingError"
    ) == (framing + 1)
    [span] = [s for s in spans.get_finished_spans() if s.name == "herald.route user-registered"]
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    hdrs = h.as_dict(out.headers)
    assert hdrs[h.TRACEPARENT] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert int(hdrs[h.EVENT_TIME]) == int(record["envelope"]["occurred_at"].timestamp() * 1000)
    # The intent's own field carries the same context (a reader of the value alone sees it).
    from pipeline.records import NOTIFICATION_INTENT

    decoded = serde.decode(out.value, expect=NOTIFICATION_INTENT).record
    assert decoded["traceparent"] == hdrs[h.TRACEPARENT]


def test_without_tracing_the_intent_carries_the_events_traceparent(
    serde: AvroSerde, rules: RuleSet, templates: Templates
) -> None:
    handler = RouterHandler(serde, rules, templates, Topics(), clock=lambda: NOW)
    record = user_registered()
    record["envelope"]["traceparent"] = PARENT
    encoded, _ = serde.encode(USER_REGISTERED, record)
    [out] = handler.handle(
        key=b"u-42", value=encoded, headers=None, topic="events.user", partition=0, offset=1
    )
    assert h.as_dict(out.headers)[h.TRACEPARENT] == PARENT


# -- the probe server and librdkafka's statistics ------------------------------------------


async def _scrape() -> str:
    async with TestClient(TestServer(observe.create_app())) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_probes_answer_from_the_registered_checks() -> None:
    readiness = observe.Readiness()
    async with TestClient(TestServer(observe.create_app(readiness))) as client:
        assert (await client.get("/healthz")).status == 200
        resp = await client.get("/readyz")
        assert resp.status == 503  # nothing registered: not ready

        readiness.register("a", lambda: (True, "fine"))
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert (await resp.json())["components"]["a"] == {"ready": True, "detail": "fine"}

        async def slow_but_fine() -> tuple[bool, str]:
            return True, "async"

        def broken() -> tuple[bool, str]:
            raise RuntimeError("boom")

        readiness.register("b", slow_but_fine)
        readiness.register("c", broken)
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert body["components"]["b"]["ready"] is True
        assert body["components"]["c"] == {
            "ready": False,
            "detail": "check failed: RuntimeError: boom",
        }
        readiness.unregister("c")
        assert (await client.get("/readyz")).status == 200
        text = await (await client.get("/metrics")).text()
        assert "# TYPE herald_deliveries_total counter" in text
        assert "# TYPE herald_delivery_latency_seconds histogram" in text


async def test_serve_on_port_zero_is_off_and_a_taken_port_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await observe.serve("127.0.0.1", 0) is None
    first = await observe.serve("127.0.0.1", _free_port())
    assert first is not None
    try:
        with caplog.at_level("WARNING"):
            assert await observe.serve("127.0.0.1", first.port) is None
        assert "HERALD_OBSERVE_PORT" in caplog.text
    finally:
        await first.close()


def _free_port() -> int:
    from devtools.procs import free_port

    return free_port()


def _stats(partitions: dict[str, dict[str, Any]], broker_state: str = "UP") -> str:
    return json.dumps(
        {
            "brokers": {
                "127.0.0.1:9092/bootstrap": {"nodeid": -1, "state": "INIT"},
                "127.0.0.1:9092/1": {"nodeid": 1, "state": broker_state},
            },
            "topics": {"obs.notifications.email": {"partitions": partitions}},
        }
    )


def test_lag_per_assigned_partition_from_librdkafka_statistics() -> None:
    stats = KafkaStats("sinkstats")
    stats.on_stats(
        _stats(
            {
                "0": {"partition": 0, "desired": True, "consumer_lag": 7},
                # never committed: the end minus the position
                "1": {
                    "partition": 1,
                    "desired": True,
                    "consumer_lag": -1,
                    "ls_offset": 10,
                    "app_offset": 4,
                },
                "2": {"partition": 2, "desired": False, "consumer_lag": 3},  # not ours
                "-1": {"partition": -1, "desired": False},  # librdkafka's internal one
            }
        )
    )
    lag = {"stage": "sinkstats", "topic": "obs.notifications.email"}
    assert REGISTRY.get_sample_value("herald_consumer_lag", {**lag, "partition": "0"}) == 7
    assert REGISTRY.get_sample_value("herald_consumer_lag", {**lag, "partition": "1"}) == 6
    assert REGISTRY.get_sample_value("herald_consumer_lag", {**lag, "partition": "2"}) is None
    assert stats.broker_up is True

    # Partition 0 revoked: its series goes; all brokers down: not reachable.
    stats.on_stats(
        _stats({"1": {"partition": 1, "desired": True, "consumer_lag": 0}}, broker_state="DOWN")
    )
    assert REGISTRY.get_sample_value("herald_consumer_lag", {**lag, "partition": "0"}) is None
    assert REGISTRY.get_sample_value("herald_consumer_lag", {**lag, "partition": "1"}) == 0
    assert stats.broker_up is False
    stats.on_stats("not json")  # ignored, never raised into the consumer's poll
    stats.close()
    assert REGISTRY.get_sample_value("herald_consumer_lag", {**lag, "partition": "1"}) is None
    conf = stats.config(5000)
    assert conf["statistics.interval.ms"] == 5000 and callable(conf["stats_cb"])
    assert "stats_cb" not in stats.config(0)


def test_label_values_from_outside_are_bounded() -> None:
    assert metrics.bounded("HTTP503") == "HTTP503"
    assert metrics.bounded(None) == "none"
    assert metrics.bounded("x" * 65) == "other"
    assert metrics.bounded("550 5.1.1 <ada@example.com> unknown") == "other"


def test_tracing_is_wanted_when_an_endpoint_is_set_unless_turned_off() -> None:
    assert not tracing.wanted(None, {})
    assert tracing.wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing.wanted(False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted(True, {})
