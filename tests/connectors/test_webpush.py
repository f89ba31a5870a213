"""WebPushConnector against a real push service on loopback (tests/connectors/pushservice.py)
that verifies the VAPID JWT, decrypts the aes128gcm body with the subscription's private key
and checks the Web Push headers: outcomes per status, the payload a browser receives, Topic
as the idempotency mechanism, key formats, settings and secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connectors.base import DeliveryResult, Outcome
from connectors.ssrf import AddressGuard
from connectors.webpush import (
    MAX_PAYLOAD_BYTES,
    WebPushConnector,
    WebPushSettings,
    build_payload,
    check_endpoint,
    generate_vapid_key,
    topic_for,
)
from devtools.procs import free_port
from pipeline.records import NotificationIntent, notification_id
from pipeline.settings import project_root
from tests.connectors.pushservice import (
    Answer,
    PushService,
    Subscriber,
    b64url,
    error,
    public_point,
)

SUBJECT = "mailto:ops@herald.localhost"

# The application server's VAPID key, in every form an operator may configure.
VAPID_KEY = ec.generate_private_key(ec.SECP256R1())
VAPID_PUBLIC = b64url(public_point(VAPID_KEY))
VAPID_RAW = b64url(VAPID_KEY.private_numbers().private_value.to_bytes(32, "big"))
VAPID_PEM = VAPID_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
).decode()
VAPID_SEC1_PEM = VAPID_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
).decode()
VAPID_DER = b64url(
    VAPID_KEY.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
)
SECRETS = (VAPID_RAW, VAPID_DER, VAPID_PEM.splitlines()[1])

# Keys of a browser subscription that is never called (for recipients refused before sending).
_OTHER = ec.generate_private_key(ec.SECP256R1())
KEYS = {"p256dh": b64url(public_point(_OTHER)), "auth": b64url(os.urandom(16))}


def settings(**kw: Any) -> WebPushSettings:
    values: dict[str, Any] = {
        "vapid_private_key": VAPID_RAW,
        "vapid_subject": SUBJECT,
        "allow_hosts": ["127.0.0.1"],
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
    }
    values.update(kw)
    return WebPushSettings(**values)


def intent(recipient: str, **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "order-shipped", "webpush", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "order-shipped",
        "rule": "order-shipped",
        "channel": "webpush",
        "recipient": recipient,
        "subject": "Your order has shipped",
        "body_text": "Order 1042 is on its way.",
        "data": {"order_id": "1042", "url": "/orders/1042"},
    }
    fields.update(kw)
    return NotificationIntent(**fields)


def assert_secret_free(result: DeliveryResult, sub: Subscriber | None = None) -> None:
    texts = [result.response, result.error_class, result.provider_message_id, repr(result)]
    forbidden = [*SECRETS] + ([b64url(sub.auth)] if sub else [])
    for text in texts:
        for secret in forbidden:
            assert secret not in (text or "")
        assert "eyJ" not in (text or "")  # no JWT (every JWT starts with a base64url '{"')


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def service() -> AsyncIterator[PushService]:
    async with PushService() as running:
        yield running


@pytest.fixture
async def connector() -> AsyncIterator[WebPushConnector]:
    conn = WebPushConnector(settings())
    yield conn
    await conn.aclose()


# -- outcomes -------------------------------------------------------------------------------------


# An absolute Retry-After date: the expected delay is measured when the test runs, not when
# the cases are built (collection can be minutes earlier on a loaded machine).
_RETRY_AT = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)


def _http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


@dataclass(frozen=True)
class Case:
    id: str
    answer: Answer | None = None  # what the subscription's push resource answers
    subscription: str = "live"  # live | unknown (404) | unsubscribed (410) | closed-port
    recipient: dict[str, Any] | str | None = None  # instead of the subscription
    body_text: str = "Order 1042 is on its way."
    read_timeout_s: float = 2.0
    outcome: Outcome = Outcome.SENT
    error_class: str | None = None
    response: str | None = None  # a part of the result's response
    retry_after: float | None = None
    message_id: str | None = "location"  # "location": the Location the service answered
    requests: int = 1
    delivered: int = 0


CASES = [
    Case("created-201", delivered=1),
    Case(
        "accepted-202",
        answer=Answer(202, {"Location": "http://127.0.0.1/m/queued-1"}),
        delivered=1,
    ),
    Case("ok-200-without-location", answer=Answer(200), message_id=None, delivered=1),
    Case(
        "unknown-subscription-404",
        subscription="unknown",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="404",
    ),
    Case(
        "unsubscribed-410",
        subscription="unsubscribed",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response='"errno": 106',
    ),
    Case(
        "too-large-413",
        answer=error(413, 104, "Payload Too Large", "Body is too large"),
        outcome=Outcome.REJECTED,
        error_class="PayloadTooLarge",
        response="413",
    ),
    Case(
        "rate-limited-429-seconds",
        answer=error(429, 116, "Too Many Requests", "Slow down", **{"Retry-After": "30"}),
        outcome=Outcome.RETRYABLE,
        error_class="RateLimited",
        response="429",
        retry_after=30,
    ),
    Case(
        "rate-limited-429-http-date",
        answer=error(
            429, 116, "Too Many Requests", "Slow", **{"Retry-After": _http_date(_RETRY_AT)}
        ),
        outcome=Outcome.RETRYABLE,
        error_class="RateLimited",
        retry_after=-1,  # until _RETRY_AT
    ),
    Case(
        "server-error-500",
        answer=error(500, 999, "Internal Server Error", "An unknown error occurred"),
        outcome=Outcome.RETRYABLE,
        error_class="HTTP500",
        response="500 Internal Server Error",
    ),
    Case(
        "unavailable-503-retry-after",
        answer=error(503, 202, "Service Unavailable", "Try later", **{"Retry-After": "7"}),
        outcome=Outcome.RETRYABLE,
        error_class="HTTP503",
        retry_after=7,
    ),
    Case(
        "bad-request-400",
        answer=error(400, 110, "Bad Request", "Invalid crypto keys specified"),
        outcome=Outcome.REJECTED,
        error_class="BadRequest",
        response="Invalid crypto keys",
    ),
    Case(
        "vapid-unauthorized-401",
        answer=replace(error(401, 109, "Unauthorized", "Invalid token"), echo_authorization=True),
        outcome=Outcome.RETRYABLE,
        error_class="VapidUnauthorized",
        response="[vapid-jwt]",  # the echoed JWT is redacted
    ),
    Case(
        "vapid-forbidden-403",
        answer=error(403, 109, "Forbidden", "Key mismatch"),
        outcome=Outcome.RETRYABLE,
        error_class="VapidForbidden",
    ),
    Case(
        "other-4xx-rejected",
        answer=error(422, 0, "Unprocessable Entity", "nope"),
        outcome=Outcome.REJECTED,
        error_class="HTTP422",
    ),
    Case(
        "moved-301-rejected",
        answer=Answer(301, {"Location": "https://push.example.com/new"}),
        outcome=Outcome.REJECTED,
        error_class="HTTP301",
        response="https://push.example.com/new",
    ),
    Case(
        "timeout",
        answer=Answer(201, delay_s=3.0),
        read_timeout_s=0.3,
        outcome=Outcome.RETRYABLE,
        error_class="ReadTimeout",
        delivered=1,  # the service took it but its answer came too late: a resend
        # carries the same Topic, replacing this copy if it is still undelivered
    ),
    Case(
        "connection-refused",
        subscription="closed-port",
        outcome=Outcome.RETRYABLE,
        error_class="ConnectError",
        requests=0,
    ),
    # Refused before any request (endpoints at forbidden addresses, ForbiddenAddress: in
    # test_ssrf.py, with every other guarded connector): ---------------------------------------
    *(
        Case(
            f"invalid-recipient-{name}",
            recipient=recipient,
            outcome=Outcome.REJECTED,
            error_class="InvalidRecipient",
            response=why,
            requests=0,
        )
        for name, recipient, why in [
            ("not-json", "ada@example.com", "not JSON"),
            ("json-array", "[]", "not a push subscription"),
            ("no-keys", {"endpoint": "https://push.example.com/x"}, "no keys"),
            ("no-endpoint", {"keys": KEYS}, "no endpoint"),
            ("no-auth", {"endpoint": "x", "keys": {"p256dh": KEYS["p256dh"]}}, "p256dh and auth"),
            (
                "p256dh-not-a-point",
                {"endpoint": "x", "keys": {**KEYS, "p256dh": b64url(b"\x04" + b"\x01" * 64)}},
                "not a point",
            ),
            (
                "p256dh-compressed",
                {"endpoint": "x", "keys": {**KEYS, "p256dh": b64url(b"\x02" + b"\x01" * 32)}},
                "uncompressed",
            ),
            ("auth-short", {"endpoint": "x", "keys": {**KEYS, "auth": b64url(b"12345")}}, "16"),
            ("auth-not-b64", {"endpoint": "x", "keys": {**KEYS, "auth": "***"}}, "base64url"),
            ("relative-endpoint", {"endpoint": "/wpush/x", "keys": KEYS}, "absolute"),
            ("ftp-endpoint", {"endpoint": "ftp://push.example.com/x", "keys": KEYS}, "absolute"),
            ("plain-http", {"endpoint": "http://push.example.com/x", "keys": KEYS}, "not https"),
            (
                "credentials",
                {"endpoint": "https://u:p@push.example.com/x", "keys": KEYS},
                "credentials",
            ),
        ]
    ),
    Case(
        "payload-too-large",
        body_text="x" * 4000,
        outcome=Outcome.REJECTED,
        error_class="PayloadTooLarge",
        response="3993",
        requests=0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(service: PushService, case: Case) -> None:
    sub = service.subscribe(VAPID_PUBLIC, case.answer)
    recipient = sub.subscription()
    if case.subscription == "unknown":
        recipient["endpoint"] = f"{service.origin}/wpush/v2/no-such-token"
    elif case.subscription == "unsubscribed":
        service.unsubscribe(sub)
    elif case.subscription == "closed-port":
        recipient["endpoint"] = f"http://127.0.0.1:{free_port()}/wpush/v2/{sub.token}"
    if case.recipient is not None:
        recipient = case.recipient  # type: ignore[assignment]
    text = recipient if isinstance(recipient, str) else json.dumps(recipient)
    sent = intent(text, body_text=case.body_text)

    connector = WebPushConnector(settings(read_timeout_s=case.read_timeout_s))
    try:
        result = await connector.send(sent)
    finally:
        await connector.aclose()

    assert result.outcome is case.outcome, result
    assert result.error_class == case.error_class, result
    if case.response is not None:
        assert result.response is not None and case.response in result.response, result
    if case.outcome is not Outcome.SENT:
        assert result.response
    if case.retry_after is None:
        assert result.retry_after is None
    else:
        expected = case.retry_after
        if expected == -1:
            expected = (_RETRY_AT - datetime.now(UTC)).total_seconds()
        assert result.retry_after == pytest.approx(expected, abs=5)
    assert_secret_free(result, sub)

    assert service.requests == case.requests
    assert service.refusals == []  # every request that reached it was a valid push message
    assert len(service.pushed) == case.delivered
    if case.delivered:
        [pushed] = service.pushed
        assert pushed.payload["notification_id"] == sent.notification_id
        if result.outcome is not Outcome.SENT:
            assert result.provider_message_id is None
        elif case.message_id == "location":
            assert result.provider_message_id == pushed.location is not None
        else:
            assert result.provider_message_id is None


# -- what the push service and the browser receive -----------------------------------------


async def test_the_request_a_push_service_receives(
    service: PushService, connector: WebPushConnector
) -> None:
    sub = service.subscribe(VAPID_PUBLIC)
    sent = intent(sub.recipient())
    before = time.time()
    result = await connector.send(sent)

    assert result.outcome is Outcome.SENT, result
    [pushed] = service.pushed
    # decrypted with the subscription's private key and auth secret: what the service
    # worker's push event gets
    assert pushed.payload == {
        "title": "Your order has shipped",
        "body": "Order 1042 is on its way.",
        "data": {"order_id": "1042", "url": "/orders/1042"},
        "notification_id": sent.notification_id,
    }
    assert pushed.vapid_key == VAPID_PUBLIC == connector.application_server_key
    assert pushed.claims["aud"] == service.origin
    assert pushed.claims["sub"] == SUBJECT
    assert before < pushed.claims["exp"] <= time.time() + 24 * 3600
    headers = pushed.headers
    assert headers["TTL"] == "86400"
    assert headers["Urgency"] == "normal"
    assert headers["Topic"] == topic_for(sent.notification_id)
    assert len(headers["Topic"]) <= 32
    assert headers["Content-Encoding"] == "aes128gcm"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Authorization"].startswith("vapid t=")
    assert result.provider_message_id == pushed.location


@pytest.mark.parametrize(
    ("data", "urgency"),
    [
        ({}, "normal"),
        ({"urgency": "high"}, "high"),
        ({"urgency": "HIGH"}, "high"),
        ({"urgency": "low"}, "low"),
        ({"urgency": "very-low"}, "very-low"),
        ({"urgency": "urgent!!"}, "normal"),
    ],
)
async def test_urgency_from_intent_data(
    service: PushService, connector: WebPushConnector, data: dict[str, str], urgency: str
) -> None:
    sub = service.subscribe(VAPID_PUBLIC)
    result = await connector.send(intent(sub.recipient(), data=data))
    assert result.outcome is Outcome.SENT, result
    [pushed] = service.pushed
    assert pushed.headers["Urgency"] == urgency
    assert pushed.payload["data"] == data


async def test_ttl_setting(service: PushService) -> None:
    sub = service.subscribe(VAPID_PUBLIC)
    connector = WebPushConnector(settings(ttl_s=0))
    try:
        assert (await connector.send(intent(sub.recipient()))).outcome is Outcome.SENT
    finally:
        await connector.aclose()
    assert service.pushed[0].headers["TTL"] == "0"


async def test_resends_share_a_topic_and_never_a_key(
    service: PushService, connector: WebPushConnector
) -> None:
    """Topic is Web Push's idempotency mechanism: a resend replaces a copy the service still
    holds. Every message still gets a fresh ECDH key and salt."""
    sub = service.subscribe(VAPID_PUBLIC)
    first = intent(sub.recipient())
    forced = intent(sub.recipient(), generation=1)
    other = intent(sub.recipient(), notification_id=notification_id("e-2", "r", "webpush", "x"))
    for sent in (first, first, forced, other):
        assert (await connector.send(sent)).outcome is Outcome.SENT

    topics = [p.headers["Topic"] for p in service.pushed]
    assert topics[0] == topics[1] == topics[2] == topic_for(first.notification_id)
    assert topics[3] == topic_for(other.notification_id) != topics[0]
    assert len({p.sender_key for p in service.pushed}) == 4
    assert all(len(p.sender_key) == 65 and p.sender_key[0] == 4 for p in service.pushed)


def test_payload_with_a_lone_surrogate_is_still_json() -> None:
    payload = build_payload(intent("{}", body_text="broken \ud800 text"))
    assert json.loads(payload)["body"] == "broken \ud800 text"


@pytest.mark.parametrize(
    ("endpoint", "audience"),
    [
        ("https://fcm.googleapis.com/fcm/send/abc", "https://fcm.googleapis.com"),
        (
            "https://Updates.Push.Services.Mozilla.com:443/wpush/v2/x",
            "https://updates.push.services.mozilla.com",
        ),
        ("https://8.8.8.8:8443/x", "https://8.8.8.8:8443"),
        ("https://[2001:4860:4860::8888]/x", "https://[2001:4860:4860::8888]"),
        ("http://127.0.0.1:8080/x", "http://127.0.0.1:8080"),  # allowlisted
    ],
)
def test_vapid_audience_is_the_endpoint_origin(endpoint: str, audience: str) -> None:
    assert check_endpoint(endpoint, AddressGuard(["127.0.0.1"])) == audience


def test_topic_fits_the_header_for_any_notification_id() -> None:
    for nid in (notification_id("e", "r", "webpush", "x"), "not-a-uuid", "z" * 500):
        topic = topic_for(nid)
        assert 1 <= len(topic) <= 32
        assert set(topic) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert topic == topic_for(nid)


async def test_payload_limit_is_exact(service: PushService, connector: WebPushConnector) -> None:
    """3993 bytes of JSON encrypt to exactly 4096 bytes; one byte more is refused unsent."""
    sub = service.subscribe(VAPID_PUBLIC)
    room = MAX_PAYLOAD_BYTES - len(build_payload(intent(sub.recipient(), body_text="")))
    fits = intent(sub.recipient(), body_text="é" * (room // 2) + "x" * (room % 2))  # bytes count
    assert len(build_payload(fits)) == MAX_PAYLOAD_BYTES
    too_big = intent(sub.recipient(), body_text=fits.body_text + "x")

    assert (await connector.send(fits)).outcome is Outcome.SENT
    refused = await connector.send(too_big)
    assert (refused.outcome, refused.error_class) == (Outcome.REJECTED, "PayloadTooLarge")
    assert service.requests == 1
    [pushed] = service.pushed
    assert pushed.body_bytes == 4096
    assert pushed.payload["body"] == fits.body_text


async def test_vapid_key_the_subscription_was_not_made_with(
    service: PushService, connector: WebPushConnector
) -> None:
    """RFC 8292 section 4.2: a push service answers 403 when k is not the key the
    subscription was created with. Retryable, so a key misconfiguration pauses the sink."""
    _, other_public = generate_vapid_key()
    sub = service.subscribe(other_public)
    result = await connector.send(intent(sub.recipient()))
    assert (result.outcome, result.error_class) == (Outcome.RETRYABLE, "VapidForbidden")
    assert result.response is not None and "does not match" in result.response
    assert service.refusals == ["vapid key mismatch"]
    assert_secret_free(result, sub)


async def test_concurrent_sends_share_a_client_and_a_token(
    service: PushService, connector: WebPushConnector
) -> None:
    subs = [service.subscribe(VAPID_PUBLIC) for _ in range(20)]
    results = await asyncio.gather(*(connector.send(intent(s.recipient())) for s in subs))
    assert all(r.outcome is Outcome.SENT for r in results), results
    assert sorted(p.token for p in service.pushed) == sorted(s.token for s in subs)
    assert len({p.headers["Authorization"] for p in service.pushed}) == 1  # JWT reused
    assert len({r.provider_message_id for r in results}) == 20


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [VAPID_RAW, VAPID_PEM, VAPID_SEC1_PEM, VAPID_PEM.replace("\n", "\\n"), VAPID_DER],
    ids=["raw-base64url", "pem-pkcs8", "pem-sec1", "pem-with-escaped-newlines", "der-base64url"],
)
async def test_vapid_key_formats(service: PushService, key: str) -> None:
    sub = service.subscribe(VAPID_PUBLIC)
    connector = WebPushConnector(settings(vapid_private_key=key))
    try:
        result = await connector.send(intent(sub.recipient()))
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert service.pushed[0].vapid_key == VAPID_PUBLIC


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vapid_private_key": None}, "HERALD_WEBPUSH_VAPID_PRIVATE_KEY is not set"),
        ({"vapid_private_key": "c2VjcmV0LW5vdC1hLWtleQ"}, "not a P-256 private key"),
        (
            {
                "vapid_private_key": ec.generate_private_key(ec.SECP384R1())
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                .decode()
            },
            "not a P-256 private key",
        ),
        ({"vapid_subject": ""}, "HERALD_WEBPUSH_VAPID_SUBJECT"),
        ({"vapid_subject": "ops@herald.localhost"}, "mailto:"),
    ],
    ids=["no-key", "not-a-key", "p384-key", "no-subject", "subject-without-scheme"],
)
def test_configuration_errors_name_the_setting(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        WebPushConnector(settings(**overrides))
    key = overrides.get("vapid_private_key")
    if key:  # the message never quotes the key
        assert (key.splitlines()[1] if key.startswith("-----") else key) not in str(raised.value)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_WEBPUSH_VAPID_PRIVATE_KEY", VAPID_RAW)
    monkeypatch.setenv("HERALD_WEBPUSH_VAPID_SUBJECT", "https://herald.example.com/contact")
    monkeypatch.setenv("HERALD_WEBPUSH_ALLOW_HOSTS", "127.0.0.1, Push.Local")
    monkeypatch.setenv("HERALD_WEBPUSH_TTL_S", "600")
    connector = WebPushConnector.from_env()
    assert connector.config.allow_hosts == ["127.0.0.1", "push.local"]
    assert connector.config.ttl_s == 600
    assert connector.application_server_key == VAPID_PUBLIC
    assert VAPID_RAW not in repr(connector.config)
    monkeypatch.setenv("HERALD_WEBPUSH_ALLOW_HOSTS", '["::1"]')
    assert WebPushSettings().allow_hosts == ["::1"]
    names = WebPushConnector.setting_names()
    assert "HERALD_WEBPUSH_VAPID_PRIVATE_KEY" in names
    assert "HERALD_WEBPUSH_ALLOW_HOSTS" in names


async def test_loopback_needs_the_allowlist(service: PushService) -> None:
    sub = service.subscribe(VAPID_PUBLIC)
    connector = WebPushConnector(settings(allow_hosts=[]))
    try:
        result = await connector.send(intent(sub.recipient()))
    finally:
        await connector.aclose()
    assert (result.outcome, result.error_class) == (Outcome.REJECTED, "InvalidRecipient")
    assert result.response is not None and "HERALD_WEBPUSH_ALLOW_HOSTS" in result.response
    assert service.requests == 0


def test_generated_keys_work_together() -> None:
    private, public = generate_vapid_key()
    connector = WebPushConnector(settings(vapid_private_key=private))
    assert connector.application_server_key == public
    assert len(base64.urlsafe_b64decode(public + "=")) == 65


def test_imports_without_its_optional_packages() -> None:
    """The module imports without http_ece and cryptography; building the connector then
    says how to install them."""
    code = (
        "import sys\n"
        "sys.modules['http_ece'] = None\n"
        "sys.modules['cryptography'] = None\n"
        "import connectors.webpush as w\n"
        "try:\n"
        "    w.WebPushConnector(w.WebPushSettings(vapid_private_key='x', vapid_subject='x'))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project_root(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "pip install 'herald[webpush]'" in run.stdout, run.stdout + run.stderr
