"""SlackConnector against a fake Slack on loopback (aiohttp) that speaks the incoming-webhook
protocol: POST /services/<team>/<bot>/<token> with a JSON body holding text and/or blocks,
answered with Slack's plain-text codes ("ok", "invalid_payload", "channel_is_archived"...)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from connectors.base import DeliveryResult, Outcome
from connectors.slack import SlackConnector, SlackSettings
from pipeline.records import NotificationIntent, notification_id
from tests.connectors.test_ssrf import RecordingSockets, ScriptedResolver, closed_port, serve

TEAM, BOT = "T0HERALD01", "B0HERALD02"

# token -> (status, body, headers) the fake Slack answers with after accepting the payload.
SCRIPTED: dict[str, tuple[int, str, dict[str, str]]] = {
    "ok0000000000000000000001": (200, "ok", {}),
    "archived0000000000000001": (410, "channel_is_archived", {}),
    "deleted00000000000000001": (404, "channel_not_found", {}),
    "teamgone0000000000000001": (404, "team_disabled", {}),
    "revoked00000000000000001": (403, "invalid_token", {}),
    "prohibited00000000000001": (403, "action_prohibited", {}),
    "general00000000000000001": (403, "posting_to_general_channel_denied", {}),
    "strict000000000000000001": (400, "invalid_payload", {}),
    "ratelimited0000000000001": (429, "rate_limited", {"Retry-After": "30"}),
    "broken000000000000000001": (500, "", {}),
    "unavailable0000000000001": (503, "service_unavailable", {}),
    "proxy0000000000000000001": (200, "<html><body>Welcome!</body></html>", {}),
    "moved0000000000000000001": (302, "", {"Location": "/services/elsewhere"}),
}
OK = "ok0000000000000000000001"


@dataclass
class FakeSlack:
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (token, payload)
    requests: list[str] = field(default_factory=list)  # every path asked for
    slow: set[str] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def incoming(request: web.Request) -> web.Response:
            self.requests.append(request.path)
            token = request.match_info["token"]
            if request.match_info["team"] != TEAM or token not in SCRIPTED:
                return slack(404, "no_service")
            if request.content_type != "application/json":
                return slack(400, "invalid_payload")
            try:
                payload = json.loads(await request.read())
            except ValueError:
                return slack(400, "invalid_payload")
            if not isinstance(payload, dict):
                return slack(400, "invalid_payload")
            blocks = payload.get("blocks")
            if blocks is not None and not (
                isinstance(blocks, list)
                and all(isinstance(b, dict) and "type" in b for b in blocks)
            ):
                return slack(400, "invalid_blocks")
            if not payload.get("text") and not blocks:
                return slack(400, "no_text")
            self.posts.append((token, payload))
            if token in self.slow:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 5)
            status, body, headers = SCRIPTED[token]
            return slack(status, body, headers)

        async def echo_404(request: web.Request) -> web.Response:
            self.requests.append(request.path)  # a proxy's error page quoting the path
            return web.Response(status=404, text=f"<h1>Not Found</h1> {request.path} {request.url}")

        app = web.Application()
        app.router.add_post("/services/{team}/{bot}/{token}", incoming)
        app.router.add_route("*", "/proxy/{tail:.*}", echo_404)
        return app


def slack(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    # Slack answers text/html with a bare code as the body.
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


@asynccontextmanager
async def fake_slack(fake: FakeSlack) -> AsyncIterator[str]:
    """Run the fake; yields its base URL (the connector's base_url)."""
    async with serve(fake.app()) as port:
        try:
            yield f"http://127.0.0.1:{port}/services/"
        finally:
            fake.release.set()  # before the server waits for its handlers to finish


@pytest.fixture
def sockets() -> RecordingSockets:
    """Records every connection and refuses all but loopback (see test_ssrf)."""
    return RecordingSockets()


def config(base_url: str, **kw: Any) -> SlackSettings:
    fields: dict[str, Any] = {
        "base_url": base_url,
        "allow_hosts": ["127.0.0.1"],
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
    }
    fields.update(kw)
    return SlackSettings(**fields)


def intent(recipient: str, **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "deploy-slack", "slack", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "deploy-finished",
        "rule": "deploy-slack",
        "channel": "slack",
        "recipient": recipient,
        "subject": "*Deploy finished*",
        "body_text": "api v1.4.2 is live in _eu-west_",
    }
    fields.update(kw)
    return NotificationIntent(**fields)


async def deliver(
    settings: SlackSettings, sent: NotificationIntent, sockets: RecordingSockets
) -> DeliveryResult:
    connector = SlackConnector(settings, socket_factory=sockets)
    try:
        return await connector.send(sent)
    finally:
        await connector.aclose()


def hook(base: str, token: str, team: str = TEAM) -> str:
    return f"{base}{team}/{BOT}/{token}"


BLOCKS = [
    {"type": "header", "text": {"type": "plain_text", "text": "Deploy finished"}},
    {"type": "section", "text": {"type": "mrkdwn", "text": "*api* v1.4.2"}},
]


@dataclass(frozen=True)
class Case:
    id: str
    webhook: str = OK
    team: str = TEAM
    intent: dict[str, Any] = field(default_factory=dict)
    outcome: Outcome = Outcome.SENT
    error_class: str | None = None
    retry_after: float | None = None
    response: str | None = None  # a part of the result's response
    posted: bool = True  # the fake accepted the payload (whatever it then answered)
    requested: bool = True  # a request reached the fake at all


CASES = [
    Case("ok", response="200 OK: ok"),
    Case("blocks", intent={"data": {"slack_blocks": json.dumps(BLOCKS)}}),
    Case("body-only", intent={"subject": None}),
    Case(
        "blocks-only",
        intent={"subject": None, "body_text": "", "data": {"slack_blocks": json.dumps(BLOCKS)}},
    ),
    # a 200 that is not "ok" (a proxy's page): counted as posted, never posted twice
    Case("200-not-ok", webhook="proxy0000000000000000001", response="Welcome!"),
    Case(
        "archived",
        webhook="archived0000000000000001",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="410 Gone: channel_is_archived",
    ),
    Case(
        "channel-not-found",
        webhook="deleted00000000000000001",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="channel_not_found",
    ),
    Case(
        "team-disabled",
        webhook="teamgone0000000000000001",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
    ),
    Case(
        "no-service",
        webhook="unknown00000000000000001",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        response="404 Not Found: no_service",
        posted=False,
    ),
    Case(
        "no-service-other-team",
        team="T0SOMEONE9",
        outcome=Outcome.REJECTED,
        error_class="RecipientGone",
        posted=False,
    ),
    Case(
        "invalid-token",
        webhook="revoked00000000000000001",
        outcome=Outcome.REJECTED,
        error_class="invalid_token",
        response="403 Forbidden: invalid_token",
    ),
    Case(
        "action-prohibited",
        webhook="prohibited00000000000001",
        outcome=Outcome.REJECTED,
        error_class="action_prohibited",
    ),
    Case(
        "general-channel-denied",
        webhook="general00000000000000001",
        outcome=Outcome.REJECTED,
        error_class="posting_to_general_channel_denied",
    ),
    Case(
        "invalid-payload",
        webhook="strict000000000000000001",
        outcome=Outcome.REJECTED,
        error_class="invalid_payload",
    ),
    Case(
        "invalid-blocks",
        intent={"data": {"slack_blocks": '[{"text": "no type"}]'}},
        outcome=Outcome.REJECTED,
        error_class="invalid_blocks",
        posted=False,
    ),
    Case(
        "rate-limited",
        webhook="ratelimited0000000000001",
        outcome=Outcome.RETRYABLE,
        error_class="rate_limited",
        retry_after=30.0,
    ),
    Case(
        "500", webhook="broken000000000000000001", outcome=Outcome.RETRYABLE, error_class="HTTP500"
    ),
    Case(
        "503",
        webhook="unavailable0000000000001",
        outcome=Outcome.RETRYABLE,
        error_class="service_unavailable",
    ),
    Case(
        "redirect",
        webhook="moved0000000000000000001",
        outcome=Outcome.REJECTED,
        error_class="Redirect",
    ),
    # refused before sending
    Case(
        "blocks-not-json",
        intent={"data": {"slack_blocks": "[{"}},
        outcome=Outcome.REJECTED,
        error_class="InvalidPayload",
        posted=False,
        requested=False,
    ),
    Case(
        "blocks-not-an-array",
        intent={"data": {"slack_blocks": '{"type": "section"}'}},
        outcome=Outcome.REJECTED,
        error_class="InvalidPayload",
        posted=False,
        requested=False,
    ),
    Case(
        "too-many-blocks",
        intent={"data": {"slack_blocks": json.dumps([BLOCKS[1]] * 51)}},
        outcome=Outcome.REJECTED,
        error_class="InvalidPayload",
        posted=False,
        requested=False,
    ),
    Case(
        "nothing-to-post",
        intent={"subject": None, "body_text": ""},
        outcome=Outcome.REJECTED,
        error_class="InvalidPayload",
        posted=False,
        requested=False,
    ),
    Case(
        "text-too-long",
        intent={"body_text": "x" * 40_001},
        outcome=Outcome.REJECTED,
        error_class="PayloadTooLarge",
        posted=False,
        requested=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_outcomes(case: Case, sockets: RecordingSockets) -> None:
    fake = FakeSlack()
    async with fake_slack(fake) as base:
        sent = intent(hook(base, case.webhook, case.team), **case.intent)
        result = await deliver(config(base), sent, sockets)

    assert result.outcome is case.outcome, result
    assert result.error_class == case.error_class
    assert result.retry_after == case.retry_after
    if case.response is not None:
        assert result.response is not None and case.response in result.response
    assert result.provider_message_id is None  # incoming webhooks return no id
    assert case.webhook not in (result.response or "") + repr(result)

    assert len(fake.requests) == (1 if case.requested else 0)
    assert len(sockets.connects) == (1 if case.requested else 0)
    if case.posted:
        [(token, payload)] = fake.posts
        assert token == case.webhook
        text = "\n".join(p for p in (sent.subject, sent.body_text) if p)
        assert payload["text"] == text
        if "slack_blocks" in sent.data:
            assert payload["blocks"] == json.loads(sent.data["slack_blocks"])
        else:
            assert "blocks" not in payload
    else:
        assert fake.posts == []


async def test_message_text_is_subject_newline_body(sockets: RecordingSockets) -> None:
    fake = FakeSlack()
    async with fake_slack(fake) as base:
        result = await deliver(config(base), intent(hook(base, OK)), sockets)
    assert result.outcome is Outcome.SENT
    assert fake.posts == [(OK, {"text": "*Deploy finished*\napi v1.4.2 is live in _eu-west_"})]


async def test_read_timeout_is_retryable(sockets: RecordingSockets) -> None:
    fake = FakeSlack(slow={OK})
    async with fake_slack(fake) as base:
        result = await deliver(config(base, read_timeout_s=0.3), intent(hook(base, OK)), sockets)
    assert result.outcome is Outcome.RETRYABLE, result
    assert result.error_class == "ReadTimeout"
    assert len(fake.posts) == 1  # Slack may have posted it: the retry can duplicate it


async def test_connection_refused_is_retryable(sockets: RecordingSockets) -> None:
    base = f"http://127.0.0.1:{closed_port()}/services/"
    result = await deliver(config(base), intent(hook(base, OK)), sockets)
    assert result.outcome is Outcome.RETRYABLE, result
    assert result.error_class == "ConnectError"


async def test_a_quoted_webhook_path_is_redacted(sockets: RecordingSockets) -> None:
    """A proxy's 404 page that quotes the request: the token does not reach the result."""
    fake = FakeSlack()
    async with fake_slack(fake) as base:
        proxied = base.replace("/services/", "/proxy/")
        path_key = "S3cr3tT0kenXyZ9876543210"
        result = await deliver(
            config(proxied), intent(f"{proxied}{TEAM}/{BOT}/{path_key}"), sockets
        )
    assert result.outcome is Outcome.REJECTED and result.error_class == "RecipientGone"
    assert len(fake.requests) == 1
    assert path_key not in repr(result)
    assert "[webhook]" in (result.response or "")


@pytest.mark.parametrize(
    "recipient",
    [
        "https://hooks.slack.com/services/T0/B0/abc",  # the real host, not the configured one
        "{scheme_swapped}T0/B0/abc",
        "{other_port}T0/B0/abc",
        "{base_no_slash}Extra/T0/B0/abc",  # /servicesExtra/ is not under /services/
        "{base}../api/chat.postMessage",
        "{base}",
        "{with_userinfo}T0/B0/abc",
        "{base}T0/B0/abc\nX: 1",
        "not a url at all",
        "",
    ],
)
async def test_recipient_outside_the_base_url(recipient: str, sockets: RecordingSockets) -> None:
    fake = FakeSlack()
    async with fake_slack(fake) as base:
        url = recipient.format(
            base=base,
            base_no_slash=base.rstrip("/"),
            scheme_swapped=base.replace("http://", "https://"),
            other_port=base.replace("127.0.0.1:", "127.0.0.1:1"),
            with_userinfo=base.replace("http://", "http://u:p@"),
        )
        result = await deliver(config(base), intent(url), sockets)
    assert result.outcome is Outcome.REJECTED, result
    assert result.error_class == "InvalidRecipient"
    assert "T0/B0" not in (result.response or "")
    assert fake.requests == [] and sockets.connects == []


async def test_ssrf_guard_applies(sockets: RecordingSockets) -> None:
    """A Slack base host that resolves to a private address is refused without connecting."""
    resolver = ScriptedResolver(["10.0.0.7"])
    settings = SlackSettings(base_url="https://hooks.slack.com/services/")
    connector = SlackConnector(settings, resolver=resolver, socket_factory=sockets)
    try:
        result = await connector.send(intent("https://hooks.slack.com/services/T0/B0/abcdefgh"))
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.REJECTED, result
    assert result.error_class == "ForbiddenAddress"
    assert resolver.calls == ["hooks.slack.com"]
    assert sockets.connects == []
    assert "abcdefgh" not in repr(result)


@pytest.mark.parametrize(
    ("base_url", "allow"),
    [("http://hooks.slack.com/services/", []), ("http://127.0.0.1:9/x/", []), ("ftp://x/", [])],
)
def test_plain_http_base_url_needs_the_allowlist(base_url: str, allow: list[str]) -> None:
    with pytest.raises(ValueError, match="HERALD_SLACK_BASE_URL"):
        SlackConnector(SlackSettings(base_url=base_url, allow_hosts=allow))


async def test_concurrent_posts_share_connections(sockets: RecordingSockets) -> None:
    fake = FakeSlack()
    async with fake_slack(fake) as base:
        connector = SlackConnector(config(base, max_connections=3), socket_factory=sockets)
        try:
            results = await asyncio.gather(
                *(connector.send(intent(hook(base, OK), body_text=f"n{i}")) for i in range(15))
            )
        finally:
            await connector.aclose()
    assert all(r.outcome is Outcome.SENT for r in results)
    assert sorted(p["text"].split("\n")[1] for _, p in fake.posts) == sorted(
        f"n{i}" for i in range(15)
    )
    assert 1 <= len(sockets.connects) <= 3


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SLACK_BASE_URL", "http://127.0.0.1:8089/services/")
    monkeypatch.setenv("HERALD_SLACK_ALLOW_HOSTS", "127.0.0.1")
    connector = SlackConnector.from_env()
    assert connector.config.allow_hosts == ["127.0.0.1"]
    assert SlackSettings.model_config.get("env_prefix") == "HERALD_SLACK_"
    assert "HERALD_SLACK_BASE_URL" in SlackConnector.setting_names()
    monkeypatch.delenv("HERALD_SLACK_BASE_URL")
    monkeypatch.delenv("HERALD_SLACK_ALLOW_HOSTS")
    assert SlackSettings().base_url == "https://hooks.slack.com/services/"
