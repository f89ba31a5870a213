"""The people records (schemas/people/) as Python classes, and their keys.

- ``Subscriber`` and ``Preferences`` are keyed by user id, so they land in the partition of
  that user's events (the topics are co-partitioned with the event topics).
- ``Suppression`` is keyed by channel and address: ``suppression_key()``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ANY",
    "PREFERENCES",
    "SUBSCRIBER",
    "SUPPRESSION",
    "Preferences",
    "Subscriber",
    "Suppression",
    "suppression_key",
]

SUBSCRIBER = "herald.people.Subscriber"
PREFERENCES = "herald.people.Preferences"
SUPPRESSION = "herald.people.Suppression"

ANY = "*"  # in preferences: every category, or every channel


def _millis(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


@dataclass(frozen=True)
class Subscriber:
    user_id: str
    email: str | None = None
    phone: str | None = None
    locale: str | None = None
    time_zone: str | None = None
    devices: dict[str, list[str]] = field(default_factory=dict)  # channel -> addresses
    custom: dict[str, str] = field(default_factory=dict)
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_by: str | None = None

    def to_avro(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["devices"] = {k: list(v) for k, v in self.devices.items()}
        d["custom"] = dict(self.custom)
        return d

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Subscriber:
        r = dict(record)
        r["devices"] = {str(k): [str(a) for a in v] for k, v in (r.get("devices") or {}).items()}
        r["custom"] = dict(r.get("custom") or {})
        r["updated_at"] = _millis(r["updated_at"])
        return cls(**r)

    def to_json(self) -> dict[str, Any]:
        d = self.to_avro()
        d["updated_at"] = self.updated_at.isoformat(timespec="milliseconds")
        return d

    def context(self) -> dict[str, Any]:
        """What templates see as ``subscriber`` (no device addresses: they may hold keys)."""
        return {
            "user_id": self.user_id,
            "email": self.email,
            "phone": self.phone,
            "locale": self.locale,
            "time_zone": self.time_zone,
            "custom": dict(self.custom),
        }

    def with_device(self, channel: str, address: str) -> Subscriber:
        devices = {k: list(v) for k, v in self.devices.items()}
        known = devices.setdefault(channel, [])
        if address not in known:
            known.append(address)
        return replace(self, devices=devices)


@dataclass(frozen=True)
class Preferences:
    user_id: str
    choices: dict[str, dict[str, bool]] = field(default_factory=dict)
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_by: str | None = None

    def to_avro(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["choices"] = {c: dict(chs) for c, chs in self.choices.items()}
        return d

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Preferences:
        r = dict(record)
        r["choices"] = {
            str(c): {str(ch): bool(on) for ch, on in chs.items()}
            for c, chs in (r.get("choices") or {}).items()
        }
        r["updated_at"] = _millis(r["updated_at"])
        return cls(**r)

    def to_json(self) -> dict[str, Any]:
        d = self.to_avro()
        d["updated_at"] = self.updated_at.isoformat(timespec="milliseconds")
        return d

    def choice(self, category: str, channel: str) -> tuple[bool, str, str] | None:
        """The most specific choice for (category, channel) and where it was made (the
        category and channel keys, possibly ``*``), or None when nothing applies."""
        return most_specific(self.choices, category, channel)

    def with_choice(
        self, category: str, channel: str, on: bool, *, by: str, at: datetime
    ) -> Preferences:
        choices = {c: dict(chs) for c, chs in self.choices.items()}
        choices.setdefault(category, {})[channel] = on
        return replace(self, choices=choices, updated_at=at, updated_by=by)


def most_specific(
    choices: dict[str, dict[str, bool]], category: str, channel: str
) -> tuple[bool, str, str] | None:
    """(on, category key, channel key) of the most specific entry: category and channel,
    then category and ``*``, then ``*`` and channel, then ``*`` and ``*``."""
    for cat in (category, ANY):
        chs = choices.get(cat)
        if not chs:
            continue
        for ch in (channel, ANY):
            if ch in chs:
                return chs[ch], cat, ch
    return None


@dataclass(frozen=True)
class Suppression:
    channel: str
    address: str  # as statuses show it
    reason: str  # bounced, gone, operator
    source: str
    detail: str | None = None
    error_class: str | None = None
    notification_id: str | None = None
    user_id: str | None = None
    suppressed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_avro(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Suppression:
        r = dict(record)
        r["suppressed_at"] = _millis(r["suppressed_at"])
        return cls(**r)

    def to_json(self) -> dict[str, Any]:
        d = self.to_avro()
        d["suppressed_at"] = self.suppressed_at.isoformat(timespec="milliseconds")
        return d

    def describe(self) -> str:
        """Why, in a few words: ``bounced (550 5.1.1 Mailbox unavailable)``."""
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


def suppression_key(channel: str, address: str, shown_as: str | None = None) -> str:
    """The key of an address's suppression: ``<channel>:<address>``. An email address is
    compared in lower case. An address that holds a secret (``shown_as``, how the connector
    shows it, differs from it: a Web Push subscription carries its keys) is keyed by its
    SHA-256 instead, ``<channel>:sha256:<hex>``, so the secret stays out of the topic."""
    address = address.strip()
    if shown_as is not None and shown_as != address:
        return f"{channel}:sha256:{hashlib.sha256(address.encode()).hexdigest()}"
    if channel == "email":
        address = address.lower()
    return f"{channel}:{address}"
