"""ApnsConnector against a real local HTTP/2 server over TLS (hypercorn, a trustme CA) that
speaks the APNs provider API: it insists on HTTP/2, verifies the ES256 provider token with the
key's public half, checks the apns-* headers and the payload, and answers APNs' error bodies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.apns import ApnsConnector, ApnsSettings, build_payload
from connectors.base import Outcome
from pipeline.records import NotificationIntent, notification_id
from tests.connectors.peers import BadToken, closed_port, serve_h2, verify_jwt

TEAM_ID = "5U8LBRXG3A"
KEY_ID = "LH4T9V5U4R"
TOPIC = "io.herald.demo"
DEVICE = "a" * 8 + "0123456789abcdef" * 3 + "b" * 8  # 64 hex digits, as APNs gives them

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def device(n: int) -> str:
    return f"{n:064x}"


def intent(recipient: str = DEVICE, **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "order-shipped", "apns", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "order-shipped",
        "rule": "order-shipped",
        "channel": "apns",
        "recipient": recipient,
        "subject": "Your order is on its way",
        "body_text": "Order 1042 left the warehouse.",
        "data": {"order_id": "1042"},
    }
    fields.update(kw)
    return NotificationIntent(**fields)


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


# -- the provider ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Retry-After as an HTTP-date this many seconds after the answer (made when answering)
    retry_after_date: float | None = None

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after_date is not None:
            when = datetime.now(UTC) + timedelta(seconds=self.retry_after_date)
            headers["Retry-After"] = format_datetime(when, usegmt=True)
        return headers


@dataclass
class Received:
    http_version: str
    client: tuple[str, int]
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def bearer(self) -> str:
        return self.headers.get("authorization", "").removeprefix("bearer ")


@dataclass
class FakeApns:
    """The provider API as an ASGI application."""

    public_key: ec.EllipticCurvePublicKey
    requests: list[Received] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)  # by device token
    expired: set[str] = field(default_factory=set)  # provider tokens it calls expired
    every_token_expired: bool = False

    def expire_current(self) -> None:
        self.expired.update(r.bearer for r in self.requests)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        got = Received(scope["http_version"], tuple(scope["client"]), scope["path"], headers, body)
        self.requests.append(got)
        status, answer, extra = await self.answer(scope["method"], got)
        if status == 200:
            extra["apns-id"] = headers.get("apns-id") or str(uuid.uuid4())
            extra["apns-unique-id"] = str(uuid.uuid4())
        payload = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        if status == 200:
            payload = b""
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in extra.items()]
                + ([(b"content-type", b"application/json")] if payload else []),
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def answer(
        self, method: str, got: Received
    ) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
        if got.http_version != "2":  # APNs speaks nothing else
            return 505, {"reason": "HTTP/2 required"}, {}
        if method != "POST":
            return 405, {"reason": "MethodNotAllowed"}, {}
        prefix = "/3/device/"
        if not got.path.startswith(prefix):
            return 404, {"reason": "BadPath"}, {}
        token = got.path.removeprefix(prefix)
        auth = got.headers.get("authorization", "")
        if not auth.startswith("bearer "):
            return 403, {"reason": "MissingProviderToken"}, {}
        try:
            header, claims = verify_jwt(got.bearer, self.public_key)
        except BadToken:
            return 403, {"reason": "InvalidProviderToken"}, {}
        if header.get("kid") != KEY_ID or claims.get("iss") != TEAM_ID:
            return 403, {"reason": "InvalidProviderToken"}, {}
        if (
            self.every_token_expired
            or got.bearer in self.expired
            or not time.time() - 3600 < claims.get("iat", 0) <= time.time() + 60
        ):
            return 403, {"reason": "ExpiredProviderToken"}, {}
        h = got.headers
        if "apns-topic" not in h:
            return 400, {"reason": "MissingTopic"}, {}
        if h["apns-topic"] != TOPIC:
            return 400, {"reason": "TopicDisallowed"}, {}
        if h.get("apns-push-type") != "alert":
            return 400, {"reason": "InvalidPushType"}, {}
        if h.get("apns-priority") != "10":
            return 400, {"reason": "BadPriority"}, {}
        try:
            if "apns-id" in h:
                uuid.UUID(h["apns-id"])
        except ValueError:
            return 400, {"reason": "BadMessageId"}, {}
        if not h.get("apns-expiration", "").isdigit():
            return 400, {"reason": "BadExpirationDate"}, {}
        if len(got.body) > 4096:
            return 413, {"reason": "PayloadTooLarge"}, {}
        if not got.body:
            return 400, {"reason": "PayloadEmpty"}, {}
        if "aps" not in json.loads(got.body):
            return 400, {"reason": "PayloadEmpty"}, {}
        if len(token) != 64 or any(c not in "0123456789abcdef" for c in token):
            return 400, {"reason": "BadDeviceToken"}, {}
        answer = self.answers.get(token)
        if answer is not None:
            await asyncio.sleep(answer.delay)
            return answer.status, answer.body, answer.response_headers()
        return 200, "", {}


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def apns(
    signing_key: ec.EllipticCurvePrivateKey, ca: trustme.CA, tmp_path: Path
) -> AsyncIterator[tuple[FakeApns, str]]:
    fake = FakeApns(signing_key.public_key())
    async with serve_h2(fake, ca, tmp_path) as url:
        yield fake, url


def settings(
    url: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, ca_file: Path | None, **kw: Any
) -> ApnsSettings:
    values: dict[str, Any] = {
        "base_url": url,
        "team_id": TEAM_ID,
        "key_id": KEY_ID,
        "private_key": pem(key),
        "topic": TOPIC,
        "ca_file": ca_file,
        "connect_timeout_s": 5.0,
        "read_timeout_s": 5.0,
    }
    values.update(kw)
    return ApnsSettings(**values)


def reason(name: str, **kw: Any) -> dict[str, Any]:
    return {"reason": name, **kw}


# -- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    answer: Answer | None = None
    recipient: str = DEVICE
    outcome: Outcome = Outcome.SENT
    error_class: str | None = None
    response: str | None = None
    retry_after: tuple[float, float] | None = None
    requests: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    intent: dict[str, Any] = field(default_factory=dict)
    closed_port: bool = False


CASES = [
    Case("sent", response="200 apns-id "),
    Case(
        "unregistered",
        Answer(410, reason("Unregistered", timestamp=1_700_000_000_000)),
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="410 Unregistered (token invalid since 2023-11-14T22:13:20+00:00)",
    ),
    Case(
        "bad-device-token",
        recipient="ab" * 40,  # hex, but not a token this server knows the shape of
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="400 BadDeviceToken",
    ),
    Case(
        "device-token-not-for-topic",
        Answer(400, reason("DeviceTokenNotForTopic")),
        outcome=Outcome.REJECTED,
        error_class="DeviceTokenNotForTopic",
    ),
    Case(
        "payload-too-large-413",
        Answer(413, reason("PayloadTooLarge")),
        outcome=Outcome.REJECTED,
        error_class="PayloadTooLarge",
    ),
    Case(
        "too-many-requests",
        Answer(429, reason("TooManyRequests"), headers={"retry-after": "12"}),
        outcome=Outcome.RETRYABLE,
        error_class="TooManyRequests",
        retry_after=(12, 12),
    ),
    Case(
        "internal-server-error",
        Answer(500, reason("InternalServerError")),
        outcome=Outcome.RETRYABLE,
        error_class="InternalServerError",
    ),
    Case(
        "service-unavailable",
        Answer(503, reason("ServiceUnavailable"), retry_after_date=20),
        outcome=Outcome.RETRYABLE,
        error_class="ServiceUnavailable",
        retry_after=(15, 20),
    ),
    Case(
        "shutdown",
        Answer(503, reason("Shutdown")),
        outcome=Outcome.RETRYABLE,
        error_class="Shutdown",
    ),
    Case(
        "error-without-a-json-body",
        Answer(400, "bad request"),
        outcome=Outcome.REJECTED,
        error_class="HTTP400",
    ),
    Case(
        "wrong-topic-is-configuration",
        config={"topic": "io.herald.other"},
        outcome=Outcome.RETRYABLE,
        error_class="TopicDisallowed",
    ),
    Case(
        "timeout",
        Answer(200, "", delay=1.5),
        outcome=Outcome.RETRYABLE,
        error_class="ReadTimeout",
        config={"read_timeout_s": 0.3},
    ),
    Case(
        "connection-refused",
        closed_port=True,
        outcome=Outcome.RETRYABLE,
        error_class="ConnectError",
        requests=0,
    ),
    Case(
        "not-hex",
        recipient="not-a-device-token",
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        requests=0,
    ),
    Case(
        "path-injection",
        recipient=DEVICE + "/../../2/x",
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        requests=0,
    ),
    Case(
        "payload-over-4k",
        intent={"body_text": "x" * 4000},
        outcome=Outcome.REJECTED,
        error_class="PayloadTooLarge",
        response="over APNs' 4096",
        requests=0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(
    apns: tuple[FakeApns, str],
    signing_key: ec.EllipticCurvePrivateKey,
    ca_file: Path,
    case: Case,
) -> None:
    fake, url = apns
    if case.answer is not None:
        fake.answers[case.recipient] = case.answer
    if case.closed_port:
        url = f"https://127.0.0.1:{closed_port()}"
    connector = ApnsConnector(settings(url, signing_key, ca_file, **case.config))
    sent = intent(case.recipient, **case.intent)
    try:
        result = await connector.send(sent)
    finally:
        await connector.aclose()

    assert result.outcome is case.outcome, result
    if case.error_class is not None:
        assert result.error_class == case.error_class, result
    if case.response is not None:
        assert case.response in (result.response or ""), result
    if case.retry_after is not None:
        low, high = case.retry_after
        assert result.retry_after is not None and low <= result.retry_after <= high, result
    else:
        assert result.retry_after is None
    if case.outcome is Outcome.SENT:
        assert result.provider_message_id == sent.idempotency_key
    else:
        assert result.error_class and result.response
        assert result.provider_message_id is None
    assert "PRIVATE KEY" not in repr(result)

    assert len(fake.requests) == case.requests
    for got in fake.requests:
        assert got.http_version == "2"
        assert got.path == f"/3/device/{case.recipient}"
        assert got.headers["apns-id"] == sent.idempotency_key
        assert got.body == build_payload(sent)
    if not case.requests:
        assert result.response


async def test_the_request_apns_receives(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    connector = ApnsConnector(settings(url, signing_key, ca_file, ttl_s=3600))
    sent = intent(data={"order_id": "1042", "aps": "not ours to set", "notification_id": "x"})
    try:
        result = await connector.send(sent)
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    [got] = fake.requests
    assert got.http_version == "2"
    h = got.headers
    assert h["apns-topic"] == TOPIC
    assert h["apns-push-type"] == "alert"
    assert h["apns-priority"] == "10"
    assert h["apns-id"] == sent.notification_id
    assert abs(int(h["apns-expiration"]) - (time.time() + 3600)) < 60
    assert h["content-type"] == "application/json"
    assert json.loads(got.body) == {
        "aps": {"alert": {"title": sent.subject, "body": sent.body_text}},
        "order_id": "1042",
        "notification_id": sent.notification_id,
    }
    header, claims = verify_jwt(got.bearer, signing_key.public_key())
    assert header["alg"] == "ES256" and header["kid"] == KEY_ID
    assert claims["iss"] == TEAM_ID and abs(claims["iat"] - time.time()) < 60


async def test_ttl_zero_and_no_subject(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    connector = ApnsConnector(settings(url, signing_key, ca_file, ttl_s=0))
    try:
        result = await connector.send(intent(subject=None, data={}))
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    [got] = fake.requests
    assert got.headers["apns-expiration"] == "0"
    assert json.loads(got.body)["aps"] == {"alert": {"body": "Order 1042 left the warehouse."}}


async def test_one_connection_one_token_for_many_sends(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    connector = ApnsConnector(settings(url, signing_key, ca_file))
    try:
        results = await asyncio.gather(*(connector.send(intent(device(i))) for i in range(30)))
    finally:
        await connector.aclose()
    assert all(r.outcome is Outcome.SENT for r in results), results
    assert len(fake.requests) == 30
    assert {r.http_version for r in fake.requests} == {"2"}
    assert len({r.client for r in fake.requests}) == 1  # multiplexed on one connection
    assert len({r.bearer for r in fake.requests}) == 1
    assert len({r.provider_message_id for r in results}) == 30


async def test_a_resend_carries_the_same_apns_id(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    first, forced = intent(), intent(generation=1)
    connector = ApnsConnector(settings(url, signing_key, ca_file))
    try:
        results = [await connector.send(i) for i in (first, first, forced)]
    finally:
        await connector.aclose()
    ids = [r.headers["apns-id"] for r in fake.requests]
    assert ids == [first.notification_id, first.notification_id, forced.idempotency_key]
    assert [r.provider_message_id for r in results] == ids


# -- the provider token ---------------------------------------------------------------------


async def test_an_expired_token_is_renewed_once(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    connector = ApnsConnector(settings(url, signing_key, ca_file))
    try:
        assert (await connector.send(intent())).outcome is Outcome.SENT
        fake.expire_current()
        result = await connector.send(intent())
        again = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is again.outcome is Outcome.SENT, result
    tokens = [r.bearer for r in fake.requests]
    assert len(tokens) == 4
    assert tokens[0] == tokens[1] != tokens[2] == tokens[3]


async def test_still_expired_after_renewal_is_retryable(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    fake.every_token_expired = True  # e.g. a clock far off
    connector = ApnsConnector(settings(url, signing_key, ca_file))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "ExpiredProviderToken"
    assert result.response == "403 ExpiredProviderToken"
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    "config",
    [{"team_id": "WRONGTEAM1"}, {"key_id": "WRONGKEY01"}, {"other_key": True}],
    ids=["team-id", "key-id", "key"],
)
async def test_a_wrong_key_is_retryable_configuration(
    apns: tuple[FakeApns, str],
    signing_key: ec.EllipticCurvePrivateKey,
    ca_file: Path,
    config: dict[str, Any],
) -> None:
    fake, url = apns
    key = ec.generate_private_key(ec.SECP256R1()) if config.pop("other_key", False) else signing_key
    connector = ApnsConnector(settings(url, key, ca_file, **config))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "InvalidProviderToken"
    assert len(fake.requests) == 1  # not renewed: renewing cannot fix it
    assert fake.requests[0].bearer not in repr(result)


async def test_the_token_is_renewed_when_it_is_old(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey, ca_file: Path
) -> None:
    fake, url = apns
    connector = ApnsConnector(settings(url, signing_key, ca_file))
    connector.token_refresh_s = 0.2  # type: ignore[misc]
    try:
        assert (await connector.send(intent())).outcome is Outcome.SENT
        assert (await connector.send(intent())).outcome is Outcome.SENT
        await asyncio.sleep(0.3)
        assert (await connector.send(intent())).outcome is Outcome.SENT
    finally:
        await connector.aclose()
    tokens = [r.bearer for r in fake.requests]
    assert tokens[0] == tokens[1] != tokens[2]


# -- TLS ------------------------------------------------------------------------------------


async def test_the_servers_certificate_is_verified(
    apns: tuple[FakeApns, str], signing_key: ec.EllipticCurvePrivateKey
) -> None:
    fake, url = apns
    connector = ApnsConnector(settings(url, signing_key, None))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "ConnectError"
    assert "CERTIFICATE_VERIFY_FAILED" in (result.response or "")
    assert fake.requests == []


# -- configuration --------------------------------------------------------------------------


def test_a_configuration_that_cannot_send_fails_at_startup(
    signing_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    url = "https://127.0.0.1:9"
    for name in ("team_id", "key_id", "topic"):
        with pytest.raises(ValueError, match=f"HERALD_APNS_{name.upper()}"):
            ApnsConnector(settings(url, signing_key, None, **{name: ""}))
    with pytest.raises(ValueError, match="HERALD_APNS_PRIVATE_KEY"):
        ApnsConnector(settings(url, signing_key, None, private_key=None))
    with pytest.raises(ValueError, match="not an unencrypted PEM key") as garbled:
        ApnsConnector(settings(url, signing_key, None, private_key=pem(signing_key)[:-80]))
    assert "PRIVATE KEY" not in str(garbled.value)
    with pytest.raises(ValueError, match="not an EC P-256 key"):
        ApnsConnector(settings(url, ec.generate_private_key(ec.SECP384R1()), None))
    with pytest.raises(ValueError, match="not an EC P-256 key"):
        ApnsConnector(
            settings(url, rsa.generate_private_key(public_exponent=65537, key_size=1024), None)  # noqa: S505
        )
    with pytest.raises(ValueError, match="cannot be read"):
        ApnsConnector(
            settings(url, signing_key, None, private_key=None, private_key_file=tmp_path / "no.p8")
        )


def test_from_env_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, signing_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    key_file = tmp_path / f"AuthKey_{KEY_ID}.p8"
    key_file.write_text(pem(signing_key))
    monkeypatch.setenv("HERALD_APNS_TEAM_ID", TEAM_ID)
    monkeypatch.setenv("HERALD_APNS_KEY_ID", KEY_ID)
    monkeypatch.setenv("HERALD_APNS_PRIVATE_KEY_FILE", str(key_file))
    monkeypatch.setenv("HERALD_APNS_TOPIC", TOPIC)
    monkeypatch.setenv("HERALD_APNS_BASE_URL", "https://api.sandbox.push.apple.com")
    connector = ApnsConnector.from_env()
    assert connector.config.topic == TOPIC
    assert connector.config.base_url == "https://api.sandbox.push.apple.com"
    header, claims = verify_jwt(connector.provider_token(), signing_key.public_key())
    assert header["kid"] == KEY_ID and claims["iss"] == TEAM_ID
    assert "HERALD_APNS_PRIVATE_KEY" in ApnsConnector.setting_names()
