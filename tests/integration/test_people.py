"""People on a real broker, router side: the API writes the compacted topics, PeopleTables
reads them back with its own reader, RouterHandler routes events read from the real event
topics with them, and real sinks deliver to local peers (SMTP, a Web Push service).

This drives the router's pieces directly (the loop's wiring is tests/unit/
test_people_tables.py's ``WiredLoop``); tests/integration/test_people_e2e.py runs the same
stories through ``herald run all``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from pydantic import SecretStr

from connectors.email import EmailConnector, EmailSettings
from connectors.webpush import WebPushConnector, WebPushSettings, generate_vapid_key
from devtools.smtp_catcher import SmtpCatcher
from pipeline import headers as h
from pipeline.api import create_api
from pipeline.kafka.admin import ensure_topics
from pipeline.people.records import SUBSCRIBER, Subscriber
from pipeline.people.store import PeopleStore, partition_for
from pipeline.people.tables import PeopleTables
from pipeline.publisher import Publisher
from pipeline.records import DELIVERY_STATUS, NOTIFICATION_INTENT, DeliveryStatus
from pipeline.router.handler import Output, RouterHandler
from pipeline.router.rules import load_rules
from pipeline.router.templates import Templates
from pipeline.serialization import serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import open_ledger
from pipeline.sink.runtime import SinkWorker
from pipeline.topics import Topics
from tests.connectors.pushservice import PushService
from tests.integration.kafkautil import read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SECRET = "unsubscribe-test-secret"  # noqa: S105 - the test's own
PUBLIC = "https://notify.example.com"  # the API's public URL in links; requests go to loopback

RULES = """
[[rules]]
name = "welcome-email"
event = "user-registered"
channel = "email"
recipient = "subscriber.email|email"
template = "welcome"
category = "marketing"

[[rules]]
name = "welcome-push"
event = "user-registered"
channel = "webpush"
recipient = "subscriber.devices"
template = "welcome"
category = "marketing"

[[rules]]
name = "welcome-sms"
event = "user-registered"
channel = "sms"
recipient = "subscriber.phone|phone"
template = "welcome"

[[rules]]
name = "password-reset-email"
event = "password-reset-requested"
channel = "email"
recipient = "subscriber.email|email"
template = "password-reset"
category = "security"
"""


@dataclass
class RouterSide:
    """The router's pieces on the real broker: tables, handler, and a consumer of the event
    topics that routes what arrives and produces the outputs."""

    settings: HeraldSettings
    tables: PeopleTables
    handler: RouterHandler
    consumer: Consumer
    producer: Producer
    outputs: list[Output] = field(default_factory=list)

    @classmethod
    def start(cls, settings: HeraldSettings) -> RouterSide:
        serde = serde_from_settings(settings)
        tables = PeopleTables.from_settings(settings, serde)
        tables.start()
        topics = Topics(settings.topic_prefix)
        handler = RouterHandler(
            serde,
            load_rules(settings.rules_file),
            Templates(settings.templates_dir),
            topics,
            people=tables,
        )
        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "group.id": f"test-router-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        event_topics = topics.all_events(serde.schemas.domains())
        tps = [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t in event_topics
            for p in range(settings.topic_partitions)
        ]
        consumer.assign(tps)
        tables.on_assign(tps)  # what the loop's on_assign adds
        return cls(settings, tables, handler, consumer, Producer(settings.producer_config()))

    async def route(self, event_id: str, timeout: float = 30.0) -> list[Output]:
        """Route events until the one with ``event_id`` was routed; its outputs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await asyncio.to_thread(self.consumer.poll, 0.2)
            if msg is None or msg.error():
                continue
            # What the loop adds: hold the event until its partition's tables are ready.
            ready = self.tables.wait_ready(int(msg.partition() or 0), msg.timestamp()[1])
            assert await asyncio.wait_for(ready, 30)
            outputs = self.handler.handle(
                key=msg.key(),
                value=msg.value(),
                headers=h.pairs(msg.headers()),
                topic=str(msg.topic()),
                partition=int(msg.partition() or 0),
                offset=int(msg.offset() or 0),
            )
            for o in outputs:
                self.producer.produce(o.topic, o.value, o.key, headers=o.headers)
            assert self.producer.flush(30) == 0
            self.outputs += outputs
            if h.as_dict(msg.headers()).get(h.EVENT_ID) == event_id:
                return outputs
        raise AssertionError(f"event {event_id} was not routed")

    def close(self) -> None:
        self.consumer.close()
        self.tables.close()


def intents(serde: Any, outputs: list[Output]) -> dict[str, dict[str, Any]]:
    """The intents among ``outputs``, by rule."""
    out = {}
    for o in outputs:
        if o.topic.rpartition(".")[2] in ("email", "webpush", "sms") and not o.dead:
            record = serde.decode(o.value, expect=NOTIFICATION_INTENT).record
            out[record["rule"]] = record
    return out


