"""The HTTP notification API on a real broker, over real HTTP on loopback: events and direct
notifications are accepted (202) and delivered by the pipeline; their state is readable; a
retried Idempotency-Key notifies nobody twice and a reused one is refused with nothing
published; records over the limit are refused before anything is produced; every error is a
problem document."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from pipeline import headers as h
from pipeline.api import IDEMPOTENCY_KEY_REUSED, create_api
from pipeline.kafka.admin import ensure_topics
from pipeline.records import NOTIFICATION_INTENT, DeliveryState
from pipeline.serialization import serde_from_settings
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import open_ledger
from pipeline.topics import Topics
from tests.integration.kafkautil import read_all
from tests.integration.test_effectively_once import WAIT, Pipeline, pipeline

pytestmark = pytest.mark.integration
__all__ = ["pipeline"]

TOKEN = "s3cret-api-token"  # noqa: S105 - the test server's token
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"


async def _serve(settings: HeraldSettings) -> AsyncIterator[str]:
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


@pytest.fixture
async def api(pipeline: Pipeline) -> AsyncIterator[str]:
    """The API in front of a running router and email sink."""
    settings = pipeline.settings.model_copy(update={"api_token": SecretStr(TOKEN)})
    async for url in _serve(settings):
        yield url


@dataclass
class Bare:
    """The API on the broker with topics of its own and no router or sink: what it wrote
    stays in the topics to be counted."""

    url: str
    settings: HeraldSettings
    topics: Topics

    def records(self, topic: str) -> list[Any]:
        return read_all(self.settings.kafka_bootstrap_servers, topic)


@pytest.fixture
async def bare(settings: HeraldSettings, tmp_path: Path) -> AsyncIterator[Bare]:
    s = HeraldSettings.model_validate(
        {
            **settings.model_dump(),
            "api_token": TOKEN,
            "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
        }
    )
    await asyncio.to_thread(ensure_topics, s)
    async for url in _serve(s):
        yield Bare(url, s, Topics(s.topic_prefix))


def direct(recipient: str, text: str = "123456") -> dict[str, str]:
    return {"channel": "email", "recipient": recipient, "subject": "Code", "body_text": text}


def big_json(body: dict[str, Any]) -> dict[str, Any]:
    """Request arguments for a large JSON body (aiohttp warns about large raw bytes)."""
    data = io.BytesIO(json.dumps(body).encode())
    return {"data": data, "headers": {"Content-Type": "application/json"}}


async def assert_problem(r: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert r.status == status, await r.text()
    assert r.content_type == PROBLEM
    problem: dict[str, Any] = await r.json(content_type=PROBLEM)
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    return problem


# --- through the pipeline --------------------------------------------------------------------


async def test_event_and_direct_notification_are_delivered(api: str, pipeline: Pipeline) -> None:
    user = pipeline.user("api")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        r = await http.post(f"{api}/v1/events/user-registered", json=user)
        assert r.status == 202, await r.text()
        event_id = (await r.json())["event_id"]

        body = direct(f"direct-{user['email']}", "123456")
        first = await http.post(
            f"{api}/v1/notifications", json=body, headers={"Idempotency-Key": "req-1"}
        )
        again = await http.post(
            f"{api}/v1/notifications", json=body, headers={"Idempotency-Key": "req-1"}
        )
        assert first.status == again.status == 202
        nid = (await first.json())["notification_id"]
        assert (await again.json())["notification_id"] == nid  # a retried POST: same id
        assert again.headers.get("Idempotent-Replayed") == "true"

        assert pipeline.smtp.wait_for(1, user["email"], timeout=WAIT)
        [delivered] = pipeline.smtp.wait_for(1, body["recipient"], timeout=WAIT)
        assert delivered.message["Subject"] == "Code"
        pipeline.wait_status(nid, DeliveryState.SENT)
        assert len(pipeline.smtp.to(body["recipient"])) == 1

        # The sink acknowledges a record's status before it writes the outcome to the ledger
        # (sink/checkpoint.py: flush, then record), so the API may answer 404 a moment after
        # the status record is visible.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            r = await http.get(f"{api}/v1/notifications/{nid}")
            if r.status != 404 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert r.status == 200
        [delivery] = (await r.json())["deliveries"]
        assert delivery["state"] == "SENT" and delivery["channel"] == "email"
    assert event_id


# --- Idempotency-Key -------------------------------------------------------------------------


async def test_a_reused_key_with_a_different_body_is_refused_and_publishes_nothing(
    bare: Bare,
) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"{bare.url}/v1/notifications"
        key = {"Idempotency-Key": "otp-7"}
        first = await http.post(url, json=direct("ada@example.com"), headers=key)
        assert first.status == 202, await first.text()
        nid = (await first.json())["notification_id"]

        other = await http.post(url, json=direct("mallory@example.com"), headers=key)
        problem = await assert_problem(other, 422)
        assert problem["type"] == IDEMPOTENCY_KEY_REUSED
        assert problem["idempotency_key"] == "otp-7"
        assert "different request" in problem["detail"]
        changed_text = await http.post(url, json=direct("ada@example.com", "999"), headers=key)
        await assert_problem(changed_text, 422)

        # The same request, its JSON spaced and ordered differently: the same answer, from
        # the ledger, nothing written again.
        same = json.dumps(dict(reversed(direct("ada@example.com").items())), indent=2)
        retry = await http.post(url, data=same, headers={**key, "Content-Type": "application/json"})
        assert retry.status == 202
        assert await retry.json() == {"notification_id": nid, "status": "accepted"}
        assert retry.headers["Idempotent-Replayed"] == "true"

        # Scoped by path: the key is free on another route.
        event = {"user_id": "u-7", "email": "ada@example.com", "display_name": "Ada"}
        r = await http.post(f"{bare.url}/v1/events/user-registered", json=event, headers=key)
        assert r.status == 202, await r.text()
        event_id = (await r.json())["event_id"]
        r = await http.post(
            f"{bare.url}/v1/events/user-registered",
            json={**event, "display_name": "Mallory"},
            headers=key,
        )
        await assert_problem(r, 422)

    serde = serde_from_settings(bare.settings)
    [written] = bare.records(bare.topics.notifications("email"))
    assert h.as_dict(written.headers())[h.NOTIFICATION_ID] == nid
    record = serde.decode(written.value(), expect=NOTIFICATION_INTENT).record
    assert (record["recipient"], record["body_text"]) == ("ada@example.com", "123456")
    [event_record] = bare.records(bare.topics.events("user"))
    assert h.as_dict(event_record.headers())[h.EVENT_ID] == event_id
    assert b"Mallory" not in event_record.value()


async def test_concurrent_requests_with_one_key_exactly_one_wins(bare: Bare) -> None:
    url = f"{bare.url}/v1/notifications"
    key = {"Idempotency-Key": "race-1"}
    async with aiohttp.ClientSession(headers=AUTH) as http:

        async def post(i: int) -> tuple[int, dict[str, Any]]:
            r = await http.post(url, json=direct(f"racer-{i}@example.com"), headers=key)
            return r.status, await r.json(content_type=None)

        answers = await asyncio.gather(*(post(i) for i in range(8)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] + [422] * 7, answers
    [winner] = [body["notification_id"] for status, body in answers if status == 202]
    [written] = bare.records(bare.topics.notifications("email"))
    assert h.as_dict(written.headers())[h.NOTIFICATION_ID] == winner


# --- limits ------------------------------------------------------------------------------------


async def test_records_over_the_limit_are_refused_before_anything_is_produced(
    bare: Bare,
) -> None:
    limit = bare.settings.max_record_bytes
    async with aiohttp.ClientSession(headers=AUTH) as http:
        huge = {"user_id": "u-big", "email": "big@example.com", "display_name": "x" * 1_100_000}
        r = await http.post(f"{bare.url}/v1/events/user-registered", **big_json(huge))
        problem = await assert_problem(r, 413)
        assert problem["limit"] == limit and problem["size"] > 1_100_000

        # A body under the limit whose record, with its other fields and headers, is over it:
        # the encoded size is what counts.
        body = direct("ada@example.com", "y" * (limit - 100))
        assert len(json.dumps(body)) < limit
        r = await http.post(f"{bare.url}/v1/notifications", **big_json(body))
        problem = await assert_problem(r, 413)
        assert limit < problem["size"] < limit + 1000
        assert "HERALD_MAX_RECORD_BYTES" in problem["detail"]

    assert bare.records(bare.topics.events("user")) == []
    assert bare.records(bare.topics.notifications("email")) == []


async def raw_chunked_post(
    url: str, path: str, chunks: list[bytes]
) -> tuple[int, dict[str, str], bytes]:
    """POST ``chunks`` with Transfer-Encoding: chunked (no Content-Length) on a plain socket;
    returns the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    )

    async def send() -> None:
        try:
            writer.write(head.encode())
            for chunk in chunks:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the server may stop reading once it has answered

    sending = asyncio.create_task(send())
    raw = await asyncio.wait_for(reader.read(), timeout=60)
    await sending
    writer.close()
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body[: int(headers["content-length"])]


