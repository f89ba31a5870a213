"""Email over SMTP with aiosmtplib.

- STARTTLS or implicit TLS with certificate verification (``HERALD_SMTP_CA_FILE`` for a
  private CA), optional AUTH, a small pool of reused connections.
- multipart/alternative (text + HTML) when the intent has HTML.
- Message-ID is derived from the intent's idempotency key, so a resend after a crash carries
  the same Message-ID and a receiver can drop it (SMTP has an unavoidable duplicate window:
  RFC 1047).
- Outcomes follow RFC 5321: 4xx and lost connections are retryable, 5xx is rejected. A
  5xx that says the mailbox does not exist (enhanced status 5.1.1, 5.1.2, 5.1.6, 5.1.10, RFC
  3463, or "user unknown" and the like in the text) is rejected as ``RecipientGone``: the
  sink suppresses the address, and the router sends nothing more to it.
- List-Unsubscribe (RFC 2369) and List-Unsubscribe-Post (RFC 8058, one-click) when the
  router put the reserved data keys in the intent (``list_unsubscribe_url``, an https URL,
  and ``list_unsubscribe_mailto``, a mailto: URI).

The message is built once as bytes and handed to ``sendmail``: aiosmtplib's
``send_message`` re-flattens the EmailMessage on every call, which measured ~8x slower.

``build_message`` writes the bytes that ``EmailMessage(policy=SMTP)`` would write, without
building one: the header registry, content manager and generator cost ~1.5 ms per message
(measured: more than half of the email sink's CPU). Header values that the policy writes
unchanged (short printable ASCII) are written directly; every other value goes through the
policy's own header parsing and folding, and bodies through the same quoted-printable
encoder, so the output is byte for byte what EmailMessage produces (with a random MIME
boundary drawn the same way).
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import sys
from email import quoprimime
from email.headerregistry import Address
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

import aiosmtplib
from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.base import Connector, DeliveryResult
from pipeline.records import (
    DATA_LIST_UNSUBSCRIBE_MAILTO,
    DATA_LIST_UNSUBSCRIBE_URL,
    NotificationIntent,
)

__all__ = [
    "EmailConnector",
    "EmailSettings",
    "InvalidAddressError",
    "SmtpSecurity",
    "build_message",
    "list_unsubscribe",
    "recipient_gone",
]

# Deliberately plain: a local part and a dotted domain, no quoting, no CR/LF, no spaces.
_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)


class InvalidAddressError(ValueError):
    """A recipient or header value that must not reach an SMTP server."""


def _check_address(addr: str, what: str) -> str:
    if len(addr) > 254 or not _ADDRESS.fullmatch(addr) or ".." in addr:
        raise InvalidAddressError(f"{what} is not a valid email address")
    return addr


def _check_header(value: str, what: str) -> str:
    if "\r" in value or "\n" in value or len(value.splitlines()) > 1:
        raise InvalidAddressError(f"{what} contains a line break (CR, LF or another)")
    return value


# A URI inside <...> of List-Unsubscribe: printable ASCII without space, '<', '>' or ','.
_LIST_URI = re.compile(r"[\x21-\x7e]+")


def _list_uri(value: str, scheme: str, what: str) -> str:
    _check_header(value, what)
    if not _LIST_URI.fullmatch(value) or any(c in value for c in "<>,") or len(value) > 900:
        raise InvalidAddressError(f"{what} is not a URI that fits List-Unsubscribe")
    if not value.lower().startswith(scheme):
        raise InvalidAddressError(f"{what} must be a {scheme} URI")
    return value


def _list_headers(intent: NotificationIntent) -> bytes:
    """List-Unsubscribe written by hand: the policy would turn a URI longer than a line into
    RFC 2047 encoded words, which no receiver reads as a URI. Folded between the URIs (the
    one place RFC 2369 allows whitespace), each URI whole on its line (under 998 octets)."""
    out = b""
    for name, value in list_unsubscribe(intent):
        folded = value.replace(", ", ",\r\n ")
        out += f"{name}: {folded}\r\n".encode("ascii")
    return out


def list_unsubscribe(intent: NotificationIntent) -> list[tuple[str, str]]:
    """The List-Unsubscribe headers of an intent (none without the reserved data keys).
    List-Unsubscribe-Post only with an https URL (RFC 8058 section 3.1)."""
    url = intent.data.get(DATA_LIST_UNSUBSCRIBE_URL)
    mailto = intent.data.get(DATA_LIST_UNSUBSCRIBE_MAILTO)
    targets = []
    if url:
        targets.append(f"<{_list_uri(url, 'https://', DATA_LIST_UNSUBSCRIBE_URL)}>")
    if mailto:
        targets.append(f"<{_list_uri(mailto, 'mailto:', DATA_LIST_UNSUBSCRIBE_MAILTO)}>")
    if not targets:
        return []
    headers = [("List-Unsubscribe", ", ".join(targets))]
    if url:
        headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    return headers


# Values the SMTP policy writes exactly as given when the line fits (78 characters):
# printable ASCII words separated by single spaces, with no encoded-word opener ("=?").
_PLAIN = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
# Structured headers are parsed by the policy; these shapes come out of parsing unchanged.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_DOMAIN}")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_DOMAIN}@{_DOMAIN}>")
_PLAIN_DATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}"
)
_MAX_LINE = SMTP_POLICY.max_line_length or 78
_QP_HEADERS = b'; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
_TEXT_PART = b"Content-Type: text/plain" + _QP_HEADERS
_HTML_PART = b"Content-Type: text/html" + _QP_HEADERS + b"MIME-Version: 1.0\r\n"
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))  # as email.generator draws boundaries


def _header(name: str, value: str, plain: re.Pattern[str] = _PLAIN) -> bytes:
    """One header as the SMTP policy writes it: directly when the value is plain and the
    line short, else through the policy's parser and folder (which also refuses line
    breaks with ValueError)."""
    if len(name) + 2 + len(value) <= _MAX_LINE and "=?" not in value and plain.fullmatch(value):
        return f"{name}: {value}\r\n".encode("ascii")
    return SMTP_POLICY.fold_binary(name, SMTP_POLICY.header_store_parse(name, value)[1])


@lru_cache(maxsize=16)
def _sender(sender: str) -> tuple[str, bytes]:
    """(envelope sender, From header) for HERALD_EMAIL_FROM, parsed and folded once."""
    name, addr = parseaddr(sender)
    _check_address(addr, "HERALD_EMAIL_FROM")
    value = Address(display_name=name, addr_spec=addr) if name else addr
    return addr, SMTP_POLICY.fold_binary("From", SMTP_POLICY.header_store_parse("From", value)[1])


def _quoted_printable(text: str) -> bytes:
    """A text body as EmailMessage.set_content(text, cte="quoted-printable") encodes it and
    the generator writes it (CRLF line ends)."""
    lines = text.encode("utf-8").splitlines()
    encoded = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), _MAX_LINE)
    return encoded.replace("\n", "\r\n").encode("ascii")


def build_message(
    intent: NotificationIntent, sender: str, message_id_domain: str
) -> tuple[str, str, bytes]:
    """(envelope sender, recipient, message bytes) for an intent: multipart/alternative
    when it has HTML, text/plain otherwise, quoted-printable UTF-8. Raises
    InvalidAddressError for a recipient or header that is unsafe to send."""
    recipient = _check_address(intent.recipient, "recipient")
    sender_addr, from_header = _sender(sender)
    subject = _check_header(intent.subject or "", "subject")
    head = b"".join(
        (
            from_header,
            _header("To", recipient, _PLAIN_ADDRESS),
            _header("Subject", subject),
            _header("Date", format_datetime(intent.created_at), _PLAIN_DATE),
            _header(
                "Message-ID",
                f"<{intent.idempotency_key}@{message_id_domain}>",
                _PLAIN_MESSAGE_ID,
            ),
            _header("X-Herald-Notification-Id", intent.notification_id),
            _header("X-Herald-Event-Type", intent.event_type),
            _list_headers(intent),
        )
    )
    text = _quoted_printable(intent.body_text)
    if not intent.body_html:
        return sender_addr, recipient, head + _TEXT_PART + b"MIME-Version: 1.0\r\n\r\n" + text
    html = _quoted_printable(intent.body_html)
    # Quoted-printable escapes every "=", so no body line can look like this boundary.
    token = random.randrange(sys.maxsize)  # noqa: S311 - a MIME boundary, as email.generator
    b = f"==============={token:0{_BOUNDARY_DIGITS}d}==".encode("ascii")
    return (
        sender_addr,
        recipient,
        b"".join(
            (
                head,
                b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n",
                b' boundary="' + b + b'"\r\n\r\n--' + b + b"\r\n",
                _TEXT_PART + b"\r\n" + text,
                b"\r\n--" + b + b"\r\n",
                _HTML_PART + b"\r\n" + html,
                b"\r\n--" + b + b"--\r\n",
            )
        ),
    )


class SmtpSecurity(StrEnum):
    NONE = "none"  # plain SMTP: only for local catchers and tests
    STARTTLS = "starttls"
    TLS = "tls"  # implicit TLS (SMTPS, port 465)


class EmailSettings(BaseSettings):
    """The email connector's settings. Their names predate the per-connector classes and
    stay as they were: HERALD_SMTP_*, HERALD_EMAIL_FROM, HERALD_MESSAGE_ID_DOMAIN."""

    model_config = SettingsConfigDict(env_prefix="HERALD_", extra="ignore")

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_ca_file: Path | None = None
    smtp_timeout_s: float = 30.0
    # Connections kept open to the server, hence sends in flight at once. One connection
    # carries one message at a time and a message costs four round trips (MAIL, RCPT, DATA,
    # the data), so against a provider 50 ms away the sink sends about this many times
    # what one connection does (bench/results.md). Lower it for a server that limits
    # concurrent connections per client.
    smtp_connections: int = 16
    # An SMTP 421 (server busy or limiting us) pauses the email sink this long.
    smtp_busy_pause_s: float = 30.0
    email_from: str = "Herald <notifications@herald.localhost>"
    # Message-ID is <idempotency key@this domain>.
    message_id_domain: str = "herald.localhost"

    @field_validator("email_from")
    @classmethod
    def _sender_address(cls, value: str) -> str:
        """Checked when the sink starts, not on the first message it sends."""
        _check_header(value, "the sender")
        _name, addr = parseaddr(value)
        if not addr or not _ADDRESS.fullmatch(addr) or ".." in addr or len(addr) > 254:
            raise ValueError(
                "not a sender address: give 'name@example.com' or 'Name <name@example.com>'"
            )
        return value


class EmailConnector(Connector):
    channel = "email"
    max_body_bytes = 10 * 1024 * 1024
    settings_class = EmailSettings

    def __init__(self, settings: EmailSettings) -> None:
        self.settings = settings
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        # The sink runtime keeps at most this many sends in flight; the semaphore only keeps
        # the pool to that many connections when the connector is used on its own.
        self.max_concurrency = max(1, settings.smtp_connections)
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._tls_context: ssl.SSLContext | None = None
        if settings.smtp_security is not SmtpSecurity.NONE:
            self._tls_context = ssl.create_default_context(
                cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
            )

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            sender, recipient, data = build_message(
                intent, self.settings.email_from, self.settings.message_id_domain
            )
        except (InvalidAddressError, ValueError) as e:
            return DeliveryResult.rejected(type(e).__name__, str(e))
        async with self._slots:
            try:
                client = await self._client()
            except (aiosmtplib.SMTPException, OSError) as e:
                # Connecting, TLS or AUTH failed: a server or configuration problem, not
                # this message's. Retryable, so the circuit breaker pauses the sink instead
                # of dead-lettering every notification while it lasts.
                return DeliveryResult.retryable(type(e).__name__, _describe(e))
            try:
                errors, response = await client.sendmail(sender, [recipient], data)
            except aiosmtplib.SMTPRecipientsRefused as e:
                self._idle.put_nowait(client)  # the session is fine, the recipient was not
                return _failure(
                    e.recipients[0] if e.recipients else e, self.settings.smtp_busy_pause_s
                )
            except aiosmtplib.SMTPResponseException as e:
                await self._reset_or_drop(client)
                return _failure(e, self.settings.smtp_busy_pause_s)
            except (aiosmtplib.SMTPException, OSError) as e:
                await _drop(client)
                return _failure(e, self.settings.smtp_busy_pause_s)
            self._idle.put_nowait(client)
        if errors:  # a single recipient, so errors means it was refused
            code, message = next(iter(errors.values()))
            return _coded(code, message, "SMTPRecipientRefused", self.settings.smtp_busy_pause_s)
        return DeliveryResult.sent(
            response, f"<{intent.idempotency_key}@{self.settings.message_id_domain}>"
        )

    async def aclose(self) -> None:
        while not self._idle.empty():
            await _drop(self._idle.get_nowait())

    async def _client(self) -> aiosmtplib.SMTP:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            if client.is_connected:
                return client
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            use_tls=s.smtp_security is SmtpSecurity.TLS,
            start_tls=s.smtp_security is SmtpSecurity.STARTTLS,
            tls_context=self._tls_context,
            timeout=s.smtp_timeout_s,
        )
        await client.connect()
        if s.smtp_username:
            password = s.smtp_password.get_secret_value() if s.smtp_password else ""
            try:
                await client.login(s.smtp_username, password)
            except BaseException:
                await _drop(client)
                raise
        return client

    async def _reset_or_drop(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            await _drop(client)
        else:
            self._idle.put_nowait(client)


async def _drop(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


# RFC 3463 enhanced codes that say the address does not exist: bad destination mailbox,
# bad destination system, mailbox moved, no mail accepted (null MX, RFC 7505).
_GONE_CODES = frozenset({"5.1.1", "5.1.2", "5.1.6", "5.1.10"})
_GONE_TEXT = re.compile(
    r"no such (?:user|mailbox|recipient)|user unknown|unknown (?:user|recipient)|"
    r"mailbox (?:not found|does not exist)|recipient not found|address does not exist",
    re.IGNORECASE,
)


def recipient_gone(code: int, message: str) -> bool:
    """Whether an SMTP answer says the mailbox does not exist (a hard bounce), as opposed to
    another permanent refusal (policy, size, a full mailbox)."""
    if code not in (550, 551, 553):
        return False
    enhanced = message.split(maxsplit=1)[0] if message.strip() else ""
    return enhanced in _GONE_CODES or _GONE_TEXT.search(message) is not None


def _coded(code: int, message: str, error_class: str, busy_pause_s: float) -> DeliveryResult:
    response = f"{code} {message}".strip()
    if recipient_gone(code, message):
        return DeliveryResult.rejected("RecipientGone", response)
    if code == 421:
        # RFC 5321 421: the server is closing the channel (overloaded, or limiting our
        # rate). SMTP carries no retry-after: the sink pauses the channel for the setting's
        # time instead of hammering it.
        return DeliveryResult.retryable(error_class, response, retry_after=busy_pause_s)
    if 400 <= code < 500:
        return DeliveryResult.retryable(error_class, response)
    return DeliveryResult.rejected(error_class, response)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiosmtplib.SMTPResponseException):
        return f"{e.code} {e.message}".strip()
    return str(e) or type(e).__name__


def _failure(e: BaseException, busy_pause_s: float) -> DeliveryResult:
    """RFC 5321: 4xx is a transient failure, 5xx a permanent one. No answer at all
    (connection refused, dropped, timed out) is transient."""
    if isinstance(e, aiosmtplib.SMTPResponseException):
        return _coded(e.code, e.message, type(e).__name__, busy_pause_s)
    return DeliveryResult.retryable(type(e).__name__, str(e) or type(e).__name__)
