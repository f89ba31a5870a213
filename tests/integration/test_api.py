"""The HTTP notification API on a real broker: events and direct notifications are accepted
(202) and delivered by the pipeline; their state is readable; retries with the same
Idempotency-Key notify nobody twice; bad input gets a problem document naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from pipeline.api import create_api
from pipeline.records import DeliveryState
from pipeline.sink.ledger import open_ledger
from tests.integration.test_effectively_once import WAIT, Pipeline, pipeline

pytestmark = pytest.mark.integration
__all__ = ["pipeline"]


@pytest.fixture
async def api(pipeline: Pipeline) -> AsyncIterator[str]:
    settings = pipeline.settings.model_copy(update={"api_token": SecretStr("s3cret-api-token")})
    app = create_api(settings, open_ledger(settings.ledger_url.get_secret_value()))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


AUTH = {"Authorization": "Bearer s3cret-api-token"}


async def test_event_and_direct_notification_are_delivered(api: str, pipeline: Pipeline) -> None:
    user = pipeline.user("api")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        r = await http.post(f"{api}/v1/events/user-registered", json=user)
        assert r.status == 202, await r.text()
        event_id = (await r.json())["event_id"]

        body = {
            "channel": "email",
            "recipient": f"direct-{user['email']}",
            "subject": "Your code",
            "body_text": "123456",
        }
        first = await http.post(
            f"{api}/v1/notifications", json=body, headers={"Idempotency-Key": "req-1"}
        )
        again = await http.post(
            f"{api}/v1/notifications", json=body, headers={"Idempotency-Key": "req-1"}
        )
        assert first.status == again.status == 202
        nid = (await first.json())["notification_id"]
        assert (await again.json())["notification_id"] == nid  # a retried POST: same id

        assert pipeline.smtp.wait_for(1, user["email"], timeout=WAIT)
        [direct] = pipeline.smtp.wait_for(1, body["recipient"], timeout=WAIT)
        assert direct.message["Subject"] == "Your code"
        pipeline.wait_status(nid, DeliveryState.SENT)
        assert len(pipeline.smtp.to(body["recipient"])) == 1

        r = await http.get(f"{api}/v1/notifications/{nid}")
        assert r.status == 200
        [delivery] = (await r.json())["deliveries"]
        assert delivery["state"] == "SENT" and delivery["channel"] == "email"
    assert event_id


async def test_bad_requests_get_problem_documents(api: str) -> None:
    async with aiohttp.ClientSession() as anonymous:
        r = await anonymous.post(f"{api}/v1/events/user-registered", json={})
        assert r.status == 401
    async with aiohttp.ClientSession(headers=AUTH) as http:
        r = await http.post(f"{api}/v1/events/user-registered", json={"user_id": 7})
        assert r.status == 422
        problem = await r.json()
        assert r.content_type == "application/problem+json"
        assert "user_id" in problem["fields"]
        r = await http.post(f"{api}/v1/events/user-deleted", json={})
        assert r.status == 404
        r = await http.post(f"{api}/v1/notifications", json={"channel": "fax"})
        assert r.status == 422
        assert "recipient is required" in (await r.json())["detail"]
        r = await http.get(f"{api}/v1/notifications/00000000-0000-0000-0000-000000000000")
        assert r.status == 404
        r = await http.get(f"{api}/healthz")
        assert r.status == 200
