"""Routing rules, loaded from a TOML file (``HERALD_RULES_FILE``).

    [[rules]]
    name = "welcome-email"          # unique; part of every notification id it produces
    event = "user-registered"       # event type
    channel = "email"
    recipient = "subscriber.email|email"   # where to send: see below; or
    # to = "https://hooks.example.com/{{ user_id }}"    a Jinja template (may be a constant)
    template = "welcome"            # directory under the templates dir
    category = "transactional"      # optional, the default; preferences are per category
    when = "locale is none or locale.startswith('en')"   # optional Jinja expression
    data = { url = "https://app.example.com/orders/{{ order_id }}" }   # optional, templates

A rule's name is part of the notification id, so renaming a rule makes its future
notifications new ones: rename with care.

``recipient`` lists where the address may come from, separated by ``|``, tried in order;
the first that gives an address wins (the fallback):

- an event field, by dotted path: ``email``, ``contact.phone``;
- ``subscriber.email``, ``subscriber.phone``: the subscriber record of the event's user
  (the event's ``user_id``), when the router holds subscribers;
- ``subscriber.devices``: every address the subscriber registered for the rule's channel
  (``subscriber.devices.<channel>`` for another channel's), one notification per address,
  each with its own notification id (the id includes the recipient);
- ``subscriber.custom.<key>``: a value of the subscriber's custom data.

So ``recipient = "subscriber.email|email"`` sends to the address the subscriber record
holds, and to the event's ``email`` field for a user Herald has no record of (or no
address for). An address that is empty everywhere fails the rule (its dead letter names
it); the event's other rules still go out.

``category`` (default ``transactional``) is what people opt in and out of, per channel
(pipeline/people/policy.py); critical categories (``HERALD_PREFERENCES_FILE``) ignore
opt-outs and carry no List-Unsubscribe.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.records import DATA_LIST_UNSUBSCRIBE_MAILTO, DATA_LIST_UNSUBSCRIBE_URL

__all__ = [
    "DEFAULT_CATEGORY",
    "Rule",
    "RuleError",
    "RuleSet",
    "Source",
    "load_rules",
    "parse_recipient",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*$")
DEFAULT_CATEGORY = "transactional"
RESERVED_DATA = frozenset({DATA_LIST_UNSUBSCRIBE_URL, DATA_LIST_UNSUBSCRIBE_MAILTO})
SUBSCRIBER_FIELDS = ("email", "phone")


class RuleError(ValueError):
    """The rules file is invalid; the message names the rule and the key."""


@dataclass(frozen=True)
class Source:
    """One place a recipient may come from: ``kind`` is ``event`` (``path`` a dotted field
    path), ``subscriber`` (``path`` email or phone), ``devices`` (``path`` a channel) or
    ``custom`` (``path`` a key of the subscriber's custom data)."""

    kind: str
    path: str

    def __str__(self) -> str:
        if self.kind == "event":
            return self.path
        if self.kind == "subscriber":
            return f"subscriber.{self.path}"
        return f"subscriber.{self.kind}.{self.path}"


def parse_recipient(spec: str, channel: str) -> tuple[Source, ...]:
    """The alternatives of a rule's ``recipient``. Raises ValueError naming the bad one."""
    sources = []
    for raw in spec.split("|"):
        alt = raw.strip()
        if not _PATH.match(alt):
            raise ValueError(f"{alt!r} is not a field path")
        head, _, rest = alt.partition(".")
        if head != "subscriber":
            sources.append(Source("event", alt))
        elif rest in SUBSCRIBER_FIELDS:
            sources.append(Source("subscriber", rest))
        elif rest == "devices":
            sources.append(Source("devices", channel))
        elif rest.startswith("devices.") and rest.count(".") == 1:
            sources.append(Source("devices", rest.partition(".")[2]))
        elif rest.startswith("custom.") and rest.count(".") == 1:
            sources.append(Source("custom", rest.partition(".")[2]))
        else:
            raise ValueError(
                f"{alt!r}: a subscriber address is subscriber.email, subscriber.phone, "
                "subscriber.devices[.<channel>] or subscriber.custom.<key>"
            )
    return tuple(sources)


@dataclass(frozen=True)
class Rule:
    name: str
    event: str
    channel: str
    template: str
    recipient: str | None = None  # a field path in the event...
    to: str | None = None  # ...or a template for the recipient
    when: str | None = None
    data: dict[str, str] = field(default_factory=dict)  # channel extras, as templates
    category: str = DEFAULT_CATEGORY

    @cached_property
    def sources(self) -> tuple[Source, ...]:
        """Where ``recipient`` may come from, in order (empty for a ``to`` rule)."""
        return parse_recipient(self.recipient, self.channel) if self.recipient else ()


class RuleSet:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self._by_event: dict[str, list[Rule]] = {}
        seen: set[str] = set()
        for r in rules:
            if r.name in seen:
                raise RuleError(f"rule name {r.name!r} is used twice")
            seen.add(r.name)
            self._by_event.setdefault(r.event, []).append(r)

    def for_event(self, event_type: str) -> list[Rule]:
        return self._by_event.get(event_type, [])

    def __len__(self) -> int:
        return len(self.rules)


def parse_rules(doc: dict[str, Any], source: str = "rules") -> RuleSet:
    raw = doc.get("rules", [])
    if not isinstance(raw, list):
        raise RuleError(f"{source}: 'rules' must be an array of tables ([[rules]])")
    rules = []
    first_use: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"{source}: rules[{i}]"
        if not isinstance(item, dict):
            raise RuleError(f"{where}: must be a table")
        known = {
            "name",
            "event",
            "channel",
            "recipient",
            "to",
            "template",
            "when",
            "data",
            "category",
        }
        unknown = set(item) - known
        if unknown:
            raise RuleError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("name", "event", "channel", "template"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise RuleError(f"{where}: '{key}' is required and must be a string")
        if ("recipient" in item) == ("to" in item):
            raise RuleError(f"{where}: give exactly one of 'recipient' (a field) or 'to'")
        for key in ("recipient", "to"):
            if key in item and (not isinstance(item[key], str) or not item[key]):
                raise RuleError(f"{where}: '{key}' must be a non-empty string")
        if "recipient" in item:
            try:
                parse_recipient(item["recipient"], item["channel"])
            except ValueError as e:
                raise RuleError(f"{where}: 'recipient': {e}") from None
        category = item.get("category", DEFAULT_CATEGORY)
        if not isinstance(category, str) or not _NAME.match(category):
            raise RuleError(f"{where}: 'category' must match {_NAME.pattern}")
        data = item.get("data", {})
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise RuleError(f"{where}: 'data' must be a table of strings")
        reserved = sorted(set(data) & RESERVED_DATA)
        if reserved:
            raise RuleError(f"{where}: 'data' keys {reserved} are reserved for the router")
        if not _NAME.match(item["name"]):
            raise RuleError(f"{where}: name {item['name']!r} must match {_NAME.pattern}")
        if item["name"] in first_use:
            earlier = first_use[item["name"]]
            raise RuleError(f"{where}: name {item['name']!r} is already used by rules[{earlier}]")
        first_use[item["name"]] = i
        when = item.get("when")
        if when is not None and not isinstance(when, str):
            raise RuleError(f"{where}: 'when' must be a string")
        rules.append(Rule(**item))
    return RuleSet(rules)


def load_rules(path: Path) -> RuleSet:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise RuleError(f"rules file {path} not found (set HERALD_RULES_FILE)") from None
    except tomllib.TOMLDecodeError as e:
        raise RuleError(f"{path}: invalid TOML: {e}") from None
    return parse_rules(doc, str(path))
