"""FcmConnector against a local server speaking FCM HTTP v1 and Google's OAuth 2 token
endpoint: the JWT-bearer grant (the server verifies the RS256 assertion with the service
account's public key), the bearer token it issued, FCM's real error bodies, token caching and
refresh, Retry-After, timeouts."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.base import Outcome
from connectors.fcm import SCOPE, FcmConnector, FcmSettings
from pipeline.records import NotificationIntent, notification_id
from tests.connectors.peers import BadToken, closed_port, serve_aiohttp, verify_jwt

PROJECT = "herald-test"
CLIENT_EMAIL = f"herald-sender@{PROJECT}.iam.gserviceaccount.com"
KEY_ID = "3f1e6c2b9a7d4e5f8a0b1c2d3e4f5a6b7c8d9e0f"
DEVICE = "fGw2P6H0SkOqWlZ0x3Yb1c:APA91bHk3RNwTe3H0CI2k_HHwgIpoDKCIZvvDMExUdFQ3P1"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
UNAUTHENTICATED = {
    "error": {
        "code": 401,
        "message": "Request had invalid authentication credentials. Expected OAuth 2 access "
        "token, login cookie or other valid authentication credential. See "
        "https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "status": "UNAUTHENTICATED",
    }
}


def fcm_error(http: int, status: str, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": http, "message": message, "status": status}
    if code is not None:
        error["details"] = [{"@type": FCM_ERROR, "errorCode": code}]
    return {"error": error}


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def service_account(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, **kw: Any) -> str:
    doc = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": KEY_ID,
        "private_key": pem(key),
        "client_email": CLIENT_EMAIL,
        "client_id": "109876543210987654321",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    doc.update(kw)
    return json.dumps(doc)


def intent(recipient: str = DEVICE, **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "order-shipped", "fcm", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "order-shipped",
        "rule": "order-shipped",
        "channel": "fcm",
        "recipient": recipient,
        "subject": "Your order is on its way",
        "body_text": "Order 1042 left the warehouse.",
        "data": {"order_id": "1042", "deep_link": "herald://orders/1042"},
    }
    fields.update(kw)
    return NotificationIntent(**fields)


# -- the provider ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class FakeGoogle:
    """Google's token endpoint and FCM's messages:send, on one server."""

    public_key: rsa.RSAPublicKey
    token_uri: str = ""  # the aud the assertions must carry; set once the server runs
    expires_in: int = 3599
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    token_answer: Answer | None = None
    issued: set[str] = field(default_factory=set)
    sends: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)  # by device token
    reject_every_bearer: bool = False
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/v1/projects/{project}/messages:send", self.send)
        return app

    def revoke_all(self) -> None:
        self.issued.clear()

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        if self.token_answer is not None:
            a = self.token_answer
            await asyncio.sleep(a.delay)
            if isinstance(a.body, str):
                return web.Response(status=a.status, text=a.body, content_type="text/html")
            return web.json_response(a.body, status=a.status)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response(
                {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"},
                status=400,
            )
        try:
            header, claims = verify_jwt(form.get("assertion", ""), self.public_key)
        except BadToken:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                status=400,
            )
        now = time.time()
        problems = [
            header.get("kid") != KEY_ID and "kid",
            claims.get("iss") != CLIENT_EMAIL and "iss",
            claims.get("scope") != SCOPE and "scope",
            claims.get("aud") != self.token_uri and "aud",
            not abs(claims.get("iat", 0) - now) < 60 and "iat",
            not 0 < claims.get("exp", 0) - claims.get("iat", 0) <= 3600 and "exp",
        ]
        if any(problems):
            return web.json_response(
                {
                    "error": "invalid_grant",
                    "error_description": f"Invalid JWT: {[p for p in problems if p]}",
                },
                status=400,
            )
        token = "ya29." + secrets.token_urlsafe(32)
        self.issued.add(token)
        return web.json_response(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    async def send(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        bearer = auth.removeprefix("Bearer ")
        if not auth.startswith("Bearer ") or bearer not in self.issued or self.reject_every_bearer:
            self.sends.append({"bearer": bearer, "body": None})
            return web.json_response(
                UNAUTHENTICATED,
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )
        body = await request.json()
        self.sends.append({"bearer": bearer, "body": body})
        if request.match_info["project"] != PROJECT:
            return web.json_response(
                fcm_error(404, "NOT_FOUND", "Requested entity was not found."), status=404
            )
        message = body["message"]
        if not all(isinstance(v, str) for v in message.get("data", {}).values()):
            return web.json_response(
                fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data'"), status=400
            )
        answer = self.answers.get(message["token"])
        if answer is not None:
            await asyncio.sleep(answer.delay)
            if isinstance(answer.body, str):
                return web.Response(
                    status=answer.status,
                    text=answer.body,
                    headers=answer.headers,
                    content_type="text/html",
                )
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        return web.json_response({"name": f"projects/{PROJECT}/messages/0:{next(self._ids)}"})


@pytest.fixture
async def google(rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[tuple[FakeGoogle, str]]:
    fake = FakeGoogle(rsa_key.public_key())
    async with serve_aiohttp(fake.app()) as url:
        fake.token_uri = f"{url}/token"
        yield fake, url


def settings(
    url: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, **kw: Any
) -> FcmSettings:
    values: dict[str, Any] = {
        "base_url": url,
        "service_account_json": service_account(key),
        "token_uri": f"{url}/token",
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
    }
    values.update(kw)
    return FcmSettings(**values)


# -- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    answer: Answer | None = None
    recipient: str = DEVICE
    outcome: Outcome = Outcome.SENT
    error_class: str | None = None
    response: str | None = None
    retry_after: float | None = None
    sends: int = 1
    token_requests: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    closed_port: bool = False


CASES = [
    Case("sent", response=f"200 projects/{PROJECT}/messages/0:1"),
    Case(
        "unregistered",
        Answer(404, fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")),
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="404 UNREGISTERED",
    ),
    Case(
        "invalid-argument",
        Answer(
            400,
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
            ),
        ),
        outcome=Outcome.REJECTED,
        error_class="InvalidArgument",
        response="not a valid FCM registration token",
    ),
    Case(
        "sender-id-mismatch",
        Answer(403, fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")),
        outcome=Outcome.REJECTED,
        error_class="SenderIdMismatch",
    ),
    Case(
        "third-party-auth-is-not-our-token",
        Answer(
            401,
            fcm_error(
                401,
                "UNAUTHENTICATED",
                "Auth error from APNS or Web Push Service",
                "THIRD_PARTY_AUTH_ERROR",
            ),
        ),
        outcome=Outcome.REJECTED,
        error_class="ThirdPartyAuthError",
    ),
    Case(
        "quota-exceeded",
        Answer(
            429,
            fcm_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Send requests'",
                "QUOTA_EXCEEDED",
            ),
            headers={"Retry-After": "42"},
        ),
        outcome=Outcome.RETRYABLE,
        error_class="QuotaExceeded",
        retry_after=42,
    ),
    Case(
        "unavailable",
        Answer(
            503,
            fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
            headers={"Retry-After": "5"},
        ),
        outcome=Outcome.RETRYABLE,
        error_class="Unavailable",
        retry_after=5,
    ),
    Case(
        "internal",
        Answer(500, fcm_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL")),
        outcome=Outcome.RETRYABLE,
        error_class="Internal",
    ),
    Case(
        "permission-denied-is-configuration",
        Answer(
            403,
            fcm_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'cloudmessaging.messages.create' denied on resource",
            ),
        ),
        outcome=Outcome.RETRYABLE,
        error_class="PermissionDenied",
    ),
    Case(
        "unknown-project",
        config={"project_id": "another-project"},
        outcome=Outcome.REJECTED,
        error_class="NotFound",
        response="404 NOT_FOUND",
    ),
    Case(
        "gateway-html-502",
        Answer(502, "<html><body>Bad Gateway</body></html>"),
        outcome=Outcome.RETRYABLE,
        error_class="HTTP502",
    ),
    Case(
        "malformed-200-is-sent",
        Answer(200, "<html>ok</html>"),
        response="unreadable body",
    ),
    Case(
        "timeout",
        Answer(200, {"name": "projects/p/messages/late"}, delay=1.5),
        outcome=Outcome.RETRYABLE,
        error_class="ReadTimeout",
        config={"read_timeout_s": 0.3},
    ),
    Case(
        "connection-refused",
        closed_port=True,
        outcome=Outcome.RETRYABLE,
        error_class="TokenRequestFailed",
        response="ConnectError",
        sends=0,
        token_requests=0,
    ),
    Case(
        "empty-token",
        recipient="",
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        sends=0,
        token_requests=0,
    ),
    Case(
        "token-with-spaces",
        recipient="not a token",
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        sends=0,
        token_requests=0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey, case: Case
) -> None:
    fake, url = google
    if case.answer is not None:
        fake.answers[case.recipient] = case.answer
    if case.closed_port:
        url = f"http://127.0.0.1:{closed_port()}"
    connector = FcmConnector(settings(url, rsa_key, **case.config))
    sent = intent(case.recipient)
    try:
        result = await connector.send(sent)
    finally:
        await connector.aclose()

    assert result.outcome is case.outcome, result
    if case.error_class is not None:
        assert result.error_class == case.error_class, result
    if case.response is not None:
        assert case.response in (result.response or ""), result
    assert result.retry_after == case.retry_after
    if case.outcome is not Outcome.SENT:
        assert result.error_class and result.response
        assert result.provider_message_id is None
    elif case.answer is None:
        assert result.provider_message_id == f"projects/{PROJECT}/messages/0:1"
    assert len(fake.token_requests) == case.token_requests
    assert len(fake.sends) == case.sends
    for send in fake.sends:
        assert send["bearer"] in fake.issued
        assert send["body"] == {
            "message": {
                "token": case.recipient,
                "notification": {"title": sent.subject, "body": sent.body_text},
                "data": {**sent.data, "notification_id": sent.notification_id},
            }
        }
    assert "PRIVATE KEY" not in repr(result) and "ya29." not in repr(result)


async def test_without_a_subject_there_is_no_title(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    fake, url = google
    connector = FcmConnector(settings(url, rsa_key))
    try:
        result = await connector.send(intent(subject=None, data={}))
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    [send] = fake.sends
    assert send["body"]["message"]["notification"] == {"body": "Order 1042 left the warehouse."}
    assert set(send["body"]["message"]["data"]) == {"notification_id"}


# -- the access token -----------------------------------------------------------------------


async def test_the_token_is_fetched_once_and_shared(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    fake, url = google
    connector = FcmConnector(settings(url, rsa_key))
    try:
        first = await connector.send(intent())
        many = await asyncio.gather(*(connector.send(intent(f"{DEVICE}-{i}")) for i in range(20)))
    finally:
        await connector.aclose()
    assert first.outcome is Outcome.SENT
    assert all(r.outcome is Outcome.SENT for r in many)
    assert len(fake.token_requests) == 1
    assert len({s["bearer"] for s in fake.sends}) == 1
    assert len({r.provider_message_id for r in [first, *many]}) == 21


async def test_concurrent_first_sends_fetch_one_token(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    fake, url = google
    connector = FcmConnector(settings(url, rsa_key))
    try:
        results = await asyncio.gather(
            *(connector.send(intent(f"{DEVICE}-{i}")) for i in range(10))
        )
    finally:
        await connector.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert len(fake.token_requests) == 1


async def test_a_revoked_token_is_replaced_once(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    fake, url = google
    connector = FcmConnector(settings(url, rsa_key))
    try:
        assert (await connector.send(intent())).outcome is Outcome.SENT
        fake.revoke_all()
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert len(fake.token_requests) == 2
    assert [s["body"] is not None for s in fake.sends] == [True, False, True]


async def test_401_after_a_fresh_token_is_retryable(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    """Our credentials do not work for FCM: retryable, so the breaker pauses the channel."""
    fake, url = google
    fake.reject_every_bearer = True
    connector = FcmConnector(settings(url, rsa_key))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "Unauthenticated"
    assert len(fake.token_requests) == 2  # one refresh, not a loop
    assert len(fake.sends) == 2


async def test_a_token_near_its_end_is_refreshed(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    fake, url = google
    fake.expires_in = 1
    connector = FcmConnector(settings(url, rsa_key))
    try:
        assert (await connector.send(intent())).outcome is Outcome.SENT
        await asyncio.sleep(0.6)  # past expires_in minus the margin
        assert (await connector.send(intent())).outcome is Outcome.SENT
    finally:
        await connector.aclose()
    assert len(fake.token_requests) == 2
    assert fake.sends[0]["bearer"] != fake.sends[1]["bearer"]


async def test_a_key_google_does_not_know_is_retryable_and_not_echoed(
    google: tuple[FakeGoogle, str],
) -> None:
    fake, url = google
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    connector = FcmConnector(settings(url, other))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "TokenRequestFailed"
    assert result.response == "token endpoint 400 invalid_grant: Invalid JWT Signature."
    assert fake.sends == []
    assert len(fake.token_requests) == 1
    assert fake.token_requests[0]["assertion"] not in repr(result)


@pytest.mark.parametrize(
    ("answer", "response"),
    [
        (Answer(500, {"error": "internal_failure"}), "token endpoint 500 internal_failure"),
        (Answer(200, {"token_type": "Bearer"}), "token endpoint 200 without an access_token"),
        (Answer(200, "<html></html>"), "token endpoint 200 without an access_token"),
    ],
    ids=["500", "no-access-token", "not-json"],
)
async def test_token_endpoint_failures_are_retryable(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey, answer: Answer, response: str
) -> None:
    fake, url = google
    fake.token_answer = answer
    connector = FcmConnector(settings(url, rsa_key))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "TokenRequestFailed"
    assert result.response == response
    assert fake.sends == []


async def test_waiting_sends_share_a_failed_token_request(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey
) -> None:
    """A token endpoint that is down costs one request, not one per waiting send; the next
    send after the failure tries again."""
    fake, url = google
    fake.token_answer = Answer(503, {"error": "unavailable"}, delay=0.2)
    connector = FcmConnector(settings(url, rsa_key))
    try:
        results = await asyncio.gather(*(connector.send(intent(f"{DEVICE}-{i}")) for i in range(8)))
        assert len(fake.token_requests) == 1
        fake.token_answer = None
        later = await connector.send(intent())
    finally:
        await connector.aclose()
    assert {r.outcome for r in results} == {Outcome.RETRYABLE}
    assert {r.response for r in results} == {"token endpoint 503 unavailable"}
    assert later.outcome is Outcome.SENT, later
    assert len(fake.token_requests) == 2


async def test_the_key_files_token_uri_is_the_default(
    google: tuple[FakeGoogle, str], rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    fake, url = google
    key_file = tmp_path / "service-account.json"
    key_file.write_text(service_account(rsa_key, token_uri=fake.token_uri))
    connector = FcmConnector(
        FcmSettings(base_url=url, service_account_file=key_file, read_timeout_s=2.0)
    )
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert len(fake.token_requests) == 1


# -- configuration --------------------------------------------------------------------------


def test_a_configuration_that_cannot_send_fails_at_startup(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    url = "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="HERALD_FCM_SERVICE_ACCOUNT_JSON"):
        FcmConnector(FcmSettings(base_url=url))
    with pytest.raises(ValueError, match="not a JSON document"):
        FcmConnector(FcmSettings(service_account_json="{not json"))
    with pytest.raises(ValueError, match="has no client_email"):
        FcmConnector(settings(url, rsa_key, service_account_json='{"private_key": "x"}'))
    with pytest.raises(ValueError, match="cannot be read"):
        FcmConnector(FcmSettings(service_account_file=tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="has no project_id") as no_project:
        FcmConnector(
            settings(url, rsa_key, service_account_json=service_account(rsa_key, project_id=""))
        )
    assert "PRIVATE KEY" not in str(no_project.value)
    garbled = service_account(rsa_key).replace("MII", "XYZ")
    with pytest.raises(ValueError, match="not an unencrypted PEM key") as bad:
        FcmConnector(settings(url, rsa_key, service_account_json=garbled))
    assert "XYZ" not in str(bad.value)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not an RSA key"):
        FcmConnector(settings(url, ec_key))


def test_from_env_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey
) -> None:
    monkeypatch.setenv("HERALD_FCM_SERVICE_ACCOUNT_JSON", service_account(rsa_key))
    monkeypatch.setenv("HERALD_FCM_PROJECT_ID", "overridden")
    connector = FcmConnector.from_env()
    assert connector.account.project_id == "overridden"
    assert connector.account.token_uri == "https://oauth2.googleapis.com/token"  # noqa: S105
    assert connector.account.client_email == CLIENT_EMAIL
    assert "PRIVATE KEY" not in repr(connector.account) + repr(connector.config)
    assert "HERALD_FCM_SERVICE_ACCOUNT_JSON" in FcmConnector.setting_names()


def test_the_assertion(rsa_key: rsa.RSAPrivateKey) -> None:
    connector = FcmConnector(settings("http://127.0.0.1:9", rsa_key))
    header, claims = verify_jwt(connector.assertion(now=1_700_000_000), rsa_key.public_key())
    assert header == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
    assert claims == {
        "iss": CLIENT_EMAIL,
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": "http://127.0.0.1:9/token",
        "iat": 1_700_000_000,
        "exp": 1_700_003_600,
    }
