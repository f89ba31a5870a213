"""Webhooks signed per the Standard Webhooks spec (https://www.standardwebhooks.com).

- The intent's recipient is the endpoint URL: ``https://`` (``http://`` only for a host in
  ``HERALD_WEBHOOK_ALLOW_HOSTS``), no user:password part. Every connection passes the SSRF
  guard (connectors/ssrf.py): a host that resolves to a private, loopback, link-local...
  address is rejected ("ForbiddenAddress") unless allowlisted.
- The body is JSON: ``{"type", "timestamp", "data": {notification_id, event_id, subject,
  body_text, body_html, recipient, data, generation}}``.
- Headers: ``webhook-id`` (the intent's idempotency key, the same on every retry, so a
  receiver drops duplicates with it), ``webhook-timestamp`` (seconds at send time),
  ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per
  active secret, space-separated, so a receiver that knows either the new or the old secret
  verifies during a rotation) and ``Idempotency-Key`` (the same key, for receivers that
  follow the IETF draft instead).
- ``HERALD_WEBHOOK_SECRETS`` is JSON: ``{"default": ["whsec_..."]}`` or per endpoint
  ``{"https://host/path": ["whsec_new", "whsec_old"], "default": [...]}``. An endpoint
  without a secret is rejected ("NoSigningSecret") before anything is sent.
- Outcomes: 2xx sent (whatever the body: Standard Webhooks defines success by status only);
  3xx rejected "Redirect" (redirects are never followed: the target would receive a signed
  payload meant for someone else); 410 rejected "RecipientGone" (the receiver disabled the
  endpoint); 429 and 5xx retryable, with Retry-After; other 4xx rejected. No answer (a
  timeout, a refused or dropped connection, a garbled status line) is retryable: the
  receiver may then see the same webhook-id twice. Once a status line has arrived, the
  status decides even if the body then breaks off: the receiver has made its decision.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Annotated

import aiohttp
from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from connectors.base import Connector, DeliveryResult
from connectors.http import Answer, endpoint_client
from connectors.ssrf import AddressGuard, Resolver, split_hosts
from pipeline.records import NotificationIntent

__all__ = [
    "InvalidSecretsError",
    "WebhookConnector",
    "WebhookSettings",
    "new_secret",
    "parse_secrets",
    "payload",
    "sign",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 - a format prefix, not a secret
DEFAULT_ENDPOINT = "default"


class InvalidSecretsError(ValueError):
    """HERALD_WEBHOOK_SECRETS cannot be used. The message never contains a secret."""


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_WEBHOOK_", extra="ignore")

    # JSON: {"default": ["whsec_..."]} and/or {"https://host/path": ["whsec_new", "whsec_old"]}.
    # Several secrets for one endpoint: each message carries one signature per secret.
    secrets: SecretStr = SecretStr("")
    # Hostnames and IP networks (e.g. 127.0.0.0/8) the SSRF guard lets through although they
    # are private; plain http:// is accepted only for these. JSON list or comma-separated.
    allow_hosts: Annotated[list[str], NoDecode] = []
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    # The whole exchange, however the receiver trickles its answer.
    total_timeout_s: float = 30.0
    max_connections: int = 100
    # Trust only this CA (PEM) instead of the usual bundle: private endpoints, tests.
    ca_file: Path | None = None
    user_agent: str = "Herald-Webhooks/1"

    _split_hosts = field_validator("allow_hosts", mode="before")(split_hosts)


def new_secret() -> str:
    """A fresh signing secret in the spec's format (32 random bytes)."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def _decode_secret(secret: str, where: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecretsError(f"a secret for {where} does not start with {SECRET_PREFIX!r}")
    encoded = secret[len(SECRET_PREFIX) :].strip()
    try:
        key: bytes | None = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = None
    if key is None:
        raise InvalidSecretsError(f"a secret for {where} is not valid base64")
    if not 24 <= len(key) <= 64:  # the spec's range
        raise InvalidSecretsError(
            f"a secret for {where} decodes to {len(key)} bytes; the spec wants 24 to 64"
        )
    return key


def _endpoint_key(url: str) -> str:
    if url == DEFAULT_ENDPOINT:
        return url
    try:
        return str(URL(url))
    except (ValueError, TypeError):
        raise InvalidSecretsError(f"{url!r} is neither a URL nor 'default'") from None


def parse_secrets(raw: SecretStr | str) -> dict[str, tuple[bytes, ...]]:
    """HERALD_WEBHOOK_SECRETS -> {normalised endpoint URL or "default": HMAC keys}."""
    text = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
    if not text.strip():
        return {}
    # Errors are raised outside the except blocks, so that no exception holding the text
    # (JSONDecodeError.doc) hangs on as __context__ of the one raised.
    problem: str | None = None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        problem = e.msg  # the parser's complaint, never the text
    if problem is not None:
        raise InvalidSecretsError(f"HERALD_WEBHOOK_SECRETS is not JSON ({problem})")
    if not isinstance(parsed, dict):
        raise InvalidSecretsError("HERALD_WEBHOOK_SECRETS must be a JSON object")
    keys: dict[str, tuple[bytes, ...]] = {}
    for endpoint, secrets in parsed.items():
        listed = [secrets] if isinstance(secrets, str) else secrets
        if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
            raise InvalidSecretsError(f"the secrets for {endpoint!r} must be a list of strings")
        keys[_endpoint_key(endpoint)] = tuple(_decode_secret(s, repr(endpoint)) for s in listed)
    return keys


