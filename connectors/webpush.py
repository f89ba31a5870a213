"""Web Push: VAPID (RFC 8292) and aes128gcm payload encryption (RFC 8291, RFC 8188).

- The recipient is a browser's push subscription as JSON, exactly what
  ``PushSubscription.toJSON()`` gives: ``{"endpoint": "https://...", "keys": {"p256dh":
  "<base64url>", "auth": "<base64url>"}}``. A malformed one is rejected as
  ``InvalidRecipient`` without a request. It holds the subscription's ``auth`` secret.
- The payload is the JSON ``{"title", "body", "data", "notification_id"}``, encrypted with a
  fresh ECDH key and salt per message (``http_ece``). Web Push guarantees 4096 bytes of
  encrypted body in one record, which leaves 3993 bytes of JSON; a larger payload is rejected
  as ``PayloadTooLarge`` before sending.
- VAPID: an ES256 JWT (aud = the endpoint's origin, exp <= 24 h, sub = the operator's
  ``mailto:`` or ``https:`` contact) in ``Authorization: vapid t=<jwt>, k=<public key>``. A
  token is reused per push service until half its lifetime has passed.
- Idempotency: Web Push has no idempotency key. ``Topic`` is derived from the notification
  id, so a resend (after a crash or a retry) *replaces* a copy the push service still holds
  undelivered instead of queueing a second one. A copy already delivered to the browser is
  not recalled: the service worker should pass ``notification_id`` as the ``tag`` of
  ``showNotification`` so a duplicate replaces the notification on screen.
- ``Urgency`` is ``normal`` unless the intent's data says ``urgency`` = ``high`` (or one of
  the other RFC 8030 values ``very-low``, ``low``); ``TTL`` is ``HERALD_WEBPUSH_TTL_S``.

Outcomes:

- 2xx: sent; the ``Location`` header (the push message resource) is the provider message id.
- 404, 410: rejected ``RecipientGone``: the subscription expired or the user unsubscribed.
  Operators must delete it; it will never work again.
- 413: rejected ``PayloadTooLarge``. Other 4xx (400 included) and 3xx: rejected.
- 429 and 5xx: retryable, honouring ``Retry-After``. Timeouts and connection errors:
  retryable. A timeout after the body was sent may leave a copy queued at the push service:
  the resend carries the same ``Topic`` and replaces it.
- 401 and 403: retryable (``VapidUnauthorized``, ``VapidForbidden``). They mean the VAPID
  key, JWT or subject was refused, which is almost always our configuration (a rotated or
  wrong key, a skewed clock) and hits every message alike. As rejections they would
  dead-letter every notification until someone noticed; as retryable failures they open the
  circuit breaker, which pauses the sink with the records kept in Kafka. The cost: a single
  subscription created with another application server key (a 403 that only it gets) uses
  up its retries and goes DEAD instead of REJECTED at once.

Endpoints must be ``https``, and every connection passes the SSRF guard (connectors/ssrf.py):
the endpoint comes from a browser, so it is attacker-controlled. An endpoint whose host is,
or resolves to, a loopback, private, link-local or otherwise non-global address, in any
spelling, is rejected ``ForbiddenAddress`` without a connection, and the connection goes to
the address that was checked. ``HERALD_WEBPUSH_ALLOW_HOSTS`` (host names and IP networks)
lifts both rules for what it lists (local push services, tests).

Secrets (the VAPID private key, the JWT, subscription auth secrets) never appear in results,
exceptions or logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

from connectors.base import Connector, DeliveryResult
from connectors.http import Answer, HttpClient
from connectors.ssrf import AddressGuard, Resolver
from pipeline.records import NotificationIntent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

__all__ = [
    "InvalidSubscriptionError",
    "Subscription",
    "WebPushConnector",
    "WebPushSettings",
    "build_payload",
    "check_endpoint",
    "generate_vapid_key",
    "load_vapid_key",
    "parse_subscription",
    "topic_for",
    "urgency_for",
]

INSTALL_HINT = "pip install 'herald[webpush]'"

# RFC 8291 section 4: one 4096-byte record, less its header (16 salt + 4 rs + 1 idlen +
# 65 keyid), the 16-byte AEAD tag and the 1-byte padding delimiter.
MAX_ENCRYPTED_BYTES = 4096
_HEADER_BYTES = 16 + 4 + 1 + 65
MAX_PAYLOAD_BYTES = MAX_ENCRYPTED_BYTES - _HEADER_BYTES - 16 - 1  # 3993
# RFC 8292 section 2: exp no more than 24 hours after the request.
MAX_JWT_LIFETIME_S = 24 * 3600
URGENCIES = ("very-low", "low", "normal", "high")  # RFC 8030 section 5.3
_RESPONSE_CHARS = 500  # how much of a push service's error body is kept
_ANSWER_BYTES = 4096  # how much of a push service's answer is read
_MAX_AUDIENCES = 256  # cached VAPID tokens (one per push service origin)


class WebPushSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_WEBPUSH_", extra="ignore")

    #: The application server's P-256 private key: PEM (PKCS#8 or SEC1; "\n" escapes are
    #: accepted), base64url DER, or the raw 32-byte scalar in base64url (as `web-push
    #: generate-vapid-keys` prints it). Its public key is the `applicationServerKey` the
    #: browser subscribed with.
    vapid_private_key: SecretStr | None = None
    #: Who push services contact about our traffic: "mailto:ops@example.com" or an https URL.
    vapid_subject: str = ""
    #: JWT lifetime; push services refuse more than 24 h (kept below for clock skew).
    vapid_expiry_s: int = Field(12 * 3600, gt=60, le=MAX_JWT_LIFETIME_S)
    #: How long the push service keeps an undelivered message (TTL header).
    ttl_s: int = Field(86_400, ge=0)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    max_connections: int = 100
    #: Trust only this CA (PEM) instead of the usual bundle: a private push service, tests.
    ca_file: Path | None = None
    #: Hosts and IP networks (e.g. 127.0.0.0/8) allowed despite plain http or a
    #: loopback/private address, comma-separated (or a JSON list): local push services, tests.
    allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [h for h in (part.strip() for part in text.split(",")) if h]
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        return [h.strip().lower().strip("[]") for h in value]


class InvalidSubscriptionError(ValueError):
    """A recipient that is not a usable push subscription (says what is wrong, never the
    subscription's keys)."""


@dataclass(frozen=True)
class Subscription:
    endpoint: str
    p256dh: bytes  # the browser's uncompressed P-256 public point (65 bytes)
    auth: bytes  # the 16-byte authentication secret

    def __repr__(self) -> str:  # the auth secret stays out of logs and tracebacks
        return f"Subscription(endpoint={self.endpoint!r})"


def _b64url_decode(text: str) -> bytes:
    """base64url with or without padding; standard base64's '+/' are tolerated."""
    s = text.strip().replace("+", "-").replace("/", "_").rstrip("=")
    return base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_", validate=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _import(name: str) -> ModuleType:
    """An optional dependency, or a RuntimeError that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise RuntimeError(
            f"the webpush connector needs the {name!r} package: {INSTALL_HINT}"
        ) from None


def parse_subscription(recipient: str) -> Subscription:
    """The push subscription in an intent's recipient. Raises InvalidSubscriptionError."""
    _import("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        sub = json.loads(recipient)
    except ValueError:
        raise InvalidSubscriptionError(
            "recipient is not JSON: expected a push subscription"
        ) from None
    if not isinstance(sub, dict):
        raise InvalidSubscriptionError("recipient is not a push subscription object")
    endpoint = sub.get("endpoint")
    keys = sub.get("keys")
    if not isinstance(endpoint, str) or not endpoint:
        raise InvalidSubscriptionError("push subscription has no endpoint")
    if not isinstance(keys, dict):
        raise InvalidSubscriptionError("push subscription has no keys")
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    if not isinstance(p256dh, str) or not isinstance(auth, str):
        raise InvalidSubscriptionError("push subscription keys need p256dh and auth")
    try:
        point, secret = _b64url_decode(p256dh), _b64url_decode(auth)
    except (binascii.Error, ValueError):
        raise InvalidSubscriptionError("push subscription keys are not base64url") from None
    if len(point) != 65 or point[0] != 4:
        raise InvalidSubscriptionError("p256dh is not an uncompressed P-256 point")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise InvalidSubscriptionError("p256dh is not a point on P-256") from None
    if len(secret) != 16:
        raise InvalidSubscriptionError("auth is not a 16-byte secret")
    return Subscription(endpoint, point, secret)


def check_endpoint(endpoint: str, guard: AddressGuard) -> str:
    """The endpoint's origin (scheme://host[:port], the VAPID audience). Raises
    InvalidSubscriptionError for an endpoint Herald must not call: not an absolute http(s)
    URL, credentials in it, or plain http to a host ``guard`` does not allowlist. (Which
    addresses may be reached is checked when connecting, by the guard.)"""
    if any(c in endpoint for c in "\r\n\t "):
        raise InvalidSubscriptionError("endpoint contains whitespace")
    try:
        url = URL(endpoint)
    except (ValueError, TypeError):
        raise InvalidSubscriptionError("endpoint is not a valid URL") from None
    if url.scheme not in ("https", "http") or not url.raw_host:
        raise InvalidSubscriptionError("endpoint is not an absolute http(s) URL")
    if url.raw_user is not None or url.raw_password is not None:
        raise InvalidSubscriptionError("endpoint must not carry credentials")
    if url.scheme != "https" and not guard.allowlisted(url.raw_host):
        raise InvalidSubscriptionError(
            f"endpoint host {url.raw_host} is not https (allow it in HERALD_WEBPUSH_ALLOW_HOSTS)"
        )
    return str(url.origin())


def topic_for(notification_id: str) -> str:
    """The Topic header: at most 32 base64url characters, the same for every resend of a
    notification (forced redeliveries included), so a resend replaces an undelivered copy."""
    try:
        raw = uuid.UUID(notification_id).bytes  # 22 characters
    except ValueError:
        raw = hashlib.sha256(notification_id.encode()).digest()[:24]  # 32 characters
    return _b64url(raw)


def urgency_for(intent: NotificationIntent) -> str:
    value = intent.data.get("urgency", "").strip().lower()
    return value if value in URGENCIES else "normal"


def build_payload(intent: NotificationIntent) -> bytes:
    payload = {
        "title": intent.subject or "",
        "body": intent.body_text,
        "data": dict(intent.data),
        "notification_id": intent.notification_id,
    }
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON can still carry it escaped
        return json.dumps(payload, separators=(",", ":")).encode("ascii")


def load_vapid_key(value: str) -> EllipticCurvePrivateKey:
    """A P-256 private key from PEM, base64url DER or a base64url raw scalar. Raises
    ValueError (without the key in it)."""
    _import("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    text = value.strip().replace("\\n", "\n")
    key: object = None
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = _b64url_decode(text)
            if len(raw) == 32:
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:
                key = serialization.load_der_private_key(raw, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm: all say "not a key"
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(
            "HERALD_WEBPUSH_VAPID_PRIVATE_KEY is not a P-256 private key "
            "(PEM, base64url DER or a base64url 32-byte scalar)"
        )
    return key


def _public_key(key: EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _b64url(point)


def generate_vapid_key() -> tuple[str, str]:
    """A new VAPID key pair: (private key as a base64url scalar for
    HERALD_WEBPUSH_VAPID_PRIVATE_KEY, public key for the browser's applicationServerKey)."""
    _import("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return _b64url(key.private_numbers().private_value.to_bytes(32, "big")), _public_key(key)


class _Vapid:
    """Signs and caches the VAPID JWT per audience."""

    def __init__(self, key: EllipticCurvePrivateKey, subject: str, lifetime_s: int) -> None:
        self._key = key
        self._subject = subject
        self._lifetime_s = lifetime_s
        self.public_key = _public_key(key)
        self._tokens: dict[str, tuple[str, float]] = {}  # audience -> (jwt, renew at)

    def token(self, audience: str) -> str:
        now = time.time()
        cached = self._tokens.get(audience)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = {"aud": audience, "exp": int(now) + self._lifetime_s, "sub": self._subject}
        token = self._sign(claims)
        if len(self._tokens) >= _MAX_AUDIENCES:  # audiences come from subscriptions
            self._tokens.clear()
        self._tokens[audience] = (token, now + self._lifetime_s / 2)
        return token

    def _sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils

        header = {"typ": "JWT", "alg": "ES256"}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = utils.decode_dss_signature(der)  # JWS wants r || s, 32 bytes each
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def authorization(self, audience: str) -> tuple[str, str]:
        """(Authorization header value, the JWT in it: to redact from answers)."""
        token = self.token(audience)
        return f"vapid t={token}, k={self.public_key}", token


class WebPushConnector(Connector):
    channel = "webpush"
    # The JSON payload (title, body, data, notification_id) must fit one 4096-byte
    # aes128gcm record: 3993 bytes. The body alone can never be larger; the whole payload
    # is checked before sending.
    max_body_bytes = MAX_PAYLOAD_BYTES
    settings_class = WebPushSettings

    def __init__(
        self,
        config: WebPushSettings,
        *,
        resolver: Resolver | None = None,
        socket_factory: aiohttp.SocketFactoryType | None = None,
    ) -> None:
        """``resolver`` and ``socket_factory`` replace the system resolver under the SSRF
        guard and the making of sockets (tests use them to observe where connections go)."""
        _import("cryptography")
        self._ece = _import("http_ece")
        if config.vapid_private_key is None or not config.vapid_private_key.get_secret_value():
            raise ValueError(
                "HERALD_WEBPUSH_VAPID_PRIVATE_KEY is not set: generate a key pair with "
                "connectors.webpush.generate_vapid_key() and give the public half to the web "
                "page as its applicationServerKey"
            )
        subject = config.vapid_subject.strip()
        if not subject.startswith(("mailto:", "https:")):
            raise ValueError(
                "HERALD_WEBPUSH_VAPID_SUBJECT must be a mailto: address or an https: URL "
                "where push services can reach the operator"
            )
        self.config = config
        self._vapid = _Vapid(
            load_vapid_key(config.vapid_private_key.get_secret_value()),
            subject,
            config.vapid_expiry_s,
        )
        self._guard = AddressGuard(config.allow_hosts, resolver)
        # In-flight sends are the runtime's to hold (one per pooled connection).
        self.max_concurrency = max(1, config.max_connections)
        self._http = HttpClient(
            guard=self._guard,
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            max_connections=config.max_connections,
            ca_file=config.ca_file,
            socket_factory=socket_factory,
        )

    @property
    def application_server_key(self) -> str:
        """The VAPID public key (base64url): what the web page passes to
        ``pushManager.subscribe({applicationServerKey})``."""
        return self._vapid.public_key

    @classmethod
    def describe_address(cls, recipient: str) -> str:
        """The endpoint only: the subscription's keys stay out of statuses and the ledger."""
        try:
            return parse_subscription(recipient).endpoint
        except InvalidSubscriptionError:
            return "<invalid subscription>"

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            sub = parse_subscription(intent.recipient)
            audience = check_endpoint(sub.endpoint, self._guard)
        except InvalidSubscriptionError as e:
            return DeliveryResult.rejected("InvalidRecipient", str(e))
        plaintext = build_payload(intent)
        if len(plaintext) > MAX_PAYLOAD_BYTES:
            return DeliveryResult.rejected(
                "PayloadTooLarge",
                f"payload is {len(plaintext)} bytes of JSON; Web Push carries at most "
                f"{MAX_PAYLOAD_BYTES} ({MAX_ENCRYPTED_BYTES} encrypted)",
            )
        body = self._encrypt(plaintext, sub)
        authorization, token = self._vapid.authorization(audience)
        headers = {
            "Authorization": authorization,
            "TTL": str(self.config.ttl_s),
            "Urgency": urgency_for(intent),
            "Topic": topic_for(intent.notification_id),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        answer = await self._http.request(
            "POST", sub.endpoint, body=body, headers=headers, max_answer_bytes=_ANSWER_BYTES
        )
        if isinstance(answer, DeliveryResult):
            return answer
        return _outcome(answer, token)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _encrypt(self, plaintext: bytes, sub: Subscription) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec

        # A fresh ECDH key and salt per message (RFC 8291 section 3.4); the keyid in the
        # aes128gcm header carries the public half.
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        body: bytes = self._ece.encrypt(
            plaintext,
            salt=os.urandom(16),
            private_key=ephemeral,
            dh=sub.p256dh,
            auth_secret=sub.auth,
            version="aes128gcm",
            rs=MAX_ENCRYPTED_BYTES,
        )
        return body


def _redact(text: str, token: str) -> str:
    return text.replace(token, "[vapid-jwt]") if token else text


def _outcome(answer: Answer, token: str) -> DeliveryResult:
    status = answer.status
    text = f"{status} {answer.reason}".strip()
    detail = answer.text[:_RESPONSE_CHARS].strip()
    location = answer.headers.get("Location")
    if 200 <= status < 300:
        return DeliveryResult.sent(text, location)
    if detail:
        text = f"{text}: {detail}"
    if location and 300 <= status < 400:
        text = f"{text} (Location: {location})"
    text = _redact(text, token)
    retry_after = answer.retry_after
    if status in (404, 410):
        return DeliveryResult.rejected("RecipientGone", text)
    if status == 413:
        return DeliveryResult.rejected("PayloadTooLarge", text)
    if status == 429:
        return DeliveryResult.retryable("RateLimited", text, retry_after)
    if status == 401:
        return DeliveryResult.retryable("VapidUnauthorized", text, retry_after)
    if status == 403:
        return DeliveryResult.retryable("VapidForbidden", text, retry_after)
    if status >= 500:
        return DeliveryResult.retryable(f"HTTP{status}", text, retry_after)
    if status == 400:
        return DeliveryResult.rejected("BadRequest", text)
    return DeliveryResult.rejected(f"HTTP{status}", text)
