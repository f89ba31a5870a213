"""People end to end: `herald run all email webpush` and `herald run api` as processes on the
session broker, a real SMTP server and a Web Push service.

These need the router loop to hold the people tables (docs/architecture.md, "People": the
wiring). Until the loop has it, the stories that depend on the router's tables fail here;
tests/integration/test_people.py proves the same stories on the router's pieces directly.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from connectors.webpush import generate_vapid_key
from devtools.procs import free_port
from devtools.smtp_catcher import SmtpCatcher
from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.records import DELIVERY_STATUS
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics
from tests.connectors.pushservice import PushService
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env
from tests.integration.test_people import PUBLIC, RULES, SECRET

# One pipeline for the module, on the module's event loop (the push service runs on it).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="module"),
]

WAIT = 45.0


@dataclass
class Running:
    settings: HeraldSettings
    api: str
    smtp: SmtpCatcher
    push: PushService
    publisher: Publisher
    pipeline: HeraldProcess
    api_proc: HeraldProcess
    http: aiohttp.ClientSession

    def publish(self, event_type: str, **fields: Any) -> str:
        return self.publisher.publish_sync(event_type, fields).event_id

    async def until(self, what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(check)
            if found:
                return found
            if time.monotonic() > deadline or not self.pipeline.alive():
                raise AssertionError(f"{what}; herald run all said:\n{self.pipeline.tail(40)}")
            await asyncio.sleep(0.25)

    def statuses(self, event_id: str) -> list[dict[str, Any]]:
        out = []
        topic = Topics(self.settings.topic_prefix).status
        for m in read_all(self.settings.kafka_bootstrap_servers, topic):
            if h.as_dict(m.headers()).get(h.EVENT_ID) == event_id:
                out.append(self.publisher.serde.decode(m.value(), expect=DELIVERY_STATUS).record)
        return out

    async def put(self, path: str, body: dict[str, Any], status: int = 200) -> Any:
        async with self.http.put(f"{self.api}{path}", json=body) as r:
            text = await r.text()
            assert r.status == status, text
            return json.loads(text)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    tmp = tmp_path_factory.mktemp("people-e2e")
    rules = tmp / "rules.toml"
    rules.write_text(RULES)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    port = free_port()
    s = HeraldSettings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        router_app_id=f"{prefix}router",
        sink_group_prefix=f"{prefix}sink",
        router_data_dir=tmp / "router",
        rules_file=rules,
        ledger_url=f"sqlite:///{tmp / 'ledger.db'}",  # type: ignore[arg-type]
        unsubscribe_secret=SECRET,  # type: ignore[arg-type]
        unsubscribe_url=PUBLIC,
        unsubscribe_mailto="unsubscribe@example.com",
        api_port=port,
        grpc_port=0,
    )
    ensure_topics(s)
    vapid_private, _ = generate_vapid_key()
    async with PushService() as push:
        with SmtpCatcher() as smtp:
            env = herald_env(
                s,
                HERALD_SMTP_PORT=str(smtp.port),
                HERALD_WEBPUSH_VAPID_PRIVATE_KEY=vapid_private,
                HERALD_WEBPUSH_VAPID_SUBJECT="mailto:ops@example.com",
                HERALD_WEBPUSH_ALLOW_HOSTS="127.0.0.1",
            )
            pipeline = HeraldProcess("run-all", ["run", "all", "email", "webpush"], env, tmp)
            api = HeraldProcess("api", ["run", "api"], env, tmp)
            pipeline.start()
            api.start()
            base = f"http://127.0.0.1:{port}"
            try:
                async with aiohttp.ClientSession() as http:
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            async with http.get(f"{base}/healthz") as r:
                                if r.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        assert time.monotonic() < deadline, api.tail()
                        await asyncio.sleep(0.25)
                    yield Running(s, base, smtp, push, Publisher(s), pipeline, api, http)
            finally:
                api.stop()
                pipeline.stop()


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


def list_unsubscribe(message: Any) -> tuple[str, str]:
    url, mailto = (p.strip().strip("<>") for p in str(message["List-Unsubscribe"]).split(","))
    return url, mailto


async def test_a_subscriber_set_through_the_api_gets_the_next_event(running: Running) -> None:
    user = uid()
    await running.put(f"/v1/subscribers/{user}", {"email": f"{user}@stored.example.com"})
    running.publish(
        "user-registered", user_id=user, email=f"{user}@event.example.com", display_name="A"
    )
    await running.until(
        "no email at the stored address", lambda: running.smtp.to(f"{user}@stored.example.com")
    )
    assert not running.smtp.to(f"{user}@event.example.com")
    await running.put(f"/v1/subscribers/{user}", {"email": f"{user}@changed.example.com"})
    running.publish(
        "user-registered", user_id=user, email=f"{user}@event.example.com", display_name="A"
    )
    await running.until(
        "the change did not count", lambda: running.smtp.to(f"{user}@changed.example.com")
    )
    running.pipeline.stop()
    running.pipeline.start()
    running.publish(
        "user-registered", user_id=user, email=f"{user}@event.example.com", display_name="A"
    )
    await running.until(
        "the change did not survive a restart",
        lambda: len(running.smtp.to(f"{user}@changed.example.com")) == 2,
        timeout=90,
    )


async def test_an_email_opt_out_leaves_push_and_critical_mail(running: Running) -> None:
    user = uid()
    browser = running.push.subscribe()
    await running.put(
        f"/v1/subscribers/{user}",
        {"email": f"{user}@example.com", "devices": {"webpush": [browser.recipient()]}},
    )
    await running.put(
        f"/v1/subscribers/{user}/preferences", {"choices": {"marketing": {"email": False}}}
    )
    event = running.publish(
        "user-registered", user_id=user, email="e@example.com", display_name="A"
    )
    await running.until(
        "no push", lambda: any(p.token == browser.token for p in running.push.pushed)
    )
    states = await running.until(
        "no SUPPRESSED status",
        lambda: [s for s in running.statuses(event) if s["state"] == "SUPPRESSED"],
    )
    assert states[0]["channel"] == "email"
    assert states[0]["provider_response"] == "opted out of marketing on email"
    assert not running.smtp.to(f"{user}@example.com")
    running.publish(
        "password-reset-requested",
        user_id=user,
        email="e@example.com",
        reset_url="https://example.com/r",
        expires_at=int(time.time() * 1000) + 3_600_000,
    )
    await running.until("critical mail held back", lambda: running.smtp.to(f"{user}@example.com"))


async def test_one_click_unsubscribe(running: Running) -> None:
    user = uid()
    await running.put(f"/v1/subscribers/{user}", {"email": f"{user}@example.com"})
    running.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    [caught] = await running.until("no email", lambda: running.smtp.to(f"{user}@example.com"))
    assert caught.message["List-Unsubscribe"] is not None, "no List-Unsubscribe header"
    url, _ = list_unsubscribe(caught.message)
    local = url.replace(PUBLIC, running.api)
    tampered = local[:-2] + ("AA" if not local.endswith("AA") else "BB")
    async with running.http.post(tampered, data={"List-Unsubscribe": "One-Click"}) as r:
        assert r.status == 400
    async with running.http.post(local, data={"List-Unsubscribe": "One-Click"}) as r:
        assert r.status == 200
    event = running.publish(
        "user-registered", user_id=user, email="e@example.com", display_name="A"
    )
    await running.until(
        "the next email was not suppressed",
        lambda: any(s["state"] == "SUPPRESSED" for s in running.statuses(event)),
    )
    assert len(running.smtp.to(f"{user}@example.com")) == 1


async def test_a_550_unknown_user_suppresses_the_address(running: Running) -> None:
    user = uid()
    address = f"{user}@example.com"
    running.smtp.reject_recipients.add(address)
    await running.put(f"/v1/subscribers/{user}", {"email": address})
    running.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    await running.until("no attempt", lambda: running.smtp.attempts.get(address))
    await asyncio.sleep(2)  # the sink writes the suppression; the router reads it
    event = running.publish(
        "user-registered", user_id=user, email="e@example.com", display_name="A"
    )
    [status] = await running.until(
        "the dead address was not suppressed",
        lambda: [s for s in running.statuses(event) if s["state"] == "SUPPRESSED"],
    )
    assert status["error_class"] == "AddressSuppressed"
    assert running.smtp.attempts[address] == 1


async def test_a_410_from_the_push_service_suppresses_that_subscription(running: Running) -> None:
    user = uid()
    dead = running.push.subscribe()
    await running.put(f"/v1/subscribers/{user}", {"devices": {"webpush": [dead.recipient()]}})
    running.push.unsubscribe(dead)
    topic = Topics(running.settings.topic_prefix).suppressions
    bootstrap = running.settings.kafka_bootstrap_servers
    written_before = len(read_all(bootstrap, topic, timeout=5))
    running.publish("user-registered", user_id=user, email="e@example.com", display_name="A")
    await running.until("no 410", lambda: running.push.requests >= 1)
    # The sink writes the suppression when it records the 410's outcome (its group commit);
    # an event published after that is routed with it in the router's table.
    await running.until(
        "no suppression written",
        lambda: len(read_all(bootstrap, topic, timeout=5)) > written_before,
    )
    before = running.push.requests
    event = running.publish(
        "user-registered", user_id=user, email="e@example.com", display_name="A"
    )
    await running.until(
        "the dead subscription was not suppressed",
        lambda: any(
            s["state"] == "SUPPRESSED" and s["channel"] == "webpush"
            for s in running.statuses(event)
        ),
    )
    assert running.push.requests == before


async def test_a_pt_br_subscriber_gets_portuguese(running: Running) -> None:
    user = uid()
    await running.put(
        f"/v1/subscribers/{user}",
        {"email": f"{user}@example.com", "locale": "pt-BR", "time_zone": "America/Sao_Paulo"},
    )
    running.publish(
        "password-reset-requested",
        user_id=user,
        email="e@example.com",
        reset_url="https://example.com/r",
        expires_at=1_767_225_600_000,
    )
    [caught] = await running.until("no email", lambda: running.smtp.to(f"{user}@example.com"))
    assert str(caught.message["Subject"]) == "Redefina sua senha"
    assert "31 de dezembro de 2025 21:00:00 BRT" in caught.text_body()


async def test_an_event_with_a_failing_rule_delivers_the_others(running: Running) -> None:
    user = uid()
    event = running.publish(
        "user-registered", user_id=user, email=f"{user}@example.com", display_name="A"
    )
    await running.until("no email", lambda: running.smtp.to(f"{user}@example.com"))
    dlq = Topics(running.settings.topic_prefix).events_dlq

    def rules() -> list[str]:
        return sorted(
            h.as_dict(m.headers()).get(h.ERROR_RULE, "")
            for m in read_all(running.settings.kafka_bootstrap_servers, dlq)
            if h.as_dict(m.headers()).get(h.EVENT_ID) == event
        )

    assert await running.until("no dead letters", rules) == ["welcome-push", "welcome-sms"]
