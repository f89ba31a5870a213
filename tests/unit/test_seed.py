"""The seed service's request onto a direct notification: every receiver form, every content
form, templates, and what each bad input is refused with (table-driven)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.router.templates import Templates
from pipeline.seed import UNRESOLVABLE_RECEIVER, UnresolvableReceiver, to_direct
from pipeline.service import InvalidRequest
from tests.unit.unit_helpers import TEMPLATES_DIR, write_template

CHANNELS = ["apns", "email", "fcm", "slack", "sms", "webhook", "webpush"]
SUBSCRIPTION = {"endpoint": "https://push.example.com/x", "keys": {"p256dh": "k", "auth": "a"}}

ACCEPTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "email, string content",
        {"receiver": "ada@example.com", "content": "Your code: 123456"},
        {"channel": "email", "recipient": "ada@example.com", "body_text": "Your code: 123456"},
    ),
    (
        "E.164, string content",
        {"receiver": "+447911123456", "content": "Your code: 123456"},
        {"channel": "sms", "recipient": "+447911123456", "body_text": "Your code: 123456"},
    ),
    (
        "a phone number with separators is made compact",
        {"receiver": " +44 (7911) 123-456 ", "content": "hi"},
        {"channel": "sms", "recipient": "+447911123456", "body_text": "hi"},
    ),
    (
        "object content with subject and html",
        {
            "receiver": "ada@example.com",
            "content": {"text": "Hi", "subject": "Hello", "html": "<p>Hi</p>"},
        },
        {
            "channel": "email",
            "recipient": "ada@example.com",
            "body_text": "Hi",
            "subject": "Hello",
            "body_html": "<p>Hi</p>",
        },
    ),
    (
        "a receiver object names the channel",
        {
            "receiver": {"channel": "webhook", "address": "https://hooks.example.com/x"},
            "content": {"text": "deployed"},
        },
        {"channel": "webhook", "recipient": "https://hooks.example.com/x", "body_text": "deployed"},
    ),
    (
        "a structured address is passed on as compact JSON",
        {"receiver": {"channel": "webpush", "address": SUBSCRIPTION}, "content": "hi"},
        {
            "channel": "webpush",
            "recipient": '{"endpoint":"https://push.example.com/x","keys":{"p256dh":"k","auth":"a"}}',
            "body_text": "hi",
        },
    ),
    (
        "content.channel says what a string receiver is",
        {
            "receiver": "https://hooks.example.com/x",
            "content": {"text": "hi", "channel": "webhook"},
        },
        {"channel": "webhook", "recipient": "https://hooks.example.com/x", "body_text": "hi"},
    ),
    (
        "content.channel agreeing with the receiver",
        {"receiver": "ada@example.com", "content": {"text": "hi", "channel": "email"}},
        {"channel": "email", "recipient": "ada@example.com", "body_text": "hi"},
    ),
    (
        "a template, its variables from data and the receiver",
        {
            "receiver": "ada@example.com",
            "content": {"template": "welcome", "data": {"display_name": "Ada", "email": "x"}},
        },
        {
            "channel": "email",
            "recipient": "ada@example.com",
            "subject": "Welcome to Herald, Ada!",
            "body_text": "Hi Ada, your account is ready.\n\n"
            "You signed up with x. If that wasn't you, reply to this message.",
            "body_html": "<p>Hi Ada, your account is ready.</p>\n"
            "<p>You signed up with x. If that wasn't you, reply to this message.</p>",
        },
    ),
]


@pytest.mark.parametrize(
    ("body", "direct"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED]
)
def test_accepted_forms(body: dict[str, Any], direct: dict[str, Any]) -> None:
    assert to_direct(body, CHANNELS, Templates(TEMPLATES_DIR)) == direct


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, body, the field named, a piece of the message)
    ("no receiver", {"content": "hi"}, "receiver", "receiver is required"),
    ("null receiver", {"receiver": None, "content": "hi"}, "receiver", "receiver is required"),
    ("a list receiver", {"receiver": ["a"], "content": "hi"}, "receiver", "receiver must be"),
    ("no content", {"receiver": "ada@example.com"}, "content", "content is required"),
    ("numeric content", {"receiver": "ada@example.com", "content": 7}, "content", "a string"),
    ("empty text", {"receiver": "ada@example.com", "content": ""}, "content.text", "required"),
    (
        "no text",
        {"receiver": "ada@example.com", "content": {"subject": "s"}},
        "content.text",
        "content.text is required",
    ),
    (
        "a subject that is not text",
        {"receiver": "ada@example.com", "content": {"text": "t", "subject": 1}},
        "content.subject",
        "must be a string",
    ),
    ("not E.164", {"receiver": "+44 abc", "content": "hi"}, "receiver", "not an E.164"),
    ("too many digits", {"receiver": "+1234567890123456", "content": "hi"}, "receiver", "E.164"),
    (
        "a receiver object without its channel",
        {"receiver": {"address": "https://x"}, "content": "hi"},
        "receiver.channel",
        "receiver.channel is required",
    ),
    (
        "a receiver object without an address",
        {"receiver": {"channel": "webhook"}, "content": "hi"},
        "receiver.address",
        "receiver.address is required",
    ),
    (
        "a channel nobody serves",
        {"receiver": {"channel": "fax", "address": "+1555"}, "content": "hi"},
        "receiver.channel",
        "no installed connector serves",
    ),
    (
        "content.channel contradicting the receiver",
        {"receiver": "ada@example.com", "content": {"text": "hi", "channel": "sms"}},
        "content.channel",
        "contradicts",
    ),
    (
        "an unknown template",
        {"receiver": "ada@example.com", "content": {"template": "nope"}},
        "content.template",
        "no template 'nope'",
    ),
    (
        "a template name that is a path",
        {"receiver": "ada@example.com", "content": {"template": "../etc"}},
        "content.template",
        "a template's name",
    ),
    (
        "a template variable missing",
        {"receiver": "ada@example.com", "content": {"template": "welcome"}},
        "content.template",
        "'display_name' is undefined",
    ),
]


@pytest.mark.parametrize(
    ("body", "field", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused_forms_name_the_field(body: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_direct(body, CHANNELS, Templates(TEMPLATES_DIR))
    assert not isinstance(info.value, UnresolvableReceiver), info.value
    assert info.value.fields == [field]
    assert message in info.value.detail


@pytest.mark.parametrize("receiver", ["u-42", "42", 42, "ada@", "Ada Lovelace"])
def test_a_subscriber_id_is_not_resolvable_yet(receiver: Any) -> None:
    with pytest.raises(UnresolvableReceiver) as info:
        to_direct({"receiver": receiver, "content": "hi"}, CHANNELS, Templates(TEMPLATES_DIR))
    e = info.value
    assert e.problem_type == UNRESOLVABLE_RECEIVER
    assert e.fields == ["receiver"]
    assert "subscriber ids cannot be resolved yet" in e.detail
    assert "an email address, an E.164 phone number" in e.detail
    assert '{"channel": "webhook", "address": "https://..."}' in e.detail


def test_an_inferred_channel_must_be_installed() -> None:
    with pytest.raises(InvalidRequest) as info:
        to_direct({"receiver": "+447911123456", "content": "hi"}, ["email"], Templates(Path()))
    assert info.value.fields == ["receiver"]
    assert "receiver is a phone number, for channel 'sms'" in info.value.detail


def test_template_context_and_subject_fallback(tmp_path: Path) -> None:
    write_template(
        tmp_path, "layout", body_txt="{{ text }} -- sent to {{ receiver }} by {{ channel }}"
    )
    direct = to_direct(
        {
            "receiver": "ada@example.com",
            "content": {"template": "layout", "text": "Hi", "subject": "S", "data": {"text": "x"}},
        },
        CHANNELS,
        Templates(tmp_path),
    )
    assert direct == {
        "channel": "email",
        "recipient": "ada@example.com",
        "subject": "S",  # the template has no subject.txt
        "body_text": "Hi -- sent to ada@example.com by email",  # text wins over data's
    }
