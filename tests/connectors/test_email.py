"""EmailConnector against real SMTP servers on loopback (aiosmtpd): outcomes per RFC 5321,
STARTTLS and implicit TLS with certificate verification (a private CA from trustme), AUTH,
and the connection pool."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from connectors.base import DeliveryResult, Outcome
from connectors.email import EmailConnector, EmailSettings
from devtools.procs import free_port
from devtools.smtp_catcher import SmtpCatcher
from pipeline.records import NotificationIntent, notification_id

SENDER = "Herald <notifications@herald.localhost>"
DOMAIN = "herald.localhost"
PASSWORD = "pw-Tr0ub4dor&3-never-log-me"  # noqa: S105 - a test credential


def settings(port: int, **kw: Any) -> EmailSettings:
    return EmailSettings(
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_timeout_s=5.0,
        email_from=SENDER,
        message_id_domain=DOMAIN,
        **kw,
    )


def intent(recipient: str = "ada@example.com", **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "welcome-email", "email", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "user-registered",
        "rule": "welcome-email",
        "channel": "email",
        "recipient": recipient,
        "subject": "Welcome to Herald, Ada!",
        "body_text": "Hi Ada, your account is ready.",
        "body_html": "<p>Hi Ada, your account is ready.</p>",
    }
    fields.update(kw)
    return NotificationIntent(**fields)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catcher_server() -> Iterator[SmtpCatcher]:
    with SmtpCatcher() as catcher:
        yield catcher


@pytest.fixture
def catcher(catcher_server: SmtpCatcher) -> SmtpCatcher:
    catcher_server.messages.clear()
    catcher_server.reject_recipients.clear()
    catcher_server.defer_recipients.clear()
    catcher_server.busy_recipients.clear()
    catcher_server.replies.clear()
    return catcher_server


@pytest.fixture(autouse=True)
async def clients(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[aiosmtplib.SMTP]]:
    """Every SMTP client the connector creates, to count connections and to check none is
    left open. Whatever a test leaves connected is closed afterwards (in the test's loop), so
    a leak fails only the test that checks for it, not a later one through a ResourceWarning."""
    created: list[aiosmtplib.SMTP] = []

    class Recording(aiosmtplib.SMTP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(aiosmtplib, "SMTP", Recording)
    yield created
    for client in created:
        if client.is_connected:
            client.close()
    await asyncio.sleep(0)


def open_connections(clients: list[aiosmtplib.SMTP]) -> list[aiosmtplib.SMTP]:
    return [c for c in clients if c.is_connected]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(ctx)
    return ctx


@dataclass
class Received:
    messages: list[Any] = field(default_factory=list)
    tls: list[bool] = field(default_factory=list)
    logins: list[tuple[str, bytes]] = field(default_factory=list)


class Handler:
    def __init__(self, received: Received) -> None:
        self.received = received

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.messages.append(envelope)
        self.received.tls.append(session.ssl is not None)
        return "250 2.0.0 Ok: queued"


def authenticator(received: Received) -> Any:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        received.logins.append((mechanism, data.login))
        ok = data.login == b"herald" and data.password == PASSWORD.encode()
        # handled=False: aiosmtpd answers (235, or 535 on failure) itself
        return AuthResult(success=ok, handled=False)

    return check


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    """Start an aiosmtpd Controller with the given options; stopped after the test."""
    started: list[Controller] = []

    def start(**kwargs: Any) -> tuple[int, Received]:
        received = Received()
        port = free_port()
        controller = Controller(Handler(received), hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        started.append(controller)
        return port, received

    yield start
    for controller in started:
        controller.stop()


# -- outcomes against the catcher -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    recipient: str = "ada@example.com"
    reject: bool = False
    defer: bool = False
    busy: bool = False
    reply: str | None = None  # the server's RCPT answer
    retry_after: float | None = None
    closed_port: bool = False
    outcome: Outcome = Outcome.SENT
    response: str | None = None
    error_class: str | None = None
    delivered: bool = False
    connects: bool = True


CASES = [
    Case("sent", delivered=True),
    Case(
        "rejected-550-5.1.1-mailbox-gone",
        reject=True,
        outcome=Outcome.REJECTED,
        response="550 5.1.1",
        error_class="RecipientGone",
    ),
    Case(
        "rejected-550-no-such-user-text",
        reply="550 Requested action not taken: no such user here",
        outcome=Outcome.REJECTED,
        response="no such user",
        error_class="RecipientGone",
    ),
    Case(
        "rejected-550-5.7.1-policy-is-not-gone",
        reply="550 5.7.1 Message refused by policy",
        outcome=Outcome.REJECTED,
        response="5.7.1",
        error_class="SMTPRecipientRefused",
    ),
    Case(
        "rejected-552-mailbox-full-is-not-gone",
        reply="552 5.2.2 Mailbox full",
        outcome=Outcome.REJECTED,
        response="5.2.2",
        error_class="SMTPRecipientRefused",
    ),
    Case(
        "deferred-451",
        defer=True,
        outcome=Outcome.RETRYABLE,
        response="451",
        error_class="SMTPRecipientRefused",
    ),
    Case(
        "busy-421-pauses-the-channel",
        busy=True,
        outcome=Outcome.RETRYABLE,
        response="421",
        retry_after=12.5,
    ),
    Case("server-down", closed_port=True, outcome=Outcome.RETRYABLE),
    Case(
        "invalid-address",
        recipient="not an address",
        outcome=Outcome.REJECTED,
        error_class="InvalidAddressError",
        connects=False,
    ),
    Case(
        "header-injection",
        recipient="ada@example.com\r\nBcc: victim@example.com",
        outcome=Outcome.REJECTED,
        error_class="InvalidAddressError",
        connects=False,
    ),
    Case(
        "trailing-newline",
        recipient="ada@example.com\n",
        outcome=Outcome.REJECTED,
        error_class="InvalidAddressError",
        connects=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(catcher: SmtpCatcher, clients: list[aiosmtplib.SMTP], case: Case) -> None:
    if case.reject:
        catcher.reject_recipients.add(case.recipient)
    if case.defer:
        catcher.defer_recipients.add(case.recipient)
    if case.busy:
        catcher.busy_recipients.add(case.recipient)
    if case.reply:
        catcher.replies[case.recipient] = case.reply
    port = free_port() if case.closed_port else catcher.port
    connector = EmailConnector(settings(port, smtp_busy_pause_s=12.5))
    sent = intent(case.recipient)
    try:
        result = await connector.send(sent)
    finally:
        await connector.aclose()

    assert result.outcome is case.outcome, result
    if case.response is not None:
        assert result.response is not None and case.response in result.response
    if case.error_class is not None:
        assert result.error_class == case.error_class
    if case.outcome is not Outcome.SENT:
        assert result.error_class and result.response
    assert result.retry_after == case.retry_after

    if case.delivered:
        assert result.provider_message_id == f"<{sent.notification_id}@{DOMAIN}>"
        [caught] = catcher.wait_for(1, timeout=5)
        assert caught.message_id == f"<{sent.notification_id}@{DOMAIN}>"
        assert str(caught.message["To"]) == case.recipient
        assert str(caught.message["Subject"]) == sent.subject
        assert caught.rcpt_tos == [case.recipient]
        assert caught.mail_from == "notifications@herald.localhost"
        assert caught.text_body().strip() == sent.body_text
        assert caught.message.get_content_type() == "multipart/alternative"
    else:
        assert catcher.messages == []

    assert len(clients) == (1 if case.connects else 0)
    assert open_connections(clients) == []


async def test_connection_is_reused(catcher: SmtpCatcher, clients: list[aiosmtplib.SMTP]) -> None:
    catcher.reject_recipients.add("gone@example.com")
    catcher.defer_recipients.add("later@example.com")
    connector = EmailConnector(settings(catcher.port))
    try:
        results = [
            await connector.send(intent(r))
            for r in ("a@example.com", "gone@example.com", "later@example.com", "b@example.com")
        ]
    finally:
        await connector.aclose()
    assert [r.outcome for r in results] == [
        Outcome.SENT,
        Outcome.REJECTED,
        Outcome.RETRYABLE,
        Outcome.SENT,
    ]
    assert len(clients) == 1  # refused recipients do not cost the session
    assert sorted(m.rcpt_tos[0] for m in catcher.wait_for(2, timeout=5)) == [
        "a@example.com",
        "b@example.com",
    ]
    assert open_connections(clients) == []


async def test_concurrent_sends_share_a_bounded_pool(
    catcher: SmtpCatcher, clients: list[aiosmtplib.SMTP]
) -> None:
    connector = EmailConnector(settings(catcher.port, smtp_connections=2))
    recipients = [f"user{i}@example.com" for i in range(12)]
    try:
        results = await asyncio.gather(*(connector.send(intent(r)) for r in recipients))
    finally:
        await connector.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert 1 <= len(clients) <= 2
    caught = catcher.wait_for(len(recipients), timeout=5)
    assert sorted(m.rcpt_tos[0] for m in caught) == sorted(recipients)
    assert len({m.message_id for m in caught}) == len(recipients)
    assert open_connections(clients) == []


async def test_redelivery_keeps_its_own_message_id(catcher: SmtpCatcher) -> None:
    first, again = intent(), intent(generation=1)
    connector = EmailConnector(settings(catcher.port))
    try:
        assert (await connector.send(first)).outcome is Outcome.SENT
        assert (await connector.send(first)).outcome is Outcome.SENT
        assert (await connector.send(again)).outcome is Outcome.SENT
    finally:
        await connector.aclose()
    ids = [m.message_id for m in catcher.wait_for(3, timeout=5)]
    assert ids[0] == ids[1] == f"<{first.notification_id}@{DOMAIN}>"
    assert ids[2] == f"<{again.idempotency_key}@{DOMAIN}>" != ids[0]


async def test_server_restarted_between_sends(clients: list[aiosmtplib.SMTP]) -> None:
    """A pooled connection the server dropped is not handed out again forever."""
    port = free_port()
    with SmtpCatcher(port=port) as first:
        connector = EmailConnector(settings(port))
        assert (await connector.send(intent())).outcome is Outcome.SENT
        first.wait_for(1, timeout=5)
    try:
        down = await connector.send(intent())
        assert down.outcome is Outcome.RETRYABLE
        with SmtpCatcher(port=port) as second:
            up = await connector.send(intent())
            assert up.outcome is Outcome.SENT, up
            assert len(second.wait_for(1, timeout=5)) == 1
    finally:
        await connector.aclose()
    assert open_connections(clients) == []


# -- TLS ------------------------------------------------------------------------------------------


async def test_starttls_with_private_ca(
    smtp_server: Any, ca: trustme.CA, ca_file: Path, clients: list[aiosmtplib.SMTP]
) -> None:
    port, received = smtp_server(tls_context=server_context(ca), require_starttls=True)
    connector = EmailConnector(settings(port, smtp_security="starttls", smtp_ca_file=ca_file))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert received.tls == [True]
    assert len(received.messages) == 1
    assert open_connections(clients) == []


@pytest.mark.parametrize(
    ("cert_names", "use_ca", "reason"),
    [
        ((), False, "CERTIFICATE_VERIFY_FAILED"),
        (("mail.example.com",), True, "mismatch"),
    ],
    ids=["default-trust-store", "wrong-hostname"],
)
async def test_starttls_verifies_the_certificate(
    smtp_server: Any,
    ca: trustme.CA,
    ca_file: Path,
    clients: list[aiosmtplib.SMTP],
    cert_names: tuple[str, ...],
    use_ca: bool,
    reason: str,
) -> None:
    port, received = smtp_server(tls_context=server_context(ca, *cert_names), require_starttls=True)
    extra: dict[str, Any] = {"smtp_ca_file": ca_file} if use_ca else {}
    connector = EmailConnector(settings(port, smtp_security="starttls", **extra))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE, result
    assert result.response is not None
    assert reason.lower() in result.response.lower()
    assert received.messages == []
    assert open_connections(clients) == []


async def test_implicit_tls_with_private_ca(
    smtp_server: Any, ca: trustme.CA, ca_file: Path, clients: list[aiosmtplib.SMTP]
) -> None:
    port, received = smtp_server(ssl_context=server_context(ca))
    connector = EmailConnector(settings(port, smtp_security="tls", smtp_ca_file=ca_file))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert len(received.messages) == 1
    assert open_connections(clients) == []


async def test_implicit_tls_without_the_ca_is_retryable(
    smtp_server: Any, ca: trustme.CA, clients: list[aiosmtplib.SMTP]
) -> None:
    port, received = smtp_server(ssl_context=server_context(ca))
    connector = EmailConnector(settings(port, smtp_security="tls"))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE, result
    assert "certificate" in (result.response or "").lower()
    assert received.messages == []
    assert open_connections(clients) == []


# -- AUTH -----------------------------------------------------------------------------------------


def _auth_server(smtp_server: Any, ca: trustme.CA | None = None) -> tuple[int, Received]:
    received = Received()
    kwargs: dict[str, Any] = {"authenticator": authenticator(received)}
    if ca is None:  # AUTH offered on a plain connection (not required: aiosmtpd warns)
        kwargs["auth_require_tls"] = False
    else:
        kwargs["tls_context"] = server_context(ca)
        kwargs["require_starttls"] = True
        kwargs["auth_required"] = True
    port, got = smtp_server(**kwargs)
    got.logins = received.logins
    return port, got


def _secret_free(result: DeliveryResult) -> None:
    for text in (result.response, result.error_class, repr(result), str(result)):
        assert PASSWORD not in (text or "")


async def test_auth_with_the_right_password(
    smtp_server: Any, clients: list[aiosmtplib.SMTP]
) -> None:
    port, received = _auth_server(smtp_server)
    connector = EmailConnector(settings(port, smtp_username="herald", smtp_password=PASSWORD))
    try:
        first = await connector.send(intent())
        second = await connector.send(intent("b@example.com"))
    finally:
        await connector.aclose()
    assert first.outcome is second.outcome is Outcome.SENT
    assert [login for _, login in received.logins] == [b"herald"]  # once per connection
    assert len(received.messages) == 2
    _secret_free(first)
    assert open_connections(clients) == []


async def test_auth_over_starttls(
    smtp_server: Any, ca: trustme.CA, ca_file: Path, clients: list[aiosmtplib.SMTP]
) -> None:
    port, received = _auth_server(smtp_server, ca)
    connector = EmailConnector(
        settings(
            port,
            smtp_security="starttls",
            smtp_ca_file=ca_file,
            smtp_username="herald",
            smtp_password=PASSWORD,
        )
    )
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert received.tls == [True]
    assert [login for _, login in received.logins] == [b"herald"]


async def test_auth_required_but_no_credentials(
    smtp_server: Any, ca: trustme.CA, ca_file: Path
) -> None:
    port, received = _auth_server(smtp_server, ca)
    connector = EmailConnector(settings(port, smtp_security="starttls", smtp_ca_file=ca_file))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is not Outcome.SENT
    assert received.messages == []


async def test_wrong_password_is_not_echoed(smtp_server: Any) -> None:
    port, received = _auth_server(smtp_server)
    wrong = PASSWORD + "-wrong"
    connector = EmailConnector(settings(port, smtp_username="herald", smtp_password=wrong))
    try:
        result = await connector.send(intent())
    finally:
        await connector.aclose()
    assert result.outcome is not Outcome.SENT
    assert result.response is not None and "535" in result.response
    _secret_free(result)
    for text in (result.response, result.error_class, repr(result)):
        assert wrong not in (text or "")
    assert received.messages == []
    # aiosmtplib tries each mechanism the server offers (PLAIN, then LOGIN)
    assert received.logins and {login for _, login in received.logins} == {b"herald"}


async def test_failed_login_does_not_leak_the_connection(
    smtp_server: Any, clients: list[aiosmtplib.SMTP]
) -> None:
    """The client connected before AUTH failed must be closed, not abandoned open."""
    port, _ = _auth_server(smtp_server)
    connector = EmailConnector(settings(port, smtp_username="herald", smtp_password=PASSWORD[::-1]))
    try:
        for _ in range(3):
            assert (await connector.send(intent())).outcome is not Outcome.SENT
    finally:
        await connector.aclose()
    assert len(clients) == 3
    assert open_connections(clients) == []