def statuses(serde: Any, outputs: list[Output]) -> dict[str, DeliveryStatus]:
    found = {}
    for o in outputs:
        if o.topic.endswith("notifications.status"):
            s = DeliveryStatus.from_avro(serde.decode(o.value, expect=DELIVERY_STATUS).record)
            found[s.channel] = s
    return found


@dataclass
class World:
    settings: HeraldSettings
    api: str
    http: aiohttp.ClientSession
    smtp: SmtpCatcher
    push: PushService
    publisher: Publisher
    router: RouterSide

    def publish(self, event_type: str, **fields: Any) -> str:
        return self.publisher.publish_sync(event_type, fields).event_id

    async def restart_router(self) -> None:
        self.router.close()
        self.router = RouterSide.start(self.settings)


@pytest.fixture
async def world(settings: HeraldSettings, tmp_path: Path) -> AsyncIterator[World]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    vapid_private, _ = generate_vapid_key()
    s = settings.model_copy(
        update={
            "rules_file": rules,
            "ledger_url": SecretStr(f"sqlite:///{tmp_path / 'ledger.db'}"),
            "unsubscribe_secret": SecretStr(SECRET),
            "unsubscribe_url": PUBLIC,
            "unsubscribe_mailto": "unsubscribe@example.com",
            "sink_commit_interval_ms": 20,
        }
    )
    ensure_topics(s)
    async with PushService() as push:
        with SmtpCatcher() as smtp:
            email = EmailConnector(EmailSettings(smtp_port=smtp.port))
            webpush = WebPushConnector(
                WebPushSettings(
                    vapid_private_key=SecretStr(vapid_private),
                    vapid_subject="mailto:ops@example.com",
                    allow_hosts=["127.0.0.1"],
                )
            )
            sinks = [SinkWorker(s, email), SinkWorker(s, webpush)]
            tasks = [asyncio.ensure_future(w.run()) for w in sinks]
            app = create_api(s, open_ledger(s.ledger_url.get_secret_value()))
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            router = await asyncio.to_thread(RouterSide.start, s)
            try:
                async with aiohttp.ClientSession() as http:
                    yield World(s, base, http, smtp, push, Publisher(s), router)
            finally:
                router.close()
                await runner.cleanup()
                for w in sinks:
                    w.stop()
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
                await email.aclose()
                await webpush.aclose()


async def _json(resp: aiohttp.ClientResponse, status: int) -> Any:
    body = await resp.text()
    assert resp.status == status, body
    return json.loads(body) if body else None


async def put_subscriber(w: World, uid: str, **fields: Any) -> dict[str, Any]:
    async with w.http.put(f"{w.api}/v1/subscribers/{uid}", json=fields) as r:
        return await _json(r, 200)  # type: ignore[no-any-return]


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


async def test_store_partitions_like_the_publisher(world: World) -> None:
    """Co-partitioning: a user's subscriber record lands in the partition of their events."""
    store = PeopleStore(world.settings, world.publisher.serde)
    for _ in range(10):
        user = uid()
        sub = Subscriber(user, email=f"{user}@example.com")
        p, _ = store.write(world.router.tables.names.subscribers, user, SUBSCRIBER, sub.to_avro())
        event = world.publisher.publish_sync(
            "user-registered", {"user_id": user, "email": "x@example.com", "display_name": "X"}
        )
        assert p == event.partition == partition_for(user, world.settings.topic_partitions)
    store.close()


async def test_a_subscriber_set_through_the_api_gets_the_next_event_and_changes_stick(
    world: World,
) -> None:
    serde = world.publisher.serde
    user = uid()
    stored = await put_subscriber(world, user, email=f"{user}@stored.example.com")
    assert stored["email"] == f"{user}@stored.example.com"
    async with world.http.get(f"{world.api}/v1/subscribers/{user}") as r:
        assert (await _json(r, 200))["email"] == f"{user}@stored.example.com"

    event = world.publish(
        "user-registered", user_id=user, email="event@example.com", display_name="Ada"
    )
    assert intents(serde, await world.router.route(event))["welcome-email"]["recipient"] == (
        f"{user}@stored.example.com"
    )
    await put_subscriber(world, user, email=f"{user}@changed.example.com")
    event = world.publish(
        "user-registered", user_id=user, email="event@example.com", display_name="Ada"
    )
    assert intents(serde, await world.router.route(event))["welcome-email"]["recipient"] == (
        f"{user}@changed.example.com"
    ), "the change counts for the very next event"
    await world.restart_router()
    event = world.publish(
        "user-registered", user_id=user, email="event@example.com", display_name="Ada"
    )
    assert intents(serde, await world.router.route(event))["welcome-email"]["recipient"] == (
        f"{user}@changed.example.com"
    ), "the tables were rebuilt from the topic"
    async with world.http.delete(f"{world.api}/v1/subscribers/{user}") as r:
        assert r.status == 204
    async with world.http.get(f"{world.api}/v1/subscribers/{user}") as r:
        assert r.status == 404
    event = world.publish(
        "user-registered", user_id=user, email="event@example.com", display_name="Ada"
    )
    got = intents(serde, await world.router.route(event))
    assert got["welcome-email"]["recipient"] == "event@example.com", "back to the event's"


