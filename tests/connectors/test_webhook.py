"""WebhookConnector against a real aiohttp receiver on loopback that verifies every
signature with the reference ``standardwebhooks`` library: outcomes per status code, key
rotation, per-endpoint secrets, idempotency headers, and what is refused before sending."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import SecretStr
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from connectors.base import DeliveryResult, Outcome
from connectors.webhook import (
    InvalidSecretsError,
    WebhookConnector,
    WebhookSettings,
    new_secret,
    parse_secrets,
)
from pipeline.records import NotificationIntent, notification_id
from tests.connectors.test_ssrf import RecordingSockets, closed_port, serve

OLD = new_secret()
NEW = new_secret()
OTHER = new_secret()


@pytest.fixture
def sockets() -> RecordingSockets:
    """Records every connection and refuses all but loopback (see test_ssrf)."""
    return RecordingSockets()


@dataclass
class Received:
    path: str
    headers: CIMultiDict[str]
    body: bytes
    verified_by: list[str]  # the receiver's secrets the request verified with


@dataclass
class Receiver:
    """A Standard Webhooks receiver. ``knows``: the secrets it verifies with. It answers
    ``status`` with ``headers`` and ``body`` after ``delay`` seconds (cut short at the end of
    the test)."""

    knows: list[str] = field(default_factory=lambda: [OLD])
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    delay: float = 0.0
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            headers = CIMultiDict(request.headers)
            verified = []
            for secret in self.knows:
                try:
                    Webhook(secret).verify(body, dict(headers))
                except WebhookVerificationError:
                    continue
                verified.append(secret)
            self.requests.append(Received(request.path, headers, body, verified))
            if self.delay:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self.delay)
            return web.Response(status=self.status, headers=self.headers, text=self.body)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    """Run the receiver; yields its base URL."""
    async with serve(receiver.app()) as port:
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            receiver.release.set()  # before the server waits for its handlers to finish


def config(secrets: dict[str, list[str]] | None = None, **kw: Any) -> WebhookSettings:
    fields: dict[str, Any] = {
        "secrets": SecretStr(json.dumps({"default": [OLD]} if secrets is None else secrets)),
        "allow_hosts": ["127.0.0.1"],
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
    }
    fields.update(kw)
    return WebhookSettings(**fields)


def intent(recipient: str, **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "order-hook", "webhook", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "order-shipped",
        "rule": "order-hook",
        "channel": "webhook",
        "recipient": recipient,
        "subject": "Order 42 shipped",
        "body_text": "Your order 42 is on its way. ✓",
        "body_html": "<p>Your order 42 is on its way.</p>",
        "data": {"order_id": "42", "carrier": "DHL"},
        "created_at": datetime(2026, 3, 1, 12, 30, 15, 250000, tzinfo=UTC),
    }
    fields.update(kw)
    return NotificationIntent(**fields)


async def deliver(
    settings: WebhookSettings, sent: NotificationIntent, sockets: RecordingSockets
) -> DeliveryResult:
    connector = WebhookConnector(settings, socket_factory=sockets)
    try:
        return await connector.send(sent)
    finally:
        await connector.aclose()


def _secret_free(result: DeliveryResult) -> None:
    for secret in (OLD, NEW, OTHER):
        for text in (result.response, result.error_class, repr(result)):
            assert secret not in (text or "")
            assert secret.removeprefix("whsec_") not in (text or "")


# -- outcomes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    outcome: Outcome = Outcome.SENT
    error_class: str | None = None
    retry_after: float | None = None
    response: str | None = None  # a part of the result's response


CASES = [
    Case("200", status=200, body='{"ok":true}', response="200 OK"),
    Case("204", status=204, response="204 No Content"),
    Case("202-accepted", status=202, response="202"),
    # A 2xx whose body is not what anyone expected: success is the status alone (the spec),
    # and sending again would duplicate it.
    Case("200-non-json-body", status=200, body="<html>thanks</html>", response="thanks"),
    Case(
        "410-gone",
        status=410,
        body="endpoint disabled",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="410 Gone: endpoint disabled",
    ),
    Case(
        "429-retry-after",
        status=429,
        headers={"Retry-After": "7"},
        outcome=Outcome.RETRYABLE,
        error_class="HTTP429",
        retry_after=7.0,
    ),
    Case("503", status=503, outcome=Outcome.RETRYABLE, error_class="HTTP503"),
    Case(
        "503-retry-after",
        status=503,
        headers={"Retry-After": "120"},
        outcome=Outcome.RETRYABLE,
        error_class="HTTP503",
        retry_after=120.0,
    ),
    Case("500", status=500, body="boom", outcome=Outcome.RETRYABLE, error_class="HTTP500"),
    Case(
        "400",
        status=400,
        body='{"error":"bad"}',
        outcome=Outcome.REJECTED,
        error_class="HTTP400",
        response='400 Bad Request: {"error":"bad"}',
    ),
    Case("401", status=401, outcome=Outcome.REJECTED, error_class="HTTP401"),
    Case("404", status=404, outcome=Outcome.REJECTED, error_class="HTTP404"),
    Case("413", status=413, outcome=Outcome.REJECTED, error_class="HTTP413"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(case: Case, sockets: RecordingSockets) -> None:
    receiver = Receiver(status=case.status, headers=case.headers, body=case.body)
    async with receiving(receiver) as base:
        sent = intent(f"{base}/hooks/orders")
        result = await deliver(config(), sent, sockets)

    assert result.outcome is case.outcome, result
    assert result.error_class == case.error_class
    assert result.retry_after == case.retry_after
    if case.response is not None:
        assert result.response is not None and case.response in result.response
    if case.outcome is Outcome.SENT:
        assert result.provider_message_id == sent.idempotency_key
    _secret_free(result)

    [got] = receiver.requests  # exactly one request, whatever the answer
    assert got.path == "/hooks/orders"
    assert got.verified_by == [OLD]
    assert got.headers["Idempotency-Key"] == got.headers["webhook-id"] == sent.idempotency_key
    assert got.headers["Content-Type"] == "application/json"
    assert len(sockets.connects) == 1


async def test_payload_shape(sockets: RecordingSockets) -> None:
    receiver = Receiver()
    async with receiving(receiver) as base:
        sent = intent(f"{base}/hook", generation=2)
        before = int(datetime.now(UTC).timestamp())
        assert (await deliver(config(), sent, sockets)).outcome is Outcome.SENT
    [got] = receiver.requests
    assert json.loads(got.body) == {
        "type": "order-shipped",
        "timestamp": "2026-03-01T12:30:15.250000Z",
        "data": {
            "notification_id": sent.notification_id,
            "event_id": sent.event_id,
            "subject": "Order 42 shipped",
            "body_text": "Your order 42 is on its way. ✓",
            "body_html": "<p>Your order 42 is on its way.</p>",
            "recipient": sent.recipient,
            "data": {"order_id": "42", "carrier": "DHL"},
            "generation": 2,
        },
    }
    # webhook-timestamp is when it was sent, not when the notification was made
    assert before <= int(got.headers["webhook-timestamp"]) <= before + 5
    assert got.headers["webhook-id"] == sent.idempotency_key != sent.notification_id


async def test_redirect_is_rejected_and_not_followed(sockets: RecordingSockets) -> None:
    receiver = Receiver()
    async with receiving(receiver) as base:
        receiver.status = 301
        receiver.headers = {"Location": f"{base}/elsewhere"}
        result = await deliver(config(), intent(f"{base}/hook"), sockets)
    assert result.outcome is Outcome.REJECTED, result
    assert result.error_class == "Redirect"
    assert "/elsewhere" in (result.response or "")
    assert [r.path for r in receiver.requests] == ["/hook"]  # the target was not requested


async def test_read_timeout_is_retryable(sockets: RecordingSockets) -> None:
    receiver = Receiver(delay=5.0)
    async with receiving(receiver) as base:
        result = await deliver(config(read_timeout_s=0.3), intent(f"{base}/hook"), sockets)
    assert result.outcome is Outcome.RETRYABLE, result
    assert result.error_class == "ReadTimeout"
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("status", "outcome"), [(200, Outcome.SENT), (503, Outcome.RETRYABLE)], ids=["200", "503"]
)
async def test_total_deadline_bounds_a_trickling_answer(
    status: int, outcome: Outcome, sockets: RecordingSockets
) -> None:
    """Each chunk of the body arrives within the read timeout, the whole never does: the
    send ends at the deadline, and the status that did arrive decides."""
    release = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=status)
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b".")
            with suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 0.1)
                break
        return resp

    app = web.Application()
    app.router.add_post("/hook", trickle)
    async with serve(app) as port:
        try:
            settings = config(read_timeout_s=1.0, total_timeout_s=0.5)
            started = asyncio.get_running_loop().time()
            result = await deliver(settings, intent(f"http://127.0.0.1:{port}/hook"), sockets)
            elapsed = asyncio.get_running_loop().time() - started
        finally:
            release.set()
    assert result.outcome is outcome, result
    assert "cut short: not complete within 0.5s" in (result.response or "")
    assert elapsed < 2


async def test_connection_refused_is_retryable(sockets: RecordingSockets) -> None:
    port = closed_port()
    result = await deliver(config(), intent(f"http://127.0.0.1:{port}/hook"), sockets)
    assert result.outcome is Outcome.RETRYABLE, result
    assert result.error_class == "ConnectError"
    assert sockets.connects == [("127.0.0.1", port)]


MALFORMED = [
    # (what the server writes, then closes; the outcome)
    (b"", Outcome.RETRYABLE),
    (b"NOT HTTP AT ALL\r\n\r\n", Outcome.RETRYABLE),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", Outcome.SENT),
    (b"HTTP/1.1 503 Busy\r\nContent-Length: 10\r\n\r\nshort", Outcome.RETRYABLE),
]


@pytest.mark.parametrize(
    ("answer", "outcome"),
    MALFORMED,
    ids=["closed-without-answer", "garbage-status-line", "200-body-cut", "503-body-cut"],
)
async def test_malformed_answers(
    answer: bytes, outcome: Outcome, sockets: RecordingSockets
) -> None:
    """No status line: we cannot know whether the receiver took it, so retry (it drops the
    duplicate by webhook-id). A status line followed by a broken body: the status decides."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await deliver(config(), intent(f"http://127.0.0.1:{port}/hook"), sockets)
    finally:
        server.close()
        await server.wait_closed()
    assert result.outcome is outcome, result
    if answer.startswith(b"HTTP/1.1"):
        assert "cut short: RemoteProtocolError" in (result.response or "")
    else:
        assert result.error_class in ("RemoteProtocolError", "ReadError")
    assert len(seen) == 1


