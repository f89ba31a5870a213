"""/metrics, /healthz and /readyz on a real broker: `herald run all` (router and email sink
in one process) runs a known flow and its metrics are scraped and checked; a sink whose
provider is down turns not ready once its breaker opens; the HTTP API counts its requests
and answers its probes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from devtools.procs import free_port
from devtools.smtp_catcher import SmtpCatcher
from pipeline import headers as h
from pipeline.api import create_api
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.records import NOTIFICATION_INTENT, NotificationIntent, notification_id
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import open_ledger
from pipeline.topics import Topics
from tests.connectors.peers import closed_port
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WAIT = 120.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback test server
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def scrape(base: str) -> Samples:
    status, text = get(f"{base}/metrics")
    assert status == 200, text
    return parse(text)


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def until(what: str, check: Callable[[], bool], proc: HeraldProcess, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline or not proc.alive():
            raise AssertionError(f"{what}; {proc.name} said:\n{proc.tail(60)}")
        time.sleep(0.1)


def observed_env(s: HeraldSettings, port: int, **extra: str) -> dict[str, str]:
    return herald_env(
        s, HERALD_OBSERVE_PORT=str(port), HERALD_KAFKA_STATS_INTERVAL_MS="500", **extra
    )


def test_run_all_counts_a_known_flow_and_answers_its_probes(
    settings: HeraldSettings, tmp_path: Path
) -> None:
    n = 6
    topics = Topics(settings.topic_prefix)
    with SmtpCatcher() as smtp:
        s = HeraldSettings.model_validate(
            settings.model_dump() | {"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}
        )
        ensure_topics(s)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = observed_env(s, port, HERALD_SMTP_PORT=str(smtp.port))
        proc = HeraldProcess("run-all", ["run", "all", "email"], env, tmp_path).start()
        try:
            # Before the group assigns partitions: alive, not ready.
            seen: list[int] = []

            def readiness() -> bool:
                try:
                    status, _ = get(f"{base}/readyz")
                except OSError:
                    return False  # not listening yet
                seen.append(status)
                return status == 200

            until("never ready", readiness, proc)
            assert seen[0] == 503, seen
            assert get(f"{base}/healthz")[0] == 200
            components = json.loads(get(f"{base}/readyz")[1])["components"]
            assert set(components) == {"router", "sink-email"}
            assert all(c["ready"] for c in components.values()), components

            # The flow: n events, one recipient refused (550), one poison record.
            publisher = Publisher(s, producer_name="tests")
            users = [
                {
                    "user_id": f"u-{uuid.uuid4().hex[:8]}",
                    "email": f"m{i}-{uuid.uuid4().hex[:6]}@example.com",
                    "display_name": f"M{i}",
                }
                for i in range(n)
            ]
            smtp.reject_recipients.add(users[0]["email"])
            events = [publisher.publish_sync("user-registered", u) for u in users]
            poison = Producer({"bootstrap.servers": s.kafka_bootstrap_servers})
            poison.produce(topics.events("user"), b"\x07 not avro", b"u-poison")
            poison.flush(10)

            def done() -> bool:
                m = scrape(base)
                return (
                    sample(m, "herald_deliveries_total", channel="email", outcome="sent") == n - 1
                    and sample(m, "herald_deliveries_total", channel="email", outcome="rejected")
                    == 1
                    and sample(m, "herald_router_events_total", outcome="dead_lettered") == 1
                )

            until("the flow was not counted", done, proc)
            m = scrape(base)
            events_topic, email_topic = topics.events("user"), topics.notifications("email")
            assert sample(m, "herald_consumed_total", stage="router", topic=events_topic) == n + 1
            assert sample(m, "herald_router_events_total", outcome="routed") == n
            assert sample(m, "herald_routed_total", channel="email") == n
            assert sample(m, "herald_consumed_total", stage="sink", topic=email_topic) == n
            assert (
                sample(
                    m,
                    "herald_dead_letters_total",
                    stage="router",
                    channel="",
                    error_class="UnknownFramingError",
                )
                == 1
            )
            assert (
                sample(
                    m,
                    "herald_dead_letters_total",
                    stage="sink",
                    channel="email",
                    error_class="RecipientGone",  # 550 5.1.1: the address does not exist
                )
                == 1
            )
            assert sample(m, "herald_deliveries_total", channel="email", outcome="retrying") == 0
            assert sample(m, "herald_delivery_latency_seconds_count", channel="email") == n - 1
            assert 0 < sample(m, "herald_delivery_latency_seconds_sum", channel="email") < 120
            assert sample(m, "herald_send_seconds_count", channel="email", outcome="sent") == n - 1
            assert sample(m, "herald_breaker_state", channel="email") == 0
            # Sent records leave their window at the next group commit (every 50 ms, after
            # the outputs are acknowledged): in flight drops to 0 soon after the last send.
            until(
                "records still in flight",
                lambda: sample(scrape(base), "herald_in_flight", channel="email") == 0,
                proc,
            )
            assert sample(m, "herald_router_held") == 0

            # Lag per partition, from librdkafka's statistics: there, and 0 once committed.
            def caught_up() -> bool:
                lag = {
                    dict(labels)["partition"]: v
                    for (name, labels), v in scrape(base).items()
                    if name == "herald_consumer_lag" and ("topic", email_topic) in labels
                }
                return len(lag) == s.topic_partitions and not any(lag.values())

            until("no lag series, or lag never 0", caught_up, proc)

            # Every record written about the refused one carries the event's traceparent.
            nid = notification_id(events[0].event_id, "welcome-email", "email", users[0]["email"])
            bootstrap = s.kafka_bootstrap_servers
            for topic in (email_topic, topics.notifications_dlq("email"), topics.status):
                mine = [
                    h.as_dict(r.headers())
                    for r in read_all(bootstrap, topic)
                    if h.as_dict(r.headers()).get(h.NOTIFICATION_ID) == nid
                ]
                assert mine, topic
                assert all(h.valid_traceparent(x.get(h.TRACEPARENT)) for x in mine), (topic, mine)
        finally:
            proc.stop()


def _intent(serde: Any, topics: Topics, recipient: str) -> tuple[str, bytes, h.Headers]:
    event_id = str(uuid.uuid4())
    i = NotificationIntent(
        notification_id=notification_id(event_id, "direct", "email", recipient),
        event_id=event_id,
        event_type="direct",
        rule="direct",
        channel="email",
        recipient=recipient,
        body_text="hello",
    )
    value, ref = serde.encode(NOTIFICATION_INTENT, i.to_avro())
    hdrs = h.for_record(schema_ref=ref, event_id=event_id, notification_id=i.notification_id)
    return topics.notifications("email"), value, hdrs


def test_a_sink_is_not_ready_while_its_breaker_is_open(
    settings: HeraldSettings, tmp_path: Path
) -> None:
    s = HeraldSettings.model_validate(
        settings.model_dump() | {"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    )
    ensure_topics(s)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = observed_env(
        s,
        port,
        HERALD_SMTP_PORT=str(closed_port()),  # the provider is down: connection refused
        HERALD_BREAKER_FAILURE_THRESHOLD="2",
        HERALD_BREAKER_OPEN_MS="60000",
        HERALD_SINK_RETRY_BACKOFF_MS="600000",  # retries wait beyond the test
    )
    proc = HeraldProcess("sink", ["run", "sink", "email"], env, tmp_path).start()
    try:

        def status() -> int:
            try:
                return get(f"{base}/readyz")[0]
            except OSError:
                return 0

        until("never ready", lambda: status() == 200, proc)
        publisher = Publisher(s, producer_name="tests")
        producer = Producer(s.producer_config())
        for n in range(2):
            topic, value, hdrs = _intent(publisher.serde, Topics(s.topic_prefix), f"d{n}@x.org")
            producer.produce(topic, value, f"d{n}".encode(), headers=hdrs)
        producer.flush(10)

        until("still ready with the provider down", lambda: status() == 503, proc)
        body = json.loads(get(f"{base}/readyz")[1])
        assert "breaker open" in body["components"]["sink-email"]["detail"]
        m = scrape(base)
        assert sample(m, "herald_breaker_state", channel="email") == 2
        assert sample(m, "herald_breaker_opened_total", channel="email") == 1
        assert sample(m, "herald_deliveries_total", channel="email", outcome="retrying") == 2
        assert get(f"{base}/healthz")[0] == 200  # not ready, but alive: no restart
    finally:
        proc.stop()


async def test_the_api_counts_requests_and_answers_probes(
    settings: HeraldSettings, tmp_path: Path
) -> None:
    s = HeraldSettings.model_validate(
        settings.model_dump() | {"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    )
    ensure_topics(s)
    unreachable = s.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{closed_port()}"})
    async with _api(s) as api, _api(unreachable) as down, aiohttp.ClientSession() as http:
        user = {"user_id": "u-api", "email": "api@example.com", "display_name": "Api"}
        r = await http.post(f"{api}/v1/events/user-registered", json=user)
        assert r.status == 202, await r.text()
        r = await http.get(f"{api}/v1/events/user-registered")  # 405
        assert r.status == 405
        r = await http.get(f"{api}/v1/notifications/{uuid.uuid4()}/nothing/here")  # no route
        assert r.status == 404
        assert (await http.get(f"{api}/healthz")).status == 200
        r = await http.get(f"{api}/readyz")
        assert r.status == 200, await r.text()
        m = parse(await (await http.get(f"{api}/metrics")).text())
        route = "/v1/events/{event_type}"
        assert sample(m, "herald_api_requests_total", method="POST", route=route, status="202") >= 1
        assert sample(m, "herald_api_requests_total", method="GET", status="404", route="unmatched")
        assert sample(m, "herald_api_request_seconds_count", route=route) >= 1
        assert sample(m, "herald_published_total", topic=Topics(s.topic_prefix).events("user")) == 1
        # No id in any label: the notification id of the 404 above is nowhere.
        assert not any("nothing" in v for _, labels in m for _, v in labels)
        r = await http.get(f"{down}/readyz")
        assert r.status == 503
        assert (await r.json())["components"]["api"]["detail"] == "no Kafka broker answers"


class _api:
    def __init__(self, settings: HeraldSettings) -> None:
        self.settings = settings
        self.runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        app = create_api(self.settings, open_ledger(self.settings.ledger_url.get_secret_value()))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