async def test_a_chunked_body_over_the_limit_is_a_problem_document(bare: Bare) -> None:
    piece = b"z" * 65_536
    n = 2 * bare.settings.max_record_bytes // len(piece) + 2  # over twice the record limit
    chunks = [b'{"channel": "email", "recipient": "a@example.com", "body_text": "', *[piece] * n]
    status, headers, body = await raw_chunked_post(bare.url, "/v1/notifications", chunks)
    assert status == 413
    assert headers["content-type"].startswith(PROBLEM)
    problem = json.loads(body)
    assert problem["status"] == 413 and "body is over" in problem["detail"]
    assert bare.records(bare.topics.notifications("email")) == []


# --- authentication and errors ----------------------------------------------------------------


async def test_only_a_bearer_token_is_accepted(bare: Bare) -> None:
    url = f"{bare.url}/v1/notifications"
    for authorization in (TOKEN, f"Basic {TOKEN}", "Bearer", "Bearer wrong-token", ""):
        async with aiohttp.ClientSession() as http:
            r = await http.post(url, json={}, headers={"Authorization": authorization})
            await assert_problem(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with aiohttp.ClientSession() as http:
        # The scheme is case-insensitive: past authentication, on to validation.
        r = await http.post(url, json={}, headers={"Authorization": f"bearer {TOKEN}"})
        await assert_problem(r, 422)


async def test_bad_requests_get_problem_documents(bare: Bare) -> None:
    api = bare.url
    async with aiohttp.ClientSession(headers=AUTH) as http:
        r = await http.post(f"{api}/v1/events/user-registered", json={"user_id": 7})
        problem = await assert_problem(r, 422)
        assert "user_id" in problem["fields"]
        r = await http.post(f"{api}/v1/events/user-deleted", json={})
        await assert_problem(r, 404)
        r = await http.post(f"{api}/v1/notifications", json={"channel": "fax"})
        problem = await assert_problem(r, 422)
        assert "recipient is required" in problem["detail"]
        r = await http.post(f"{api}/v1/notifications", data=b"not json")
        await assert_problem(r, 400)
        r = await http.post(
            f"{api}/v1/notifications",
            json=direct("ada@example.com"),
            headers={"Idempotency-Key": "k" * 256},
        )
        await assert_problem(r, 400)
        r = await http.get(f"{api}/v1/notifications/00000000-0000-0000-0000-000000000000")
        await assert_problem(r, 404)
        r = await http.get(f"{api}/v1/no-such-route")
        problem = await assert_problem(r, 404)
        assert "/v1/no-such-route" in problem["detail"]
        r = await http.get(f"{api}/nowhere")
        await assert_problem(r, 404)
        r = await http.delete(f"{api}/v1/notifications")
        await assert_problem(r, 405)
        assert "POST" in r.headers["Allow"]
        r = await http.get(f"{api}/healthz")
        assert r.status == 200
    assert bare.records(bare.topics.notifications("email")) == []


async def test_the_callers_trace_context_travels_on_every_record(bare: Bare) -> None:
    """A W3C traceparent on the request is on the event and the intent the API writes (in
    the record and its header); without one, each record starts a trace of its own."""
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    event = {"user_id": "u-tp", "email": "ada@example.com", "display_name": "Ada"}
    async with aiohttp.ClientSession(headers=AUTH) as http:
        r = await http.post(
            f"{bare.url}/v1/notifications",
            json=direct("ada@example.com"),
            headers={"traceparent": tp},
        )
        assert r.status == 202, await r.text()
        r = await http.post(
            f"{bare.url}/v1/events/user-registered", json=event, headers={"traceparent": tp}
        )
        assert r.status == 202, await r.text()
        r = await http.post(f"{bare.url}/v1/notifications", json=direct("bob@example.com"))
        assert r.status == 202, await r.text()

    serde = serde_from_settings(bare.settings)
    intents = bare.records(bare.topics.notifications("email"))
    by_recipient = {
        serde.decode(m.value(), expect=NOTIFICATION_INTENT).record["recipient"]: m for m in intents
    }
    traced = by_recipient["ada@example.com"]
    assert h.as_dict(traced.headers())[h.TRACEPARENT] == tp
    assert serde.decode(traced.value()).record["traceparent"] == tp
    untraced = h.as_dict(by_recipient["bob@example.com"].headers())[h.TRACEPARENT]
    assert h.valid_traceparent(untraced) and untraced != tp
    [ev] = bare.records(bare.topics.events("user"))
    assert h.as_dict(ev.headers())[h.TRACEPARENT] == tp
    assert serde.decode(ev.value()).record["envelope"]["traceparent"] == tp
