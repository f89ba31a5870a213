"""Whether a person gets a notification of a category on a channel: their choices
(``Preferences``), the workspace defaults and the critical categories, read from
``HERALD_PREFERENCES_FILE``::

    # Categories delivered whatever a person chose: no opt-out, no List-Unsubscribe.
    critical = ["security", "password-reset"]

    # What a person gets for a category and channel they never chose ("*": every one).
    # Anything not listed is on.
    [defaults.marketing]
    sms = false

The most specific entry wins, the person's before the workspace's: (category, channel),
(category, *), (*, channel), (*, *); with no entry anywhere, on.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.people.records import Preferences, most_specific

__all__ = ["Decision", "PolicyError", "PreferencePolicy"]


class PolicyError(ValueError):
    """The preferences file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Decision:
    send: bool
    reason: str | None = None  # why not, in words: "opted out of marketing on email"


SEND = Decision(True)


@dataclass(frozen=True)
class PreferencePolicy:
    defaults: dict[str, dict[str, bool]] = field(default_factory=dict)
    critical: frozenset[str] = frozenset()

    def is_critical(self, category: str) -> bool:
        return category in self.critical

    def decide(self, prefs: Preferences | None, category: str, channel: str) -> Decision:
        if category in self.critical:
            return SEND
        if prefs is not None:
            chosen = prefs.choice(category, channel)
            if chosen is not None:
                on, cat, ch = chosen
                if on:
                    return SEND
                what = "everything" if cat == "*" else category
                where = "every channel" if ch == "*" else channel
                return Decision(False, f"opted out of {what} on {where}")
        default = most_specific(self.defaults, category, channel)
        if default is None or default[0]:
            return SEND
        return Decision(False, f"{category} on {channel} is off by default")

    def effective(self, prefs: Preferences | None, category: str, channel: str) -> bool:
        return self.decide(prefs, category, channel).send

    @classmethod
    def parse(cls, doc: dict[str, Any], source: str = "preferences") -> PreferencePolicy:
        unknown = set(doc) - {"critical", "defaults"}
        if unknown:
            raise PolicyError(f"{source}: unknown keys {sorted(unknown)}")
        critical = doc.get("critical", [])
        if not isinstance(critical, list) or not all(isinstance(c, str) for c in critical):
            raise PolicyError(f"{source}: 'critical' must be an array of category names")
        defaults = doc.get("defaults", {})
        if not isinstance(defaults, dict):
            raise PolicyError(f"{source}: 'defaults' must be a table of categories")
        for category, channels in defaults.items():
            if not isinstance(channels, dict) or not all(
                isinstance(v, bool) for v in channels.values()
            ):
                raise PolicyError(
                    f"{source}: defaults.{category} must be a table of channel = true|false"
                )
        return cls({c: dict(chs) for c, chs in defaults.items()}, frozenset(critical))

    @classmethod
    def load(cls, path: Path) -> PreferencePolicy:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise PolicyError(
                f"preferences file {path} not found (set HERALD_PREFERENCES_FILE)"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{path}: invalid TOML: {e}") from None
        return cls.parse(doc, str(path))
