"""POST /api/notification, the seed service's request, on a real broker over real HTTP on
loopback: the exact bytes a PHP service sends with Guzzle 7 (``$client->post($url, ['json' =>
['receiver' => ..., 'content' => ...]])``) land as an intent on the receiver's channel topic
and, with the pipeline running, are delivered; bad input gets the same problem documents as
the rest of the API."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from pipeline import headers as h
from pipeline.records import NOTIFICATION_INTENT, DeliveryState
from pipeline.seed import UNRESOLVABLE_RECEIVER
from pipeline.serialization import serde_from_settings
from pipeline.service import IDEMPOTENCY_KEY_REUSED
from tests.integration.test_api import (
    AUTH,
    PROBLEM,
    TOKEN,
    Bare,
    api,
    assert_problem,
    bare,
    pipeline,
)
from tests.integration.test_effectively_once import WAIT, Pipeline

pytestmark = pytest.mark.integration
__all__ = ["api", "bare", "pipeline"]


def php_json_encode(value: Any) -> bytes:
    """What PHP's json_encode() makes of ``value`` with its default flags, which Guzzle's
    ``json`` option uses: compact, non-ASCII as \\uXXXX (lower-case hex, surrogate pairs),
    and "/" escaped as "\\/"."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode()


async def guzzle_post(
    url: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``body`` the way Guzzle 7 (curl handler) sends ``->post($url, ['json' => ...])``:
    HTTP/1.1, Host, Content-Length, ``User-Agent: GuzzleHttp/7``, ``Content-Type:
    application/json`` and the caller's headers, no Accept or Expect header, the connection
    kept open. Returns the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Length: {len(body)}",
        "User-Agent: GuzzleHttp/7",
        "Content-Type: application/json",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
        status_line, *header_lines = head.decode().rstrip("\r\n").split("\r\n")
        answer_headers = {
            k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)
        }
        answer = await reader.readexactly(int(answer_headers["content-length"]))
    finally:
        writer.close()
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    return int(status), answer_headers, answer


def intents(bare: Bare, channel: str) -> list[dict[str, Any]]:
    serde = serde_from_settings(bare.settings)
    found = []
    for m in bare.records(bare.topics.notifications(channel)):
        intent = serde.decode(m.value(), expect=NOTIFICATION_INTENT).record
        intent["notification_id"] = str(intent["notification_id"])  # a uuid logical type
        found.append({**intent, "headers": h.as_dict(m.headers())})
    return found


async def test_the_guzzle_request_is_accepted_and_lands_on_the_channel_topic(bare: Bare) -> None:
    text = (
        "Ta commande n\u00b042 est exp\u00e9di\u00e9e \u2014 suivi : "
        "https://example.com/t/42 \U0001f69a"
    )
    body = php_json_encode({"receiver": "ada@example.com", "content": text})
    # What PHP sends, spelled out: escaped slashes, \u escapes, a surrogate pair.
    assert b"https:\\/\\/example.com\\/t\\/42" in body
    assert b"n\\u00b042 est exp\\u00e9di\\u00e9e \\u2014" in body and b"\\ud83d\\ude9a" in body
    status, headers, answer = await guzzle_post(bare.url, "/api/notification", body, AUTH)
    assert status == 202, answer
    assert headers["content-type"].startswith("application/json")
    reply = json.loads(answer)
    assert reply["status"] == "accepted"
    assert reply["channel"] == "email"
    nid = reply["notification_id"]

    sms = php_json_encode(
        {
            "receiver": "+447911123456",
            "content": {"text": "Your code: 123456", "subject": "ignored by SMS"},
        }
    )
    status, _, answer = await guzzle_post(bare.url, "/api/notification", sms, AUTH)
    assert status == 202, answer
    sms_reply = json.loads(answer)
    assert sms_reply["status"] == "accepted" and sms_reply["channel"] == "sms"

    hook = php_json_encode(
        {
            "receiver": {"channel": "webhook", "address": "https://hooks.example.com/orders"},
            "content": {"text": "order o-42 shipped"},
        }
    )
    status, _, answer = await guzzle_post(bare.url, "/api/notification", hook, AUTH)
    assert status == 202, answer

    [email] = intents(bare, "email")
    assert email["notification_id"] == nid == email["headers"][h.NOTIFICATION_ID]
    assert (email["channel"], email["recipient"]) == ("email", "ada@example.com")
    assert email["body_text"] == text
    assert email["subject"] is None and email["rule"] == "direct"
    [sms_intent] = intents(bare, "sms")
    assert sms_intent["notification_id"] == sms_reply["notification_id"]
    assert (sms_intent["recipient"], sms_intent["body_text"]) == (
        "+447911123456",
        "Your code: 123456",
    )
    [webhook] = intents(bare, "webhook")
    assert webhook["recipient"] == "https://hooks.example.com/orders"


