"""The people operations the HTTP API and the CLI share: subscribers, devices, preferences,
one-click unsubscribe and suppressions. Each writes one record to its compacted topic (or
reads the latest record of a key back); nothing else holds this state.

Blocking (Kafka round trips): the API calls them in a thread. Refusals are the
``ServiceError`` classes of pipeline/service.py, so the API answers them as problem
documents like every other refusal.

A change that depends on the current record (``merge_subscriber``, ``add_device``,
``set_preference``, an unsubscribe) reads the latest record and writes the new one: two
such changes of one person at the same moment may lose one of them (the last write wins).
A PUT replaces the record whole and has no such race.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError

from pipeline.people.policy import PreferencePolicy
from pipeline.people.records import (
    ANY,
    PREFERENCES,
    SUBSCRIBER,
    SUPPRESSION,
    Preferences,
    Subscriber,
    Suppression,
    suppression_key,
)
from pipeline.people.store import PeopleStore, StoreError
from pipeline.people.unsubscribe import ForgedToken, UnsubscribeToken, verify
from pipeline.router.rules import RuleSet
from pipeline.service import InvalidRequest, NotFound, Unavailable
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["PeopleService"]

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_PHONE = re.compile(r"^\+?[0-9 ().-]{3,31}$")
_NAME = re.compile(r"^(?:\*|[a-z0-9][a-z0-9._-]*)$")
SUBSCRIBER_FIELDS = ("email", "phone", "locale", "time_zone", "devices", "custom")


def _now() -> datetime:
    """Now, to the millisecond: what a timestamp-millis field keeps, so an answer shows what
    a later read gives."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class PeopleService:
    def __init__(
        self,
        settings: HeraldSettings,
        store: PeopleStore,
        policy: PreferencePolicy,
        channels: list[str],
        rules: RuleSet | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.policy = policy
        self.channels = channels
        self.rules = rules
        self.topics = Topics(settings.topic_prefix)
        self.secret = (
            settings.unsubscribe_secret.get_secret_value().encode()
            if settings.unsubscribe_secret
            else None
        )

    @classmethod
    def from_settings(cls, settings: HeraldSettings) -> PeopleService:
        """The service as the CLI and the demo use it: the people topics of ``settings``,
        the workspace's preference policy, the installed channels and the routing rules.
        Close ``store`` when done."""
        from connectors.registry import installed_channels
        from pipeline.router.rules import load_rules
        from pipeline.serialization import serde_from_settings

        return cls(
            settings,
            PeopleStore(settings, serde_from_settings(settings)),
            PreferencePolicy.load(settings.preferences_file),
            installed_channels(),
            load_rules(settings.rules_file),
        )

    # -- subscribers ------------------------------------------------------------------------

    def get_subscriber(self, user_id: str) -> Subscriber:
        msg = self._latest(self.topics.subscribers, _user(user_id))
        if msg is None:
            raise NotFound("Not Found", f"no subscriber {user_id!r}")
        return Subscriber.from_avro(self._decode(msg, SUBSCRIBER))

    def find_subscriber(self, user_id: str) -> Subscriber | None:
        try:
            return self.get_subscriber(user_id)
        except NotFound:
            return None

    def put_subscriber(self, user_id: str, body: dict[str, Any], by: str) -> Subscriber:
        """Replace the subscriber record with ``body`` (its fields; absent ones empty)."""
        fields = self._subscriber_fields(body)
        return self._write_subscriber(Subscriber(_user(user_id), **fields, updated_by=by))

    def merge_subscriber(self, user_id: str, body: dict[str, Any], by: str) -> Subscriber:
        """Change the fields ``body`` names, keeping the others (devices and custom data are
        merged key by key)."""
        fields = self._subscriber_fields(body)
        current = self.find_subscriber(user_id) or Subscriber(_user(user_id))
        devices = {k: list(v) for k, v in current.devices.items()}
        for channel, addresses in fields.pop("devices", {}).items():
            for address in addresses:
                devices.setdefault(channel, [])
                if address not in devices[channel]:
                    devices[channel].append(address)
        custom = {**current.custom, **fields.pop("custom", {})}
        merged = replace(current, **fields, devices=devices, custom=custom, updated_by=by)
        return self._write_subscriber(merged)

    def delete_subscriber(self, user_id: str) -> None:
        self._write(self.topics.subscribers, _user(user_id), None, None)

    def add_device(self, user_id: str, body: dict[str, Any], by: str) -> Subscriber:
        """Register an address of a push channel (``{"channel": "fcm", "address": "..."}``).
        Registering it is proof it lives: a suppression of it is lifted."""
        channel, address = body.get("channel"), body.get("address", body.get("token"))
        problems = []
        if channel not in self.channels:
            problems.append(("channel", f"channel must be one of {', '.join(self.channels)}"))
        if not isinstance(address, str) or not address.strip():
            problems.append(("address", "address is required (a device token or subscription)"))
        if problems:
            raise InvalidRequest(
                "Invalid Device", "; ".join(m for _, m in problems), [f for f, _ in problems]
            )
        assert isinstance(channel, str) and isinstance(address, str)  # noqa: S101 - checked
        current = self.find_subscriber(user_id) or Subscriber(_user(user_id))
        updated = self._write_subscriber(
            replace(current.with_device(channel, address.strip()), updated_by=by)
        )
        self.remove_suppression(channel, address.strip(), missing_ok=True)
        return updated

    def _write_subscriber(self, subscriber: Subscriber) -> Subscriber:
        subscriber = replace(subscriber, updated_at=_now())
        self._write(self.topics.subscribers, subscriber.user_id, SUBSCRIBER, subscriber.to_avro())
        return subscriber

    def _subscriber_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        problems: list[tuple[str, str]] = []
        unknown = sorted(set(body) - set(SUBSCRIBER_FIELDS) - {"user_id", "updated_at"})
        problems += [(k, f"{k} is not a subscriber field") for k in unknown]
        fields: dict[str, Any] = {}
        for key in ("email", "phone", "locale", "time_zone"):
            value = body.get(key)
            if value is None:
                if key in body:
                    fields[key] = None
                continue
            if not isinstance(value, str) or not value.strip():
                problems.append((key, f"{key} must be a non-empty string or null"))
                continue
            value = value.strip()
            if key == "email" and (len(value) > 254 or not _EMAIL.match(value)):
                problems.append((key, "email is not an email address"))
            elif key == "phone" and not _PHONE.match(value):
                problems.append((key, "phone is not a phone number"))
            elif key == "locale" and not _known_locale(value):
                problems.append((key, "locale is not a known locale (BCP 47, e.g. pt-BR)"))
            elif key == "time_zone" and not _known_zone(value):
                problems.append((key, "time_zone is not an IANA time zone (e.g. Europe/Lisbon)"))
            fields[key] = value
        if "devices" in body:
            devices = body["devices"] or {}
            if not isinstance(devices, dict) or not all(
                isinstance(v, list) and all(isinstance(a, str) and a.strip() for a in v)
                for v in devices.values()
            ):
                problems.append(("devices", "devices must map channels to lists of addresses"))
            else:
                wrong = sorted(set(devices) - set(self.channels))
                if wrong:
                    problems.append(("devices", f"unknown channels {wrong}"))
                fields["devices"] = {c: [a.strip() for a in v] for c, v in devices.items()}
        if "custom" in body:
            custom = body["custom"] or {}
            if not isinstance(custom, dict) or not all(isinstance(v, str) for v in custom.values()):
                problems.append(("custom", "custom must be an object of strings"))
            else:
                fields["custom"] = {str(k): v for k, v in custom.items()}
        if problems:
            raise InvalidRequest(
                "Invalid Subscriber", "; ".join(m for _, m in problems), [f for f, _ in problems]
            )
        return fields

    # -- preferences -------------------------------------------------------------------------

    def get_preferences(self, user_id: str) -> Preferences:
        """The person's choices (empty ones when they never chose)."""
        msg = self._latest(self.topics.preferences, _user(user_id))
        if msg is None:
            return Preferences(_user(user_id), updated_at=datetime.fromtimestamp(0, UTC))
        return Preferences.from_avro(self._decode(msg, PREFERENCES))

    def put_preferences(self, user_id: str, body: dict[str, Any], by: str) -> Preferences:
        """Replace the choices with ``body["choices"]`` (category -> channel -> bool)."""
        choices = body.get("choices")
        unknown = sorted(set(body) - {"choices", "user_id", "updated_at", "updated_by"})
        if unknown or not isinstance(choices, dict):
            raise InvalidRequest(
                "Invalid Preferences",
                'the body is {"choices": {category: {channel: true|false}}}',
                ["choices", *unknown],
            )
        problems = []
        for category, channels in choices.items():
            if not isinstance(category, str) or not _NAME.match(category):
                problems.append(f"category {category!r} is not a category name or *")
                continue
            if not isinstance(channels, dict):
                problems.append(f"choices.{category} must be an object of channel: true|false")
                continue
            for channel, on in channels.items():
                if channel != ANY and channel not in self.channels:
                    problems.append(f"choices.{category}: unknown channel {channel!r}")
                elif not isinstance(on, bool):
                    problems.append(f"choices.{category}.{channel} must be true or false")
        if problems:
            raise InvalidRequest("Invalid Preferences", "; ".join(problems), ["choices"])
        prefs = Preferences(
            _user(user_id),
            {c: dict(chs) for c, chs in choices.items()},
            updated_at=_now(),
            updated_by=by,
        )
        self._write(self.topics.preferences, prefs.user_id, PREFERENCES, prefs.to_avro())
        return prefs

    def set_preference(
        self, user_id: str, category: str, channel: str, on: bool, by: str
    ) -> Preferences:
        if not _NAME.match(category):
            raise InvalidRequest("Invalid Preference", f"{category!r} is not a category name")
        if channel != ANY and channel not in self.channels:
            raise InvalidRequest(
                "Invalid Preference", f"channel must be * or one of {', '.join(self.channels)}"
            )
        prefs = self.get_preferences(user_id).with_choice(category, channel, on, by=by, at=_now())
        self._write(self.topics.preferences, prefs.user_id, PREFERENCES, prefs.to_avro())
        return prefs

    def describe_preferences(self, prefs: Preferences) -> dict[str, Any]:
        """The choices, and what they amount to with the workspace defaults: for every
        category the rules or the choices name, on every channel."""
        categories = set(self.policy.critical) | {c for c in prefs.choices if c != ANY}
        categories |= {c for c in self.policy.defaults if c != ANY}
        if self.rules is not None:
            categories |= {r.category for r in self.rules.rules}
        effective = {
            category: {ch: self.policy.effective(prefs, category, ch) for ch in self.channels}
            for category in sorted(categories)
        }
        updated = prefs.updated_at.timestamp() > 0
        return {
            "user_id": prefs.user_id,
            "choices": prefs.choices,
            "updated_at": prefs.updated_at.isoformat(timespec="milliseconds") if updated else None,
            "updated_by": prefs.updated_by,
            "critical": sorted(self.policy.critical),
            "effective": effective,
        }

    # -- one-click unsubscribe ---------------------------------------------------------------

    def check_token(self, token: str) -> UnsubscribeToken:
        """The token's content; raises TokenError (ForgedToken, ExpiredToken)."""
        if self.secret is None:
            raise ForgedToken("unsubscribe links are not enabled (HERALD_UNSUBSCRIBE_SECRET)")
        return verify(self.secret, token, _now())

    def unsubscribe(self, token: str) -> UnsubscribeToken:
        """Opt the token's user out of its category on its channel. Raises TokenError and
        changes nothing for a forged or expired token."""
        found = self.check_token(token)
        self.set_preference(found.user_id, found.category, found.channel, False, "unsubscribe-link")
        return found

    # -- suppressions ------------------------------------------------------------------------

    def list_suppressions(self, channel: str | None = None) -> list[tuple[str, Suppression]]:
        out = []
        for key, msg in sorted(self._all(self.topics.suppressions).items()):
            s = Suppression.from_avro(self._decode(msg, SUPPRESSION))
            if channel is None or s.channel == channel:
                out.append((key, s))
        return out

    def add_suppression(self, channel: str, address: str, reason: str, by: str) -> str:
        shown = self._shown(channel, address)
        record = Suppression(channel, shown, reason, source=by, suppressed_at=_now())
        key = suppression_key(channel, address, shown)
        self._write(self.topics.suppressions, key, SUPPRESSION, record.to_avro())
        return key

    def remove_suppression(self, channel: str, address: str, *, missing_ok: bool = False) -> str:
        """Lift the suppression of ``address`` (or of the key ``list`` shows)."""
        key = address if address.startswith(f"{channel}:") else None
        key = key or suppression_key(channel, address, self._shown(channel, address))
        if not missing_ok and key not in self._all(self.topics.suppressions):
            raise NotFound("Not Found", f"{key} is not suppressed")
        self._write(self.topics.suppressions, key, None, None)
        return key

    def _shown(self, channel: str, address: str) -> str:
        from connectors.registry import load_connectors

        cls = load_connectors().get(channel)
        return cls.describe_address(address) if cls is not None else address

    # -- Kafka -------------------------------------------------------------------------------

    def _write(self, topic: str, key: str, name: str | None, record: dict[str, Any] | None) -> None:
        try:
            self.store.write(topic, key, name, record)
        except StoreError as e:
            raise Unavailable(f"Kafka did not accept the record: {e}; retry") from e

    def _latest(self, topic: str, key: str) -> Any:
        try:
            return self.store.latest(topic, key)
        except StoreError as e:
            raise Unavailable(f"could not read {topic}: {e}; retry") from e

    def _all(self, topic: str) -> dict[str, Any]:
        try:
            return self.store.all_latest(topic)
        except StoreError as e:
            raise Unavailable(f"could not read {topic}: {e}; retry") from e

    def _decode(self, msg: Any, name: str) -> dict[str, Any]:
        return self.store.serde.decode(
            msg.value(), topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
            expect=name,
        ).record  # fmt: skip


def _user(user_id: str) -> str:
    user_id = user_id.strip()
    if not user_id or len(user_id) > 255 or any(ord(c) < 32 for c in user_id):
        raise InvalidRequest("Invalid User Id", "a user id is 1 to 255 characters", ["user_id"])
    return user_id


def _known_locale(tag: str) -> bool:
    try:
        Locale.parse(tag.replace("-", "_"))
    except (ValueError, UnknownLocaleError):
        return False
    return True


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True
