"""``POST /api/notification``: the seed service's request, unchanged, onto Herald's direct
notifications. Existing callers keep sending ``{"receiver": ..., "content": ...}``; this
module turns that body into the fields of ``POST /v1/notifications`` (channel, recipient,
subject, body_text, body_html), and everything after that (auth, Idempotency-Key, limits,
traceparent, the answer) is the direct path's.

``receiver``, one of:

- an email address (``ada@example.com``): channel ``email``;
- a phone number in E.164 (``+447911123456``; spaces, dots, dashes and parentheses after
  the ``+`` are dropped): channel ``sms``;
- an object naming the channel: ``{"channel": "webhook", "address": "https://..."}``, any
  installed channel, the address passed on as it is (a JSON object, such as a Web Push
  subscription, as compact JSON);
- any other string, when the content names its channel (``"content": {"channel":
  "webhook", ...}``): the address for that channel, as it is;
- anything else, a plain id such as ``"u-42"`` or ``42``, is a subscriber id, which Herald
  cannot resolve yet (it has no subscribers): 422 with the problem type
  ``tag:herald,2025:problems/unresolvable-receiver`` saying which forms are accepted.

``content``, one of:

- a string: the text body, no subject;
- an object: ``text`` (the text body), optional ``subject``, ``html``, ``channel`` (the
  channel of a string receiver; with an email, phone or object receiver it must agree), and
  ``template`` with optional ``data``. Other members are ignored.

A ``template`` names a directory under HERALD_TEMPLATES_DIR (``config/templates/<name>/``:
``subject.txt``, ``body.txt``, optional ``body.html``), rendered like the router's templates
(sandboxed Jinja2, an undefined variable is an error) with the members of ``data`` and
``receiver``, ``channel``, ``text`` and ``subject`` (when given; these four win over members
of ``data`` of the same name) as variables. Its subject, text and HTML replace the content's;
the content's ``subject`` is used when the template has no ``subject.txt``.

The answer is the direct path's plus the channel chosen:
``{"notification_id": ..., "status": "accepted", "channel": "email"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.router.templates import Rendered, TemplateRenderError, Templates
from pipeline.service import InvalidRequest

__all__ = ["UNRESOLVABLE_RECEIVER", "UnresolvableReceiver", "to_direct"]

UNRESOLVABLE_RECEIVER = "tag:herald,2025:problems/unresolvable-receiver"

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_PHONE_SEPARATORS = re.compile(r"[\s().-]")
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_RECEIVER_FORMS = (
    "an email address, an E.164 phone number (+447911123456) or an object naming the channel "
    '({"channel": "webhook", "address": "https://..."})'
)


class UnresolvableReceiver(InvalidRequest):
    """A receiver that names a subscriber rather than an address: Herald has no subscribers
    to resolve it against yet."""

    problem_type = UNRESOLVABLE_RECEIVER


@dataclass(frozen=True)
class _Receiver:
    channel: str | None  # None: a string the content's channel must say what it is
    address: str
    form: str  # what the caller sent, for messages: "an email address", "receiver.channel"


def _invalid(detail: str, *fields: str) -> InvalidRequest:
    return InvalidRequest("Invalid Notification", detail, list(fields))


def _receiver(value: Any) -> _Receiver:
    if isinstance(value, Mapping):
        channel, address = value.get("channel"), value.get("address")
        if isinstance(address, Mapping):  # a structured address: a push subscription
            address = json.dumps(address, separators=(",", ":"), ensure_ascii=False)
        problems = []
        if not (isinstance(channel, str) and channel):
            problems.append(("receiver.channel", "receiver.channel is required (a string)"))
        if not (isinstance(address, str) and address):
            problems.append(("receiver.address", "receiver.address is required (a string)"))
        if problems:
            raise _invalid("; ".join(m for _, m in problems), *(f for f, _ in problems))
        return _Receiver(str(channel), str(address), "receiver.channel")
    if isinstance(value, bool) or value is None or value == "":
        raise _invalid(f"receiver is required: {_RECEIVER_FORMS}", "receiver")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        raise _unresolvable(str(value))
    if not isinstance(value, str):
        raise _invalid(f"receiver must be {_RECEIVER_FORMS}", "receiver")
    text = value.strip()
    if text.startswith("+"):
        number = _PHONE_SEPARATORS.sub("", text)
        if not _E164.fullmatch(number):
            raise _invalid(
                f"receiver {text!r} is not an E.164 phone number (+, country code and "
                "number, at most 15 digits, e.g. +447911123456)",
                "receiver",
            )
        return _Receiver("sms", number, "a phone number")
    if _EMAIL.fullmatch(text):
        return _Receiver("email", text, "an email address")
    return _Receiver(None, text, "content.channel")


def _unresolvable(receiver: str) -> UnresolvableReceiver:
    return UnresolvableReceiver(
        "Unresolvable Receiver",
        f"receiver {receiver!r} is not an address: subscriber ids cannot be resolved yet "
        f"(Herald has no subscribers). The receiver must be {_RECEIVER_FORMS}, or a string "
        'with the content naming its channel ({"text": ..., "channel": "webhook"})',
        ["receiver"],
    )


def _channel(receiver: _Receiver, content: Mapping[str, Any], channels: Sequence[str]) -> str:
    named = content.get("channel")
    if named is not None and (not isinstance(named, str) or not named):
        raise _invalid("content.channel must be a channel name", "content.channel")
    if receiver.channel is None:
        if named is None:
            raise _unresolvable(receiver.address)
        channel = named
    elif named is not None and named != receiver.channel:
        raise _invalid(
            f"content.channel {named!r} contradicts the receiver, which is for "
            f"{receiver.channel!r}",
            "content.channel",
        )
    else:
        channel = receiver.channel
    if channel not in channels:
        if named is not None:
            field, said = "content.channel", "content.channel names"
        elif receiver.form == "receiver.channel":
            field, said = "receiver.channel", "receiver.channel names"
        else:
            field, said = "receiver", f"receiver is {receiver.form}, for"
        raise _invalid(
            f"{said} channel {channel!r}, which no installed connector serves; installed: "
            f"{', '.join(channels)}",
            field,
        )
    return channel


def _optional_text(content: Mapping[str, Any], name: str) -> str | None:
    value = content.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(f"content.{name} must be a string", f"content.{name}")
    return value


def to_direct(
    body: Mapping[str, Any], channels: Sequence[str], templates: Templates
) -> dict[str, Any]:
    """The direct notification (the body of POST /v1/notifications) that a seed-service
    request asks for. Raises InvalidRequest naming ``receiver`` or ``content.<field>``
    (UnresolvableReceiver for a subscriber id); a template that fails to render is an
    InvalidRequest naming ``content.template``."""
    if "receiver" not in body:
        raise _invalid(f"receiver is required: {_RECEIVER_FORMS}", "receiver")
    raw_content = body.get("content")
    if isinstance(raw_content, str):
        content: Mapping[str, Any] = {"text": raw_content}
    elif isinstance(raw_content, Mapping):
        content = raw_content
    else:
        raise _invalid(
            "content is required: a string, or an object with text and optional subject, "
            "html, channel, template and data",
            "content",
        )
    receiver = _receiver(body["receiver"])
    channel = _channel(receiver, content, channels)
    text = _optional_text(content, "text")
    subject = _optional_text(content, "subject")
    html = _optional_text(content, "html")
    template = content.get("template")
    if template is None:
        if not text:
            raise _invalid("content.text is required (or a content.template)", "content.text")
        body_text = text
    else:
        rendered = _render(template, content, receiver.address, channel, templates)
        subject = rendered.subject if rendered.subject is not None else subject
        body_text, html = rendered.body_text, rendered.body_html
    direct: dict[str, Any] = {
        "channel": channel,
        "recipient": receiver.address,
        "body_text": body_text,
    }
    if subject is not None:
        direct["subject"] = subject
    if html is not None:
        direct["body_html"] = html
    return direct


def _render(
    template: object,
    content: Mapping[str, Any],
    receiver: str,
    channel: str,
    templates: Templates,
) -> Rendered:
    if not isinstance(template, str) or not _TEMPLATE_NAME.fullmatch(template):
        raise _invalid("content.template must be a template's name", "content.template")
    if not (templates.directory / template / "body.txt").is_file():
        raise _invalid(f"content.template: there is no template {template!r}", "content.template")
    data = content.get("data") or {}
    if not isinstance(data, Mapping):
        raise _invalid("content.data must be an object", "content.data")
    # The receiver, channel, text and subject win over members of data with their names.
    context: dict[str, Any] = {**data, "receiver": receiver, "channel": channel}
    for name in ("text", "subject"):
        if content.get(name) is not None:
            context[name] = content[name]
    try:
        return templates.render(template, context)
    except TemplateRenderError as e:
        raise _invalid(f"content.template: {e}", "content.template") from e
