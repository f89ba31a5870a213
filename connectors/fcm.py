"""Push notifications through Firebase Cloud Messaging's HTTP v1 API.

- ``POST {base_url}/v1/projects/{project_id}/messages:send`` with
  ``{"message": {"token", "notification": {"title", "body"}, "data"}}``; ``data`` is the
  intent's data plus ``notification_id``, so the app can tell a repeat from a new message.
- Authorization is an OAuth 2 access token from the service account's key, obtained with the
  JWT-bearer grant (RFC 7523): an RS256 JWT (``iss`` the client email, ``scope``
  firebase.messaging, ``aud`` the token URI) posted to ``token_uri``. The token is cached
  until shortly before ``expires_in`` runs out and shared by concurrent sends (one request
  fetches it); a 401 makes the connector fetch a new one and try once more.
- Hosts: Google's (``HERALD_FCM_BASE_URL``, the key's ``token_uri``), both from the
  operator's configuration; nothing in an intent chooses where a request goes (the
  registration token travels in the JSON body). So FCM's HTTP client (connectors/http.py)
  has no SSRF guard.
- FCM has no idempotency key: the v1 API takes none, so a resend after a crash (accepted by
  FCM, not yet recorded by the sink) can reach the device twice. ``notification_id`` in the
  data lets the app drop it.

Outcomes, by the ``FcmError`` code when FCM gives one, else its status:
UNREGISTERED -> rejected ``RecipientGone``; INVALID_ARGUMENT, SENDER_ID_MISMATCH,
THIRD_PARTY_AUTH_ERROR (the app's APNs / web push credentials, for that platform's tokens) ->
rejected; QUOTA_EXCEEDED (429), UNAVAILABLE (503), INTERNAL (500) -> retryable with
Retry-After. Herald's own credentials failing (401 UNAUTHENTICATED after a fresh token, 403
PERMISSION_DENIED without an FCM code, the token endpoint refusing the key or unreachable) is
retryable: every message would fail alike, and the sink's circuit breaker should pause the
channel rather than reject them all. Other 4xx rejected; timeouts and connection errors
retryable. A 200 whose body is not the expected JSON is taken as sent (FCM accepted the
message; sending again would notify twice), without a provider message id.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.base import Connector, DeliveryResult
from connectors.http import Answer, HttpClient
from pipeline.records import NotificationIntent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["FcmConnector", "FcmSettings"]

_INSTALL = "pip install 'herald[fcm]'"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_ASSERTION_LIFETIME_S = 3600  # Google's maximum for a JWT-bearer assertion
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# A registration token: printable ASCII, no spaces (FCM's are base64url with a ':').
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")
_ANSWER_BYTES = 64 * 1024  # FCM's and the token endpoint's answers are small JSON

_REJECTED = {
    "UNREGISTERED": "RecipientGone",
    "INVALID_ARGUMENT": "InvalidArgument",
    "SENDER_ID_MISMATCH": "SenderIdMismatch",
    "THIRD_PARTY_AUTH_ERROR": "ThirdPartyAuthError",
}
_RETRYABLE = {
    "QUOTA_EXCEEDED": "QuotaExceeded",
    "UNAVAILABLE": "Unavailable",
    "INTERNAL": "Internal",
    "UNAUTHENTICATED": "Unauthenticated",
    "PERMISSION_DENIED": "PermissionDenied",
}


class FcmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_FCM_", extra="ignore")

    base_url: str = "https://fcm.googleapis.com"
    # The service account key: the JSON document itself, or the path of its file.
    service_account_json: SecretStr | None = None
    service_account_file: Path | None = None
    # Default: the key's project_id and token_uri.
    project_id: str | None = None
    token_uri: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: RSAPrivateKey
    private_key_id: str | None
    project_id: str
    token_uri: str

    def __repr__(self) -> str:  # never the key
        return f"ServiceAccount({self.client_email!r}, project {self.project_id!r})"


def load_service_account(config: FcmSettings) -> ServiceAccount:
    """The key from the settings. Raises ValueError naming what is wrong (never echoing the
    key), RuntimeError when cryptography is missing."""
    try:
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError as e:
        raise RuntimeError(f"the fcm connector needs cryptography: {_INSTALL}") from e
    if config.service_account_json is not None:
        where = "HERALD_FCM_SERVICE_ACCOUNT_JSON"
        text = config.service_account_json.get_secret_value()
    elif config.service_account_file is not None:
        where = f"HERALD_FCM_SERVICE_ACCOUNT_FILE ({config.service_account_file})"
        try:
            text = config.service_account_file.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{where} cannot be read: {e.strerror}") from None
    else:
        raise ValueError("set HERALD_FCM_SERVICE_ACCOUNT_JSON or HERALD_FCM_SERVICE_ACCOUNT_FILE")
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValueError(f"{where} is not a JSON document") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where} is not a JSON object")
    for name in ("client_email", "private_key"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise ValueError(f"{where} has no {name}")
    project_id = config.project_id or doc.get("project_id")
    if not isinstance(project_id, str) or not project_id:
        raise ValueError(f"{where} has no project_id; set HERALD_FCM_PROJECT_ID")
    token_uri = config.token_uri or doc.get("token_uri") or "https://oauth2.googleapis.com/token"
    try:
        key = load_pem_private_key(doc["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: private_key is not an unencrypted PEM key") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"{where}: private_key is not an RSA key")
    key_id = doc.get("private_key_id")
    return ServiceAccount(
        doc["client_email"],
        key,
        key_id if isinstance(key_id, str) else None,
        project_id,
        str(token_uri),
    )


class TokenError(Exception):
    """The token endpoint did not give an access token; the message is safe to record."""


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float  # time.monotonic()


class FcmConnector(Connector):
    channel = "fcm"
    # FCM's limit on a message's payload (notification and data); above it FCM answers
    # INVALID_ARGUMENT, which rejects the notification.
    max_body_bytes = 4096
    settings_class = FcmSettings

    def __init__(self, config: FcmSettings) -> None:
        """Reads and checks the service account key: ValueError for a configuration that
        cannot send anything, RuntimeError when PyJWT or cryptography is missing."""
        try:
            import jwt  # noqa: F401 - fail at startup, not on the first message
        except ImportError as e:
            raise RuntimeError(f"the fcm connector needs PyJWT: {_INSTALL}") from e
        self.config = config
        self.account = load_service_account(config)
        base = config.base_url.rstrip("/")
        self._url = f"{base}/v1/projects/{self.account.project_id}/messages:send"
        self._http = HttpClient(
            connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s
        )
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        self._fetched = 0  # token requests answered, to tell waiters one failed meanwhile
        self._fetch_error: str | None = None

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        if not _TOKEN.fullmatch(intent.recipient):
            return DeliveryResult.rejected(
                "InvalidRecipient", "the recipient is not an FCM registration token"
            )
        notification = {"body": intent.body_text}
        if intent.subject:
            notification["title"] = intent.subject
        message = {
            "message": {
                "token": intent.recipient,
                "notification": notification,
                "data": {**intent.data, "notification_id": intent.notification_id},
            }
        }
        body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            token = await self._access_token()
            answer = await self._post(body, token)
            if (
                isinstance(answer, Answer)
                and answer.status == 401
                and _error(answer)[0] != "THIRD_PARTY_AUTH_ERROR"
            ):  # the token expired or was revoked early: fetch another, once
                token = await self._access_token(rejected=token)
                answer = await self._post(body, token)
        except TokenError as e:
            return DeliveryResult.retryable("TokenRequestFailed", str(e))
        return answer if isinstance(answer, DeliveryResult) else _outcome(answer)

    async def _post(self, body: bytes, token: str) -> Answer | DeliveryResult:
        return await self._http.request(
            "POST",
            self._url,
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            max_answer_bytes=_ANSWER_BYTES,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- OAuth 2 --------------------------------------------------------------------------

    async def _access_token(self, rejected: str | None = None) -> str:
        """A valid access token: the cached one unless it is near its end or is ``rejected``
        (the one a 401 answered). Concurrent callers share one fetch, and its failure: a
        token endpoint that is down costs one timeout, not one per waiting send."""
        seen = self._fetched
        async with self._token_lock:
            cached = self._token
            if (
                cached is not None
                and cached.value != rejected
                and time.monotonic() < cached.refresh_at
            ):
                return cached.value
            if self._fetched != seen and self._fetch_error is not None:
                raise TokenError(self._fetch_error)  # failed while this caller waited
            try:
                self._token = await self._fetch_token()
            except TokenError as e:
                self._fetch_error = str(e)
                raise
            else:
                self._fetch_error = None
            finally:
                self._fetched += 1
            return self._token.value

    def assertion(self, now: int | None = None) -> str:
        """The signed JWT for the JWT-bearer grant."""
        import jwt

        issued = int(time.time()) if now is None else now
        a = self.account
        claims = {
            "iss": a.client_email,
            "scope": SCOPE,
            "aud": a.token_uri,
            "iat": issued,
            "exp": issued + _ASSERTION_LIFETIME_S,
        }
        headers = {"kid": a.private_key_id} if a.private_key_id else None
        return jwt.encode(claims, a.private_key, algorithm="RS256", headers=headers)

    async def _fetch_token(self) -> _Token:
        started = time.monotonic()
        response = await self._http.request(
            "POST",
            self.account.token_uri,
            body=urlencode({"grant_type": _GRANT, "assertion": self.assertion()}).encode(),
            headers={
                "Accept": "application/json",
                "Content-Type": "application/x-www-form-urlencoded",
            },
            max_answer_bytes=_ANSWER_BYTES,
        )
        if isinstance(response, DeliveryResult):
            raise TokenError(f"token endpoint: {response.error_class} {response.response}")
        answer = response.json()
        if not isinstance(answer, dict):
            answer = {}
        if response.status != 200:
            error = answer.get("error") or response.reason
            detail = answer.get("error_description")
            text = f"token endpoint {response.status} {error}"
            raise TokenError(f"{text}: {detail}" if detail else text)
        value, expires_in = answer.get("access_token"), answer.get("expires_in", 3600)
        if not isinstance(value, str) or not value or not isinstance(expires_in, int | float):
            raise TokenError("token endpoint 200 without an access_token")
        # Refresh before the end: a token that expires in flight costs a 401 and a retry.
        lifetime = float(expires_in)
        return _Token(value, started + lifetime - min(300.0, lifetime / 2))


def _error(response: Answer) -> tuple[str | None, str | None, str]:
    """(FcmError code, status, message) of an error answer; Nones when it has no such
    body."""
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None, response.reason
    code = None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == _FCM_ERROR:
            code = detail.get("errorCode")
    status = error.get("status")
    return (
        code if isinstance(code, str) else None,
        status if isinstance(status, str) else None,
        str(error.get("message") or response.reason),
    )


def _outcome(response: Answer) -> DeliveryResult:
    status = response.status
    if 200 <= status < 300:
        body = response.json()
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return DeliveryResult.sent(f"{status} with an unreadable body, taken as sent")
        return DeliveryResult.sent(f"{status} {name}", name)
    code, state, message = _error(response)
    text = f"{status} {code or state}: {message}" if code or state else f"{status} {message}"
    for key in (code, state):
        if key in _REJECTED:
            return DeliveryResult.rejected(_REJECTED[key], text)
        if key in _RETRYABLE:
            return DeliveryResult.retryable(_RETRYABLE[key], text, response.retry_after)
    name = code or state
    error_class = _camel(name) if name else f"HTTP{status}"
    if status in (401, 403, 429) or status >= 500:
        return DeliveryResult.retryable(error_class, text, response.retry_after)
    return DeliveryResult.rejected(error_class, text)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
