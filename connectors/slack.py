"""Slack through incoming webhooks (https://api.slack.com/messaging/webhooks).

- The intent's recipient is the incoming-webhook URL, which must lie under
  ``HERALD_SLACK_BASE_URL`` (``https://hooks.slack.com/services/``): a rule cannot make Herald
  POST Slack-shaped JSON anywhere else. The URL is a credential (whoever has it can post), so
  it never appears in a result's response or error text. The SSRF guard (connectors/ssrf.py)
  checks every connection as it does for webhooks.
- The body is ``{"text": subject + "\\n" + body_text}``, which Slack renders as mrkdwn, plus
  ``"blocks"`` when the intent's data carries ``slack_blocks`` (a JSON array of Block Kit
  blocks; ``text`` is then the notification fallback). Slack gives ``&``, ``<`` and ``>``
  special meaning (``<!channel>``, ``<url|label>``): templates must escape them in values
  that users control.
- No idempotency: incoming webhooks take no idempotency key or message id, and answer only
  "ok". When a send times out or the connection drops after the request went out, Slack may
  have posted it, and the retry posts it again. Herald retries only then and on 429/5xx.
- Outcomes: 200 sent (whatever the body says: Slack answers "ok", and a 200 from a proxy in
  between cannot be told apart, while a resend would post twice); 404 and 410
  (``channel_not_found``, ``no_service``, ``team_disabled``, ``channel_is_archived``)
  rejected "RecipientGone"; 429 (with Retry-After) and 5xx retryable; other 4xx
  (``invalid_payload``, ``no_text``, ``invalid_token``, ``action_prohibited``...) rejected;
  3xx rejected "Redirect". The error_class is Slack's error code when the body is one
  (``invalid_payload``), else ``HTTP<status>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import aiohttp
from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from connectors.base import Connector, DeliveryResult
from connectors.http import Answer, endpoint_client
from connectors.ssrf import AddressGuard, Resolver, split_hosts
from pipeline.records import NotificationIntent

__all__ = ["SlackConnector", "SlackSettings", "message"]

# Where an intent may put Block Kit blocks: a JSON array, as a string (data is str -> str).
BLOCKS_KEY = "slack_blocks"
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class SlackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_SLACK_", extra="ignore")

    # Every recipient URL must start with this (same scheme, host and port; path under it).
    base_url: str = "https://hooks.slack.com/services/"
    # Hostnames and IP networks the SSRF guard lets through although private (local tests,
    # a Slack-compatible server on the private network). JSON list or comma-separated.
    allow_hosts: Annotated[list[str], NoDecode] = []
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_connections: int = 50
    # Trust only this CA (PEM) instead of the usual bundle: tests, a TLS-intercepting proxy.
    ca_file: Path | None = None
    user_agent: str = "Herald-Slack/1"

    _split_hosts = field_validator("allow_hosts", mode="before")(split_hosts)


def message(intent: NotificationIntent) -> dict[str, Any]:
    """The JSON body for an intent. Raises ValueError for blocks that are not a JSON array
    of objects."""
    text = "\n".join(part for part in (intent.subject, intent.body_text) if part)
    body: dict[str, Any] = {"text": text}
    raw = intent.data.get(BLOCKS_KEY)
    if raw:
        try:
            blocks = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.{BLOCKS_KEY} is not JSON ({e.msg})") from None
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise ValueError(f"data.{BLOCKS_KEY} must be a JSON array of block objects")
        body["blocks"] = blocks
    return body


class SlackConnector(Connector):
    channel = "slack"
    # Slack cuts longer text; rejected here instead of posting a truncated message.
    max_text_chars = 40_000
    # Block Kit's limit per message.
    max_blocks = 50
    # Most bytes of Slack's answer read (it is a short error code).
    max_answer_bytes = 1024
    settings_class = SlackSettings

    def __init__(
        self,
        config: SlackSettings,
        *,
        resolver: Resolver | None = None,
        socket_factory: aiohttp.SocketFactoryType | None = None,
    ) -> None:
        """``resolver`` and ``socket_factory`` replace the system resolver under the SSRF
        guard and the making of sockets (tests use them to observe where connections go)."""
        self.config = config
        self._guard = AddressGuard(config.allow_hosts, resolver)
        base = config.base_url if config.base_url.endswith("/") else config.base_url + "/"
        try:
            self._base = URL(base)
        except (ValueError, TypeError) as e:
            raise ValueError(f"HERALD_SLACK_BASE_URL is not a URL: {e}") from None
        if self._base.scheme not in ("https", "http") or not self._base.raw_host:
            raise ValueError("HERALD_SLACK_BASE_URL must be an https:// URL")
        if self._base.scheme == "http" and not self._guard.allowlisted(self._base.raw_host):
            raise ValueError(
                "HERALD_SLACK_BASE_URL must be https:// (http:// only for a host in "
                "HERALD_SLACK_ALLOW_HOSTS)"
            )
        # In-flight sends are the runtime's to hold (one per pooled connection).
        self.max_concurrency = max(1, config.max_connections)
        self._http = endpoint_client(config, self._guard, socket_factory)

    @classmethod
    def describe_address(cls, recipient: str) -> str:
        """An incoming-webhook URL is a credential: statuses and the ledger get the host and
        the workspace part only."""
        scheme, _, rest = recipient.partition("://")
        host, _, path = rest.partition("/")
        workspace = path.split("/")[1] if path.count("/") >= 1 else ""
        return f"{scheme}://{host}/services/{workspace}/…" if workspace else f"{scheme}://{host}/…"

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            url = self._check_recipient(intent.recipient)
        except ValueError as e:
            return DeliveryResult.rejected("InvalidRecipient", str(e))
        try:
            body = message(intent)
        except ValueError as e:
            return DeliveryResult.rejected("InvalidPayload", str(e))
        if not body["text"] and "blocks" not in body:
            return DeliveryResult.rejected("InvalidPayload", "no text and no blocks to post")
        if len(body["text"]) > self.max_text_chars:
            return DeliveryResult.rejected(
                "PayloadTooLarge",
                f"{len(body['text'])} characters of text; Slack takes {self.max_text_chars}",
            )
        if len(body.get("blocks", ())) > self.max_blocks:
            return DeliveryResult.rejected(
                "InvalidPayload", f"{len(body['blocks'])} blocks; Slack takes {self.max_blocks}"
            )
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        answer = await self._http.request(
            "POST", url, body=content, headers=headers, max_answer_bytes=self.max_answer_bytes
        )
        if isinstance(answer, DeliveryResult):
            return answer
        # A proxy's error page may quote the request path, which holds the webhook token.
        return outcome(replace(answer, text=self._redact(answer.text, url)))

    async def aclose(self) -> None:
        await self._http.aclose()

    def _check_recipient(self, recipient: str) -> URL:
        """The webhook URL, or ValueError (whose text never repeats the URL)."""
        wrong = f"recipient is not an incoming-webhook URL under {self._base}"
        if len(recipient) > 2048 or any(c.isspace() or ord(c) < 32 for c in recipient):
            raise ValueError(wrong)
        try:
            url = URL(recipient)
        except (ValueError, TypeError):
            raise ValueError(wrong) from None
        base = self._base
        if (
            url.scheme != base.scheme
            or url.raw_host != base.raw_host
            or url.port != base.port
            or url.raw_user is not None
            or url.raw_password is not None
            or not url.raw_path.startswith(base.raw_path)
            or len(url.raw_path) <= len(base.raw_path)
        ):
            raise ValueError(wrong)
        return url

    def _redact(self, text: str, url: URL) -> str:
        own = url.raw_path[len(self._base.raw_path) :]
        pieces = (p for p in own.split("/") if len(p) >= 8)
        for secret in (str(url), url.raw_path, url.path, own, *pieces):
            if secret:
                text = text.replace(secret, "[webhook]")
        return text


def outcome(answer: Answer) -> DeliveryResult:
    """The result of Slack's answer (see the module docstring)."""
    status = answer.status
    text = answer.text.strip()
    code = text if _ERROR_CODE.fullmatch(text) else None
    if 200 <= status < 300:
        return DeliveryResult.sent(answer.summary())
    if 300 <= status < 400:
        return DeliveryResult.rejected("Redirect", f"{answer.summary(100)} (not followed)")
    if status in (404, 410):
        return DeliveryResult.rejected("RecipientGone", answer.summary())
    if status == 429 or status >= 500:
        return DeliveryResult.retryable(
            code or f"HTTP{status}", answer.summary(), answer.retry_after
        )
    return DeliveryResult.rejected(code or f"HTTP{status}", answer.summary())
