"""SmsConnector against a local server speaking the Twilio Messages API: basic auth, the form
fields, the idempotency header, Twilio's real error bodies, Retry-After, timeouts; and the
GSM-7 / UCS-2 segment arithmetic on its own."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from connectors.base import Outcome
from connectors.sms import SmsConnector, SmsSettings, sms_encoding
from pipeline.records import NotificationIntent, notification_id
from tests.connectors.peers import closed_port, serve_aiohttp

ACCOUNT_SID = "AC" + "5ef8732a3c49700934481addd5ce1659"[:32]
AUTH_TOKEN = "tw-auth-t0ken-never-log-me"  # noqa: S105 - a test credential
FROM = "+14155550000"


def intent(recipient: str = "+14155550100", **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "login-code", "sms", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "login-requested",
        "rule": "login-code",
        "channel": "sms",
        "recipient": recipient,
        "body_text": "Your Herald code is 123456.",
    }
    fields.update(kw)
    return NotificationIntent(**fields)


def settings(base_url: str, **kw: Any) -> SmsSettings:
    values: dict[str, Any] = {
        "base_url": base_url,
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": FROM,
        "default_region": "US",
        "allow_hosts": ["127.0.0.1"],  # the local provider (the SSRF guard refuses loopback)
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
    }
    values.update(kw)
    return SmsSettings(**values)


# -- the provider ---------------------------------------------------------------------------


def twilio_error(code: int, message: str, status: int) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


@dataclass
class Answer:
    """What the fake answers for one recipient instead of creating the message."""

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
class FakeTwilio:
    """The Messages resource: checks auth and the form as Twilio does, creates one message
    per idempotency token (a repeat gets the same message back), answers ``answers`` for
    chosen recipients."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    _sids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.messages)
        return app

    async def messages(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response(
                {
                    **twilio_error(20003, "Authenticate", 401),
                    "detail": "Your AccountSid or AuthToken was incorrect.",
                },
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
        if request.match_info["sid"] != ACCOUNT_SID:
            return web.json_response(
                twilio_error(20404, "The requested resource was not found", 404), status=404
            )
        assert request.content_type == "application/x-www-form-urlencoded"
        form = {k: str(v) for k, v in (await request.post()).items()}
        token = request.headers.get("I-Twilio-Idempotency-Token")
        self.requests.append({"form": form, "token": token, "headers": dict(request.headers)})
        if "To" not in form:
            return web.json_response(
                twilio_error(21604, "A 'To' phone number is required.", 400), status=400
            )
        if not form.get("Body"):
            return web.json_response(
                twilio_error(21602, "Message body is required.", 400), status=400
            )
        if "From" not in form and "MessagingServiceSid" not in form:
            return web.json_response(
                twilio_error(
                    21603, "A 'From' or 'MessagingServiceSid' parameter is required.", 400
                ),
                status=400,
            )
        answer = self.answers.get(form["To"])
        if answer is not None:
            await asyncio.sleep(answer.delay)
            if isinstance(answer.body, str):
                return web.Response(
                    status=answer.status,
                    text=answer.body,
                    headers=answer.response_headers(),
                    content_type="text/html",
                )
            return web.json_response(
                answer.body, status=answer.status, headers=answer.response_headers()
            )
        if token is not None and token in self.created:
            return web.json_response(self.created[token], status=201)
        sid = f"SM{next(self._sids):032x}"
        now = format_datetime(datetime.now(UTC), usegmt=True)
        message = {
            "account_sid": ACCOUNT_SID,
            "api_version": "2010-04-01",
            "body": form["Body"],
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if "MessagingServiceSid" in form else "queued",
            "to": form["To"],
            "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json",
        }
        if token is not None:
            self.created[token] = message
        return web.json_response(message, status=201)


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[FakeTwilio, str]]:
    fake = FakeTwilio()
    async with serve_aiohttp(fake.app()) as url:
        yield fake, url


# -- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    recipient: str = "+14155550100"
    body: str = "Your Herald code is 123456."
    answer: Answer | None = None
    outcome: Outcome = Outcome.SENT
    error_class: str | None = None
    response: str | None = None  # a part of the response text
    retry_after: tuple[float, float] | None = None  # bounds
    to: str | None = None  # the E.164 number the server must have seen
    requests: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    closed_port: bool = False


CASES = [
    Case("sent", response="(gsm7, 1 segment)", to="+14155550100"),
    Case("national-number", recipient="(415) 555-0101", to="+14155550101"),
    Case(
        "national-number-gb",
        recipient="07911 123456",
        to="+447911123456",
        config={"default_region": "GB"},
    ),
    Case("gsm7-extended-chars", body="€" * 81, response="(gsm7, 2 segments)"),
    Case("ucs2", body="Привет, Ада! " * 6, response="(ucs2, 2 segments)"),
    Case("emoji-counts-two", body="😀" * 35, response="(ucs2, 1 segment)"),
    Case(
        "messaging-service",
        config={"from_number": None, "messaging_service_sid": "MG" + "1" * 32},
        response="accepted",
    ),
    Case(
        "invalid-number-21211",
        recipient="+14155550102",
        answer=Answer(400, twilio_error(21211, "Invalid 'To' Phone Number: +14155550102", 400)),
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        response="21211",
    ),
    Case(
        "not-mobile-21614",
        recipient="+14155550103",
        answer=Answer(400, twilio_error(21614, "'To' number is not a valid mobile number", 400)),
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        response="not a valid mobile number",
    ),
    Case(
        "unsubscribed-21610",
        recipient="+14155550104",
        answer=Answer(400, twilio_error(21610, "Attempt to send to unsubscribed recipient", 400)),
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="21610",
    ),
    Case(
        "region-not-enabled-21408",
        recipient="+14155550105",
        answer=Answer(
            400,
            twilio_error(
                21408,
                "Permission to send an SMS has not been enabled for the region indicated by "
                "the 'To' number: +14155550105",
                400,
            ),
        ),
        outcome=Outcome.REJECTED,
        error_class="Twilio21408",
    ),
    Case(
        "invalid-from-21212",
        recipient="+14155550106",
        answer=Answer(
            400,
            twilio_error(
                21212,
                "The 'From' number +14155550000 is not a valid phone number, shortcode, or "
                "alphanumeric sender ID.",
                400,
            ),
        ),
        outcome=Outcome.RETRYABLE,
        error_class="InvalidFromNumber",
    ),
    Case(
        "too-many-requests-20429",
        recipient="+14155550107",
        answer=Answer(
            429, twilio_error(20429, "Too Many Requests", 429), headers={"Retry-After": "7"}
        ),
        outcome=Outcome.RETRYABLE,
        error_class="Twilio20429",
        retry_after=(7, 7),
    ),
    Case(
        "retry-after-http-date",
        recipient="+14155550108",
        answer=Answer(429, twilio_error(20429, "Too Many Requests", 429), retry_after_date=30),
        outcome=Outcome.RETRYABLE,
        retry_after=(25, 30),
    ),
    Case(
        "server-error-500",
        recipient="+14155550109",
        answer=Answer(500, twilio_error(20500, "An internal server error has occurred", 500)),
        outcome=Outcome.RETRYABLE,
        error_class="Twilio20500",
        response="500 20500",
    ),
    Case(
        "gateway-html-503",
        recipient="+14155550110",
        answer=Answer(503, "<html><body>Service Unavailable</body></html>"),
        outcome=Outcome.RETRYABLE,
        error_class="HTTP503",
    ),
    Case(
        "malformed-201-is-sent",
        recipient="+14155550111",
        answer=Answer(201, "<html>created</html>"),
        outcome=Outcome.SENT,
        response="unreadable body",
    ),
    Case(
        "timeout",
        recipient="+14155550112",
        answer=Answer(201, {"sid": "SMlate", "status": "queued"}, delay=1.5),
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
        "not-a-number",
        recipient="call me maybe",
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        requests=0,
    ),
    Case(
        "too-short",
        recipient="+1 415 555 01",
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        requests=0,
    ),
    Case(
        "national-without-region",
        recipient="(415) 555-0101",
        config={"default_region": None},
        outcome=Outcome.REJECTED,
        error_class="InvalidRecipient",
        requests=0,
    ),
    Case("empty-body", body="", outcome=Outcome.REJECTED, error_class="InvalidPayload", requests=0),
    Case(
        "body-over-1600",
        body="a" * 1601,
        outcome=Outcome.REJECTED,
        error_class="PayloadTooLarge",
        requests=0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(twilio: tuple[FakeTwilio, str], case: Case) -> None:
    fake, url = twilio
    if case.answer is not None:
        fake.answers[case.recipient] = case.answer
    if case.closed_port:
        url = f"http://127.0.0.1:{closed_port()}"
    connector = SmsConnector(settings(url, **case.config))
    sent = intent(case.recipient, body_text=case.body)
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
    elif case.outcome is Outcome.RETRYABLE:
        assert result.retry_after is None
    if case.outcome is not Outcome.SENT:
        assert result.error_class and result.response
        assert result.provider_message_id is None
    assert AUTH_TOKEN not in repr(result)

    assert len(fake.requests) == case.requests
    if case.requests:
        [request] = fake.requests
        assert request["token"] == sent.idempotency_key
        assert request["form"]["Body"] == case.body
        if case.to is not None:
            assert request["form"]["To"] == case.to
    if case.outcome is Outcome.SENT and case.answer is None:
        [message] = fake.created.values()
        assert result.provider_message_id == message["sid"]
        assert result.response and result.response.startswith(f"{message['status']} SM")


async def test_the_form_twilio_receives(twilio: tuple[FakeTwilio, str]) -> None:
    fake, url = twilio
    connector = SmsConnector(settings(url))
    try:
        result = await connector.send(intent("+1 (415) 555-0100"))
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    [request] = fake.requests
    assert request["form"] == {
        "To": "+14155550100",
        "From": FROM,
        "Body": "Your Herald code is 123456.",
    }
    assert request["headers"]["Accept"] == "application/json"
    assert AUTH_TOKEN not in json.dumps(request["form"])


async def test_wrong_credentials_pause_instead_of_rejecting(
    twilio: tuple[FakeTwilio, str],
) -> None:
    """Twilio 20003 fails every message alike: retryable, so the breaker opens."""
    fake, url = twilio
    wrong = AUTH_TOKEN + "-old"
    connector = SmsConnector(settings(url, auth_token=wrong))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE
    assert result.error_class == "AuthenticationFailed"
    assert "20003" in (result.response or "")
    assert wrong not in repr(result) and AUTH_TOKEN not in repr(result)
    assert fake.requests == []  # refused before the form was read


async def test_a_resend_carries_the_same_idempotency_token(
    twilio: tuple[FakeTwilio, str],
) -> None:
    fake, url = twilio
    first, forced = intent(), intent(generation=1)
    connector = SmsConnector(settings(url))
    try:
        results = [await connector.send(i) for i in (first, first, forced)]
    finally:
        await connector.aclose()
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    tokens = [r["token"] for r in fake.requests]
    assert tokens == [first.notification_id, first.notification_id, forced.idempotency_key]
    assert forced.idempotency_key != first.notification_id
    # the fake deduplicates on the token as a provider honouring it would
    assert results[0].provider_message_id == results[1].provider_message_id
    assert results[2].provider_message_id != results[0].provider_message_id
    assert len(fake.created) == 2


async def test_concurrent_sends_share_one_client(twilio: tuple[FakeTwilio, str]) -> None:
    fake, url = twilio
    connector = SmsConnector(settings(url))
    numbers = [f"+1415555{i:04d}" for i in range(200, 220)]
    try:
        results = await asyncio.gather(*(connector.send(intent(n)) for n in numbers))
    finally:
        await connector.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert sorted(r["form"]["To"] for r in fake.requests) == numbers
    assert len({r.provider_message_id for r in results}) == len(numbers)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"account_sid": ""}, "HERALD_SMS_ACCOUNT_SID"),
        ({"auth_token": ""}, "HERALD_SMS_AUTH_TOKEN"),
        ({"from_number": None}, "HERALD_SMS_FROM_NUMBER"),
    ],
    ids=["no-account", "no-token", "no-sender"],
)
def test_a_configuration_that_cannot_send_fails_at_startup(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SmsConnector(settings("http://127.0.0.1:9", **config))


def test_from_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SMS_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("HERALD_SMS_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("HERALD_SMS_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("HERALD_SMS_MESSAGING_SERVICE_SID", "MG" + "2" * 32)
    monkeypatch.setenv("HERALD_SMS_DEFAULT_REGION", "GB")
    connector = SmsConnector.from_env()
    assert connector.config.default_region == "GB"
    assert connector.config.auth_token.get_secret_value() == AUTH_TOKEN
    assert AUTH_TOKEN not in repr(connector.config)
    assert "HERALD_SMS_AUTH_TOKEN" in SmsConnector.setting_names()


# -- segments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("a" * 160, "gsm7", 160, 1),
        ("a" * 161, "gsm7", 161, 2),
        ("a" * 306, "gsm7", 306, 2),
        ("a" * 307, "gsm7", 307, 3),
        ("€" * 80, "gsm7", 160, 1),  # extension table: two septets each
        ("€" * 81, "gsm7", 162, 2),
        ("{[]}|~^\\\f", "gsm7", 18, 1),
        ("a" * 152 + "€" + "a" * 7, "gsm7", 161, 2),
        ("a" * 152 + "€" * 77, "gsm7", 306, 3),  # an escape pair is never split: 152 a | 76 € | 1 €
        ("é à ü Ñ ß Δ Ω £ ¥ ¿ ¡ § @ $", "gsm7", 27, 1),
        ("ç", "ucs2", 1, 1),  # lower-case c cedilla is not in GSM 03.38
        ("a" * 70 + "ā", "ucs2", 71, 2),
        ("ā" * 70, "ucs2", 70, 1),
        ("ā" * 134, "ucs2", 134, 2),
        ("ā" * 135, "ucs2", 135, 3),
        ("😀" * 35, "ucs2", 70, 1),  # UTF-16 surrogate pairs
        ("😀" * 36, "ucs2", 72, 2),
        ("ā" * 66 + "😀", "ucs2", 68, 1),
        ("ā" * 66 + "😀" + "ā" * 3, "ucs2", 71, 2),
        ("\x1b", "ucs2", 1, 1),  # ESC is not a character of the alphabet
    ],
)
def test_sms_encoding(text: str, encoding: str, units: int, segments: int) -> None:
    assert sms_encoding(text) == (encoding, units, segments)
