"""One-click unsubscribe tokens (RFC 8058, RFC 2369).

A token names a user, a category and a channel and expires; it is signed with
HMAC-SHA256 under ``HERALD_UNSUBSCRIBE_SECRET``::

    <payload>.<signature>     both base64url without padding
    payload   = {"v": 1, "u": user id, "c": category, "ch": channel, "exp": epoch seconds}
    signature = HMAC-SHA256(secret, "herald-unsubscribe." + payload)

Only URL-safe characters, so it fits a URL path and a mailto subject as it is. Anyone who
holds a token can opt its user out of its category on its channel until it expires, and
nothing else: that is what a List-Unsubscribe link is for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote

from pipeline.records import DATA_LIST_UNSUBSCRIBE_MAILTO, DATA_LIST_UNSUBSCRIBE_URL

if TYPE_CHECKING:
    from pipeline.settings import HeraldSettings

__all__ = [
    "ExpiredToken",
    "ForgedToken",
    "TokenError",
    "UnsubscribeLinks",
    "UnsubscribeToken",
    "sign",
    "verify",
]

_CONTEXT = b"herald-unsubscribe."


class TokenError(ValueError):
    """A token that must change nothing."""


class ForgedToken(TokenError):
    """Malformed, or its signature does not match: not one Herald made."""


class ExpiredToken(TokenError):
    """Genuine, but past its expiry."""


@dataclass(frozen=True)
class UnsubscribeToken:
    user_id: str
    category: str
    channel: str
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, _CONTEXT + payload.encode("ascii"), hashlib.sha256).digest()


def sign(secret: bytes, user_id: str, category: str, channel: str, expires_at: datetime) -> str:
    body = {"v": 1, "u": user_id, "c": category, "ch": channel, "exp": int(expires_at.timestamp())}
    payload = _b64(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    return f"{payload}.{_b64(_mac(secret, payload))}"


def verify(secret: bytes, token: str, now: datetime) -> UnsubscribeToken:
    """The token's content. ForgedToken when it is not one signed with ``secret`` (checked
    in constant time, before anything in it is read), ExpiredToken when it is past due."""
    payload, dot, signature = token.partition(".")
    try:
        given = _unb64(signature)
        if not dot or not payload.isascii():
            raise ValueError("not a token")
    except ValueError:
        raise ForgedToken("not an unsubscribe token") from None
    if not hmac.compare_digest(given, _mac(secret, payload)):
        raise ForgedToken("the token's signature does not match")
    try:
        body = json.loads(_unb64(payload))
        found = UnsubscribeToken(
            str(body["u"]),
            str(body["c"]),
            str(body["ch"]),
            datetime.fromtimestamp(int(body["exp"]), UTC),
        )
    except (ValueError, KeyError, TypeError):
        raise ForgedToken("the token's content is malformed") from None
    if found.expires_at <= now:
        raise ExpiredToken(f"the link expired at {found.expires_at.isoformat()}")
    return found


@dataclass(frozen=True)
class UnsubscribeLinks:
    """Makes the List-Unsubscribe targets of one notification (for the router)."""

    secret: bytes
    base_url: str  # the API's public base, https://notify.example.com
    mailto: str | None = None
    ttl: timedelta = timedelta(days=60)

    @classmethod
    def from_settings(cls, settings: HeraldSettings) -> UnsubscribeLinks | None:
        """None unless HERALD_UNSUBSCRIBE_SECRET and HERALD_UNSUBSCRIBE_URL are set."""
        if settings.unsubscribe_secret is None or not settings.unsubscribe_url:
            return None
        return cls(
            settings.unsubscribe_secret.get_secret_value().encode(),
            settings.unsubscribe_url.rstrip("/"),
            settings.unsubscribe_mailto or None,
            timedelta(seconds=settings.unsubscribe_ttl_s),
        )

    def token(self, user_id: str, category: str, channel: str, now: datetime) -> str:
        return sign(self.secret, user_id, category, channel, now + self.ttl)

    def url(self, token: str) -> str:
        return f"{self.base_url}/u/{token}"

    def data(self, user_id: str, category: str, channel: str, now: datetime) -> dict[str, str]:
        """The intent's reserved data keys (records.DATA_LIST_UNSUBSCRIBE_*)."""
        token = self.token(user_id, category, channel, now)
        out = {DATA_LIST_UNSUBSCRIBE_URL: self.url(token)}
        if self.mailto:
            out[DATA_LIST_UNSUBSCRIBE_MAILTO] = f"mailto:{self.mailto}?subject={quote(token)}"
        return out