async def test_a_template_is_rendered_with_the_content(bare: Bare) -> None:
    body = php_json_encode(
        {
            "receiver": "grace@example.com",
            "content": {
                "template": "welcome",
                "data": {"display_name": "Gr\u00e2ce", "email": "grace@example.com"},
            },
        }
    )
    status, _, answer = await guzzle_post(bare.url, "/api/notification", body, AUTH)
    assert status == 202, answer
    [intent] = intents(bare, "email")
    assert intent["subject"] == "Welcome to Herald, Gr\u00e2ce!"
    assert intent["body_text"].startswith("Hi Gr\u00e2ce, your account is ready.")
    assert intent["body_html"].startswith("<p>Hi Gr\u00e2ce, your account is ready.</p>")


async def test_a_retried_request_gets_the_same_id_and_a_reused_key_is_refused(bare: Bare) -> None:
    body = php_json_encode({"receiver": "ada@example.com", "content": "Your code: 654321"})
    key = {**AUTH, "Idempotency-Key": "seed-otp-1"}
    first = await guzzle_post(bare.url, "/api/notification", body, key)
    again = await guzzle_post(bare.url, "/api/notification", body, key)
    assert first[0] == again[0] == 202
    assert json.loads(first[2]) == json.loads(again[2])
    assert again[1]["idempotent-replayed"] == "true"

    other = php_json_encode({"receiver": "mallory@example.com", "content": "Your code: 654321"})
    status, headers, answer = await guzzle_post(bare.url, "/api/notification", other, key)
    assert status == 422 and headers["content-type"].startswith(PROBLEM)
    problem = json.loads(answer)
    assert problem["type"] == IDEMPOTENCY_KEY_REUSED
    assert "POST /api/notification" in problem["detail"]

    [written] = intents(bare, "email")
    assert written["notification_id"] == json.loads(first[2])["notification_id"]
    assert written["recipient"] == "ada@example.com"


BAD: list[tuple[str, bytes, int, str, str]] = [
    # (case, body, status, a piece of the detail, the field named)
    (
        "a subscriber id",
        php_json_encode({"receiver": "u-42", "content": "hi"}),
        422,
        "subscriber ids cannot be resolved yet",
        "receiver",
    ),
    (
        "a numeric subscriber id",
        php_json_encode({"receiver": 42, "content": "hi"}),
        422,
        "receiver must be an email address, an E.164 phone number",
        "receiver",
    ),
    (
        "not E.164",
        php_json_encode({"receiver": "+44 79 abc", "content": "hi"}),
        422,
        "not an E.164 phone number",
        "receiver",
    ),
    (
        "no content",
        php_json_encode({"receiver": "ada@example.com"}),
        422,
        "content is required",
        "content",
    ),
    (
        "a channel nobody serves",
        php_json_encode({"receiver": {"channel": "fax", "address": "+15551234"}, "content": "x"}),
        422,
        "which no installed connector serves",
        "receiver.channel",
    ),
    (
        "an unknown template",
        php_json_encode({"receiver": "ada@example.com", "content": {"template": "nope"}}),
        422,
        "no template 'nope'",
        "content.template",
    ),
    ("not JSON", b"receiver=ada@example.com&content=hi", 400, "not JSON", ""),
    ("a JSON array", b'["ada@example.com","hi"]', 400, "a JSON object", ""),
]


@pytest.mark.parametrize(
    ("body", "status", "detail", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
async def test_bad_input_gets_a_problem_document(
    bare: Bare, body: bytes, status: int, detail: str, field: str
) -> None:
    code, headers, answer = await guzzle_post(bare.url, "/api/notification", body, AUTH)
    assert code == status, answer
    assert headers["content-type"].startswith(PROBLEM)
    problem = json.loads(answer)
    assert problem["status"] == status and problem["title"]
    assert detail in problem["detail"]
    if field:
        assert problem["fields"] == [field]
    if "subscriber" in detail or "receiver must be" in detail:
        assert problem["type"] == UNRESOLVABLE_RECEIVER
    assert intents(bare, "email") == []


async def test_the_same_auth_and_limits_as_the_rest_of_the_api(bare: Bare) -> None:
    body = php_json_encode({"receiver": "ada@example.com", "content": "hi"})
    status, headers, answer = await guzzle_post(bare.url, "/api/notification", body)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(answer)["status"] == 401
    limit = bare.settings.max_record_bytes
    huge = php_json_encode({"receiver": "ada@example.com", "content": "y" * limit})
    status, headers, answer = await guzzle_post(bare.url, "/api/notification", huge, AUTH)
    assert status == 413 and headers["content-type"].startswith(PROBLEM)
    assert json.loads(answer)["limit"] == limit
    async with aiohttp.ClientSession(headers=AUTH) as http:
        r = await http.get(f"{bare.url}/api/notification")
        await assert_problem(r, 405)
    assert intents(bare, "email") == []


async def test_the_seed_call_is_delivered_by_email(api: str, pipeline: Pipeline) -> None:
    user = pipeline.user("seed")
    body = php_json_encode(
        {"receiver": user["email"], "content": {"subject": "Your code", "text": "Code: 123456"}}
    )
    status, _, answer = await guzzle_post(
        api, "/api/notification", body, {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 202, answer
    nid = json.loads(answer)["notification_id"]
    [delivered] = pipeline.smtp.wait_for(1, user["email"], timeout=WAIT)
    assert delivered.message["Subject"] == "Your code"
    assert delivered.message.get_content().strip() == "Code: 123456"
    pipeline.wait_status(nid, DeliveryState.SENT)
