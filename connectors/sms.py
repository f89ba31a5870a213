"""SMS through the Twilio Messages API (or any provider speaking its shape).

- ``POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json``, form-encoded ``To``,
  ``From`` and/or ``MessagingServiceSid``, ``Body``; HTTP basic auth ``account_sid:auth_token``.
  ``HERALD_SMS_BASE_URL`` can name any provider speaking this shape, so its connections pass
  the SSRF guard (connectors/ssrf.py) like webhooks: a provider on a private address must be
  listed in ``HERALD_SMS_ALLOW_HOSTS``.
- The recipient is validated and normalized to E.164 with ``phonenumbers`` before anything is
  sent (national numbers are read in ``HERALD_SMS_DEFAULT_REGION``); an invalid one is
  rejected as ``InvalidRecipient`` without a request.
- The intent's idempotency key goes in the ``I-Twilio-Idempotency-Token`` header. Herald does
  not rely on Twilio deduplicating on it: whether and for how long it does is Twilio's to
  document, so SMS keeps the duplicate window every HTTP provider without a documented
  idempotency key has (a crash after Twilio accepted and before the ledger recorded it).
- The response text names the encoding and the segment count Herald computed (GSM-7: 160
  septets in one segment, 153 per segment when concatenated, the extension table's characters
  taking two; UCS-2: 70 / 67 UTF-16 code units), e.g. ``queued SM123 (gsm7, 2 segments)``:
  the count is what the message costs.

Outcomes: 2xx sent; Twilio codes 21211, 21614, 21217 (invalid number) rejected
``InvalidRecipient``; 21610 (the recipient replied STOP) rejected ``RecipientGone``; 20003
(authentication) and 21212 (invalid From number) are problems of Herald's configuration that
fail every message alike, so they are *retryable*: the sink's circuit breaker then pauses the
channel until an operator fixes the credentials, instead of rejecting every notification
meanwhile. 429 (Twilio 20429) and 5xx are retryable with Retry-After; other 4xx rejected
(error class ``Twilio<code>``); timeouts and connection errors retryable.

A 2xx whose body is not the expected JSON is taken as sent: Twilio said it accepted the
message, and sending it again would text the person twice. Its response says so and it has
no provider message id.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, ClassVar, NamedTuple
from urllib.parse import urlencode

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from connectors.base import Connector, DeliveryResult
from connectors.http import Answer, HttpClient
from connectors.ssrf import AddressGuard, split_hosts
from pipeline.records import NotificationIntent

__all__ = ["SmsConnector", "SmsEncoding", "SmsSettings", "normalize_number", "sms_encoding"]

_INSTALL = "pip install 'herald[sms]'"

# GSM 03.38 default alphabet (ESC, 0x1B, left out: it only introduces the extension table).
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: each character is sent as ESC + a septet, so it takes two.
_GSM_EXTENDED = frozenset("\f^{}\\[~]|€")

_INVALID_NUMBER = {21211, 21614, 21217}  # invalid 'To', not a mobile number, not valid
_UNSUBSCRIBED = 21610  # the recipient replied STOP
# Our configuration, wrong for every message alike: retryable, so the breaker pauses.
_CONFIG = {20003: "AuthenticationFailed", 21212: "InvalidFromNumber"}
_ANSWER_BYTES = 64 * 1024  # a Messages resource is about 1 KiB of JSON


class SmsEncoding(NamedTuple):
    encoding: str  # "gsm7" or "ucs2"
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def sms_encoding(text: str) -> SmsEncoding:
    """How ``text`` goes over SMS: GSM-7 when every character is in the GSM 03.38 alphabet
    (extension characters count two septets), else UCS-2 (UTF-16 code units, so a character
    outside the BMP counts two). A two-unit character is never split across segments."""
    if all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in text):
        encoding, single, per_segment = "gsm7", 160, 153
        units = [2 if c in _GSM_EXTENDED else 1 for c in text]
    else:
        encoding, single, per_segment = "ucs2", 70, 67
        units = [2 if ord(c) > 0xFFFF else 1 for c in text]
    total = sum(units)
    if total <= single:
        return SmsEncoding(encoding, total, 1)
    segments, used = 1, 0
    for unit in units:
        if used + unit > per_segment:
            segments, used = segments + 1, 0
        used += unit
    return SmsEncoding(encoding, total, segments)


class InvalidNumberError(ValueError):
    """A recipient that is not a valid phone number."""


def normalize_number(number: str, default_region: str | None = None) -> str:
    """``number`` in E.164 (``+447700900123``). National numbers are read in
    ``default_region`` (ISO 3166 alpha-2, e.g. "GB"). Raises InvalidNumberError."""
    try:
        import phonenumbers
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RuntimeError(f"the sms connector needs phonenumbers: {_INSTALL}") from e
    try:
        parsed = phonenumbers.parse(number, default_region)
    except phonenumbers.NumberParseException as e:
        raise InvalidNumberError(f"recipient is not a phone number: {e}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumberError("recipient is not a valid phone number")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


class SmsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_SMS_", extra="ignore")

    base_url: str = "https://api.twilio.com"
    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")
    # The sender: a number (or alphanumeric sender id) and/or a Messaging Service.
    from_number: str | None = None
    messaging_service_sid: str | None = None
    # Region for recipients written without a country code, e.g. "GB"; none: E.164 only.
    default_region: str | None = None
    # Hostnames and IP networks the SSRF guard lets through although private (a provider on
    # the private network, tests). JSON list or comma-separated.
    allow_hosts: Annotated[list[str], NoDecode] = []
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0

    _split_hosts = field_validator("allow_hosts", mode="before")(split_hosts)


class SmsConnector(Connector):
    channel = "sms"
    # Twilio refuses a Body over 1,600 characters (error 21617).
    max_body_chars: ClassVar[int] = 1600
    settings_class = SmsSettings

    def __init__(self, config: SmsSettings) -> None:
        """Raises ValueError for a configuration that cannot send anything, and
        RuntimeError when phonenumbers is not installed."""
        if not config.account_sid:
            raise ValueError("HERALD_SMS_ACCOUNT_SID is not set")
        if not config.auth_token.get_secret_value():
            raise ValueError("HERALD_SMS_AUTH_TOKEN is not set")
        if not (config.from_number or config.messaging_service_sid):
            raise ValueError("set HERALD_SMS_FROM_NUMBER or HERALD_SMS_MESSAGING_SERVICE_SID")
        try:
            import phonenumbers  # noqa: F401 - fail at startup, not on the first message
        except ImportError as e:
            raise RuntimeError(f"the sms connector needs phonenumbers: {_INSTALL}") from e
        self.config = config
        base = config.base_url.rstrip("/")
        self._url = f"{base}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        credentials = f"{config.account_sid}:{config.auth_token.get_secret_value()}"
        self._authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        self._http = HttpClient(
            guard=AddressGuard(config.allow_hosts),
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
        )

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        try:
            to = normalize_number(intent.recipient, self.config.default_region)
        except InvalidNumberError as e:
            return DeliveryResult.rejected("InvalidRecipient", str(e))
        body = intent.body_text
        if not body:
            return DeliveryResult.rejected("InvalidPayload", "the SMS body is empty")
        if len(body) > self.max_body_chars:
            return DeliveryResult.rejected(
                "PayloadTooLarge",
                f"the SMS body has {len(body)} characters, over {self.max_body_chars}",
            )
        form = {"To": to, "Body": body}
        if self.config.from_number:
            form["From"] = self.config.from_number
        if self.config.messaging_service_sid:
            form["MessagingServiceSid"] = self.config.messaging_service_sid
        answer = await self._http.request(
            "POST",
            self._url,
            body=urlencode(form).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "I-Twilio-Idempotency-Token": intent.idempotency_key,
                "Accept": "application/json",
                "Authorization": self._authorization,
            },
            max_answer_bytes=_ANSWER_BYTES,
        )
        if isinstance(answer, DeliveryResult):
            return answer
        return _outcome(answer, sms_encoding(body))

    async def aclose(self) -> None:
        await self._http.aclose()


def _json(answer: Answer) -> dict[str, Any]:
    body = answer.json()
    return body if isinstance(body, dict) else {}


def _outcome(response: Answer, encoding: SmsEncoding) -> DeliveryResult:
    status = response.status
    answer = _json(response)
    cost = f"({encoding.encoding}, {encoding.segments} segment{'s' * (encoding.segments != 1)})"
    if 200 <= status < 300:
        sid = answer.get("sid")
        if not isinstance(sid, str):
            return DeliveryResult.sent(f"{status} with an unreadable body, taken as sent {cost}")
        return DeliveryResult.sent(f"{answer.get('status', status)} {sid} {cost}", sid)
    code = answer.get("code")
    message = str(answer.get("message") or response.reason or "")
    text = f"{status} {code} {message}" if isinstance(code, int) else f"{status} {message}"
    if code in _INVALID_NUMBER:
        return DeliveryResult.rejected("InvalidRecipient", text)
    if code == _UNSUBSCRIBED:
        return DeliveryResult.rejected("RecipientGone", text)
    if isinstance(code, int) and code in _CONFIG:
        return DeliveryResult.retryable(_CONFIG[code], text)
    error_class = f"Twilio{code}" if isinstance(code, int) else f"HTTP{status}"
    if status == 429 or status >= 500:
        return DeliveryResult.retryable(error_class, text, response.retry_after)
    if status == 401:  # no Twilio code, but still the credentials: see _CONFIG
        return DeliveryResult.retryable("AuthenticationFailed", text)
    return DeliveryResult.rejected(error_class, text)
