"""connectors.email.build_message: the bytes handed to the SMTP server."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest

from connectors.email import InvalidAddressError, build_message
from pipeline.records import NotificationIntent, notification_id
from tests.unit.unit_helpers import NOW

SENDER = "Herald <notifications@herald.localhost>"
DOMAIN = "herald.localhost"


def intent(**overrides: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "welcome-email", "email", "ada@example.com"),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "user-registered",
        "rule": "welcome-email",
        "channel": "email",
        "recipient": "ada@example.com",
        "subject": "Welcome to Herald, Ada!",
        "body_text": "Hi Ada, your account is ready.",
        "body_html": "<p>Hi Ada, your account is ready.</p>",
        "created_at": NOW,
    }
    fields.update(overrides)
    return NotificationIntent(**fields)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_multipart_alternative_with_text_and_html() -> None:
    i = intent()
    sender, recipient, data = build_message(i, SENDER, DOMAIN)
    assert sender == "notifications@herald.localhost"
    assert recipient == "ada@example.com"
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().replace("\r\n", "\n").rstrip("\n") == i.body_text
    assert parts[1].get_content().replace("\r\n", "\n").rstrip("\n") == i.body_html
    assert str(msg["Message-ID"]) == f"<{i.notification_id}@{DOMAIN}>"
    assert str(msg["To"]) == "ada@example.com"
    assert str(msg["From"]) == SENDER
    assert str(msg["Subject"]) == i.subject
    assert msg["X-Herald-Notification-Id"] == i.notification_id
    assert msg["X-Herald-Event-Type"] == "user-registered"
    assert msg["Date"].datetime == NOW.replace(microsecond=0)


def test_wire_format_uses_crlf_and_short_lines() -> None:
    long_body = "word " * 200
    _, _, data = build_message(intent(body_text=long_body, body_html=None), SENDER, DOMAIN)
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert parse(data).get_content().replace("\r\n", "\n").rstrip("\n") == long_body


def test_text_only_without_html() -> None:
    _, _, data = build_message(intent(body_html=None), SENDER, DOMAIN)
    msg = parse(data)
    assert msg.get_content_type() == "text/plain"
    assert not msg.is_multipart()


def test_message_id_follows_the_idempotency_key() -> None:
    redelivery = intent(generation=1)
    _, _, data = build_message(redelivery, SENDER, DOMAIN)
    message_id = str(parse(data)["Message-ID"])
    assert message_id == f"<{redelivery.idempotency_key}@{DOMAIN}>"
    assert redelivery.notification_id not in message_id


def test_same_intent_same_text_part() -> None:
    _, _, a = build_message(intent(body_html=None), SENDER, DOMAIN)
    _, _, b = build_message(intent(body_html=None), SENDER, DOMAIN)
    assert a == b


def test_plain_sender_address() -> None:
    sender, _, data = build_message(intent(), "noreply@example.org", DOMAIN)
    assert sender == "noreply@example.org"
    assert str(parse(data)["From"]) == "noreply@example.org"


@pytest.mark.parametrize(
    "subject",
    [
        "Willkommen bei Herald, Jürgen! 🎉",
        "Добро пожаловать в Herald — " * 5,
        "日本語の件名です",
        "Ünïcödé " + "x" * 120,
    ],
    ids=["german-emoji", "cyrillic-long", "japanese", "long-folded"],
)
def test_non_ascii_subject_round_trips(subject: str) -> None:
    subject = subject.strip()
    _, _, data = build_message(intent(subject=subject), SENDER, DOMAIN)
    data.decode("ascii")  # every header is encoded, the message is 7-bit clean
    assert str(parse(data)["Subject"]) == subject


def test_non_ascii_body_round_trips() -> None:
    text, html = "Grüße, Ada — 🎉", "<p>Grüße, Ada — 🎉</p>"
    _, _, data = build_message(intent(body_text=text, body_html=html), SENDER, DOMAIN)
    data.decode("ascii")
    text_part, html_part = parse(data).iter_parts()
    assert text_part.get_content().replace("\r\n", "\n").rstrip("\n") == text
    assert html_part.get_content().replace("\r\n", "\n").rstrip("\n") == html


INVALID_RECIPIENTS = [
    "ada@example.com\r\nBcc: victim@example.com",
    "ada@example.com\r\n",
    "ada@example.com\n",
    "\nada@example.com",
    "ada@exa\rmple.com",
    "Ada <ada@example.com>",
    "ada example@example.com",
    "ada@",
    "@example.com",
    "ada",
    "",
    "ada..lovelace@example.com",
    "ada@example..com",
    "ada@-example.com",
    "a" * 250 + "@example.com",
]


@pytest.mark.parametrize("recipient", INVALID_RECIPIENTS)
def test_invalid_recipient_is_refused(recipient: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        build_message(intent(recipient=recipient), SENDER, DOMAIN)
    assert "recipient" in str(info.value)


@pytest.mark.parametrize(
    "subject",
    ["Hi\r\nBcc: victim@example.com", "Hi\nthere", "Hi\r", "\n"],
    ids=["crlf-injection", "lf", "cr", "only-lf"],
)
def test_subject_with_cr_or_lf_is_refused(subject: str) -> None:
    with pytest.raises(InvalidAddressError, match="subject"):
        build_message(intent(subject=subject), SENDER, DOMAIN)


def test_invalid_sender_is_refused() -> None:
    with pytest.raises(InvalidAddressError, match="HERALD_EMAIL_FROM"):
        build_message(intent(), "Herald <not an address>", DOMAIN)


def test_missing_subject_is_an_empty_header() -> None:
    _, _, data = build_message(dataclasses.replace(intent(), subject=None), SENDER, DOMAIN)
    assert str(parse(data)["Subject"]) == ""