async def test_an_opt_out_of_marketing_email_suppresses_email_not_push_critical_still_goes(
    world: World,
) -> None:
    serde = world.publisher.serde
    user = uid()
    browser = world.push.subscribe()
    await put_subscriber(world, user, email=f"{user}@example.com")
    async with world.http.post(
        f"{world.api}/v1/subscribers/{user}/devices",
        json={"channel": "webpush", "address": browser.recipient()},
    ) as r:
        await _json(r, 201)
    async with world.http.put(
        f"{world.api}/v1/subscribers/{user}/preferences",
        json={"choices": {"marketing": {"email": False}}},
    ) as r:
        prefs = await _json(r, 200)
    assert prefs["effective"]["marketing"] == {**prefs["effective"]["marketing"], "email": False}
    assert prefs["effective"]["marketing"]["webpush"] is True

    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    outputs = await world.router.route(event)
    made = intents(serde, outputs)
    assert "welcome-email" not in made and "welcome-push" in made
    suppressed = statuses(serde, outputs)["email"]
    assert suppressed.state.value == "SUPPRESSED"
    assert suppressed.provider_response == "opted out of marketing on email"
    # The status is on the topic, readable like any other.
    await _until(lambda: _status_states(world, suppressed.notification_id) == ["SUPPRESSED"])
    await _until(lambda: len(world.push.pushed) >= 1)

    reset = world.publish(
        "password-reset-requested",
        user_id=user,
        email="e@example.com",
        reset_url="https://example.com/r/1",
        expires_at=int(time.time() * 1000) + 3_600_000,
    )
    assert "password-reset-email" in intents(serde, await world.router.route(reset))
    await _until(lambda: world.smtp.to(f"{user}@example.com"))


