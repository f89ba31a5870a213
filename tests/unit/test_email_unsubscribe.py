"""List-Unsubscribe and List-Unsubscribe-Post in the email connector's messages (RFC 2369,
RFC 8058), and which SMTP answers mean the mailbox is gone."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from connectors.email import InvalidAddressError, build_message, recipient_gone
from pipeline.people.unsubscribe import UnsubscribeLinks
from pipeline.records import (
    DATA_LIST_UNSUBSCRIBE_MAILTO,
    DATA_LIST_UNSUBSCRIBE_URL,
    NotificationIntent,
)

NOW = datetime(2026, 1, 2, tzinfo=UTC)


def message(data: dict[str, str], html: str | None = None) -> EmailMessage:
    intent = NotificationIntent(
        notification_id="d40ab731-58a4-5f6d-8703-a1e3dff179ec",
        event_id="aad43f09-8418-4575-854d-c2a2e5171ab5",
        event_type="newsletter",
        rule="news",
        channel="email",
        recipient="ada@example.com",
        subject="News",
        body_text="Hello",
        body_html=html,
        data=data,
        created_at=NOW,
    )
    _, _, raw = build_message(intent, "Herald <n@herald.localhost>", "herald.localhost")
    for line in raw.split(b"\r\n"):
        assert len(line) < 998
    # No encoded words: receivers read the URIs as they are.
    assert b"=?" not in raw.split(b"\r\n\r\n")[0]
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize("html", [None, "<p>Hello</p>"])
def test_both_headers_with_an_https_url_and_a_mailto(html: str | None) -> None:
    links = UnsubscribeLinks(b"k", "https://notify.example.com", "unsubscribe@example.com")
    data = links.data("u-1", "marketing", "email", NOW)
    m = message(data, html)
    url, mailto = data[DATA_LIST_UNSUBSCRIBE_URL], data[DATA_LIST_UNSUBSCRIBE_MAILTO]
    assert str(m["List-Unsubscribe"]) == f"<{url}>, <{mailto}>"
    assert str(m["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"


def test_a_mailto_alone_has_no_one_click_post() -> None:
    m = message({DATA_LIST_UNSUBSCRIBE_MAILTO: "mailto:u@example.com?subject=t"})
    assert str(m["List-Unsubscribe"]) == "<mailto:u@example.com?subject=t>"
    assert m["List-Unsubscribe-Post"] is None


def test_no_data_no_headers() -> None:
    m = message({"other": "x"})
    assert m["List-Unsubscribe"] is None and m["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(
    "data",
    [
        {DATA_LIST_UNSUBSCRIBE_URL: "https://x.example/u/t\r\nBcc: victim@example.com"},
        {DATA_LIST_UNSUBSCRIBE_URL: "https://x.example/u/t\nX: y"},
        {DATA_LIST_UNSUBSCRIBE_URL: "https://x.example/u/a>, <https://evil.example"},
        {DATA_LIST_UNSUBSCRIBE_URL: "http://x.example/u/plain-http"},
        {DATA_LIST_UNSUBSCRIBE_MAILTO: "https://not-a-mailto.example"},
        {DATA_LIST_UNSUBSCRIBE_URL: "https://x.example/u/" + "a" * 1000},
    ],
    ids=["crlf", "lf", "angle-brackets", "not-https", "not-mailto", "too-long"],
)
def test_unsafe_values_are_refused(data: dict[str, str]) -> None:
    with pytest.raises(InvalidAddressError):
        message(data)


@pytest.mark.parametrize(
    ("code", "text", "gone"),
    [
        (550, "5.1.1 Mailbox unavailable", True),
        (550, "5.1.1 <ada@example.com>: Recipient address rejected: User unknown", True),
        (550, "Requested action not taken: no such user here", True),
        (553, "5.1.2 Bad destination system address", True),
        (551, "5.1.6 User has moved", True),
        (556, "5.1.10 Recipient address has null MX", False),  # 556 is not in the list
        (550, "5.1.10 Recipient address has null MX", True),
        (550, "5.7.1 Message refused by policy", False),
        (552, "5.2.2 Mailbox full", False),
        (554, "5.7.1 Spam", False),
        (450, "4.1.1 Mailbox temporarily unavailable", False),
        (550, "", False),
    ],
)
def test_recipient_gone(code: int, text: str, gone: bool) -> None:
    assert recipient_gone(code, text) is gone
