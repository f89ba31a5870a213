"""Herald's own records as Python classes, mapped to and from their Avro schemas."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "DATA_LIST_UNSUBSCRIBE_MAILTO",
    "DATA_LIST_UNSUBSCRIBE_URL",
    "DELIVERY_STATUS",
    "NOTIFICATION_INTENT",
    "DeliveryState",
    "DeliveryStatus",
    "NotificationIntent",
    "notification_id",
]

NOTIFICATION_INTENT = "herald.notifications.NotificationIntent"
DELIVERY_STATUS = "herald.notifications.DeliveryStatus"

# Reserved keys of NotificationIntent.data, set by the router (never by a rule's ``data``):
# the one-click unsubscribe URL (https, RFC 8058) and mailto address (RFC 2369) of a
# non-critical email. The email connector turns them into List-Unsubscribe and
# List-Unsubscribe-Post headers.
DATA_LIST_UNSUBSCRIBE_URL = "list_unsubscribe_url"
DATA_LIST_UNSUBSCRIBE_MAILTO = "list_unsubscribe_mailto"

# Namespace for notification ids. Fixed forever: changing it would change every id and so
# every idempotency key.
_NOTIFICATION_NS = uuid.UUID("6f1c3d4e-2b7a-5e8f-9a0b-1c2d3e4f5a6b")


def notification_id(event_id: str, rule: str, channel: str, recipient: str) -> str:
    """uuid5 over (event_id, rule, channel, recipient): the same event routed again yields the
    same id, which is what makes a duplicated intent harmless at the sink."""
    name = "\x1f".join((str(event_id), rule, channel, recipient))
    return str(uuid.uuid5(_NOTIFICATION_NS, name))


def _millis(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


@dataclass(frozen=True)
class NotificationIntent:
    notification_id: str
    event_id: str
    event_type: str
    rule: str
    channel: str
    recipient: str
    body_text: str
    subject: str | None = None
    body_html: str | None = None
    user_id: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    generation: int = 0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    traceparent: str | None = None

    @property
    def idempotency_key(self) -> str:
        """The key providers see. A forced redelivery (generation > 0) gets its own."""
        if self.generation == 0:
            return self.notification_id
        return str(uuid.uuid5(uuid.UUID(self.notification_id), f"generation-{self.generation}"))

    def to_avro(self) -> dict[str, Any]:
        # Shallow, unlike dataclasses.asdict (whose deep copy was a tenth of the router's
        # handler time): every value is immutable except ``data``, which is copied.
        d = {name: getattr(self, name) for name in _INTENT_FIELDS}
        d["data"] = dict(self.data)
        return d

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> NotificationIntent:
        r = dict(record)
        r["notification_id"] = str(r["notification_id"])
        r["event_id"] = str(r["event_id"])
        r["created_at"] = _millis(r["created_at"])
        r["data"] = dict(r.get("data") or {})
        return cls(**r)


_INTENT_FIELDS = tuple(f.name for f in fields(NotificationIntent))


class DeliveryState(StrEnum):
    SENT = "SENT"
    RETRYING = "RETRYING"
    REJECTED = "REJECTED"
    DEAD = "DEAD"
    # The provider asked to wait (a retry-after): the sink paused the channel and sends the
    # same attempt again. A status only; the ledger never holds it. DeliveryStatus.v2+.
    THROTTLED = "THROTTLED"
    # The router did not make the notification (an opt-out, a suppressed address): final.
    # A status only, written by the router; no sink sees it. DeliveryStatus.v3+.
    SUPPRESSED = "SUPPRESSED"


@dataclass(frozen=True)
class DeliveryStatus:
    notification_id: str
    channel: str
    recipient: str
    state: DeliveryState
    attempts: int
    generation: int = 0
    event_id: str | None = None
    provider_message_id: str | None = None
    provider_response: str | None = None
    error_class: str | None = None
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_avro(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _STATUS_FIELDS}
        d["state"] = self.state.value
        return d

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> DeliveryStatus:
        r = dict(record)
        r["notification_id"] = str(r["notification_id"])
        r["state"] = DeliveryState(r["state"])
        r["occurred_at"] = _millis(r["occurred_at"])
        return cls(**r)


_STATUS_FIELDS = tuple(f.name for f in fields(DeliveryStatus))