async def test_one_click_unsubscribe_from_a_delivered_email(world: World) -> None:
    user = uid()
    await put_subscriber(world, user, email=f"{user}@example.com")
    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    await world.router.route(event)
    [caught] = await asyncio.to_thread(world.smtp.wait_for, 1, f"{user}@example.com", 60)
    url, mailto = _list_unsubscribe(caught.message)
    assert url.startswith(f"{PUBLIC}/u/") and mailto.startswith("mailto:unsubscribe@example.com")
    assert str(caught.message["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    local = url.replace(PUBLIC, world.api)

    async with world.http.get(local, headers={"Accept": "text/html"}) as r:
        page = await r.text()
        assert r.status == 200 and "<form" in page and "marketing" in page
    tampered = local[:-3] + ("AAA" if not local.endswith("AAA") else "BBB")
    async with world.http.post(tampered, data={"List-Unsubscribe": "One-Click"}) as r:
        problem = await _json(r, 400)
        assert problem["type"].endswith("invalid-unsubscribe-link")
    async with world.http.get(f"{world.api}/v1/subscribers/{user}/preferences") as r:
        assert (await _json(r, 200))["choices"] == {}, "a forged link changed nothing"

    async with world.http.post(local, data={"List-Unsubscribe": "One-Click"}) as r:
        assert r.status == 200, await r.text()
    async with world.http.get(f"{world.api}/v1/subscribers/{user}/preferences") as r:
        prefs = await _json(r, 200)
        assert prefs["choices"] == {"marketing": {"email": False}}
        assert prefs["updated_by"] == "unsubscribe-link"

    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    outputs = await world.router.route(event)
    assert statuses(world.publisher.serde, outputs)["email"].state.value == "SUPPRESSED"
    assert "welcome-email" not in intents(world.publisher.serde, outputs)


async def test_a_550_unknown_user_suppresses_the_address(world: World) -> None:
    user = uid()
    address = f"{user}@example.com"
    world.smtp.reject_recipients.add(address)  # 550 5.1.1 Mailbox unavailable
    await put_subscriber(world, user, email=address)
    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    await world.router.route(event)
    await _until(lambda: _suppressed(world, f"email:{address}"))
    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    status = statuses(world.publisher.serde, await world.router.route(event))["email"]
    assert status.state.value == "SUPPRESSED" and status.error_class == "AddressSuppressed"
    assert status.provider_response is not None
    assert status.provider_response.startswith("address suppressed: bounced (550 5.1.1")
    assert world.smtp.attempts[address] == 1, "the dead address was tried once"


async def test_a_410_from_the_push_service_suppresses_that_subscription(world: World) -> None:
    user = uid()
    alive, dead = world.push.subscribe(), world.push.subscribe()
    await put_subscriber(world, user, devices={"webpush": [alive.recipient(), dead.recipient()]})
    world.push.unsubscribe(dead)  # the browser dropped it: 410 Gone
    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    await world.router.route(event)
    await _until(lambda: any(k.startswith("webpush:sha256:") for k in _suppressions(world)))
    [(key, s)] = [(k, s) for k, s in _suppressions(world).items() if s["user_id"] == user]
    assert s["address"] == dead.endpoint, "shown by its endpoint, keys kept out"
    pushes = len(world.push.received)
    event = world.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    outputs = await world.router.route(event)
    made = [o for o in outputs if o.topic.endswith("notifications.webpush")]
    assert len(made) == 1, "only the live subscription"
    status = statuses(world.publisher.serde, outputs)["webpush"]
    assert status.state.value == "SUPPRESSED" and status.recipient == dead.endpoint
    await _until(lambda: len(world.push.received) == pushes + 1)
    # Registering it again (a new subscription with the same endpoint) lifts it.
    async with world.http.post(
        f"{world.api}/v1/subscribers/{user}/devices",
        json={"channel": "webpush", "address": dead.recipient()},
    ) as r:
        await _json(r, 201)
    await _until(lambda: key not in _suppressions(world))


async def test_a_pt_br_subscriber_gets_portuguese(world: World) -> None:
    user = uid()
    await put_subscriber(
        world, user, email=f"{user}@example.com", locale="pt-BR", time_zone="America/Sao_Paulo"
    )
    expires = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    event = world.publish(
        "password-reset-requested",
        user_id=user,
        email="e@example.com",
        reset_url="https://example.com/r/1",
        expires_at=expires,
    )
    await world.router.route(event)
    [caught] = await asyncio.to_thread(world.smtp.wait_for, 1, f"{user}@example.com", 60)
    assert str(caught.message["Subject"]) == "Redefina sua senha"
    assert "Ele expira em 31 de dezembro de 2025 21:00:00 BRT." in caught.text_body()
    assert caught.message["List-Unsubscribe"] is None, "security is critical"


async def test_an_event_with_a_failing_rule_delivers_the_other(world: World) -> None:
    user = uid()  # no subscriber: no phone, no push device; those two rules fail alone
    event = world.publish(
        "user-registered", user_id=user, email=f"{user}@example.com", display_name="A"
    )
    outputs = await world.router.route(event)
    dead = [h.as_dict(o.headers)[h.ERROR_RULE] for o in outputs if o.dead]
    assert dead == ["welcome-push", "welcome-sms"]
    await _until(lambda: world.smtp.to(f"{user}@example.com"))
    dlq = Topics(world.settings.topic_prefix).events_dlq
    found = [
        m
        for m in read_all(world.settings.kafka_bootstrap_servers, dlq)
        if h.as_dict(m.headers()).get(h.EVENT_ID) == event
    ]
    assert sorted(h.as_dict(m.headers())[h.ERROR_RULE] for m in found) == dead
    assert {h.as_dict(m.headers())[h.ERROR_CLASS] for m in found} == {"MissingRecipientError"}


async def test_invalid_subscribers_are_refused(world: World) -> None:
    async with world.http.put(
        f"{world.api}/v1/subscribers/{uid()}",
        json={"email": "nope", "locale": "xx-NOPE", "time_zone": "Mars/Base", "shoe": 1},
    ) as r:
        problem = await _json(r, 422)
    assert set(problem["fields"]) == {"email", "locale", "time_zone", "shoe"}


# -- helpers -------------------------------------------------------------------------------------


def _list_unsubscribe(message: EmailMessage) -> tuple[str, str]:
    value = str(message["List-Unsubscribe"])
    url, mailto = (part.strip().strip("<>") for part in value.split(","))
    return url, mailto


def _status_states(world: World, nid: str) -> list[str]:
    topic = Topics(world.settings.topic_prefix).status
    out = []
    for m in read_all(world.settings.kafka_bootstrap_servers, topic):
        if m.key() == nid.encode():
            out.append(world.publisher.serde.decode(m.value()).record["state"])
    return out


def _suppressions(world: World) -> dict[str, dict[str, Any]]:
    store = PeopleStore(world.settings, world.publisher.serde)
    topic = Topics(world.settings.topic_prefix).suppressions
    return {
        k: world.publisher.serde.decode(m.value()).record
        for k, m in store.all_latest(topic).items()
    }


def _suppressed(world: World, key: str) -> bool:
    return key in _suppressions(world)


async def _until(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.25)
