"""Dead-letter records and the header text they carry."""

from __future__ import annotations

from datetime import datetime

import pytest

from pipeline import headers as h
from pipeline.deadletter import dead_letter, safe_header_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("line one\r\nline two\nthree\rfour", "line one line two three four"),
        ("x\r\nBcc: victim@example.com\r\n", "x Bcc: victim@example.com"),
        ("  tabs\tand   spaces  ", "tabs and spaces"),
        ("a\u2028b\x0bc\x0cd\x85e", "a b c d e"),
        ("", ""),
    ],
    ids=["plain", "crlf", "injection", "whitespace", "unicode-breaks", "empty"],
)
def test_safe_header_text_is_one_line(text: str, expected: str) -> None:
    assert safe_header_text(text) == expected


def test_safe_header_text_caps_length() -> None:
    capped = safe_header_text("x" * 5000)
    assert len(capped) == 1000
    assert capped.endswith("…")
    assert safe_header_text("y" * 1000) == "y" * 1000
    short = safe_header_text("abc\ndefghij", limit=5)
    assert short == "abc …"
    assert len(short) == 5


def test_safe_header_text_caps_after_joining_lines() -> None:
    text = "\n".join(["word"] * 1000)
    out = safe_header_text(text, limit=50)
    assert len(out) == 50
    assert "\n" not in out


def test_dead_letter_headers() -> None:
    error = ValueError("bad\r\nthing")
    dl = dead_letter(
        "events.dlq",
        key=b"k",
        value=b"v",
        headers=[("custom", b"1"), (h.ERROR_CLASS, b"Stale")],
        topic="events.user",
        partition=3,
        offset=99,
        error=error,
        attempts=4,
    )
    assert (dl.topic, dl.key, dl.value) == ("events.dlq", b"k", b"v")
    hd = h.as_dict(dl.headers)
    assert hd["custom"] == "1"
    assert hd[h.ORIGINAL_TOPIC] == "events.user"
    assert hd[h.ORIGINAL_PARTITION] == "3"
    assert hd[h.ORIGINAL_OFFSET] == "99"
    assert hd[h.ERROR_CLASS] == "ValueError"
    assert hd[h.ERROR_MESSAGE] == "bad thing"
    assert hd[h.ATTEMPTS] == "4"
    assert datetime.fromisoformat(hd[h.FAILED_AT]).tzinfo is not None
    assert [k for k, _ in dl.headers].count(h.ERROR_CLASS) == 1


def test_dead_letter_error_class_override() -> None:
    dl = dead_letter(
        "notifications.email.dlq",
        key=None,
        value=None,
        headers=None,
        topic="notifications.email",
        partition=0,
        offset=0,
        error=RuntimeError("550"),
        error_class="SMTPRecipientRefused",
    )
    assert h.as_dict(dl.headers)[h.ERROR_CLASS] == "SMTPRecipientRefused"
