"""The fast message builder must write what email.message.EmailMessage (SMTP policy) writes,
parsed back field by field: headers, structure and decoded bodies."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

import pytest

from connectors.email import build_message
from pipeline.records import NotificationIntent

CASES = [
    ("Welcome, Ada!", "Hi Ada.\nLine two.", None),
    ("Grüße aus Köln ✓", "Ünïcödé body — with a long line " + "x" * 200, "<p>Ünï</p>"),
    ("", "only text", None),
    ("Dots", ".leading dot\n..two\nend.", "<b>html</b>\n<i>two</i>"),
    ("Trailing spaces   ", "tab\tand trailing space \nlast", None),
]


@pytest.mark.parametrize(("subject", "text", "html"), CASES)
def test_builder_matches_emailmessage(subject: str, text: str, html: str | None) -> None:
    intent = NotificationIntent(
        notification_id="d40ab731-58a4-5f6d-8703-a1e3dff179ec",
        event_id="aad43f09-8418-4575-854d-c2a2e5171ab5",
        event_type="user-registered",
        rule="welcome-email",
        channel="email",
        recipient="ada@example.com",
        subject=subject,
        body_text=text,
        body_html=html,
        created_at=datetime(2026, 11, 27, 8, 0, tzinfo=UTC),
    )
    sender, rcpt, data = build_message(intent, "Herald <n@herald.localhost>", "herald.localhost")
    assert (sender, rcpt) == ("n@herald.localhost", "ada@example.com")

    ref = EmailMessage(policy=SMTP)
    ref["From"] = Address(display_name="Herald", addr_spec="n@herald.localhost")
    ref["To"] = "ada@example.com"
    ref["Subject"] = subject
    ref["Date"] = format_datetime(intent.created_at)
    ref["Message-ID"] = f"<{intent.idempotency_key}@herald.localhost>"
    ref.set_content(text, cte="quoted-printable")
    if html:
        ref.add_alternative(html, subtype="html", cte="quoted-printable")

    ours = email.message_from_bytes(data, policy=email.policy.default)
    theirs = email.message_from_bytes(ref.as_bytes(), policy=email.policy.default)
    for name in ("From", "To", "Subject", "Date", "Message-ID"):
        assert str(ours[name]) == str(theirs[name]), name
    assert ours.get_content_type() == theirs.get_content_type()
    for kind in ("plain", "html"):
        a, b = ours.get_body((kind,)), theirs.get_body((kind,))
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.get_content() == b.get_content()
            assert a["Content-Transfer-Encoding"] == b["Content-Transfer-Encoding"]
    assert data.count(b"\n") == data.count(b"\r\n")  # SMTP line endings only, no bare LF