def payload(intent: NotificationIntent) -> bytes:
    """The JSON body: a Standard Webhooks envelope around the intent."""
    created = intent.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    body = {
        "type": intent.event_type,
        "timestamp": created.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "notification_id": intent.notification_id,
            "event_id": intent.event_id,
            "subject": intent.subject,
            "body_text": intent.body_text,
            "body_html": intent.body_html,
            "recipient": intent.recipient,
            "data": dict(intent.data),
            "generation": intent.generation,
        },
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def sign(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: "v1,<base64 HMAC-SHA256>" per key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def _check_endpoint(recipient: str, guard: AddressGuard) -> URL:
    """The endpoint URL, or ValueError saying why it cannot be one."""
    if len(recipient) > 2048:
        raise ValueError("endpoint URL is longer than 2048 characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in recipient):
        raise ValueError("endpoint URL contains whitespace or control characters")
    try:
        url = URL(recipient)
    except (ValueError, TypeError) as e:
        raise ValueError(f"endpoint is not a valid URL: {e}") from None
    if not url.raw_host:
        raise ValueError("endpoint URL has no host")
    if url.raw_user is not None or url.raw_password is not None:
        raise ValueError("endpoint URL carries a user:password part; use signatures instead")
    if url.scheme not in ("https", "http"):
        raise ValueError(f"endpoint scheme must be https, not {url.scheme!r}")
    if url.scheme == "http" and not guard.allowlisted(url.raw_host):
        raise ValueError("endpoint must be https:// (http:// only for allowlisted hosts)")
    return url


class WebhookConnector(Connector):
    channel = "webhook"
    # Most bytes of JSON body per webhook (receivers commonly cap requests at about 1 MiB).
    max_body_bytes = 1024 * 1024
    # Most bytes of the receiver's answer read (and kept, cut, in the status event).
    max_answer_bytes = 4096
    settings_class = WebhookSettings

    def __init__(
        self,
        config: WebhookSettings,
        *,
        resolver: Resolver | None = None,
        socket_factory: aiohttp.SocketFactoryType | None = None,
    ) -> None:
        """``resolver`` and ``socket_factory`` replace the system resolver under the SSRF
        guard and the making of sockets (tests use them to observe where connections go)."""
        self.config = config
        self._keys = parse_secrets(config.secrets)
        self._guard = AddressGuard(config.allow_hosts, resolver)
        # In-flight sends are the runtime's to hold (one per pooled connection).
        self.max_concurrency = max(1, config.max_connections)
        self._http = endpoint_client(config, self._guard, socket_factory)

    def keys_for(self, url: URL | str) -> Sequence[bytes]:
        """The endpoint's own HMAC keys, else the default ones, else none."""
        own = self._keys.get(str(URL(url) if isinstance(url, str) else url))
        return own if own is not None else self._keys.get(DEFAULT_ENDPOINT, ())

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            url = _check_endpoint(intent.recipient, self._guard)
        except ValueError as e:
            return DeliveryResult.rejected("InvalidRecipient", str(e))
        keys = self.keys_for(url)
        if not keys:
            return DeliveryResult.rejected(
                "NoSigningSecret",
                "no signing secret for this endpoint and no default (HERALD_WEBHOOK_SECRETS)",
            )
        body = payload(intent)
        if len(body) > self.max_body_bytes:
            return DeliveryResult.rejected(
                "PayloadTooLarge", f"{len(body)} bytes of JSON; at most {self.max_body_bytes}"
            )
        msg_id = intent.idempotency_key
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(keys, msg_id, timestamp, body),
            "idempotency-key": msg_id,
        }
        answer = await self._http.request(
            "POST", url, body=body, headers=headers, max_answer_bytes=self.max_answer_bytes
        )
        if isinstance(answer, DeliveryResult):
            return answer
        return outcome(answer, msg_id)

    async def aclose(self) -> None:
        await self._http.aclose()


def outcome(answer: Answer, msg_id: str) -> DeliveryResult:
    """The result of a receiver's answer (see the module docstring)."""
    status = answer.status
    if 200 <= status < 300:
        return DeliveryResult.sent(answer.summary(), msg_id)
    if 300 <= status < 400:
        where = answer.headers.get("location", "")[:200]
        return DeliveryResult.rejected(
            "Redirect", f"{answer.summary(100)} to {where!r} (redirects are not followed)"
        )
    if status == 410:
        return DeliveryResult.rejected("RecipientGone", answer.summary())
    if status == 429 or status >= 500:
        return DeliveryResult.retryable(f"HTTP{status}", answer.summary(), answer.retry_after)
    return DeliveryResult.rejected(f"HTTP{status}", answer.summary())