async def test_large_answer_is_cut(sockets: RecordingSockets) -> None:
    receiver = Receiver(status=500, body="x" * 5_000_000)
    async with receiving(receiver) as base:
        result = await deliver(config(), intent(f"{base}/hook"), sockets)
    assert result.outcome is Outcome.RETRYABLE
    assert result.response is not None and len(result.response) <= 300


# -- refused before sending -----------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    id: str
    url: str  # {base}: the receiver's http://127.0.0.1:port
    error_class: str
    secrets: dict[str, list[str]] | None = None
    allow: tuple[str, ...] = ("127.0.0.1",)


REFUSED = [
    Refused("no-secret", "{base}/hook", "NoSigningSecret", secrets={}),
    Refused(
        "secret-for-another-endpoint",
        "{base}/hook",
        "NoSigningSecret",
        secrets={"https://elsewhere.example/hook": [OLD]},
    ),
    Refused("http-not-allowlisted", "{base}/hook", "InvalidRecipient", allow=()),
    Refused("http-by-other-name", "{base_by_name}/hook", "InvalidRecipient"),
    Refused("http-public-host", "http://example.com/hook", "InvalidRecipient"),
    Refused("https-loopback-not-allowlisted", "{https_base}/hook", "ForbiddenAddress", allow=()),
    Refused("ftp", "ftp://127.0.0.1/hook", "InvalidRecipient"),
    Refused("no-scheme", "127.0.0.1/hook", "InvalidRecipient"),
    Refused("credentials-in-url", "https://user:pw@example.com/hook", "InvalidRecipient"),
    Refused("not-a-url", "order team", "InvalidRecipient"),
    Refused("newline", "{base}/hook\r\nX-Injected: 1", "InvalidRecipient"),
    Refused("empty", "", "InvalidRecipient"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
async def test_refused_before_sending(case: Refused, sockets: RecordingSockets) -> None:
    receiver = Receiver()
    async with receiving(receiver) as base:
        url = case.url.format(
            base=base,
            base_by_name=base.replace("127.0.0.1", "localhost"),
            https_base=base.replace("http://", "https://"),
        )
        settings = config(case.secrets, allow_hosts=list(case.allow))
        result = await deliver(settings, intent(url), sockets)
    assert result.outcome is Outcome.REJECTED, result
    assert result.error_class == case.error_class
    assert result.response
    assert receiver.requests == []
    assert sockets.connects == []


async def test_payload_too_large(sockets: RecordingSockets) -> None:
    receiver = Receiver()
    async with receiving(receiver) as base:
        big = intent(f"{base}/hook", body_text="x" * (WebhookConnector.max_body_bytes + 1))
        result = await deliver(config(), big, sockets)
    assert result.outcome is Outcome.REJECTED and result.error_class == "PayloadTooLarge"
    assert receiver.requests == [] and sockets.connects == []


# -- secrets and rotation -------------------------------------------------------------------------

ROTATION = [
    # (the connector's secrets, what the receiver knows, verifies?)
    ([NEW, OLD], [OLD], True),  # receiver not yet updated
    ([NEW, OLD], [NEW], True),  # receiver already updated
    ([NEW, OLD], [NEW, OLD], True),
    ([NEW], [OLD], False),  # rotation finished too early: the receiver refuses it
    ([OLD], [OTHER], False),
]


@pytest.mark.parametrize(("signing", "knows", "verifies"), ROTATION)
async def test_key_rotation(
    signing: list[str], knows: list[str], verifies: bool, sockets: RecordingSockets
) -> None:
    receiver = Receiver(knows=knows)
    async with receiving(receiver) as base:
        result = await deliver(config({"default": signing}), intent(f"{base}/hook"), sockets)
    assert result.outcome is Outcome.SENT  # the receiver here answers 204 regardless
    [got] = receiver.requests
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == len(signing)
    assert all(s.startswith("v1,") for s in signatures)
    assert bool(got.verified_by) is verifies
    _secret_free(result)


async def test_per_endpoint_secrets(sockets: RecordingSockets) -> None:
    receiver = Receiver(knows=[NEW, OLD, OTHER])
    async with receiving(receiver) as base:
        secrets = {f"{base}/hooks/a": [NEW, OLD], "default": [OTHER]}
        connector = WebhookConnector(config(secrets), socket_factory=sockets)
        try:
            a = await connector.send(intent(f"{base}/hooks/a"))
            b = await connector.send(intent(f"{base}/hooks/b"))
        finally:
            await connector.aclose()
    assert a.outcome is b.outcome is Outcome.SENT
    by_path = {r.path: r for r in receiver.requests}
    assert by_path["/hooks/a"].verified_by == [NEW, OLD]
    assert by_path["/hooks/b"].verified_by == [OTHER]
    assert len(sockets.connects) == 1  # one kept-alive connection for both


async def test_same_id_on_resend_new_id_on_redelivery(sockets: RecordingSockets) -> None:
    receiver = Receiver()
    async with receiving(receiver) as base:
        first = intent(f"{base}/hook")
        connector = WebhookConnector(config(), socket_factory=sockets)
        try:
            for sent in (first, first, intent(f"{base}/hook", generation=1)):
                assert (await connector.send(sent)).outcome is Outcome.SENT
        finally:
            await connector.aclose()
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    keys = [r.headers["Idempotency-Key"] for r in receiver.requests]
    assert ids == keys
    assert ids[0] == ids[1] == first.notification_id != ids[2]
    assert all(r.verified_by == [OLD] for r in receiver.requests)


async def test_concurrent_sends(sockets: RecordingSockets) -> None:
    receiver = Receiver()
    async with receiving(receiver) as base:
        connector = WebhookConnector(config(max_connections=4), socket_factory=sockets)
        try:
            sends = [intent(f"{base}/hook/{i}") for i in range(20)]
            results = await asyncio.gather(*(connector.send(s) for s in sends))
        finally:
            await connector.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert len(receiver.requests) == 20
    assert all(r.verified_by == [OLD] for r in receiver.requests)
    assert 1 <= len(sockets.connects) <= 4


BAD_SECRETS: list[tuple[str, str]] = [
    ("not json", "not JSON"),
    ('["whsec_x"]', "JSON object"),
    ('{"default": "' + OLD.removeprefix("whsec_") + '"}', "does not start with"),
    ('{"default": ["whsec_%%%%"]}', "base64"),
    ('{"default": ["whsec_c2hvcnQ="]}', "24 to 64"),
    ('{"default": [1]}', "list of strings"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_SECRETS)
def test_bad_secrets_are_refused_without_echoing_them(raw: str, message: str) -> None:
    with pytest.raises(InvalidSecretsError) as caught:
        WebhookConnector(WebhookSettings(secrets=SecretStr(raw)))
    assert message in str(caught.value)
    assert OLD.removeprefix("whsec_") not in str(caught.value)
    assert "%%%%" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_secrets_parse() -> None:
    keys = parse_secrets(json.dumps({"default": OLD, "https://Hooks.Example.com/a": [NEW, OLD]}))
    assert set(keys) == {"default", "https://hooks.example.com/a"}
    assert len(keys["https://hooks.example.com/a"]) == 2
    assert parse_secrets("") == {} == parse_secrets(" ")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_WEBHOOK_SECRETS", json.dumps({"default": [NEW, OLD]}))
    monkeypatch.setenv("HERALD_WEBHOOK_ALLOW_HOSTS", "127.0.0.0/8, hooks.local")
    monkeypatch.setenv("HERALD_WEBHOOK_READ_TIMEOUT_S", "3.5")
    connector = WebhookConnector.from_env()
    assert connector.config.allow_hosts == ["127.0.0.0/8", "hooks.local"]
    assert connector.config.read_timeout_s == 3.5
    assert len(connector.keys_for("https://anywhere.example/x")) == 2
    assert NEW not in repr(connector.config) and NEW not in str(connector.config.model_dump())
    monkeypatch.setenv("HERALD_WEBHOOK_ALLOW_HOSTS", '["::1/128"]')
    assert WebhookSettings().allow_hosts == ["::1/128"]
    names = WebhookConnector.setting_names()
    assert "HERALD_WEBHOOK_SECRETS" in names and "HERALD_WEBHOOK_ALLOW_HOSTS" in names


def test_new_secret_is_accepted_by_the_reference_library() -> None:
    secret = new_secret()
    Webhook(secret)  # does not raise
    assert (
        parse_secrets(json.dumps({"default": [secret]}))["default"][0] == Webhook(secret)._whsecret
    )
    assert secret != new_secret()
