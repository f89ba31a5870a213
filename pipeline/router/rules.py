"""Routing rules, loaded from a TOML file (``HERALD_RULES_FILE``).

    [[rules]]
    name = "welcome-email"          # unique; part of every notification id it produces
    event = "user-registered"       # event type
    channel = "email"
    recipient = "email"             # dotted path to the recipient field in the event, or
    # to = "https://hooks.example.com/{{ user_id }}"    a Jinja template (may be a constant)
    template = "welcome"            # directory under the templates dir
    when = "locale is none or locale.startswith('en')"   # optional Jinja expression
    data = { url = "https://app.example.com/orders/{{ order_id }}" }   # optional, templates

A rule's name is part of the notification id, so renaming a rule makes its future
notifications new ones: rename with care.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Rule", "RuleError", "RuleSet", "load_rules"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class RuleError(ValueError):
    """The rules file is invalid; the message names the rule and the key."""


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
        known = {"name", "event", "channel", "recipient", "to", "template", "when", "data"}
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
        data = item.get("data", {})
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise RuleError(f"{where}: 'data' must be a table of strings")
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
