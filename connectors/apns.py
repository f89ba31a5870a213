"""Push notifications through the Apple Push Notification service provider API (HTTP/2).

- ``POST {base_url}/3/device/{device_token}`` over one multiplexed HTTP/2 connection
  (``httpx`` with ``h2``), headers ``apns-topic`` (the app's bundle id), ``apns-push-type:
  alert``, ``apns-priority: 10``, ``apns-expiration`` (now + ``HERALD_APNS_TTL_S``; 0 means
  deliver now or never) and ``apns-id``: the intent's idempotency key. ``apns-id`` is APNs'
  own notification id, so the one a resend carries is the one the first attempt had.
- Hosts: ``api.push.apple.com`` or ``api.sandbox.push.apple.com`` (``HERALD_APNS_BASE_URL``,
  the operator's choice; tests point it at a local server); the device token from the
  intent only fills the path. Nothing in an intent chooses where a request goes, so APNs
  needs no SSRF guard, and it keeps httpx: aiohttp, which the other HTTP connectors use
  (connectors/http.py), has no HTTP/2 client, and APNs speaks nothing else.
- Token-based authentication: ``authorization: bearer`` an ES256 JWT (header ``kid`` the key
  id, claims ``iss`` the team id and ``iat``) signed with the .p8 key. Apple wants it renewed
  between every 20 and 60 minutes; it is reused for ``token_refresh_s`` (50 minutes), and
  renewed early, once per request, when APNs answers ExpiredProviderToken.
- Payload ``{"aps": {"alert": {"title", "body"}}, ...data, "notification_id"}``: the intent's
  data as custom top-level keys (``aps`` and ``notification_id`` are Herald's). Over 4 KB it
  is rejected before sending, as APNs would.

Outcomes (APNs answers errors as ``{"reason": ...}``): 200 sent, with the ``apns-id`` echoed
as the provider message id; 410 Unregistered and 400 BadDeviceToken -> rejected
``RecipientGone`` (410's timestamp, when the token stopped being valid, is in the response);
400 DeviceTokenNotForTopic, 413 PayloadTooLarge and other 4xx -> rejected with the reason as
error class. Herald's configuration failing every message alike is retryable, so the sink's
circuit breaker pauses the channel instead of rejecting everything: 403 InvalidProviderToken
(wrong key, key id or team id), ExpiredProviderToken after a renewal, MissingProviderToken,
and the topic reasons (BadTopic, MissingTopic, TopicDisallowed). 429 TooManyRequests and
5xx are retryable with Retry-After; timeouts, connection and HTTP/2 protocol errors
retryable.
"""

from __future__ import annotations

import json
import re
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.base import Connector, DeliveryResult
from connectors.http import parse_retry_after
from pipeline.records import NotificationIntent

if TYPE_CHECKING:
    import httpx
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

__all__ = ["ApnsConnector", "ApnsSettings", "build_payload"]

_INSTALL = "pip install 'herald[apns]'"
# Hex, as APNs gives them to apps (32 bytes today; Apple says the length may change).
_DEVICE_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2}){16,256}")
_GONE = {"Unregistered", "BadDeviceToken"}
# Our key, team, key id or topic is wrong: every message fails alike until someone fixes it.
_CONFIG = {
    "InvalidProviderToken",
    "ExpiredProviderToken",
    "MissingProviderToken",
    "BadTopic",
    "MissingTopic",
    "TopicDisallowed",
}


class ApnsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_APNS_", extra="ignore")

    # Development builds: https://api.sandbox.push.apple.com
    base_url: str = "https://api.push.apple.com"
    team_id: str = ""
    key_id: str = ""
    # The .p8 signing key (PEM, EC P-256): its content, or the path of the file.
    private_key: SecretStr | None = None
    private_key_file: Path | None = None
    topic: str = ""  # the app's bundle id
    # How long APNs keeps trying an offline device; 0: deliver now or never.
    ttl_s: int = 86_400
    ca_file: Path | None = None  # trust this CA instead of the system's (tests, proxies)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0


def build_payload(intent: NotificationIntent) -> bytes:
    """The notification's JSON payload, compact UTF-8."""
    alert = {"body": intent.body_text}
    if intent.subject:
        alert = {"title": intent.subject, **alert}
    payload: dict[str, Any] = {"aps": {"alert": alert}}
    payload.update({k: v for k, v in intent.data.items() if k != "aps"})
    payload["notification_id"] = intent.notification_id
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def load_signing_key(config: ApnsSettings) -> EllipticCurvePrivateKey:
    """The .p8 key. Raises ValueError naming what is wrong (never echoing the key)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError as e:
        raise RuntimeError(f"the apns connector needs cryptography: {_INSTALL}") from e
    if config.private_key is not None:
        text, where = config.private_key.get_secret_value(), "HERALD_APNS_PRIVATE_KEY"
    elif config.private_key_file is not None:
        where = f"HERALD_APNS_PRIVATE_KEY_FILE ({config.private_key_file})"
        try:
            text = config.private_key_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{where} cannot be read: {type(e).__name__}") from None
    else:
        raise ValueError("set HERALD_APNS_PRIVATE_KEY or HERALD_APNS_PRIVATE_KEY_FILE")
    try:
        key = load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{where} is not an unencrypted PEM key (.p8)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{where} is not an EC P-256 key, as APNs signing keys are")
    return key


@dataclass(frozen=True)
class _ProviderToken:
    value: str
    renew_at: float  # time.monotonic()


class ApnsConnector(Connector):
    channel = "apns"
    # APNs' limit on a notification's payload (the JSON document), in bytes.
    max_body_bytes = 4096
    # Apple: renew the provider token at most every 20 minutes and at least every 60.
    token_refresh_s: ClassVar[float] = 50 * 60
    settings_class = ApnsSettings

    def __init__(self, config: ApnsSettings) -> None:
        """Checks the settings and the key: ValueError for a configuration that cannot send
        anything, RuntimeError when h2, PyJWT or cryptography is missing."""
        # The extra's packages are imported here, not with the module: the registry imports
        # every installed connector, and a core install has no apns extra.
        try:
            import h2  # noqa: F401 - httpx's HTTP/2 needs it
            import httpx  # noqa: F401
            import jwt  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"the apns connector needs httpx, h2 and PyJWT: {_INSTALL}") from e
        for name in ("team_id", "key_id", "topic"):
            if not getattr(config, name):
                raise ValueError(f"HERALD_APNS_{name.upper()} is not set")
        self.config = config
        self._key = load_signing_key(config)
        self._base = config.base_url.rstrip("/")
        self._verify: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            self._verify = ssl.create_default_context(cafile=str(config.ca_file))
        self._client: httpx.AsyncClient | None = None
        self._token: _ProviderToken | None = None

    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            c = self.config
            self._client = httpx.AsyncClient(
                http2=True,
                verify=self._verify,
                timeout=httpx.Timeout(c.read_timeout_s, connect=c.connect_timeout_s),
                follow_redirects=False,
            )
        return self._client

    def provider_token(self, rejected: str | None = None) -> str:
        """The bearer JWT: the current one until it is ``token_refresh_s`` old or is the one
        APNs called expired (``rejected``). Signing is synchronous, so concurrent sends never
        sign twice for one renewal."""
        current = self._token
        if (
            current is not None
            and current.value != rejected
            and time.monotonic() < current.renew_at
        ):
            return current.value
        import jwt

        value = jwt.encode(
            {"iss": self.config.team_id, "iat": int(time.time())},
            self._key,
            algorithm="ES256",
            headers={"kid": self.config.key_id},
        )
        self._token = _ProviderToken(value, time.monotonic() + self.token_refresh_s)
        return value

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        device = intent.recipient
        if not _DEVICE_TOKEN.fullmatch(device):
            return DeliveryResult.rejected(
                "InvalidRecipient", "the recipient is not an APNs device token (hex)"
            )
        payload = build_payload(intent)
        if len(payload) > self.max_body_bytes:
            return DeliveryResult.rejected(
                "PayloadTooLarge",
                f"the payload has {len(payload)} bytes, over APNs' {self.max_body_bytes}",
            )
        ttl = self.config.ttl_s
        headers = {
            "apns-topic": self.config.topic,
            "apns-push-type": "alert",
            "apns-priority": "10",
            "apns-expiration": str(int(time.time()) + ttl if ttl > 0 else 0),
            "content-type": "application/json",
        }
        if _is_uuid(intent.idempotency_key):
            headers["apns-id"] = intent.idempotency_key
        url = f"{self._base}/3/device/{device}"
        import httpx

        rejected: str | None = None
        for _ in range(2):
            token = self.provider_token(rejected)
            try:
                response = await self._http().post(
                    url, content=payload, headers={**headers, "authorization": f"bearer {token}"}
                )
            except httpx.HTTPError as e:
                return DeliveryResult.retryable(type(e).__name__, str(e) or type(e).__name__)
            if response.status_code != 403 or _reason(response)[0] != "ExpiredProviderToken":
                break
            rejected = token
        return _outcome(response, headers.get("apns-id"))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _reason(response: httpx.Response) -> tuple[str | None, int | None]:
    """(reason, timestamp in ms) of an APNs error answer."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    reason, stamp = body.get("reason"), body.get("timestamp")
    return (
        reason if isinstance(reason, str) else None,
        stamp if isinstance(stamp, int) else None,
    )


def _outcome(response: httpx.Response, sent_id: str | None) -> DeliveryResult:
    status = response.status_code
    if 200 <= status < 300:  # APNs answers 200 and echoes apns-id; the body is empty
        apns_id = response.headers.get("apns-id") or sent_id
        return DeliveryResult.sent(f"{status} apns-id {apns_id}", apns_id)
    reason, stamp = _reason(response)
    text = f"{status} {reason or response.reason_phrase}"
    if stamp is not None:
        since = datetime.fromtimestamp(stamp / 1000, tz=UTC).isoformat(timespec="seconds")
        text += f" (token invalid since {since})"
    if reason in _GONE:
        return DeliveryResult.rejected("RecipientGone", text)
    error_class = reason or f"HTTP{status}"
    if reason in _CONFIG or status == 429 or status >= 500:
        return DeliveryResult.retryable(error_class, text, _retry_after(response))
    return DeliveryResult.rejected(error_class, text)


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))
